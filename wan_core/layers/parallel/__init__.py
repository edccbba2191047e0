"""Several GPUs: sequence parallel (Ulysses, Ring, both), CFG parallel, and the worker group.

Layered onto a built model, never woven into `dit.py` (see apply.py); the sampling loop is
parallelised through its `predict` seam (cfg.py).
"""

from .apply import disable_sequence_parallel, enable_sequence_parallel
from .cfg import cfg_parallel_predict
from .group import ParallelConfig, ParallelGroups, build_groups, init_process_group
from .launch import DistributedRun, is_torchrun, parallel_sample, run_distributed_generate

__all__ = [
    "ParallelConfig",
    "ParallelGroups",
    "build_groups",
    "init_process_group",
    "enable_sequence_parallel",
    "disable_sequence_parallel",
    "cfg_parallel_predict",
    "parallel_sample",
    "DistributedRun",
    "run_distributed_generate",
    "is_torchrun",
]
