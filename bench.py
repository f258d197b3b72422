"""
Benchmark the AutoFormer supernet on this machine, optionally side by side with the official code.

Sections (pick with --only, comma separated):
  matmul  this machine's matmul peak: a large square matmul in fp32 and in bf16, median of repeats
  train   one supernet training step (forward, cross-entropy backward, AdamW step) with a freshly
          sampled subnet each step, in images/s and as model FLOP utilisation (MFU) against the
          matmul peak of the same dtype, re-measured between the repeats; tiny space at 224 px
          batch 8 and at 32 px / patch 4 batch 64, each in fp32 and under torch.autocast("cpu", dtype=torch.bfloat16)
  memory  peak memory of one fp32 training step of the largest tiny subnet at 224 px, batch 8
  data    the built-in data set's loader in images/s, and training steps of the default cpu space
  registers  registers / spills / shared memory of every Triton launch at sm_80 and sm_90 (aot.py)
  cuda    on a CUDA device only: each Triton op, forward and forward+backward, against the
          reference and torch.compile of it at the tiny/small/base shapes (N = 197, batch 128, bf16
          and fp32) next to the device's measured matmul and copy peaks; then the supernet training
          step in images/s with AUTOFORMER_BACKEND=triton against torch

Every variant, and the official model, runs the same sequence of subnets on the same batch.
Results are printed as a table and written atomically as JSON to --out (default out/bench.json).

Comparing with the official implementation (its code is never part of this repository):
  git clone https://github.com/microsoft/Cream /tmp/Cream      # or any checkout of it
  python bench.py --official /tmp/Cream/AutoFormer
The official model imports torch._six, which torch 2 removed; bench.py stands in for it (see
import_official). The model needs nothing from timm, so the checkout needs no preparation.

  python bench.py                                   # everything, project only
  python bench.py --only train --steps 4 --repeats 2
"""
import argparse
import collections.abc
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import aot
import data
import kernels
import launch
from supernet import SPACES, SearchSpace, Subnet, Supernet, count_flops

SPACE_NAMES = ("tiny", "small", "base")

SECTIONS = ("matmul", "train", "memory", "data", "registers", "cuda")
TARGETS = {  # project / official ratios the project aims for (>= for images/s, <= for memory)
    "224px_b8_fp32": 2.5, "224px_b8_bf16": 4.0, "32px_b64_fp32": 1.3, "32px_b64_bf16": 1.3,
    "memory": 0.6,
}


