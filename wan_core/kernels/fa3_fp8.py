"""FP8 self-attention through FlashAttention-3's e4m3 kernel (Hopper), with our quantisation.

Why: FlashAttention-3 overlaps the softmax of one warpgroup with the matmuls of another, which
our Triton kernel (`sage_attention.py`) cannot express; its e4m3 forward is the fastest 8-bit
attention we can run on Hopper when the `flash_attn_3` package is installed. The kernel takes
e4m3 q/k/v with one float32 "descale" per (batch, head) for each and returns bf16. What goes in
decides the error, so the quantisation is ours:

- k is smoothed: its mean over the tokens is subtracted per head and channel. Every score of a
  query row moves by the same constant q·mean(k), which the softmax ignores, and the e4m3 grid is
  spent on what differs between keys (real models' keys carry a large shared bias).
- v is smoothed too: its mean over the keys is subtracted before the rounding and added to the
  output afterwards (exact: the softmax weights of a row sum to one).
- q, the smoothed k and the smoothed v each get one scale per (batch, head): amax / 448.

`quantize` is that math in torch; on CUDA the backend runs it as two Triton kernels
(`sage_quant_kernel.kv_stats` with QK_RANGE, then `quantize_per_head`: two reads of q, k and v,
where inductor's code of `quantize` takes three of k and v); `reference` runs the same quantised
attention in float32 torch, for tests; `fa3_fp8_attention` is the backend (`[B, L, H, D]` in and
out, as every backend in `attention.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["quantize", "reference", "fa3_fp8_attention", "available"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def available(device) -> str | None:
    """None when FlashAttention-3's FP8 kernel can run on `device`, else why not."""
    import importlib.util

    dev = torch.device(device)
    if importlib.util.find_spec("flash_attn_interface") is None:
        return "the flash_attn_3 package (FlashAttention-3, Hopper build) is not installed"
    if dev.type != "cuda":
        return f"it runs on CUDA GPUs only (device {dev})"
    if torch.cuda.get_device_capability(dev)[0] != 9:
        return f"FlashAttention-3 runs on Hopper GPUs (compute capability 9.x), not on {torch.cuda.get_device_name(dev)}"
    return None


def _per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] float32 -> e4m3 codes [B, L, H, D] and descales [B, H] (x ≈ codes · descale)."""
    amax = x.abs().amax(dim=(1, 3))  # [B, H]
    # times the rounded reciprocal, as the other quantisers here (the same on every device)
    descale = amax.clamp(min=1e-12) * (1.0 / FP8_MAX)
    codes = (x / descale[:, None, :, None]).to(FP8)
    return codes, descale


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q/k/v [B, L, H, D] -> (q codes, q descale [B, H], k codes, k descale, v codes, v descale,
    v mean [B, 1, H, D] float32). Codes keep the [B, L, H, D] layout the kernel reads."""
    qc, qd = _per_head(q.float())
    kf = k.float()
    kc, kd = _per_head(kf - kf.mean(dim=1, keepdim=True))
    vf = v.float()
    vm = vf.mean(dim=1, keepdim=True)  # [B, 1, H, D]
    vc, vd = _per_head(vf - vm)
    return qc, qd, kc, kd, vc, vd, vm


# Self-attention's quantisation on CUDA: the Triton kernels (True) or `quantize`'s torch code
# (False; inductor compiles it inside the block).
TRITON_QUANTIZE = True


