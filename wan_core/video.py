"""Video file output (and input, for tests) through PyAV.

Two frame layouts meet here:
- ComfyUI's IMAGE batch: float [T, H, W, 3] in [0, 1] (also what its video nodes take);
- Wan's decoded video: float [3, T, H, W] in [-1, 1] (the VAE's output, batch dimension removed).
`wan_to_frames` / `frames_to_wan` convert between them; `write_video` takes either.

Encoding: H.264 (libx264) in yuv420p, which every player and browser reads, when PyAV's bundled
FFmpeg has it; otherwise MPEG-4 part 2 (`mpeg4`, always built into FFmpeg) with a warning.
yuv420p stores chroma at half resolution, so widths and heights must be even: odd sizes are
padded by repeating the last row/column (or cropped, or refused, as asked).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from fractions import Fraction

import torch

__all__ = [
    "wan_to_frames",
    "frames_to_wan",
    "frames_to_uint8",
    "VideoWriter",
    "write_video",
    "read_video",
    "available_codec",
]

# H.264 encoders in order of preference, then the fallback every FFmpeg build has.
_H264 = ("libx264",)
_FALLBACK = "mpeg4"
# x264's speed presets, fastest first: at one crf, a slower preset spends more encoder time for a
# smaller file of about the same quality.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")


def check_encoding(crf: int, preset: str) -> None:
    """ValueError for a crf or x264 preset the encoder would refuse (checked before any work)."""
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")
    if preset not in X264_PRESETS:
        raise ValueError(f"x264 preset must be one of {', '.join(X264_PRESETS)}; got {preset!r}")


def wan_to_frames(video: torch.Tensor) -> torch.Tensor:
    """Wan layout [3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] -> ComfyUI [T, H, W, 3] in [0, 1], fp32.

    Values outside [-1, 1] are clamped, as the official `cache_video` does before saving.
    """
    if video.ndim == 5 and video.shape[0] == 1:
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a Wan video [3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    # [3, T, H, W] -> [T, H, W, 3]
    return ((video.float().clamp(-1, 1) + 1) * 0.5).permute(1, 2, 3, 0)


def frames_to_wan(frames: torch.Tensor) -> torch.Tensor:
    """ComfyUI [T, H, W, 3] in [0, 1] -> Wan [3, T, H, W] in [-1, 1], fp32 (the VAE's input layout)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3] in [0, 1], got shape {tuple(frames.shape)}")
    # [T, H, W, 3] -> [3, T, H, W]
    return (frames.float() * 2 - 1).permute(3, 0, 1, 2)


def _as_frames(video: torch.Tensor, layout: str | None) -> torch.Tensor:
    """Either layout (or uint8 [T, H, W, 3]) -> [T, H, W, 3]; float in [0, 1] or uint8 as given.

    Without `layout`, a trailing dimension of 3 means ComfyUI's layout, otherwise a leading 3 (or
    [1, 3, ...]) means Wan's: a [3, T, H, 3] tensor is taken as 3 ComfyUI frames, since the VAE
    never decodes a video 3 pixels wide.
    """
    if layout is None:
        if video.dtype == torch.uint8 or video.shape[-1:] == (3,):
            layout = "comfy"
        elif (video.ndim == 5 and video.shape[:2] == (1, 3)) or (video.ndim == 4 and video.shape[0] == 3):
            layout = "wan"
        else:
            layout = "comfy"  # let the check below say what is wrong
    if layout == "wan":
        return wan_to_frames(video)
    if layout != "comfy":
        raise ValueError(
            f"layout must be 'comfy' ([T, H, W, 3] in [0, 1]) or 'wan' ([3, T, H, W] in [-1, 1]), got {layout!r}"
        )
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"expected frames [T, H, W, 3] in [0, 1] or a Wan video [3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}"
        )
    return video


def uint8_levels(frames: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] -> uint8 levels, rounded (not truncated), where the frames are."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)


