"""Search the trained supernet for the most accurate subnet under a budget (AutoFormer, section 3.3).

Every subnet inherits its weights from the supernet, so scoring one is a single inference pass
over the held-out split ("minival", train images that training never used): no retraining. The
fitness that ranks them is the mean log-probability of the right class (--fitness loglik), which
ranks them far more consistently than top-1 (--fitness top1, the paper's and the official code's). The
evolution of the paper (and of the official evolution.py): 50 random subnets, then 20 generations,
each taking the 10 best subnets found so far as parents, making 25 mutations and 25 crossovers of
them and refilling the population of 50 with random subnets: 1,050 subnets scored in all.
`--algorithm random` scores the same number of subnets drawn at random, for the comparison.

    python search.py                                     # out/ckpt.pt, the default parameter window
    python search.py --params 0.5M:0.6M --flops :40M     # windows, any combination
    python search.py --latency-ms 4 --latency-batch 1    # measured on this machine
    python search.py --resume                            # continue a killed search, same result
    torchrun --nproc_per_node=2 search.py                # the candidates split across processes
    python search.py --checkpoint supernet-tiny.pth --space tiny --data IMAGENET --params 5.5M:6M

A released supernet (supernet-tiny.pth, ...) records neither its space (--space names it) nor a
held-out split. Its subnets are ranked on the images the official code ranks them on (with
--fitness top1, by its score too): --fitness-per-class images of each class drawn from
IMAGENET/train with --seed (100 in the official code), or the folder --fitness-data names. These
are images the supernet was trained on, unlike the held-out split of this repository's
checkpoints: the ranking is the official one, not an unbiased one.
The winner is reported on IMAGENET/val.

Writes OUT (default: the checkpoint's folder/search): candidates.jsonl (every scored subnet),
best.json (a Subnet), pareto.json, search.png, latency.jsonl (with --latency-ms), state.json and,
for a released supernet, fitness.json (the fitness images' files, to rebuild the set).
"""
import copy
import dataclasses
import hashlib
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import plot
from autoformer import evaluate, extract
from cli import (checkpoint_space, decode_crops, is_official, load_split, official_split, open_supernet, parse_config,
                 refuse_changed_settings, refuse_official_flags, val_batches, write_atomic)
from data import DataError, draw_per_class
from supernet import Subnet, count_flops, count_params, load_checkpoint


