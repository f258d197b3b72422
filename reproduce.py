"""Reproduce the paper's claims on this repository's task, in one command, measured honestly.

AutoFormer (arXiv 2107.00651) claims, each measured here on the built-in set (or --data) in the cpu
space with the recipe of `python train.py`:
  (a) weight entanglement trains a better supernet than classical weight sharing (every choice its
      own weights): both trained with the same steps and seed; their losses, sizes, memory, and the
      val top-1 of the smallest, middle and largest subnets and of each one's search winner;
  (b) inherited weights rank subnets as retraining them from scratch does: the smallest, middle and
      largest subnets, 5 drawn across the parameter range and the search winner, retrained;
      Kendall's tau and Spearman's rho between inherited and retrained top-1, bootstrap intervals;
  (c) the winner's inherited weights are nearly as good as fine-tuning or retraining it;
  (d) the searched winner beats a hand-designed subnet (one MLP ratio and head count throughout,
      as ViT and DeiT) of its size, both retrained with three seeds.

    python reproduce.py                        # 2 CPU cores: planned at 1 h 29 min, took 1 h 52 min
    python reproduce.py --jobs 1               # one job at a time: the same numbers, planned at 3 h
    python reproduce.py --resume               # continue after a kill: finished jobs are skipped
    python reproduce.py --quick --out /tmp/r   # every code path on a tiny set, in under a minute
    python reproduce.py --data ~/cifar-10-batches-py --out out/reproduce-cifar

The protocol (subnets, seeds, budgets, the rules that pick the winner's comparisons, the jobs each
job needs) is fixed in code and written to OUT/results.json as its "plan" before anything trains.
Each job runs in a process of its own on one thread, in its folder OUT/<job id> (its output in
log.txt), --jobs of them at once: whenever one ends, the first job in plan order whose needs are
done starts. On the 2-core machine (batch 64, bf16) a training step of the smallest subnet took 87 ms
on two threads and 89-102 ms on one thread beside a second such process, of the largest 275 ms and
405 ms: the small ops of a 32 px model parallelise poorly, so two processes of one thread train 1.4
to 1.8 times the images a second of one process of two. A job's
numbers do not depend on the schedule, its process and its thread being its own: --jobs 1 gives
the same. Only this process records finished jobs in results.json, atomically; a killed training
resumes through train.py's own --resume. The estimate printed at the start (and above) is the
planned MACs at PRIOR_MACS_PER_S a process, --jobs processes at once; the ETA then takes the rate
of the jobs finished. Writes OUT/results.json, OUT/results.md (a table per claim, the paper's
figures beside), OUT/losses.png and OUT/inherited_vs_retrained.png.
"""
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
import plot
import search
import train
from autoformer import evaluate
from cli import clock, load_split, parse_config, refuse_changed_settings, write_atomic
from supernet import (SHARINGS, SPACES, SearchSpace, Subnet, Supernet, count_flops, count_params, load_checkpoint,
                      load_supernet)


@dataclass
class ReproduceConfig:
    out: str = field(default="out/reproduce", metadata={"help": "folder of the results and of every job's run"})
    data: str = field(default="", metadata={"help": "image folder or CIFAR, passed to train.py and search.py; "
                                                    "empty: the built-in set, data/synthetic"})
    seed: int = field(default=0, metadata={"help": "seeds the supernets, the searches, the subnets drawn, the "
                                                   "retraining (claim d: seed, seed + 1, seed + 2), the bootstrap"})
    quick: bool = field(default=False, metadata={"help": "a test of every code path: a tiny built-in set made in "
                                                         "OUT, 1 epoch at batch 8, a search of 4 x 2 subnets"})
    resume: bool = field(default=False, metadata={"help": "continue the reproduction in OUT with its recorded plan"})
    max_jobs: int = field(default=0, metadata={"help": "stop after this many jobs (continue with --resume); 0: all"})
    jobs: int = field(default=2, metadata={"help": "jobs run at once, each a process of one thread (2: one per core "
                                                   "of the 2-core machine); 1: one after another, the same numbers"})


RUNTIME_FIELDS = ("out", "resume", "max_jobs", "jobs")  # --resume takes these from the command line
QUICK_DATA = {"n_train": 40, "n_val": 20}  # 10 classes: 1 minival image each, 3 steps of 8 per epoch
QUICK_TRAIN = {"epochs": 1, "batch_size": 8, "workers": 0, "log_every": 1}
QUICK_SEARCH = {"population": 4, "generations": 1, "parents": 2, "mutations": 2, "crossovers": 2}
POOL, SIXTHS = 1000, (1, 2, 3, 4, 5)  # claim (b): subnets at these sixths of 1000 drawn, by parameters
FINETUNE_FRACTION = 40 / 500  # the paper fine-tunes 40 epochs after a 500-epoch supernet
BOOTSTRAP = {"resamples": 2000, "level": 95}
# A training step costs more than its MACs: every op has a fixed cost, which weighs most on small
# subnets. On this repository's 2-core machine, one thread, batch 64, bf16, a step took 90 ms for the
# smallest cpu subnet (11.9 M MACs per image) and 406 ms for the largest (86.8 M): 40 ms a step, as
# much as 9.4 M MACs more per image. So training is priced at its MACs + TRAIN_OVERHEAD_MACS.
TRAIN_OVERHEAD_MACS = 10e6
# Before any job has finished, the ETA assumes each job's process (one thread) runs at the rate of
# the steps above: 3 x 64 x (11.9 M + TRAIN_OVERHEAD_MACS) in 90 ms and 3 x 64 x (86.8 M + 10 M) in
# 406 ms are 4.7e10 and 4.6e10 MACs a second; and that two such processes on the two cores are as
# fast each. Finished jobs then replace it with the rate measured here, a process at a time.
PRIOR_MACS_PER_S = 4.6e10
THREADS_PER_JOB = 1
PAPER = {  # the paper's ImageNet top-1 (%)
    "a": {"entangled": "81.3-81.7 %", "classical": "69.7-71.5 %"},  # supernet-S, inherited weights
    # (inherited, retrained)
    "b": {"AutoFormer-T": (74.7, 74.9), "AutoFormer-S": (81.7, 81.7), "AutoFormer-B": (82.4, 82.6)},
}

