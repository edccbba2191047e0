"""Kernels and their launchers: the attention backends' table, the Triton passes (fused block ops,
8-bit attention, FP8 row quantisation, the VAE's per-pixel work) and FlashAttention-3 glue. Each
has a torch implementation of the same math for devices without Triton/CUDA (and for tests)."""
