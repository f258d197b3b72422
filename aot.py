"""Ahead-of-time compilation of every Triton kernel for sm_80 (A100) and sm_90 (H100), without a GPU,
and the register / spill report of `ptxas -v`.

Why a file of its own: this is the GPU-free check that the kernels compile, and two places use it,
tests/test_compile.py (every launch compiles for both targets) and bench.py (the register table);
it is tooling about the kernels rather than part of any op, and needs subprocess, ptxas and
Triton's compiler internals that kernels.py and attention.py should not carry. It also holds the
ops of one layer at a space's sizes (`op_case`), which tests/test_kernels.py and bench_cuda.py run
on a GPU.

Triton's interpreter accepts programs that a GPU compiler rejects (a dot smaller than 16, an
unsupported layout), so the tests also compile every launch of the wrappers for real targets.
The launches are *recorded* from the wrappers themselves (so the block sizes and constexprs are
the ones they really use, from the one table launch.CONFIGS), then compiled as the JIT would,
with the same argument specialization. This needs @triton.jit kernels, i.e. a process where
TRITON_INTERPRET is unset.

    python aot.py                         # the table for the tiny, small and base spaces, sm_80 and sm_90
    python aot.py --spaces tiny --archs 90

Imports run one way: aot.py -> kernels.py -> attention.py -> launch.py (and supernet.py for the spaces,
in main).
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton

import kernels
import launch
from attention import RelativeAttention
from kernels import InterleavedQKV, SlicedLayerNorm, SlicedLinear


def record_launches(run):
    """Call run() with every kernel launch recorded instead of executed: [(kernel, args, meta)].
    Both Triton files launch through launch.run, so the recorder goes there."""
    calls, saved = [], launch.run
    launch.run = lambda kernel, grid, *args, **meta: calls.append((kernel, args, meta))
    try:
        run()
    finally:
        launch.run = saved
    return calls


def layer_launches(embed_dim, hidden, num_heads, head_dim, num_tokens, max_rel, dtype, super_dim=None):
    """The launches of one transformer layer's forward and backward at these sizes, activations in
    `dtype`, parameters fp32 (the mixed-precision training case when dtype is not fp32). Batch 16:
    the JIT specializes on divisibility by 16, and B * N then divides like any batch multiple of 16."""
    S, d, T = super_dim or embed_dim, num_heads * head_dim, 2 * max_rel + 2

    def param(*shape):
        return torch.zeros(shape, requires_grad=True)

    def run():
        x = torch.zeros(16, num_tokens, embed_dim, dtype=dtype, requires_grad=True)
        y = SlicedLayerNorm.apply(x, param(S), param(S))
        q, k, v = InterleavedQKV.apply(y, param(3 * d, S), param(3 * d), num_heads, head_dim)
        tables = [param(T, head_dim) for _ in range(4)]
        x = SlicedLinear.apply(RelativeAttention.apply(q, k, v, *tables, max_rel), param(S, d), param(S),
                               embed_dim, False, x)
        h = SlicedLinear.apply(x, param(hidden, S), param(hidden), hidden, True, None)
        SlicedLinear.apply(h, param(S, hidden), param(S), embed_dim, False, None).sum().backward()
    return record_launches(run)


OPS = ("layer_norm", "qkv", "attention", "proj+residual", "fc1+gelu", "fc2+residual", "mlp")


def op_case(op, batch, embed_dim, hidden, num_heads, head_dim, num_tokens, max_rel, super_dim=None):
    """One op of a layer at these sizes (keywords as for layer_launches), as (Triton op, reference
    op, activations, parameters): each op takes the activations then the parameters; all random,
    fp32 on the CPU, parameters scaled so that every output has about unit variance. The tests and
    bench_cuda.py run the ops through this."""
    E, S, H, D, N, B = embed_dim, super_dim or embed_dim, num_heads, head_dim, num_tokens, batch
    d, T = H * D, 2 * max_rel + 2

    def act(*shape):
        return torch.randn(B, *shape)

    def linear(n_out, n_in, super_out, super_in):  # a super weight and bias, the block n_out x n_in used
        return [torch.randn(super_out, super_in) * n_in**-0.5, torch.randn(super_out)]

    def pair(name, **sizes):  # kernels.<name>_triton and kernels.<name>_torch, with these sizes
        triton_fn, torch_fn = getattr(kernels, f"{name}_triton"), getattr(kernels, f"{name}_torch")
        return (lambda *a, **kw: triton_fn(*a, **sizes, **kw)), (lambda *a, **kw: torch_fn(*a, **sizes, **kw))

    if op == "layer_norm":
        return (*pair("sliced_layer_norm"), [act(N, E) * 3 + 1], [torch.randn(S), torch.randn(S)])
    if op == "qkv":
        return (*pair("interleaved_qkv", num_heads=H, head_dim=D), [act(N, E)], linear(3 * d, E, 3 * d, S))
    if op == "attention":
        triton_op, torch_op = pair("relative_attention", max_relative_position=max_rel)
        return (lambda q, k, v, *t: triton_op(q, k, v, t), lambda q, k, v, *t: torch_op(q, k, v, t),
                [act(H, N, D) for _ in range(3)], [torch.randn(T, D) * 0.5 for _ in range(4)])
    if op == "proj+residual":
        triton_op, torch_op = pair("sliced_linear", out_features=E)
        return (lambda x, r, w, b: triton_op(x, w, b, residual=r), lambda x, r, w, b: torch_op(x, w, b, residual=r),
                [act(N, d), act(N, E)], linear(E, d, S, d))
    if op == "fc1+gelu":
        return (*pair("sliced_linear", out_features=hidden, gelu=True), [act(N, E)], linear(hidden, E, hidden, S))
    if op == "fc2+residual":
        triton_op, torch_op = pair("sliced_linear", out_features=E)
        return (lambda x, r, w, b: triton_op(x, w, b, residual=r), lambda x, r, w, b: torch_op(x, w, b, residual=r),
                [act(N, hidden), act(N, E)], linear(E, hidden, S, hidden))
    if op == "mlp":
        triton_op, torch_op = pair("sliced_mlp", hidden=hidden)
        return (lambda x, r, *p: triton_op(x, *p, residual=r), lambda x, r, *p: torch_op(x, *p, residual=r),
                [act(N, E), act(N, E)], linear(hidden, E, hidden, S) + linear(E, hidden, S, hidden))
    raise ValueError(f"op {op!r}: choose one of {OPS}")


def compile_launch(kernel, args, meta, arch):
    """Compile one recorded launch for sm_<arch> exactly as the JIT would (signature, divisibility
    specialization, options), without a GPU; returns Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(compiled):
    """Registers per thread, spill bytes (stores + loads) and static shared memory of a compiled
    kernel, from `ptxas -v` on its PTX (the metadata's n_regs / n_spills are only filled in when a
    kernel is loaded onto a GPU)."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = re.search(r"^\.target\s+(sm_\w+)", compiled.asm["ptx"], re.M).group(1)  # e.g. sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        ptxas = get_ptxas(compiled.metadata.target.arch).path  # the one Triton itself ran
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return dict(registers=int(re.search(r"Used (\d+) registers", log).group(1)), spill_bytes=spills,
                shared_bytes=compiled.metadata.shared)


def compile_layers(layers, arch, dtypes=(torch.float32, torch.bfloat16)):
    """Compile every distinct launch of `layers` (keyword dicts for layer_launches) in each dtype
    for sm_<arch>; yields (description, CompiledKernel)."""
    seen = set()
    for layer in layers:
        for dtype in dtypes:
            for kernel, args, meta in layer_launches(dtype=dtype, **layer):
                flags = {k: v for k, v in meta.items() if k in ("QKV", "GELU", "RESIDUAL", "HEAD_DIM", "BLOCK_E",
                                                                   "T_PAD", "G_PAD", "BLOCK_D")}
                row = dict(kernel=kernel.__name__, dtype=str(dtype).removeprefix("torch."), arch=f"sm_{arch}",
                           flags=flags)
                key = repr(row)
                if key not in seen:
                    seen.add(key)
                    yield row, compile_launch(kernel, args, meta, arch)


def register_table(layers, archs=(80, 90), dtypes=(torch.float32, torch.bfloat16)):
    """One row per distinct kernel launch of `layers`, dtype and arch: the kernel, its constexprs,
    registers per thread, spill bytes and shared memory (for bench.py)."""
    return [dict(row, **resource_usage(compiled)) for arch in archs
            for row, compiled in compile_layers(layers, arch, dtypes)]


def print_register_table(rows, indent=""):
    """register_table's rows, one line each, with the constexprs that tell a kernel's launches apart."""
    header = f"{'kernel':28s} {'dtype':9s} {'arch':6s} {'constexprs':44s} {'regs':>4s} {'spill B':>7s} {'smem B':>7s}"
    print(indent + header)
    for r in rows:
        flags = " ".join(f"{k}={v}" for k, v in r["flags"].items() if v is not False and k != "HEAD_DIM" or
                         (k == "HEAD_DIM" and r["flags"].get("QKV")))
        print(f"{indent}{r['kernel']:28s} {r['dtype']:9s} {r['arch']:6s} {flags:44s} {r['registers']:4d} "
              f"{r['spill_bytes']:7d} {r['shared_bytes']:7d}")


def space_layer(space):
    """The largest layer of a space, as keywords for layer_launches."""
    E = max(space.embed_dims)
    return dict(embed_dim=E, hidden=int(E * max(space.mlp_ratios)), num_heads=max(space.num_heads),
                head_dim=space.head_dim, num_tokens=space.num_patches + 1,
                max_rel=space.max_relative_position, super_dim=space.super_embed_dim)


def main():
    from supernet import SPACES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", nargs="+", default=["tiny", "small", "base"], choices=sorted(SPACES))
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    args = parser.parse_args()
    if launch.INTERPRETED:
        parser.exit(1, "aot.py: TRITON_INTERPRET is set; the compile needs @triton.jit kernels\n")
    print_register_table(register_table([space_layer(SPACES[name]) for name in args.spaces], archs=args.archs))


if __name__ == "__main__":
    main()