def frames_to_uint8(frames: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """Frames in either layout -> uint8 [T, H, W, 3] on the CPU, rounded (not truncated)."""
    frames = _as_frames(frames, layout)
    if frames.dtype == torch.uint8:
        return frames.cpu()
    if not frames.is_floating_point():
        raise ValueError(f"frames must be float in [0, 1] (or uint8), got {frames.dtype}")
    if not torch.isfinite(frames).all():
        raise ValueError("frames contain NaN or infinite values")
    return uint8_levels(frames).cpu()


def available_codec() -> str:
    """The encoder `write_video` uses by default: libx264 when PyAV's FFmpeg has it, else mpeg4."""
    import av

    for name in _H264:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises UnknownCodecError (its class moved between versions)
            continue
    return _FALLBACK


def _even(frames: torch.Tensor, odd_size: str) -> torch.Tensor:
    """[T, H, W, 3] -> [T, H', W', 3] with even H', W' (yuv420p needs both)."""
    t, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    if odd_size == "error":
        raise ValueError(f"frame size {w}x{h} is odd; yuv420p video needs even width and height")
    if odd_size == "crop":
        if h < 2 or w < 2:
            raise ValueError(f"frame size {w}x{h} is too small to crop to even dimensions")
        return frames[:, : h - h % 2, : w - w % 2]
    if odd_size == "pad":
        # repeat the last row / column: [T, H, W, 3] -> [T, H + H % 2, W + W % 2, 3]
        if h % 2:
            frames = torch.cat([frames, frames[:, -1:]], dim=1)
        if w % 2:
            frames = torch.cat([frames, frames[:, :, -1:]], dim=2)
        return frames
    raise AssertionError(odd_size)  # VideoWriter checked it


class VideoWriter:
    """An mp4 written frame chunk by frame chunk, optionally encoded on a background thread.

    `write(frames)` takes a chunk in any layout `write_video` takes; the stream is opened at the
    first chunk (its size fixes the video's). With `background=True` the float -> uint8 conversion
    and the encoding run on a worker thread while the caller goes on, e.g. decoding the next
    latent frames on the GPU (PyAV releases the GIL while x264 works), so a whole run pays only for
    the part of the encoding that outlasts the decode. `close()` waits for the worker, flushes the
    encoder and closes the file; an error in either thread, or `abort()`, leaves no partial file.
    Use as a context manager: an exception inside the `with` aborts.

    The file is written under a temporary name beside `path` (`.<name>.<random>.partial<suffix>`)
    and renamed to `path` by `close()`, in one step: a reader, a crash, a SIGTERM or a full disk
    never leaves half a video at `path`, and an existing file there stays until the new one is whole.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 16,
        *,
        layout: str | None = None,
        crf: int = 19,
        codec: str | None = None,
        preset: str = "medium",
        odd_size: str = "pad",
        background: bool = False,
    ):
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        check_encoding(crf, preset)
        if odd_size not in ("pad", "crop", "error"):
            raise ValueError(f"odd_size must be 'pad', 'crop' or 'error', got {odd_size!r}")
        self.path, self.fps, self.layout, self.odd_size = os.fspath(path), fps, layout, odd_size
        self.codec = self._pick_codec(codec)
        if self.codec == _FALLBACK:
            q = str(min(31, max(2, round(crf / 6))))
            self.options = {"qmin": q, "qmax": q}
        elif self.codec.startswith("libx26"):
            self.options = {"crf": str(crf), "preset": preset}
        else:
            self.options = {}
        self._container = self._stream = None
        folder, name = os.path.split(os.path.abspath(self.path))
        stem, suffix = os.path.splitext(name)
        self._tmp = os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.partial{suffix}")
        self._opened = False  # the temporary file exists and is ours to remove
        self._size: tuple[int, int] | None = None
        self._error: BaseException | None = None
        self._queue = None
        if background:
            import queue
            import threading

            self._queue = queue.Queue(maxsize=8)  # bounded: a slow encoder holds the producer back
            self._worker = threading.Thread(target=self._drain, name="wan-video-writer", daemon=True)
            self._worker.start()

    @staticmethod
    def _pick_codec(codec: str | None) -> str:
        import av

        if codec is None:
            codec = available_codec()
            if codec == _FALLBACK:
                warnings.warn(
                    "PyAV's FFmpeg has no libx264: writing MPEG-4 part 2 video instead of H.264 "
                    "(plays in most desktop players, not in all browsers)",
                    stacklevel=3,
                )
            return codec
        try:
            av.codec.Codec(codec, "w")
        except Exception as e:
            raise ValueError(f"video encoder {codec!r} is not available in PyAV's FFmpeg ({e})") from e
        return codec

    def write(self, frames: torch.Tensor) -> None:
        """Add frames ([T, H, W, 3] in [0, 1] or uint8, or Wan's [3, T, H, W] in [-1, 1])."""
        data = _as_frames(frames, self.layout)
        if data.shape[0] == 0 or data.shape[1] == 0 or data.shape[2] == 0:
            raise ValueError(f"nothing to write: frames have shape {tuple(data.shape)}")
        data = _even(data, self.odd_size)
        if self._size is None:
            self._size = (data.shape[1], data.shape[2])
        elif (data.shape[1], data.shape[2]) != self._size:
            raise ValueError(f"frames of {data.shape[2]}x{data.shape[1]} after frames of {self._size[1]}x{self._size[0]}")
        if self._queue is None:
            self._encode(data)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(data.cpu())  # the device copy is made here, the conversion on the worker

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._encode(data)
                except BaseException as e:  # re-raised in the caller's thread (write / close)
                    self._error = e

    def _encode(self, data: torch.Tensor) -> None:
        import av

        if self._container is None:
            h, w = self._size
            rate = Fraction(self.fps).limit_denominator(1001) if isinstance(self.fps, float) else Fraction(self.fps)
            # an .mkv / .mov name gets that container; anything else is written as mp4
            fmt = None if self.path.lower().endswith((".mkv", ".mov")) else "mp4"
            self._container = av.open(self._tmp, mode="w", format=fmt)
            self._opened = True
            self._stream = self._container.add_stream(self.codec, rate=rate, options=self.options)
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
            self._stream.thread_type = "AUTO"  # frame + slice threads: the encoder uses the machine's cores
        # One frame at a time: the float -> uint8 conversion stays in cache and overlaps the
        # encoder's threads (benchmarks/NOTES.md).
        for frame in data:
            rgb = frames_to_uint8(frame.contiguous()[None], layout="comfy")[0]
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(rgb.numpy(), format="rgb24")):
                self._container.mux(packet)

    def _stop_worker(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._worker.join()
            self._queue = None

    def close(self) -> str:
        """Finish the file; returns the encoder used. Raises what went wrong while encoding."""
        try:
            self._stop_worker()
            if self._error is not None:
                raise self._error
            if self._container is None:
                raise ValueError("nothing to write: no frames were given")
            for packet in self._stream.encode():  # flush the encoder's delayed frames
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)  # the whole video appears at `path` at once
            self._opened = False
        except BaseException:
            self.abort()
            raise
        return self.codec

    def abort(self) -> None:
        """Stop, and remove the partial (temporary) file; `path` is left as it was."""
        self._stop_worker()
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        if self._opened:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            self._opened = False

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor,
    fps: float = 16,
    *,
    layout: str | None = None,
    crf: int = 19,
    codec: str | None = None,
    preset: str = "medium",
    odd_size: str = "pad",
) -> str:
    """Encode frames to an mp4 (yuv420p); returns the encoder used.

    frames: ComfyUI [T, H, W, 3] float in [0, 1] (or uint8), or Wan [3, T, H, W] float in
        [-1, 1]; `layout` ('comfy' / 'wan') overrides the guess from the shape.
    fps: frames per second (Wan2.1 generates at 16).
    crf: x264 constant rate factor, 0 (best; lossless before chroma subsampling) .. 51 (worst); 17-23 look clean. For the
        mpeg4 fallback it maps to a fixed quantiser, about crf / 6 (clamped to 2..31).
    preset: x264 speed preset (`X264_PRESETS`); "medium" is x264's and FFmpeg's default.
    codec: None picks libx264 if present, else mpeg4 (with a warning); naming one that this
        FFmpeg lacks is an error.
    odd_size: 'pad' (repeat the last row/column), 'crop' (drop it) or 'error'.
    """
    with VideoWriter(path, fps, layout=layout, crf=crf, codec=codec, preset=preset, odd_size=odd_size) as writer:
        writer.write(frames)
    return writer.codec


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """Decode the first video stream: (uint8 [T, H, W, 3] RGB, frames per second)."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {os.fspath(path)}")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{os.fspath(path)}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    except av.error.FFmpegError as e:
        raise ValueError(f"{os.fspath(path)}: not a readable video ({e})") from e
    if not frames:
        raise ValueError(f"{os.fspath(path)}: the video stream has no frames")
    return torch.stack(frames), float(rate)