@dataclass
class SearchConfig:
    checkpoint: str = field(default="", metadata={"help": "supernet checkpoint, ours or an official supernet-*.pth; "
                                                          "empty: out/ckpt.pt, with --resume the one the search "
                                                          "recorded"})
    space: str = field(default="", metadata={"help": "the space of an official checkpoint, which records none: tiny, "
                                                     "small or base"})
    out: str = field(default="", metadata={"help": "results folder; empty: the checkpoint's folder/search"})
    algorithm: str = field(default="evolution", metadata={"help": "the same number of subnets scored either way",
                                                          "choices": ("evolution", "random")})
    fitness: str = field(default="loglik", metadata={"help": "what ranks the subnets on the held-out images: the mean "
                                                             "log-probability of the right class (it ranks them far "
                                                             "more consistently) or top-1 (the paper's)",
                                                     "choices": ("loglik", "top1")})
    params: str = field(default="", metadata={"help": "MIN:MAX parameters, e.g. 0.4M:0.6M or :600K; empty: 25%%-45%% "
                                                      "of the way from the space's smallest subnet to its largest"})
    flops: str = field(default="", metadata={"help": "MIN:MAX multiply-accumulates per image, e.g. :40M"})
    latency_ms: float = field(default=0.0, metadata={"help": "max ms per forward of the extracted model, measured "
                                                             "HERE: the figure belongs to this machine. 0: off"})
    latency_batch: int = field(default=1, metadata={"help": "images per forward when measuring latency"})
    population: int = field(default=50, metadata={"help": "subnets per generation"})
    generations: int = field(default=20, metadata={"help": "generations after the random first one"})
    parents: int = field(default=10, metadata={"help": "best subnets so far that mutate and cross over"})
    mutations: int = field(default=25, metadata={"help": "mutated subnets per generation"})
    crossovers: int = field(default=25, metadata={"help": "crossed-over subnets per generation"})
    p_global: float = field(default=0.4, metadata={"help": "mutation: chance to re-draw the depth, and the embed dim"})
    p_layer: float = field(default=0.2, metadata={"help": "mutation: chance to re-draw each MLP ratio, and heads"})
    max_tries: int = field(default=100_000, metadata={"help": "random draws to refill one generation before giving up"})
    seed: int = field(default=0, metadata={"help": "seeds every random choice of the search"})
    dtype: str = field(default="bf16", metadata={"help": "for scoring; the final val report is fp32",
                                                 "choices": ("bf16", "fp32")})
    batch_size: int = field(default=250, metadata={"help": "images per forward when scoring"})
    data: str = field(default="", metadata={"help": "ImageNet's folder (train/, val/) for an official checkpoint; "
                                                    "for ours, the data folder if it moved since training"})
    fitness_per_class: int = field(default=100, metadata={"help": "official checkpoint: rank the subnets on this many "
                                                                  "images per class drawn from DATA/train with --seed, "
                                                                  "as the official code; images the supernet was "
                                                                  "trained on, unlike our held-out split"})
    fitness_data: str = field(default="", metadata={"help": "official checkpoint: rank on this image folder "
                                                            "(<class>/<images>) instead"})
    workers: int = field(default=min(8, os.cpu_count()), metadata={"help": "processes decoding an official "
                                                                           "checkpoint's fitness and val images"})
    resume: bool = field(default=False, metadata={"help": "continue the search in OUT with its recorded settings"})


RUNTIME_FIELDS = ("out", "data", "batch_size", "workers", "resume")  # --resume keeps these from the command line
DEFAULT_CHECKPOINT = "out/ckpt.pt"
# what a fresh search removes, in order
STALE_RESULTS = ("state.json", "best.json", "pareto.json", "search.png", "fitness.json")
DEFAULT_PER_CLASS = SearchConfig.fitness_per_class

# ----------------------------------------------------------------------------- constraints


def parse_window(text, flag):
    """'MIN:MAX' -> (lo, hi); numbers may end in K, M or G, and either end may be left empty."""
    def number(part, default):
        scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(part[-1:].upper(), 1)
        return float(part[:-1] if scale != 1 else part or default) * scale
    try:
        lo, hi = (number(p.strip(), d) for p, d in zip(text.split(":"), ("0", "inf"), strict=True))
    except ValueError:
        raise ValueError(f"{flag} {text}: write MIN:MAX, e.g. 0.5M:0.6M or :40M (either end may be empty)") from None
    if lo > hi:
        raise ValueError(f"{flag} {text}: MIN is larger than MAX")
    return lo, hi


def windows(space, cfg):
    """{name: (counter, (lo, hi))} of the search, checked against the exact range of the space.
    Both counters grow with every choice (depth, embed dim, heads, ratio), so the smallest and
    largest subnets bound them: an empty window is found before anything is scored."""
    small, large = count_params(space, space.smallest()), count_params(space, space.largest())
    result = {"params": (count_params, parse_window(cfg.params, "--params") if cfg.params
                         else (small + 0.25 * (large - small), small + 0.45 * (large - small)))}
    if cfg.flops:
        result["flops"] = (count_flops, parse_window(cfg.flops, "--flops"))
    for name, (counter, (lo, hi)) in result.items():
        least, most = counter(space, space.smallest()), counter(space, space.largest())
        if hi < least or lo > most:
            raise ValueError(f"--{name} {getattr(cfg, name)}: no subnet of the space is inside; "
                             f"its subnets have {mega(least)} to {mega(most)} {name}")
    return result


