"""Ordering of the block copies against the compute: a side CUDA stream and events, or a stand-in.

The block offload needs four operations: copy a block into a ring slot on the side stream once
the compute is done with the slot's previous block (`copy(dst, src, after=free)` then
`record_ready`), make the compute wait for a block's copy (`wait_ready`), mark a slot free after
the block ran (`record_free`), and make the compute stream wait for every copy in flight before
the ring is released (`drain`).

`CudaCopier` does this with a side stream and events; `HostCopier` stands in on a device without
streams (the CPU, where the tests run the same offload logic with a second CPU placement as the
"GPU"). `HostCopier(defer=True)` holds each copy back until the compute waits for it, the way an
asynchronous copy may still be in flight, so a missing `wait_ready` gives wrong numbers in tests
instead of passing by luck; `defer=False` copies at once, so a copy into the slot of the block
that is about to run shows up as wrong numbers too.
"""

from __future__ import annotations

import torch

__all__ = ["CudaCopier", "HostCopier", "make_copier"]


class CudaCopier:
    def __init__(self, device: torch.device):
        self.device = device
        # Higher priority (lower number) than the default compute stream, so a copy that the
        # compute is about to wait for is not queued behind compute kernels on the copy engine.
        self.stream = torch.cuda.Stream(device, priority=-1)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event) -> None:
        # An event that was never recorded (a slot's first use) makes wait_event a no-op.
        self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def record_ready(self, event: torch.cuda.Event) -> None:
        event.record(self.stream)

    def wait_ready(self, event: torch.cuda.Event) -> None:
        self.compute_stream().wait_event(event)

    def record_free(self, event: torch.cuda.Event) -> None:
        event.record(self.compute_stream())

    def drain(self) -> None:
        """Order everything queued on the copy stream before what the compute does next (freeing the ring)."""
        self.compute_stream().wait_stream(self.stream)


class _HostEvent:
    def __init__(self):
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []


class HostCopier:
    def __init__(self, defer: bool = True):
        self.defer = defer
        self._queue: list[tuple[torch.Tensor, torch.Tensor]] = []

    def new_event(self) -> _HostEvent:
        return _HostEvent()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: _HostEvent) -> None:
        if self.defer:
            self._queue.append((dst, src))
        else:
            dst.copy_(src)

    def record_ready(self, event: _HostEvent) -> None:
        event.pending, self._queue = self._queue, []

    def wait_ready(self, event: _HostEvent) -> None:
        for dst, src in event.pending:
            dst.copy_(src)
        event.pending = []

    def record_free(self, event: _HostEvent) -> None:
        pass  # the CPU compute is synchronous: a slot is free when the hook runs

    def drain(self) -> None:
        self._queue = []


def make_copier(device: torch.device) -> CudaCopier | HostCopier:
    return CudaCopier(device) if device.type == "cuda" else HostCopier()
