"""
Benchmark the AutoFormer supernet on this machine, optionally side by side with the official code.

Sections (pick with --only, comma separated):
  matmul  this machine's matmul peak: a large square matmul in fp32 and in bf16, median of repeats
  train   one supernet training step (forward, cross-entropy backward, AdamW step) with a freshly
          sampled subnet each step, in images/s and as model FLOP utilisation (MFU) against the
          matmul peak of the same dtype, re-measured between the repeats; tiny space at 224 px
          batch 8 and at 32 px / patch 4 batch 64, each in fp32 and under torch.autocast("cpu", dtype=torch.bfloat16)
  split   where the train section's step spends its time: every aten op timed, summed by kind
          (linear layers' products, relative-position products, attention's batched products, rest)
  memory  peak memory of one fp32 training step of the largest tiny subnet at 224 px, batch 8, in the
          entangled supernet and in the classical one (every choice its own weights)
  data    the built-in data set's loader in images/s, and training steps of the default cpu space
  loader  the evaluation loader of image folders (the released models' protocol: data.evaluation_transform)
          on a folder of 224 px JPEGs written to a temporary folder, in images/s per number of workers
  registers  registers / spills / shared memory of every Triton launch at sm_80 and sm_90 (aot.py)
  ranking how well n held-out images rank subnets, on a trained checkpoint (--checkpoint): 40 subnets
          of search.py's default window and 30 of the whole space, each scored once per val image;
          the mean Spearman correlation between the rankings (by top-1, and by mean log-likelihood of
          the right class) that two disjoint sets of n images give, over 20 random pairs of sets (not
          in "all": it needs a trained supernet)

Every variant, and the official model, runs the same sequence of subnets on the same batch, each
implementation in a process of its own. The Triton kernels' speed on a CUDA device: bench_cuda.py.
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
import collections
import collections.abc
import dataclasses
import functools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import aot
import data
import launch
import search
from cli import config_parser, load_split, write_atomic
from reproduce import spearman_rho
from supernet import SPACES, SearchSpace, Subnet, Supernet, count_flops, count_params, load_checkpoint, load_supernet

SPACE_NAMES = ("tiny", "small", "base")

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
    official: str = field(default="", metadata={"help": "the official AutoFormer folder (see above); "
                                                         "empty: project only"})
    out: str = field(default="out/bench.json", metadata={"help": "JSON results, written atomically"})
    only: str = field(default="", metadata={"help": "comma-separated sections to run; empty: all but ranking, "
                                                    "in the order above"})
    loader_images: int = field(default=640, metadata={"help": "JPEGs of the loader section, 224 px"})
    checkpoint: str = field(default="out/ckpt.pt", metadata={"help": "the trained supernet of the ranking section"})


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


def project_impl(sharing="entangled"):
    """This repository's supernet: "project" (entangled), or "project-classical"."""
    name = "project" if sharing == "entangled" else f"project-{sharing}"
    return Impl(name, lambda space: Supernet(space, drop_path=0.0, sharing=sharing),
                lambda model, x, subnet: model(x, subnet))


def import_official(root):
    """Import Vision_TransformerSuper from an official AutoFormer folder, standing in for torch._six."""
    if not os.path.isfile(os.path.join(root, "model", "supernet_transformer.py")):
        sys.exit(f"--official {root}: no model/supernet_transformer.py there; expected the AutoFormer folder of a "
                 "microsoft/Cream checkout (see python bench.py --help)")
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