def mega(x):
    return f"{x / 1e6:.3g}M" if x != float("inf") else "inf"


def scores_text(record):
    return f"log-likelihood {record['loglik']:.4f}, top-1 {record['top1']:5.1f}%"

# ----------------------------------------------------------------------------- the search


def mutate(parent, space, rng, p_global, p_layer):
    """Re-draw the depth (new layers random, removed ones dropped) and the embed dim each with
    p_global, then every layer's MLP ratio and head count each with p_layer."""
    ratios, heads = list(parent.mlp_ratios), list(parent.num_heads)
    if rng.random() < p_global:
        depth = rng.choice(space.depths)
        ratios = ratios[:depth] + [rng.choice(space.mlp_ratios) for _ in range(depth - len(ratios))]
        heads = heads[:depth] + [rng.choice(space.num_heads) for _ in range(depth - len(heads))]
    ratios = [rng.choice(space.mlp_ratios) if rng.random() < p_layer else r for r in ratios]
    heads = [rng.choice(space.num_heads) if rng.random() < p_layer else h for h in heads]
    embed_dim = rng.choice(space.embed_dims) if rng.random() < p_global else parent.embed_dim
    return Subnet(embed_dim, ratios, heads)


def crossover(parents, rng):
    """Two parents of the same depth; each gene (the embed dim, each layer's ratio, each layer's
    heads) from either, with even odds. None when the first parent has no mate of its depth."""
    a = rng.choice(parents)
    mates = [p for p in parents if p.depth == a.depth and p != a]
    if not mates:
        return None
    b = rng.choice(mates)
    pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
    return Subnet(pick(a.embed_dim, b.embed_dim), [pick(x, y) for x, y in zip(a.mlp_ratios, b.mlp_ratios)],
                  [pick(x, y) for x, y in zip(a.num_heads, b.num_heads)])


def draw(new, make, count, tries, seen, admissible):
    """Append to `new` up to `count` subnets from make(), each unseen and admissible, trying at most
    `tries` times (make() may also give None: a crossover without mates)."""
    goal = len(new) + count
    for _ in range(tries):
        if len(new) == goal:
            return
        subnet = make()
        if subnet is not None and subnet not in seen and admissible(subnet):
            seen.add(subnet)
            new.append(subnet)


def run_search(space, fitness, admissible, cfg, history=(), log=None):
    """The search. `fitness(subnets, generation) -> [{"top1", "loglik"}]` scores new subnets with their
    inherited weights (cfg.fitness names the score that ranks them), `admissible(subnet) -> bool`
    tells the constraints, `history` holds the records of the generations a resumed search has
    finished, `log(generation, records)` sees each generation. Returns every record: {"subnet",
    "top1", "loglik", "generation"}."""
    records = list(history)
    seen = {r["subnet"] for r in records}  # never score a subnet twice
    for generation in range(records[-1]["generation"] + 1 if records else 0, cfg.generations + 1):
        # A generation's only randomness: a resumed search makes the choices of one never stopped.
        rng = random.Random(cfg.seed * 1_000_003 + generation)
        new = []
        if cfg.algorithm == "evolution" and generation > 0:
            # parents: the best subnets found so far (a stable sort: ties go to the earlier subnet)
            parents = [r["subnet"] for r in sorted(records, key=lambda r: -r[cfg.fitness])[:cfg.parents]]
            # children: mutations of a random parent, then crossovers of two, 10 tries per wanted
            # child as in the official code
            draw(new, lambda: mutate(rng.choice(parents), space, rng, cfg.p_global, cfg.p_layer), cfg.mutations,
                 10 * cfg.mutations, seen, admissible)
            draw(new, lambda: crossover(parents, rng), cfg.crossovers, 10 * cfg.crossovers, seen, admissible)
        # random subnets: all of generation 0 (and of --algorithm random), else the children's shortfall
        draw(new, lambda: space.sample(rng), cfg.population - len(new), cfg.max_tries, seen, admissible)
        if len(new) < cfg.population:
            raise ValueError(f"generation {generation}: only {len(new)} of {cfg.population} new subnets inside the "
                             f"constraints after {cfg.max_tries} random draws ({len(seen)} seen): the constrained "
                             "space is (nearly) exhausted; widen the windows or lower --population/--generations")
        # score them
        records += [{"subnet": s, **f, "generation": generation} for s, f in zip(new, fitness(new, generation))]
        if log:
            log(generation, records)
    return records


