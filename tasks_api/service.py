"""The task table behind the routes: submit, status, cancel, result, over a small backend.

The backend (`comfy.ComfyBackend` inside ComfyUI, a fake in the unit tests) is ComfyUI's queue and
history; this module owns what LightX2V's TaskManager owns: task records, the queue limit, the
response dicts (same keys as LightX2V's), and one thing ComfyUI does not do: when a task
completes, its video (written by WanSaveVideo as `<task_id>_00001_.mp4` beside the target) is
moved to the requested `save_result_path`. A watcher thread does that within a fraction of a
second, so a client that never polls (LightX2V's `post.py`) still finds its file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from .request import RequestError, TaskRequest, confine, parse_request
from .status import CANCELLED, CANCELLED_BY_USER, COMPLETED, FAILED, PENDING, PROCESSING, TERMINAL, observe
from .workflow import build_graph, load_template

log = logging.getLogger("wan_fast.tasks_api")

DEFAULT_QUEUE_SIZE = 10  # LightX2V's ServerConfig.max_queue_size
KEEP_TASKS = 1000  # finished tasks remembered (LightX2V keeps 1000 too)
IMAGE_TASKS_REFUSED = (
    "image tasks are not supported by this server: it runs Wan video models (text-to-video, "
    "image-to-video); send video tasks to /v1/tasks/video/ (an image_path makes it image-to-video)"
)


class Backend(Protocol):
    """ComfyUI, as the task service sees it."""

    def input_dir(self) -> str: ...
    def output_dir(self) -> str: ...
    def lora_names(self) -> list[str] | None: ...
    async def prepare(self, prompt_id: str, graph: dict) -> object:
        """Validate the graph as POST /prompt does; RequestError(400) with ComfyUI's message if invalid."""

    def put(self, prompt_id: str, prepared: object) -> None: ...
    def snapshot(self) -> tuple[list[str], list[str]]:
        """(running prompt ids, queued prompt ids in run order)."""

    def history(self, prompt_id: str) -> dict | None: ...
    def delete_queued(self, prompt_id: str) -> bool: ...
    def interrupt(self, prompt_id: str) -> bool:
        """Interrupt the prompt if it is the one running; False if it is not running."""


def queue_size_from_env() -> int:
    for name in ("WAN_TASKS_MAX_QUEUE_SIZE", "LIGHTX2V_MAX_QUEUE_SIZE"):
        raw = os.environ.get(name)
        if raw:
            try:
                if int(raw) > 0:
                    return int(raw)
            except ValueError:
                pass
            log.warning("%s=%r is not a positive integer; using %d", name, raw, DEFAULT_QUEUE_SIZE)
    return DEFAULT_QUEUE_SIZE


@dataclass
class TaskRecord:
    task_id: str  # also the ComfyUI prompt id
    save_node: str
    output: str  # final video path relative to the output folder
    save_result_path: str  # as requested (reported until the task completes)
    seed: int
    created: datetime = field(default_factory=datetime.now)
    status: str = PENDING
    started: datetime | None = None
    ended: datetime | None = None
    error: str | None = None
    error_type: str = ""
    cancel_requested: bool = False

    def as_status(self) -> dict:
        """LightX2V's get_task_status dict (+ the seed, useful when it was drawn at random)."""
        return {
            "task_id": self.task_id,
            "status": self.status,
            "start_time": (self.started or self.created).isoformat(),
            "end_time": self.ended.isoformat() if self.ended else None,
            "error": self.error,
            "error_type": self.error_type,
            "save_result_path": self.output if self.status == COMPLETED else self.save_result_path,
            "seed": self.seed,
        }


def _ms(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000) if ms else None


