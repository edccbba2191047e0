"""Our cached models under ComfyUI's model management (`comfy.model_management`).

The engine caches its DiT, T5, CLIP and VAE itself (`wan_core.model_cache`). So that ComfyUI's
*Unload Models* (`POST /free`), `unload_all_models` and the memory other nodes ask for through
`load_models_gpu` / `free_memory` can take them back, each cached part is entered in ComfyUI's
`current_loaded_models` as a `WanPartPatcher`: the few methods of `ModelPatcher` that ComfyUI's
`LoadedModel` calls, where "unload" means "drop it from our cache" (the next run rebuilds it from
its files). Before a part is built on a GPU, ComfyUI is asked to make room for its files' size.

Installed once at pack import, inside ComfyUI only (`install`); outside ComfyUI nothing changes.
A part living on the host (CPU-offloaded on a GPU machine) is entered on the CPU device, which
ComfyUI's VRAM requests and *Unload Models* leave alone, as they leave its own offloaded models.
"""

from __future__ import annotations

import logging

import torch

from wan_core.api import evict, memory_report, part_bytes, register_memory_hooks

LOG = logging.getLogger("wan_fast")
ROUTE = "/wan_fast/memory"
_PATCHERS: dict[str, WanPartPatcher] = {}  # part -> its entry (kept alive while the part is cached)
_MM = None  # comfy.model_management once installed


def _normal_device(device) -> torch.device:
    """ComfyUI compares devices with ==: 'cuda' must read 'cuda:<current>' as its get_torch_device() does."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class WanPartPatcher:
    """One cached part as `comfy.model_management.LoadedModel` sees a `ModelPatcher`.

    Sizes are the bytes on its device, read live from the module (LoRA branches and offload change
    them), so ComfyUI sees it fully loaded and never asks VRAM for its host copies. Nothing is ever
    moved by ComfyUI: loading is a no-op (the engine placed the weights), a partial unload frees
    nothing, and `detach` evicts the part from the engine's cache (after the run, for a leased DiT).
    """

    parent = None

    def __init__(self, part: str, module: torch.nn.Module, device: torch.device):
        self.part = part
        self.model = module  # LoadedModel keeps a weak reference to it (its `real_model`)
        self.load_device = _normal_device(device)
        self.offload_device = torch.device("cpu")
        self.detaching = False

    def model_size(self) -> int:
        return self.loaded_size()  # only what sits on its device: a host copy (offload) is no VRAM to free

    def loaded_size(self) -> int:
        return part_bytes(self.model).get(str(self.load_device), 0)

    def current_loaded_device(self) -> torch.device:
        return self.load_device

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def model_patches_to(self, device_or_dtype) -> None:
        pass

    def model_patches_models(self) -> list:
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def partially_load(self, device, extra_memory=0, force_patch_weights=False) -> int:
        return 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False) -> int:
        return 0

    def is_clone(self, other) -> bool:
        return other is self  # load_models_gpu re-enters a model already listed by "unloading its clones"

    def detach(self, unpatch_all: bool = True) -> torch.nn.Module:
        if unpatch_all and _PATCHERS.get(self.part) is self:  # unpatch_all=False: the re-entry above
            for loaded in _MM.current_loaded_models:  # ComfyUI drops its entry after this returns:
                if loaded.model is self and loaded.model_finalizer is not None:  # the weights dying first
                    loaded.model_finalizer.detach()  # must not shrink the list it is walking
            self.detaching = True
            try:
                if not evict(self.part):
                    LOG.info("wan_fast: the %s is in use by a run; it is released when the run ends", self.part)
            finally:
                self.detaching = False
        return self.model


# ----------------------------------------------------------------------------- the hooks


def _before_load(part: str, device: torch.device, nbytes: int) -> None:
    if device.type == "cpu":
        return
    _MM.free_memory(nbytes * 1.1 + _MM.minimum_inference_memory(), _normal_device(device))


def _on_loaded(part: str, module: torch.nn.Module, device: torch.device) -> None:
    patcher = WanPartPatcher(part, module, device)
    _PATCHERS[part] = patcher
    _MM.load_models_gpu([patcher])  # enters it in current_loaded_models (and keeps inference room free)


def _on_released(part: str) -> None:
    patcher = _PATCHERS.pop(part, None)
    if patcher is None or patcher.detaching:  # ComfyUI itself is taking it off its list
        return
    for i, loaded in enumerate(_MM.current_loaded_models):
        if loaded.model is patcher:
            _MM.current_loaded_models.pop(i)
            if loaded.model_finalizer is not None:
                loaded.model_finalizer.detach()
            break


def tracked_parts() -> list[str]:
    """Our parts ComfyUI's model management lists now (empty when not installed)."""
    if _MM is None:
        return []
    listed = [loaded.model for loaded in _MM.current_loaded_models]
    return sorted(part for part, p in _PATCHERS.items() if any(m is p for m in listed))


def install(model_management=None) -> bool:
    """Register the hooks with `model_management` (default: ComfyUI's, if importable). True if done."""
    global _MM
    if model_management is None:
        try:
            import comfy.model_management as model_management
        except ImportError:
            return False
    _MM = model_management
    register_memory_hooks(before_load=_before_load, on_loaded=_on_loaded, on_released=_on_released)
    return True


def loaded_models() -> list[dict]:
    """ComfyUI's loaded models, ours and others: [{"class": module class, "device": ..., "part": ours or None}]."""
    if _MM is None:
        return []
    out = []
    for loaded in list(_MM.current_loaded_models):
        patcher = loaded.model
        if patcher is None:
            continue
        out.append(dict(
            part=patcher.part if isinstance(patcher, WanPartPatcher) else None,
            device=str(loaded.device),
            **{"class": type(getattr(patcher, "model", None)).__name__},
        ))  # fmt: skip
    return out


def add_route(prompt_server) -> None:
    """GET /wan_fast/memory: {"parts": {part: {device: bytes}} (our cache), "tracked": [our parts
    ComfyUI lists], "comfyui": loaded_models()}."""
    from aiohttp import web

    @prompt_server.routes.get(ROUTE)
    async def memory_state(request):
        return web.json_response({"parts": memory_report(), "tracked": tracked_parts(), "comfyui": loaded_models()})
