"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two tiny random LoRA files for the tiny T2V DiT (wan_core.loading.tiny): one on every linear, one
    on the blocks only in kohya naming."""
    from wan_core.loading.lora import random_lora, save_lora
    from wan_core.loading.tiny import tiny_dit_config

    root = tmp_path_factory.mktemp("loras")
    cfg = tiny_dit_config("t2v")
    return (
        save_lora(random_lora(cfg, rank=4, seed=1, magnitude=0.1), root / "a.safetensors"),
        save_lora(random_lora(cfg, rank=2, seed=2, targets="blocks", magnitude=0.1), root / "b.safetensors", layout="kohya"),
    )