# ----------------------------------------------------------------------------- the protocol


def plan_subnets(space, pool):
    """The subnets of claim (b), fixed by the seed alone: the smallest, middle and largest (the ones
    train.py follows) and those at 1/6 .. 5/6 of `pool` (POOL subnets drawn with random.Random(seed))
    sorted by parameters (a stable sort: ties in the order drawn); one chosen already gives way to
    the next. Returned in order of parameters."""
    chosen = train.fixed_subnets(space)
    pool = sorted(pool, key=lambda s: count_params(space, s))
    for k in SIXTHS:
        i = k * len(pool) // 6
        while pool[i] in chosen.values():
            i += 1
        chosen[f"q{k}of6"] = pool[i]
    return dict(sorted(chosen.items(), key=lambda item: count_params(space, item[1])))


def hand_designed(space, target):
    """Claim (d)'s baseline: of the subnets with one MLP ratio and one head count in every layer, as
    ViT and DeiT are designed, the one whose parameter count is closest to `target`'s; ties go to
    the smaller."""
    goal = count_params(space, target)
    uniform = [Subnet(E, [ratio] * depth, [heads] * depth) for E in space.embed_dims for depth in space.depths
               for ratio in space.mlp_ratios for heads in space.num_heads]
    return min(uniform, key=lambda s: (abs(count_params(space, s) - goal), count_params(space, s)))


def needs(job, earlier, subnets):
    """The ids of the jobs whose files `job` reads, all among `earlier`. The retraining of the winner
    or of the hand-designed subnet (the winner's function) also waits for the earlier retrainings
    of its seed: it takes the result of one of the same subnet (run_retrain), and so trains or not
    whatever the schedule. The plan's own subnets, the supernets and the memory need nothing."""
    kind, name = job["kind"], job["name"]
    if kind == "retrain" and name not in subnets:
        return ["search/entangled", *(j["id"] for j in earlier if j["kind"] == "retrain" and j["seed"] == job["seed"])]
    return {"search": [f"supernet/{name}"],
            "inherited": [f"supernet/{name}", *(f"search/{s}" for s in SHARINGS)],  # both winners inherit
            "finetune": ["supernet/entangled", "search/entangled"]}.get(kind, [])


def plan_space(plan):
    return dataclasses.replace(SPACES[plan["space"]], num_classes=plan["data"]["classes"])


def subnet_record(space, subnet):
    return {"subnet": json.loads(subnet.to_json()), "params": count_params(space, subnet),
            "macs": count_flops(space, subnet)}