def pareto(records, key):
    """The records that no other beats on both counts: fewer (or as many) parameters, a higher `key`."""
    front = []
    for r in sorted(records, key=lambda r: (r["params"], -r[key])):
        if not front or r[key] > front[-1][key]:
            front.append(r)
    return front

# ----------------------------------------------------------------------------- scoring and latency


def supernet_fitness(scorer, split, cfg, memo, on_score, rank, world):
    """fitness() for run_search: top-1 % and mean log-likelihood on `split`, the images that rank
    the subnets, decoded once: an (images, labels) pair of tensors or data.Crops. Each process scores one subnet
    per CPU thread at a time (one on a GPU), and the processes all-gather their scores. Subnets
    in `memo` (scored before a resume) are not scored again; on_score sees each new one, in order.
    On a CPU, a subnet per core on one thread each beats one subnet at a time on all cores: the
    small ops of a 32 px model parallelise poorly, and spin-waiting threads burn a shared machine.
    The threads end with each round, so that latency is measured between rounds on a quiet machine."""
    jobs = 1 if next(scorer.parameters()).is_cuda else torch.get_num_threads()

    def score(subnet):
        result = evaluate(scorer, split, subnet, None, cfg.batch_size)
        return {"top1": result["top1"], "loglik": result["loglik"]}

    def fitness(subnets, generation):
        todo, threads = [s for s in subnets if s not in memo], torch.get_num_threads()
        torch.set_num_threads(1)  # for the scoring only: latency is measured as the model runs here
        try:
            with ThreadPoolExecutor(jobs) as pool:
                for i in range(0, len(todo), world * jobs):
                    chunk = todo[i:i + world * jobs]
                    mine = list(pool.map(score, chunk[rank::world]))  # rank r scores chunk[r::world]
                    scores = [mine]
                    if world > 1:
                        scores = [None] * world
                        dist.all_gather_object(scores, mine)
                    for r, part in enumerate(scores):
                        memo.update(zip(chunk[r::world], part))
                    for subnet in chunk:
                        on_score(subnet, memo[subnet], generation)
        finally:
            torch.set_num_threads(threads)
        return [memo[s] for s in subnets]
    return fitness


@torch.inference_mode()
def measure_latency(supernet, subnet, batch, warmup=3, runs=10):
    """Median wall milliseconds of one forward of the extracted standalone model, fp32."""
    model = extract(supernet, subnet).eval()
    device, size = next(supernet.parameters()).device, supernet.space.img_size
    x = torch.randn(batch, supernet.space.in_chans, size, size, device=device)
    times = []
    for _ in range(warmup + runs):
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times[warmup:]), 4)


def read_jsonl(path):
    """The rows of a JSONL file, if there is one; a last line cut short by a kill is dropped."""
    lines, rows = path.read_text().splitlines() if path.is_file() else [], []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def append_jsonl(path, row):
    with open(path, "a") as f:  # one write per line: a kill can only cut the last line short
        f.write(json.dumps(row) + "\n")


