"""The seed's four variants (base, distill LoRA, merged distill model, distill + FP8) through the
CLI and the Python API on one tiny random T2V model, LightX2V config keys only.

The distill files are made from the base the way their publishers make them: a random LoRA
(written by `save_lora` in the lightx2v layout), the merged model (that LoRA merged into the base
with `apply_loras(keep_originals=False)`, written by `save_dit`), and the FP8 model (the merged
file through `convert_to_fp8`). Relations that would fail if a key were not wired:
- the LoRA run equals the merged-file run (same seed; the LoRA is merged in fp32 at run time);
- the plain distill run (no LoRA) differs from both, so neither key can be silently ignored;
- the FP8 run is close to the merged run (cosine >= 0.99 on the final latent) but not equal, and
  its DiT holds FP8 linears (the dequantizing kernel on a CPU);
- the base run (UniPC + CFG) differs from the LoRA run;
- the Python API gives bit-identical latents to the CLI for every variant;
- feature caching: threshold 0 is the uncached run exactly, a high threshold reports skips.
The final latent of a CLI run is read by wrapping `WanPipeline.sample` (the CLI only writes an mp4).
"""

from __future__ import annotations

import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from wan_core.cli import main
from wan_core.convert import convert_to_fp8
from wan_core.layers.fp8 import FP8Linear
from wan_core.layers.lora import apply_loras, lora_report
from wan_core.loading.dit import load_dit, save_dit
from wan_core.loading.lora import random_lora, save_lora
from wan_core.loading.tiny import tiny_dit_config, write_tiny_model
from wan_core.pipeline import WanPipeline

PROMPT = "a red fox running through the snowy forest"
SEED = 7
SIZE = dict(target_video_length=5, target_height=32, target_width=48)
BASE = dict(infer_steps=2, sample_guide_scale=5.0, sample_shift=5.0, enable_cfg=True, **SIZE)
# LightX2V's configs/distill/wan21/wan_t2v_distill_*_4step_cfg.json, tiny size
DISTILL = dict(infer_steps=4, sample_guide_scale=6, sample_shift=5, enable_cfg=False, cpu_offload=False,
               denoising_step_list=[1000, 750, 500, 250], **SIZE)  # fmt: skip
LORA = "distill_lora_rank4_lightx2v_4step.safetensors"
MERGED = "distill_lightx2v_4step.safetensors"
FP8 = "distill_scaled_fp8_e4m3_lightx2v_4step.safetensors"
# paths as LightX2V's configs write them (a Hugging Face repo folder): found by file name in the model folder
LORA_CONFIGS = [{"path": f"lightx2v/Wan2.1-Distill-Loras/{LORA}", "strength": 1.0}]
VARIANTS = {
    "base": ("wan2.1", BASE),
    "distill_plain": ("wan2.1_distill", DISTILL),
    "distill_lora": ("wan2.1_distill", {**DISTILL, "lora_configs": LORA_CONFIGS}),
    "distill_merged": ("wan2.1_distill", {**DISTILL, "dit_original_ckpt": f"lightx2v/Wan2.1-Distill-Models/{MERGED}"}),
    "distill_fp8": ("wan2.1_distill", {**DISTILL, "dit_quantized": True, "dit_quant_scheme": "fp8-sgl",
                                       "dit_quantized_ckpt": f"lightx2v/Wan2.1-Distill-Models/{FP8}"}),
    # feature caching on the base run: MagCache with the published T2V-14B table (2 steps: step 1 skippable)
    "base_mag0": ("wan2.1", {**BASE, "feature_caching": "Mag", "magcache_thresh": 0.0, "cache_model": "t2v-14b"}),
    "base_mag": ("wan2.1", {**BASE, "feature_caching": "Mag", "magcache_thresh": 0.24, "magcache_K": 6,
                            "magcache_retention_ratio": 0.2, "cache_model": "t2v-14b"}),
}  # fmt: skip


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    model = write_tiny_model(root / "Wan2.1-T2V-tiny", "t2v", "wan", seed=3)
    cfg = tiny_dit_config("t2v")
    lora = save_lora(random_lora(cfg, rank=4, seed=1, magnitude=0.1), os.path.join(model, LORA))
    dit = load_dit(model, dtype=torch.float32, device="cpu")
    apply_loras(dit, [(lora, 1.0)], mode="merge", keep_originals=False)
    merged = save_dit(dit.state_dict(), os.path.join(model, MERGED), "single", cfg=dit.cfg)
    fp8 = convert_to_fp8(merged, os.path.join(model, FP8), dtype=torch.float32)
    return SimpleNamespace(root=root, model=model, lora=lora, merged=merged, fp8=fp8)


