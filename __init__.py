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

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
