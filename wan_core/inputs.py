"""The inputs of one run, checked before any model loads or any step runs.

The settings (`GenerationConfig`) are typed and checked in `wan_core.options`; this module checks
what comes with each run: the device, the seed, the prompts, the input image, the output path and
the run's size. Every door (CLI, `WanPipeline`, the nodes) calls these, so a mistake costs a
second, not the minutes of loading and sampling that come before the first use of the value.

Each check raises ValueError (FileNotFoundError for a missing file) with one sentence naming the
input and what is allowed; surprises that still run (an existing output file that will be
replaced) are warnings.

Output files: an existing `save_result_path` is replaced, as LightX2V does (its scripts are re-run
with the same path), with a warning; the new video is written beside it under a temporary name and
renamed over it only when complete (`wan_core.video.VideoWriter`), so a failed or interrupted run
leaves the old file, or nothing, never half a video.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass

__all__ = [
    "SEED_MAX", "check_device", "check_attention", "check_seed", "check_prompt", "check_save_path", "RunEstimate", "estimate_run",
    "check_run_size",
]  # fmt: skip

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64 - 1]
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


def check_device(device) -> None:
    """'auto', 'cpu', 'cuda', 'cuda:N' (or a torch.device) this machine has; ValueError otherwise."""
    import torch

    if str(device) == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise ValueError(f"device {str(device)!r} asked for, but torch {torch.__version__} is {build}: use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")


def check_attention(name, device) -> None:
    """An attention backend asked for by name (strict: not a config preference) that runs on `device`;
    ValueError naming the reason (unknown name, package missing, a GPU kernel on a CPU)."""
    if name is None or str(name) == "auto":
        return
    from .kernels.attention import get_attention

    try:
        get_attention(name, device)
    except (ImportError, RuntimeError) as e:
        raise ValueError(str(e)) from None


def check_seed(seed) -> int | None:
    """A seed for torch's generator: an integer in [0, 2**64 - 1]; None or negative -> None (draw one)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer (or -1 for a random one), got {seed!r}")
    if seed < 0:
        return None
    if seed > SEED_MAX:
        raise ValueError(f"seed must be at most 2**64 - 1 = {SEED_MAX} (or -1 for a random one), got {seed}")
    return seed


def check_prompt(text, key: str = "prompt") -> str:
    """A prompt as str; ValueError for other types and for text that is not valid UTF-8.

    Bytes a terminal could not decode reach Python as lone surrogates (PEP 383); the tokenizer
    would fail on them deep inside a run, so they are named here, with their position.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"{key} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
        raise ValueError(f"{key} is not valid UTF-8 text ({byte} at character {e.start}); re-save it as UTF-8") from None
    return text


_ANNOUNCED: set[tuple[str, int]] = set()  # existing files already warned about (path, mtime)


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_save_path(path, key: str = "save_result_path") -> str | None:
    """The video's path, checked to be writable: ValueError for '', a folder, or a place this
    process cannot create files in; a warning when an existing file will be replaced. None: no file."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{key} must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{key} is empty: give a file name such as out.mp4 (in Python, None writes no file)")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"{key} {path!r} is a folder: give a file name such as {os.path.join(path, 'out.mp4')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ValueError(f"{key} {path!r}: {existing!r} is a file, not a folder")
    try:  # a real probe: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".wan_core_probe_", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{key} {path!r}: cannot write in {existing!r} ({e.strerror or e})") from None
    if os.path.isfile(path) and (os.path.abspath(path), os.stat(path).st_mtime_ns) not in _ANNOUNCED:
        _ANNOUNCED.add((os.path.abspath(path), os.stat(path).st_mtime_ns))  # the CLI checks, then generate() again
        warnings.warn(f"{key} {path!r} exists: it is replaced once the new video is complete", stacklevel=3)
    if not path.lower().endswith(VIDEO_SUFFIXES):
        warnings.warn(f"{key} {path!r} has no .mp4 suffix: the file is an MP4 video all the same", stacklevel=3)
    return path


# ----------------------------------------------------------------------------- run size

# The smallest real Wan DiT (1.3B): its per-token activations are a lower bound for every real model.
_DIM, _FFN_DIM = 1536, 8960


@dataclass(frozen=True)
class RunEstimate:
    """A lower bound of what one run holds at once: DiT tokens and bytes."""

    tokens: int  # DiT sequence length: F_lat * (H / 16) * (W / 16)
    activation_bytes: int  # one DiT block's live activations (where the model runs)
    frames_bytes: int  # the decoded video, float32 [T, H, W, 3] (host memory, whatever the device)


def estimate_run(frames: int, height: int, width: int, dtype_bytes: int = 2) -> RunEstimate:
    """The run's size from (frames, height, width), before anything is built.

    The DiT keeps the hidden states, q, k, v and the attention output (5 x dim) and the FFN's inner
    states (ffn_dim) per token; the decoded frames come back to the host as float32.
    """
    f_lat = (frames - 1) // 4 + 1  # the VAE's 4x temporal stride, first frame alone
    tokens = f_lat * (height // 16) * (width // 16)  # 8x VAE stride, 2x2 patches
    return RunEstimate(tokens, tokens * (5 * _DIM + _FFN_DIM) * dtype_bytes, frames * height * width * 3 * 4)


def host_memory() -> int | None:
    """Total RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device) -> int | None:
    """Total memory of a CUDA device in bytes; None for the CPU (the host's memory counts)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device()).total_memory


def check_run_size(frames: int, height: int, width: int, device="cpu", allow_large: bool = False) -> RunEstimate:
    """ValueError when the run cannot fit this machine, with the numbers and the override.

    The estimate is a lower bound, so a refused run would not have fitted; `allow_large`
    (config key `allow_large_runs`, CLI `--allow-large`) runs it anyway.
    """
    import torch

    on_cpu = torch.device(device).type == "cpu"
    est = estimate_run(frames, height, width, 4 if on_cpu else 2)
    if allow_large:
        return est
    gib = 2**30
    host, card = host_memory(), device_memory(device)
    need_host = est.frames_bytes + (est.activation_bytes if on_cpu else 0)
    problems = []
    if host is not None and need_host > host:
        problems.append(f"{need_host / gib:.1f} GiB of host memory (it has {host / gib:.1f} GiB)")
    if card is not None and est.activation_bytes > card:
        problems.append(f"{est.activation_bytes / gib:.1f} GiB on {device} (it has {card / gib:.1f} GiB)")
    if problems:
        raise ValueError(
            f"a {width}x{height}, {frames}-frame video ({est.tokens:,} DiT tokens) needs at least "
            f"{' and '.join(problems)}; lower the size or frame count, or pass --allow-large "
            "(config key allow_large_runs: true) to run it anyway"
        )
    return est
