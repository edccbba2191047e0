"""What a user sees while a run works: one progress display, and what loads, with sizes and times.

The CLI shows the `wan_core` logger at INFO. Sampling progress is a tqdm bar when stderr is a
terminal, and plain per-step log lines otherwise (a bar redrawn into a file or a pipe interleaves
with the log lines), never both.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("wan_core.pipeline")


def progress_bar(total: int, enabled: bool):
    """A tqdm bar when `enabled` and stderr is a terminal; otherwise a disabled one (`.disable` is True)."""
    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc="sampling", unit="step", disable=not (enabled and tty), leave=False)


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (0 for an object that is not a torch module)."""
    module = getattr(model, "model", model)  # the T5 wrapper holds its module as .model
    if not hasattr(module, "parameters"):
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed_build(name: str, build: Callable, spec):
    """`build(spec)`, logged as "DiT: <size> GiB in <time> s" (a model the cache already holds takes no time)."""
    t0 = time.perf_counter()
    model = build(spec)
    dt = time.perf_counter() - t0
    size = model_bytes(model)
    log.info("%s: %s in %.1f s", name, f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB", dt)
    return model
