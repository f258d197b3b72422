"""search.py and the command line of autoformer.py: the operators keep every candidate valid,
unique and inside the constraints; a search is a function of its seed; a killed search resumes to
the same result; evolution beats random search on a known fitness; export keeps the logits; bad
input gets one clear line and exit code 2. A tiny space and a 40-image data set keep it quick."""
import dataclasses
import json
import random
import shutil
import threading

import pytest
import torch
from PIL import Image

import autoformer
import cli
import data
import search
from supernet import SPACES, Subnet, Supernet, count_params, load_weights

TINY = dataclasses.replace(SPACES["cpu"], embed_dims=(16, 24, 32), mlp_ratios=(1.0, 2.0), num_heads=(1, 2),
                           depths=(1, 2, 3), head_dim=8, patch_size=8, max_relative_position=3)
QUICK = dict(population=8, generations=3, parents=3, mutations=3, crossovers=3)  # 32 subnets of TINY's 252


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised TINY supernet in the checkpoint format of train.py, on 40 + 20 images."""
    folder = tmp_path_factory.mktemp("search")
    root = data.ensure_synthetic(folder / "synthetic", n_train=40, n_val=20)
    torch.manual_seed(0)
    path = folder / "ckpt.pt"
    torch.save({"model": Supernet(TINY).state_dict(), "space": dataclasses.asdict(TINY), "step": 7,
                "data": {"kind": "synthetic", "root": str(root), "img_size": 32,
                         **cli.dataset_record(data.load_dataset(root, verify=False)),
                         "minival": {"indices": list(range(0, 40, 2)), "seed": 0, "fraction": 0.5}}}, path)
    return path


def config(**changes):
    return dataclasses.replace(search.SearchConfig(), **{**QUICK, **changes})


def known_fitness(subnet):
    """A fixed function of the genes, with interactions, that no network computes: big and
    balanced layers score, and some pairs of neighbouring layers score more together."""
    score = subnet.embed_dim / 8 + 2 * subnet.depth
    for i, (ratio, heads) in enumerate(zip(subnet.mlp_ratios, subnet.num_heads)):
        score += ratio * (1 + i % 3) + heads * (3 - i % 3) + (ratio == 3.0 and heads == 3) * 4
    return score


def synthetic(subnets, generation):
    return [{"top1": known_fitness(s), "loglik": known_fitness(s)} for s in subnets]


def test_the_configured_score_ranks_the_subnets():
    """--fitness names the score that picks the parents: the other one is carried, never used."""
    def swapped(subnets, generation):
        return [{"top1": -known_fitness(s), "loglik": known_fitness(s)} for s in subnets]

    cfg, admissible = config(population=12, generations=4, fitness="top1"), inside(300e3, 700e3)
    by_top1 = search.run_search(SPACES["cpu"], synthetic, admissible, cfg)
    by_loglik = search.run_search(SPACES["cpu"], swapped, admissible, dataclasses.replace(cfg, fitness="loglik"))
    assert [r["subnet"] for r in by_top1] == [r["subnet"] for r in by_loglik]
    by_other = search.run_search(SPACES["cpu"], swapped, admissible, cfg)  # ranks by the negated top-1
    assert [r["subnet"] for r in by_other] != [r["subnet"] for r in by_top1]


def inside(lo, hi):
    return lambda s: lo <= count_params(SPACES["cpu"], s) <= hi


def test_mutation_and_crossover_keep_subnets_valid_unique_and_inside():
    space, admissible = SPACES["cpu"], inside(300e3, 500e3)
    for seed in range(30):
        rng = random.Random(seed)
        parents = [space.sample(rng) for _ in range(6)]
        for _ in range(20):
            child = search.mutate(rng.choice(parents), space, rng, 0.4, 0.2)
            space.validate(child)
            mixed = search.crossover(parents, rng)
            if mixed is not None:
                space.validate(mixed)
                assert any(all(x in (getattr(a, f), getattr(b, f)) if f == "embed_dim"
                               else all(g in pair for g, pair in zip(x, zip(getattr(a, f), getattr(b, f))))
                               for f, x in dataclasses.asdict(mixed).items())
                           for a in parents for b in parents if a != b and a.depth == b.depth == mixed.depth)
        records = search.run_search(space, synthetic, admissible, config(seed=seed, population=20, generations=4,
                                                                         mutations=8, crossovers=8), ())
        subnets = [r["subnet"] for r in records]
        assert len(subnets) == 100 and len(set(subnets)) == 100
        assert all(admissible(s) and space.validate(s) for s in subnets)
        assert [r["generation"] for r in records] == [g for g in range(5) for _ in range(20)]


def test_mutation_changes_depth_by_truncating_or_extending():
    space, rng = SPACES["cpu"], random.Random(0)
    parent = Subnet(64, [2.0] * 4, [2] * 4)
    children = [search.mutate(parent, space, rng, 1.0, 0.0) for _ in range(50)]
    assert {c.depth for c in children} == {2, 4, 6}
    for child in children:  # with p_layer = 0 the kept layers are the parent's, new layers random
        kept = min(child.depth, 4)
        assert child.mlp_ratios[:kept] == parent.mlp_ratios[:kept] and child.num_heads[:kept] == parent.num_heads[:kept]


def test_search_is_a_function_of_the_seed():
    cfg, admissible = config(population=12, generations=4), inside(300e3, 700e3)
    first = search.run_search(SPACES["cpu"], synthetic, admissible, cfg)
    assert first == search.run_search(SPACES["cpu"], synthetic, admissible, cfg)
    assert first != search.run_search(SPACES["cpu"], synthetic, admissible, dataclasses.replace(cfg, seed=1))


def test_stopped_and_resumed_equals_uninterrupted():
    cfg, admissible = config(population=12, generations=5), inside(300e3, 700e3)
    full = search.run_search(SPACES["cpu"], synthetic, admissible, cfg)
    for k in range(5):  # stopped after generation k, then resumed from its records
        part = search.run_search(SPACES["cpu"], synthetic, admissible, dataclasses.replace(cfg, generations=k))
        assert search.run_search(SPACES["cpu"], synthetic, admissible, cfg, part) == full


def test_evolution_beats_random_search_at_equal_budget():
    admissible, wins = inside(400e3, 600e3), 0
    for seed in range(10):
        cfg = config(seed=seed, population=20, generations=10, parents=5, mutations=8, crossovers=8)
        best = {a: max(r["top1"] for r in search.run_search(SPACES["cpu"], synthetic, admissible,
                                                            dataclasses.replace(cfg, algorithm=a)))
                for a in ("evolution", "random")}
        wins += best["evolution"] > best["random"]
    assert wins >= 8


def test_scoring_threads_end_with_their_round():
    """Latency is measured between rounds, and idle threads left alive would slow it down."""
    memo, scored = {}, []
    images, labels = torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    fitness = search.supernet_fitness(Supernet(TINY).eval(), (images, labels), config(batch_size=4), memo,
                                      lambda *row: scored.append(row), rank=0, world=1)
    threads = threading.active_count()
    assert len(fitness([TINY.smallest(), TINY.largest()], 0)) == 2 and len(scored) == len(memo) == 2
    assert threading.active_count() == threads


def test_search_writes_its_results(checkpoint, tmp_path):
    out = tmp_path / "run"
    summary = search.search(config(checkpoint=str(checkpoint), out=str(out), params=":1M", fitness="loglik"))
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and len({json.dumps(r["subnet"]) for r in rows}) == 32
    assert set(rows[0]) == {"subnet", "params", "flops", "top1", "loglik", "generation"}
    assert all(r["loglik"] < 0 for r in rows)  # the mean log-probability of the right class
    best = Subnet.from_json((out / "best.json").read_text())
    assert max(r["loglik"] for r in rows) == summary["best"]["loglik"] and best == Subnet(**summary["best"]["subnet"])
    front = json.loads((out / "pareto.json").read_text())
    assert all(a["params"] < b["params"] and a["loglik"] < b["loglik"] for a, b in zip(front, front[1:]))
    assert front[-1]["loglik"] == summary["best"]["loglik"] and 0 <= summary["best"]["val_top1"] <= 100
    assert Image.open(out / "search.png").size == (960, 600)
    assert json.loads((out / "state.json").read_text())["result"]["scored"] == 32


def test_killed_search_resumes_to_the_same_result(checkpoint, tmp_path, monkeypatch):
    cfg = config(checkpoint=str(checkpoint), params=":1M")
    search.search(dataclasses.replace(cfg, out=str(tmp_path / "whole")))
    calls, real = [], search.evaluate

    def dies_after_13(*args, **kwargs):  # a kill in the middle of generation 1
        if len(calls) == 13:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "evaluate", dies_after_13)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one subnet at a time: with N threads, up to N - 1 scores in flight are redone
    try:
        with pytest.raises(KeyboardInterrupt):
            search.search(dataclasses.replace(cfg, out=str(tmp_path / "killed")))
        monkeypatch.setattr(search, "evaluate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        search.search(dataclasses.replace(cfg, out=str(tmp_path / "killed"), resume=True))
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 32 + 1  # every subnet scored once, plus the winner on the val split
    for name in ("candidates.jsonl", "best.json", "pareto.json"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "whole" / name).read_text()


@pytest.fixture
def one_thread():
    """One subnet scored at a time: with N threads, a kill loses up to N - 1 scores in flight, so
    the number of calls before a kill would not say where the search stopped."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_after(calls, monkeypatch):
    """search.evaluate that raises KeyboardInterrupt, as a kill would, after `calls` scores."""
    real, done = autoformer.evaluate, []

    def evaluate(*args, **kwargs):
        if len(done) == calls:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(search, "evaluate", evaluate)


