"""Train an AutoFormer supernet: every step trains one subnet, and all subnets share the weights.

Each step draws a subnet uniformly from the search space (depth, then each layer's MLP ratio and
heads, then the embed dim), runs the batch through the leading slices of the super weights that
subnet uses, and takes one AdamW step. The subnet of step s is drawn from random.Random seeded by
(seed, s) alone, so every process of a distributed run, and a run resumed after a crash, draws
the same sequence. `--sandwich` trains instead the largest, the smallest and n random subnets on
every batch, the smaller ones distilled from the largest's predictions (BigNAS, NASViT).

  python train.py                                 # built-in data set, cpu space, < 10 min on 2 cores
  python train.py --sandwich                      # the sandwich rule with in-place distillation
  python train.py --sharing classical --out out/classical   # the baseline: every choice owns its weights
  python train.py --resume                        # continue out/ckpt.pt after a crash
  python train.py --data ~/cifar-10-batches-py --space cpu --epochs 100
  torchrun --nproc_per_node=8 train.py --data ~/imagenet --space tiny --epochs 500 --batch-size 128 \\
      --lr 5e-4 --warmup-epochs 5 --drop-path 0.1 --mixup 0.8 --cutmix 1.0 --workers 8 --out out/tiny
  python train.py --subnet sub.json --inherit out/ckpt.pt --out out/subnet   # one subnet as a standalone AutoFormer
  torchrun --nproc_per_node=8 train.py --subnet autoformer-t --inherit supernet-tiny.pth --space tiny \\
      --data ~/imagenet --epochs 40 --workers 8 --out out/autoformer-t   # fine-tune a released model (40 epochs)

Writes OUT/ckpt.pt (every epoch and every --ckpt-every steps, atomically) and OUT/curves.png.
"""
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import data
import plot
from autoformer import AutoFormer, evaluate, extract
from cli import (check_trained_on, clock, dataset_record, open_supernet, parse_config, read_subnet,
                 refuse_changed_settings, write_atomic)
from supernet import (SHARINGS, SPACES, CheckpointError, SearchSpace, Subnet, Supernet, load_checkpoint,
                      load_weights, space_of)


