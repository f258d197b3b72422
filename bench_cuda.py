"""
Benchmark the Triton kernels on a CUDA device: each op, forward and forward+backward, against the
PyTorch reference and torch.compile of it, at the largest subnet of the tiny, small and base spaces
(N = 197, batch 128, bf16 and fp32), next to the device's measured matmul and copy peaks; then the
whole supernet training step (bf16 autocast, AdamW) with AUTOFORMER_BACKEND=triton against torch.

    python bench_cuda.py                      # writes out/bench_cuda.json

A file apart from bench.py because it needs a CUDA device and measures something else: bench.py
compares the reference path with the official code on a CPU; this one the kernels with the
reference. It takes bench.py's training-step helpers, so both time the same step.
"""
import argparse
import json
import os
import statistics

import torch

import aot
import kernels
from bench import SPACE_NAMES, BenchConfig, TrainCase, project_impl, warmed_up
from cli import write_atomic
from supernet import SPACES


def cuda_ms(fn, repeats=20, warmup=3):
    """Median milliseconds of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_peaks(dtype):
    """Measured peaks of this device: TFLOP/s of an 8192^3 matmul in `dtype`, GB/s of a 1 GiB copy."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    tflops = 2 * 8192**3 / cuda_ms(lambda: a @ a) / 1e9
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / cuda_ms(lambda: dst.copy_(src)) / 1e6  # read + write
    return tflops, gbs


def op_cases(space, batch, dtype):
    """{op: (work, unit, fn(x...) -> outputs, inputs)} at the largest subnet of `space`; work is FLOPs
    of the forward (TFLOP/s) or bytes moved (GB/s)."""
    L = aot.space_layer(space)
    E, S, hidden, H, D = L["embed_dim"], L["super_dim"], L["hidden"], L["num_heads"], L["head_dim"]
    N, m, d, M = L["num_tokens"], L["max_rel"], H * D, batch * L["num_tokens"]
    T = 2 * m + 2
    dev = dict(device="cuda")

    def act(*shape):
        return torch.randn(*shape, dtype=dtype, **dev).requires_grad_()

    def par(*shape):
        return (torch.randn(*shape, **dev) * 0.02).requires_grad_()  # parameters stay fp32, as in training

    x, xd, xh = act(batch, N, E), act(batch, N, d), act(batch, N, hidden)
    size = torch.finfo(dtype).bits // 8
    return {
        # bytes of the kernel, which stores in x's dtype (autocast's F.layer_norm writes fp32: more)
        "layer_norm": (3 * M * E * size, "GB/s", lambda f, x, w, b: f(x, w, b), [x, par(S), par(S)]),
        "qkv": (2 * M * E * 3 * d, "TFLOP/s", lambda f, x, w, b: f(x, w, b, H, D), [x, par(3 * d, S), par(3 * d)]),
        "attention": (4 * batch * H * N * N * D + 8 * batch * H * N * T * D, "TFLOP/s",
                      lambda f, q, k, v, *t: f(q, k, v, t, m),
                      [act(batch, H, N, D), act(batch, H, N, D), act(batch, H, N, D)] + [par(T, D) for _ in range(4)]),
        "proj+residual": (2 * M * d * E, "TFLOP/s", lambda f, x, w, b, r: f(x, w, b, E, False, r),
                          [xd, par(S, d), par(S), act(batch, N, E)]),
        "fc1+gelu": (2 * M * E * hidden, "TFLOP/s", lambda f, x, w, b: f(x, w, b, hidden, True),
                     [x, par(hidden, S), par(hidden)]),
        "fc2+residual": (2 * M * hidden * E, "TFLOP/s", lambda f, x, w, b, r: f(x, w, b, E, False, r),
                         [xh, par(S, hidden), par(S), act(batch, N, E)]),
    }


IMPLS = {"layer_norm": ("sliced_layer_norm_triton", "sliced_layer_norm_torch"),
         "qkv": ("interleaved_qkv_triton", "interleaved_qkv_torch"),
         "attention": ("relative_attention_triton", "relative_attention_torch")}


def bench_ops(batch):
    """Each op, forward and forward+backward, as Triton, reference and torch.compile of the reference."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        tflops_peak, gbs_peak = device_peaks(dtype)
        print(f"{torch.cuda.get_device_name()} {str(dtype)[6:]}: matmul {tflops_peak:.0f} TFLOP/s, "
              f"copy {gbs_peak:.0f} GB/s")
        for name in SPACE_NAMES:
            for op, (work, unit, call, inputs) in op_cases(SPACES[name], batch, dtype).items():
                tri, ref = (getattr(kernels, f) for f in IMPLS.get(op, ("sliced_linear_triton", "sliced_linear_torch")))
                variants = {"triton": tri, "torch": ref, "torch.compile": torch.compile(ref)}
                for impl, f in variants.items():
                    for mode, factor in (("fwd", 1), ("fwd+bwd", 3 if unit == "TFLOP/s" else 2.5)):
                        def step():
                            # as in training: bf16 activations, fp32 parameters, autocast for the reference
                            with torch.autocast(inputs[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
                                out = call(f, *inputs)
                            if mode == "fwd+bwd":
                                outs = out if isinstance(out, tuple) else (out,)
                                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                        with torch.set_grad_enabled(mode == "fwd+bwd"):
                            ms = cuda_ms(step)
                        rate = factor * work / ms / (1e9 if unit == "TFLOP/s" else 1e6)
                        peak = tflops_peak if unit == "TFLOP/s" else gbs_peak
                        rows.append(dict(space=name, dtype=str(dtype)[6:], op=op, impl=impl, mode=mode, ms=ms,
                                         rate=rate, unit=unit, of_peak=rate / peak))
                        print(f"  {name:5s} {op:14s} {mode:8s} {impl:13s} {ms:8.3f} ms {rate:8.1f} {unit:7s} "
                              f"{100 * rate / peak:5.1f}% of peak")
    return rows


def train_images_per_s(space_name, batch, steps=10, warmup=3):
    """Supernet training steps (bf16 autocast, AdamW, one sampled subnet per step, the same
    sequence for both backends), as bench.py times them: images/s per backend."""
    cfg, space = BenchConfig(steps=steps, warmup=warmup), SPACES[space_name]
    case = TrainCase(space.img_size, space.patch_size, batch, True, space_name)
    out = dict(space=space_name, batch=batch)
    for backend in ("triton", "torch"):
        os.environ["AUTOFORMER_BACKEND"] = backend
        step, timed = warmed_up(cfg, case, project_impl(), device="cuda")
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for subnet in timed:
            step(subnet)
        end.record()
        torch.cuda.synchronize()
        out[backend] = batch * steps / (start.elapsed_time(end) / 1e3)
    os.environ.pop("AUTOFORMER_BACKEND")
    print(f"train step {space_name}: triton {out['triton']:.0f} images/s, torch {out['torch']:.0f} images/s")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="images per batch, for the ops and the training step")
    p.add_argument("--out", default="out/bench_cuda.json", help="JSON results, written atomically")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device; bench.py measures the CPU")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch}
    results["kernels"] = bench_ops(args.batch)
    write_atomic(args.out, json.dumps(results, indent=1))  # before the training steps: a crash there keeps these
    results["train"] = [train_images_per_s(name, args.batch) for name in SPACE_NAMES]
    write_atomic(args.out, json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
