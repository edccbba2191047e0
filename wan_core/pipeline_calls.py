"""LightX2V's `enable_*` calls of `WanPipeline`: each records config keys for the next
`create_generator` (keywords given there win), so a LightX2V script runs unchanged; and its
`switch_lora` after it (one model, or each Wan2.2 A14B expert its own, as LightX2V's
`Wan22MoeDistillRunner.switch_lora(high_lora_path, high_lora_strength, low_lora_path, low_lora_strength)`)."""

from __future__ import annotations

from .model_cache import lease
from .wan22 import EXPERT_NAMES

__all__ = ["LightX2VCalls"]


class LightX2VCalls:
    """The `enable_lora` / `enable_quantize` / `enable_cache` / `enable_offload` / `enable_parallel`
    calls, writing into `self._enabled` (a dict the pipeline's `create_generator` reads), and
    `switch_lora` on the built pipeline."""

    _enabled: dict

    def switch_lora(
        self,
        lora_path: str | None = None,
        strength: float = 1.0,
        low_lora_path: str | None = None,
        low_lora_strength: float = 1.0,
        *,
        high_lora_path: str | None = None,
        high_lora_strength: float | None = None,
    ) -> LightX2VCalls:
        """Replace LoRAs after `create_generator`; the base weights are not read again.

        One model: `switch_lora(path, strength)`, '' removes the LoRAs. Two experts (Wan2.2 A14B):
        LightX2V's order, `switch_lora(high_lora_path, high_lora_strength, low_lora_path,
        low_lora_strength)` (keywords `high_lora_path=` / `high_lora_strength=` also work); each
        expert's LoRA is replaced by its own path, '' removes it, None leaves it as it is."""
        if high_lora_path is not None:
            if lora_path is not None:
                raise ValueError("give the high-noise LoRA once: lora_path or high_lora_path, not both")
            lora_path = high_lora_path
        strength = strength if high_lora_strength is None else high_lora_strength
        spec = self._need_spec()
        if self.spec_low is None:
            if low_lora_path is not None:
                raise ValueError(f"low_lora_path is for the two-expert Wan2.2 A14B models, not {self.model_cls}")
            if lora_path is None:
                raise ValueError("switch_lora needs a lora_path ('' removes the LoRAs)")
        elif lora_path is None and low_lora_path is None:
            raise ValueError("switch_lora needs high_lora_path and/or low_lora_path ('' removes that expert's LoRA)")

        def loras(path, st, current, what):
            if path is None:
                return current
            return ((self._find_file(path, ("loras",), what), float(st)),) if path else ()

        self.spec = spec.replace(loras=loras(lora_path, strength, spec.loras, "high_lora_path" if self.spec_low else "lora_path"))
        if self.spec_low is not None:
            self.spec_low = self.spec_low.replace(loras=loras(low_lora_path, low_lora_strength, self.spec_low.loras, "low_lora_path"))
        named = [("high", self.spec), ("low", self.spec_low)] if self.spec_low is not None else [(None, self.spec)]
        self.config.lora_configs = [
            {**({"name": EXPERT_NAMES[e]} if e else {}), "path": p, "strength": st} for e, s in named for p, st in s.loras
        ]
        with lease(self.spec) as dit:  # the LoRA files parsed and applied now: a bad file fails here
            self.dit = dit
        if self.spec_low is not None:
            with lease(self.spec_low) as dit:
                self.dit_low = dit
        return self

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