@dataclass
class TrainConfig:
    """The defaults are the `python train.py` run: the cpu space on the built-in set in under 10 minutes
    on 2 CPU cores, hence a high learning rate, no drop path and no mixing; the ImageNet recipe
    (DeiT's, as AutoFormer's) is the torchrun command above."""
    data: str = field(default="", metadata={"help": "image folder or CIFAR; empty: the built-in set, data/synthetic"})
    space: str = field(default="cpu", metadata={"help": f"search space: {', '.join(SPACES)}; for an official "
                                                         "--init or --inherit file, the one it was trained in"})
    sharing: str = field(default="entangled", metadata={
        "help": "how the subnets share weights: entangled (AutoFormer: every subnet uses the leading block of one "
                "super weight) or classical (the baseline: every choice of every layer owns its weights); "
                "--init takes the checkpoint's", "choices": SHARINGS})
    out: str = field(default="out", metadata={"help": "folder for ckpt.pt and curves.png"})
    epochs: int = field(default=20, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=64, metadata={"help": "images per step and per process"})
    lr: float = field(default=8e-3, metadata={"help": "peak learning rate at global batch 512 (DeiT's scaling)"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of the cosine, at batch 512"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decay of weight matrices"})
    drop_path: float = field(default=0.0, metadata={"help": "drop path of the last layer; supernet only (DeiT: 0.1)"})
    clip_grad: float = field(default=1.0, metadata={"help": "max gradient norm; 0: no clipping"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha; 0: off (DeiT: 0.8)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha; 0: off (DeiT: 1.0)"})
    dtype: str = field(default="bf16", metadata={"help": "fp32, bf16 or fp16 (GPU only) autocast"})
    sandwich: bool = field(default=False, metadata={"help": "train largest + smallest + random subnets per step"})
    sandwich_random: int = field(default=2, metadata={"help": "random subnets per step under --sandwich"})
    seed: int = field(default=0, metadata={"help": "seeds weights, data order, augmentation and subnets"})
    minival: float = field(default=0.05, metadata={"help": "fraction of train held out for evaluation and search"})
    workers: int = field(default=1, metadata={"help": "DataLoader worker processes per process"})
    log_every: int = field(default=10, metadata={"help": "steps between progress lines"})
    ckpt_every: int = field(default=0, metadata={"help": "steps between checkpoints besides each epoch; 0: none"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps; the schedule spans --epochs"})
    resume: bool = field(default=False, metadata={"help": "continue OUT/ckpt.pt with its recorded config"})
    init: str = field(default="", metadata={"help": "start from this supernet checkpoint (ours or official)"})
    subnet: str = field(default="", metadata={"help": "train this subnet (autoformer-t/s/b or a JSON file) as a "
                                                      "standalone AutoFormer"})
    inherit: str = field(default="", metadata={"help": "with --subnet: start from its weights in this supernet "
                                                       "(ours or official)"})


RUNTIME_FIELDS = ("out", "resume", "max_steps", "workers", "log_every", "ckpt_every")  # --resume keeps these
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Not decayed: biases and norms (1-D) and the position embeddings, absolute and relative. The official
# code means to exempt the relative tables too (no_weight_decay lists "rel_pos_embed"), but timm
# matches whole names, so there they are decayed; here they count as position embeddings.
NO_DECAY = ("pos_embed", "cls_token", "embeddings_table")


class NonFiniteLoss(RuntimeError):
    pass


def step_subnets(space, cfg, step):
    """The subnets trained at `step`, a function of (seed, step) only: every rank and a resumed run
    draw the same ones without any communication."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if cfg.sandwich:
        return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(cfg.sandwich_random)]
    return [space.sample(rng)]


def fixed_subnets(space):
    """The subnets evaluated after every epoch: the two ends of the space and one in the middle."""
    def mid(choices):
        return sorted(choices)[len(choices) // 2]
    depth = mid(space.depths)
    middle = Subnet(mid(space.embed_dims), [mid(space.mlp_ratios)] * depth, [mid(space.num_heads)] * depth)
    return {"smallest": space.smallest(), "middle": middle, "largest": space.largest()}


def learning_rate(step, total, warmup, peak, floor):
    """Linear warm-up from peak / warmup to peak over `warmup` steps, then a cosine down to `floor`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or any(k in name for k in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def soft_cross_entropy(logits, targets):
    """Cross-entropy against a distribution (B, classes): smoothed or mixed labels, or a teacher's."""
    return -(targets * logits.float().log_softmax(-1)).sum(-1).mean()


def sync_gradients(model, world):
    """Average the gradients over the processes with one all-reduce of one flat buffer.

    Why not DistributedDataParallel: a subnet leaves whole layers of the supernet unused, which DDP
    only tolerates with find_unused_parameters=True, a graph traversal every step. Here every rank
    trains the same subnet, so every rank knows the same set of parameters that got a gradient; those
    are reduced, the others keep grad None, and AdamW skips them exactly as in a one-process run.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])  # (sum of numels,)
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def train_step(model, opt, scaler, images, targets, subnets, dtype, cfg, world):
    """One optimizer step on `subnets` (one, or the sandwich). The first subnet learns from `targets`;
    under the sandwich rule the others learn from its detached softmax (in-place distillation).
    Gradients of all subnets add up before the single step. Returns the first subnet's loss."""
    device = images.device
    teacher, losses = None, []
    for subnet in subnets:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images, subnet) if isinstance(model, Supernet) else model(images)
        loss = soft_cross_entropy(logits, targets if teacher is None else teacher)
        if teacher is None and len(subnets) > 1:
            teacher = logits.detach().float().softmax(-1)
        scaler.scale(loss).backward()  # one graph at a time: memory of a single subnet
        losses.append(loss.detach())
    loss = torch.stack(losses).float()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    if not torch.isfinite(loss).all():  # before the update: the weights and the checkpoint stay good
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {loss.tolist()}")
    sync_gradients(model, world)
    scaler.unscale_(opt)
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)  # None, not zeros: unused layers must stay untouched next step
    return loss[0].item()


def setup_distributed():
    """(rank, world size, device): under torchrun one process per GPU with NCCL, or per share of
    the CPU cores with gloo; otherwise a single process on the GPU if there is one."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if world > 1:  # N processes x all cores each would oversubscribe the CPU many times over
            torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build_model(cfg, state, num_classes):
    """The model to train (a Supernet, or one AutoFormer with --subnet), its space, and the subnets
    evaluated after each epoch. Weights come from --resume's state, --init or --inherit, else fresh.
    A resumed run reads the space and the subnet from its checkpoint alone: the --subnet, --init and
    --inherit files may have changed or gone since the run began."""
    source, given = cfg.init or cfg.inherit, None
    space = dataclasses.replace(SPACES[cfg.space], num_classes=num_classes)
    if state is not None:
        source = Path(cfg.out) / "ckpt.pt"
        space = space_of(state, source)
    elif source:  # ours record their space; an official file is read in the one --space names
        given = open_supernet(load_checkpoint(source, supernet=True), source, cfg.space, cfg.drop_path)
        space = given.space
    if space.num_classes != num_classes:
        raise ValueError(f"{source or cfg.out}: the model has {space.num_classes} classes, the data {num_classes}")
    torch.manual_seed(cfg.seed)  # fresh weights are the same on every rank: nothing is broadcast
    if cfg.subnet:
        if state is not None:
            if not isinstance(state.get("subnet"), dict):
                raise CheckpointError(f"{source}: the checkpoint of a --subnet run, but it records no 'subnet'")
            subnet = Subnet(**state["subnet"])
        else:
            subnet = read_subnet(cfg.subnet)[1]
            try:
                space.validate(subnet)
            except ValueError as e:
                raise ValueError(f"--subnet {cfg.subnet}: {e}") from None
        model = extract(given, subnet) if given is not None else AutoFormer(space, subnet)
        fixed = {"subnet": subnet}
    else:
        model = given if given is not None else Supernet(space, cfg.drop_path, cfg.sharing)
        fixed = fixed_subnets(space)
    if state is not None:
        load_weights(model, state["model"], source)
    return model, space, fixed


def init_sharing(cfg, typed, model):
    """The config of a supernet run begun with --init: the sharing its checkpoint records, which a
    typed --sharing must agree with."""
    if not cfg.init or cfg.sharing == model.sharing:
        return cfg
    if "sharing" in typed:
        raise ValueError(f"--sharing {cfg.sharing}: --init {cfg.init} holds a supernet with {model.sharing} sharing, "
                         "which it keeps: drop the flag")
    return dataclasses.replace(cfg, sharing=model.sharing)


def held_out(loader, image_size, limit=1 << 30):
    """This rank's share of an evaluation split as one (images, labels) pair of tensors when it fits
    in `limit` bytes: decoded once, every later evaluation is pure compute. Else the loader."""
    if len(loader.sampler) * 3 * image_size**2 * 4 > limit:
        return loader
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def accuracies(model, fixed, split, dtype, world):
    """Top-1 % of each fixed subnet on `split`, the ranks' disjoint shares counted together."""
    top1 = {}
    for name, subnet in fixed.items():
        result = evaluate(model, split, subnet if isinstance(model, Supernet) else None, dtype)
        counts = torch.tensor([result["top1"] * result["images"] / 100, result["images"]], dtype=torch.float64,
                              device=next(model.parameters()).device)  # NCCL reduces GPU tensors only
        if world > 1:
            dist.all_reduce(counts)
        top1[name] = 100 * counts[0].item() / max(counts[1].item(), 1)
    return top1


# ----------------------------------------------------------------------------- before the first step


def resume_config(cfg, typed, ckpt_path):
    """(the config to run, the checkpoint's state or None). --resume runs the recorded config, with
    this invocation's run-time knobs (RUNTIME_FIELDS); any other typed flag must agree with it."""
    if not cfg.resume:
        return cfg, None
    state = load_checkpoint(ckpt_path)
    recorded = TrainConfig(**state["config"])
    refuse_changed_settings(cfg, recorded, typed - set(RUNTIME_FIELDS), ckpt_path)
    return dataclasses.replace(recorded, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}), state


def refuse_overwriting_other_kind(ckpt_path, subnet_run):
    """A fresh run starts its checkpoint afresh, but not over one of the other kind: a --subnet run
    left at the default --out would otherwise replace the supernet that took hours to train."""
    try:
        previous = "subnet" if "subnet" in load_checkpoint(ckpt_path, mmap=True) else "supernet"
    except CheckpointError:
        return  # damaged or not a checkpoint: nothing to keep
    kind = "subnet" if subnet_run else "supernet"
    if previous != kind:
        raise ValueError(f"{ckpt_path} holds a {previous} training run, which this fresh {kind} run would write "
                         f"over: give it an --out of its own, e.g. --out {ckpt_path.parent / kind}")


def check_config(cfg, device, ckpt_path):
    """Refuse flags that cannot work together, before the data set is read or anything written."""
    out = ckpt_path.parent
    if cfg.space not in SPACES:
        raise ValueError(f"--space {cfg.space}: choose one of {', '.join(SPACES)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype}: choose one of {', '.join(DTYPES)}")
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a GPU: CPU autocast to fp16 is slow and needs loss scaling; use bf16")
    if cfg.subnet and (cfg.init or cfg.sandwich):
        raise ValueError("--subnet trains one fixed subnet: --init and --sandwich are for supernets (use --inherit)")
    if cfg.subnet and cfg.sharing != "entangled":
        raise ValueError(f"--sharing {cfg.sharing}: --subnet trains one standalone AutoFormer, which shares no weights "
                         "(--inherit reads the sharing its supernet checkpoint records)")
    if cfg.inherit and not cfg.subnet:
        raise ValueError("--inherit takes the weights of the subnet named by --subnet")
    if not 0 < cfg.minival < 1:
        raise ValueError(f"--minival {cfg.minival:g}: the fraction of the train images held out; expected a number "
                         "strictly between 0 and 1, e.g. 0.05")
    for flag, source in (("--init", cfg.init), ("--inherit", cfg.inherit)):
        if source and not cfg.resume and Path(source).resolve() == ckpt_path.resolve():
            raise ValueError(f"{flag} {source}: this run would write its own checkpoint {ckpt_path} over the file "
                             f"it starts from; give the run an --out of its own, e.g. --out {out / 'retrain'}")
    if not cfg.resume and ckpt_path.is_file():
        refuse_overwriting_other_kind(ckpt_path, bool(cfg.subnet))


def load_data(cfg, state, ckpt_path, rank, world):
    """(folder, data set). Rank 0 writes the built-in set once; a resumed run must find the data set
    it was trained on, since its held-out split names train images by index."""
    root = Path(cfg.data) if cfg.data else Path(__file__).resolve().parent / "data" / "synthetic"
    if not cfg.data and rank == 0:
        t = time.time()
        data.ensure_synthetic(root)
        print(f"built-in data set ready in {root} ({time.time() - t:.0f} s)", flush=True)
    if world > 1:
        dist.barrier()
    dataset = data.load_dataset(root)
    if state is not None:
        check_trained_on(dataset, root, state, ckpt_path)
    return root, dataset


@dataclass
class Run:
    """Everything the training loop works with, and the checkpoint that saves it."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    space: SearchSpace
    fixed: dict  # name -> Subnet, evaluated at each epoch's end
    loaders: data.Loaders
    minival: tuple | torch.utils.data.DataLoader  # decoded (images, labels), if it fits in memory
    record: dict  # the data set and its held-out split, as the checkpoint records them
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: dict
    step: int = 0
    history: dict = field(default_factory=lambda: {"loss": [], "epochs": []})
    saved_step: int | None = None  # the step of the last checkpoint on disk

    @property
    def ckpt_path(self):
        return Path(self.cfg.out) / "ckpt.pt"

    def save(self):
        """Write the checkpoint and the curves atomically (rank 0): a kill at any moment leaves the
        last good checkpoint, and --resume continues from it draw for draw."""
        self.saved_step = self.step
        if self.rank > 0:
            return
        cfg, out = self.cfg, Path(self.cfg.out)
        kind = {"subnet": json.loads(self.fixed["subnet"].to_json())} if cfg.subnet else {"sharing": self.model.sharing}
        checkpoint = {"model": self.model.state_dict(), "space": dataclasses.asdict(self.space), "data": self.record,
                      "step": self.step, "epoch": self.step // len(self.loaders.train),
                      "optimizer": self.opt.state_dict(), "scheduler": self.schedule,
                      "scaler": self.scaler.state_dict(), "config": dataclasses.asdict(cfg),
                      "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "history": self.history,
                      **kind}
        write_atomic(self.ckpt_path, lambda f: torch.save(checkpoint, f))
        write_atomic(out / "curves.png", lambda f: plot.training_curves(self.history).save(f, "PNG"))


def prepare(cfg, typed, rank, world, device):
    """The Run of `cfg`: flags checked, data read, model and optimizer built, or --resume's state restored."""
    ckpt_path = Path(cfg.out) / "ckpt.pt"
    cfg, state = resume_config(cfg, typed, ckpt_path)
    check_config(cfg, device, ckpt_path)
    root, dataset = load_data(cfg, state, ckpt_path, rank, world)
    model, space, fixed = build_model(cfg, state, len(dataset.class_names))
    cfg = init_sharing(cfg, typed, model)
    model.to(device)
    loaders = data.build_loaders(dataset, space.img_size, cfg.batch_size, seed=cfg.seed, minival_fraction=cfg.minival,
                                 minival_indices=state["data"]["minival"]["indices"] if state else None,
                                 num_workers=cfg.workers, eval_batch_size=500, rank=rank, world_size=world)
    record = {"kind": dataset.kind, "root": str(root), "img_size": space.img_size, **dataset_record(dataset),
              "minival": {"indices": loaders.minival_indices, "seed": cfg.seed, "fraction": cfg.minival}}
    minival = held_out(loaders.minival, space.img_size)
    steps_per_epoch = len(loaders.train)
    if steps_per_epoch == 0:  # drop_last: an epoch of fewer images than a batch has no step at all
        raise ValueError(f"{root}: {len(loaders.train.sampler)} train images per process (minival held out), fewer "
                         f"than --batch-size {cfg.batch_size}: not one step per epoch; lower --batch-size")
    scale = cfg.batch_size * world / 512  # DeiT's linear scaling rule: lr grows with the global batch
    schedule = {"total_steps": cfg.epochs * steps_per_epoch, "warmup_steps": round(cfg.warmup_epochs * steps_per_epoch),
                "peak_lr": cfg.lr * scale, "min_lr": cfg.min_lr * scale}
    # fused: one pass over each parameter's memory per step, not one per arithmetic op (4x faster on a CPU)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=schedule["peak_lr"], fused=True)
    run = Run(cfg, rank, world, device, model, space, fixed, loaders, minival, record, opt,
              torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16"), schedule)
    if state is not None:
        restore(run, state)
    if rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return run


def restore(run, state):
    """Continue where the checkpoint `state` left off: optimizer, scaler, step, history, random state."""
    run.opt.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.step, run.history, run.saved_step = state["step"], state["history"], state["step"]
    torch.set_rng_state(state["rng"]["torch"])  # each step reseeds itself; this covers the rest
    random.setstate(state["rng"]["python"])
    if state["scheduler"] != run.schedule:
        raise CheckpointError(f"{run.ckpt_path}: recorded for {state['scheduler']}, this run has {run.schedule}: "
                              "resume with the same number of processes")


# ----------------------------------------------------------------------------- what the loop prints


def announce(run):
    """The first line: what is trained, on what, how."""
    cfg, record, held = run.cfg, run.record, len(run.loaders.minival_indices)
    kind = f"subnet {run.fixed['subnet'].to_json()}" if cfg.subnet else f"{cfg.sharing} supernet of space {cfg.space}"
    params = sum(p.numel() for p in run.model.parameters())
    resuming = f", resuming at step {run.step}" if run.step else ""
    print(f"training the {kind} ({params / 1e6:.2f} M parameters) on {record['kind']} {record['root']}: "
          f"{record['train_images'] - held} train / {held} minival images, {run.world} x {run.device.type}, "
          f"{cfg.dtype}, global batch {cfg.batch_size * run.world}, {run.schedule['total_steps']} steps{resuming}",
          flush=True)


class Progress:
    """One line every --log-every steps: mean loss since the last line, learning rate, images/s, ETA."""

    def __init__(self, run, stop):
        self.run, self.stop, self.start = run, stop, (time.time(), run.step)
        self.window, self.losses = self.start, []

    def step(self, loss, lr, epoch):
        run, cfg = self.run, self.run.cfg
        self.losses.append(loss)
        if run.rank > 0 or (run.step % cfg.log_every and run.step != self.stop):
            return
        now = time.time()
        run.history["loss"].append((run.step, sum(self.losses) / len(self.losses)))
        per_step = (now - self.start[0]) / (run.step - self.start[1])
        images_per_s = (run.step - self.window[1]) * cfg.batch_size * run.world / (now - self.window[0])
        print(f"step {run.step:5d}/{run.schedule['total_steps']}  epoch {epoch + 1}/{cfg.epochs}  "
              f"loss {run.history['loss'][-1][1]:.4f}  lr {lr:.2e}  {images_per_s:5.0f} img/s  "
              f"elapsed {clock(now - self.start[0])}  eta {clock(per_step * (self.stop - run.step))}", flush=True)
        self.window, self.losses = (now, run.step), []


def end_epoch(run):
    """After an epoch: the fixed subnets' minival top-1 into the history, then the checkpoint."""
    t, epoch = time.time(), run.step // len(run.loaders.train)
    top1 = accuracies(run.model, run.fixed, run.minival, DTYPES[run.cfg.dtype], run.world)
    run.history["epochs"].append({"epoch": epoch, "step": run.step, "top1": top1})
    run.save()
    if run.rank == 0:
        scores = "  ".join(f"{k} {v:.1f}%" for k, v in top1.items())
        print(f"epoch {epoch}/{run.cfg.epochs}  minival top-1  {scores}  ({time.time() - t:.1f} s)", flush=True)


def report(run, final, seconds):
    """The last lines: where the results are, the val top-1 of a finished run, and what to run next."""
    cfg, total = run.cfg, run.schedule["total_steps"]
    print(f"done in {clock(seconds)}: checkpoint {run.ckpt_path} (step {run.step}/{total}), "
          f"curves {Path(cfg.out) / 'curves.png'}")
    if final:
        print("val top-1  " + "  ".join(f"{k} {v:.1f}%" for k, v in final.items()))
        if not cfg.subnet:
            print("next: python search.py" + (f" --checkpoint {run.ckpt_path}" if cfg.out != "out" else ""))
    else:
        resume = "train.py --resume" + (f" --out {cfg.out}" if cfg.out != "out" else "")
        print(f"next: python {resume}" if run.world == 1 else
              f"next: {resume}, launched as this run was ({run.world} processes)")


# ----------------------------------------------------------------------------- the loop


def train(cfg, typed=frozenset()):
    """Run the training that `cfg` describes. Returns {"model", "checkpoint", "top1", "history"}.
    `typed`: the flags given on the command line; with --resume, those outside RUNTIME_FIELDS must
    agree with the recorded run (the rest of `cfg` gives way to it)."""
    rank, world, device = setup_distributed()
    run = prepare(cfg, typed, rank, world, device)
    cfg, model, opt, loaders, schedule = run.cfg, run.model, run.opt, run.loaders, run.schedule
    steps_per_epoch, total = len(loaders.train), schedule["total_steps"]
    stop = min(total, cfg.max_steps or total)
    if rank == 0:
        announce(run)
    progress, start = Progress(run, stop), time.time()
    try:
        while run.step < stop:
            epoch, done = divmod(run.step, steps_per_epoch)
            loaders.train.sampler.set_epoch(epoch, skip=done * cfg.batch_size)  # a resumed epoch skips what it saw
            model.train()
            for images, labels in loaders.train:
                # this step's learning rate: linear warm-up, then a cosine
                lr = learning_rate(run.step, total, schedule["warmup_steps"], schedule["peak_lr"], schedule["min_lr"])
                for group in opt.param_groups:
                    group["lr"] = lr
                # Every random draw of a step is a function of (seed, step[, rank]): the subnets, the
                # mix, drop path. So a resumed run repeats an uninterrupted one draw for draw.
                torch.manual_seed((cfg.seed * 1_000_003 + run.step) * 1009 + rank)
                subnets = [run.fixed["subnet"]] if cfg.subnet else step_subnets(run.space, cfg, run.step)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                images, targets = data.mix_batch(images, labels, run.space.num_classes, cfg.mixup, cfg.cutmix,
                                                 cfg.smoothing, torch.default_generator)
                # forward and backward of each subnet, gradient clipping, one AdamW step
                loss = train_step(model, opt, run.scaler, images, targets, subnets, DTYPES[cfg.dtype], cfg, world)
                run.step += 1
                progress.step(loss, lr, epoch)
                # Not on an epoch's last step: the epoch-end save follows its evaluation, and a save before
                # it would let a kill during the evaluation resume past the epoch and lose its history entry.
                if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step % steps_per_epoch:
                    run.save()
                if run.step == stop:
                    break
            if run.step % steps_per_epoch == 0:  # an epoch ended: evaluate the fixed subnets, checkpoint
                end_epoch(run)
            elif run.step == stop:  # --max-steps ended the run mid-epoch: keep its state for --resume
                run.save()
    except NonFiniteLoss as e:
        written = "not written by this run" if run.saved_step is None else f"last written at step {run.saved_step}"
        raise NonFiniteLoss(f"step {run.step}: {e}; stopped, {run.ckpt_path} is left as it was ({written}): "
                            "lower --lr, raise --warmup-epochs or use --dtype fp32") from None
    final = accuracies(model, run.fixed, loaders.val, DTYPES[cfg.dtype], world) if run.step == total else {}
    if rank == 0:
        report(run, final, time.time() - start)
    return {"model": model, "checkpoint": run.ckpt_path, "top1": final, "history": run.history}


def parse_args(argv):
    return parse_config(TrainConfig, argv, __doc__)


def main(argv=None):
    cfg, typed = parse_args(argv)
    try:
        train(cfg, typed)
    except (data.DataError, ValueError) as e:  # bad data, checkpoint (CheckpointError) or flags: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