@dataclass
class Setup:
    """What the plan is made of: the recipe every training follows, the search's settings, the data
    set's sizes, the subnets of claim (b) and the MACs that price the jobs."""

    recipe: train.TrainConfig
    search: search.SearchConfig
    space: SearchSpace
    dataset: dict
    subnets: dict
    macs: dict  # name -> forward MACs per image; "mean" of the space, "window" of the search's window

    @classmethod
    def of(cls, cfg):
        """The setup of `cfg`; --quick first makes its tiny built-in set, inside OUT so that it goes
        with the results."""
        root = data.ensure_synthetic(Path(cfg.out) / "data", **QUICK_DATA) if cfg.quick else cfg.data
        recipe = train.TrainConfig(data=str(root), seed=cfg.seed, **(QUICK_TRAIN if cfg.quick else {}))
        settings = search.SearchConfig(data=str(root), seed=cfg.seed, **(QUICK_SEARCH if cfg.quick else {}))
        root = Path(root) if root else Path(train.__file__).resolve().parent / "data" / "synthetic"
        if not recipe.data:
            data.ensure_synthetic(root)
        dataset = data.load_dataset(root, verify=False)
        space = dataclasses.replace(SPACES[recipe.space], num_classes=len(dataset.class_names))
        kept, held = data.split_minival(len(dataset.train), recipe.minival, recipe.seed, dataset.train.labels)
        sizes = {"root": str(root), "kind": dataset.kind, "classes": len(dataset.class_names),
                 "train_images": len(kept), "minival_images": len(held), "val_images": len(dataset.val),
                 "steps_per_epoch": len(kept) // recipe.batch_size}
        rng = random.Random(cfg.seed)
        pool = [space.sample(rng) for _ in range(POOL)]
        lo, hi = search.windows(space, settings)["params"][1]
        subnets = plan_subnets(space, pool)
        macs = {name: count_flops(space, s) for name, s in subnets.items()}
        macs["mean"] = statistics.mean(count_flops(space, s) for s in pool)
        macs["window"] = statistics.mean(count_flops(space, s) for s in pool if lo <= count_params(space, s) <= hi)
        return cls(recipe, settings, space, sizes, subnets, macs)

    @property
    def finetune(self):
        """Claim (c)'s fine-tuning: the paper's share of the supernet's epochs, rounded up, with the
        recipe's warm-up scaled alike (1 of 20 epochs -> 0.1 of 2): Adam's first updates have the
        full size of the learning rate whatever the gradient, its moments starting at zero, so a
        short warm-up keeps them from knocking the inherited weights about."""
        epochs = math.ceil(FINETUNE_FRACTION * self.recipe.epochs)
        return {"epochs": epochs, "warmup_epochs": self.recipe.warmup_epochs * epochs / self.recipe.epochs}

    def cost(self, kind, name):
        """A job's planned multiply-accumulates: 3 x (forward MACs + TRAIN_OVERHEAD_MACS) x images
        trained (forward and backward), or forward MACs x images scored. A supernet trains at its
        space's mean subnet, a search scores at its window's mean, as do the winner and the
        hand-designed subnet, unknown when the plan is made."""
        d, r, s, macs = self.dataset, self.recipe, self.search, self.macs
        epoch = 3 * d["steps_per_epoch"] * r.batch_size  # x (forward MACs + overhead): an epoch's training
        trained = {name: m + TRAIN_OVERHEAD_MACS for name, m in macs.items()}
        return {"supernet": r.epochs * epoch * trained["mean"],
                "memory": 2 * 3 * r.batch_size * trained["largest"],  # two steps
                "search": ((s.generations + 1) * s.population * d["minival_images"] + d["val_images"]) * macs["window"],
                "inherited": d["val_images"] * (sum(macs[n] for n in self.subnets) + 2 * macs["window"]),
                "finetune": self.finetune["epochs"] * epoch * trained["window"],
                "retrain": r.epochs * epoch * trained.get(name, trained["window"])}[kind]

    def job(self, kind, name, seed=None):
        """One job of the plan: its id (its key in results.json and its folder in OUT), what it does,
        in words, its cost."""
        what = {"supernet": f"train the {name} supernet", "memory": f"the {name} supernet's training-step memory",
                "search": f"search the {name} supernet", "inherited": f"val top-1 of the subnets inheriting from "
                f"the {name} supernet", "finetune": f"fine-tune the {name} from its inherited weights",
                "retrain": f"retrain {name} from scratch, seed {seed}"}[kind]
        return {"id": f"{kind}/{name}" + ("" if seed is None else f"/seed{seed}"), "kind": kind, "name": name,
                "seed": seed, "what": what, "cost": self.cost(kind, name)}

    def plan(self, cfg, jobs):
        """The plan as results.json holds it; each job with the ids of the jobs it needs."""
        return {"config": dataclasses.asdict(cfg), "data": self.dataset, "space": self.recipe.space,
                "recipe": dataclasses.asdict(self.recipe), "search": dataclasses.asdict(self.search),
                "finetune": self.finetune,
                "subnets": {name: subnet_record(self.space, s) for name, s in self.subnets.items()},
                "rules": {"winner": "the entangled search's best.json",
                          "hand": "of the subnets with one MLP ratio and one head count in every layer, the one "
                                  "whose parameters are closest to the winner's; ties: the smaller",
                          "retrain": "train.py --subnet, the recipe, from scratch; a subnet and seed retrained "
                                     "already is not retrained"},
                "memory": {"subnet": "largest", "batch_size": self.recipe.batch_size, "dtype": self.recipe.dtype},
                "bootstrap": dict(BOOTSTRAP, seed=cfg.seed), "threads_per_job": THREADS_PER_JOB,
                "jobs": [dict(job, needs=needs(job, jobs[:i], self.subnets)) for i, job in enumerate(jobs)],
                "planned_macs": sum(j["cost"] for j in jobs), "prior_macs_per_s": PRIOR_MACS_PER_S}

# ----------------------------------------------------------------------------- the reproduction


def reproduce(cfg, typed=frozenset()):
    """Run, or continue, the reproduction `cfg` describes; returns results.json's contents. `typed`:
    the flags given on the command line; with --resume, those outside RUNTIME_FIELDS must agree
    with the recorded plan."""
    cfg, results = open_out(cfg, typed)
    out, seed = Path(cfg.out), cfg.seed
    if results is None:  # a fresh reproduction: the whole protocol, fixed before anything trains
        setup = Setup.of(cfg)
        jobs = [
            # (a) two supernets, the same recipe and seed: only how the subnets share weights differs
            *(setup.job("supernet", s) for s in SHARINGS),
            *(setup.job("memory", s) for s in SHARINGS),
            *(setup.job("search", s) for s in SHARINGS),
            # (a), (b), (c): every subnet of the plan and both winners with the weights they inherit
            *(setup.job("inherited", s) for s in SHARINGS),
            # (c) the entangled winner fine-tuned briefly from its inherited weights
            setup.job("finetune", "winner"),
            # (b) the subnets (needing nothing: they train beside the supernets) and the winner
            # retrained from scratch; (c) reads the winner's
            *(setup.job("retrain", name, seed) for name in [*setup.subnets, "winner"]),
            # (d) the winner and the hand-designed subnet of its size, three seeds each
            *(setup.job("retrain", "winner", seed + k) for k in (1, 2)),
            *(setup.job("retrain", "hand", seed + k) for k in (0, 1, 2)),
        ]
        results = {"plan": setup.plan(cfg, jobs), "jobs": {}}
        for name, subnet in setup.subnets.items():
            write_atomic(out / "subnets" / f"{name}.json", subnet.to_json() + "\n")
        save(out, results)
    plan, done = results["plan"], results["jobs"]
    announce(out, plan, done, cfg.jobs)
    running, failures, started, began = {}, [], 0, time.time()  # running: job id -> Running
    part = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0}  # this invocation's share of the
    # wall time, kept in results.json's "runs" once it starts a job
    try:
        while True:
            # fill the free slots with the first jobs in plan order whose inputs are done; none after a failure
            while len(running) < cfg.jobs and not failures and not (cfg.max_jobs and started == cfg.max_jobs):
                job = next_ready(plan, done, running)
                if job is None:
                    break
                running[job["id"]] = start_job(out, job)
                if not started:
                    results.setdefault("runs", []).append(part)
                started += 1
                progress(plan, done, cfg.jobs, job, f"started ({len(running)} running)", began)
            if not running:
                break
            child = running.pop(wait_any(running))
            job, seconds = child.job, time.time() - child.start
            part["seconds"] = time.time() - began
            if child.process.exitcode:  # the others finish and are recorded; then the run stops
                failures.append(failure(out, job, child.process.exitcode))
                print(failures[-1], flush=True)
                continue
            done[job["id"]] = dict(json.loads((out / job["id"] / "record.json").read_text()), seconds=seconds)
            save(out, results)  # a kill from here on loses nothing of this job
            progress(plan, done, cfg.jobs, job, f"done in {clock(seconds)}", began)
    finally:
        stop(running)  # left only by an exception here (Ctrl-C): the jobs resume with --resume
        part["seconds"] = time.time() - began
        if started:
            save(out, results)
    if failures:
        raise JobFailed("\n".join(failures))
    if len(done) < len(plan["jobs"]):
        print(f"stopped after {started} jobs (--max-jobs {cfg.max_jobs}): continue with --resume", flush=True)
    else:
        results["results"] = summarise(plan, done)
        save(out, results)
        write_report(out, results)
    return results


