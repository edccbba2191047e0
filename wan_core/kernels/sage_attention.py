"""8-bit attention in the SageAttention manner, as one Triton kernel ("fast mode" self-attention).

Why: self-attention is more than half of a Wan 14B forward at 480p (benchmarks/NOTES.md, "The
two numbers"), and Hopper's FP8/INT8 tensor cores run twice the bf16 rate, so both attention
matmuls are done in 8 bits here:

- S = Q·Kᵀ in FP8 e4m3 (or INT8), Q with one scale per token and head, K with one per 256 keys
  and head. K is first "smoothed": its mean over the tokens is subtracted, which changes every
  score of a query row by the same constant (softmax ignores it) but removes the channel bias
  that real models' keys carry, so the 8-bit grid is spent on what differs between keys.
- O = P·V with P (the softmax numerators, in [0, 1]) scaled by 448 into e4m3, and V in e4m3 with
  one scale per channel and head, after V is smoothed too: its mean over the keys is subtracted
  and added back to the output (exact, as the softmax weights sum to one); for values with a
  shared channel bias this cuts the error several-fold (benchmarks/NOTES.md log, "v smoothed").
  The row sums of P are taken in float32 before the rounding; the
  accumulators are float32; the output is bf16, or e4m3 codes with one scale per batch item
  (`sage_fp8_attention_codes`, `out_multiplier`) for an FP8 output projection, which then needs
  no quantising pass of its own.

The quantisation is `quantize` (torch code, the reference), run for self-attention on CUDA by two
Triton kernels (`sage_quant_kernel`: one pass over k and v for the means and v's range, one over
q, k and v for the codes) as a custom op; the attention kernel is a custom op too.
`reference` computes the same quantised math in torch, for tests; `sage_fp8_attention` is the
backend function (`[B, L, H, D]` in and out, as every backend in `attention.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fp8_rows import row_scales

__all__ = ["quantize", "reference", "sage_fp8_attention", "sage_fp8_attention_codes", "sage_sparse_attention",
           "out_multiplier", "available", "PAD"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PAD = 256  # token padding of the quantised tensors: a multiple of every BLOCK_M / BLOCK_N tried
KBLK = 256  # keys per k scale: every BLOCK_N tried divides it
LOG2E = 1.4426950408889634


def available(device) -> str | None:
    """None when the Triton kernel can run on `device`, else why not."""
    dev = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the Triton package is not installed"
    if dev.type != "cuda":
        return f"it runs on CUDA GPUs only (device {dev})"
    if torch.cuda.get_device_capability(dev) < (8, 9):
        return f"it needs FP8 tensor cores (compute capability 8.9+), {torch.cuda.get_device_name(dev)} has none"
    return None


def _quant_rows(x: torch.Tensor, group: int, int8: bool, extra_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> codes [B, H, Lp, D] (int8 or e4m3) and float32 scales [B, H, Lp / group],
    one scale per `group` consecutive tokens of a head (x ≈ codes · scale)."""
    b, l, h, d = x.shape
    lp = -(-l // PAD) * PAD
    xf = F.pad(x.float(), (0, 0, 0, 0, 0, lp - l)).transpose(1, 2)  # [B, H, Lp, D]
    amax = xf.reshape(b, h, lp // group, group * d).abs().amax(-1)  # [B, H, Lp / group]
    qmax = 127.0 if int8 else FP8_MAX
    # times the rounded reciprocal, written out: torch's CUDA division by a Python scalar is that,
    # its CPU division is not, and the Triton quantiser does the same on every device
    scale = amax.clamp(min=1e-12) * (1.0 / qmax)
    codes = xf / scale.repeat_interleave(group, dim=-1)[..., None]
    codes = codes.round().to(torch.int8) if int8 else codes.to(FP8)
    return codes.contiguous(), (scale * extra_scale).contiguous()


def quantize(q, k, v, qk_int8: bool = False, smooth_k: bool = True):
    """The kernel's inputs from q/k/v [B, L, H, D].

    Returns (q codes [B,H,Lqp,D], q scales [B,H,Lqp] (one per token, including softmax scale ·
    log2 e), k codes [B,H,Lkp,D], k scales [B,H,Lkp/KBLK] (one per KBLK keys), vᵀ codes e4m3
    [B,H,D,Lkp], v scales [B,H,D] (one per channel), v means [B,H,D]).
    Padding tokens have zero codes; the kernel masks the padded keys.
    """
    d = q.shape[-1]
    qc, qs = _quant_rows(q, 1, qk_int8, LOG2E / math.sqrt(d))
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=1, keepdim=True)
    kc, ks = _quant_rows(kf, KBLK, qk_int8, 1.0)
    b, l, h, _ = v.shape
    lp = -(-l // PAD) * PAD
    vm = v.float().mean(dim=1, keepdim=True)  # [B, 1, H, D]
    vf = v.float() - vm
    vs = vf.abs().amax(dim=1).clamp(min=1e-12) * (1.0 / FP8_MAX)  # [B, H, D]
    vc = (vf / vs[:, None]).to(FP8)  # [B, L, H, D]
    vt = F.pad(vc.permute(0, 2, 3, 1), (0, lp - l)).contiguous()  # [B, H, D, Lp]
    return qc, qs, kc, ks, vt, vs.contiguous(), vm[:, 0].contiguous()


# Self-attention's q/k/v quantisation on CUDA: the Triton kernels (True) or `quantize`'s torch
# code (False; inductor compiles it inside the block). benchmarks/bench_dit.py "+torchquant".
TRITON_QUANTIZE = True


def _launch_quantize(q, k, v, tuned: bool | None = None):
    """`quantize` (FP8, smoothed k) by the two Triton kernels of `sage_quant_kernel`; q/k/v
    [B, L, H, D] of the same length. Autotuned on a GPU; fixed tiles in the interpreter."""
    from . import sage_quant_kernel as kern

    tuned = q.is_cuda if tuned is None else tuned
    b, l, h, d = q.shape
    c = h * d
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lp = -(-l // PAD) * PAD
    block_l = 256
    n_chunks = -(-l // block_l)
    part = torch.empty(b, n_chunks, 4, c, dtype=torch.float32, device=q.device)  # per chunk: sum k, sum v, max v, min v
    if tuned:
        kern.kv_stats_tuned[lambda meta: (n_chunks, -(-c // meta["BLOCK_C"]), b)](k, v, part, l, c, n_chunks,
                                                                                  BLOCK_L=block_l)
    else:
        kern.kv_stats[(n_chunks, -(-c // 128), b)](k, v, part, l, c, n_chunks, BLOCK_L=block_l, BLOCK_C=128, SUB=16,
                                                   num_warps=4)
    km = part[:, :, 0].sum(1) / l  # [B, C] = [B, H, D]
    vm = part[:, :, 1].sum(1) / l
    vs = torch.maximum(part[:, :, 2].amax(1) - vm, vm - part[:, :, 3].amin(1)).clamp(min=1e-12) * (1.0 / FP8_MAX)
    qc = torch.empty(b, h, lp, d, dtype=FP8, device=q.device)
    kc = torch.empty_like(qc)
    vt = torch.empty(b, h, d, lp, dtype=FP8, device=q.device)
    qs = torch.empty(b, h, lp, dtype=torch.float32, device=q.device)
    ks = torch.empty(b, h, lp // KBLK, dtype=torch.float32, device=q.device)
    args = (q, k, v, km, vm, vs, qc, qs, kc, ks, vt, l, lp, h, LOG2E / math.sqrt(d))
    if tuned:
        kern.quantize_qkv_tuned[(lp // KBLK, h, b)](*args, HEAD_DIM=d, KBLK=KBLK)
    else:
        kern.quantize_qkv[(lp // KBLK, h, b)](*args, HEAD_DIM=d, KBLK=KBLK, SUB=32, num_warps=4)
    return qc, qs, kc, ks, vt, vs.view(b, h, d), vm.view(b, h, d)


@torch.library.custom_op("wan_core::sage_quantize", mutates_args=())
def _quantize_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """`quantize(q, k, v)` (FP8 Q·Kᵀ, smoothed k) as one op: the Triton kernels on CUDA (two reads
    of k and v, one of q), the torch code elsewhere."""
    if q.is_cuda:
        return _launch_quantize(q, k, v)
    return tuple(t.contiguous() for t in quantize(q, k, v))


@_quantize_op.register_fake
def _(q, k, v):
    b, l, h, d = q.shape
    lp = -(-l // PAD) * PAD
    codes = q.new_empty(b, h, lp, d, dtype=FP8)
    f32 = dict(dtype=torch.float32)
    return (codes, q.new_empty(b, h, lp, **f32), q.new_empty(b, h, lp, d, dtype=FP8), q.new_empty(b, h, lp // KBLK, **f32),
            q.new_empty(b, h, d, lp, dtype=FP8), q.new_empty(b, h, d, **f32), q.new_empty(b, h, d, **f32))


def reference(qc, qs, kc, ks, vt, vs, vm, lq: int, lk: int, out_dtype=torch.bfloat16, block_n: int = 64,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in float32 torch, key block by key block (P is rounded to e4m3 relative
    to the running maximum, as in the kernel): [B, Lq, H, D]. `keep` (bool [Lq, Lk]): the keys
    each query attends to, as the block-sparse kernel (a row with none: zeros). For tests; slow."""
    ks_tok = ks.repeat_interleave(KBLK, dim=-1)  # [B, H, Lkp]
    s_all = torch.einsum("bhmd,bhnd->bhmn", qc.float(), kc.float()) * qs[..., :, None] * ks_tok[..., None, :]
    s_all = s_all[:, :, :lq]
    if keep is not None:
        s_all[..., :lk] = s_all[..., :lk].masked_fill(~keep.to(s_all.device), float("-inf"))
    m = torch.full(s_all.shape[:-1], float("-inf"), device=s_all.device)  # [B, H, Lq]
    l = torch.zeros_like(m)
    acc = torch.zeros(*m.shape, qc.shape[-1], device=s_all.device)  # [B, H, Lq, D]
    for n in range(0, lk, block_n):
        s = s_all[..., n : min(n + block_n, lk)]
        m_new = torch.maximum(m, s.amax(-1))
        m_use = m_new.nan_to_num(neginf=0.0)  # a row with no key yet (masked): no NaN
        p = torch.exp2(s - m_use[..., None])
        alpha = torch.exp2(m - m_use)
        l = l * alpha + p.sum(-1)
        p8 = (p * FP8_MAX).to(FP8).float()
        acc = acc * alpha[..., None] + torch.einsum("bhmn,bhdn->bhmd", p8, vt[..., n : n + s.shape[-1]].float())
        m = m_new
    o = acc * (vs[:, :, None, :] / FP8_MAX) / l.clamp(min=torch.finfo(l.dtype).tiny)[..., None] + vm[:, :, None, :]
    o = torch.where(l[..., None] > 0, o, 0.0)
    return o.transpose(1, 2).to(out_dtype)


# ---- the kernel (wan_core/kernels/sage_kernel.py, imported on first use: Triton is optional) -----


# How the kernel is run on CUDA: TMA loads beat pointer loads; the hand-pipelined loop and Triton's
# warp specialisation gave no steady gain (benchmarks/bench_attention.py; figures in NOTES.md).
KERNEL_OPTIONS = {"use_tma": True, "pipeline": False, "warp_spec": False}
# The block-sparse kernel: its loop form, pipelined (2-6 % faster), and on Hopper the tile the
# sweep found fastest at 480p and 720p, 1-5 % ahead of the autotuner's noisy pick among close ones
# (benchmarks/bench_radial_kernel.py; NOTES.md, tenth session). Elsewhere it is autotuned.
SPARSE_OPTIONS = {"pipeline": True, "configs": {(9, 0): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}}}


def _sparse_config(device: torch.device, mask_block: int) -> dict | None:
    """The measured tile of the sparse kernel on this GPU (None: autotune), if it divides the mask block."""
    if device.type != "cuda":
        return None
    cfg = SPARSE_OPTIONS["configs"].get(torch.cuda.get_device_capability(device))
    return cfg if cfg is not None and mask_block % cfg["BLOCK_M"] == 0 and mask_block % cfg["BLOCK_N"] == 0 else None


def _tma_possible(device: torch.device) -> bool:
    """Tensor-descriptor (TMA) loads need Hopper or newer and a Triton that has host descriptors
    (3.3+); elsewhere (Ada, older Triton) the kernel loads through pointers."""
    import importlib.util

    if importlib.util.find_spec("triton.tools.tensor_descriptor") is None:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


def _launch(qc, qs, kc, ks, vt, vs, vm, lq: int, lk: int, out_dtype: torch.dtype, config: dict | None = None,
            use_tma: bool | None = None, pipeline: bool | None = None, warp_spec: bool | None = None,
            blocks: tuple[torch.Tensor, torch.Tensor, int] | None = None, out_mult: torch.Tensor | None = None
            ) -> torch.Tensor:  # fmt: skip
    """Run the kernel; `config` (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner
    (which needs a GPU: the Triton interpreter used by the CPU tests runs one fixed config).
    `blocks` = (counts int32 [n], indices int32 [n, max count], mask block): the block-sparse
    variant (`sage_sparse_kernel`) over those key blocks (its own loop-form default, `SPARSE_OPTIONS`;
    no warp specialisation there). `out_mult` (float32 [B], `out_multiplier`): the output is
    stored as e4m3 codes, the rows times their batch item's multiplier (`out_dtype` unused)."""
    from . import sage_kernel

    use_tma = (KERNEL_OPTIONS["use_tma"] and _tma_possible(qc.device)) if use_tma is None else use_tma
    if pipeline is None:
        pipeline = (SPARSE_OPTIONS if blocks is not None else KERNEL_OPTIONS)["pipeline"]
    warp_spec = KERNEL_OPTIONS["warp_spec"] if warp_spec is None else warp_spec
    if blocks is not None and config is None:
        config = _sparse_config(qc.device, blocks[2])
    b, h, lqp, d = qc.shape
    lkp = kc.shape[2]
    codes = out_mult is not None
    out = torch.empty(b, lq, h, d, dtype=FP8 if codes else out_dtype, device=qc.device)  # [B, Lq, H, D]
    os_ = out_mult if codes else vs  # unread without codes
    qv, kv, vv = qc.view(b * h * lqp, d), kc.view(b * h * lkp, d), vt.view(b * h * d, lkp)
    if use_tma:  # tile shapes are set per config (autotuner pre-hook, or below)
        from triton.tools.tensor_descriptor import TensorDescriptor

        bm, bn = (config["BLOCK_M"], config["BLOCK_N"]) if config else (64, 64)
        qv = TensorDescriptor.from_tensor(qv, [bm, d])
        kv = TensorDescriptor.from_tensor(kv, [bn, d])
        vv = TensorDescriptor.from_tensor(vv, [d, bn])

    def grid(meta):
        return (-(-lq // meta["BLOCK_M"]), b * h)

    strides = (out.stride(0), out.stride(1), out.stride(2))
    if config is None and qc.device.type != "cuda":
        config = {"BLOCK_M": 64, "BLOCK_N": 64}
    if blocks is not None:
        from . import sage_sparse_kernel

        counts, indices, mask_block = blocks
        args = (qv, qs, kv, ks, vv, vs, vm, out, os_, counts, indices, lq, lk, lqp, lkp, h, indices.shape[1], *strides)
        kernel = sage_sparse_kernel.attn_fwd_sparse if config is not None else sage_sparse_kernel.attn_fwd_sparse_tuned
        kernel[grid](*args, HEAD_DIM=d, QK_INT8=qc.dtype == torch.int8, USE_TMA=use_tma, KBLK=KBLK,
                     MASK_BLOCK=mask_block, PIPELINE=pipeline, CODES=codes, **(config or {}))  # fmt: skip
        return out
    args = (qv, qs, kv, ks, vv, vs, vm, out, os_, lq, lk, lqp, lkp, h, *strides)
    kernel = sage_kernel.attn_fwd if config is not None else sage_kernel.attn_fwd_tuned
    kernel[grid](*args, HEAD_DIM=d, QK_INT8=qc.dtype == torch.int8, USE_TMA=use_tma, PIPELINE=pipeline, KBLK=KBLK,
                 WARP_SPEC=warp_spec, CODES=codes,
                 **(config or {}))
    return out


@torch.library.custom_op("wan_core::sage_attention", mutates_args=())
def _sage_op(qc: torch.Tensor, qs: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vt: torch.Tensor,
             vs: torch.Tensor, vm: torch.Tensor, lq: int, lk: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _launch(qc, qs, kc, ks, vt, vs, vm, lq, lk, out_dtype)


@_sage_op.register_fake
def _(qc, qs, kc, ks, vt, vs, vm, lq, lk, out_dtype):
    b, h, _, d = qc.shape
    return qc.new_empty(b, lq, h, d, dtype=out_dtype)


# ---- the output as e4m3 codes, for the FP8 linear after the attention ----------------------------
def out_multiplier(vs: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    """The e4m3 multiplier of the kernel's output, one per batch item: 448 / bound, float32 [B].

    Why not one per row, as an FP8 linear quantises its input (`fp8_rows`): a row's amax spans every
    head, which no program of the kernel sees. But each output is a softmax average of the
    dequantised values, so |out| <= |vm| + 448 · vs on every channel, a bound known before the kernel
    runs. e4m3's relative step is the same at every magnitude down to 2^-6 of its range, so only
    outputs more than 28,672 times below the bound are rounded more coarsely than a row's own scale
    would round them (benchmarks/NOTES.md, seventeenth session)."""
    bound = (vm.abs() + FP8_MAX * vs).amax(dim=(1, 2)).clamp(min=1e-12)  # [B, H, D] -> [B]
    return (FP8_MAX / bound).float().contiguous()


def _pack(q, k, v, qk_int8: bool, smooth_k: bool):
    if q.shape == k.shape and not qk_int8 and smooth_k and TRITON_QUANTIZE:  # self-attention: one op
        return _quantize_op(q, k, v)
    return quantize(q, k, v, qk_int8=qk_int8, smooth_k=smooth_k)


@torch.library.custom_op("wan_core::sage_attention_codes", mutates_args=())
def _sage_codes_op(qc: torch.Tensor, qs: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vt: torch.Tensor,
                   vs: torch.Tensor, vm: torch.Tensor, lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    mult = out_multiplier(vs, vm)
    return _launch(qc, qs, kc, ks, vt, vs, vm, lq, lk, FP8, out_mult=mult), row_scales(mult, lq)


@_sage_codes_op.register_fake
def _(qc, qs, kc, ks, vt, vs, vm, lq, lk):
    b, h, _, d = qc.shape
    return qc.new_empty(b, lq, h, d, dtype=FP8), qc.new_empty(b * lq, 1, dtype=torch.float32)


def sage_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_int8: bool = False,
                       smooth_k: bool = True) -> torch.Tensor:
    """Attention of q [B, Lq, H, D] over k/v [B, Lk, H, D] in 8 bits; [B, Lq, H, D] in q's dtype."""
    return _sage_op(*_pack(q, k, v, qk_int8, smooth_k), q.shape[1], k.shape[1], q.dtype)


def sage_fp8_attention_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_int8: bool = False,
                             smooth_k: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`sage_fp8_attention` with its output as e4m3 codes [B, Lq, H, D] and each row's scale
    [B · Lq, 1] (one per batch item, `out_multiplier`): the input an FP8 linear takes, without
    the bf16 output's write and the quantising pass over it."""
    return _sage_codes_op(*_pack(q, k, v, qk_int8, smooth_k), q.shape[1], k.shape[1])


def sage_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                          indices: torch.Tensor, block_size: int, config: dict | None = None, codes: bool = False):
    """Block-sparse self-attention in 8 bits: query block i of `block_size` tokens attends to the key
    blocks indices[i, :counts[i]] (ascending) only. q/k/v [B, L, H, D]; [B, L, H, D] in q's dtype,
    or with `codes` as `sage_fp8_attention_codes` returns it (e4m3 codes, row scales).

    The same quantisation as the dense kernel (one op on CUDA), then `sage_sparse_kernel`. The
    block size must be a multiple of the tiles run (`config`'s; the autotuner keeps those of its
    64- and 128-token tiles that divide it: the radial mask's blocks are 128). A tile never
    straddles two k scales (KBLK is a multiple of every tile), whatever the block size."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"sparse 8-bit attention is self-attention: q, k, v must share one [B, L, H, D] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    tiles = (config["BLOCK_M"], config["BLOCK_N"]) if config else (64,)
    if block_size < 1 or any(block_size % t for t in tiles):
        raise ValueError(f"sparse 8-bit attention: block size {block_size} must be a multiple of the tiles {tiles}")
    length = q.shape[1]
    if counts.shape[0] != -(-length // block_size) or indices.shape[0] != counts.shape[0]:
        raise ValueError(f"sparse 8-bit attention: {counts.shape[0]} block rows for {length} tokens of {block_size}")
    packed = _quantize_op(q, k, v) if TRITON_QUANTIZE else quantize(q, k, v)
    blocks = (counts.to(q.device, torch.int32), indices.to(q.device, torch.int32).contiguous(), block_size)
    if codes:
        mult = out_multiplier(packed[5], packed[6])
        out = _launch(*packed, length, length, FP8, config=config, blocks=blocks, out_mult=mult)
        return out, row_scales(mult, length)
    return _launch(*packed, length, length, q.dtype, config=config, blocks=blocks)
