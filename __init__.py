"""ComfyUI entry point of the Wan Fast node pack (the engine, `wan_core`, is importable on its own).

ComfyUI imports this folder as a package; `wan_core` is found beside it even when the pack was
cloned into custom_nodes without `pip install`.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("wan_core") is None:
    # appended, not prepended: our `nodes` package must not shadow ComfyUI's own `nodes` module
    sys.path.append(_HERE)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (pytest collecting from the repository root)
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"


def _register_tasks_api() -> None:
    """Inside a running ComfyUI only: add the LightX2V-compatible /v1/tasks/... routes (tasks_api/).

    ComfyUI's `server` module is already imported when it loads custom nodes; outside ComfyUI it
    is absent and importing this pack does nothing more than define the nodes.
    """
    prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if prompt_server is None or not hasattr(prompt_server, "routes"):
        return
    try:
        if __package__:
            from .tasks_api import register
        else:
            from tasks_api import register
        register(prompt_server)
    except Exception:  # the nodes must keep working without the task API
        import logging

        logging.getLogger("wan_fast").exception("the LightX2V-compatible task API could not be added")


def _register_memory() -> None:
    """Inside ComfyUI only: our cached models join its model management (nodes/memory.py), and
    GET /wan_fast/memory reports them. Outside ComfyUI nothing is registered."""
    try:
        if __package__:
            from .nodes import memory
        else:
            from nodes import memory
        if memory.install():
            prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
            if prompt_server is not None and hasattr(prompt_server, "routes"):
                memory.add_route(prompt_server)
    except Exception:  # the nodes must keep working without it
        import logging

        logging.getLogger("wan_fast").exception("could not register with ComfyUI's model management")


_register_tasks_api()
_register_memory()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
