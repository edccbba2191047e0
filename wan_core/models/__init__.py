"""The plain model math, module and parameter names as in the official checkpoints: the Wan DiT,
the video VAE, the umT5 text encoder, the CLIP image encoder and the I2V conditioning. Optional
features (FP8, LoRA, offload, ...) are applied to these afterwards by `wan_core.layers`."""
