"""Sampling: the flow-matching schedulers, the (guided) denoising loop and the denoising stage
every door runs (`denoise`)."""
