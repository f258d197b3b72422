"""reproduce.py: Kendall's tau-b, Spearman's rho and the bootstrap against their definitions; the
protocol fixed by the seed; a --quick reproduction, two jobs at once, whose results.json agrees with
itself and with the files its jobs wrote, whose jobs started after the jobs they need, and which a
failing job stopped on the way; the same numbers one job at a time; --resume after a finished run,
after a kill between jobs and after a kill inside a training; a job ended with its run; a used
--out refused without --resume."""
import contextlib
import dataclasses
import io
import itertools
import json
import math
import random
import re
import shutil
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image

import reproduce
import train
from supernet import SHARINGS, SPACES, Subnet, count_params, load_checkpoint, supernet_params

SPACE = SPACES["cpu"]


class Killed(Exception):
    """Stands for a kill: raised where the process would have died."""


# ----------------------------------------------------------------------------- statistics


def test_tau_b_and_rho_of_a_worked_example_with_a_tie():
    # y ties at positions 2 and 4. Of the 10 pairs, x orders all; y orders 9: 8 agree with x, 1
    # disagrees (positions 3, 4). tau-b = (8 - 1) / sqrt(10 * 9).
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert reproduce.kendall_tau_b(x, y) == pytest.approx(7 / math.sqrt(90))
    # Ranks of y: 1, 2, 3.5, 5, 3.5; centred, x: -2, -1, 0, 1, 2 and y: -2, -1, .5, 2, .5.
    assert reproduce.average_ranks(y).tolist() == [1, 2, 3.5, 5, 3.5]
    assert reproduce.spearman_rho(x, y) == pytest.approx(8 / math.sqrt(10 * 9.5))
    assert reproduce.kendall_tau_b(x, x[::-1]) == -1 and reproduce.spearman_rho(x, x[::-1]) == pytest.approx(-1)


def brute_tau_b(x, y):
    """tau-b by its definition, pair by pair."""
    concordant = discordant = untied_x = untied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        untied_x += dx != 0
        untied_y += dy != 0
        concordant += dx * dy > 0
        discordant += dx * dy < 0
    return (concordant - discordant) / math.sqrt(untied_x * untied_y)


