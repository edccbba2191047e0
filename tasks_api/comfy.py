"""The task service's backend on a running ComfyUI: its folders, prompt queue, history and interrupt.

Queueing follows ComfyUI's own POST /prompt handler step by step (on-prompt handlers, then
`execution.validate_prompt`, then `PromptQueue.put` of `(number, prompt_id, prompt, extra_data,
outputs_to_execute)`), so a task is an ordinary prompt: the UI shows its progress (no client id:
ComfyUI broadcasts its messages) and `/queue`, `/history/{task_id}` and `/interrupt` see it.
Imported only inside ComfyUI.
"""

from __future__ import annotations

import importlib
import inspect

from .request import RequestError


class ComfyBackend:
    def __init__(self, prompt_server):
        self.server = prompt_server
        self.queue = prompt_server.prompt_queue
        self._folder_paths = importlib.import_module("folder_paths")
        self._execution = importlib.import_module("execution")

    def input_dir(self) -> str:
        return self._folder_paths.get_input_directory()

    def output_dir(self) -> str:
        return self._folder_paths.get_output_directory()

    def lora_names(self) -> list[str] | None:
        try:
            return list(self._folder_paths.get_filename_list("loras"))
        except Exception:
            return None

    async def prepare(self, prompt_id: str, graph: dict):
        data = self.server.trigger_on_prompt({"prompt": graph, "prompt_id": prompt_id})
        graph = data.get("prompt", graph)
        validate = self._execution.validate_prompt
        n = len(inspect.signature(validate).parameters)  # its arguments changed across ComfyUI versions
        args = (prompt_id, graph, None) if n >= 3 else (prompt_id, graph) if n == 2 else (graph,)
        valid = validate(*args)
        if inspect.isawaitable(valid):
            valid = await valid
        if not valid[0]:
            err = valid[1] if isinstance(valid[1], dict) else {"message": str(valid[1])}
            text = f"{err.get('message', 'invalid prompt')}: {err.get('details', '')}".rstrip(": ")
            nodes = "; ".join(
                f"{e.get('class_type')} {nid}: "
                + ", ".join(x.get("details") or x.get("message", "") for x in e["errors"])
                for nid, e in (valid[3] or {}).items()
                if isinstance(e, dict) and e.get("errors")
            )
            raise RequestError(
                400, f"ComfyUI rejected the workflow built for this task: {text}" + (f" ({nodes})" if nodes else "")
            )
        return graph, valid[2]

    def put(self, prompt_id: str, prepared) -> None:
        graph, outputs = prepared
        number = self.server.number
        self.server.number += 1
        self.queue.put((number, prompt_id, graph, {}, outputs))

    def snapshot(self) -> tuple[list[str], list[str]]:
        running, queued = self.queue.get_current_queue_volatile()
        return [x[1] for x in running], [x[1] for x in sorted(queued, key=lambda x: x[0])]

    def history(self, prompt_id: str) -> dict | None:
        return self.queue.get_history(prompt_id=prompt_id).get(prompt_id)

    def delete_queued(self, prompt_id: str) -> bool:
        return bool(self.queue.delete_queue_item(lambda item: item[1] == prompt_id))

    def interrupt(self, prompt_id: str) -> bool:
        import comfy.model_management as mm  # type: ignore[import-not-found]

        with self.queue.mutex:  # the check and the interrupt together: another prompt must not be hit
            running, _ = self.queue.get_current_queue_volatile()
            if not any(x[1] == prompt_id for x in running):
                return False
            mm.interrupt_current_processing(True)
            return True
