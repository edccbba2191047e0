"""One multi-process run: join the world, parallelise a model, sample, leave.

Used under `torchrun` by the CLI (`run_distributed_generate`) and from Python (the ComfyUI
node's persistent worker group, `workers.py`, keeps its own processes). Every rank runs the same
program on the same inputs (seeded CPU noise makes them identical); after each step all ranks
hold the same latent, so the main rank alone decodes and writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ...sampling.denoise import denoise
from ...sampling.first_frame import FirstFrame
from ...sampling.loop import Cond, StepInfo, guided_velocity
from .apply import enable_sequence_parallel
from .cfg import cfg_parallel_predict
from .group import ParallelConfig, ParallelGroups, build_groups, init_process_group

__all__ = ["DistributedRun", "parallel_sample", "run_distributed_generate", "is_torchrun"]

T = TypeVar("T")


def is_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def parallel_sample(
    model,
    noise: torch.Tensor,
    scheduler,
    cond: Cond,
    uncond: Cond | None,
    guidance: float,
    groups: ParallelGroups,
    callback: Callable[[StepInfo], None] | None = None,
    base_predict: Callable | None = None,
    first_frame: FirstFrame | None = None,
) -> torch.Tensor:
    """The denoising stage (`wan_core.sampling.denoise`: offloaded DiT loaded for the loop, OOM
    advice) with CFG parallel; `model` (a DiT, or Wan2.2 `Experts`: each of the two) must already
    be parallelised (`enable_sequence_parallel`) for the groups' sequence degree. Returns the
    same latent on every rank."""
    predict = cfg_parallel_predict(groups, base_predict or guided_velocity)
    return denoise(model, noise, scheduler, cond, uncond, guidance, callback=callback, predict=predict,
                   first_frame=first_frame)[0]  # fmt: skip


@dataclass
class DistributedRun:
    """This process's share of a multi-GPU run."""

    groups: ParallelGroups
    device: torch.device

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    @property
    def is_main(self) -> bool:
        return self.groups.is_main

    @classmethod
    def from_env(cls, parallel: ParallelConfig | dict | None = None, device: str | torch.device | None = None) -> DistributedRun:
        """Join the torchrun world (env://) and build the mesh; `parallel` as LightX2V's
        `parallel` block or a ParallelConfig (nothing: Ulysses over all ranks)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        pc = ParallelConfig.from_dict(parallel, world_size=world)
        pc.validate(world_size=world)  # before any rendezvous: a bad choice fails on every rank at once
        dev = init_process_group(device)
        return cls(build_groups(pc), dev)

    def prepare(self, model):
        """Layer sequence parallel onto a built model (a no-op at sequence degree 1)."""
        return enable_sequence_parallel(model, self.groups)

    @property
    def predict(self) -> Callable:
        """The `predict` to give `wan_core.sampling.loop.sample` (CFG parallel when cfg degree is 2)."""
        return cfg_parallel_predict(self.groups)

    def predict_with(self, base: Callable) -> Callable:
        """`predict` built over another one-process predict (e.g. `cache.guided_velocity_branches`)."""
        return cfg_parallel_predict(self.groups, base)

    def sample(self, model, noise, scheduler, cond, uncond=None, guidance=5.0, callback=None) -> torch.Tensor:
        return parallel_sample(model, noise, scheduler, cond, uncond, guidance, self.groups, callback)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed_generate(
    generate: Callable[[DistributedRun], T],
    parallel: ParallelConfig | dict | None = None,
    device: str | torch.device | None = None,
) -> T:
    """Run `generate(run)` on every rank of a torchrun world, then leave it cleanly.

    `generate` loads the models on `run.device`, calls `run.prepare(dit)`, samples with
    `predict=run.predict` (or `run.sample`), and decodes/writes only where `run.is_main`.
    An error on one rank is raised there; torchrun then stops the others.
    """
    run = DistributedRun.from_env(parallel, device)
    try:
        result = generate(run)
        run.barrier()  # nobody leaves (and tears the communicators down) while another still writes
        return result
    finally:
        run.close()