def same_results(a, b):
    return all((a / name).read_text() == (b / name).read_text() for name in ("candidates.jsonl", "best.json",
                                                                             "pareto.json"))


def test_a_fresh_search_in_an_old_ones_folder_replaces_its_state_at_once(checkpoint, tmp_path, monkeypatch,
                                                                         one_thread):
    old = config(checkpoint=str(checkpoint), params=":1M", out=str(tmp_path / "s"))
    search.search(old)
    new = dataclasses.replace(old, seed=5, params="20K:1M")
    search.search(dataclasses.replace(new, out=str(tmp_path / "ref")))
    kill_after(3, monkeypatch)  # in generation 0: the new search has not finished a generation
    with pytest.raises(KeyboardInterrupt):
        search.search(new)
    state = json.loads((tmp_path / "s" / "state.json").read_text())
    assert state["generations_done"] == 0 and state["config"]["seed"] == 5 and state["config"]["params"] == "20K:1M"
    assert not any((tmp_path / "s" / name).exists() for name in ("best.json", "pareto.json", "search.png"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"but --params :1M \(the run has 20K:1M\), --seed 0 \(the run has 5\)"):
        search.search(dataclasses.replace(old, resume=True), typed={"params", "seed", "out"})  # as if typed
    search.search(dataclasses.replace(new, resume=True))
    assert same_results(tmp_path / "s", tmp_path / "ref")


def test_resume_scores_with_the_recorded_checkpoint_and_refuses_another(checkpoint, tmp_path, monkeypatch, capsys,
                                                                        one_thread):
    shutil.copy(checkpoint, tmp_path / "first.pt")
    cfg = config(checkpoint=str(tmp_path / "first.pt"), params=":1M", out=str(tmp_path / "s"))
    search.search(dataclasses.replace(cfg, out=str(tmp_path / "ref")))
    kill_after(10, monkeypatch)  # in generation 1
    with pytest.raises(KeyboardInterrupt):
        search.search(cfg)
    monkeypatch.setattr(search, "evaluate", autoformer.evaluate)
    # Where --checkpoint points by default, another supernet of the same space, data and step.
    monkeypatch.chdir(tmp_path)
    other = torch.load(checkpoint, weights_only=True)
    torch.manual_seed(1)
    other["model"] = Supernet(TINY).state_dict()
    (tmp_path / "out").mkdir()
    torch.save(other, tmp_path / "out" / "ckpt.pt")
    fails(search.main, ["--resume", "--out", "s", "--checkpoint", "out/ckpt.pt"], capsys, "out/ckpt.pt: sha256",
          f"scored with {tmp_path / 'first.pt'}")
    kill_after(10, monkeypatch)  # in generation 2
    with pytest.raises(KeyboardInterrupt):
        search.main(["--resume", "--out", "s"])  # the recorded first.pt, not out/ckpt.pt
    monkeypatch.setattr(search, "evaluate", autoformer.evaluate)
    (tmp_path / "first.pt").rename(tmp_path / "moved.pt")  # the same file elsewhere: accepted
    search.main(["--resume", "--out", "s", "--checkpoint", "moved.pt"])
    assert same_results(tmp_path / "s", tmp_path / "ref")
    assert json.loads((tmp_path / "s" / "state.json").read_text())["config"]["checkpoint"] == "moved.pt"


def test_resume_refuses_a_search_that_records_no_fitness_or_scores_without_it(checkpoint, tmp_path, capsys):
    """A search ranked by another rule than --fitness, or whose rows lack a score, cannot go on."""
    out = tmp_path / "s"
    search.search(config(checkpoint=str(checkpoint), params=":1M", out=str(out)))
    state, rows = json.loads((out / "state.json").read_text()), (out / "candidates.jsonl").read_text()
    del state["config"]["fitness"]
    (out / "state.json").write_text(json.dumps(state))
    fails(search.main, ["--resume", "--out", str(out)], capsys, "state.json: not the state of a search by this "
          "search.py ('fitness')")
    state["config"]["fitness"] = "loglik"
    (out / "state.json").write_text(json.dumps(state))
    lines = rows.splitlines()
    lines[2] = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "loglik"})
    (out / "candidates.jsonl").write_text("\n".join(lines) + "\n")
    fails(search.main, ["--resume", "--out", str(out)], capsys, "candidates.jsonl: line 3 lacks its top1 or loglik "
          "score: start afresh without --resume")