def find_impl(cfg, name):
    return next(i for i in make_impls(cfg) + [project_impl("classical")] if i.name == name)


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
    """Images/s and MFU of training steps for each impl. Each impl trains in a process of its own, as
    it would for real (in a shared one, whichever model runs second finds the allocator full of the
    other's freed memory); every process runs the same `steps` subnets `repeats` times, the processes
    taking turns so that load from other programs hits them alike. A subnet's time is its median over
    the repeats, the figure the sum of those medians. The matmul peak that MFU divides by is measured
    between the repeats too."""
    space = case_space(case)
    timed = case_subnets(cfg, space)[cfg.warmup:]
    flop = 6 * case.batch * sum(count_flops(space, s) for s in timed)  # 3 x forward MACs x 2 FLOP/MAC
    children = {}
    for impl in impls:  # one at a time, so that no warm-up overlaps another's
        children[impl.name] = start_child(cfg, "train", case, impl.name)
        read_reply(children[impl.name])  # warmed up
    times = {name: [] for name in children}  # [repeat][subnet] seconds
    peaks = []
    for _ in range(cfg.repeats):
        peaks.append(matmul_peak(torch.bfloat16 if case.bf16 else torch.float32, cfg.matmul_n, repeats=3))
        for name, child in children.items():
            try:
                child.stdin.write("go\n")
                child.stdin.flush()
            except BrokenPipeError:
                pass  # the child has died: read_reply says so
            times[name].append(read_reply(child))
    for child in children.values():
        child.stdin.close()
        child.wait()
    peak = statistics.median(peaks)
    out = {"load_average": os.getloadavg()[0], "matmul_peak_flop_per_s": peak}
    for name, ts in times.items():
        ts = [list(t) for t in zip(*ts)]  # [subnet][repeat]
        sec, best = sum(statistics.median(t) for t in ts), sum(min(t) for t in ts)
        out[name] = {"images_per_s": case.batch * len(timed) / sec, "step_seconds": ts,
                     "images_per_s_best": case.batch * len(timed) / best,  # other processes only slow us down
                     "flop_per_s": flop / sec, "mfu": flop / sec / peak}
    return out


def case_subnets(cfg, space):
    """The warm-up subnets, then the timed ones: the same in every process for the same seed."""
    rng = random.Random(cfg.seed)
    return [space.sample(rng) for _ in range(cfg.warmup + cfg.steps)]


def warmed_up(cfg, case, impl, device="cpu"):
    """After the warm-up steps: the training step of `case` as a function of the subnet, and the
    subnets to time."""
    space = case_space(case)
    subnets = case_subnets(cfg, space)
    x, y = make_batch(space, case.batch, cfg.seed, device)
    model, opt = build_trainer(impl, space, cfg.seed, device)
    step = functools.partial(train_step, impl, model, opt, x, y, bf16=case.bf16)
    for s in subnets[:cfg.warmup]:
        step(s)
    return step, subnets[cfg.warmup:]


def train_child(cfg, case, impl, reply):
    """Runs in its own process (see bench_train_step): the warm-up steps, then the timed subnets
    once for every line on stdin, replying with the step times."""
    step, timed = warmed_up(cfg, case, impl)
    reply("ready")
    for _ in sys.stdin:
        times = []
        for s in timed:
            t = time.perf_counter()
            step(s)
            times.append(time.perf_counter() - t)
        reply(times)


def current_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(cfg, case, impl, reply):
    """Runs in a fresh process (see peak_memory): one warm-up step, then reset the RSS high-water
    mark (Linux: write 5 to /proc/self/clear_refs), run one step, and report how far RSS rose above
    the RSS just before it (parameters, optimizer state, libraries)."""
    space = case_space(case)
    subnet = space.largest()
    x, y = make_batch(space, case.batch, cfg.seed)
    model, opt = build_trainer(impl, space, cfg.seed)
    train_step(impl, model, opt, x, y, subnet, case.bf16)  # creates the AdamW state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = current_kib("VmRSS")
    train_step(impl, model, opt, x, y, subnet, case.bf16)
    peak = current_kib("VmHWM")
    reply({"rss_before_mib": base / 1024, "step_peak_mib": (peak - base) / 1024})


def peak_memory(cfg, impl_name):
    """Peak RSS increase of one training step, measured in a fresh subprocess so that nothing from
    other sections (allocator caches, other models) is counted. MALLOC_MMAP_THRESHOLD_ fixes glibc's
    mmap threshold (it otherwise grows after frees), so every tensor of 64 KiB or more is mmapped and
    its pages go back to the OS when it is freed: RSS then follows live memory, and the warm-up
    step's freed activations cannot be silently reused by the measured step."""
    return ask_child(cfg, "memory", MEMORY_CASE, impl_name, MALLOC_MMAP_THRESHOLD_="65536")


class OpTimer(TorchDispatchMode):
    """Wall-clock seconds of every aten op, summed by kind: the linear layers' products (mm, addmm),
    the products with the stacked relative-position tables (an mm with a side of 2T rows), the
    attention's batched products (bmm; the official code's relative-position products are batched
    too, so they count here), and the rest. Its own few microseconds land on every op, so they weigh
    most on the implementation that runs the most ops."""

    def __init__(self, table_rows):
        super().__init__()
        self.table_rows, self.seconds = table_rows, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[self.kind(func.overloadpacket.__name__, args)] += time.perf_counter() - t
        return out

    def kind(self, name, args):
        if name == "bmm":
            return "attention"
        if name in ("mm", "addmm"):
            sides = {n for a in args if isinstance(a, torch.Tensor) for n in a.shape[-2:]}
            return "relative" if self.table_rows in sides else "linear"
        return "rest"