def brute_rho(x, y):
    """Pearson's correlation of ranks, ties given the mean of the positions they take when sorted."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for _, group in itertools.groupby(enumerate(order), key=lambda p: v[p[1]]):
            group = list(group)
            for _, i in group:
                r[i] = statistics.mean(position + 1 for position, _ in group)
        return r
    return statistics.correlation(ranks(x), ranks(y))


@pytest.mark.parametrize("seed", range(6))
def test_tau_b_and_rho_agree_with_their_definitions_on_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    x, y = rng.integers(0, 4, n).tolist(), rng.integers(0, 5, n).tolist()
    if len(set(x)) < 2 or len(set(y)) < 2:
        x[0], y[0] = 9, 9
    assert reproduce.kendall_tau_b(x, y) == pytest.approx(brute_tau_b(x, y))
    assert reproduce.spearman_rho(x, y) == pytest.approx(brute_rho(x, y))


def test_tau_b_and_rho_are_undefined_where_a_side_is_constant():
    assert math.isnan(reproduce.kendall_tau_b([1, 2, 3], [4, 4, 4]))
    assert math.isnan(reproduce.spearman_rho([2, 2, 2], [1, 2, 3]))


def test_bootstrap_skips_the_resamples_where_the_statistic_is_undefined():
    # Two points: a resample draws both (tau = 1) or one of them twice (constant: undefined).
    low, high, used = reproduce.bootstrap(reproduce.kendall_tau_b, [1, 2], [3, 5], 2000, seed=0, level=95)
    draws = np.random.default_rng(0).integers(0, 2, size=(2000, 2))
    assert (low, high) == (1.0, 1.0) and used == int((draws[:, 0] != draws[:, 1]).sum())
    assert 900 < used < 1100


def test_bootstrap_interval_is_the_percentiles_of_the_resampled_statistic():
    x, y = [1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 4, 3, 6, 8, 5, 7]
    low, high, used = reproduce.bootstrap(reproduce.spearman_rho, x, y, 500, seed=3, level=90)
    draws = np.random.default_rng(3).integers(0, 8, size=(500, 8))
    values = [reproduce.spearman_rho(np.array(x)[i], np.array(y)[i]) for i in draws]
    values = [v for v in values if not math.isnan(v)]
    assert used == len(values) and (low, high) == pytest.approx(tuple(np.percentile(values, [5, 95])))
    assert low < reproduce.spearman_rho(x, y) < high
    assert reproduce.bootstrap(reproduce.spearman_rho, x, y, 500, seed=3, level=90) == (low, high, used)

# ----------------------------------------------------------------------------- the protocol


def sixths(space, pool):
    """Claim (b)'s subnets by their definition: of the pool ranked by parameters (ties in the order
    drawn), the subnet at rank k * len / 6 for k = 1 .. 5, or past it the first not taken already
    (by the fixed three or a lower sixth)."""
    ranked = [pool[i] for i in sorted(range(len(pool)), key=lambda i: (count_params(space, pool[i]), i))]
    taken, found = list(train.fixed_subnets(space).values()), {}
    for k in range(1, 6):
        found[f"q{k}of6"] = next(s for s in ranked[k * len(pool) // 6:] if s not in taken)
        taken.append(found[f"q{k}of6"])
    return found


def test_plan_subnets_are_the_fixed_three_and_the_sixths_of_the_pool_by_parameters():
    rng = random.Random(0)
    pool = [SPACE.sample(rng) for _ in range(reproduce.POOL)]
    chosen = reproduce.plan_subnets(SPACE, pool)
    assert chosen == {**train.fixed_subnets(SPACE), **sixths(SPACE, pool)} and len(set(chosen.values())) == 8
    params = [count_params(SPACE, s) for s in chosen.values()]
    assert params == sorted(params)


def test_a_sixth_that_is_one_of_the_fixed_subnets_gives_way_to_the_next():
    middle, rng = train.fixed_subnets(SPACE)["middle"], random.Random(0)
    others = {SPACE.sample(rng) for _ in range(400)} - set(train.fixed_subnets(SPACE).values())
    smaller = [s for s in others if count_params(SPACE, s) < count_params(SPACE, middle)][:2]
    larger = [s for s in others if count_params(SPACE, s) > count_params(SPACE, middle)][:9]
    pool = larger + [middle] + smaller  # 12 subnets; by parameters, the middle is at 2 = 1/6 of 12
    by_params = sorted(pool, key=lambda s: count_params(SPACE, s))
    assert by_params[2] == middle
    chosen = reproduce.plan_subnets(SPACE, pool)
    assert [chosen[f"q{k}of6"] for k in reproduce.SIXTHS] == [by_params[i] for i in (3, 4, 6, 8, 10)]


@pytest.mark.parametrize("seed", range(4))
def test_hand_designed_is_the_uniform_subnet_closest_in_parameters_ties_to_the_smaller(seed):
    target = SPACE.sample(random.Random(seed))
    hand = reproduce.hand_designed(SPACE, target)
    assert len(set(hand.mlp_ratios)) == 1 and len(set(hand.num_heads)) == 1
    goal, found = count_params(SPACE, target), count_params(SPACE, hand)
    for E, depth, ratio, heads in itertools.product(SPACE.embed_dims, SPACE.depths, SPACE.mlp_ratios, SPACE.num_heads):
        other = count_params(SPACE, Subnet(E, [ratio] * depth, [heads] * depth))
        assert abs(other - goal) > abs(found - goal) or (abs(other - goal) == abs(found - goal) and other >= found)
    uniform = Subnet(96, [2.0] * 4, [2] * 4)
    assert reproduce.hand_designed(SPACE, uniform) == uniform

# ----------------------------------------------------------------------------- quick reproductions


def quick_config(out, **changes):
    return dataclasses.replace(reproduce.ReproduceConfig(out=str(out), quick=True), **changes)


def read_results(out):
    return json.loads((out / "results.json").read_text())


def as_text(value):
    """`value` as results.json writes it (tuples become lists; nan, where a correlation is undefined,
    is equal to itself)."""
    return json.dumps(value, sort_keys=True)


def measured(results):
    """What the jobs measured, less what the machine's moment (seconds, RSS) or the folder decides."""
    def kept(value):
        if isinstance(value, dict):
            return {k: kept(v) for k, v in value.items()
                    if k not in ("seconds", "step_mib", "process_peak_mib", "checkpoint", "folder")}
        return [kept(v) for v in value] if isinstance(value, list) else value
    return as_text(kept({"jobs": results["jobs"], "results": results["results"]}))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick reproduction, two jobs at once, stopped twice on the way: by --max-jobs 2, then by
    a job that fails (a training whose checkpoint is broken, deleted before --resume finishes the
    run). Returns
    (its folder, its results.json, what was seen on the way: "first", results.json after --max-jobs
    2; "error", the failure's message; "recorded", results.json's jobs then; "started",
    "finished", the jobs with a log, with a record in their folders then; "printed", the lines
    of the three runs)."""
    out = tmp_path_factory.mktemp("reproduce") / "out"
    printed, seen = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        reproduce.reproduce(quick_config(out, max_jobs=2))
        seen["first"] = read_results(out)
        broken = out / "retrain" / "q3of6" / "seed0" / "ckpt.pt"
        broken.parent.mkdir(parents=True)
        broken.write_text("not a checkpoint")
        with pytest.raises(reproduce.JobFailed) as failed:
            reproduce.reproduce(quick_config(out, resume=True))
        seen["error"], seen["recorded"] = str(failed.value), read_results(out)["jobs"]
        ids = [job["id"] for job in seen["first"]["plan"]["jobs"]]
        seen["started"] = {i for i in ids if (out / i / "log.txt").is_file()}
        seen["finished"] = {i for i in ids if (out / i / "record.json").is_file()}
        broken.unlink()
        reproduce.reproduce(quick_config(out, resume=True))
    seen["printed"] = printed.getvalue()
    return out, read_results(out), seen


def test_a_fresh_run_writes_its_whole_plan_and_each_jobs_needs_before_the_first_job(tmp_path, monkeypatch):
    def first_job(out, job):
        assert read_results(tmp_path / "r")["plan"]["jobs"][0]["id"] == job["id"] == "supernet/entangled"
        raise Killed
    monkeypatch.setattr(reproduce, "start_job", first_job)
    with pytest.raises(Killed):
        reproduce.reproduce(quick_config(tmp_path / "r"))
    results = read_results(tmp_path / "r")
    plan = results["plan"]
    assert results["jobs"] == {} and len(plan["jobs"]) == 23 and plan["threads_per_job"] == 1
    assert set(plan["subnets"]) == {"smallest", "middle", "largest", *(f"q{k}of6" for k in range(1, 6))}
    for name, record in plan["subnets"].items():
        assert Subnet.from_json((tmp_path / "r" / "subnets" / f"{name}.json").read_text()) == Subnet(**record["subnet"])
    ids = [job["id"] for job in plan["jobs"]]
    needs = {job["id"]: job["needs"] for job in plan["jobs"]}
    assert all(set(needs[i]) <= set(ids[:k]) for k, i in enumerate(ids))  # so a job is always ready
    retrains = [f"retrain/{name}/seed0" for name in plan["subnets"]]
    assert [i for i in ids if not needs[i]] == ["supernet/entangled", "supernet/classical", "memory/entangled",
                                                 "memory/classical", *retrains]
    assert needs["search/classical"] == ["supernet/classical"]
    assert needs["inherited/classical"] == ["supernet/classical", "search/entangled", "search/classical"]
    assert needs["finetune/winner"] == ["supernet/entangled", "search/entangled"]
    assert needs["retrain/winner/seed0"] == ["search/entangled", *retrains]
    assert needs["retrain/hand/seed0"] == ["search/entangled", *retrains, "retrain/winner/seed0"]
    assert needs["retrain/hand/seed2"] == ["search/entangled", "retrain/winner/seed2"]


def test_a_used_out_is_refused_without_resume_and_a_changed_setting_with_it(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["--quick", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2 and "--resume" in capsys.readouterr().err
    reproduce.save(tmp_path / "r", {"plan": {"config": dataclasses.asdict(quick_config(tmp_path / "r"))}, "jobs": {}})
    with pytest.raises(SystemExit):
        reproduce.main(["--resume", "--out", str(tmp_path / "r"), "--seed", "1"])
    assert "--seed 1 (the run has 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["--quick", "--out", str(tmp_path / "s"), "--jobs", "0"])
    assert exit_.value.code == 2 and "--jobs 0: expected 1 or more" in capsys.readouterr().err


def test_the_plan_is_what_ran(quick):
    out, results, _ = quick
    plan, done = results["plan"], results["jobs"]
    assert set(done) == {job["id"] for job in plan["jobs"]}
    best = Subnet.from_json((out / "search" / "entangled" / "best.json").read_text())
    assert Subnet(**done["search/entangled"]["best"]) == best
    space = reproduce.plan_space(plan)
    expected = {name: Subnet(**record["subnet"]) for name, record in plan["subnets"].items()}
    rng = random.Random(plan["config"]["seed"])  # the plan's subnets: a function of the seed alone
    pool = [space.sample(rng) for _ in range(reproduce.POOL)]
    assert expected == {**train.fixed_subnets(space), **sixths(space, pool)}
    expected.update(winner=best, hand=reproduce.hand_designed(space, best))
    for job in plan["jobs"]:
        record = done[job["id"]]
        assert (out / job["id"] / "log.txt").is_file()
        if job["kind"] == "retrain":
            assert Subnet(**record["subnet"]) == expected[job["name"]] and record["seed"] == job["seed"]
            if "same_as" not in record:  # what train.py trained: its checkpoint records subnet and seed
                ckpt = load_checkpoint(record["checkpoint"])
                assert Subnet(**ckpt["subnet"]) == expected[job["name"]] and ckpt["config"]["seed"] == job["seed"]
                assert ckpt["step"] == plan["recipe"]["epochs"] * plan["data"]["steps_per_epoch"]
    assert Subnet(**done["finetune/winner"]["subnet"]) == best
    finetune = load_checkpoint(out / "finetune" / "winner" / "ckpt.pt")["config"]
    assert finetune["inherit"] == str(out / "supernet" / "entangled" / "ckpt.pt")
    assert finetune["epochs"] == plan["finetune"]["epochs"]
    # the two supernets: the recipe, the seed; only the sharing (and the folder) differ
    configs = [load_checkpoint(out / "supernet" / s / "ckpt.pt")["config"] for s in SHARINGS]
    assert [c["sharing"] for c in configs] == list(SHARINGS)
    recipe = [{k: v for k, v in c.items() if k not in ("sharing", "out")} for c in (*configs, plan["recipe"])]
    assert recipe[0] == recipe[1] == recipe[2]
    for s in SHARINGS:
        assert done[f"supernet/{s}"]["params"] == done[f"memory/{s}"]["params"] == supernet_params(space, s)
        history = load_checkpoint(out / "supernet" / s / "ckpt.pt")["history"]["loss"]
        assert [tuple(p) for p in done[f"supernet/{s}"]["loss"]] == [tuple(p) for p in history]


def test_jobs_ran_two_at_a_time_each_after_the_jobs_it_needs(quick):
    out, results, seen = quick
    plan = results["plan"]
    events = [(int(i), event) for i, event in re.findall(r"==> job (\d+)/23 (started|done)", seen["printed"])]
    assert sum(event == "done" for _, event in events) == 23  # the failed job started twice
    assert sum(event == "started" for _, event in events) == 24 and "(2 running)" in seen["printed"]
    for position, (i, event) in enumerate(events):
        if event == "started":
            finished = {plan["jobs"][j - 1]["id"] for j, e in events[:position] if e == "done"}
            assert set(plan["jobs"][i - 1]["needs"]) <= finished, plan["jobs"][i - 1]["id"]


def test_a_failing_job_stops_the_run_and_the_jobs_finished_stay_recorded(quick):
    out, results, seen = quick
    failed = "retrain/q3of6/seed0"
    assert set(seen["first"]["jobs"]) == {"supernet/entangled", "supernet/classical"}  # --max-jobs 2
    assert seen["error"].startswith(f"job {failed} (retrain q3of6 from scratch, seed 0) failed with exit code 1")
    assert "ckpt.pt: not a readable checkpoint" in seen["error"] and str(out / failed / "log.txt") in seen["error"]
    assert failed not in seen["recorded"] and seen["finished"] == set(seen["recorded"])  # nothing finished is lost
    assert seen["started"] == seen["finished"] | {failed}  # the job beside it finished; none started after it
    after = seen["printed"].split(f"job {failed} (")[1].split("reproduction in")[0]
    assert " started " not in after
    assert results["jobs"][failed]["subnet"] == results["plan"]["subnets"]["q3of6"]["subnet"]  # --resume ran it


def test_the_results_agree_with_the_jobs_records(quick):
    out, results, _ = quick
    plan, done, r = results["plan"], results["jobs"], results["results"]
    seed, rows = plan["config"]["seed"], r["b"]["rows"]
    names = [*plan["subnets"], "winner"]
    assert set(rows) <= set(names) and len(rows) == len({json.dumps(done["inherited/entangled"]["subnets"][n])
                                                          for n in names})
    for name, row in rows.items():
        assert row["retrained"] == done[f"retrain/{name}/seed{seed}"]["val_top1"]
        assert all(row[s] == done[f"inherited/{s}"]["top1"][name] for s in SHARINGS)
    retrained = [row["retrained"] for row in rows.values()]
    for s in SHARINGS:
        inherited = [row[s] for row in rows.values()]
        if len(set(inherited)) > 1 and len(set(retrained)) > 1:
            assert r["b"][s]["kendall_tau_b"]["value"] == pytest.approx(brute_tau_b(inherited, retrained))
            assert r["b"][s]["spearman_rho"]["value"] == pytest.approx(brute_rho(inherited, retrained))
        else:  # a tiny set can leave every subnet at the same top-1
            assert math.isnan(r["b"][s]["kendall_tau_b"]["value"]) and math.isnan(r["b"][s]["spearman_rho"]["value"])
        assert r["b"][s]["max_abs_gap"] == max(abs(i - t) for i, t in zip(inherited, retrained))
        assert r["a"][s]["val_top1"]["smallest"] == done[f"inherited/{s}"]["top1"]["smallest"]
    assert r["c"]["retrained"] == done[f"retrain/winner/seed{seed}"]["val_top1"]
    assert r["c"]["inherited"] == done["inherited/entangled"]["top1"]["winner"]
    for name in ("winner", "hand"):
        top1 = [done[f"retrain/{name}/seed{seed + k}"]["val_top1"] for k in range(3)]
        assert r["d"][name]["val_top1"] == top1 and r["d"][name]["std"] == pytest.approx(statistics.stdev(top1))
    text = (out / "results.md").read_text()
    assert all(f"## ({claim})" in text for claim in "abcd") and "81.3-81.7 %" in text
    assert len(results["runs"]) == 3 and all(run["seconds"] > 0 for run in results["runs"])  # --max-jobs, failed, rest
    assert f"Wall time: {reproduce.clock(sum(run['seconds'] for run in results['runs']))}, in 3 part(s)" in text
    assert Image.open(out / "losses.png").size == (720, 420)
    assert Image.open(out / "inherited_vs_retrained.png").size == (600, 600)


def test_one_job_at_a_time_measures_the_same(quick, tmp_path):
    out, results, _ = quick
    one = reproduce.reproduce(quick_config(tmp_path / "one", jobs=1))
    assert one["plan"]["jobs"] == results["plan"]["jobs"] and one["plan"]["subnets"] == results["plan"]["subnets"]
    assert measured(one) == measured(results)


def test_resume_after_a_finished_reproduction_runs_no_job(quick, monkeypatch):
    out, results, _ = quick
    monkeypatch.setattr(reproduce, "start_job", lambda out, job: pytest.fail(f"{job['id']} ran again"))
    again = reproduce.reproduce(quick_config(out, resume=True))
    assert as_text(again) == as_text(results) == as_text(read_results(out))


def test_a_job_ends_when_the_run_that_started_it_does(quick, tmp_path):
    out, results, _ = quick
    copy, job = tmp_path / "out", next(job for job in results["plan"]["jobs"] if job["id"] == "retrain/largest/seed0")
    shutil.copytree(out, copy)
    recorded = read_results(copy)
    del recorded["jobs"][job["id"]]  # so that it trains afresh
    reproduce.save(copy, recorded)
    shutil.rmtree(copy / job["id"])
    child, log = reproduce.start_job(copy, job), copy / job["id"] / "log.txt"
    while not (log.is_file() and f"==> {job['id']}" in log.read_text()):  # the job has begun
        assert child.process.is_alive()
        time.sleep(0.01)
    child.lifeline.close()  # as the end of the run's process, however it ends, closes it
    child.process.join(timeout=60)
    assert child.process.exitcode == 1 and not (copy / job["id"] / "record.json").exists()


def test_resume_after_kills_between_jobs_and_inside_a_training(quick):
    """Runs last: it takes jobs off the quick reproduction and lets --resume put them back."""
    out, results, _ = quick
    seed = results["plan"]["config"]["seed"]
    before = read_results(out)
    retrained = f"retrain/q2of6/seed{seed}"
    gone = ["finetune/winner", retrained, f"retrain/hand/seed{seed + 2}"]  # the second's folder goes too
    for job in gone:
        del before["jobs"][job]
    del before["results"]
    reproduce.save(out, before)
    shutil.rmtree(out / retrained)
    # a training killed after its first step, as train.py leaves it with --ckpt-every 1; on one
    # thread, as a job's process trains
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train(train.TrainConfig(**dict(before["plan"]["recipe"], out=str(out / retrained), seed=seed,
                                             subnet=str(out / "subnets" / "q2of6.json"), max_steps=1)))
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(out / retrained / "ckpt.pt")["step"] == 1
    reproduce.reproduce(quick_config(out, resume=True, max_jobs=2))  # the first two in plan order
    recorded = read_results(out)["jobs"]
    assert "finetune/winner" in recorded and retrained in recorded and f"retrain/hand/seed{seed + 2}" not in recorded
    assert "resuming at step 1" in (out / retrained / "log.txt").read_text()
    final = reproduce.reproduce(quick_config(out, resume=True))
    for job in gone:  # the same numbers as the run that was never stopped
        assert final["jobs"][job]["val_top1"] == results["jobs"][job]["val_top1"], job
    assert as_text(final["results"]) == as_text(results["results"])


def test_eta_prices_the_jobs_left_at_the_rate_of_the_jobs_run_times_the_jobs_at_once():
    plan = {"jobs": [{"id": "a", "cost": 6e10}, {"id": "b", "cost": 1e10}, {"id": "c", "cost": 3e10}]}
    assert reproduce.eta(plan, {}, 1) == pytest.approx(1e11 / reproduce.PRIOR_MACS_PER_S)
    assert reproduce.eta(plan, {}, 2) == pytest.approx(1e11 / reproduce.PRIOR_MACS_PER_S / 2)
    assert reproduce.eta(plan, {"a": {"seconds": 3.0}}, 1) == pytest.approx(2.0)  # 6e10 in 3 s: 4e10 left at 2e10/s
    assert reproduce.eta(plan, {"a": {"seconds": 3.0}}, 2) == pytest.approx(1.0)
    reused = {"a": {"seconds": 3.0}, "b": {"seconds": 0.01, "same_as": "x"}}  # ran nothing: not a measure of speed
    assert reproduce.eta(plan, reused, 1) == pytest.approx(1.5)
