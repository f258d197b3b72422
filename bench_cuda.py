"""The one command for a CUDA device: check the Triton kernels there and measure them, in four stages
of bounded time (7.7 minutes in all), with nothing to install beyond torch, Triton (3.6 or newer),
numpy, pillow and pytest.

    python3 bench_cuda.py                     # every stage; writes out/bench_cuda.json and out/bench_cuda.md
    python3 bench_cuda.py --only ops,step     # some of them

  tests  tests/test_kernels.py compiled on the GPU: every kernel against its reference at awkward
         and real shapes in fp32 / bf16 / fp16, the accuracy rule, 20 training steps against torch
  ops    each op of the largest layer of the tiny, small and base spaces (N = 197, batch 128, bf16
         and fp32): its largest absolute and relative error against the fp32 reference, beside
         the time of forward and forward + backward, Triton against the PyTorch reference; stops
         at the first error past launch.error_bound
  step   the whole supernet training step (bf16 autocast, AdamW), images/s, triton against torch,
         timed as bench.py times it on a CPU
  train  a short `train.py` run of the tiny space at 224 px on generated images, triton against
         torch: losses, top-1 and images/s of each

Each stage runs in a process of its own under its time limit, so a hang or a crash costs that
stage only; each writes out/bench_cuda/<stage>.json as it goes, and after every stage the results
so far are merged into out/bench_cuda.json and the table out/bench_cuda.md. The exit status is 1
if a stage failed, stopped or ran out of time.

A file apart from bench.py because it needs a CUDA device and measures something else: bench.py
compares the reference path with the official code on a CPU; this one the kernels with the
reference. It takes bench.py's training-step helpers, so both time the same step.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

import aot
import launch
from bench import SPACE_NAMES, BenchConfig, TrainCase, project_impl, warmed_up
from cli import write_atomic
from supernet import SPACES

ROOT = Path(__file__).resolve().parent
STAGES = {"tests": 170, "ops": 80, "step": 60, "train": 150}  # each stage's time limit, seconds: 7.7 minutes
TEST_FILE = "tests/test_kernels.py"
# The short training: about 220 steps (22 an epoch), evaluated after each epoch and at the end.
TRAIN_RUN = dict(space="tiny", epochs=10, batch_size=128, log_every=10)
TRAIN_IMAGES = (3000, 500)  # train, val
TEST_PROCESSES = 4  # the tests split over this many processes: Triton compiles a kernel on one core


# --------------------------------------------------------------------------- stage: tests


def bounded(command, seconds, log, env=None):
    """Run `command` with its output in the file `log`; its exit status, or None when it was still
    running after `seconds` (it is killed then, with every process it started)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def stage_tests(folder, args):
    """TEST_FILE compiled on this GPU, its tests dealt round-robin to TEST_PROCESSES pytest processes
    at once, each stopped short of the stage's time limit; their JUnit reports become the counts and
    the failures."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    listing = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", TEST_FILE],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    ids = [line for line in listing.splitlines() if "::" in line]
    deadline = time.perf_counter() + STAGES["tests"] - 20  # leaves the time to read the reports
    chunks = [(ids[i::TEST_PROCESSES], folder / f"tests-{i}") for i in range(TEST_PROCESSES)]
    for chunk, name in chunks:
        name.with_suffix(".xml").unlink(missing_ok=True)
    logs = [open(name.with_suffix(".log"), "w") for _, name in chunks]
    procs = [subprocess.Popen(["timeout", "-s", "KILL", str(int(deadline - time.perf_counter())), sys.executable, "-m",
                               "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={name.with_suffix('.xml')}",
                               *chunk], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
             for (chunk, name), log in zip(chunks, logs)]
    counts, failures = dict(passed=0, failed=0, skipped=0, unfinished=0), []
    for (chunk, name), proc, log in zip(chunks, procs, logs):
        proc.wait()
        log.close()
        if not name.with_suffix(".xml").is_file():  # killed at the deadline: no report
            counts["unfinished"] += len(chunk)
            continue
        for case in ET.parse(name.with_suffix(".xml")).getroot().iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                counts["failed"] += 1
                failures.append(f"{case.get('name')}: {(problem.get('message') or '').splitlines()[0][:300]}")
            else:
                counts["skipped" if case.find("skipped") is not None else "passed"] += 1
    save(folder, "tests", dict(counts, collected=len(ids), failures=failures))
    if failures or counts["unfinished"]:
        raise SystemExit(f"tests: {counts['failed']} failed, {counts['unfinished']} unfinished of {len(ids)}; "
                         f"first failure: {(failures or ['none'])[0]}")


# --------------------------------------------------------------------------- stage: ops


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


def op_work(op, batch, embed_dim, hidden, num_heads, head_dim, num_tokens, max_rel, super_dim, dtype):
    """(work, unit) of an op's forward: FLOPs (rated in TFLOP/s), or bytes moved (GB/s) for LayerNorm."""
    M, E, d, N, T = batch * num_tokens, embed_dim, num_heads * head_dim, num_tokens, 2 * max_rel + 2
    flops = {"qkv": 2 * M * E * 3 * d, "proj+residual": 2 * M * d * E, "fc1+gelu": 2 * M * E * hidden,
             "fc2+residual": 2 * M * hidden * E, "mlp": 4 * M * E * hidden,
             "attention": 4 * batch * num_heads * N * N * head_dim + 8 * batch * num_heads * N * T * head_dim}
    if op == "layer_norm":  # read x, write y, in x's dtype
        return 2 * M * E * torch.finfo(dtype).bits // 8, "GB/s"
    return flops[op], "TFLOP/s"