def open_out(cfg, typed):
    """(the config to run, the recorded results or None). A fresh run needs a new --out, so that no
    earlier result is mixed in or lost; --resume continues with the recorded settings."""
    out = Path(cfg.out)
    path = out / "results.json"
    if cfg.quick and cfg.data:
        raise ValueError(f"--quick makes its own tiny built-in set: drop --data {cfg.data}")
    if cfg.jobs < 1:
        raise ValueError(f"--jobs {cfg.jobs}: expected 1 or more jobs at once")
    if not cfg.resume:
        if out.exists():
            raise ValueError(f"{out} exists: pass --resume to continue the reproduction in it, or delete it to "
                             "start afresh")
        return cfg, None
    if not path.is_file():
        raise ValueError(f"{path}: missing, so {out} holds no plan to continue: delete {out} and start afresh "
                         "without --resume")
    try:
        results = json.loads(path.read_text())
        recorded = ReproduceConfig(**results["plan"]["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not the results of a reproduction by this reproduce.py ({e})") from None
    refuse_changed_settings(cfg, recorded, typed - set(RUNTIME_FIELDS), path)
    return dataclasses.replace(recorded, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}), results


def save(out, results):
    write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")


def eta(plan, done, slots):
    """Seconds left: the planned MACs of the jobs not done, at the rate a job's process ran so far
    (PRIOR_MACS_PER_S before the first) times the `slots` processes at once; a job that reused
    another's result ran nothing."""
    ran = [(job["cost"], done[job["id"]]["seconds"]) for job in plan["jobs"]
           if job["id"] in done and "same_as" not in done[job["id"]]]
    cost, seconds = map(sum, zip(*ran)) if ran else (0, 0)
    rate = cost / seconds if seconds > 0 else PRIOR_MACS_PER_S
    return sum(job["cost"] for job in plan["jobs"] if job["id"] not in done) / (rate * slots)


def announce(out, plan, done, slots):
    planned = plan["planned_macs"] / (PRIOR_MACS_PER_S * slots)
    print(f"reproduction in {out}: {len(plan['jobs'])} jobs, {len(done)} done, {slots} at "
          f"once, each a process of {plan['threads_per_job']} thread; planned {plan['planned_macs']:.2e} MACs, about "
          f"{clock(planned)} on the README's 2-core machine; left: {clock(eta(plan, done, slots))}", flush=True)


def progress(plan, done, slots, job, event, began):
    i = next(i for i, j in enumerate(plan["jobs"], 1) if j["id"] == job["id"])
    print(f"==> job {i}/{len(plan['jobs'])} {event}: {job['what']}  elapsed {clock(time.time() - began)}  "
          f"eta {clock(eta(plan, done, slots))}", flush=True)

# ----------------------------------------------------------------------------- the jobs' processes

# Every job runs in a process of its own, forked from a server process that has imported this file
# and torch._dynamo (which AdamW imports at its first use) and run nothing else: each job starts as
# a fresh process would, without a fresh process's seconds of imports.
PROCESSES = multiprocessing.get_context("forkserver")
PRELOAD = ["reproduce", "torch._dynamo"]


class JobFailed(RuntimeError):
    pass


@dataclass
class Running:
    """A job started: its process, the end of a pipe that the process watches (closed, however this
    process ends, the job ends: a job outliving the run would go on writing where --resume starts
    it again), the time it started."""

    job: dict
    process: multiprocessing.process.BaseProcess
    lifeline: multiprocessing.connection.Connection
    start: float


def next_ready(plan, done, running):
    """The first job in plan order that is neither done nor running and whose needs are done."""
    return next((job for job in plan["jobs"] if job["id"] not in done and job["id"] not in running
                 and all(other in done for other in job["needs"])), None)