def file_sha256(path):
    """The hex sha256 of a file, read in 1 MiB blocks: a supernet checkpoint can be large."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

# ----------------------------------------------------------------------------- the command


def latency_check(supernet, cfg, path, rank, world):
    """latency(subnet) -> ms, cached in `path` (JSONL) across runs. Rank 0 measures while the
    others wait (so it has the machine to itself) and broadcasts: every rank sees the same figure."""
    cache = {Subnet(**r["subnet"]): r["ms"] for r in read_jsonl(path) if r["batch"] == cfg.latency_batch}

    def latency(subnet):
        if subnet not in cache:
            ms = [measure_latency(supernet, subnet, cfg.latency_batch) if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(ms)
            cache[subnet] = ms[0]
            if rank == 0:
                append_jsonl(path, {"subnet": json.loads(subnet.to_json()), "batch": cfg.latency_batch, "ms": ms[0]})
        return cache[subnet]
    return latency


def resume_settings(cfg, typed, out):
    """(the settings to run, the recorded state or {}). --resume runs the recorded settings with
    this invocation's RUNTIME_FIELDS; a --checkpoint given may be the recorded one moved (its
    fingerprint is checked once it is read); any other typed flag must agree with the record."""
    if not cfg.resume:
        return dataclasses.replace(cfg, checkpoint=cfg.checkpoint or DEFAULT_CHECKPOINT), {}
    state_path = out / "state.json"
    if not state_path.is_file():
        raise ValueError(f"{out}: no search to resume (no state.json)")
    try:
        state = json.loads(state_path.read_text())
        recorded, _ = SearchConfig(**state["config"]), state["checkpoint_sha256"]  # both must be there
        state["config"]["fitness"]  # a search that records no fitness ranked by another rule
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{state_path}: not the state of a search by this search.py ({e})") from None
    refuse_changed_settings(cfg, recorded, typed - {*RUNTIME_FIELDS, "checkpoint"}, state_path)
    return dataclasses.replace(recorded, checkpoint=cfg.checkpoint or recorded.checkpoint,
                               **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}), state


def check_fingerprint(cfg, state, out):
    """The checkpoint's sha256; on --resume it must be the file the search scored with."""
    fingerprint = file_sha256(cfg.checkpoint)
    if state and fingerprint != state["checkpoint_sha256"]:
        recorded = state["config"]["checkpoint"]
        raise ValueError(f"{cfg.checkpoint}: sha256 {fingerprint[:12]}..., but the search in {out} scored with "
                         f"{recorded}, sha256 {state['checkpoint_sha256'][:12]}... (changed, or another file): "
                         "resume with that checkpoint, or start afresh without --resume")
    return fingerprint


def load_scorer(checkpoint, cfg, device):
    """(the supernet, a copy of it in the scoring dtype, of the same sharing). The copy is cast once:
    autocast would cast each weight slice again in every forward (20 % slower)."""
    supernet = open_supernet(checkpoint, cfg.checkpoint, cfg.space).to(device).eval()
    return supernet, copy.deepcopy(supernet).to(device, {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype])


def load_fitness_set(checkpoint, space, cfg, device, dtype):
    """(the images that rank the subnets, on `device`; what they are, in words; for an official
    checkpoint the record of fitness.json, else None). Ours: the held-out split train.py recorded.
    An official checkpoint records none, so, as the official code: --fitness-per-class images of
    each class drawn from DATA/train with --seed (data.draw_per_class), or the --fitness-data
    folder, kept as uint8 crops (data.Crops). The val split's classes must be theirs."""
    if not is_official(checkpoint):
        images, labels = load_split(checkpoint, cfg.checkpoint, "minival", cfg.data)
        return (images.to(device, dtype), labels.to(device)), f"{len(labels)} held-out images", None
    if cfg.fitness_per_class < 1:
        raise ValueError(f"--fitness-per-class {cfg.fitness_per_class}: expected at least 1 image per class")
    val_names = official_split(cfg.data, "val", space, cfg.checkpoint)[0]
    if cfg.fitness_data:
        folder = Path(cfg.fitness_data)
        names, images = official_split(folder, "", space, cfg.checkpoint)
        indices, what = list(range(len(images))), f"the {len(images)} images of {folder}"
    else:
        folder = Path(cfg.data) / "train"
        names, images = official_split(cfg.data, "train", space, cfg.checkpoint)
        indices = draw_per_class(images, cfg.fitness_per_class, cfg.seed)
        what = f"{len(indices)} images of {folder}, {cfg.fitness_per_class} per class drawn with seed {cfg.seed}"
    if names != val_names:  # labels are positions in the sorted class list: they would mean other classes
        i = next(i for i, (a, b) in enumerate(zip(names, val_names)) if a != b)
        raise DataError(f"{folder}: class {i} is {names[i]!r}, but in {Path(cfg.data) / 'val'} it is "
                        f"{val_names[i]!r}: not the classes of the val split")
    crops = decode_crops(images, indices, space.img_size, cfg.batch_size, cfg.workers).to(device)
    files = [str(images.paths[i].relative_to(folder)) for i in indices]
    return crops, what + " (images the supernet was trained on)", {"folder": str(folder), "files": files}


