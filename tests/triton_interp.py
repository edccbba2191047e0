"""Run Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1), with two fixes
to the interpreter of triton 3.6 so that it computes what the GPU computes:

- float conversions to/from float8 e4m3 are done by torch (the interpreter's own drops the carry
  when rounding crosses a power of two: 125.5 -> 64 instead of 128);
- a runtime loop bound (`range(start, end)` over kernel arguments) is a 1-element array there,
  which numpy >= 2.4 refuses to turn into an int;
- `tl.dot` of bfloat16 operands multiplies their raw 16-bit patterns as integers there (bf16 is
  stored as uint16); they are widened to float32 first (exact: a bf16 product fits a float32,
  and the GPU accumulates in float32).

Import this module before any `triton.jit` kernel is defined, in a process started with
TRITON_INTERPRET=1 (the tests run such a process with subprocess).
"""

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

for _name in ("_convert_float", "_patch_lang_tensor"):
    if not hasattr(interpreter, _name):  # the tests skip before this (tests/triton_tools.py)
        raise ImportError(f"triton {triton.__version__}: its interpreter has no {_name} to patch (written for triton 3.6)")

_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8e4nv": torch.float8_e4m3fn}
_convert_float = interpreter._convert_float


def _convert_float_torch(input, input_dtype, output_dtype, rounding_mode):
    src, dst = _TORCH.get(input_dtype.name), _TORCH.get(output_dtype.name)
    if src is None or dst is None:
        return _convert_float(input, input_dtype, output_dtype, rounding_mode)
    raw = torch.from_numpy(np.ascontiguousarray(input).reshape(-1).view(np.uint8).copy())
    out = raw.view(src).to(dst)  # round to nearest even, as the GPU's cvt.rn
    return out.view(torch.uint8).numpy().view(f"uint{output_dtype.primitive_bitwidth}").reshape(input.shape)


interpreter._convert_float = _convert_float_torch
_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_with_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_with_index
_create_dot = interpreter.InterpreterBuilder.create_dot


def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
    def widened(x):
        if x.dtype.scalar == tl.bfloat16:
            data = _convert_float_torch(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return x

    return _create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)


interpreter.InterpreterBuilder.create_dot = _create_dot_bf16
