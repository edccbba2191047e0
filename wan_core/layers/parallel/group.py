"""Parallel degrees and the process groups that realise them.

The world is a mesh cfg x ring x ulysses (ulysses innermost), rank = (c * ring + r) * ulysses + u:
- the `cfg` axis (1 or 2) puts the conditional and the unconditional DiT evaluation of a step on
  two halves of the world;
- inside one half, the video tokens are split over `ring * ulysses` ranks (sequence parallel).
  Ulysses ranks are adjacent (on one host they share the fastest links, and all-to-all is the
  chattiest collective); a rank's token chunk is its index in the sequence-parallel group, so
  the chunk an Ulysses all-to-all gathers for one ring position is contiguous in the sequence.

Degrees come from our names (`cfg`, `ulysses`, `ring`) or from the LightX2V `parallel` keys the
seed configs use (`cfg_p_size`, `seq_p_size`, `seq_p_attn_type`); they are checked against the
world size and the number of heads before any communicator is made, so a bad choice is a
sentence, not a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ParallelConfig", "ParallelGroups", "build_groups", "init_process_group", "default_backend"]


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism; their product is the number of processes."""

    cfg: int = 1  # 2: cond and uncond on two groups of ranks (needs guidance with a negative prompt)
    ulysses: int = 1  # all-to-all between sequence and heads; must divide the number of heads
    ring: int = 1  # K/V passed around a ring, partial outputs merged by log-sum-exp
    ring_attention: str = "auto"  # LSE attention used by ring steps (see ring.lse_attention)
    # Head slices whose all-to-alls overlap the attention of the neighbouring slice (1: none).
    # Meant for higher degrees, where the exchange weighs more than at 2 GPUs (benchmarks/NOTES.md).
    ulysses_chunks: int = 2

    def __post_init__(self):
        for name in ("cfg", "ulysses", "ring"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel degree {name} must be a positive integer, got {v!r}")
        if self.cfg > 2:
            raise ValueError(
                f"cfg parallel degree must be 1 or 2 (one group for the conditional and one for the "
                f"unconditional branch), got {self.cfg}; put the other GPUs into ulysses/ring"
            )

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ranks sharing one DiT evaluation)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.sp

    def replace(self, **kw) -> ParallelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | ParallelConfig | None, world_size: int | None = None) -> ParallelConfig:
        """From our keys or LightX2V's `parallel` block.

        LightX2V: `cfg_p_size`, `seq_p_size`, `seq_p_attn_type` ('ulysses' | 'ring'); our
        extension for the hybrid: `seq_p_attn_type: 'ulysses_ring'` with `ulysses_p_size` and
        `ring_p_size` (or `ulysses`/`ring`). With an empty dict and a world size > 1, the whole
        world does Ulysses (the seed's default attention type).
        """
        if isinstance(d, ParallelConfig):
            return d
        d = dict(d or {})
        if int(d.get("tensor_p_size", 1)) != 1:
            raise ValueError("tensor parallel (tensor_p_size) is not supported; use cfg_p_size and seq_p_size")
        kind = str(d.get("seq_p_attn_type", "")).lower().replace("-", "_")
        if kind not in ("", "ulysses", "ring", "ulysses_ring", "usp"):
            raise ValueError(f"unknown seq_p_attn_type {kind!r}; use 'ulysses', 'ring' or 'ulysses_ring'")
        cfg_p = int(d.get("cfg_p_size", d.get("cfg", 1)))
        uly = d.get("ulysses_p_size", d.get("ulysses_degree", d.get("ulysses")))
        ring = d.get("ring_p_size", d.get("ring_degree", d.get("ring")))
        seq_p = d.get("seq_p_size")
        if seq_p is not None:
            seq_p = int(seq_p)
            if uly is None and ring is None:
                if kind in ("ulysses_ring", "usp"):
                    raise ValueError("seq_p_attn_type 'ulysses_ring' needs ulysses_p_size and ring_p_size")
                uly, ring = (1, seq_p) if kind == "ring" else (seq_p, 1)
            elif uly is None:
                uly = seq_p // int(ring)
            elif ring is None:
                ring = seq_p // int(uly)
            if int(uly) * int(ring) != seq_p:
                raise ValueError(f"ulysses ({uly}) x ring ({ring}) must equal seq_p_size ({seq_p})")
        uly, ring = int(uly or 1), int(ring or 1)
        if world_size is not None and world_size > 1 and cfg_p * uly * ring == 1 and not d:
            uly = world_size  # nothing said: all ranks do Ulysses, the seed's default attention type
        # Other LightX2V knobs (fp8 communication, a2a backends, ...) are accepted and ignored.
        extra = {k: d[k] for k in ("ring_attention", "ulysses_chunks") if k in d}
        return cls(cfg=cfg_p, ulysses=uly, ring=ring, **extra)

    def validate(self, world_size: int | None = None, num_heads: int | None = None) -> None:
        """Raise a ValueError that says what to change when the degrees cannot run."""
        if world_size is not None and self.world_size != world_size:
            raise ValueError(
                f"parallel degrees cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring} = {self.world_size} "
                f"processes, but the world has {world_size}; choose degrees whose product is {world_size}"
            )
        if num_heads is not None and num_heads % self.ulysses:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"the Ulysses degree ({self.ulysses}) must divide the number of attention heads ({num_heads}); "
                f"possible degrees: {divisors} (use ring for the rest)"
            )


