"""The block mask of Radial Attention (self-attention over a video's frames x spatial tokens).

Radial Attention (mit-han-lab/radial-attention, `gen_log_mask_shrinked` as of 72788d4) keeps a
static O(n log n) set of 128 x 128 blocks of the attention matrix: attention energy decays with
the temporal distance between frames, so the spatial window a query frame i keeps in key frame j
shrinks by half every time the distance |i - j| doubles. The rule, per pair of frames (i, j),
on the tokens of the two frames (r: query token, c: key token, both indices within their frame):

- key frame 0 is kept whole for every query frame (the attention sink);
- distance 0 and 1: the whole frame pair (LightX2V keeps only a half-frame band at distance 1,
  the reference's older rule; we follow the current one);
- distance d >= 2, g = bit_length(d): the band |c - r| <= max(2^bit_length(T) / 2^g * decay, 128)
  (T tokens per frame), and once that width 2^bit_length(T) / 2^g drops below 128 only every
  (128 // width)-th distance keeps its band at all (the others drop the pair).

The token mask of each pair is then cut into blocks the way the reference does: the pair's tokens
are placed at their offset within the 128-token grid, only the first ceil(T / 128) blocks of
that placement count, and a block is kept when more than 60 % of its non-empty key columns have
more than a third of the block's 128 query rows set. Everything from block L // 128 on (the
reference's text tokens; for Wan the last, partial block of a sequence not a multiple of 128)
is kept whole, as rows and as columns.

The reference builds every pair's T x T token mask; here the count of set rows per block column
is an interval length, so a pair costs ceil(T / 128)^2 x 128 integer operations (and pairs with
the same offsets and band are done once). The sequence is padded to a multiple of 128: the mask
has ceil(L / 128) rows and columns, and the kernel masks the padded keys itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BLOCK", "DECAY", "RadialPlan", "radial_block_mask", "radial_plan", "expand_block_mask", "pair_rule"]

BLOCK = 128  # tokens per mask block, as the reference (its kernels' tile)
_SPLIT = 128  # the reference's fixed threshold of the "every n-th distance" rule, whatever the block size
DECAY = 0.2  # the reference scripts' and LightX2V's decay factor


def pair_rule(dist: int, tokens_per_frame: int, decay_factor: float, block_size: int = BLOCK) -> int | None:
    """For a key frame other than 0 at temporal distance `dist` from the query frame: the band
    half-width W (|c - r| <= W kept), or None when the pair is dropped. W >= T - 1 is the whole pair."""
    t = tokens_per_frame
    group = dist.bit_length()
    if dist <= 1:
        width = float(t)
    else:
        decay_length = 2 ** t.bit_length() / 2**group * decay_factor
        width = decay_length if decay_length >= block_size else float(block_size)
    split_length = 2 ** t.bit_length() / 2**group
    if split_length < _SPLIT and dist % int(_SPLIT / split_length) != 0:
        return None
    # The reference compares integer distances with the width as a float32 tensor scalar.
    return math.floor(float(np.float32(width)))


@functools.lru_cache(maxsize=256)
def _pair_blocks(row_off: int, col_off: int, t: int, width: int, block_size: int) -> np.ndarray:
    """Kept blocks [nb, nb] of one frame pair placed at offsets (row_off, col_off) in its grid.

    The pair's query rows r in [0, T) sit at grid rows row_off + r, its key columns likewise; only
    the first nb = ceil(T / bs) blocks each way are looked at (the reference's crop). For each
    block row a and grid column x, the number of set rows is the length of the intersection of
    the frame rows in block a with the band [c - W, c + W] of the column's key token c. (numpy:
    small single-threaded integer work, which torch's thread pool only slows down.)
    """
    bs = block_size
    nb = -(-t // bs)
    a = np.arange(nb)
    lo = np.maximum(a * bs - row_off, 0)  # frame rows inside block row a: [lo, hi)
    hi = np.minimum((a + 1) * bs - row_off, t)
    c = np.arange(nb * bs) - col_off  # key token of each grid column (outside [0, T): no column)
    valid = (c >= 0) & (c < t)
    top = np.minimum(hi[:, None], c[None, :] + width + 1)
    bottom = np.maximum(lo[:, None], c[None, :] - width)
    count = np.maximum(top - bottom, 0) * valid  # [nb, nb * bs]: set rows of each column in each block row
    count = count.reshape(nb, nb, bs)  # [block row, block col, column within the block]
    nonzero = (count > 0).sum(-1)
    dense = (3 * count > bs).sum(-1)  # column density > 1/3
    return 5 * dense > 3 * nonzero  # more than 60 % of the non-empty columns dense


def radial_block_mask(
    frames: int, tokens_per_frame: int, block_size: int = BLOCK, decay_factor: float = DECAY
) -> torch.Tensor:
    """The reference's block mask for `frames` x `tokens_per_frame` video tokens: bool
    [n, n], n = ceil(L / block_size) (True: the query block attends to the key block)."""
    f, t, bs = int(frames), int(tokens_per_frame), int(block_size)
    if f < 1 or t < 1 or bs < 1:
        raise ValueError(f"radial mask: frames, tokens per frame and block size must be positive, got {f}, {t}, {bs}")
    if not (decay_factor > 0 and math.isfinite(decay_factor)):
        raise ValueError(f"radial mask: decay_factor must be a positive number, got {decay_factor!r}")
    length = f * t
    n = -(-length // bs)
    nb = -(-t // bs)
    mask = np.zeros((n, n), dtype=bool)
    border = length // bs  # the reference's video/text border: whole rows and columns from here on
    mask[border:] = True
    mask[:, border:] = True
    for i in range(f):
        bi, ri = divmod(i * t, bs)
        for j in range(f):
            bj, rj = divmod(j * t, bs)
            width = t if j == 0 else pair_rule(abs(i - j), t, decay_factor, bs)
            if width is None:
                continue
            mask[bi : bi + nb, bj : bj + nb] |= _pair_blocks(ri, rj, t, min(width, t), bs)
    return torch.from_numpy(mask)


@dataclass(frozen=True, eq=False)
class RadialPlan:
    """A block mask in the forms its users want: `mask` bool [n, n]; per query block the number of
    kept key blocks `counts` int32 [n] and their indices, ascending, `indices` int32 [n, max count]
    (past its count a row holds other block indices, never read). `length` real tokens."""

    length: int
    block_size: int
    mask: torch.Tensor
    counts: torch.Tensor
    indices: torch.Tensor

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())


@functools.lru_cache(maxsize=16)
def _plan(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, device: str) -> RadialPlan:
    mask = radial_block_mask(frames, tokens_per_frame, block_size, decay_factor)
    counts = mask.sum(1).to(torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # kept columns first, ascending
    indices = order[:, : int(counts.max())].to(torch.int32).contiguous()
    dev = torch.device(device)
    return RadialPlan(frames * tokens_per_frame, block_size, mask.to(dev), counts.to(dev), indices.to(dev))


def radial_plan(
    frames: int, tokens_per_frame: int, decay_factor: float = DECAY, device="cpu", block_size: int = BLOCK
) -> RadialPlan:
    """The plan of `radial_block_mask` on `device` (made once per layout, decay and device)."""
    return _plan(int(frames), int(tokens_per_frame), int(block_size), float(decay_factor), str(torch.device(device)))


def expand_block_mask(mask: torch.Tensor, length: int, block_size: int = BLOCK) -> torch.Tensor:
    """Block mask [n, n] -> token mask [L, L] (the padded tail cut off)."""
    return mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:length, :length]
