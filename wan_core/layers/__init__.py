"""Optional features applied to a built model: FP8 linears, compile, LoRA, offload, sequence
parallel and feature caching."""