@dataclass
class ParallelGroups:
    """This rank's place in the mesh and the communicators it uses."""

    config: ParallelConfig
    rank: int
    world_size: int
    cfg_rank: int  # 0: conditional branch, 1: unconditional
    sp_rank: int  # index of this rank's token chunk
    ulysses_rank: int
    ring_rank: int
    sp_group: Any = None
    ulysses_group: Any = None
    ring_group: Any = None
    cfg_group: Any = None
    ring_ranks: tuple[int, ...] = ()  # global ranks of this rank's ring, in ring order

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mesh_rank(c: int, r: int, u: int, pc: ParallelConfig) -> int:
    return (c * pc.ring + r) * pc.ulysses + u


def build_groups(config: ParallelConfig, num_heads: int | None = None) -> ParallelGroups:
    """Create the communicators of the mesh (every rank must call this, in the same order)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    config.validate(world, num_heads)
    pc = config
    c, rest = divmod(rank, pc.sp)
    r, u = divmod(rest, pc.ulysses)
    g = ParallelGroups(config=pc, rank=rank, world_size=world, cfg_rank=c, sp_rank=rest, ulysses_rank=u, ring_rank=r)
    # new_group is collective over the whole world: create every group on every rank.
    for cc in range(pc.cfg):
        ranks = [_mesh_rank(cc, rr, uu, pc) for rr in range(pc.ring) for uu in range(pc.ulysses)]
        grp = dist.new_group(ranks) if pc.sp > 1 else None
        if cc == c:
            g.sp_group = grp
        for rr in range(pc.ring):
            ranks = [_mesh_rank(cc, rr, uu, pc) for uu in range(pc.ulysses)]
            grp = dist.new_group(ranks) if pc.ulysses > 1 else None
            if (cc, rr) == (c, r):
                g.ulysses_group = grp
        for uu in range(pc.ulysses):
            ranks = [_mesh_rank(cc, rr, uu, pc) for rr in range(pc.ring)]
            grp = dist.new_group(ranks) if pc.ring > 1 else None
            if (cc, uu) == (c, u):
                g.ring_group, g.ring_ranks = grp, tuple(ranks)
    for rr in range(pc.ring):
        for uu in range(pc.ulysses):
            ranks = [_mesh_rank(cc, rr, uu, pc) for cc in range(pc.cfg)]
            grp = dist.new_group(ranks) if pc.cfg > 1 else None
            if (rr, uu) == (r, u):
                g.cfg_group = grp
    return g


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_s: float = 600.0,
) -> torch.device:
    """Join the world (torchrun's env:// by default) on NCCL for CUDA, gloo for the CPU.

    Returns this rank's device: `cuda:LOCAL_RANK` when CUDA is asked for (or available and no
    device is given), else the CPU. Idempotent when the process group already exists.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw: dict[str, Any] = dict(backend=default_backend(device), timeout=datetime.timedelta(seconds=timeout_s))
        if init_method is not None:
            kw["init_method"] = init_method
        if rank is not None:
            kw["rank"] = rank
        if world_size is not None:
            kw["world_size"] = world_size
        if device.type == "cuda":
            kw["device_id"] = device
        dist.init_process_group(**kw)
    return device
