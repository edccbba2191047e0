"""A persistent group of worker processes, one per GPU, for the multi-GPU sampler node.

ComfyUI runs in one process; the group lives beside it and is reused from run to run:

- `WorkerGroup(n, parallel, device)` spawns n processes (`torch.multiprocessing`, spawn start
  method, NCCL on GPUs, gloo on the CPU), each joining one process group and building the
  parallel mesh once;
- `run(spec, request, progress, cancel)` sends every worker the model *description* (a
  `wan_core.spec.ModelSpec`, never tensors: each worker builds the DiT itself through the model
  cache, memory-mapping the same files, so host RAM is not multiplied and a second run with the
  same spec reuses the built model) and the small sampling inputs (a `SampleRequest`; a Wan2.2
  A14B request names its low-noise expert by spec too, and each worker leases both experts,
  `request_models`); each
  worker runs the same denoising stage as one process (`sampling.denoise_request`: feature
  cache, offloaded DiT on the GPU for the loop only, out-of-memory advice) with CFG parallel
  as its predict; rank 0 streams step progress (and x0 previews when asked) back through a
  queue, and the final latent and the cache report come back to the caller;
- cancel is honoured between steps: all ranks agree on it through one all-reduce per step, so
  they stop at the same step and the group stays usable;
- when a worker dies or raises, the whole group is torn down (every process terminated, then
  killed, and joined: no orphans, GPUs freed), the error is raised to the caller with the
  worker's traceback, and the next `run` starts a fresh group. A worker also exits by itself
  when its parent process disappears. A CUDA out-of-memory error reaches the caller as
  `WorkerOutOfMemory` (a `torch.OutOfMemoryError`) carrying the worker's offload advice; a
  feature-cache config the model cannot run is refused by every rank before the first step
  (ValueError), and the group stays up.

Messages are pickled with `torch.save` to bytes before they enter a queue, so no shared-memory
tensor outlives a dead process.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ...sampling.denoise import SampleRequest, denoise_request, make_feature_cache
from ...sampling.experts import Experts
from ...sampling.loop import StepInfo
from .apply import enable_sequence_parallel
from .cfg import cfg_parallel_predict
from .group import ParallelConfig, build_groups, init_process_group

__all__ = [
    "SampleRequest",
    "StepProgress",
    "WorkerGroup",
    "WorkerGroupError",
    "WorkerOutOfMemory",
    "RunCancelled",
    "get_worker_group",
    "shutdown_worker_groups",
    "build_dit_for_device",
    "request_models",
]


class WorkerGroupError(RuntimeError):
    """A worker died or failed; the group has been torn down (the next run starts a new one)."""


class WorkerOutOfMemory(WorkerGroupError, torch.OutOfMemoryError):
    """CUDA ran out of memory on a worker: the message is the worker's offload advice
    (`wan_core.layers.offload.explain_oom`); the group has been torn down, freeing the GPUs."""


class RunCancelled(Exception):
    """The run was cancelled between two steps; the group is still alive."""


@dataclass
class StepProgress:
    step: int  # 0-based index of the step just finished
    total: int
    t: float
    x0: torch.Tensor | None = None  # the clean-latent estimate, when previews were asked for


# ------------------------------------------------------------------------- serialisation
def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------- worker side
@contextlib.contextmanager
def build_dit_for_device(spec: Any, device: torch.device):
    """The DiT a spec describes, on this worker's device, for a `with` block.

    A `wan_core.spec.ModelSpec` is leased from the model cache for `device`; other objects may
    offer `build_dit(device)` or be callables `spec(device)` (tests, benchmarks).
    """
    from ...model_cache import lease
    from ...spec import ModelSpec

    if isinstance(spec, ModelSpec):
        with lease(spec.replace(device=str(device))) as model:
            yield model
        return
    if hasattr(spec, "build_dit"):
        yield spec.build_dit(device)
        return
    if callable(spec):
        yield spec(device)
        return
    raise TypeError(f"cannot build a DiT from {type(spec).__name__}: pass a wan_core.spec.ModelSpec")


@contextlib.contextmanager
def request_models(spec: Any, req: SampleRequest, device: torch.device):
    """What a request runs on `device`, for a `with` block: the DiT of `spec`, or for a request with
    a low-noise expert both Wan2.2 experts (`spec` the high-noise one), leased together, as
    `req.experts(high, low)`."""
    check_expert_specs(spec, req)
    if req.low is None:
        with build_dit_for_device(spec, device) as model:
            yield model
        return
    with build_dit_for_device(spec, device) as high, build_dit_for_device(req.low.spec, device) as low:
        yield req.experts(high, low)


def check_expert_specs(spec: Any, req: SampleRequest) -> None:
    """A two-expert request's specs name their experts in order (a ValueError, not a swapped run)."""
    from ...spec import ModelSpec

    if req.low is None:
        return
    for s, want in ((spec, "high"), (req.low.spec, "low")):
        if isinstance(s, ModelSpec) and s.expert != want:
            raise ValueError(
                f"the {want}-noise expert's spec says expert={s.expert!r}: give the high-noise expert's spec to run() "
                "and the low-noise one's in SampleRequest.low"
            )


