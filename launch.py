"""The launch plumbing that the Triton kernels of kernels.py and attention.py share, and the rules
of precision and accuracy that every kernel follows.

Launching. Both files launch every kernel through `run`, allocate every buffer a kernel fills with
`new_output`, and read their block sizes from the one table CONFIGS, so that aot.py can record and
compile exactly the launches the wrappers make (it swaps a recorder in for `run`) and the tests can
poison every output with NaN (they swap `new_output`). Calling these through the module, as
`launch.run(...)`, is what makes those swaps reach every launch.

Optional operands. A kernel with a fused epilogue that may be off (the residual to add, the
pre-activation saved for GELU's backward, the k and v outputs that only the qkv projection has)
takes its pointer anyway, and a constexpr flag (RESIDUAL, GELU, QKV) says whether it is used. When
the flag is off the wrapper passes a dummy: another tensor of the same launch, usually the output.
The flag compiles every access to it away, so the dummy is never read or written, and every
variant of a kernel keeps one signature, which aot.py records and compiles alike.

Precision. Kernels load any of fp32, bf16, fp16, compute statistics, softmax and every
accumulation in fp32, and store in the input's dtype. On a GPU, tl.dot of two fp32 tiles runs on
the tensor cores in tf32 (10-bit mantissa) unless input_precision says otherwise. dot_precision
follows PyTorch's own switch: fp32 dots are "tf32x3" under torch's default float32 matmul
precision "highest" (three tf32 tensor-core products per dot, about fp32 accuracy, not
bit-identical to the reference), and "tf32" after torch.set_float32_matmul_precision("high") or
("medium"). bf16 and fp16 tiles use the tensor cores either way.

Autocast. Under torch.autocast the matmul ops (linear, qkv, attention) cast their activations to
the autocast dtype, as autocast does for F.linear; the *parameters* are cast tile by tile inside
the kernels, so no bf16 copy of a super weight is ever made, and their gradients come back in the
parameters' own dtype. A fused residual keeps its dtype (fp32 residual + bf16 branch -> fp32, as
the reference's type promotion). LayerNorm computes in fp32 and returns its input's dtype.

Accuracy: what the tests and bench_cuda.py hold every kernel to, output and every gradient, as
the largest error against the PyTorch reference run in fp32 on the same values (`error_bound`).
In fp32, FP32_TOLERANCE of the reference's largest magnitude. In bf16 and fp16, FlashAttention's
rule: at most LOW_PRECISION_FACTOR times the error of the PyTorch reference itself run in that
dtype under autocast, so a kernel may differ from PyTorch's rounding but may not round more.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on a CPU; the end of this file makes
its arithmetic the GPU's where the two differ.
"""
import numpy as np
import torch
import triton
import triton.language as tl

# Every launch's block sizes, warps and stages, by kernel: the one table that the wrappers read, so
# aot.py compiles exactly these configurations.
CONFIGS = {
    "_matmul_fwd_kernel": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    "_matmul_bwd_dx_kernel": dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=3),
    "_matmul_bwd_dw_kernel": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    "_layer_norm_fwd_kernel": dict(BLOCK_ROWS=4, num_warps=4),
    "_layer_norm_bwd_kernel": dict(BLOCK_ROWS=4, ROWS_PER_PROGRAM=64, num_warps=4),
    "_attention_fwd_kernel": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    "_attention_bwd_dq_kernel": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    "_attention_bwd_dkdv_kernel": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
}

# fp32: a few ulps of fp32 (2^-24 ~ 6e-8) summed over thousands of products, or tf32x3's 2^-21.
FP32_TOLERANCE = 2e-5
LOW_PRECISION_FACTOR = 2  # FlashAttention's: the fused kernel against PyTorch in the same dtype


def error_bound(dtype, scale, torch_error):
    """The largest error allowed to a kernel's output (see "Accuracy" above): `scale` is the fp32
    reference's largest magnitude, `torch_error` the error of the PyTorch reference run in `dtype`
    (unused for fp32). The fp32 term keeps an output that PyTorch happens to get exactly right in
    bf16 (a gradient that only sums) from demanding exactness."""
    if dtype == torch.float32:
        return FP32_TOLERANCE * scale
    return LOW_PRECISION_FACTOR * torch_error + FP32_TOLERANCE * scale


def new_output(shape, dtype, device):
    """torch.empty for every buffer a kernel fills; the tests swap in a NaN-filled version, so an
    element that a kernel forgets to write fails them."""
    return torch.empty(shape, dtype=dtype, device=device)


def run(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta); aot.py swaps in a recorder."""
    kernel[grid](*args, **meta)


def block_grad(param, *sizes):
    """The gradient of a super parameter whose leading block `sizes` a kernel will write: zero elsewhere."""
    grad = new_output(param.shape, param.dtype, param.device)
    if len(sizes) == 2:
        grad[: sizes[0], sizes[1]:].zero_()
    grad[sizes[0]:].zero_()
    return grad


def dot_precision(dtype):
    """tl.dot's input_precision: see "Precision" above."""
    if dtype != torch.float32:
        return "ieee"  # ignored: bf16 and fp16 tiles are exact tensor-core inputs
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def autocast_dtype(x):
    """The dtype a matmul op computes in: the autocast dtype inside torch.autocast, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def pow2(n):
    """The power-of-two block covering n, at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _probe():
    pass


INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 was set at import

# Where the interpreter (Triton 3.6 to 3.9) computes otherwise than a GPU, it is made to compute as
# the GPU does, so that a test on a CPU checks the GPU's arithmetic:
#  - tl.dot of bf16 tiles multiplies their raw uint16 bit patterns: they become fp32 first (exact:
#    a product of two bf16 fits in fp32), which the interpreter's fp32 dot then multiplies;
#  - a cast from fp32 to bf16 truncates toward zero (its "rtne" mode too), where the GPU and PyTorch
#    round to nearest even: truncation doubles the rounding error and biases every weight tile
#    toward zero. PyTorch's own conversion does it instead;
#  - Triton 3.6 turns an integer argument used as a loop bound into a Python int through a
#    one-element array, which NumPy 2.4 refuses; the newer interpreter's conversion replaces it.
if INTERPRETED:
    from triton.runtime import interpreter

    def _interpreter_dot(self, a, b, d, *args, _dot=interpreter.InterpreterBuilder.create_dot):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return _dot(self, a, b, d, *args)

    def _interpreter_cast(self, src, dst_type, _cast=interpreter.InterpreterBuilder.cast_impl):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32, order="C")).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return _cast(self, src, dst_type)

    def _interpreter_tensor(tensor, scope, _patch=interpreter._patch_lang_tensor):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter.InterpreterBuilder.create_dot = _interpreter_dot
    interpreter.InterpreterBuilder.cast_impl = _interpreter_cast
    interpreter._patch_lang_tensor = _interpreter_tensor