class _Spy:
    """Wraps WanPipeline.sample to keep, per run, the final latent, the DiT used and the cache report."""

    def __init__(self):
        self.runs: list[SimpleNamespace] = []
        self._real = WanPipeline.sample

    def __call__(self, pipe, *args, **kwargs):
        latent = self._real(pipe, *args, **kwargs)
        self.runs.append(SimpleNamespace(latent=latent.clone(), dit=pipe.dit, cache=pipe.cache_report, spec=pipe.spec))
        return latent


def _cli(files, name: str, model_cls: str, config: dict, spy: _Spy) -> SimpleNamespace:
    cfg_path = files.root / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    out = files.root / f"{name}.mp4"
    n = len(spy.runs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["--model_cls", model_cls, "--task", "t2v", "--model_path", files.model, "--config_json", str(cfg_path),
                   "--prompt", PROMPT, "--seed", str(SEED), "--save_result_path", str(out), "--dtype", "fp32",
                   "--device", "cpu"])  # fmt: skip
    assert rc == 0, name
    assert len(spy.runs) == n + 1 and out.is_file()
    run = spy.runs[-1]
    run.warnings = " ".join(str(w.message) for w in caught)
    run.report = lora_report(run.dit)  # read now: the cached DiT changes with the next variant
    run.fp8 = [m.kernel for m in run.dit.modules() if isinstance(m, FP8Linear)]
    return run


@pytest.fixture(scope="module")
def cli_runs(files):
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WanPipeline, "sample", lambda pipe, *a, **k: spy(pipe, *a, **k))
        return {name: _cli(files, name, cls, cfg, spy) for name, (cls, cfg) in VARIANTS.items()}


def test_cli_four_variants(cli_runs):
    r = cli_runs
    lora, merged, fp8 = r["distill_lora"].latent, r["distill_merged"].latent, r["distill_fp8"].latent
    plain, base = r["distill_plain"].latent, r["base"].latent
    assert lora.shape == (1, 16, 2, 4, 6) and all(torch.isfinite(x.latent).all() for x in r.values())
    # the LoRA merged at run time = the merged file: bitwise the same weights (fp32, the same sums in the
    # same order); the runs differ by 2.4e-7 only because file-backed and fresh tensors are aligned
    # differently, which changes the CPU GEMM's summation blocking
    assert rel_err(lora, merged) <= 1e-5, rel_err(lora, merged)  # measured 2.4e-7
    # neither lora_configs nor dit_original_ckpt was ignored: without them the run is another one
    assert rel_err(plain, merged) > 0.05 and cosine(plain, merged) < 0.95  # measured 0.49, 0.87
    # FP8 of the merged model: close, not equal; its DiT runs FP8 linears (dequant kernel on a CPU)
    assert cosine(fp8, merged) >= 0.99, cosine(fp8, merged)  # measured 0.99990
    assert rel_err(fp8, merged) > 1e-4  # measured 1.4e-2: the e4m3 rounding is really there
    assert r["distill_fp8"].fp8 and set(r["distill_fp8"].fp8) == {"dequant"}
    assert "dit_quant_scheme='fp8-sgl' cannot run here" in r["distill_fp8"].warnings
    assert not r["distill_merged"].fp8 and not r["distill_lora"].fp8
    # base (UniPC + CFG, 2 steps) is another run
    assert rel_err(base, lora) > 0.05  # measured 0.61
    # what each run's DiT carried
    (summary,) = r["distill_lora"].report.loras
    assert summary.merged > 0 and summary.branched == 0 and summary.strength == 1.0
    assert len(r["distill_merged"].report) == 0 and len(r["distill_fp8"].report) == 0
    assert r["distill_lora"].spec.loras[0][0].endswith(os.path.join("Wan2.1-T2V-tiny", LORA))


def test_cli_feature_caching_keys(cli_runs):
    base, off, on = cli_runs["base"], cli_runs["base_mag0"], cli_runs["base_mag"]
    assert base.cache is None
    assert torch.equal(off.latent, base.latent)  # threshold 0: the uncached run, bit for bit
    assert off.cache.skipped_total == 0 and off.cache.evaluations == 4  # 2 steps x (cond, uncond)
    assert on.cache.skipped_total == 2 and on.cache.skipped == {"cond": [1], "uncond": [1]}
    assert torch.isfinite(on.latent).all() and not torch.equal(on.latent, base.latent)


def _api(files, model_cls="wan2.1_distill", enable=None, **params):
    pipe = WanPipeline(files.model, model_cls, "t2v", dtype="fp32", device="cpu")
    for method, kw in (enable or {}).items():
        getattr(pipe, method)(**kw)
    pipe.create_generator(**params)
    return pipe, pipe.generate(SEED, PROMPT, return_latent=True)


