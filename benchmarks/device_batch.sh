#!/usr/bin/env bash
# One device call, several steps, each under its own timeout, logs teed to $OUT (the device tool
# brings $OUT back). Carry .whl (diffusers), .whl2 (PyAV, for e2e), .whl3 (ftfy, which the engine imports)
# and .carry (ComfyUI, for dit) as the steps need (see README.md here). Usage, as the device command:
#   bash benchmarks/device_batch.sh gpu-tests attention-quick dit-fast e2e-fast
# Steps and their wall time on one H100:
#   gpu-tests        pytest -m gpu: 8-bit attention, FP8, offload                       ~3 min
#   attention-quick  bench_attention.py --quick (kernel variants, writes sage_options)   ~2 min
#   dit-fast         bench_dit.py 480p: ComfyUI vs ours bf16 vs fast (uses sage_options) ~2.5 min
#   fused-tests      pytest -m gpu tests/test_fused_gpu.py                              ~1 min
#   dit-fused        bench_dit.py 480p: ComfyUI vs $DIT_VARIANTS (bf16,fast,fp8)     ~3 min
#   dit-720          bench_dit.py 720p, ours bf16 compiled (no peer)                    ~2 min
#   e2e-fast         bench_e2e.py $E2E_VARIANTS (fast,fast-offload,fp8-offload), one timed run
#                    each, per x264 preset in $E2E_PRESETS (medium); $E2E_ARGS more flags
#                    (e.g. "--task i2v", "--steps 50 --cache Mag")                      ~5 min
#   vae              bench_vae.py: VAE decode/encode, ours vs ComfyUI and diffusers     ~2 min
#   vae-stage        bench_vae_stage.py: pipeline.decode + mp4 writer, staged vs pinned ~1 min
#   profile          profile_dit.py fast,bf16                                           ~2 min
#   radial-tests     pytest -m gpu: the radial kernels and backend, the 8-bit ones     ~1.5 min
#   radial-kernel    bench_radial_kernel.py: the sparse kernel alone vs the dense 8-bit ones ~3 min
#   radial-720       bench_dit.py 720p: fast mode dense (FA3 e4m3) vs radial, compiled    ~2 min
#                    (or $RADIAL720_VARIANTS, e.g. "fast@radial_attn+tile128x128w8s3", ~45 s each)
#   profile-720      profile_dit.py --res 720p: radial vs dense fast mode, per kernel group ~2 min
#   wan22            bench_wan22.py $WAN22_PARTS (forward5b,vae22,a14b,ti2v): TI2V-5B forward and
#                    Wan2.2 VAE vs ComfyUI, whole A14B 4-step and TI2V-5B runs (carry .whl2) ~8 min
set -u
export OUT="${OUT:-$PWD/out}"  # the scripts write their JSON (and e2e its mp4) there
mkdir -p "$OUT"
wheels=(); for d in .whl .whl2 .whl3; do [ -d "$d" ] && wheels+=("$d"/*.whl); done
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${wheels[@]}" 2>/dev/null
fi
# FlashAttention-3 objects carried in .fa3 (built on a CPU machine; see benchmarks/README.md): link them
[ -x .fa3/install.sh ] && bash .fa3/install.sh | tail -1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
opts="$OUT/sage_options.json"
[ -f "$opts" ] || cp benchmarks/results/sage_options_h100.json "$opts"
for step in "$@"; do
  echo "=== $step"
  case "$step" in
    gpu-tests) timeout 300 python3 -m pytest -p no:cacheprovider -m gpu -q --tb=short \
                 tests/test_fused_gpu.py tests/test_sage_gpu.py tests/test_fp8_gpu.py tests/test_offload_gpu.py tests/test_fa3_gpu.py \
                 tests/test_vae.py tests/test_pipeline.py tests/test_radial_attention.py tests/test_radial_fp8.py tests/test_wan22_dit.py tests/test_vae22.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    attention-quick) timeout 240 python3 benchmarks/bench_attention.py --quick 2>&1 \
                 | tee "$OUT/bench_attention_quick.log" | grep -v "^{'res'" | tail -8 ;;
    dit-fast) timeout 300 python3 benchmarks/bench_dit.py --res 480p --peers comfy --ours "" \
                 --compile --compiled bf16,fast,fast-accum --sage-options "$opts" 2>&1 | tee "$OUT/bench_dit_fast.log" | grep -v -i warn | tail -8 ;;
    dit-fused) timeout 420 python3 benchmarks/bench_dit.py --res 480p --peers comfy --ours "" \
                 --compile --compiled ${DIT_VARIANTS:-bf16,fast,fp8} --sage-options "$opts" 2>&1 | tee "$OUT/bench_dit_fused.log" | grep -v -i warn | tail -10 ;;
    dit-720) timeout 300 python3 benchmarks/bench_dit.py --res 720p --peers "" --ours "" --compile --compiled ${DIT720_VARIANTS:-bf16} \
                 --sage-options "$opts" 2>&1 | tee "$OUT/bench_dit_720.log" | grep -v -i warn | tail -4 ;;
    fused-tests) timeout 300 python3 -m pytest -p no:cacheprovider -m gpu -q --tb=short tests/test_fused_gpu.py tests/test_sage_gpu.py tests/test_fp8_gpu.py tests/test_offload_gpu.py 2>&1 \
                 | tee "$OUT/fused_tests.log" | tail -15 ;;
    e2e-fast) timeout 420 python3 benchmarks/bench_e2e.py --variants ${E2E_VARIANTS:-fast,fast-offload,fp8-offload} --runs 1 --size ${E2E_SIZE:-480x832} \
                 --presets ${E2E_PRESETS:-medium} --t5 ${E2E_T5:-host} ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e_fast.log" | grep -v -i warn | tail -5; rm -f "$OUT"/*.mp4 ;;
    vae) timeout 240 python3 benchmarks/bench_vae.py 2>&1 | tee "$OUT/bench_vae.log" | tail -8 ;;
    vae-stage) timeout 200 python3 benchmarks/bench_vae_stage.py 2>&1 | tee "$OUT/bench_vae_stage.log" | tail -8 ;;
    profile) timeout 240 python3 benchmarks/profile_dit.py --variants fast,bf16 2>&1 | tee "$OUT/profile_dit.log" | grep -v -i warn | tail -30 ;;
    radial-tests) timeout 300 python3 -m pytest -p no:cacheprovider -m gpu -q --tb=short tests/test_radial_fp8.py \
                 tests/test_radial_attention.py tests/test_sage_gpu.py 2>&1 | tee "$OUT/gpu_tests_radial.log" | tail -4 ;;
    radial-kernel) timeout 300 python3 benchmarks/bench_radial_kernel.py 2>&1 | tee "$OUT/bench_radial_kernel.log" | grep -v -i warn | tail -30 ;;
    radial-720) timeout 300 python3 benchmarks/bench_dit.py --res 720p --peers "" --ours "" --compile \
                 --compiled ${RADIAL720_VARIANTS:-fast@fa3_fp8,fast@radial_attn} 2>&1 | tee "$OUT/bench_dit_radial720.log" | grep -v -i warn | tail -16 ;;
    profile-720) timeout 300 python3 benchmarks/profile_dit.py --res 720p --variants fast@radial_attn,fast@fa3_fp8 2>&1 \
                 | tee "$OUT/profile_dit_720.log" | grep -v -i warn | tail -50 ;;
    wan22) timeout 560 python3 benchmarks/bench_wan22.py --parts ${WAN22_PARTS:-forward5b,vae22,a14b,ti2v} 2>&1 \
                 | tee "$OUT/bench_wan22.log" | grep -v -i warn | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
