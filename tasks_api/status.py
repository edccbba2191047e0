"""ComfyUI's queue and history -> LightX2V's task status vocabulary.

LightX2V's `TaskStatus` values: pending, processing, completed, failed, cancelled. A task's prompt
is, at any instant, in exactly one of ComfyUI's pending queue, its running set or its history
(PromptQueue moves it under one lock), so:
  in the queue                      -> pending
  running                           -> processing
  history, status_str "success"     -> completed
  history with execution_interrupted -> cancelled (our DELETE, or an interrupt from the UI)
  history, any other error          -> failed (error = the exception message, error_type its type)
"""

from __future__ import annotations

from dataclasses import dataclass

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
TERMINAL = (COMPLETED, FAILED, CANCELLED)
CANCELLED_BY_USER = "Task cancelled by user"  # LightX2V's wording


@dataclass
class Observed:
    """What ComfyUI says about one prompt right now. Times are ComfyUI's message timestamps (ms)."""

    status: str
    error: str | None = None
    error_type: str = ""
    start_ms: int | None = None
    end_ms: int | None = None


def _message(messages: list, kind: str) -> dict | None:
    for m in messages:
        if isinstance(m, (list, tuple)) and len(m) == 2 and m[0] == kind:
            return m[1] if isinstance(m[1], dict) else {}
    return None


def from_history(entry: dict, cancel_requested: bool = False) -> Observed:
    """A finished prompt's history entry (`/history/{id}`'s value) -> its final status."""
    st = entry.get("status") or {}
    messages = st.get("messages") or []
    stamps = [
        m[1]["timestamp"]
        for m in messages
        if isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[1], dict) and "timestamp" in m[1]
    ]
    start = _message(messages, "execution_start")
    times = dict(start_ms=start.get("timestamp") if start else None, end_ms=max(stamps) if stamps else None)
    if st.get("status_str") == "success":
        return Observed(COMPLETED, **times)
    if _message(messages, "execution_interrupted") is not None:
        why = CANCELLED_BY_USER if cancel_requested else "Interrupted in ComfyUI"
        return Observed(CANCELLED, error=why, **times)
    err = _message(messages, "execution_error") or {}
    text = err.get("exception_message") or "the workflow failed in ComfyUI"
    node = " ".join(str(x) for x in (err.get("node_id"), err.get("node_type")) if x)
    where = f" (node {node})" if node else ""
    return Observed(FAILED, error=text.strip() + where, error_type=err.get("exception_type", "") or "", **times)


def observe(
    prompt_id: str, running: set[str], queued: set[str], history: dict | None, cancel_requested: bool = False
) -> Observed | None:
    """The status of one prompt from a queue snapshot and its history entry; None if ComfyUI has no trace of it.

    Take the snapshot *before* reading the history: a prompt seen in neither is then really gone
    (deleted from the queue in the UI, or its history entry removed).
    """
    if history is not None:
        return from_history(history, cancel_requested)
    if prompt_id in running:
        return Observed(PROCESSING)
    if prompt_id in queued:
        return Observed(PENDING)
    return None
