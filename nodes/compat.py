"""The few ComfyUI services the nodes use, with plain fallbacks when ComfyUI is absent.

Inside ComfyUI: model folders come from `folder_paths`, progress goes through
`comfy.utils.ProgressBar` (whose `update_absolute` is also where ComfyUI raises on an interrupt),
cancel is checked with `comfy.model_management.throw_exception_if_processing_interrupted`,
previews follow ComfyUI's `--preview-method`, and messages to the front end go through
`PromptServer.instance.send_sync`.

Outside it (tests, scripts): model folders are `<root>/<folder>` for each root in
`WAN_MODELS_DIR` (os.pathsep-separated; `set_models_root` sets it in-process), outputs go to
`WAN_OUTPUT_DIR` (default `./output`), progress is logged, `request_cancel()` stops a run at the
next step, and `set_progress_hook(fn)` receives every update (value, total, preview image).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("wan_fast")

try:  # ComfyUI's modules exist only inside a ComfyUI process
    import folder_paths as _folder_paths  # type: ignore[import-not-found]
except ImportError:
    _folder_paths = None

try:
    import comfy.model_management as _mm  # type: ignore[import-not-found]
    import comfy.utils as _comfy_utils  # type: ignore[import-not-found]
except ImportError:
    _mm = _comfy_utils = None

IN_COMFYUI = _folder_paths is not None and _comfy_utils is not None

# ComfyUI's model folder names, the only ones the nodes read.
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "clip_vision", "loras")
_MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")


class Interrupted(Exception):
    """Raised between two sampling steps when a run is cancelled outside ComfyUI."""


# ---------------------------------------------------------------------------------------------
# model folders
# ---------------------------------------------------------------------------------------------

_models_roots: list[str] | None = None


def set_models_root(*roots: str | os.PathLike) -> None:
    """Outside ComfyUI: the folders holding diffusion_models/, text_encoders/, vae/, clip_vision/, loras/."""
    global _models_roots
    _models_roots = [os.fspath(r) for r in roots] or None


def folder_paths_for(kind: str) -> list[str]:
    """Directories searched for model files of one kind ("diffusion_models", "loras", ...)."""
    if kind not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder {kind!r}; expected one of {MODEL_FOLDERS}")
    if _folder_paths is not None:
        try:
            return _folder_paths.get_folder_paths(kind)
        except KeyError:
            return []
    roots = _models_roots
    if roots is None:
        env = os.environ.get("WAN_MODELS_DIR")
        roots = [r for r in env.split(os.pathsep) if r] if env else []
    return [os.path.join(r, kind) for r in roots]


def list_model_files(kind: str) -> list[str]:
    """File names (relative to their folder, '/'-separated) of one kind, sorted."""
    if _folder_paths is not None:
        try:
            return sorted(_folder_paths.get_filename_list(kind))
        except KeyError:
            return []
    out = set()
    for folder in folder_paths_for(kind):
        for dirpath, _, files in os.walk(folder, followlinks=True):
            for f in files:
                if f.lower().endswith(_MODEL_EXTENSIONS):
                    out.add(os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/"))
    return sorted(out)


def list_model_dirs(kind: str, marker: Callable[[str], bool]) -> list[str]:
    """Sub-folders (one level deep) of a model folder for which `marker(path)` is true, as 'name/'."""
    out = set()
    for folder in folder_paths_for(kind):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and marker(path):
                out.add(name + "/")
    return sorted(out)


def resolve_model_path(kind: str, name: str) -> str:
    """A name picked from a model folder (or an absolute path) -> its full path; clear error if missing."""
    if not name:
        raise FileNotFoundError(f"no {kind} file chosen")
    if os.path.isabs(name):
        if os.path.exists(name):
            return name
        raise FileNotFoundError(f"{kind}: {name} does not exist")
    rel = os.path.normpath(name.rstrip("/"))
    if rel.startswith(".."):
        raise FileNotFoundError(f"{kind}: {name!r} points outside the model folder")
    folders = folder_paths_for(kind)
    for folder in folders:
        path = os.path.join(folder, rel)
        if os.path.exists(path):
            return path
    where = ", ".join(folders) or "(no model folder configured: set WAN_MODELS_DIR or run inside ComfyUI)"
    raise FileNotFoundError(f"model file {name!r} not found in the {kind} folder ({where})")


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def output_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_output_directory()
    return os.path.abspath(os.environ.get("WAN_OUTPUT_DIR", "output"))


def next_output_path(prefix: str, ext: str) -> tuple[str, str, str]:
    """(full path, file name, subfolder) for a new output file named `<prefix>_NNNNN_.<ext>`."""
    out_dir = output_directory()
    if _folder_paths is not None:
        folder, name, counter, subfolder, _ = _folder_paths.get_save_image_path(prefix, out_dir)
    else:
        subfolder, name = os.path.split(os.path.normpath(prefix))
        folder = os.path.join(out_dir, subfolder)
        if os.path.commonpath([out_dir, os.path.abspath(folder)]) != out_dir:
            raise ValueError(f"filename_prefix {prefix!r} points outside the output folder")
        os.makedirs(folder, exist_ok=True)
        taken = [f for f in os.listdir(folder) if f.startswith(name + "_")]
        nums = [int(f[len(name) + 1 :].split("_")[0]) for f in taken if f[len(name) + 1 :].split("_")[0].isdigit()]
        counter = max(nums, default=0) + 1
    os.makedirs(folder, exist_ok=True)
    file = f"{name}_{counter:05}_.{ext}"
    return os.path.join(folder, file), file, subfolder


# ---------------------------------------------------------------------------------------------
# progress, previews, cancel
# ---------------------------------------------------------------------------------------------

_cancel = threading.Event()
_progress_hook: Callable[[int, int, object], None] | None = None
_previews_outside: bool = False


def request_cancel() -> None:
    """Outside ComfyUI: stop the running sampler at its next step (ComfyUI has /interrupt)."""
    _cancel.set()


def set_progress_hook(fn: Callable[[int, int, object], None] | None, previews: bool = False) -> None:
    """Outside ComfyUI: call `fn(value, total, preview)` on every step; `previews` turns previews on."""
    global _progress_hook, _previews_outside
    _progress_hook, _previews_outside = fn, previews


def previews_enabled() -> bool:
    """ComfyUI: whatever `--preview-method` says (off by default there); outside: `set_progress_hook(previews=True)`."""
    if IN_COMFYUI:
        try:
            from comfy.cli_args import LatentPreviewMethod, args  # type: ignore[import-not-found]

            return args.preview_method != LatentPreviewMethod.NoPreviews
        except ImportError:
            return False
    return _previews_outside


def preview_payload(image):
    """A uint8 [h, w, 3] tensor -> what the progress bar carries: ComfyUI's ("JPEG", PIL image, max size)."""
    from PIL import Image

    pil = Image.fromarray(image.numpy())
    size = 512
    if IN_COMFYUI:
        try:
            from comfy.cli_args import args  # type: ignore[import-not-found]

            size = args.preview_size
        except (ImportError, AttributeError):
            pass
    return ("JPEG", pil, size)


def cancel_requested() -> bool:
    """Whether the user asked to stop, without consuming the request (for polling from a wait loop)."""
    if _mm is not None and _mm.processing_interrupted():
        return True
    return _cancel.is_set()


def check_interrupted() -> None:
    """Raise if the user cancelled (ComfyUI's interrupt or `request_cancel`)."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()
    if _cancel.is_set():
        _cancel.clear()
        raise Interrupted("run cancelled")


class Progress:
    """A step counter shown as ComfyUI's progress bar (or logged); every update is a cancel point."""

    def __init__(self, total: int, node_id: str | None = None):
        self.total = total
        self._bar = _comfy_utils.ProgressBar(total, node_id=node_id) if _comfy_utils is not None else None
        _cancel.clear()  # a cancel requested before this run started is not for it

    def update(self, value: int, preview=None) -> None:
        check_interrupted()
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, preview)  # ComfyUI raises here on interrupt
        else:
            log.info("step %d/%d", value, self.total)
        if _progress_hook is not None:
            _progress_hook(value, self.total, preview)

