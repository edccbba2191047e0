"""aiohttp handlers of the `/v1/tasks/...` routes, added to ComfyUI's route table.

Paths and answers are LightX2V's (lightx2v/server/api/tasks/*.py, service_routes.py); errors are
`{"detail": "..."}` as FastAPI writes them. ComfyUI also serves every route under `/api`.
"""

from __future__ import annotations

import logging
import os

from aiohttp import web

from .request import RequestError, body_too_large, max_body_bytes, parse_body
from .service import TaskService
from .workflow import TemplateError

log = logging.getLogger("wan_fast.tasks_api")


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


async def _body(request: web.Request):
    """The JSON body; 413 over the limit (checked on Content-Length before reading, and on the bytes)."""
    limit = max_body_bytes()
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(request.content_length, limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:  # over aiohttp's client_max_size (ComfyUI's --max-upload-size)
        raise RequestError(413, f"the request body is too large: {e.text}") from None
    return parse_body(raw, limit)


def handlers(service: TaskService) -> list[tuple[str, str, object]]:
    """(method, path, handler) in registration order: fixed paths before `{task_id}` ones."""

    def guarded(fn):
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except RequestError as e:
                return _error(e.status, e.detail)
            except TemplateError as e:
                log.error("task API template: %s", e)
                return _error(500, str(e))
            except Exception as e:
                log.exception("task API failure")
                return _error(500, f"{type(e).__name__}: {e}")

        return handler

    def create(kind: str):
        async def fn(request):
            return web.json_response(await service.submit(await _body(request), kind))

        return guarded(fn)

    @guarded
    async def list_tasks(request):
        return web.json_response(service.all_tasks())

    @guarded
    async def queue_status(request):
        return web.json_response(service.queue_status())

    @guarded
    async def service_status(request):
        return web.json_response(service.service_status())

    @guarded
    async def task_status(request):
        st = service.status(request.match_info["task_id"])
        if st is None:
            raise RequestError(404, "Task not found")
        return web.json_response(st)

    @guarded
    async def task_result(request):
        path = service.result_file(request.match_info["task_id"])
        name = os.path.basename(path)
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @guarded
    async def stop_all(request):
        return web.json_response(await service.cancel_all())

    @guarded
    async def stop_task(request):
        return web.json_response(await service.cancel(request.match_info["task_id"]))

    video, image = create("video"), create("image")
    return [
        ("POST", "/v1/tasks/video/", video),
        ("POST", "/v1/tasks/video", video),
        ("POST", "/v1/tasks/image/", image),
        ("POST", "/v1/tasks/image", image),
        ("POST", "/v1/tasks/", video),  # LightX2V's deprecated alias (its post_i2v.py uses it)
        ("GET", "/v1/tasks/", list_tasks),
        ("GET", "/v1/tasks", list_tasks),
        ("GET", "/v1/tasks/queue/status", queue_status),
        ("GET", "/v1/service/status", service_status),
        ("DELETE", "/v1/tasks/all/running", stop_all),
        ("GET", "/v1/tasks/{task_id}/status", task_status),
        ("GET", "/v1/tasks/{task_id}/result", task_result),
        ("DELETE", "/v1/tasks/{task_id}", stop_task),
    ]


def register(prompt_server) -> bool:
    """Add the routes to `prompt_server.routes` and start following tasks; False if already there."""
    table = prompt_server.routes
    if any(getattr(r, "path", None) == "/v1/tasks/video/" for r in table):
        return False
    from .comfy import ComfyBackend

    service = TaskService(ComfyBackend(prompt_server))
    for method, path, handler in handlers(service):
        table.route(method, path)(handler)
    service.start_watcher()
    log.info("LightX2V-compatible task API: POST /v1/tasks/video/ (queue limit %d)", service.max_queue_size)
    return True
