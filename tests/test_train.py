"""Tests of train.py: the schedule, a step, resume, two ranks, non-finite loss, the command line,
--subnet/--inherit and --init. Training runs in-process on a tiny built-in set, fp32, no workers."""
import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import train
from autoformer import AutoFormer, extract
from supernet import SPACES, Subnet, Supernet, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """80 train (one per class held out as minival) and 20 val images: 8 steps of 8 per epoch."""
    return data.ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=80, n_val=20)


def tiny_cfg(tiny_set, out, **overrides):
    settings = dict(data=str(tiny_set), out=str(out), epochs=2, batch_size=8, minival=0.1, workers=0,
                    dtype="fp32", log_every=1, warmup_epochs=0.5)
    return train.TrainConfig(**{**settings, **overrides})


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), key


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    lr = [train.learning_rate(s, total=100, warmup=10, peak=1.0, floor=0.01) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[4] == pytest.approx(0.5) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr[55] == pytest.approx(0.505)  # half way: the mean of peak and floor
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert train.learning_rate(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_subnets_are_a_function_of_seed_and_step_and_the_sandwich_brackets_them():
    space, cfg = SPACES["cpu"], train.TrainConfig()
    draws = [train.step_subnets(space, cfg, s)[0] for s in range(20)]
    assert draws == [train.step_subnets(space, cfg, s)[0] for s in range(20)]
    assert len(set(draws)) > 10
    sandwich = train.step_subnets(space, train.TrainConfig(sandwich=True, sandwich_random=2), 3)
    assert sandwich[:2] == [space.largest(), space.smallest()] and len(sandwich) == 4


def test_weight_decay_spares_biases_norms_and_position_embeddings():
    decay, no_decay = train.param_groups(Supernet(SPACES["cpu"]), 0.05)
    ids = {id(p) for p in no_decay["params"]}
    model = Supernet(SPACES["cpu"])
    names = {n for n, p in model.named_parameters()}
    spared = {n for n in names if n.endswith("bias") or "norm" in n or "pos_embed" in n or "cls_token" in n
              or "embeddings_table" in n}
    assert len(ids) == len(spared) and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    space = SPACES["cpu"]
    model, subnet = Supernet(space), space.largest()
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    targets = torch.nn.functional.one_hot(labels, 10).float()
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = train.TrainConfig(clip_grad=1.0)
    before = train.train_step(model, opt, scaler, images, targets, [subnet], None, cfg, 1)
    after = train.soft_cross_entropy(model(images, subnet), targets).item()
    assert after < before - 1e-3
    assert all(p.grad is None for p in model.parameters())  # set to None, not zero: see sync_gradients


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_set, tmp_path, monkeypatch):
    settings = dict(drop_path=0.1, mixup=0.8, cutmix=1.0, ckpt_every=4)
    whole = train.train(tiny_cfg(tiny_set, tmp_path / "whole", **settings))

    def killed(space, cfg, step):  # the process dies as step 6 begins (mid-epoch 1)
        if step == 5:
            raise KeyboardInterrupt
        return draw(space, cfg, step)

    draw = train.step_subnets
    monkeypatch.setattr(train, "step_subnets", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tiny_set, tmp_path / "cut", **settings))
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["step"] == 4  # step 5 is lost with the process
    monkeypatch.setattr(train, "step_subnets", draw)
    resumed = train.train(tiny_cfg(tiny_set, tmp_path / "cut", resume=True))
    assert_same_weights(weights(whole["checkpoint"]), weights(resumed["checkpoint"]), atol=1e-6)
    assert resumed["history"]["epochs"] == whole["history"]["epochs"]
    assert resumed["history"]["loss"] == whole["history"]["loss"]  # the same loss at every step
    assert load_checkpoint(resumed["checkpoint"])["step"] == 16


