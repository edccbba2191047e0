"""Decoding a latent into frames on the CPU, the way every door does it (the pipeline, the
ComfyUI decode node): chunk by chunk, each chunk converted to ComfyUI's frame layout (and to
uint8 for a video writer) on the VAE's device, its copy to the CPU overlapped with the next
chunk's decode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models.vae import WanVAE

__all__ = ["decode_frames", "PIN_RESULT", "page_locks_result", "result_buffer", "result_shape"]

# decode_frames on a GPU: the float32 result in page-locked memory, each chunk copied straight
# into it (True), or staged through a pinned buffer and copied into pageable memory (False).
# None (default): page-locked when a writer takes the frames, whose encoder the staged copies
# compete with for the CPU; alone, staging is faster (locking fresh pages costs more than the
# copies it saves; benchmarks/NOTES.md). A page-locked result stays page-locked while the
# caller holds it; torch keeps freed ones cached.
PIN_RESULT: bool | None = None


def page_locks_result(cuda: bool, writer: bool) -> bool:
    """Whether `decode_frames` decodes into a page-locked result (`PIN_RESULT`): on a GPU, with a
    writer taking the frames (`on_frames`) unless PIN_RESULT says otherwise."""
    return cuda and (writer if PIN_RESULT is None else PIN_RESULT)


def result_shape(vae: WanVAE, latent_shape) -> tuple[int, int, int, int]:
    """[T', H, W, 3]: the frames a latent [1, C, T, h, w] decodes to."""
    t, h, w = latent_shape[-3:]
    r, s = vae.config.temporal_ratio, vae.config.spatial_ratio
    return 1 + r * (t - 1), h * s, w * s, 3


def result_buffer(vae: WanVAE, latent_shape, page_locked: bool) -> torch.Tensor:
    """The empty float32 result [T', H, W, 3] of decoding a latent [1, C, T, h, w].

    Page-locking fresh memory is slow (a few tenths of a second per GB of the CPU's time), and
    torch's host cache hands a freed block back only once the caller has let the previous run's
    result go: the pipeline makes this buffer on a worker thread while the DiT samples, and passes
    it as `decode_frames(out=...)`."""
    return torch.empty(result_shape(vae, latent_shape), dtype=torch.float32, pin_memory=page_locked)


def decode_frames(
    vae: WanVAE,
    latent: torch.Tensor,
    tile_size: int | None = None,
    on_frames: Callable[[torch.Tensor], None] | None = None,
    out: torch.Tensor | None = None,
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

    out: the result, made beforehand by `result_buffer` (page-locked or not: the copies follow
    it); None: made here, page-locked as `page_locks_result` says.
    """
    from .video import frames_to_uint8, uint8_levels, wan_to_frames

    want = result_shape(vae, latent.shape)
    if out is not None and (out.shape != want or out.dtype != torch.float32 or out.device.type != "cpu"):
        raise ValueError(f"out must be a float32 CPU tensor of shape {want}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    with torch.no_grad():
        if tile_size is not None:
            video = vae.decode(latent, tile_size=tile_size, out_device="cpu")  # [1, 3, T, H, W]
            frames = wan_to_frames(video[0])
            if on_frames is not None:
                on_frames(frames_to_uint8(frames))
            return frames if out is None else out.copy_(frames)
        cuda = vae.device.type == "cuda"
        frames = out if out is not None else result_buffer(vae, latent.shape, page_locks_result(cuda, on_frames is not None))
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