def start_job(out, job):
    (out / job["id"]).mkdir(parents=True, exist_ok=True)
    PROCESSES.set_forkserver_preload(PRELOAD)  # read when the server starts, at the first job
    watched, lifeline = PROCESSES.Pipe(duplex=False)
    process = PROCESSES.Process(target=job_child, args=(str(out), job["id"], watched), name=job["id"])
    process.start()
    watched.close()
    return Running(job, process, lifeline, time.time())


def wait_any(running):
    """The id of a running job whose process has ended, once one has."""
    ended = multiprocessing.connection.wait([child.process.sentinel for child in running.values()])
    job_id = next(job_id for job_id, child in running.items() if child.process.sentinel in ended)
    running[job_id].process.join()
    return job_id


def failure(out, job, code):
    log = out / job["id"] / "log.txt"
    lines = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else ["(no log: the process died "
                                                                                       "before it began one)"]
    tail = "\n".join("    " + line for line in lines)
    return (f"job {job['id']} ({job['what']}) failed with exit code {code}; the last lines of {log}:\n{tail}\n"
            f"no job starts after it; fix the cause and continue with --resume")


def stop(running):
    for child in running.values():
        child.process.kill()
        child.process.join()


def job_child(out, job_id, lifeline):
    """Runs in a process of its own (start_job): the job `job_id` of the plan in OUT/results.json, on
    one thread, its output appended to OUT/<job>/log.txt so that jobs at once do not interleave
    their lines; its record goes to OUT/<job>/record.json, for the run to take into results.json."""
    log = os.open(Path(out) / job_id / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)  # file descriptors, not sys.stdout: torch's own warnings go there too
    os.dup2(log, 2)
    torch.set_num_threads(THREADS_PER_JOB)
    threads = str(THREADS_PER_JOB)  # for the processes the job starts: the memory measurement's, loaders'
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    threading.Thread(target=lambda: (lifeline.poll(None), os._exit(1)), daemon=True).start()
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    job = next(job for job in results["plan"]["jobs"] if job["id"] == job_id)
    print(f"==> {job_id}: {job['what']}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    record = RUNNERS[job["kind"]](Work(out, results["plan"], results["jobs"]), job)
    write_atomic(out / job_id / "record.json", json.dumps(record, indent=1) + "\n")

# ----------------------------------------------------------------------------- the jobs


class Work:
    """What the jobs share: the plan, the finished jobs' records, the folders (a job's is OUT/<its
    id>), the val split and the subnets by name, the winner's once its search is done."""

    def __init__(self, out, plan, done):
        self.out, self.plan, self.done = Path(out), plan, done
        self.space = plan_space(plan)

    def recipe(self, **changes):
        return train.TrainConfig(**{**self.plan["recipe"], **changes})

    def supernet_path(self, sharing):
        return self.out / "supernet" / sharing / "ckpt.pt"

    def subnet(self, name):
        """(Subnet, its JSON file) of a name of the plan, "winner" (the entangled search's),
        "classical-winner" or "hand" (the hand-designed one of the winner's size)."""
        if name in ("winner", "classical-winner"):
            path = self.out / "search" / ("entangled" if name == "winner" else "classical") / "best.json"
        else:
            path = self.out / "subnets" / f"{name}.json"
            if name == "hand":  # the same file every time: a function of the winner alone
                write_atomic(path, hand_designed(self.space, self.subnet("winner")[0]).to_json() + "\n")
        return Subnet.from_json(path.read_text()), path

    def val(self, path):
        """The whole val split of the data set that train.py's checkpoint `path` was trained on (every
        training of the plan: the recipe's)."""
        return load_split(load_checkpoint(path, mmap=True), path, "val", self.plan["recipe"]["data"] or None)

    def trained(self, folder, **changes):
        """train.train in `folder`: a finished run is read, an interrupted one resumed (train.py's
        --resume), else started. Returns (the model, train.train's result)."""
        resume = (folder / "ckpt.pt").is_file()
        result = train.train(self.recipe(out=str(folder), resume=resume, **changes))
        return result["model"], result


def run_supernet(work, job):
    model, result = work.trained(work.out / job["id"], sharing=job["name"])
    return {"checkpoint": str(result["checkpoint"]), "params": sum(p.numel() for p in model.parameters()),
            "loss": result["history"]["loss"]}


def run_memory(work, job):
    """The supernet's training-step memory, in a fresh process (memory_child), so that nothing this
    process holds is counted. MALLOC_MMAP_THRESHOLD_ fixes glibc's mmap threshold (it otherwise
    grows after frees): every block of 64 KiB or more goes back to the system when freed, so RSS
    follows the memory in use."""
    spec = {"space": work.plan["space"], "data": work.plan["data"], "sharing": job["name"],
            "recipe": work.plan["recipe"]}
    child = subprocess.run([sys.executable, "-c", "import sys, reproduce; reproduce.memory_child(sys.argv[1])",
                            json.dumps(spec)], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                           env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    if child.returncode:
        raise RuntimeError(f"the memory measurement of the {job['name']} supernet failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.splitlines()[-1])


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(spec):
    """Runs in a fresh process (run_memory) and prints one JSON line, in MiB: "state", the bytes of
    the supernet's weights and of AdamW's state for every parameter (as after a long run); "step",
    how far one training step of the largest subnet at the recipe's batch and dtype (gradients,
    activations) raised the RSS above the RSS before it, after a warm-up step that loaded the
    kernels it uses; "process_peak", the process's RSS high-water mark over that step."""
    spec = json.loads(spec)
    recipe, space = train.TrainConfig(**spec["recipe"]), plan_space(spec)
    torch.manual_seed(0)
    model = Supernet(space, recipe.drop_path, spec["sharing"])
    opt = torch.optim.AdamW(train.param_groups(model, recipe.weight_decay), lr=1e-3, fused=True)
    for p in model.parameters():  # else classical sharing's unused choices would have no state yet
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tensors = [*model.parameters(), *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
    images = torch.randn(recipe.batch_size, space.in_chans, space.img_size, space.img_size)
    labels = torch.randint(space.num_classes, (recipe.batch_size,))
    images, targets = data.mix_batch(images, labels, space.num_classes, recipe.mixup, recipe.cutmix, recipe.smoothing,
                                     torch.default_generator)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step():
        train.train_step(model, opt, scaler, images, targets, [space.largest()], train.DTYPES[recipe.dtype], recipe, 1)

    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the RSS high-water mark (VmHWM) to the RSS now
    before = rss_kib("VmRSS")
    step()
    peak = rss_kib("VmHWM")
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                      "state_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
                      "step_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024,
                      "batch_size": recipe.batch_size, "dtype": recipe.dtype}))


def run_search(work, job):
    sharing = job["name"]
    folder = work.out / job["id"]
    settings = search.SearchConfig(**dict(work.plan["search"], checkpoint=str(work.supernet_path(sharing)),
                                          out=str(folder), resume=(folder / "state.json").is_file()))
    best = search.search(settings)["best"]
    return {"best": best["subnet"], "params": best["params"], "macs": best["flops"], "minival_top1": best["top1"],
            "val_top1": best["val_top1"], "folder": str(folder)}


def run_inherited(work, job):
    """Val top-1 (fp32, the whole split) of every subnet of the plan and both winners, with the
    weights they inherit from this supernet."""
    path = work.supernet_path(job["name"])
    supernet, val = load_supernet(path).eval(), work.val(path)
    names = [*work.plan["subnets"], "winner", "classical-winner"]
    subnets = {name: work.subnet(name)[0] for name in names}
    return {"top1": {name: evaluate(supernet, val, s)["top1"] for name, s in subnets.items()},
            "subnets": {name: json.loads(s.to_json()) for name, s in subnets.items()}}


def run_finetune(work, job):
    subnet, path = work.subnet("winner")
    model, result = work.trained(work.out / job["id"], subnet=str(path), inherit=str(work.supernet_path(
        "entangled")), **work.plan["finetune"])
    return {"subnet": json.loads(subnet.to_json()), "val_top1": evaluate(model, work.val(result["checkpoint"]))["top1"]}


def run_retrain(work, job):
    """Retrain a subnet from scratch with the recipe, unless the same subnet was retrained with the
    same seed already (the winner may be one of the plan's subnets, the hand-designed one the
    winner): then that job's result is this one's."""
    subnet, path = work.subnet(job["name"])
    as_json = json.loads(subnet.to_json())
    for other, record in work.done.items():
        if other.startswith("retrain/") and record["subnet"] == as_json and record["seed"] == job["seed"]:
            return {"subnet": as_json, "seed": job["seed"], "val_top1": record["val_top1"],
                    "same_as": record.get("same_as", other)}
    model, result = work.trained(work.out / job["id"], subnet=str(path), seed=job["seed"])
    return {"subnet": as_json, "seed": job["seed"], "val_top1": evaluate(model, work.val(result["checkpoint"]))["top1"],
            "checkpoint": str(result["checkpoint"])}


RUNNERS = {"supernet": run_supernet, "memory": run_memory, "search": run_search, "inherited": run_inherited,
           "finetune": run_finetune, "retrain": run_retrain}

# ----------------------------------------------------------------------------- statistics


def kendall_tau_b(x, y):
    """Kendall's tau-b: (concordant - discordant pairs) / sqrt(pairs not tied in x * pairs not tied
    in y). A pair tied in x or y is neither; nan where x or y is constant."""
    sx = np.sign(np.subtract.outer(x, x))  # (n, n): +1 where x_i > x_j; each pair counted twice
    sy = np.sign(np.subtract.outer(y, y))
    untied = np.count_nonzero(sx) * np.count_nonzero(sy)
    return float((sx * sy).sum() / math.sqrt(untied)) if untied else math.nan


def average_ranks(x):
    """Ranks from 1; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=float)
    below, equal = (x[None, :] < x[:, None]).sum(1), (x[None, :] == x[:, None]).sum(1)  # (n,) each
    return below + (equal + 1) / 2


def spearman_rho(x, y):
    """Spearman's rho: Pearson's correlation of the average ranks; nan where x or y is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / norm) if norm else math.nan


