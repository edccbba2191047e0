"""LightX2V-compatible task API on ComfyUI's own server: `/v1/tasks/...` routes.

Clients written for LightX2V's server (`python -m lightx2v.server`, its `scripts/server/post*.py`)
send `POST /v1/tasks/video/` with `{prompt, negative_prompt, image_path, seed, save_result_path,
...}` and then poll `/v1/tasks/{id}/status` and fetch `/v1/tasks/{id}/result`. Here each request
becomes a prompt on ComfyUI's queue (its prompt id is the task id), built from a template API
workflow, so ComfyUI's queue, history and UI keep working beside the API.

Layout, one concept per file:
- `request`  : the request body -> a checked `TaskRequest` (types, paths confined to ComfyUI's
               input/output folders, base64 images); plain functions, no ComfyUI, no aiohttp.
- `workflow` : template choice (env vars) and `TaskRequest` -> API-format graph.
- `status`   : ComfyUI queue/history -> LightX2V's status vocabulary.
- `service`  : the task table (submit, status, cancel, result) over a small backend interface.
- `comfy`    : that backend on a running ComfyUI (PromptServer, PromptQueue, validate_prompt).
- `routes`   : the aiohttp handlers and their registration on `PromptServer.instance.routes`.

Importing this package has no side effects; `register(prompt_server)` adds the routes.
"""

from __future__ import annotations


def register(prompt_server) -> bool:
    """Add the `/v1/tasks/...` routes to a ComfyUI PromptServer (before it builds its app).

    Returns False if they are already there. Imported lazily: aiohttp exists only beside ComfyUI.
    """
    from .routes import register as _register

    return _register(prompt_server)


__all__ = ["register"]
