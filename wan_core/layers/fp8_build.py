"""An FP8 DiT built from a file: the FP8 layer applied at load time, so no high-precision copy of
the block linears ever exists.

The file is read by `wan_core.loading.fp8` (every FP8 layout users bring, normalised to e4m3 or
e5m2 codes plus float32 [out, 1] scales); this module builds the model on the meta device, swaps
the block linears whose file weights are fp8 for `FP8Linear` and assigns the tensors one by one:
e4m3 codes are kept as they are (mmap views on the CPU, no dequantise/requantise round trip), an
e5m2 weight is requantised per channel to e4m3; with `quantize=True` block linears stored in high
precision are quantised too (a bf16 checkpoint becomes an FP8 model tensor by tensor, no second
copy of the model in RAM). fp8 weights of the layers kept in high precision (embeddings, head,
time/text/image projections) are dequantised to the model dtype.
"""

from __future__ import annotations

import torch

from ..loading.dit import _check_keys, param_dtype
from ..loading.fp8 import read_fp8_dit
from ..loading.io import CheckpointError
from ..models.config import WanConfig
from ..models.dit import WanModel
from .fp8 import FP8_DTYPE, FP8Linear, is_block_linear, quantize_weight, set_fp8_kernel

__all__ = ["build_fp8_model", "load_fp8_dit"]


def build_fp8_model(
    cfg: WanConfig,
    sd: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: bool = False,
    source: str = "state dict",
) -> WanModel:
    """Build on the meta device with FP8Linear where the block linears have fp8 weights (or all
    block linears with `quantize`), assign the tensors (converted one by one), kernel 'dequant'."""
    with torch.device("meta"):
        model = WanModel(cfg)
    fp8_names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and is_block_linear(n) and (n in scales or (quantize and f"{n}.weight" in sd))
    ]
    for n in fp8_names:
        lin = model.get_submodule(n)
        parent, _, child = n.rpartition(".")
        fp8 = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype, device="meta")
        setattr(model.get_submodule(parent), child, fp8)
    expected = dict(model.state_dict())
    _check_keys(set(expected), set(sd) | {f"{n}.weight_scale" for n in fp8_names}, source)

    out: dict[str, torch.Tensor] = {}
    fp8_set = set(fp8_names)
    for k, v in sd.items():
        name = k[: -len(".weight")] if k.endswith(".weight") else None
        want = tuple(expected[k].shape)
        if tuple(v.shape) != want:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, expected {want}")
        if name in fp8_set:
            if name in scales and v.dtype == FP8_DTYPE:
                codes, scale = v, scales[name]
            else:  # e5m2 codes, or a high-precision weight with quantize=True
                w = v.float() * scales[name] if name in scales else v
                codes, scale = quantize_weight(w.to(device))
            out[k] = codes.to(device)
            out[f"{name}.weight_scale"] = scale.to(device=device, dtype=torch.float32)
        elif name is not None and name in scales:  # fp8 weight of a layer we keep in high precision
            out[k] = (v.to(device).float() * scales[name].to(device)).to(param_dtype(k, dtype))
        else:
            out[k] = v.to(device=device, dtype=param_dtype(k, dtype))
    model.load_state_dict(out, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def load_fp8_dit(
    path: str | list[str],
    kernel: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: bool = False,
    attention: str = "auto",
    cross_attention: str | None = None,
    task: str | None = None,
    config: dict | None = None,
) -> WanModel:
    """Load a Wan2.1 DiT whose block linears are FP8 (any layout of `wan_core.loading.fp8`), ready to run.

    kernel: FP8 matmul kernel or LightX2V scheme (`wan_core.layers.fp8`), resolved once for `device`;
    dtype: compute dtype of everything that is not fp8; quantize: also quantise block linears
    the file holds in high precision (per-channel scales), e.g. to run a bf16 checkpoint in FP8;
    the rest as `wan_core.loading.dit.load_dit`.
    """
    ckpt = read_fp8_dit(path, task=task, config=config)
    if not ckpt.scales and not quantize:
        raise CheckpointError(
            f"{ckpt.source}: no fp8 weights in this checkpoint (layout {ckpt.layout}); load it with load_dit, "
            "or pass quantize=True to quantise its block linears on load"
        )
    model = build_fp8_model(
        ckpt.cfg, ckpt.sd, ckpt.scales, dtype=dtype, device=device, quantize=quantize, source=ckpt.source
    )
    model.set_attention(attention, cross_attention, device=device)
    model.set_block_ops("auto", device=device)  # fused single-pass ops on CUDA, plain torch elsewhere
    set_fp8_kernel(model, kernel, device)
    return model