def op_runner(op, activations, params, dtype, backward):
    """(run, leaves): run() calls op under autocast, as in training (activations in `dtype`,
    parameters fp32), and with `backward` its backward from upstream gradients that are the same
    random values in every call, into the leaves' .grad. Leaves and upstream gradients are made
    once, outside run(), so that cuda_ms(run) times the op alone. run() returns the outputs."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in activations + params]
    upstream = []

    def run():
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(backward), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            outs = op(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if backward:
            if not upstream:
                generator = torch.Generator("cuda").manual_seed(0)
                upstream.extend(torch.randn(o.shape, device="cuda", generator=generator).to(dtype).to(o.dtype)
                                for o in outs)
            torch.autograd.backward(outs, upstream)
        return outs
    return run, leaves


def call(op, activations, params, dtype, backward):
    """One run of op_runner: the outputs and the inputs' gradients."""
    run, leaves = op_runner(op, activations, params, dtype, backward)
    return [o.detach() for o in run()], [t.grad for t in leaves]


def op_errors(triton_op, torch_op, activations, params, dtype):
    """The largest absolute and relative error (to the largest magnitude) of the Triton op's output and
    gradients against the PyTorch reference in fp32 on the same values, PyTorch's own relative error
    in `dtype`, and whether every tensor is within launch.error_bound."""
    low = [a.to(dtype) for a in activations]
    runs = [call(op, acts, params, d, True) for op, acts, d in
            ((triton_op, low, dtype), (torch_op, [a.float() for a in low], torch.float32), (torch_op, low, dtype))]
    (outs, grads), (ref_outs, ref_grads), (low_outs, low_grads) = runs
    worst = dict(abs_error=0.0, rel_error=0.0, torch_rel_error=0.0, within=True)
    for t, r, p in zip(outs + grads, ref_outs + ref_grads, low_outs + low_grads):
        t, r, p = t.float(), r.float(), p.to(t.dtype).float()
        error, torch_error, scale = (t - r).abs().max().item(), (p - r).abs().max().item(), r.abs().max().item()
        worst["abs_error"] = max(worst["abs_error"], error)
        worst["rel_error"] = max(worst["rel_error"], error / scale)
        worst["torch_rel_error"] = max(worst["torch_rel_error"], torch_error / scale)
        worst["within"] &= bool(error <= launch.error_bound(dtype, scale, torch_error))  # NaN fails too
    return worst