class SearchFiles:
    """The files of a search in OUT and the constraints: what run_search's callbacks need. state.json
    records the settings, the checkpoint's sha256 and the generations done; candidates.jsonl gets
    one line per subnet as it is scored."""

    def __init__(self, cfg, out, fingerprint, space, bounds, rank):
        self.cfg, self.out, self.fingerprint, self.rank = cfg, out, fingerprint, rank
        self.space, self.bounds = space, bounds
        self.state_path, self.log_path = out / "state.json", out / "candidates.jsonl"
        self.latency = None  # set by start(), once the folder is ready
        self.total = (cfg.generations + 1) * cfg.population

    def start(self, state, supernet, world, fitness_set=None):
        """Open the folder: on --resume, the records scored so far; else an earlier search's results
        removed. `fitness_set`: an official checkpoint's fitness images, written to fitness.json; a
        resumed search must have the same. Returns (the records, memo: subnet -> scores of every one
        scored)."""
        records = read_jsonl(self.log_path) if self.cfg.resume else []
        if fitness_set and self.cfg.resume:
            check_fitness_set(self.out / "fitness.json", fitness_set)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.cfg.resume:  # rewritten without the line a kill may have torn
                write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in records))
                print(f"resuming {self.out}: {state.get('generations_done', 0)} generations done, "
                      f"{len(records)} subnets scored", flush=True)
            else:
                # The old state goes first and the new one is written before anything is scored, so a
                # kill at any moment leaves no state or this search's: never an old search's state beside
                # this search's candidates. The latency cache stays.
                for name in STALE_RESULTS:
                    (self.out / name).unlink(missing_ok=True)
                if fitness_set:  # before the state: a search that can be resumed has its fitness set
                    write_atomic(self.out / "fitness.json", json.dumps(fitness_set, indent=1))
                write_atomic(self.log_path, "")
                self.save_state(0)
        self.latency = latency_check(supernet, self.cfg, self.out / "latency.jsonl", self.rank, world)
        self.start_time, self.scored_before = time.time(), len(records)
        for i, r in enumerate(records):
            if "top1" not in r or "loglik" not in r:
                raise ValueError(f"{self.log_path}: line {i + 1} lacks its top1 or loglik score: start afresh without "
                                 "--resume")
        return records, {Subnet(**r["subnet"]): {"top1": r["top1"], "loglik": r["loglik"]} for r in records}

    def save_state(self, generations_done, **extra):
        write_atomic(self.state_path, json.dumps({"config": dataclasses.asdict(self.cfg),
                                                  "generations_done": generations_done,
                                                  "checkpoint_sha256": self.fingerprint, **extra}, indent=1))

    def admissible(self, subnet):
        return (all(lo <= counter(self.space, subnet) <= hi for counter, (lo, hi) in self.bounds.values())
                and (not self.cfg.latency_ms or self.latency(subnet) <= self.cfg.latency_ms))

    def describe(self, subnet, scores, generation):
        """One line of candidates.jsonl."""
        row = {"subnet": json.loads(subnet.to_json()), "params": count_params(self.space, subnet),
               "flops": count_flops(self.space, subnet), **scores, "generation": generation}
        return dict(row, latency_ms=self.latency(subnet)) if self.cfg.latency_ms else row

    def on_score(self, subnet, scores, generation):
        if self.rank == 0:
            append_jsonl(self.log_path, self.describe(subnet, scores, generation))

    def log(self, generation, records):
        """After every generation: the state for --resume, and a progress line."""
        if self.rank > 0:
            return
        self.save_state(generation + 1)
        elapsed, fresh = time.time() - self.start_time, max(len(records) - self.scored_before, 1)
        best = max(records, key=lambda r: r[self.cfg.fitness])
        print(f"gen {generation:2d}/{self.cfg.generations}  best: {scores_text(best)}  median top-1 "
              f"{statistics.median(r['top1'] for r in records[-self.cfg.population:]):5.1f}% (this gen)  scored "
              f"{len(records)}/{self.total}  {elapsed / fresh:.2f} s/subnet  elapsed {elapsed:4.0f} s  "
              f"eta {elapsed / fresh * (self.total - len(records)):4.0f} s", flush=True)

    def window_text(self):
        text = ", ".join(f"{n} {mega(lo)}..{mega(hi)}" for n, (_, (lo, hi)) in self.bounds.items())
        if self.cfg.latency_ms:
            text += f", latency <= {self.cfg.latency_ms:g} ms at batch {self.cfg.latency_batch}"
        return text


