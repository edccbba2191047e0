"""LightX2V's `enable_*` calls of `WanPipeline`: each records config keys for the next
`create_generator` (keywords given there win), so a LightX2V script runs unchanged."""

from __future__ import annotations

__all__ = ["LightX2VCalls"]


class LightX2VCalls:
    """The `enable_lora` / `enable_quantize` / `enable_cache` / `enable_offload` / `enable_parallel`
    calls, writing into `self._enabled` (a dict the pipeline's `create_generator` reads)."""

    _enabled: dict

    def enable_lora(self, lora_configs: list[dict], lora_dynamic_apply: bool = False) -> LightX2VCalls:
        """LoRAs for the next `create_generator` ([{"path", "strength"}]; dynamic: low-rank branches, not merged)."""
        self._enabled.update(lora_configs=list(lora_configs), lora_dynamic_apply=bool(lora_dynamic_apply))
        return self

    def enable_quantize(
        self,
        dit_quantized: bool = False,
        dit_quantized_ckpt: str | None = None,
        quant_scheme: str = "fp8-sgl",
        text_encoder_quantized: bool = False,
        image_encoder_quantized: bool = False,
        **_other_ckpts,
    ) -> LightX2VCalls:
        """FP8 DiT for the next `create_generator` (T5/CLIP quantisation is not available: refused at check)."""
        self._enabled.update(dit_quantized=dit_quantized, dit_quantized_ckpt=dit_quantized_ckpt, dit_quant_scheme=quant_scheme)
        if text_encoder_quantized:
            self._enabled["t5_quantized"] = True
        if image_encoder_quantized:
            self._enabled["clip_quantized"] = True
        return self

    def enable_cache(
        self,
        cache_method: str = "Tea",
        coefficients: list | None = None,
        teacache_thresh: float = 0.15,
        use_ret_steps: bool = False,
        magcache_calibration: bool = False,
        magcache_K: int = 6,
        magcache_thresh: float = 0.24,
        magcache_retention_ratio: float = 0.2,
        magcache_ratios: list | None = None,
    ) -> LightX2VCalls:
        """Feature caching for the next `create_generator` (LightX2V's defaults; see `wan_core.layers.cache`)."""
        self._enabled["feature_caching"] = cache_method
        if cache_method == "Tea":
            self._enabled.update(coefficients=coefficients or [], teacache_thresh=teacache_thresh, use_ret_steps=use_ret_steps)
        elif cache_method == "Mag":
            self._enabled.update(
                magcache_calibration=magcache_calibration, magcache_K=magcache_K, magcache_thresh=magcache_thresh,
                magcache_retention_ratio=magcache_retention_ratio, magcache_ratios=magcache_ratios or [],
            )  # fmt: skip
        return self

    def enable_offload(
        self,
        cpu_offload: bool = False,
        offload_granularity: str = "block",
        text_encoder_offload: bool = False,
        image_encoder_offload: bool = False,
        vae_offload: bool = False,
        vram_budget_gb: float | None = None,
        resident_blocks: int | None = None,
        prefetch: int = 1,
    ) -> LightX2VCalls:
        """CPU offload for the next `create_generator` (LightX2V's arguments; ours: the VRAM budget, the
        blocks kept on the GPU for good, the blocks copied ahead). See `wan_core.layers.offload`."""
        self._enabled.update(
            cpu_offload=cpu_offload, offload_granularity=offload_granularity, t5_cpu_offload=text_encoder_offload,
            clip_cpu_offload=image_encoder_offload, vae_cpu_offload=vae_offload, offload_prefetch=prefetch,
        )  # fmt: skip
        if vram_budget_gb is not None:
            self._enabled["vram_budget_gb"] = vram_budget_gb
        if resident_blocks is not None:
            self._enabled["offload_resident_blocks"] = resident_blocks
        return self

    def enable_parallel(self, cfg_p_size: int = 1, seq_p_size: int = 1, seq_p_attn_type: str = "ulysses") -> LightX2VCalls:
        """Parallel degrees for the next `create_generator` (the process must run under torchrun)."""
        self._enabled["parallel"] = {"cfg_p_size": cfg_p_size, "seq_p_size": seq_p_size, "seq_p_attn_type": seq_p_attn_type}
        return self
