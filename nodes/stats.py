"""Per-stage wall time and peak GPU memory, reported to the front end.

Each Wan node runs its stage inside `stage(name)` and returns the record in its ComfyUI "ui"
dict under `wan_timing`; the front-end extension (js/wan_fast.js) collects them per run and
shows them on the sampler node. Outside ComfyUI the same records are logged.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

log = logging.getLogger("wan_fast")


@contextmanager
def stage(name: str, device: str | torch.device | None = None):
    """Time a stage; yields a dict that is filled with {stage, seconds, peak_vram_gib} on exit."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    record: dict = {"stage": name}
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        if cuda:
            torch.cuda.synchronize()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        log.info("%s: %.2f s%s", name, record["seconds"], f", peak VRAM {record['peak_vram_gib']} GiB" if cuda else "")


def ui(*records: dict, **extra) -> dict:
    """The ComfyUI "ui" payload carrying stage records (lists, as ComfyUI merges them)."""
    out = {"wan_timing": list(records)}
    out.update({k: [v] for k, v in extra.items()})
    return out
