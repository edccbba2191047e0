"""Decoding a latent into frames on the CPU, the way every door does it (the pipeline, the
ComfyUI decode node): chunk by chunk, each chunk converted to ComfyUI's frame layout (and to
uint8 for a video writer) on the VAE's device, its copy to the CPU overlapped with the next
chunk's decode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models.vae import WanVAE

__all__ = ["decode_frames", "PIN_RESULT"]

# decode_frames on a GPU: the float32 result in page-locked memory, each chunk copied straight
# into it (True), or staged through small pinned buffers and copied into pageable memory (False,
# the default); None: page-locked when a writer takes the frames. Staged, because a fresh
# page-locked result costs more than the copies it saves: torch's host cache hands a freed one
# back only once the caller has let the previous run's result go (a run whose caller keeps its
# results, or a one-shot CLI run, locks fresh pages every time), and locking them on a worker
# thread while the DiT samples stalls the GPU work instead (benchmarks/NOTES.md). A page-locked
# result would also stay locked while the caller holds it.
PIN_RESULT: bool | None = False


def decode_frames(
    vae: WanVAE,
    latent: torch.Tensor,
    tile_size: int | None = None,
    on_frames: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Normalised latent [1, 16, T, h, w] -> frames [T', H, W, 3] float32 in [0, 1] on the CPU
    (ComfyUI's IMAGE layout), decoded chunk by chunk; a NaN or infinite frame raises ValueError.

    tile_size: latent pixels per tile (`WanVAE.decode`), None for whole frames. on_frames: handed
    each decoded chunk of frames as it is produced, uint8 [t, H, W, 3] on the CPU (tiled
    decoding: once, all frames), e.g. a background `VideoWriter.write`.

    Untiled, each chunk is turned into ComfyUI's layout and into uint8 on the VAE's device and
    copied once into the result: the CPU, busy with the video encoder, does no per-pixel work.
    On a GPU the copies are asynchronous (pinned staging buffers) and each chunk is handed on
    one chunk late, once its copy is done, so the GPU always has the next chunk queued: waiting
    for every chunk's copy (as a plain `.cpu()` does) leaves it idle between chunks
    (benchmarks/NOTES.md log).
    """
    from .video import frames_to_uint8, uint8_levels, wan_to_frames

    _, _, t, h, w = latent.shape
    r, s = vae.config.temporal_ratio, vae.config.spatial_ratio
    with torch.no_grad():
        if tile_size is not None:
            video = vae.decode(latent, tile_size=tile_size, out_device="cpu")  # [1, 3, T, H, W]
            frames = wan_to_frames(video[0])
            if on_frames is not None:
                on_frames(frames_to_uint8(frames))
            return frames
        cuda = vae.device.type == "cuda"
        pin = cuda and (on_frames is not None if PIN_RESULT is None else PIN_RESULT)
        frames = torch.empty(1 + r * (t - 1), h * s, w * s, 3, dtype=torch.float32, pin_memory=pin)
        done = 0
        pending: list[tuple] = []  # copies in flight: (result rows, float staging, uint8 staging, finite, event)

        def hand_on(keep: int) -> None:
            while len(pending) > keep:
                rows, f32, u8, finite, event = pending.pop(0)
                event.synchronize()
                if not finite.item():
                    raise ValueError("frames contain NaN or infinite values")
                if f32 is not None:
                    rows.copy_(f32)
                if on_frames is not None:
                    on_frames(u8)

        def chunk(c: torch.Tensor) -> None:  # [1, 3, t, H, W] in [-1, 1] on the VAE's device
            nonlocal done
            f = wan_to_frames(c[0])  # [t, H, W, 3] in [0, 1]
            rows = frames[done : done + f.shape[0]]
            done += f.shape[0]
            if not cuda:
                rows.copy_(f)
                if on_frames is not None:
                    on_frames(frames_to_uint8(f, layout="comfy"))
                return
            if frames.is_pinned():
                rows.copy_(f, non_blocking=True)  # straight into the page-locked result
                f32 = None
            else:
                f32 = torch.empty(f.shape, dtype=f.dtype, pin_memory=True).copy_(f, non_blocking=True)
            u8 = None
            if on_frames is not None:
                u8 = uint8_levels(f)  # on the GPU
                u8 = torch.empty(u8.shape, dtype=u8.dtype, pin_memory=True).copy_(u8, non_blocking=True)
            # the NaN check's answer travels with the frames: reading the GPU flag (`.item()`)
            # would wait for everything queued, this chunk's decode included, and leave the GPU
            # idle until the next chunk is queued
            finite = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(torch.isfinite(f).all(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(vae.device))
            hand_on(keep=1)  # the previous chunk, whose copy ran while this one was queued
            pending.append((rows, f32, u8, finite, event))

        vae.decode(latent, on_frames=chunk, keep=False)
        hand_on(keep=0)
    return frames