def _launch_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tuned: bool | None = None):
    """`quantize` by `sage_quant_kernel`'s two kernels (autotuned on a GPU, fixed tiles in the
    interpreter); same outputs, the means summed in another order."""
    from . import sage_quant_kernel as kern

    tuned = q.is_cuda if tuned is None else tuned
    b, l, h, d = q.shape
    c = h * d
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_l = 256
    n_chunks = -(-l // block_l)
    # per chunk of tokens and channel: sum k, sum v, max v, min v, max k, min k, max |q|
    part = torch.empty(b, n_chunks, 7, c, dtype=torch.float32, device=q.device)
    if tuned:
        kern.kv_stats_tuned[lambda meta: (n_chunks, -(-c // meta["BLOCK_C"]), b)](
            k, v, part, l, c, n_chunks, BLOCK_L=block_l, q_ptr=q, QK_RANGE=True)
    else:
        kern.kv_stats[(n_chunks, -(-c // 128), b)](k, v, part, l, c, n_chunks, BLOCK_L=block_l, BLOCK_C=128, SUB=16,
                                                   q_ptr=q, QK_RANGE=True, num_warps=4)
    km = part[:, :, 0].sum(1) / l  # [B, C]
    vm = part[:, :, 1].sum(1) / l

    def descale(amax_c: torch.Tensor) -> torch.Tensor:  # [B, C] per-channel amax -> [B, H]
        return amax_c.view(b, h, d).amax(-1).clamp(min=1e-12) * (1.0 / FP8_MAX)

    qd = descale(part[:, :, 6].amax(1))
    kd = descale(torch.maximum(part[:, :, 4].amax(1) - km, km - part[:, :, 5].amin(1)))
    vd = descale(torch.maximum(part[:, :, 2].amax(1) - vm, vm - part[:, :, 3].amin(1)))
    qc, kc, vc = (torch.empty(b, l, h, d, dtype=FP8, device=q.device) for _ in range(3))
    args = (q, k, v, km, vm, qd, kd, vd, qc, kc, vc, l, h)
    if tuned:
        kern.quantize_per_head_tuned[lambda meta: (-(-l // meta["BLOCK_T"]), h, b)](*args, HEAD_DIM=d)
    else:
        kern.quantize_per_head[(-(-l // 64), h, b)](*args, HEAD_DIM=d, BLOCK_T=64, SUB=16, num_warps=4)
    return qc, qd, kc, kd, vc, vd, vm.view(b, 1, h, d)


@torch.library.custom_op("wan_core::fa3_quantize", mutates_args=())
def _quantize_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """`quantize` as one op (opaque to inductor): the Triton kernels on CUDA, the torch code elsewhere."""
    if q.is_cuda:
        return _launch_quantize(q, k, v)
    return tuple(t.contiguous() for t in quantize(q, k, v))


@_quantize_op.register_fake
def _(q, k, v):
    b, l, h, d = q.shape
    codes = [q.new_empty(b, l, h, d, dtype=FP8) for _ in range(3)]
    scales = [q.new_empty(b, h, dtype=torch.float32) for _ in range(3)]
    return codes[0], scales[0], codes[1], scales[1], codes[2], scales[2], q.new_empty(b, 1, h, d, dtype=torch.float32)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The quantised inputs' attention in float32 (exact softmax, no rounding of P), plus the v
    mean, in q's dtype: what the kernel approximates. [B, L, H, D]."""
    qc, qd, kc, kd, vc, vd, vm = quantize(q, k, v)

    def deq(c, d):  # [B, L, H, D] -> [B, H, L, D]
        return (c.float() * d[:, None, :, None]).transpose(1, 2)

    o = F.scaled_dot_product_attention(deq(qc, qd), deq(kc, kd), deq(vc, vd)).transpose(1, 2)
    return (o + vm).to(q.dtype)


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention [B, L, H, D] -> [B, L, H, D] (q's dtype) by FlashAttention-3's e4m3 kernel."""
    from flash_attn_interface import flash_attn_func

    qc, qd, kc, kd, vc, vd, vm = _quantize_op(q, k, v) if TRITON_QUANTIZE else quantize(q, k, v)
    out = flash_attn_func(qc, kc, vc, softmax_scale=q.shape[-1] ** -0.5, q_descale=qd, k_descale=kd, v_descale=vd)
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() + vm).to(q.dtype)