class TaskService:
    def __init__(self, backend: Backend, max_queue_size: int | None = None, keep: int = KEEP_TASKS):
        self.backend = backend
        self.max_queue_size = max_queue_size or queue_size_from_env()
        self.keep = keep
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.total_tasks = self.completed_tasks = self.failed_tasks = 0

    # -----------------------------------------------------------------------------------------
    # submit

    async def submit(self, body: object, kind: str = "video") -> dict:
        """A request body -> a queued task; LightX2V's TaskResponse dict (+ "warnings" if any)."""
        if kind != "video":
            raise RequestError(400, IMAGE_TASKS_REFUSED)
        b = self.backend
        req = parse_request(body, input_dir=b.input_dir(), output_dir=b.output_dir(), lora_names=b.lora_names())
        with self._lock:
            self._check_room(req.task_id)
        _, template = load_template(req.task)
        folder = os.path.dirname(req.output)
        prefix = f"{folder}/{req.task_id}" if folder else req.task_id
        graph, save_node = build_graph(template, req, prefix)
        written = self._write_image(req)
        try:
            prepared = await b.prepare(req.task_id, graph)
            with self._lock:
                self._check_room(req.task_id)
                b.put(req.task_id, prepared)
                self._tasks[req.task_id] = TaskRecord(
                    req.task_id, save_node, req.output, req.save_result_path, req.seed
                )
                self.total_tasks += 1
                self._forget_old()
        except BaseException:
            if written:
                os.remove(written)
            raise
        self._wake.set()
        for w in req.warnings:
            log.warning("task %s: %s", req.task_id, w)
        out = {"task_id": req.task_id, "task_status": PENDING, "save_result_path": req.save_result_path}
        if req.warnings:
            out["warnings"] = req.warnings
        return out

    def _check_room(self, task_id: str) -> None:
        """LightX2V answers both with 503 (its create_task raises RuntimeError)."""
        running, queued = self.backend.snapshot()
        if task_id in self._tasks or task_id in running or task_id in queued or self.backend.history(task_id):
            raise RequestError(503, f"Task ID {task_id} already exists")
        active = sum(r.status not in TERMINAL for r in self._tasks.values())
        if active >= self.max_queue_size:
            raise RequestError(503, f"Task queue is full (max {self.max_queue_size} tasks)")

    def _write_image(self, req: TaskRequest) -> str | None:
        if req.image is None or req.image.data is None:
            return None
        root = os.path.realpath(self.backend.input_dir())
        path = os.path.join(root, req.image.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(req.image.data)
        return path

    def _forget_old(self) -> None:
        extra = len(self._tasks) - self.keep
        for tid in [t for t, r in self._tasks.items() if r.status in TERMINAL][: max(extra, 0)]:
            del self._tasks[tid]

    # -----------------------------------------------------------------------------------------
    # following ComfyUI

    def refresh(self) -> None:
        """Update every unfinished task from ComfyUI; move the videos of completed ones into place."""
        with self._lock:
            active = [r for r in self._tasks.values() if r.status not in TERMINAL]
            if not active:
                return
            running, queued = (set(x) for x in self.backend.snapshot())  # before the history reads
            for r in active:
                self._update(r, running, queued)

    def _update(self, r: TaskRecord, running: set[str], queued: set[str]) -> None:
        entry = self.backend.history(r.task_id)
        obs = observe(r.task_id, running, queued, entry, r.cancel_requested)
        if obs is None:
            if r.started is None:
                self._finish(r, CANCELLED, "Task removed from ComfyUI's queue")
            else:
                self._finish(
                    r, FAILED, "ComfyUI's history entry of this task was removed before its result was collected"
                )
            return
        if obs.status in (PENDING, PROCESSING):
            if obs.status == PROCESSING and r.started is None:
                r.started = datetime.now()
            r.status = obs.status
            return
        r.started = _ms(obs.start_ms) or r.started
        ended = _ms(obs.end_ms)
        if obs.status == COMPLETED:
            try:
                self._collect(r, entry)
            except (OSError, ValueError, RequestError) as e:
                self._finish(r, FAILED, f"the video could not be put at {r.output}: {e}", type(e).__name__, ended)
                return
        self._finish(r, obs.status, obs.error, obs.error_type, ended)

    def _collect(self, r: TaskRecord, entry: dict) -> None:
        """Move WanSaveVideo's file to the requested path (both inside the output folder)."""
        out = self.backend.output_dir()
        ui = (entry.get("outputs") or {}).get(r.save_node) or {}
        # WanSaveVideo reports its file under "images" (ComfyUI's gallery key); accept any list of files
        files = [
            f
            for v in ui.values()
            if isinstance(v, list)
            for f in v
            if isinstance(f, dict) and str(f.get("filename", "")).endswith(".mp4")
        ]
        if not files:
            raise ValueError("the workflow finished without writing a video")
        f = files[0]
        src = confine(os.path.join(f.get("subfolder") or "", f["filename"]), out, "video", "output")
        dst = confine(r.output, out, "save_result_path", "output")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)

    def _finish(self, r, status: str, error: str | None, error_type: str = "", ended: datetime | None = None):
        r.status, r.error, r.error_type, r.ended = status, error, error_type or "", ended or datetime.now()
        if status == COMPLETED:
            self.completed_tasks += 1
        elif status == FAILED:
            self.failed_tasks += 1

    def start_watcher(self, interval: float = 0.25) -> threading.Thread:
        """A daemon thread that follows unfinished tasks (asleep while there are none)."""

        def loop():
            while True:
                self._wake.wait()
                try:
                    self.refresh()
                except Exception:  # keep following; the next status request reports the state
                    log.exception("following the tasks failed")
                with self._lock:
                    if not any(r.status not in TERMINAL for r in self._tasks.values()):
                        self._wake.clear()
                time.sleep(interval)

        t = threading.Thread(target=loop, name="wan-tasks-api", daemon=True)
        t.start()
        return t

    # -----------------------------------------------------------------------------------------
    # queries

    def status(self, task_id: str) -> dict | None:
        self.refresh()
        with self._lock:
            r = self._tasks.get(task_id)
            return r.as_status() if r else None

    def all_tasks(self) -> dict:
        self.refresh()
        with self._lock:
            return {tid: r.as_status() for tid, r in self._tasks.items()}

    def _counts(self) -> tuple[list[str], int, list[str]]:
        with self._lock:
            processing = [t for t, r in self._tasks.items() if r.status == PROCESSING]
            pending = sum(r.status == PENDING for r in self._tasks.values())
        running, queued = self.backend.snapshot()
        return processing, pending, running

    def queue_status(self) -> dict:
        """LightX2V's /v1/tasks/queue/status; is_processing: ComfyUI runs something (ours or not)."""
        self.refresh()
        processing, pending, running = self._counts()
        active = len(processing) + pending
        return {
            "is_processing": bool(running),
            "current_task": processing[0] if processing else None,
            "pending_count": pending,
            "active_count": active,
            "queue_size": self.max_queue_size,
            "queue_available": self.max_queue_size - active,
        }

    def service_status(self) -> dict:
        """LightX2V's /v1/service/status (its multi-server clients wait for "idle")."""
        self.refresh()
        processing, pending, running = self._counts()
        return {
            "service_status": "busy" if running else "idle",
            "current_task": processing[0] if processing else None,
            "active_tasks": processing,
            "pending_tasks": pending,
            "queue_size": self.max_queue_size,
            "total_tasks": self.total_tasks,
            "completed_tasks": self.completed_tasks,
            "failed_tasks": self.failed_tasks,
        }

    def result_file(self, task_id: str) -> str:
        """The completed task's video (absolute path); RequestError 404/403 as LightX2V's /result."""
        st = self.status(task_id)
        if st is None:
            raise RequestError(404, "Task not found")
        if st["status"] != COMPLETED:
            raise RequestError(404, "Task not completed")
        try:
            path = confine(st["save_result_path"], self.backend.output_dir(), "result", "output")
        except RequestError:
            raise RequestError(403, "Access to this file is not allowed") from None
        if not os.path.isfile(path):
            raise RequestError(404, f"File not found: {st['save_result_path']}")
        return path

    # -----------------------------------------------------------------------------------------
    # cancel

    async def cancel(self, task_id: str, wait: float = 10.0) -> dict:
        """LightX2V's StopTaskResponse: a pending task leaves ComfyUI's queue; a running one is interrupted.

        Waits up to `wait` seconds for an interrupted run to stop, so that the status reads
        "cancelled" when this returns (LightX2V joins its worker for up to 5 s likewise).
        """
        self.refresh()
        with self._lock:
            r = self._tasks.get(task_id)
            if r is None or r.status in TERMINAL:
                return {"stop_status": "do_nothing", "reason": "Task not found or already completed."}
            r.cancel_requested = True
            if self.backend.delete_queued(task_id):
                self._finish(r, CANCELLED, CANCELLED_BY_USER)
                log.info("task %s removed from the queue", task_id)
                return {"stop_status": "success", "reason": "Task stopped successfully."}
            self.backend.interrupt(task_id)
        end = time.monotonic() + wait
        while True:
            self.refresh()
            if r.status in TERMINAL or time.monotonic() > end:
                break
            await asyncio.sleep(0.1)
        if r.status == CANCELLED:
            log.info("task %s interrupted", task_id)
            return {"stop_status": "success", "reason": "Task stopped successfully."}
        if r.status in TERMINAL:
            return {"stop_status": "do_nothing", "reason": f"Task finished ({r.status}) before it could be stopped."}
        return {"stop_status": "success", "reason": "Interrupt requested; the run stops at its next step."}

    async def cancel_all(self) -> dict:
        self.refresh()
        with self._lock:
            ids = [t for t, r in self._tasks.items() if r.status not in TERMINAL]
        # pending ones first, so that none of them starts when the running one is interrupted
        ids.sort(key=lambda t: self._tasks[t].status == PROCESSING)
        for tid in ids:
            await self.cancel(tid)
        return {"stop_status": "success", "reason": "All tasks stopped successfully."}
