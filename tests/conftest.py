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


@pytest.fixture(scope="session")
def tiny22(tmp_path_factory):
    """tiny22(task, layout) -> a tiny random Wan2.2 model folder (task 't2v' / 'i2v': the A14B experts,
    'ti2v': TI2V-5B), seed 3, written on first use and shared by the session's tests. All layouts of
    one task hold the same values (wan_core.loading.tiny_parts)."""
    from wan_core.loading.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny22")
    made: dict[tuple[str, str], str] = {}

    def get(task: str, layout: str = "wan") -> str:
        if (task, layout) not in made:
            made[task, layout] = write_tiny_model(root / f"{task}-{layout}", task, layout, seed=3, family="wan2.2")
        return made[task, layout]

    return get