def bootstrap(statistic, x, y, resamples, seed, level):
    """Percentile interval of statistic(x, y) over resamples of the pairs drawn with replacement.
    Resamples where it is undefined (nan: every x or every y drawn equal) are skipped. Returns (low,
    high, resamples used); nan, nan, 0 where none is defined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))  # (resamples, n)
    values = [v for v in (statistic(x[i], y[i]) for i in draws) if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    low, high = np.percentile(values, [(100 - level) / 2, (100 + level) / 2])
    return float(low), float(high), len(values)

# ----------------------------------------------------------------------------- results


def summarise(plan, done):
    """The numbers of each claim, from the jobs' records alone."""
    seed, boot = plan["config"]["seed"], plan["bootstrap"]
    inherited = {s: done[f"inherited/{s}"] for s in SHARINGS}
    own_winner = {"entangled": "winner", "classical": "classical-winner"}
    a = {s: {"params": done[f"supernet/{s}"]["params"], "memory": without_seconds(done[f"memory/{s}"]),
             "final_loss": statistics.mean(loss for _, loss in done[f"supernet/{s}"]["loss"][-5:]),
             "val_top1": {n: inherited[s]["top1"][n] for n in ("smallest", "middle", "largest", own_winner[s])},
             "winner": without_seconds(done[f"search/{s}"])} for s in SHARINGS}
    rows = {}  # claim (b): the plan's subnets and the winner, each subnet once
    for name in [*plan["subnets"], "winner"]:
        subnet = inherited["entangled"]["subnets"][name]
        same = [row for row in rows.values() if row["subnet"] == subnet]
        if same:
            same[0]["winner"] = True
            continue
        rows[name] = {"subnet": subnet, "params": count_params(plan_space(plan), Subnet(**subnet)),
                      "retrained": done[f"retrain/{name}/seed{seed}"]["val_top1"], "winner": name == "winner",
                      **{s: inherited[s]["top1"][name] for s in SHARINGS}}
    retrained = [row["retrained"] for row in rows.values()]
    b = {"rows": rows}
    for s in SHARINGS:
        mine = [row[s] for row in rows.values()]
        gaps = [abs(i - r) for i, r in zip(mine, retrained)]
        b[s] = {"mean_abs_gap": statistics.mean(gaps), "max_abs_gap": max(gaps)}
        for name, f in (("kendall_tau_b", kendall_tau_b), ("spearman_rho", spearman_rho)):
            low, high, used = bootstrap(f, mine, retrained, **boot)
            b[s][name] = {"value": f(mine, retrained), "interval": [low, high], "resamples_used": used}
    c = {"inherited": inherited["entangled"]["top1"]["winner"], "finetuned": done["finetune/winner"]["val_top1"],
         "retrained": done[f"retrain/winner/seed{seed}"]["val_top1"], "finetune": plan["finetune"]}
    d = {}
    for name in ("winner", "hand"):
        top1 = [done[f"retrain/{name}/seed{seed + k}"]["val_top1"] for k in range(3)]
        subnet = done[f"retrain/{name}/seed{seed}"]["subnet"]
        d[name] = {"subnet": subnet, "params": count_params(plan_space(plan), Subnet(**subnet)),
                   "seeds": [seed + k for k in range(3)], "val_top1": top1, "mean": statistics.mean(top1),
                   "std": statistics.stdev(top1)}
    return {"a": a, "b": b, "c": c, "d": d, "paper": PAPER}