def test_python_api_equals_the_cli(files, cli_runs):
    r = cli_runs
    _, res = _api(files, "wan2.1", **BASE)
    assert torch.equal(res.latent, r["base"].latent)
    pipe, res = _api(files, enable={"enable_lora": {"lora_configs": LORA_CONFIGS}}, **DISTILL)
    assert torch.equal(res.latent, r["distill_lora"].latent)
    _, res = _api(files, dit_original_ckpt=MERGED, **DISTILL)
    assert torch.equal(res.latent, r["distill_merged"].latent)
    with pytest.warns(UserWarning, match="fp8-sgl"):
        _, res = _api(files, enable={"enable_quantize": {"dit_quantized": True, "dit_quantized_ckpt": FP8,
                                                          "quant_scheme": "fp8-sgl"}}, **DISTILL)  # fmt: skip
    assert torch.equal(res.latent, r["distill_fp8"].latent)
    # an FP8 file named as the plain DiT runs as FP8 too (its e4m3 codes mean nothing without their scales)
    pipe, res = _api(files, dit_original_ckpt=FP8, **DISTILL)
    assert torch.equal(res.latent, r["distill_fp8"].latent) and pipe.spec.fp8 is None
    # switch_lora: off and on again on the same base object, without reading it again
    pipe, _ = _api(files, lora_configs=LORA_CONFIGS, **DISTILL)
    dit = pipe.dit
    assert torch.equal(pipe.switch_lora("").generate(SEED, PROMPT, return_latent=True).latent, r["distill_plain"].latent)
    again = pipe.switch_lora(LORA, 1.0).generate(SEED, PROMPT, return_latent=True)
    assert pipe.dit is dit and torch.equal(again.latent, r["distill_lora"].latent)


def test_distill_lora_beside_fp8_linears(files, cli_runs):
    """LoRA on an FP8 model (LightX2V refuses it): the base bf16 DiT quantised on load, the LoRA as
    low-rank branches beside its FP8 linears; close to the merged model."""
    pipe, res = _api(files, lora_configs=LORA_CONFIGS, dit_quantized=True, dit_quant_scheme="dequant", **DISTILL)
    (summary,) = lora_report(pipe.dit).loras
    assert summary.branched > 0 and any(isinstance(m, FP8Linear) for m in pipe.dit.modules())
    assert cosine(res.latent, cli_runs["distill_merged"].latent) >= 0.99


def test_python_api_feature_caching(files, cli_runs):
    """TeaCache through create_generator keys (and enable_cache): threshold 0 = uncached, high threshold skips."""
    tea = dict(feature_caching="Tea", use_ret_steps=False, coefficients=[[0, 0, 0, 1, 0], [0, 0, 0, 1, 0]],
               teacache_end_step=100)  # fmt: skip
    _, res = _api(files, "wan2.1", **BASE, **tea, teacache_thresh=0.0)
    assert torch.equal(res.latent, cli_runs["base"].latent)
    assert res.cache == {**res.cache, "skipped": 0, "evaluations": 4}
    pipe, res = _api(files, "wan2.1", enable={"enable_cache": {"cache_method": "Tea", "teacache_thresh": 10.0,
                     "coefficients": tea["coefficients"]}}, **BASE, teacache_end_step=100)  # fmt: skip
    assert res.cache["skipped"] == 2 and "2 of 4 DiT evaluations skipped" in res.summary()
    assert torch.isfinite(res.latent).all()


def _error(files, config: dict, capsys, model_cls="wan2.1_distill") -> str:
    path = files.root / "bad.json"
    path.write_text(json.dumps(config))
    rc = main(["--model_cls", model_cls, "--model_path", files.model, "--config_json", str(path), "--dtype", "fp32",
               "--device", "cpu", "--save_result_path", str(files.root / "bad.mp4")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_variant_keys_give_clear_errors(files, capsys):
    err = _error(files, {**DISTILL, "lora_configs": [{"path": "nope.safetensors", "strength": 1.0}]}, capsys)
    assert "lora_configs[0].path: file not found: 'nope.safetensors'" in err
    err = _error(files, {**DISTILL, "lora_configs": [{"strength": 1.0}]}, capsys)
    assert "lora_configs[0] must be an object like" in err
    i2v_lora = save_lora(random_lora(tiny_dit_config("i2v"), rank=2, seed=2), files.root / "i2v_lora.safetensors")
    err = _error(files, {**DISTILL, "lora_configs": [{"path": i2v_lora, "strength": 1.0}]}, capsys)
    assert "k_img" in err and "image-to-video (I2V) LoRA on a text-to-video model" in err
    err = _error(files, {**DISTILL, "dit_quantized": True, "dit_quant_scheme": "int8-vllm"}, capsys)
    assert "int8-vllm" in err and "not supported" in err
    err = _error(files, {**BASE, "feature_caching": "TaylorSeer"}, capsys)
    assert "'TaylorSeer' (a LightX2V caching method) is not available yet" in err
    err = _error(files, {**BASE, "feature_caching": "Teacache"}, capsys)
    assert "'Teacache' is not a caching method" in err
    err = _error(files, {**BASE, "feature_caching": "Tea"}, capsys, model_cls="wan2.1")  # tiny model: no published fit
    assert "TeaCache needs 'coefficients'" in err and "calibrate-cache" in err