def test_a_kill_during_the_end_of_epoch_evaluation_keeps_the_epoch(tiny_set, tmp_path, monkeypatch):
    whole = train.train(tiny_cfg(tiny_set, tmp_path / "whole", epochs=1, ckpt_every=4))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real = train.accuracies
    monkeypatch.setattr(train, "accuracies", killed)  # the process dies as epoch 1 is evaluated
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tiny_set, tmp_path / "cut", epochs=1, ckpt_every=4))
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["step"] == 4  # not step 8, the epoch's last
    monkeypatch.setattr(train, "accuracies", real)
    resumed = train.train(tiny_cfg(tiny_set, tmp_path / "cut", epochs=1, ckpt_every=4, resume=True))
    assert resumed["history"] == whole["history"]


def _rank_worker(rank, cfg, port, out):
    # what any launcher sets; torchrun's LOCAL_WORLD_SIZE is left out, as a hand-made launcher would
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    drawn, draw = [], train.step_subnets
    train.step_subnets = lambda *args: drawn.append(draw(*args)) or drawn[-1]
    result = train.train(cfg)
    torch.save({"drawn": [s.to_json() for step in drawn for s in step],
                "weights": result["model"].state_dict()}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_draw_the_same_subnets_and_keep_identical_weights(tiny_set, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_cfg(tiny_set, tmp_path / "out", epochs=1, max_steps=3)
    mp.spawn(_rank_worker, args=(cfg, port, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]["drawn"]) == 3 and ranks[0]["drawn"] == ranks[1]["drawn"]
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])
    assert_same_weights(ranks[0]["weights"], weights(tmp_path / "out" / "ckpt.pt"))
    fresh = (torch.manual_seed(0), Supernet(SPACES["cpu"]))[1].state_dict()
    assert not torch.equal(fresh["head.weight"], ranks[0]["weights"]["head.weight"])  # it did train


def test_a_non_finite_loss_stops_the_run_and_leaves_the_checkpoint_alone(tiny_set, tmp_path, monkeypatch):
    train.train(tiny_cfg(tiny_set, tmp_path, ckpt_every=2, max_steps=2))
    ckpt = tmp_path / "ckpt.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    monkeypatch.setattr(train, "soft_cross_entropy", lambda logits, targets: logits.sum() * float("nan"))
    with pytest.raises(train.NonFiniteLoss, match=r"step 2: loss is .*\(last written at step 2\)"):
        train.train(tiny_cfg(tiny_set, tmp_path, resume=True, ckpt_every=1))
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    with pytest.raises(train.NonFiniteLoss, match=r"step 0: loss is .*\(not written by this run\)"):
        train.train(tiny_cfg(tiny_set, tmp_path / "fresh"))


def test_the_command_line_trains_writes_checkpoint_and_curves_and_prints_a_summary(tiny_set, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tiny_set), "--out", str(out),
                          "--epochs", "1", "--batch-size", "16", "--minival", "0.1", "--workers", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert (out / "ckpt.pt").is_file() and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "val top-1  smallest" in run.stdout and "next: python search.py" in run.stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert {"model", "space", "data", "step", "epoch", "optimizer", "scheduler", "rng", "config",
            "history"} <= set(ckpt)
    assert ckpt["step"] == 4 and len(ckpt["data"]["minival"]["indices"]) == 10


def fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_a_shortened_flag_is_not_taken_for_a_longer_one(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--epoch", "3"])  # argparse's default would read --epochs 3
    assert "unrecognized arguments: --epoch 3" in capsys.readouterr().err


def test_bad_input_is_one_line_on_stderr_and_exit_status_2(tiny_set, tmp_path, capsys):
    for argv in (["--data", str(tmp_path / "missing")], ["--space", "huge"], ["--resume", "--out", str(tmp_path)]):
        fails(argv, capsys)
    run = ["--data", str(tiny_set), "--out", str(tmp_path / "run"), "--minival", "0.1", "--workers", "0"]
    fails(run + ["--batch-size", "71"], capsys, f"{tiny_set}: 70 train images per process", "--batch-size 71")
    for fraction in ("0", "1"):
        fails(run + ["--minival", fraction], capsys, f"--minival {fraction}:", "between 0 and 1")
    for name, text in (("badtype.json", '{"embed_dim": 64, "mlp_ratios": 2.0, "num_heads": [2, 2, 2, 2]}'),
                       ("notjson.json", "not json"), ("outside.json", Subnet(64, [9.0], [2]).to_json())):
        (tmp_path / name).write_text(text)
        fails(run + ["--subnet", str(tmp_path / name)], capsys, str(tmp_path / name))


def test_resume_refuses_a_flag_that_would_change_the_recorded_run(tiny_set, tmp_path, capsys):
    run = ["--data", str(tiny_set), "--out", str(tmp_path / "run"), "--minival", "0.1", "--workers", "0",
           "--epochs", "2", "--batch-size", "8", "--dtype", "fp32"]
    train.main(run + ["--max-steps", "1"])
    capsys.readouterr()
    fails(["--resume", "--out", str(tmp_path / "run"), "--epochs", "20", "--lr", "0.01", "--init", "a.pt"], capsys,
          "--resume continues the run with its recorded settings",  # 20: the default, typed
          "--epochs 20 (the run has 2), --lr 0.01 (the run has 0.008), --init a.pt (the run has '')")
    train.main(run + ["--resume", "--max-steps", "2"])  # the same settings again, and a run-time one: fine
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 2


def test_resume_refuses_a_data_set_that_changed_since(tmp_path, capsys):
    grown = data.ensure_synthetic(tmp_path / "grown", n_train=80, n_val=20)
    run = ["--data", str(grown), "--out", str(tmp_path / "run"), "--minival", "0.1", "--workers", "0",
           "--batch-size", "8", "--dtype", "fp32", "--max-steps", "1"]
    train.main(run)
    capsys.readouterr()
    first = sorted((grown / "train").iterdir())[0]
    shutil.copy(next(first.iterdir()), first / "added.png")  # every later index now names another image
    fails(["--resume", "--out", str(tmp_path / "run")], capsys,
          f"{grown}: 81 train images, but {tmp_path / 'run' / 'ckpt.pt'} was trained on 80: not the data set")


def test_a_run_may_not_write_over_the_checkpoint_it_starts_from(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"the supernet")
    (tmp_path / "sub.json").write_text(SPACES["cpu"].smallest().to_json())
    (tmp_path / "sub").mkdir()
    same = str(tmp_path / "sub" / ".." / "ckpt.pt")  # another spelling of OUT/ckpt.pt
    for flags in (["--subnet", str(tmp_path / "sub.json"), "--inherit", same], ["--init", same]):
        fails(["--out", str(tmp_path)] + flags, capsys, f"{flags[-2]} {same}", str(tmp_path / "ckpt.pt"), "--out")
    assert (tmp_path / "ckpt.pt").read_bytes() == b"the supernet"


def test_a_fresh_run_may_not_write_over_a_checkpoint_of_the_other_kind(tiny_set, tmp_path, capsys):
    def run(out, *flags):
        return ["--data", str(tiny_set), "--out", str(tmp_path / out), "--minival", "0.1", "--workers", "0",
                "--batch-size", "8", "--dtype", "fp32", "--max-steps", "1", *flags]

    (tmp_path / "sub.json").write_text(SPACES["cpu"].smallest().to_json())
    train.main(run("super"))
    assert (tmp_path / "super" / "curves.png").is_file()  # drawn at every save, not only at an epoch's end
    supernet = (tmp_path / "super" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    fails(run("super", "--subnet", str(tmp_path / "sub.json")), capsys,
          f"{tmp_path / 'super' / 'ckpt.pt'} holds a supernet training run", "--out")
    assert (tmp_path / "super" / "ckpt.pt").read_bytes() == supernet
    train.main(run("sub", "--subnet", str(tmp_path / "sub.json")))
    subnet = (tmp_path / "sub" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    fails(run("sub"), capsys, "holds a subnet training run, which this fresh supernet run would write over")
    assert (tmp_path / "sub" / "ckpt.pt").read_bytes() == subnet
    (tmp_path / "legacy").mkdir()  # torch's pre-1.6 format, which cannot be memory-mapped
    torch.save(load_checkpoint(tmp_path / "sub" / "ckpt.pt"), tmp_path / "legacy" / "ckpt.pt",
               _use_new_zipfile_serialization=False)
    fails(run("legacy"), capsys, "holds a subnet training run")
    train.main(run("super", "--seed", "1"))  # the same kind: a fresh run starts afresh
    assert load_checkpoint(tmp_path / "super" / "ckpt.pt")["config"]["seed"] == 1


def test_subnet_trains_standalone_from_the_inherited_weights(tiny_set, tmp_path):
    space = SPACES["cpu"]
    torch.manual_seed(1)
    supernet = Supernet(space)
    torch.save({"model": supernet.state_dict(), "space": train.dataclasses.asdict(space)}, tmp_path / "super.pt")
    subnet = space.sample(__import__("random").Random(5))
    (tmp_path / "sub.json").write_text(subnet.to_json())
    # lr 0: the weights stay what was inherited, so they must equal extract()'s
    result = train.train(tiny_cfg(tiny_set, tmp_path / "out", subnet=str(tmp_path / "sub.json"),
                                  inherit=str(tmp_path / "super.pt"), lr=0.0, min_lr=0.0, epochs=1))
    assert isinstance(result["model"], AutoFormer) and result["model"].subnet == subnet
    assert_same_weights(result["model"].state_dict(), extract(supernet, subnet).state_dict())
    assert set(result["top1"]) == {"subnet"}
    scratch = train.train(tiny_cfg(tiny_set, tmp_path / "scratch", subnet=str(tmp_path / "sub.json"), max_steps=2))
    fresh = (torch.manual_seed(0), AutoFormer(space, subnet))[1]  # train.py seeds with cfg.seed = 0
    assert not torch.equal(scratch["model"].head.weight, fresh.head.weight)
    assert load_checkpoint(scratch["checkpoint"])["subnet"] == json.loads(subnet.to_json())


def test_a_resumed_subnet_run_reads_its_own_checkpoint_not_the_files_it_began_with(tiny_set, tmp_path):
    space = SPACES["cpu"]
    torch.save({"model": Supernet(space).state_dict(), "space": train.dataclasses.asdict(space)}, tmp_path / "super.pt")
    subnet, other = space.smallest(), space.largest()
    (tmp_path / "sub.json").write_text(subnet.to_json())
    cfg = tiny_cfg(tiny_set, tmp_path / "out", subnet=str(tmp_path / "sub.json"), inherit=str(tmp_path / "super.pt"),
                   epochs=1)
    train.train(train.dataclasses.replace(cfg, max_steps=2))
    (tmp_path / "sub.json").write_text(other.to_json())  # a later search's winner
    (tmp_path / "super.pt").unlink()
    resumed = train.train(train.dataclasses.replace(cfg, resume=True))
    assert resumed["model"].subnet == subnet and load_checkpoint(resumed["checkpoint"])["step"] == 8


def test_init_loads_an_official_checkpoint_that_records_no_space(tiny_set, tmp_path):
    torch.manual_seed(2)
    official = Supernet(SPACES["cpu"]).state_dict()
    torch.save({"model": official, "args": argparse.Namespace(lr=5e-4)}, tmp_path / "official.pth")
    result = train.train(tiny_cfg(tiny_set, tmp_path / "out", init=str(tmp_path / "official.pth"), space="cpu",
                                  lr=0.0, min_lr=0.0, max_steps=1))
    assert_same_weights(result["model"].state_dict(), official)
    assert tuple(load_checkpoint(result["checkpoint"])["space"]["embed_dims"]) == SPACES["cpu"].embed_dims
