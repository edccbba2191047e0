"""What the Triton kernel tests share: running a script in Triton's interpreter (a CPU subprocess,
with `triton_interp`'s fixes imported first by the script) and compiling a kernel to an sm_90
cubin on this GPU-less machine (what only the compiler rejects fails here, not on the GPU)."""

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _triton_unusable() -> str | None:
    """Why the Triton tests cannot run here (None: they can). triton_interp.py patches two internals of
    Triton's interpreter (as of triton 3.6); another triton (a CUDA torch's own) may lack them."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    import triton
    from triton.runtime import interpreter

    missing = [n for n in ("_convert_float", "_patch_lang_tensor") if not hasattr(interpreter, n)]
    if missing:
        return (
            f"triton {triton.__version__}'s interpreter has no {', '.join(missing)}, which tests/triton_interp.py "
            "patches (written for triton 3.6; CI installs triton==3.6.0)"
        )
    return None


_WHY = _triton_unusable()
needs_triton = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def run_interpreted(script: str):
    """Run `script` (its `{tests}` and `{root}` filled in for its sys.path) with TRITON_INTERPRET=1;
    returns the JSON of its last output line."""
    code = script.format(tests=os.path.join(ROOT, "tests"), root=ROOT)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_for_hopper(fn, sig: dict, constexprs: dict, num_warps: int, num_stages: int | None = None):
    """`fn` compiled for sm_90 with argument types `sig` and the constexpr values `constexprs`
    (`num_stages`: the software pipeline's depth, Triton's default when None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Parameters left out that have a default (e.g. an optional pointer `q_ptr=None`) are passed as
    # constexprs with that default: newer triton (3.8) needs every parameter in the signature.
    params = inspect.signature(fn.fn).parameters
    constexprs = dict(constexprs)
    for name, p in params.items():
        if name not in sig and name not in constexprs and p.default is not inspect.Parameter.empty:
            constexprs[name] = p.default
    src = ASTSource(fn=fn, signature=dict(sig, **{k: "constexpr" for k in constexprs}), constexprs=constexprs)
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages is not None else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