def test_exported_model_equals_the_supernet(checkpoint, tmp_path):
    subnet = Subnet(24, [2.0, 1.0], [2, 1])
    (tmp_path / "best.json").write_text(subnet.to_json())
    autoformer.main(["export", "--checkpoint", str(checkpoint), "--subnet", str(tmp_path / "best.json"),
                     "--out", str(tmp_path / "new" / "model.pt")])  # the folder is made
    model = autoformer.load_exported(tmp_path / "new" / "model.pt")
    supernet = load_weights(Supernet(TINY), torch.load(checkpoint, weights_only=True)["model"], "test").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), supernet(images, subnet), rtol=1e-5, atol=1e-5)
    assert model.subnet == subnet and model.space == TINY


def test_info_and_evaluate_commands(checkpoint, tmp_path, capsys):
    autoformer.main(["info", "--subnet", "autoformer-t"])
    assert "5.868 M parameters" in capsys.readouterr().out
    (tmp_path / "sub.json").write_text(Subnet(32, [2.0], [2]).to_json())
    autoformer.main(["evaluate", "--checkpoint", str(checkpoint), "--subnet", str(tmp_path / "sub.json")])
    assert "val top-1" in capsys.readouterr().out


def fails(main, argv, capsys, *needles):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_gets_one_line_and_exit_code_2(checkpoint, tmp_path, capsys):
    run = ["--out", str(tmp_path / "bad"), "--population", "8", "--generations", "1", "--parents", "3",
           "--mutations", "3", "--crossovers", "3"]
    fails(search.main, ["--checkpoint", str(tmp_path / "missing.pt")] + run, capsys, "no such checkpoint file")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fails(search.main, ["--checkpoint", str(tmp_path / "junk.pt")] + run, capsys, "not a readable checkpoint")
    other = dataclasses.replace(TINY, head_dim=16)  # the same layers, wider attention
    torch.save({"model": Supernet(other).state_dict(), "space": dataclasses.asdict(TINY)}, tmp_path / "other.pt")
    fails(search.main, ["--checkpoint", str(tmp_path / "other.pt")] + run, capsys, "weights of another space")
    fails(search.main, ["--checkpoint", str(checkpoint), "--params", "5M:6M"] + run, capsys,
          "no subnet of the space is inside", f"{search.mega(count_params(TINY, TINY.smallest()))} to")
    fails(search.main, ["--checkpoint", str(checkpoint), "--flops", ":1K"] + run, capsys, "--flops", "M flops")
    fails(search.main, ["--checkpoint", str(checkpoint), "--params", "1M-2M"] + run, capsys, "write MIN:MAX")
    fails(search.main, ["--checkpoint", str(checkpoint), "--latency-ms", "1e-6"] + run, capsys,
          "even the smallest subnet takes")
    fails(search.main, ["--checkpoint", str(checkpoint), "--params", ":6K"] + run,
          capsys, "exhausted")
    torch.save({"model": Supernet(TINY).state_dict(), "space": dataclasses.asdict(TINY)}, tmp_path / "nodata.pt")
    fails(search.main, ["--checkpoint", str(tmp_path / "nodata.pt")] + run, capsys, "records no data set")
    torch.save({"model": {}, "space": dataclasses.asdict(TINY)}, tmp_path / "empty.pt")
    fails(search.main, ["--checkpoint", str(tmp_path / "empty.pt")] + run, capsys, "do not fit")
    fails(search.main, ["--checkpoint", str(checkpoint), "--resume", "--out", str(tmp_path / "none")], capsys,
          "no search to resume")
    fewer = data.ensure_synthetic(tmp_path / "fewer", n_train=20, n_val=10)  # held-out indices reach 38
    fails(search.main, ["--checkpoint", str(checkpoint), "--data", str(fewer)] + run, capsys,
          f"{fewer}: 20 train images, but {checkpoint} was trained on 40")
    older = torch.load(checkpoint, weights_only=True)  # as written before train.py recorded the class names
    del older["data"]["class_names"], older["data"]["train_images"]
    torch.save(older, tmp_path / "older.pt")
    fails(search.main, ["--checkpoint", str(tmp_path / "older.pt"), "--data", str(fewer)] + run, capsys,
          f"{fewer}: 20 train images", "index 38")
    names = data.load_dataset(fewer, verify=False).class_names
    for folder, classes in (("three", ["a", "b", "c"]), ("renamed", names[:-1] + ["zebra"])):
        for split in ("train", "val"):
            for name in classes:
                (tmp_path / folder / split / name).mkdir(parents=True)
                Image.new("RGB", (32, 32)).save(tmp_path / folder / split / name / "0.png")
    fails(search.main, ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "three")] + run, capsys,
          f"{tmp_path / 'three'}: 3 classes", "has 10")
    fails(search.main, ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "renamed")] + run, capsys,
          f"{tmp_path / 'renamed'}: class 9 is 'zebra', but {checkpoint} was trained with {names[9]!r} there")
    fails(autoformer.main, ["evaluate", "--checkpoint", str(checkpoint), "--subnet", "autoformer-t"], capsys,
          "is not in the space")
    one = {"model": {}, "space": dataclasses.asdict(TINY), "subnet": json.loads(TINY.smallest().to_json())}
    torch.save(one, tmp_path / "one.pt")  # a train.py --subnet run's checkpoint, or an export
    (tmp_path / "s.json").write_text(TINY.smallest().to_json())
    fails(search.main, ["--checkpoint", str(tmp_path / "one.pt")] + run, capsys, "one.pt: the checkpoint of one "
          "AutoFormer (a train.py --subnet run or an export), not of a supernet")
    fails(autoformer.main, ["evaluate", "--checkpoint", str(tmp_path / "one.pt"), "--subnet", str(tmp_path / "s.json")],
          capsys, "not of a supernet")
    moved = torch.load(checkpoint, weights_only=True)
    moved["data"]["root"] = str(tmp_path / "gone")
    torch.save(moved, tmp_path / "moved.pt")
    fails(search.main, ["--checkpoint", str(tmp_path / "moved.pt")] + run, capsys,
          f"moved.pt was trained on {tmp_path / 'gone'}, which is gone", "--data")