def without_seconds(record):
    return {k: v for k, v in record.items() if k != "seconds"}


def write_report(out, results):
    """results.md and the two pictures."""
    plan, r = results["plan"], results["results"]
    losses = {s: [tuple(p) for p in results["jobs"][f"supernet/{s}"]["loss"]] for s in SHARINGS}
    title = f"the two supernets, seed {plan['config']['seed']}: the same subnet at every step, the same data"
    write_atomic(out / "losses.png", lambda f: plot.loss_curves(losses, title).save(f, "PNG"))
    points = {s: [(row["retrained"], row[s]) for row in r["b"]["rows"].values()] for s in SHARINGS}
    picture = plot.agreement_scatter(points, "retrained from scratch: val top-1 (%)", "inherited: val top-1 (%)",
                                     f"{len(r['b']['rows'])} subnets, inherited weights against retrained")
    write_atomic(out / "inherited_vs_retrained.png", lambda f: picture.save(f, "PNG"))
    text = "\n\n".join([report_head(plan, results["runs"]), table_a(plan, r["a"]), table_b(r["b"], plan["bootstrap"]),
                         table_c(r["c"]), table_d(r["d"])])
    write_atomic(out / "results.md", text + "\n")
    print(f"results: {out / 'results.md'}, results.json, losses.png, inherited_vs_retrained.png", flush=True)


def report_head(plan, runs):
    d, recipe, s = plan["data"], plan["recipe"], plan["search"]
    wall = sum(run["seconds"] for run in runs)
    return (f"# AutoFormer's claims, measured: {d['kind']} {d['root']}, space {plan['space']}, seed "
            f"{plan['config']['seed']}\n\nWritten by `python reproduce.py`; the plan and every number are in "
            f"results.json. Top-1: the whole val split ({d['val_images']} images), fp32. Every training follows "
            f"`python train.py`'s recipe ({recipe['epochs']} epoch(s) of {d['steps_per_epoch']} steps, batch "
            f"{recipe['batch_size']}, {recipe['dtype']}), every search search.py's settings "
            f"({s['generations'] + 1} generations of {s['population']}, fitness {s['fitness']}; the paper ranks by "
            f"top-1). The paper's figures are ImageNet's. Wall time: {clock(wall)}, in {len(runs)} part(s) "
            "(results.json's \"runs\": one per invocation that ran a job).")


