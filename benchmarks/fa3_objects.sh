#!/usr/bin/env bash
# Build FlashAttention-3's Hopper forward kernels (head dim 128, bf16 and e4m3, no backward,
# split, paged KV, softcap, local, varlen, cluster) as object files on a machine WITHOUT a GPU,
# for the device machines, whose image has no flash_attn_3 and which can fetch nothing.
# Nothing built here is committed: the objects go to .fa3/ (git-ignored), with an install.sh
# that links them against the device's torch and CUDA runtime into /tmp/site
# (benchmarks/device_batch.sh runs it when .fa3 is carried).
#
# Needs: a flash-attention checkout (FA_DIR, its hopper/ sources) and the CUTLASS commit its
# csrc/cutlass submodule names (CUTLASS_DIR), g++, and this project's venv (torch headers: the
# API file uses torch's stable ABI, targeting torch >= 2.9, so newer headers serve an older torch).
# nvcc 13.0 (the device's CUDA) comes from pip. Measured on the 2-core CPU machine: ~2 min per
# kernel file, 5 GB RAM each; the two run in parallel.
#
#   FA_DIR=/path/flash-attention CUTLASS_DIR=/path/cutlass bash benchmarks/fa3_objects.sh
# Used 2026-11-26: flash-attention 0251105a (hopper/), CUTLASS 71275920 (its submodule commit).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
FA_DIR=${FA_DIR:?set FA_DIR to a flash-attention checkout}
CUTLASS_DIR=${CUTLASS_DIR:?set CUTLASS_DIR to the CUTLASS checkout of FA_DIR/csrc/cutlass}
PY=${PY:-$repo/.venv/bin/python}
CUDA=${CUDA:-/tmp/cuda13}
out=$repo/.fa3
if [ ! -x "$CUDA/nvidia/cu13/bin/nvcc" ]; then
  "$PY" -m pip install -q --target "$CUDA" --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
fi
cu=$CUDA/nvidia/cu13
src=$FA_DIR/hopper
mkdir -p "$out/obj" "$out/site/flash_attn_3"
feat=()
for f in BACKWARD PAGEDKV SPLIT APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER HDIM64 HDIM96 HDIM192 HDIM256 SM8x; do
  feat+=("-DFLASHATTENTION_DISABLE_$f")
done
feat+=(-DFLASH_ATTENTION_DISABLE_HDIMDIFF64 -DFLASH_ATTENTION_DISABLE_HDIMDIFF192)
inc=(-I"$src" -I"$CUTLASS_DIR/include" -I"$cu/include")
nvcc_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC --threads 1 -O3 -std=c++17
  --ftemplate-backtrace-limit=0 --use_fast_math --resource-usage
  -lineinfo -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0
  -DNDEBUG -gencode arch=compute_90a,code=sm_90a)
for f in instantiations/flash_fwd_hdim128_bf16_sm90.cu instantiations/flash_fwd_hdim128_e4m3_sm90.cu flash_prepare_scheduler.cu; do
  (cd "$src" && "$cu/bin/nvcc" -c "$f" -o "$out/obj/$(basename "$f" .cu).o" "${inc[@]}" -I"$cu/include/cccl" "${nvcc_flags[@]}" "${feat[@]}") &
done
torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# shellcheck disable=SC2086
(cd "$src" && g++ -c flash_api_stable.cpp -o "$out/obj/flash_api_stable.o" -fPIC -O3 -std=c++17 -DPy_LIMITED_API=0x03090000 \
  -DTORCH_TARGET_VERSION=0x0209000000000000 -DTORCH_EXTENSION_NAME=_C "${feat[@]}" "${inc[@]}" $torch_inc -I"$py_inc")
wait
cp "$src/flash_attn_3/__init__.py" "$out/site/flash_attn_3/"
cp "$src/flash_attn_interface.py" "$out/site/"
"$PY" - "$out/site/flash_attn_config.py" <<'EOF'
import sys
off = ("BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER HDIM64 HDIM96 HDIM192 HDIM256 SM8x").split()
flags = {f"FLASHATTENTION_DISABLE_{f}": True for f in off}
flags.update(FLASHATTENTION_DISABLE_FP8=False, FLASHATTENTION_DISABLE_HDIM128=False, FLASHATTENTION_ENABLE_VCOLMAJOR=False,
             FLASH_ATTENTION_DISABLE_HDIMDIFF64=True, FLASH_ATTENTION_DISABLE_HDIMDIFF192=True)
open(sys.argv[1], "w").write(f"CONFIG = {{'build_flags': {flags!r}}}\n")
EOF
cat > "$out/install.sh" <<'EOF'
#!/bin/bash
# Link the FlashAttention-3 objects against this machine's torch and CUDA runtime, into /tmp/site.
set -e
here=$(cd "$(dirname "$0")" && pwd)
TL=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
CUDART=$(python3 -c "import glob, os, torch; d=os.path.dirname(os.path.dirname(torch.__file__)); print((glob.glob(d+'/nvidia/cu13/lib/libcudart.so*') + glob.glob(d+'/nvidia/cuda_runtime/lib/libcudart.so*') + glob.glob('/usr/local/cuda/lib64/libcudart.so*'))[0])")
mkdir -p /tmp/site
cp -r "$here"/site/* /tmp/site/
g++ -shared -o /tmp/site/flash_attn_3/_C.abi3.so "$here"/obj/*.o -L"$TL" -ltorch -ltorch_cpu -ltorch_cuda -lc10 -lc10_cuda \
  "$CUDART" -Wl,-rpath,"$TL" -Wl,-rpath,"$(dirname "$CUDART")"
echo "linked flash_attn_3 against $TL and $CUDART"
EOF
chmod +x "$out/install.sh"
grep -qx '/.fa3/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.fa3/' >> "$repo/.git/info/exclude"
ls -la "$out/obj"
