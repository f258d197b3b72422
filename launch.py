"""The launch plumbing that the Triton kernels of kernels.py and attention.py share.

Both files launch every kernel through `run`, allocate every buffer a kernel fills with
`new_output`, and read their block sizes from the one table CONFIGS, so that aot.py can record and
compile exactly the launches the wrappers make (it swaps a recorder in for `run`) and the tests can
poison every output with NaN (they swap `new_output`). Calling these through the module, as
`launch.run(...)`, is what makes those swaps reach every launch.

Precision. Kernels load any of fp32, bf16, fp16, compute statistics, softmax and every
accumulation in fp32, and store in the input's dtype. On a GPU, tl.dot of two fp32 tiles runs on
the tensor cores in tf32 (10-bit mantissa) unless input_precision says otherwise. dot_precision
follows PyTorch's own switch: fp32 dots are "tf32x3" under torch's default float32 matmul
precision "highest" (three tf32 tensor-core products per dot, about fp32 accuracy, not
bit-identical to the reference), and "tf32" after torch.set_float32_matmul_precision("high") or
("medium"). bf16 and fp16 tiles use the tensor cores either way. (Triton's interpreter
ignores input_precision: its dots are plain fp32 NumPy matmuls.)

Autocast. Under torch.autocast the matmul ops (linear, qkv, attention) cast their activations to
the autocast dtype, as autocast does for F.linear; the *parameters* are cast tile by tile inside
the kernels, so no bf16 copy of a super weight is ever made, and their gradients come back in the
parameters' own dtype. A fused residual keeps its dtype (fp32 residual + bf16 branch -> fp32, as
the reference's type promotion). LayerNorm computes in fp32 and returns its input's dtype.
"""
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

# Triton 3.9's interpreter multiplies the raw uint16 bit patterns of bf16 tiles in tl.dot; convert
# them to fp32 first (exact: a bf16 product fits in fp32), so bf16 runs correctly on the CPU.
if INTERPRETED:
    from triton.runtime.interpreter import InterpreterBuilder

    def _interpreter_dot(self, a, b, d, *args, _dot=InterpreterBuilder.create_dot):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return _dot(self, a, b, d, *args)

    InterpreterBuilder.create_dot = _interpreter_dot
