"""Radial Attention as an attention backend (`radial_attn`, LightX2V's name): block-sparse self-attention.

Why: at 720p (75,600 tokens) self-attention is most of a Wan forward, and Radial Attention
(mit-han-lab/radial-attention) keeps a static O(n log n) set of its 128 x 128 blocks, chosen
from the distance between frames (`radial_mask`): about 34 % of the blocks at 480p, 26 % at
720p (decay 0.2). The method is training-free at the default length when the first steps and
the first layers stay dense (the reference's runs: `dense_timesteps` 12 of 50, `dense_layers` 1,
decay 0.2); those options are `RadialOptions`.

Three implementations of the same math, dense attention over the kept blocks only:
- `radial_attention_triton`: the Triton kernel (`radial_kernel`), on CUDA, fp16 / bf16;
- `radial_attention_torch`: SDPA with the token mask expanded from the blocks, a few query
  blocks at a time (the reference, and the CPU path);
- the tests' own float64 softmax.
And one in 8 bits, `radial_attention_fp8`: the block-sparse variant of the 8-bit kernel
(`sage_attention.sage_sparse_attention`: FP8 Q·Kᵀ and P·V, smoothed k and v), for fast mode,
where a kept block in bf16 would cost about twice what a dense e4m3 block does. Which one runs is
`RadialOptions.kernel`: "auto" is the 8-bit kernel for a DiT with FP8 linears (fast mode; the
model cache resolves it, `for_model`), else the input dtype's.

`RadialAttention` is the backend object the attention table makes: `attn(q, k, v)` like any
backend; the video layout comes from `attention_context.current_grid()` (declared by the model's
forward) and the step from `current_step()` (declared by the sampling loop). Layer choice is
static: `WanModel.set_attention` gives the first `dense_layers` blocks `for_layer(i)`, the dense
backend. It needs every token of the video in one call: Ulysses (heads split, whole sequence)
works, ring attention (sequence split) cannot, and says so (`whole_sequence`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_context import current_grid, current_step
from .fp8_rows import FP8_DTYPE, head_rows_codes
from .radial_mask import DECAY, RadialPlan, radial_plan

__all__ = [
    "RadialOptions",
    "RadialAttention",
    "make_radial",
    "radial_attention_torch",
    "radial_attention_triton",
    "radial_attention_fp8",
    "for_model",
    "check_kernel",
    "available",
]


@dataclass(frozen=True)
class RadialOptions:
    """The radial backend's settings (the reference's names; LightX2V fixes decay 0.2 and has no dense ones).

    decay_factor: scales the band kept at distance >= 2 (smaller: sparser); dense_layers: the first
    N blocks run dense attention; dense_timesteps: the first N sampling steps run dense attention.
    kernel: "bf16" (the input dtype's tensor cores; the torch path off CUDA), "fp8" (8 bits, CUDA
    compute capability 8.9+; the dense layers and steps then run `sage_triton`, the same 8-bit
    math), or "auto": "fp8" when the model's linears are FP8 (fast mode, `for_model`), else "bf16".
    """

    decay_factor: float = DECAY
    dense_layers: int = 0
    dense_timesteps: int = 0
    kernel: str = "auto"

    def __post_init__(self):
        d = self.decay_factor
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (d > 0 and math.isfinite(d)):
            raise ValueError(f"decay_factor must be a positive number, got {d!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {self.kernel!r}")
        for key in ("dense_layers", "dense_timesteps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {v!r}")

    @property
    def dense_backend(self) -> str:
        """The attention-table name of the dense layers' and steps' backend."""
        return "sage_triton" if self.kernel == "fp8" else "auto"


KERNELS = ("auto", "bf16", "fp8")


def for_model(options: RadialOptions | None, fp8_linears: bool, device) -> RadialOptions | None:
    """The options a DiT gets: kernel "auto" becomes "fp8" on a DiT with FP8 linears (fast mode)
    where the 8-bit kernel runs (else it stays: the input dtype's kernel). None: the defaults."""
    from .sage_attention import available as eight_bit_problem

    if not fp8_linears or (options is not None and options.kernel != "auto") or eight_bit_problem(device) is not None:
        return options
    return dataclasses.replace(options if options is not None else RadialOptions(), kernel="fp8")


def check_kernel(options: RadialOptions, device) -> None:
    """A clear error at build time when kernel "fp8" is asked for where it cannot run."""
    if options.kernel == "fp8":
        from .sage_attention import available as eight_bit_problem

        why = eight_bit_problem(device if device is not None else "cpu")
        if why is not None:
            raise RuntimeError(f"radial_attn with kernel 'fp8' (the 8-bit sparse kernel) cannot run here: {why}; "
                               "choose kernel 'bf16' or 'auto'")  # fmt: skip


def available(device) -> str | None:
    """None when the Triton kernel can run on `device`, else why not (the torch path runs anywhere)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"it runs on CUDA GPUs only (device {dev})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the Triton package is not installed"
    return None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RadialPlan) -> None:
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"radial attention is self-attention: q, k, v must share one [B, L, H, D] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if q.shape[1] != plan.length:
        raise ValueError(f"radial attention: {q.shape[1]} tokens, but the mask is for {plan.length}")


def radial_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RadialPlan, max_bytes: int = 256 * 2**20
) -> torch.Tensor:
    """Dense attention restricted to the plan's kept blocks, by SDPA with a token mask, a few
    query blocks at a time (the mask and scores of a chunk stay under `max_bytes`). [B, L, H, D]."""
    _check(q, k, v, plan)
    b, length, h, _ = q.shape
    bs = plan.block_size
    mask = plan.mask.to(q.device)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views
    rows = max(1, max_bytes // (bs * length * (b * h * 4 + 1)))  # query blocks per chunk
    out = torch.empty_like(qh)
    for r0 in range(0, mask.shape[0], rows):
        lo, hi = r0 * bs, min((r0 + rows) * bs, length)
        keep = mask[r0 : r0 + rows].repeat_interleave(bs, 0)[: hi - lo].repeat_interleave(bs, 1)[:, :length]  # [m, L]
        part = F.scaled_dot_product_attention(qh[:, :, lo:hi], kh, vh, attn_mask=keep)
        out[:, :, lo:hi] = torch.where(keep.any(1)[:, None], part, 0.0)  # a row with no key: zeros, as the kernel
    return out.transpose(1, 2)


def radial_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RadialPlan, config: dict | None = None
) -> torch.Tensor:
    """The block-sparse Triton kernel: [B, L, H, D] in q's dtype. `config` (BLOCK_M, BLOCK_N,
    num_warps, num_stages) skips the autotuner (the Triton interpreter runs one fixed config)."""
    from . import radial_kernel

    _check(q, k, v, plan)
    b, length, h, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"radial attention kernel: head dim must be a power of two >= 16, got {d}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device)  # [B, L, H, D]
    counts, indices = plan.counts.to(q.device), plan.indices.to(q.device)

    def grid(meta):
        return (-(-length // meta["BLOCK_M"]), b * h)

    args = (q, k, v, out, counts, indices, length, h, indices.shape[1], math.log2(math.e) / math.sqrt(d),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])  # fmt: skip
    if config is None and q.device.type != "cuda":
        config = {"BLOCK_M": 64, "BLOCK_N": 64}
    kernel = radial_kernel.radial_fwd if config is not None else radial_kernel.radial_fwd_tuned
    kernel[grid](*args, HEAD_DIM=d, MASK_BLOCK=plan.block_size, **(config or {}))
    return out


def radial_attention_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RadialPlan, config: dict | None = None,
    codes: bool = False,
):
    """The block-sparse 8-bit kernel over the plan's kept blocks: [B, L, H, D] in q's dtype, or with
    `codes` e4m3 codes and row scales (`sage_attention.sage_fp8_attention_codes`'s form). `config`
    (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner."""
    from .sage_attention import sage_sparse_attention

    _check(q, k, v, plan)
    counts, indices = plan.counts.to(q.device), plan.indices.to(q.device)
    return sage_sparse_attention(q, k, v, counts, indices, plan.block_size, config, codes=codes)


class RadialAttention:
    """The `radial_attn` backend: `attn(q, k, v)` [B, L, H, D] on the tokens of one video.

    Dense (the exact backend `dense`) during the first `dense_timesteps` sampling steps; a model
    called outside a sampling loop (no step declared) counts as past them. The block plans are
    made once per layout and device.
    """

    backend_name = "radial_attn"
    whole_sequence = True  # needs every token of the video in one call (no ring attention)

    def __init__(self, options: RadialOptions, dense, device=None):
        self.options = options
        self.dense = dense
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.device = dev
        self.use_triton = available(dev) is None
        check_kernel(options, dev)
        self.eight_bit = options.kernel == "fp8"
        self._token = next(_TOKENS)
        _BACKENDS[self._token] = self

    def __reduce__(self):
        """A copy (copy.deepcopy, pickle) is made by the constructor: it gets its own op token."""
        return (RadialAttention, (self.options, self.dense, self.device))

    def for_layer(self, index: int):
        """The function block `index` runs: the dense backend for the first `dense_layers` blocks."""
        return self.dense if index < self.options.dense_layers else self

    def plan(self, frames: int, tokens_per_frame: int, device) -> RadialPlan:
        return radial_plan(frames, tokens_per_frame, self.options.decay_factor, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _radial_op(q, k, v, self._token)

    def codes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output as e4m3 codes [B, L, H, D] and row scales [B·L, 1], for an FP8 output projection
        (`attention.py`): stored so by the 8-bit kernels, quantised per token after the others."""
        return _radial_codes_op(q, k, v, self._token)

    def _dense_step(self) -> bool:
        """Whether the sampling step declared now is one of the first `dense_timesteps`."""
        step = current_step()
        return step is not None and step < self.options.dense_timesteps

    def _attend_codes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dense_step():
            dense_codes = getattr(self.dense, "codes", None)
            return dense_codes(q, k, v) if dense_codes is not None else head_rows_codes(self.dense(q, k, v))
        if self.eight_bit:
            return radial_attention_fp8(q, k, v, self._plan_for(q), codes=True)
        return head_rows_codes(self._attend(q, k, v))

    def _plan_for(self, q: torch.Tensor) -> RadialPlan:
        """The plan of the declared video layout, checked against q's token count."""
        grid = current_grid()
        if grid is None:
            raise RuntimeError(
                "radial_attn needs the video layout, which WanModel.forward declares; it was called outside a "
                "model forward (wan_core.kernels.attention_context.video_grid)"
            )
        frames, tokens_per_frame = grid[0], grid[1] * grid[2]
        if q.shape[1] != frames * tokens_per_frame:
            raise ValueError(
                f"radial_attn got {q.shape[1]} tokens, but the video has {frames} x {tokens_per_frame} = "
                f"{frames * tokens_per_frame}: it needs the whole sequence in one call (sequence parallel: Ulysses, "
                "not ring)"
            )
        return self.plan(frames, tokens_per_frame, q.device)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._dense_step():
            return self.dense(q, k, v)
        plan = self._plan_for(q)
        if self.eight_bit:
            return radial_attention_fp8(q, k, v, plan)
        if self.use_triton and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return radial_attention_triton(q, k, v, plan)
        return radial_attention_torch(q, k, v, plan)


# A compiled block sees the backend as one opaque op: the op reads the layout and the step (context
# variables) and picks its kernel when it runs, which a traced graph could not guard on; before,
# a graph break did that and cut each compiled block into four graphs, losing the fusions around
# attention. The op finds its backend by a token (a constant in the graph); the registry holds
# the backends weakly.
_BACKENDS: weakref.WeakValueDictionary[int, RadialAttention] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


@torch.library.custom_op("wan_core::radial_attention", mutates_args=())
def _radial_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: int) -> torch.Tensor:
    return _BACKENDS[backend]._attend(q, k, v).contiguous()


@_radial_op.register_fake
def _(q, k, v, backend):
    return q.new_empty(q.shape)  # [B, L, H, D] in q's dtype, contiguous


@torch.library.custom_op("wan_core::radial_attention_codes", mutates_args=())
def _radial_codes_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = _BACKENDS[backend]._attend_codes(q, k, v)
    return codes.contiguous(), scale.contiguous()


@_radial_codes_op.register_fake
def _(q, k, v, backend):
    b, length = q.shape[:2]
    return q.new_empty(q.shape, dtype=FP8_DTYPE), q.new_empty(b * length, 1, dtype=torch.float32)


def make_radial(options: RadialOptions | None, dense, device=None) -> RadialAttention:
    """The backend for the attention table (`attention.get_attention('radial_attn', ...)`), whose
    dense layers and steps run `dense` (the table's `options.dense_backend`)."""
    return RadialAttention(options if options is not None else RadialOptions(), dense, device)