def stage_ops(folder, args):
    """Each op: errors first, then forward and forward + backward times of Triton and the reference."""
    rows, peaks = [], {}
    for dtype in (torch.bfloat16, torch.float32):
        tflops_peak, gbs_peak = device_peaks(dtype)
        peaks[str(dtype).removeprefix("torch.")] = dict(matmul_tflops=tflops_peak, copy_gbs=gbs_peak)
        for name in SPACE_NAMES:
            layer = aot.space_layer(SPACES[name])
            for op in aot.OPS:
                torch.manual_seed(0)
                triton_op, torch_op, activations, params = aot.op_case(op, args.batch, **layer)
                activations, params = [a.cuda() for a in activations], [p.cuda() for p in params]
                row = dict(space=name, op=op, dtype=str(dtype).removeprefix("torch."),
                           **op_errors(triton_op, torch_op, activations, params, dtype))
                if not row["within"]:
                    save(folder, "ops", dict(rows=rows + [row], peaks=peaks))
                    raise SystemExit(f"ops: {name} {op} {row['dtype']}: relative error {row['rel_error']:.3g}, past "
                                     f"the bound (PyTorch's own: {row['torch_rel_error']:.3g}); no timing")
                work, unit = op_work(op, args.batch, dtype=dtype, **layer)
                low = [a.to(dtype) for a in activations]
                for mode, factor in (("fwd", 1), ("fwd+bwd", 3 if unit == "TFLOP/s" else 2.5)):
                    for impl, fn in (("triton", triton_op), ("torch", torch_op)):
                        ms = cuda_ms(op_runner(fn, low, params, dtype, mode == "fwd+bwd")[0])
                        rate = factor * work / ms / (1e9 if unit == "TFLOP/s" else 1e6)
                        row[f"{mode} {impl} ms"] = ms
                        row[f"{mode} {impl} of peak"] = rate / (tflops_peak if unit == "TFLOP/s" else gbs_peak)
                rows.append(row)
                print(f"{name:5s} {op:14s} {row['dtype']:8s} error {row['rel_error']:.2e} (torch "
                      f"{row['torch_rel_error']:.2e})  fwd+bwd triton {row['fwd+bwd triton ms']:.3f} ms, "
                      f"torch {row['fwd+bwd torch ms']:.3f} ms", flush=True)
                save(folder, "ops", dict(rows=rows, peaks=peaks))


# --------------------------------------------------------------------------- stage: step