def _models(model) -> tuple:
    """The DiTs of what a request runs (one, or the two experts)."""
    return model.models if isinstance(model, Experts) else (model,)


class _Cancelled(Exception):
    pass


class _Refused(Exception):
    """A request every rank rejects alike before its first collective (the group stays usable)."""


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (re-parented), even in the middle of a run."""

    def loop():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=loop, name="wan-parent-watch", daemon=True).start()


def _worker_main(rank, world, init_method, parallel, device, cmd_q, res_q, cancel_ev, threads, parent_pid):
    _watch_parent(parent_pid)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    job = None
    try:
        if threads:
            torch.set_num_threads(threads)
        dev = init_process_group(device, rank=rank, world_size=world, init_method=init_method)
        groups = build_groups(parallel)
        res_q.put(_dumps(("ready", None, rank)))
        while True:
            msg = _loads(cmd_q.get())
            if msg[0] == "stop":
                break
            _, job, spec, req = msg
            try:
                latent, report = _run_request(spec, req, job, dev, groups, res_q, cancel_ev)
                res_q.put(_dumps(("done", job, rank, latent, report)))
            except _Cancelled:
                res_q.put(_dumps(("cancelled", job, rank)))
            except _Refused as e:
                res_q.put(_dumps(("refused", job, rank, str(e))))
            job = None
    except BaseException as e:
        oom = str(e) if isinstance(e, torch.OutOfMemoryError) else None  # explain_oom's advice, from denoise
        res_q.put(_dumps(("error", job, rank, traceback.format_exc(), oom)))
        res_q.close()
        res_q.join_thread()  # the message must leave before the process does
        os._exit(1)  # no clean-up: the peers may be stuck in a collective; the parent kills them
    dist.destroy_process_group()


def _run_request(spec, req: SampleRequest, job, dev, groups, res_q, cancel_ev):
    """This rank's share of one run: `denoise_request` with CFG parallel as its predict; returns
    (the final latent on rank 0, else None; this rank's cache report)."""
    with request_models(spec, req, dev) as model:
        try:  # the same request and model on every rank: all refuse alike, before any collective
            make_feature_cache(model, req.cache, req.noise.shape, len(req.scheduler))
        except ValueError as e:
            raise _Refused(str(e)) from e
        for m in _models(model):
            enable_sequence_parallel(m, groups)  # (re)wrapped for these groups on a cached model
        latent, report = _denoise_on_rank(model, req, job, dev, groups, res_q, cancel_ev)
    return (latent.cpu() if groups.is_main else None), report


def _denoise_on_rank(model, req: SampleRequest, job, dev, groups, res_q, cancel_ev):
    flag = torch.zeros(1, device=dev)

    def callback(info: StepInfo) -> None:
        if groups.is_main:
            x0 = info.x0.float().cpu() if req.preview else None
            res_q.put(_dumps(("progress", job, groups.rank, StepProgress(info.step, info.total, info.t, x0))))
        flag.fill_(1.0 if cancel_ev.is_set() else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() > 0:
            raise _Cancelled

    # the feature cache wraps the sequence-parallel block stack (every rank sees the whole
    # sequence and decides alike); under CFG parallel each rank's cache follows its own branch
    return denoise_request(model, req, callback, wrap_predict=lambda base: cfg_parallel_predict(groups, base), device=dev)


# ------------------------------------------------------------------------- parent side
def _how(code: int | None) -> str:
    return f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoMainImport:
    """Spawned children normally re-run the parent's __main__ script (for ComfyUI: main.py, which
    parses arguments, runs prestartup scripts and touches the GPU). Our workers need nothing from
    it, so it is hidden while the processes start."""

    def __enter__(self):
        self.main = sys.modules.get("__main__")
        self.saved = {k: self.main.__dict__[k] for k in ("__file__", "__spec__") if self.main and k in self.main.__dict__}
        for k in self.saved:
            if k == "__spec__":
                self.main.__spec__ = None
            else:
                del self.main.__dict__[k]

    def __exit__(self, *exc):
        if self.main is not None:
            self.main.__dict__.update(self.saved)


class WorkerGroup:
    """n worker processes that sample together; see the module docstring."""

    def __init__(
        self,
        world_size: int,
        parallel: ParallelConfig | dict | None = None,
        device: str = "cuda",
        devices: list[str] | None = None,
        threads: int | None = None,
        start_timeout_s: float = 600.0,
    ):
        self.parallel = ParallelConfig.from_dict(parallel, world_size=world_size)
        self.parallel.validate(world_size=world_size)
        self.world_size = world_size
        self.device = device
        if devices is None:
            devices = [f"cuda:{i}" for i in range(world_size)] if torch.device(device).type == "cuda" else [device] * world_size
        if len(devices) != world_size:
            raise ValueError(f"{len(devices)} devices given for {world_size} workers")
        self.devices = devices
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self._procs: list = []
        self._cmd_qs: list = []
        self._res_q = None
        self._cancel_ev = None
        self._job = 0
        self._lock = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Start the processes and wait until every one has joined the process group."""
        with self._lock:
            if self.alive:
                return
            self._teardown()
            ctx = torch.multiprocessing.get_context("spawn")
            self._res_q = ctx.Queue()
            self._cancel_ev = ctx.Event()
            self._cmd_qs = [ctx.Queue() for _ in range(self.world_size)]
            init = f"tcp://127.0.0.1:{_free_port()}"
            with _NoMainImport():
                for rank in range(self.world_size):
                    args = (rank, self.world_size, init, self.parallel, self.devices[rank], self._cmd_qs[rank],
                            self._res_q, self._cancel_ev, self.threads, os.getpid())  # fmt: skip
                    p = ctx.Process(target=_worker_main, args=args, name=f"wan-worker-{rank}", daemon=True)
                    p.start()
                    self._procs.append(p)
            ready: set[int] = set()
            deadline = time.monotonic() + self.start_timeout_s
            while len(ready) < self.world_size:
                msg = self._next(None, deadline)
                if msg[0] == "ready":
                    ready.add(msg[2])

    def close(self) -> None:
        """Stop the workers (politely, then by force) and free everything."""
        with self._lock:
            for q in self._cmd_qs:
                try:
                    q.put(_dumps(("stop",)))
                except Exception:
                    pass
            deadline = time.monotonic() + 10.0
            for p in self._procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            self._teardown()

    def _teardown(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for q in [*self._cmd_qs, self._res_q]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        for p in self._procs:
            try:
                p.close()
            except ValueError:
                pass
        self._procs, self._cmd_qs, self._res_q, self._cancel_ev = [], [], None, None

    def __del__(self):
        try:
            self._teardown()
        except Exception:
            pass

    # -- one run -----------------------------------------------------------------------------
    def _fail(self, text: str):
        self._teardown()
        raise WorkerGroupError(text)

    def _poll_cancel(self, cancel: Callable[[], bool] | None) -> None:
        if cancel is not None and not self._cancel_ev.is_set() and cancel():
            self._cancel_ev.set()

    def _killed(self, grace_s: float) -> list[tuple[int, int]]:
        """(rank, exit code) of the workers killed by a signal; waits up to grace_s for one, since
        a peer's collective can fail (socket closed) a moment before the killed process is reapable."""
        deadline = time.monotonic() + grace_s
        while True:
            killed = [(i, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive() and (p.exitcode or 0) < 0]
            if killed or time.monotonic() >= deadline:
                return killed
            time.sleep(0.02)

    def _next(self, cancel: Callable[[], bool] | None, deadline: float | None):
        """The next message, watching for dead workers, cancel requests and the deadline."""
        while True:
            try:
                msg = _loads(self._res_q.get(timeout=0.05))
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    rank, code = dead[0]
                    self._fail(f"multi-GPU worker {rank} {_how(code)}; the worker group was shut down and will restart on the next run")
                self._poll_cancel(cancel)
                if deadline is not None and time.monotonic() > deadline:
                    self._fail("the multi-GPU workers did not answer in time; the worker group was shut down")
                continue
            self._poll_cancel(cancel)
            if msg[0] == "error":
                # A worker killed from outside sends nothing; its peers then fail in a collective.
                # Name the killed one as the cause (a worker that raises reports before it exits,
                # so its own message always comes first).
                killed = self._killed(grace_s=0.5)
                if msg[4] is not None and not killed:
                    self._teardown()  # the peers may wait in a collective; this frees the GPUs too
                    err = WorkerOutOfMemory(
                        f"{msg[4]}\n(multi-GPU worker {msg[2]}; the worker group was shut down and will restart on the next run)"
                    )
                    raise err from WorkerGroupError(msg[3])
                if killed:
                    rank, code = killed[0]
                    last = msg[3].strip().splitlines()[-1] if msg[3].strip() else ""
                    self._fail(
                        f"multi-GPU worker {rank} {_how(code)}; the worker group was shut down and will restart on the "
                        f"next run (worker {msg[2]} then failed: {last})"
                    )
                self._fail(f"multi-GPU worker {msg[2]} failed; the worker group was shut down.\n{msg[3]}")
            return msg

    def run(
        self,
        spec: Any,
        request: SampleRequest,
        progress: Callable[[StepProgress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
    ):
        """Sample on the workers; returns (final latent (CPU float32), the cache report or None),
        as `sampling.denoise` does for one process.

        progress(StepProgress) is called in this thread after every step; cancel() is polled
        while waiting and, once true, stops the run after the current step (RunCancelled).
        Raises WorkerGroupError when a worker dies or fails (the group is then gone),
        WorkerOutOfMemory (also a torch.OutOfMemoryError) when one ran out of GPU memory, and
        ValueError for a feature-cache config the model cannot run (the group stays).
        """
        check_expert_specs(spec, request)  # before anything is sent
        with self._lock:
            self.start()
            self._job += 1
            job = self._job
            self._cancel_ev.clear()
            self._poll_cancel(cancel)  # already cancelled: stop after the first step
            blob = _dumps(("run", job, spec, _cpu_request(request)))
            for q in self._cmd_qs:
                q.put(blob)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            finished: set[int] = set()
            result = None
            reports: dict[int, Any] = {}
            cancelled = False
            refused = None
            while len(finished) < self.world_size:
                msg = self._next(cancel, deadline)
                if msg[1] != job:
                    continue  # a late message of an earlier run
                kind = msg[0]
                if kind == "progress" and progress is not None:
                    progress(msg[3])
                elif kind == "done":
                    finished.add(msg[2])
                    if msg[3] is not None:
                        result = msg[3]
                    reports[msg[2]] = msg[4]
                elif kind == "cancelled":
                    finished.add(msg[2])
                    cancelled = True
                elif kind == "refused":
                    finished.add(msg[2])
                    refused = refused or msg[3]
            if refused is not None:
                raise ValueError(refused)
            if cancelled:
                raise RunCancelled("the multi-GPU run was cancelled")
            return result, _merge_reports([reports[r] for r in sorted(reports)])


def _cpu_request(req: SampleRequest) -> SampleRequest:
    cache = dict(req.cache) if req.cache else None
    return dataclasses.replace(req.to("cpu"), guidance=float(req.guidance), cache=cache)


def _merge_reports(reports: list):
    """The ranks' cache reports as one run's: each branch from the first rank that evaluated it
    (under CFG parallel the cond ranks hold "cond", the others "uncond"; sequence-parallel
    ranks decide alike, so any one of them speaks for its group)."""
    from ..cache import COND, UNCOND, CacheReport

    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    computed: dict[str, list[int]] = {}
    skipped: dict[str, list[int]] = {}
    for r in reports:
        for branch, steps in r.computed.items():
            if branch not in computed:
                computed[branch], skipped[branch] = list(steps), list(r.skipped.get(branch, []))
    order = sorted(computed, key=lambda b: (b != COND, b != UNCOND))  # the one-process order: cond, uncond, others
    return CacheReport(reports[0].policy, reports[0].num_steps, {b: computed[b] for b in order}, {b: skipped[b] for b in order})


# ------------------------------------------------------------------------- shared groups
_GROUPS: dict[tuple, WorkerGroup] = {}
_GROUPS_LOCK = threading.Lock()


def get_worker_group(world_size: int, parallel: ParallelConfig | dict | None = None, device: str = "cuda", **kw) -> WorkerGroup:
    """The process-wide group for these settings; a group with other settings is closed first
    (only one holds the GPUs at a time)."""
    pc = ParallelConfig.from_dict(parallel, world_size=world_size)
    key = (world_size, pc, device, tuple(sorted(kw.items())))
    with _GROUPS_LOCK:
        for k in list(_GROUPS):
            if k != key:
                _GROUPS.pop(k).close()
        if key not in _GROUPS:
            _GROUPS[key] = WorkerGroup(world_size, pc, device, **kw)
        return _GROUPS[key]


def shutdown_worker_groups() -> None:
    """Close every shared group (called at interpreter exit)."""
    with _GROUPS_LOCK:
        while _GROUPS:
            _GROUPS.popitem()[1].close()


atexit.register(shutdown_worker_groups)