def split_child(cfg, case, impl, reply):
    """Runs in its own process (see section_split): the warm-up steps, then the timed subnets under
    OpTimer; replies the seconds per step of each kind."""
    step, timed = warmed_up(cfg, case, impl)
    with OpTimer(table_rows=2 * (2 * case_space(case).max_relative_position + 2)) as timer:
        for s in timed:
            step(s)
    reply({kind: sec / cfg.steps for kind, sec in timer.seconds.items()})


def start_child(cfg, run, case, impl_name, **env):
    """This script in a new process that runs train_child, split_child or memory_child (see child_main)."""
    job = {"cfg": dataclasses.asdict(cfg), "run": run, "case": dataclasses.asdict(case), "impl": impl_name}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    return subprocess.Popen(cmd, env=dict(os.environ, **env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask_child(cfg, run, case, impl_name, **env):
    """The one reply of a child that runs once (split_child, memory_child)."""
    child = start_child(cfg, run, case, impl_name, **env)
    child.stdin.close()  # it reads nothing
    result = read_reply(child)
    child.wait()
    return result


def read_reply(child):
    line = child.stdout.readline()
    if not line:
        sys.exit(f"bench child {child.args[-1]} exited with code {child.wait()} (its error is above)")
    return json.loads(line)


def child_main(job):
    """The child's side of start_child: replies go to stdout, one JSON line each; whatever else the
    models print goes to stderr."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what C++ libraries print, too
    sys.stdout = sys.stderr

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    cfg = BenchConfig(**job["cfg"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    impl = find_impl(cfg, job["impl"])
    run = {"train": train_child, "split": split_child, "memory": memory_child}[job["run"]]
    run(cfg, TrainCase(**job["case"]), impl, reply)


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
    """The step's peak and the memory before it, of each impl and of the classical supernet."""
    r = results["memory"] = {i.name: peak_memory(cfg, i.name) for i in impls + [project_impl("classical")]}
    off, classical = r.get("official"), r["project-classical"]
    return [(f"memory {MEMORY_CASE.name} largest: step peak (MiB)", r["project"]["step_peak_mib"],
             off and off["step_peak_mib"], ("<=", TARGETS["memory"])),
            (f"memory {MEMORY_CASE.name} largest: RSS before (MiB)", r["project"]["rss_before_mib"],
             off and off["rss_before_mib"], None),
            (f"memory {MEMORY_CASE.name} classical: step peak (MiB)", classical["step_peak_mib"], None, None),
            (f"memory {MEMORY_CASE.name} classical: RSS before (MiB)", classical["rss_before_mib"], None, None)]


def section_split(cfg, impls, results):
    """Where a training step's time goes (see OpTimer), each impl in a process of its own."""
    results["split"] = {}
    for case in TRAIN_CASES:
        r = results["split"][case.name] = {impl.name: ask_child(cfg, "split", case, impl.name) for impl in impls}
        for name, split in r.items():
            kinds = ", ".join(f"{k} {split.get(k, 0):.3f}" for k in ("linear", "relative", "attention", "rest"))
            print(f"  {case.name} {name}, seconds a step: {kinds}", flush=True)
    return []


def section_registers(cfg, impls, results):
    """Registers, spills and shared memory of every kernel launch, compiled ahead of time (aot.py)."""
    if launch.INTERPRETED:
        print("  skipped: TRITON_INTERPRET is set, the ahead-of-time compile needs it unset")
        return []
    rows = aot.register_table([aot.space_layer(SPACES[name]) for name in SPACE_NAMES], archs=(80, 90))
    aot.print_register_table(rows, indent="  ")
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


def write_jpegs(folder, count, size=224, classes=10, seed=0):
    """`count` size x size JPEGs (quality 90) in FOLDER/<class>/: smooth colour fields with pixel
    noise, so that they compress and decode like photographs rather than like noise."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        coarse = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)  # (size, size, 3)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
        path = folder / f"class{i % classes}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def section_loader(cfg, impls, results):
    """The evaluation loader on 224 px JPEGs, as cli.val_batches runs it: decoding, the bicubic resize
    to 256 and the centre crop (uint8) per image in the worker processes (0: in this one), then the
    normalisation of whole batches here; images/s per number of workers."""
    rows, results["loader"] = [], {}
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(Path(root), cfg.loader_images)
        _, images = data.read_split(root)
        crop, mean_std = data.evaluation_transform("folder", 224, normalised=False), data.NORMALISATION["folder"]
        for workers in (0, 1, 2):
            loader = data.make_loader(images, None, crop, 32, workers)
            batches = data.normalise_batches(loader, mean_std)  # as cli.val_batches
            rate = results["loader"][workers] = data.measure_throughput(batches, max_batches=len(loader))
            rows.append((f"eval loader, 224 px JPEGs, {workers} workers (images/s)", rate, None, None))
            print(f"  {workers} workers: {rate:.1f} images/s", flush=True)
    return rows


def val_scores(supernet, subnet, images, labels, batch=500):
    """(2, images): 1.0 where `subnet` classifies the image right, else 0.0; and the log-probability
    it gives the right class."""
    scores = []
    for x, y in zip(images.split(batch), labels.split(batch)):
        logp = supernet(x, subnet).float().log_softmax(-1)  # (B, classes)
        scores.append(torch.stack([(logp.argmax(-1) == y).float(), logp.gather(1, y[:, None])[:, 0]]))
    return torch.cat(scores, 1)


def section_ranking(cfg, impls, results):
    """How well n images rank subnets: each subnet's hits and log-likelihoods on every val image of the
    checkpoint's data set (images the supernet never trained on; scored in bf16, as search.py scores),
    then for each n the mean Spearman between the rankings, by top-1 and by mean log-likelihood, of
    20 pairs of disjoint random n-image sets."""
    checkpoint = load_checkpoint(cfg.checkpoint, supernet=True)
    supernet = load_supernet(cfg.checkpoint).to(torch.bfloat16).eval()
    space, rng = supernet.space, random.Random(cfg.seed)
    images, labels = load_split(checkpoint, cfg.checkpoint, "val")
    (lo, hi) = search.windows(space, search.SearchConfig())["params"][1]
    groups = {"window": [], "space": []}
    while len(groups["window"]) < 40 or len(groups["space"]) < 30:
        subnet = space.sample(rng)
        inside = lo <= count_params(space, subnet) <= hi
        for name, wanted, ok in (("window", 40, inside), ("space", 30, True)):
            if ok and len(groups[name]) < wanted and subnet not in groups[name]:
                groups[name].append(subnet)
    rows, results["ranking"], generator = [], {}, torch.Generator().manual_seed(cfg.seed)
    images = images.to(torch.bfloat16)
    with torch.inference_mode():
        for name, subnets in groups.items():
            scores = torch.stack([val_scores(supernet, s, images, labels) for s in subnets])  # (subnets, 2, images)
            top1 = 100 * scores[:, 0].mean(1)
            results["ranking"][name] = {"subnets": len(subnets), "top1_range": [top1.min().item(), top1.max().item()]}
            for n in (250, 500, 1000):
                pairs = [torch.randperm(len(labels), generator=generator)[:2 * n] for _ in range(20)]
                for k, score in enumerate(("top1", "loglik")):
                    rho = statistics.mean(spearman_rho(scores[:, k, p[:n]].mean(1).numpy(),
                                                   scores[:, k, p[n:]].mean(1).numpy()) for p in pairs)
                    results["ranking"][name][f"spearman_{score}_n{n}"] = rho
                    rows.append((f"ranking: Spearman, {len(subnets)} of {name}, n={n}, {score}", rho, None, None))
            print(f"  {name}: {len(subnets)} subnets, val top-1 {top1.min():.1f} to {top1.max():.1f} %", flush=True)
    return rows


SECTION_FNS = {"matmul": section_matmul, "train": section_train, "split": section_split, "memory": section_memory,
               "data": section_data, "loader": section_loader, "registers": section_registers,
               "ranking": section_ranking}


def print_table(rows):
    """rows: (label, project, official or None, target (op, ratio) or None)."""
    if not rows:  # sections that print their own (split, registers)
        return
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


def parse_args():
    p = config_parser(BenchConfig, __doc__)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: see start_child
    args = vars(p.parse_args())
    return BenchConfig(**{k: v for k, v in args.items() if k != "child"}), args["child"]


def main():
    cfg, child = parse_args()
    if child:
        return child_main(json.loads(child))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sections = [s for s in cfg.only.split(",") if s] or [s for s in SECTION_FNS if s != "ranking"]
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
        write_atomic(cfg.out, json.dumps(results, indent=1))  # after every section: a run killed midway leaves some
    print_table(rows)
    print(f"\nwrote {cfg.out}")


if __name__ == "__main__":
    main()
