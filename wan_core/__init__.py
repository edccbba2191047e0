"""wan_core: a self-contained Wan2.1 T2V / I2V inference engine (see README.md).

The public entry points are imported lazily, so `import wan_core` stays cheap.
"""

_EXPORTS = {
    "WanPipeline": "pipeline",
    "GenerationResult": "pipeline",
    "GenerationConfig": "options",
    "FeatureNotAvailable": "options",
    "ModelSpec": "spec",
    "write_tiny_model": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'wan_core' has no attribute {name!r}")