@dataclass
class BenchConfig:
    steps: int = field(default=6, metadata={"help": "timed training steps per repeat, one fresh subnet each"})
    repeats: int = field(default=3, metadata={"help": "timed repeats of the subnet sequence; reports the median"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first (allocations, oneDNN primitive caches)"})
    seed: int = field(default=0, metadata={"help": "seeds the subnet sequence, the batch and the weights"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads; 0 keeps torch's default"})
    matmul_n: int = field(default=2048, metadata={"help": "side of the square matmul for the peak"})
    official: str = field(default="", metadata={"help": "the official AutoFormer folder (see above); empty: project only"})
    out: str = field(default="out/bench.json", metadata={"help": "JSON results, written atomically"})
    only: str = field(default=",".join(SECTIONS), metadata={"help": "comma-separated sections to run"})


@dataclass(frozen=True)
class TrainCase:
    img_size: int
    patch_size: int
    batch: int
    bf16: bool
    space: str = "tiny"

    @property
    def name(self):
        return f"{self.img_size}px_b{self.batch}_{'bf16' if self.bf16 else 'fp32'}"


TRAIN_CASES = [TrainCase(224, 16, 8, False), TrainCase(224, 16, 8, True),
               TrainCase(32, 4, 64, False), TrainCase(32, 4, 64, True)]
MEMORY_CASE = TrainCase(224, 16, 8, False)


@dataclass
class Impl:
    """A supernet implementation: how to build it for a space and run it on one subnet."""
    name: str
    build: Callable[[SearchSpace], torch.nn.Module]
    forward: Callable[[torch.nn.Module, torch.Tensor, Subnet], torch.Tensor]


def project_impl():
    return Impl("project", lambda space: Supernet(space, drop_path=0.0), lambda model, x, subnet: model(x, subnet))


def import_official(root):
    """Import Vision_TransformerSuper from an official AutoFormer folder, standing in for torch._six."""
    six = types.ModuleType("torch._six")  # what the official code (model/utils.py) takes from it
    six.container_abcs, six.string_classes, six.int_classes, six.inf = collections.abc, str, int, math.inf
    sys.modules.setdefault("torch._six", six)
    sys.path.insert(0, os.path.abspath(root))
    from model.supernet_transformer import Vision_TransformerSuper
    return Vision_TransformerSuper


def official_impl(root):
    vit_super = import_official(root)

    def build(space):
        assert space.head_dim == 64, "the official attention hard-codes 64 channels per head"
        # as supernet_train.py builds it (flags --gp --change_qkv --relative_position); for the tiny
        # space, supernet-T.yaml's super sizes: embed 256 (= 4 heads x 64), depth 14, 4 heads, ratio 4
        return vit_super(img_size=space.img_size, patch_size=space.patch_size, in_chans=space.in_chans,
                         num_classes=space.num_classes, embed_dim=space.super_embed_dim, depth=space.super_depth,
                         num_heads=max(space.num_heads), mlp_ratio=space.super_mlp_ratio, qkv_bias=True,
                         drop_path_rate=0.0, gp=True, relative_position=True, change_qkv=True,
                         max_relative_position=space.max_relative_position)

    def forward(model, x, subnet):
        model.set_sample_config({"embed_dim": [subnet.embed_dim] * subnet.depth, "mlp_ratio": list(subnet.mlp_ratios),
                                 "num_heads": list(subnet.num_heads), "layer_num": subnet.depth})
        return model(x)

    return Impl("official", build, forward)


def make_impls(cfg):
    return [project_impl()] + ([official_impl(cfg.official)] if cfg.official else [])


def case_space(case):
    return dataclasses.replace(SPACES[case.space], img_size=case.img_size, patch_size=case.patch_size)


def make_batch(space, batch, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, space.in_chans, space.img_size, space.img_size, generator=g)
    return x.to(device), torch.randint(0, space.num_classes, (batch,), generator=g).to(device)


def build_trainer(impl, space, seed, device="cpu"):
    torch.manual_seed(seed)
    model = impl.build(space).to(device).train()
    # fused, as train.py: the optimizer is the same for every impl, and its time is not the model's
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)


def train_step(impl, model, opt, x, y, subnet, bf16):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(impl.forward(model, x, subnet), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # grads are freed here, so a step starts from params + optimizer state


def matmul_peak(dtype, n, repeats=10):
    """Median FLOP/s of an n x n x n matmul in dtype."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def bench_train_step(cfg, case, impls):
    """Images/s and MFU of training steps for each impl. Every impl runs the same `steps` subnets
    `repeats` times, the impls interleaved so that load from other processes hits them alike; a
    subnet's time is its median over the repeats, the figure is the sum of those medians. The
    matmul peak that MFU divides by is measured between the repeats too, under the same load."""
    space = case_space(case)
    rng = random.Random(cfg.seed)
    subnets = [space.sample(rng) for _ in range(cfg.warmup + cfg.steps)]
    warm, timed = subnets[:cfg.warmup], subnets[cfg.warmup:]
    x, y = make_batch(space, case.batch, cfg.seed)
    flop = 6 * case.batch * sum(count_flops(space, s) for s in timed)  # 3 x forward MACs x 2 FLOP/MAC
    trainers = {impl.name: (impl, *build_trainer(impl, space, cfg.seed)) for impl in impls}
    for impl, model, opt in trainers.values():
        for s in warm:
            train_step(impl, model, opt, x, y, s, case.bf16)
    times = {name: [[] for _ in timed] for name in trainers}  # [subnet][repeat] seconds
    peaks = []
    for _ in range(cfg.repeats):
        peaks.append(matmul_peak(torch.bfloat16 if case.bf16 else torch.float32, cfg.matmul_n, repeats=3))
        for name, (impl, model, opt) in trainers.items():
            for s, ts in zip(timed, times[name]):
                t = time.perf_counter()
                train_step(impl, model, opt, x, y, s, case.bf16)
                ts.append(time.perf_counter() - t)
    peak = statistics.median(peaks)
    out = {"load_average": os.getloadavg()[0], "matmul_peak_flop_per_s": peak}
    for name, ts in times.items():
        sec, best = sum(statistics.median(t) for t in ts), sum(min(t) for t in ts)
        out[name] = {"images_per_s": case.batch * len(timed) / sec, "step_seconds": ts,
                     "images_per_s_best": case.batch * len(timed) / best,  # other processes only slow us down
                     "flop_per_s": flop / sec, "mfu": flop / sec / peak}
    return out


def current_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(cfg, impl_name):
    """Runs in a fresh process (see peak_memory): one warm-up step, then reset the RSS high-water
    mark (Linux: write 5 to /proc/self/clear_refs), run one step, and report how far RSS rose above
    the RSS just before it (parameters, optimizer state, libraries)."""
    impl = next(i for i in make_impls(cfg) if i.name == impl_name)
    space = case_space(MEMORY_CASE)
    subnet = space.largest()
    x, y = make_batch(space, MEMORY_CASE.batch, cfg.seed)
    model, opt = build_trainer(impl, space, cfg.seed)
    train_step(impl, model, opt, x, y, subnet, MEMORY_CASE.bf16)  # creates the AdamW state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = current_kib("VmRSS")
    train_step(impl, model, opt, x, y, subnet, MEMORY_CASE.bf16)
    peak = current_kib("VmHWM")
    return {"rss_before_mib": base / 1024, "step_peak_mib": (peak - base) / 1024}


def peak_memory(cfg, impl_name):
    """Peak RSS increase of one training step, measured in a fresh subprocess so that nothing from
    other sections (allocator caches, other models) is counted. MALLOC_MMAP_THRESHOLD_ fixes glibc's
    mmap threshold (it otherwise grows after frees), so every tensor of 64 KiB or more is mmapped and
    its pages go back to the OS when it is freed: RSS then follows live memory, and the warm-up
    step's freed activations cannot be silently reused by the measured step."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl_name, "--seed", str(cfg.seed),
           "--threads", str(cfg.threads), "--official", cfg.official]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_matmul(cfg, impls, results):
    results["matmul"] = {dt: {"n": cfg.matmul_n, "flop_per_s": matmul_peak(getattr(torch, d), cfg.matmul_n)}
                         for dt, d in (("fp32", "float32"), ("bf16", "bfloat16"))}
    return [(f"matmul peak {dt} (TFLOP/s)", r["flop_per_s"] / 1e12, None, None)
            for dt, r in results["matmul"].items()]


def section_train(cfg, impls, results):
    rows, results["train"] = [], {}
    for case in TRAIN_CASES:
        r = results["train"][case.name] = bench_train_step(cfg, case, impls)
        off = r.get("official")
        rows.append((f"train {case.name} (images/s)", r["project"]["images_per_s"],
                     off and off["images_per_s"], (">=", TARGETS[case.name])))
        rows.append((f"train {case.name} (MFU %)", 100 * r["project"]["mfu"], off and 100 * off["mfu"], None))
        print(f"  {case.name}: " + ", ".join(f"{i.name} {r[i.name]['images_per_s']:.2f} images/s (best repeats "
                                             f"{r[i.name]['images_per_s_best']:.2f})" for i in impls)
              + f", load average {r['load_average']:.1f}", flush=True)
    return rows


def section_memory(cfg, impls, results):
    r = results["memory"] = {i.name: peak_memory(cfg, i.name) for i in impls}
    off = r.get("official")
    return [(f"memory {MEMORY_CASE.name} largest: step peak (MiB)", r["project"]["step_peak_mib"],
             off and off["step_peak_mib"], ("<=", TARGETS["memory"])),
            (f"memory {MEMORY_CASE.name} largest: RSS before (MiB)", r["project"]["rss_before_mib"],
             off and off["rss_before_mib"], None)]


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


def section_cuda(cfg, impls, results, batch=128):
    """Each Triton op against the reference and torch.compile of it, then the training step, on CUDA."""
    if not torch.cuda.is_available():
        print("  skipped: no CUDA device")
        return []
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        tflops_peak, gbs_peak = device_peaks(dtype)
        print(f"{torch.cuda.get_device_name()} {str(dtype)[6:]}: matmul {tflops_peak:.0f} TFLOP/s, copy {gbs_peak:.0f} GB/s")
        for name in SPACE_NAMES:
            for op, (work, unit, call, inputs) in op_cases(SPACES[name], batch, dtype).items():
                tri, ref = (getattr(kernels, f) for f in IMPLS.get(op, ("sliced_linear_triton", "sliced_linear_torch")))
                variants = {"triton": tri, "torch": ref, "torch.compile": torch.compile(ref)}
                for impl, f in variants.items():
                    for mode, factor in (("fwd", 1), ("fwd+bwd", 3 if unit == "TFLOP/s" else 2.5)):
                        def step():
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
    results["kernels_cuda"] = rows
    results["train_cuda"] = [train_images_per_s(name, batch) for name in SPACE_NAMES]
    return [(f"train {r['space']} b{batch} bf16 triton/torch (images/s)", r["triton"], None, None)
            for r in results["train_cuda"]]


def train_images_per_s(space_name, batch, steps=10, warmup=3):
    """Supernet training steps (bf16 autocast, AdamW, one sampled subnet per step, the same
    sequence for both backends): images/s per backend."""
    space, impl, rng = SPACES[space_name], project_impl(), random.Random(0)
    subnets = [space.sample(rng) for _ in range(warmup + steps)]
    x, y = make_batch(space, batch, 0, device="cuda")
    out = dict(space=space_name, batch=batch)
    for backend in ("triton", "torch"):
        os.environ["AUTOFORMER_BACKEND"] = backend
        model, opt = build_trainer(impl, space, 0, device="cuda")
        for subnet in subnets[:warmup]:
            train_step(impl, model, opt, x, y, subnet, True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for subnet in subnets[warmup:]:
            train_step(impl, model, opt, x, y, subnet, True)
        end.record()
        torch.cuda.synchronize()
        out[backend] = batch * steps / (start.elapsed_time(end) / 1e3)
    os.environ.pop("AUTOFORMER_BACKEND")
    print(f"train step {space_name}: triton {out['triton']:.0f} images/s, torch {out['torch']:.0f} images/s")
    return out


def section_registers(cfg, impls, results):
    """Registers, spills and shared memory of every kernel launch, compiled ahead of time (aot.py)."""
    if launch.INTERPRETED:
        print("  skipped: TRITON_INTERPRET is set, the ahead-of-time compile needs it unset")
        return []
    rows = aot.register_table([aot.space_layer(SPACES[name]) for name in SPACE_NAMES], archs=(80, 90))
    for r in rows:
        print(f"  {r['kernel']:28s} {r['dtype']:9s} sm_{r['arch']!s:3s} {r['registers']:4d} regs "
              f"{r['spill_bytes']:7d} B spilled {r['shared_bytes']:7d} B shared")
    results["registers"] = rows
    return []


def section_data(cfg, impls, results):
    """The built-in data set's loader in images/s, and the training step of the default cpu space."""
    dataset = data.load_dataset(data.ensure_synthetic("data/synthetic"), verify=False)
    loaders = data.build_loaders(dataset, image_size=32, batch_size=64, hflip=False)
    loader_rate = data.measure_throughput(loaders.train)
    rows = [("data loader, built-in set (images/s)", loader_rate, None, None)]
    results["data"] = {"loader_images_per_s": loader_rate}
    for bf16 in (False, True):
        rate = bench_train_step(cfg, TrainCase(32, 4, 64, bf16, "cpu"), impls[:1])["project"]["images_per_s"]
        label = f"train cpu space b64 {'bf16' if bf16 else 'fp32'} (images/s)"
        results["data"][label] = rate
        rows.append((label, rate, None, None))
    return rows


SECTION_FNS = {"matmul": section_matmul, "train": section_train, "memory": section_memory,
               "data": section_data, "registers": section_registers, "cuda": section_cuda}


def print_table(rows):
    """rows: (label, project, official or None, target (op, ratio) or None)."""
    print(f"\n{'figure':<48} {'project':>9} {'official':>9} {'ratio':>6}  target")
    for label, proj, off, target in rows:
        line = f"{label:<48} {proj:>9.3f}"
        if off is not None:
            ratio = proj / off
            line += f" {off:>9.3f} {ratio:>6.2f}"
            if target:
                op, want = target
                line += f"  {op}{want:g} " + ("ok" if (ratio >= want if op == ">=" else ratio <= want) else "MISS")
        print(line)


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(BenchConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default, help=f.metadata["help"])
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)  # internal: see peak_memory
    args = vars(p.parse_args())
    return BenchConfig(**{k: v for k, v in args.items() if k != "memory_child"}), args["memory_child"]


def main():
    cfg, child = parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if child:
        print(json.dumps(memory_child(cfg, child)))
        return
    sections = [s for s in cfg.only.split(",") if s]
    if not set(sections) <= set(SECTION_FNS):
        sys.exit(f"--only takes a comma-separated subset of {','.join(SECTION_FNS)}, got {cfg.only!r}")
    impls = make_impls(cfg)
    results = {"config": dataclasses.asdict(cfg),
               "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                       "loadavg_start": os.getloadavg()}}
    load, cores = os.getloadavg()[0], os.cpu_count()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores, load average {load:.2f}")
    if load > 0.5 * cores:
        print("warning: the machine is busy; other processes make the timings (of the many small ops most) slower")
    rows = []
    for name in sections:
        print(f"[{name}]", flush=True)
        rows += SECTION_FNS[name](cfg, impls, results)
        results["env"]["loadavg_end"] = os.getloadavg()
        results["ratios"] = {label: proj / off for label, proj, off, _ in rows if off is not None}
        write_json(cfg.out, results)  # after every section, so that a long run killed midway leaves something
    print_table(rows)
    print(f"\nwrote {cfg.out}")


if __name__ == "__main__":
    main()