def stage_step(folder, args):
    """Supernet training steps (bf16 autocast, AdamW, one sampled subnet per step, the same sequence
    for both backends), as bench.py times them: images/s per backend and space."""
    rows = []
    for name in SPACE_NAMES:
        cfg, space = BenchConfig(steps=10, warmup=3), SPACES[name]
        case = TrainCase(space.img_size, space.patch_size, args.batch, True, name)
        row = dict(space=name, batch=args.batch)
        for backend in ("triton", "torch"):
            os.environ["AUTOFORMER_BACKEND"] = backend
            step, timed = warmed_up(cfg, case, project_impl(), device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            for subnet in timed:
                step(subnet)
            torch.cuda.synchronize()
            row[f"{backend} images/s"] = args.batch * len(timed) / (time.perf_counter() - start)
            del step
        rows.append(row)
        print(f"train step {name}: triton {row['triton images/s']:.0f} images/s, torch {row['torch images/s']:.0f}",
              flush=True)
        save(folder, "step", dict(rows=rows))


# --------------------------------------------------------------------------- stage: train


def stage_train(folder, args):
    """train.py's training of TRAIN_RUN (the tiny space at 224 px, bf16) on TRAIN_IMAGES of the
    built-in set's kind, 32 px, which the loader scales up to 224, once per backend: the same seed,
    so the same subnets, batches and initial weights. images/s is the whole run's, evaluations and
    checkpoints included."""
    import data
    import train

    images = data.ensure_synthetic(folder / "data", n_train=TRAIN_IMAGES[0], n_val=TRAIN_IMAGES[1])
    runs = {}
    for backend in ("triton", "torch"):
        os.environ["AUTOFORMER_BACKEND"] = backend
        cfg = train.TrainConfig(data=str(images), out=str(folder / f"train-{backend}"), workers=8, **TRAIN_RUN)
        start = time.perf_counter()
        result = train.train(cfg)
        seconds = time.perf_counter() - start
        losses = result["history"]["loss"]  # [(step, mean loss of the steps since the last entry)]
        runs[backend] = dict(steps=losses[-1][0], seconds=seconds, losses=losses, final_loss=losses[-1][1],
                             images_per_s=losses[-1][0] * cfg.batch_size / seconds, top1=result["top1"])
        save(folder, "train", runs)
    gap = max(abs(a[1] - b[1]) for a, b in zip(runs["triton"]["losses"], runs["torch"]["losses"]))
    save(folder, "train", dict(runs, largest_loss_gap=gap))


# --------------------------------------------------------------------------- the command


def save(folder, stage, result):
    write_atomic(folder / f"{stage}.json", json.dumps(result, indent=1))


def markdown(results):
    """The table of out/bench_cuda.md: one section per stage."""
    lines = [f"# bench_cuda.py on {results['device']}", "",
             f"torch {results['torch']}, Triton {results['triton']}, batch {results['batch']}", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s} | {r['status']} | {r['seconds']:.0f} |" for s, r in results["stages"].items()]
    tests = results.get("tests")
    if tests:
        lines += ["", f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                  f"of {tests['collected']}"] + [f"- {f}" for f in tests["failures"]]
    if results.get("ops"):
        lines += ["", "| space | op | dtype | abs error | rel error | PyTorch's rel error | fwd triton / torch ms | "
                  "fwd+bwd triton / torch ms | fwd+bwd speed-up |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["ops"]["rows"]:
            times = [f"{r[f'{m} triton ms']:.3f} / {r[f'{m} torch ms']:.3f}" if f"{m} triton ms" in r else "-"
                     for m in ("fwd", "fwd+bwd")]
            speedup = f"{r['fwd+bwd torch ms'] / r['fwd+bwd triton ms']:.2f}x" if "fwd+bwd triton ms" in r else "-"
            lines.append(f"| {r['space']} | {r['op']} | {r['dtype']} | {r['abs_error']:.2e} | {r['rel_error']:.2e} | "
                         f"{r['torch_rel_error']:.2e} | {times[0]} | {times[1]} | {speedup} |")
    if results.get("step"):
        lines += ["", "| space | batch | triton images/s | torch images/s | speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {r['space']} | {r['batch']} | {r['triton images/s']:.0f} | {r['torch images/s']:.0f} | "
                  f"{r['triton images/s'] / r['torch images/s']:.2f}x |" for r in results["step"]["rows"]]
    runs = {k: v for k, v in results.get("train", {}).items() if isinstance(v, dict)}
    if runs:
        lines += ["", "| backend | steps | images/s | final loss | val top-1 (smallest / middle / largest) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {b} | {r['steps']} | {r['images_per_s']:.0f} | {r['final_loss']:.4f} | "
                  f"{' / '.join(f'{v:.1f}%' for v in r['top1'].values()) or '-'} |" for b, r in runs.items()]
        if "largest_loss_gap" in results["train"]:
            gap = results["train"]["largest_loss_gap"]
            lines += ["", f"largest gap between the two backends' logged losses: {gap:.3g}"]
    return "\n".join(lines) + "\n"


def run_stages(args):
    """Every chosen stage in a child process under its time limit; the merged results after each."""
    folder = Path(args.out) / "bench_cuda"
    folder.mkdir(parents=True, exist_ok=True)
    import triton
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   batch=args.batch, stages={})
    for stage in args.only:
        (folder / f"{stage}.json").unlink(missing_ok=True)
        print(f"--- {stage} (at most {STAGES[stage]} s; log {folder / stage}.log)", flush=True)
        start = time.perf_counter()
        rc = bounded([sys.executable, __file__, "--stage", stage, "--batch", str(args.batch), "--out", args.out],
                     STAGES[stage], folder / f"{stage}.log")
        log = (folder / f"{stage}.log").read_text().strip().splitlines()
        status = "ok" if rc == 0 else "out of time" if rc is None else f"failed: {log[-1] if log else rc}"
        results["stages"][stage] = dict(status=status, seconds=time.perf_counter() - start)
        if (folder / f"{stage}.json").is_file():
            results[stage] = json.loads((folder / f"{stage}.json").read_text())
        print(f"    {status}", flush=True)
        write_atomic(Path(args.out) / "bench_cuda.json", json.dumps(results, indent=1))
        write_atomic(Path(args.out) / "bench_cuda.md", markdown(results))
    print(f"wrote {Path(args.out) / 'bench_cuda.json'} and {Path(args.out) / 'bench_cuda.md'}")
    return all(r["status"] == "ok" for r in results["stages"].values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages, of {', '.join(STAGES)}")
    p.add_argument("--batch", type=int, default=128, help="images per batch, for the ops and the training step")
    p.add_argument("--out", default="out", help="folder for bench_cuda.json, bench_cuda.md and bench_cuda/")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)  # a child: one stage, in-process
    args = p.parse_args()
    args.only = [s for s in args.only.split(",") if s]
    if unknown := set(args.only) - set(STAGES):
        p.error(f"--only {','.join(sorted(unknown))}: choose among {', '.join(STAGES)}")
    if not torch.cuda.is_available():
        p.exit(2, "bench_cuda.py needs a CUDA device; bench.py measures the CPU\n")
    if launch.INTERPRETED:
        p.exit(2, "bench_cuda.py: TRITON_INTERPRET is set; unset it to run the kernels compiled\n")
    if args.stage:
        {"tests": stage_tests, "ops": stage_ops, "step": stage_step, "train": stage_train}[args.stage](
            Path(args.out) / "bench_cuda", args)
    elif not run_stages(args):
        sys.exit(1)


if __name__ == "__main__":
    main()