def check_fitness_set(path, fitness_set):
    """A resumed search must rank on the images it began with: the files its fitness.json lists."""
    if not path.is_file():
        raise ValueError(f"{path}: missing, so the images this search ranked on are unknown: start afresh "
                         "without --resume")
    recorded = json.loads(path.read_text())["files"]
    if recorded != fitness_set["files"]:
        i = next((i for i, (a, b) in enumerate(zip(recorded, fitness_set["files"])) if a != b),
                 min(len(recorded), len(fitness_set["files"])))
        raise ValueError(f"{path}: the search ranked on other images than those of {fitness_set['folder']} now "
                         f"(fitness image {i}: {recorded[i:i + 1]} then, {fitness_set['files'][i:i + 1]} now): "
                         "resume with the same folder, or start afresh without --resume")


def search(cfg, typed=frozenset()):
    """Run the search `cfg` describes, write OUT; return the summary (rank 0) or None. `typed`: the
    flags given on the command line; with --resume, those outside RUNTIME_FIELDS and --checkpoint
    must agree with the recorded search (the rest of `cfg` gives way to it)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = Path(cfg.out or Path(cfg.checkpoint or DEFAULT_CHECKPOINT).parent / "search")
    cfg, state = resume_settings(cfg, typed, out)
    if cfg.mutations + cfg.crossovers > cfg.population or not 0 < cfg.parents <= cfg.population:
        raise ValueError("need --mutations + --crossovers <= --population and 0 < --parents <= --population")
    checkpoint = load_checkpoint(cfg.checkpoint, supernet=True)
    per_class = "fitness_per_class" in typed or cfg.fitness_per_class != DEFAULT_PER_CLASS
    refuse_official_flags(checkpoint, cfg.checkpoint, {"--space": cfg.space, "--fitness-data": cfg.fitness_data,
                                                       "--fitness-per-class": per_class})
    space = checkpoint_space(checkpoint, cfg.checkpoint, cfg.space)
    files = SearchFiles(cfg, out, check_fingerprint(cfg, state, out), space, windows(space, cfg), rank)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    supernet, scorer = load_scorer(checkpoint, cfg, device)
    split, described, fitness_set = load_fitness_set(checkpoint, space, cfg, device, next(scorer.parameters()).dtype)

    records, memo = files.start(state, supernet, world, fitness_set)
    if cfg.latency_ms and files.latency(space.smallest()) > cfg.latency_ms:
        raise ValueError(f"--latency-ms {cfg.latency_ms:g}: even the smallest subnet takes "
                         f"{files.latency(space.smallest()):.2f} ms at batch {cfg.latency_batch} on this machine, "
                         "so no candidate meets it")
    if rank == 0:
        print(f"{cfg.algorithm} search of {cfg.checkpoint}: {described}, {cfg.dtype}, "
              f"{world} process(es), {files.window_text()}", flush=True)
    done = state.get("generations_done", 0)
    history = [dict(r, subnet=Subnet(**r["subnet"])) for r in records if r["generation"] < done]
    fitness = supernet_fitness(scorer, split, cfg, memo, files.on_score, rank, world)
    records = run_search(space, fitness, files.admissible, cfg, history, files.log)
    return report(files, records, supernet, checkpoint, device) if rank == 0 else None


def report(files, records, supernet, checkpoint, device):
    """The results: the Pareto front, the winner and its val top-1 (the validation split is read
    here, once, for the winner only), best.json, pareto.json, search.png and the summary."""
    cfg, out, space = files.cfg, files.out, files.space
    rows = [files.describe(r["subnet"], {k: r[k] for k in ("top1", "loglik")}, r["generation"]) for r in records]
    front = pareto(rows, cfg.fitness)
    best = front[-1]  # the highest fitness; among ties the fewest parameters, then the earliest found
    subnet = Subnet(**best["subnet"])
    best["val_top1"] = val_top1(supernet, subnet, checkpoint, cfg, device)
    write_atomic(out / "best.json", subnet.to_json() + "\n")
    write_atomic(out / "pareto.json", json.dumps(front, indent=1))
    extremes = (count_params(space, space.smallest()), count_params(space, space.largest()))
    picture = plot.search_scatter(rows, front, cfg.fitness, files.bounds["params"][1], extremes,
                                  f"{cfg.algorithm}, seed {cfg.seed}: {len(rows)} subnets, {files.window_text()}")
    write_atomic(out / "search.png", lambda f: picture.save(f, "PNG"))
    summary = {"best": best, "scored": len(rows), "seconds": time.time() - files.start_time}
    files.save_state(cfg.generations + 1, result=summary)
    print(f"best: held-out {scores_text(best)}, val top-1 {best['val_top1']:.2f}% (fp32), {mega(best['params'])} "
          f"params, {mega(best['flops'])} MACs, embed dim {subnet.embed_dim}, depth {subnet.depth}")
    print(f"results in {out}: candidates.jsonl, best.json, pareto.json ({len(front)} on the front), search.png, "
          "state.json")
    space_flag = f" --space {cfg.space}" if is_official(checkpoint) else ""
    data_flag = f" --data {cfg.data}" if is_official(checkpoint) else ""
    print(f"evaluate: python autoformer.py evaluate --checkpoint {cfg.checkpoint}{space_flag}{data_flag} "
          f"--subnet {out / 'best.json'}")
    print(f"export:   python autoformer.py export --checkpoint {cfg.checkpoint}{space_flag} "
          f"--subnet {out / 'best.json'} --out {out / 'model.pt'}")
    return summary


def val_top1(supernet, subnet, checkpoint, cfg, device):
    """The winner's top-1 in fp32 on the val split: the recorded data set's, or ImageNet's under
    DATA/val for an official checkpoint, streamed."""
    val = val_batches(checkpoint, cfg.checkpoint, supernet.space, cfg.data, cfg.batch_size, cfg.workers, device)
    return evaluate(supernet, val, subnet)["top1"]


def parse_args(argv):
    return parse_config(SearchConfig, argv, __doc__)


def main(argv=None):
    cfg, typed = parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by torchrun: gloo works on CPUs and GPUs alike
        dist.init_process_group("gloo")
    try:
        search(cfg, typed)
    except (ValueError, OSError) as e:  # bad input, CheckpointError, DataError: one line, exit 2
        print(f"search.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