def table_a(plan, a):
    e, c = a["entangled"], a["classical"]
    rows = [("supernet parameters", *(f"{x['params'] / 1e6:.3f} M" for x in (e, c))),
            ("weights + AdamW state (MiB)", *(f"{x['memory']['state_mib']:.1f}" for x in (e, c))),
            ("a training step's rise in RSS (MiB)", *(f"{x['memory']['step_mib']:.0f}" for x in (e, c))),
            ("the process's peak RSS (MiB)", *(f"{x['memory']['process_peak_mib']:.0f}" for x in (e, c))),
            (f"training loss, mean of the last {5 * plan['recipe']['log_every']} steps",  # 5 progress lines
             *(f"{x['final_loss']:.3f}" for x in (e, c)))]
    rows += [(f"{n} subnet, inherited", f"{e['val_top1'][n]:.2f} %", f"{c['val_top1'][n]:.2f} %")
             for n in ("smallest", "middle", "largest")]
    rows += [("its own search's winner, inherited", f"{e['val_top1']['winner']:.2f} % "
              f"({e['winner']['params'] / 1e6:.3f} M)", f"{c['val_top1']['classical-winner']:.2f} % "
              f"({c['winner']['params'] / 1e6:.3f} M)"), ("paper: supernet-S, inherited", *PAPER["a"].values())]
    memory = plan["memory"]
    return "\n".join(["## (a) Weight entanglement against classical weight sharing", "",
                      "| | entangled | classical |", "|---|---|---|",
                      *("| " + " | ".join(r) + " |" for r in rows), "",
                      "Both supernets: the same recipe, seed and subnet of every step. Memory, in a fresh process: "
                      "the bytes of the weights and of AdamW's state of every parameter; how far one training step of "
                      f"the largest subnet (batch {memory['batch_size']}, {memory['dtype']}) raises the RSS (gradients "
                      "and activations), after a warm-up step; the process's RSS high-water mark over that step."])


def table_b(b, boot):
    lines = ["## (b) Inherited weights against retraining from scratch", "",
             "| subnet | params | inherited, entangled | inherited, classical | retrained |", "|---|---|---|---|---|"]
    for name, row in b["rows"].items():
        label = name + (" (the winner)" if row["winner"] and name != "winner" else "")
        lines.append(f"| {label} | {row['params'] / 1e6:.3f} M | {row['entangled']:.2f} % | {row['classical']:.2f} % "
                     f"| {row['retrained']:.2f} % |")
    paper = PAPER["b"].values()
    lines += ["", "| inherited against retrained | entangled | classical | paper (T, S, B) |", "|---|---|---|---|"]
    for key, label in (("kendall_tau_b", f"Kendall's tau-b [{boot['level']} % bootstrap interval]"),
                       ("spearman_rho", f"Spearman's rho [{boot['level']} % bootstrap interval]")):
        cells = [f"{b[s][key]['value']:.3f} [{b[s][key]['interval'][0]:.2f}, {b[s][key]['interval'][1]:.2f}]"
                 for s in SHARINGS]
        lines.append(f"| {label} | {' | '.join(cells)} | |")
    gaps = [abs(i - r) for i, r in paper]
    lines += [f"| mean abs(inherited - retrained) | {b['entangled']['mean_abs_gap']:.2f} | "
              f"{b['classical']['mean_abs_gap']:.2f} | {statistics.mean(gaps):.2f} |",
              f"| largest abs(inherited - retrained) | {b['entangled']['max_abs_gap']:.2f} | "
              f"{b['classical']['max_abs_gap']:.2f} | {max(gaps):.2f} |", "",
              f"Subnets: the smallest, middle and largest, qkof6 the one at k/6 of {POOL} drawn with the seed ranked "
              "by parameters (or past it, the first not chosen already), all fixed before the run, and the entangled "
              f"search's winner. Points, percent. Intervals: {boot['resamples']:,} resamples of the subnets with "
              "replacement, "
              "percentiles; resamples in which every subnet drawn ties are skipped. Picture: "
              "inherited_vs_retrained.png."]
    return "\n".join(lines)


def table_c(c):
    f = c["finetune"]
    lines = ["## (c) The entangled winner: inherited, fine-tuned, retrained", "",
             "| model | inherited | fine-tuned | retrained |", "|---|---|---|---|",
             f"| the winner | {c['inherited']:.2f} % | {c['finetuned']:.2f} % | {c['retrained']:.2f} % |"]
    lines += [f"| {name} (paper) | {i:.1f} % | | {r:.1f} % |" for name, (i, r) in PAPER["b"].items()]
    return "\n".join(lines + ["", f"Fine-tuned: from the inherited weights, {f['epochs']} epoch(s), the paper's "
                              f"share (40 of 500) of the supernet's epochs rounded up; warm-up {f['warmup_epochs']:g} "
                              "epochs, the recipe's scaled alike. Retrained: from scratch, the recipe, claim (b)'s "
                              "run."])


def table_d(d):
    seeds = d["winner"]["seeds"]
    lines = ["## (d) The searched winner against a hand-designed subnet of its size, both retrained", "",
             "| subnet | params | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for name in ("winner", "hand"):
        x = d[name]
        lines.append(f"| {name}: {shape(x['subnet'])} | {x['params'] / 1e6:.3f} M | "
                     + " | ".join(f"{v:.2f} %" for v in x["val_top1"]) + f" | {x['mean']:.2f} +- {x['std']:.2f} % |")
    return "\n".join(lines + ["", "hand: of the subnets with one MLP ratio and one head count in every layer (as ViT "
                              "and DeiT), the one of parameters closest to the winner's. std: the sample standard "
                              "deviation of the seeds."])


def shape(subnet):
    """A subnet in a few words: embed dim, depth, MLP ratios and heads (one value if all layers agree)."""
    def values(xs):
        return f"{xs[0]:g}" if len(set(xs)) == 1 else "/".join(f"{x:g}" for x in xs)
    return (f"embed {subnet['embed_dim']}, depth {len(subnet['num_heads'])}, ratio {values(subnet['mlp_ratios'])}, "
            f"heads {values(subnet['num_heads'])}")


def parse_args(argv):
    return parse_config(ReproduceConfig, argv, __doc__)


def main(argv=None):
    cfg, typed = parse_args(argv)
    try:
        reproduce(cfg, typed)
    except (ValueError, OSError) as e:  # bad flags, data or checkpoints (DataError, CheckpointError)
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobFailed as e:  # what was done is recorded: --resume retries the job
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
