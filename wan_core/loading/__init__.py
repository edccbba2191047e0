"""Checkpoint loading: file I/O (`io`) and, per model, the key maps from every layout users
bring (official Wan names, ComfyUI prefixes, diffusers names, transformers names) onto our
module names, which are the official checkpoint names."""

from .io import CheckpointError, expand_paths, read_keys, read_metadata, read_state_dict

__all__ = ["CheckpointError", "expand_paths", "read_keys", "read_metadata", "read_state_dict"]
