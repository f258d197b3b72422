"""Classical weight sharing, AutoFormer's baseline, beside weight entanglement: a step of the
classical supernet changes the weights of its subnet's choices and of no other choice; a classical
subnet runs as an entangled supernet holding its tensors in the leading blocks would; extract keeps
the logits of either sharing; the parameters are counted; and a checkpoint carries its sharing
through train.py, search.py and autoformer.py. The checkpoint tests train in-process on the tiny
built-in set of test_train.py."""
import dataclasses
import random

import pytest
import torch

import autoformer
import search
import train
from supernet import (SHARINGS, SPACES, CheckpointError, Subnet, Supernet, load_checkpoint, load_supernet,
                      load_weights, supernet_params)
from test_train import assert_same_weights, fails, tiny_cfg, tiny_set  # noqa: F401 (tiny_set: a fixture)

CPU = SPACES["cpu"]


def perturbed(model):
    """The model with weights larger than the 0.02 init, so that every term matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def choice_names(model, subnet):
    """The names of the classical supernet's tensors that `subnet` chooses, from the keys alone:
    e<E> outside the layers, e<E>_h<heads> and e<E>_r<ratio> (3.5 as 3p5) in each of its layers."""
    E = subnet.embed_dim
    keys = {(None, f"e{E}")}
    for layer, (ratio, heads) in enumerate(zip(subnet.mlp_ratios, subnet.num_heads)):
        keys |= {(layer, f"e{E}_h{heads}"), (layer, f"e{E}_r{ratio:g}".replace(".", "p"))}
    names = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        layer, key = (int(parts[1]), parts[3]) if parts[0] == "blocks" else (None, parts[1])
        if (layer, key) in keys:
            names.add(name)
    assert len(names) == 8 + 16 * subnet.depth  # 8 outside the layers, 10 per attention, 6 per MLP
    return names


def test_a_classical_step_changes_the_chosen_weights_and_no_other_choice():
    torch.manual_seed(0)
    model = Supernet(CPU, sharing="classical")
    trained = Subnet(64, [1.0, 2.0, 4.0, 1.0], [1, 2, 4, 1])
    other_choices = Subnet(64, [4.0, 2.0, 1.0, 1.0], [4, 2, 1, 1])  # layer 0: other choices, layer 1: the same
    other_width = Subnet(96, [1.0, 2.0, 4.0, 1.0], [1, 2, 4, 1])  # the same heads and ratios at another E
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model(torch.randn(4, 3, 32, 32), trained).square().sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    assert changed == choice_names(model, trained)  # every tensor of its choices, nothing else
    others = choice_names(model, other_choices)
    layer0, layer1 = ({n for n in others if n.startswith(f"blocks.{i}.")} for i in (0, 1))
    assert layer0 and not changed & layer0
    assert layer1 <= changed  # the same choices share their weights
    assert not changed & choice_names(model, other_width)


def test_a_classical_subnet_runs_as_an_entangled_supernet_holding_its_tensors():
    """Copy a subnet's own tensors into the leading blocks of an entangled supernet: the same logits.
    So a classical choice is an exact-size tensor in the layout that the entangled ops slice,
    the interleaved qkv rows included."""
    torch.manual_seed(1)
    classical, entangled = perturbed(Supernet(CPU, sharing="classical")).eval(), Supernet(CPU).eval()
    images, rng = torch.randn(2, 3, 32, 32), random.Random(1)
    for subnet in (CPU.largest(), CPU.sample(rng), CPU.sample(rng)):
        state = entangled.state_dict()
        for name in choice_names(classical, subnet):
            parts = name.split(".")
            del parts[3 if parts[0] == "blocks" else 1]  # blocks.0.fc1.e64_r2.weight -> blocks.0.fc1.weight
            tensor = classical.get_parameter(name).detach()
            state[".".join(parts)][tuple(slice(0, n) for n in tensor.shape)] = tensor
        with torch.no_grad():
            torch.testing.assert_close(entangled(images, subnet), classical(images, subnet), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_extract_keeps_the_logits_of_either_sharing(sharing):
    torch.manual_seed(2)
    model, rng = perturbed(Supernet(CPU, sharing=sharing)).eval(), random.Random(2)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for subnet in [CPU.smallest(), CPU.largest()] + [CPU.sample(rng) for _ in range(3)]:
            torch.testing.assert_close(autoformer.extract(model, subnet)(images), model(images, subnet),
                                       rtol=1e-6, atol=1e-6)


def test_the_same_seed_gives_the_same_classical_weights():
    space = dataclasses.replace(CPU, embed_dims=(16, 24), num_heads=(1, 2), head_dim=8, depths=(1, 2))
    first, again, other = ((torch.manual_seed(seed), Supernet(space, sharing="classical"))[1] for seed in (3, 3, 4))
    assert_same_weights(first.state_dict(), again.state_dict())
    assert not torch.equal(first.head["e16"].weight, other.head["e16"].weight)


def test_parameter_counts_of_both_sharings():
    """Written out from the space's choices: per embed dim E the patch conv, cls token, position
    embedding, final norm and head; per layer an attention (norm, qkv, 4 tables, proj) of every
    (E, heads) and an MLP (norm, fc1, fc2) of every (E, ratio); entangled, one of each at the super
    width S = 128 (4 heads of 32, ratio 4)."""
    D, T, N, C, K = 32, 2 * 7 + 2, 8 * 8 + 1, 10, 3 * 4 * 4
    embed = lambda E: (K * E + E) + E + N * E + 2 * E + (E * C + C)  # noqa: E731
    attention = lambda E, d: 2 * E + (E * 3 * d + 3 * d) + 4 * T * D + (d * E + E)  # noqa: E731
    mlp = lambda E, hidden: 2 * E + (E * hidden + hidden) + (hidden * E + E)  # noqa: E731
    dims, depth = (64, 96, 128), 6
    classical = sum(embed(E) for E in dims) + depth * (
        sum(attention(E, h * D) for E in dims for h in (1, 2, 4))
        + sum(mlp(E, int(E * r)) for E in dims for r in (1.0, 2.0, 4.0)))
    entangled = embed(128) + depth * (attention(128, 4 * D) + mlp(128, 4 * 128))
    assert classical > entangled
    for sharing, expected in (("classical", classical), ("entangled", entangled)):
        assert sum(p.numel() for p in Supernet(CPU, sharing=sharing).parameters()) == expected
        assert supernet_params(CPU, sharing) == expected
    for space in SPACES.values():
        for sharing in SHARINGS:
            with torch.device("meta"):
                model = Supernet(space, sharing=sharing)
            assert sum(p.numel() for p in model.parameters()) == supernet_params(space, sharing)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def classical_run(tiny_set, tmp_path_factory):
    """train.py's classical supernet after 2 steps of the sandwich rule with drop path, in bf16."""
    out = tmp_path_factory.mktemp("classical")
    return train.train(tiny_cfg(tiny_set, out, sharing="classical", epochs=1, max_steps=2, sandwich=True,
                                drop_path=0.1, dtype="bf16"))


def test_a_classical_run_records_its_sharing_and_resumes_only_in_it(classical_run, capsys):
    path = classical_run["checkpoint"]
    checkpoint = load_checkpoint(path)
    assert checkpoint["sharing"] == "classical" and checkpoint["config"]["sharing"] == "classical"
    supernet = load_supernet(path)
    assert supernet.sharing == "classical"
    assert_same_weights(supernet.state_dict(), classical_run["model"].state_dict())
    fails(["--resume", "--out", str(path.parent), "--sharing", "entangled"], capsys,
          "--sharing entangled (the run has classical)")


def test_search_and_autoformer_run_on_a_classical_checkpoint(classical_run, tmp_path, capsys):
    path = classical_run["checkpoint"]
    # its scorer, a copy of the supernet in the scoring dtype, must be classical too to take the weights
    summary = search.search(search.SearchConfig(checkpoint=str(path), out=str(tmp_path / "search"), population=4,
                                                generations=1, parents=2, mutations=1, crossovers=1))
    assert summary["scored"] == 8 and 0 <= summary["best"]["val_top1"] <= 100
    best = tmp_path / "search" / "best.json"
    autoformer.main(["evaluate", "--checkpoint", str(path), "--subnet", str(best)])
    assert "val top-1" in capsys.readouterr().out
    autoformer.main(["export", "--checkpoint", str(path), "--subnet", str(best), "--out", str(tmp_path / "model.pt")])
    images, subnet = torch.randn(2, 3, 32, 32), Subnet.from_json(best.read_text())
    with torch.no_grad():
        torch.testing.assert_close(autoformer.load_exported(tmp_path / "model.pt")(images),
                                   load_supernet(path).eval()(images, subnet), rtol=1e-6, atol=1e-6)


def test_weights_of_the_other_sharing_are_refused(classical_run, tmp_path):
    checkpoint = load_checkpoint(classical_run["checkpoint"])
    with pytest.raises(CheckpointError, match="ckpt.pt: the weights of a supernet with classical sharing, but this "
                                              "Supernet has entangled sharing: build it with sharing='classical'"):
        load_weights(Supernet(CPU), checkpoint["model"], "ckpt.pt")
    with pytest.raises(CheckpointError, match="with entangled sharing, but this Supernet has classical sharing"):
        load_weights(Supernet(CPU, sharing="classical"), Supernet(CPU).state_dict(), "official.pth")
    torch.save(dict(checkpoint, sharing="entangled"), tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="mislabelled.pt: the weights of a supernet with classical sharing"):
        load_supernet(tmp_path / "mislabelled.pt")
    torch.save(dict(checkpoint, sharing="shared"), tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown.pt: the recorded 'sharing' is 'shared', expected one of "
                                              "entangled, classical"):
        load_supernet(tmp_path / "unknown.pt")


def test_init_and_inherit_take_the_checkpoint_sharing_and_subnet_refuses_classical(classical_run, tiny_set,
                                                                                   tmp_path, capsys):
    path = classical_run["checkpoint"]
    started = train.train(tiny_cfg(tiny_set, tmp_path / "init", init=str(path), max_steps=1))
    assert started["model"].sharing == "classical"
    assert load_checkpoint(started["checkpoint"])["config"]["sharing"] == "classical"  # as --resume builds it
    run = ["--data", str(tiny_set), "--minival", "0.1", "--workers", "0", "--batch-size", "8", "--dtype", "fp32",
           "--max-steps", "1"]
    fails(run + ["--out", str(tmp_path / "typed"), "--init", str(path), "--sharing", "entangled"], capsys,
          f"--sharing entangled: --init {path} holds a supernet with classical sharing")
    subnet = CPU.sample(random.Random(4))
    (tmp_path / "sub.json").write_text(subnet.to_json())
    fails(run + ["--out", str(tmp_path / "sub"), "--subnet", str(tmp_path / "sub.json"), "--sharing", "classical"],
          capsys, "--sharing classical: --subnet trains one standalone AutoFormer")
    inherited = train.train(tiny_cfg(tiny_set, tmp_path / "inherit", subnet=str(tmp_path / "sub.json"),
                                     inherit=str(path), lr=0.0, min_lr=0.0, max_steps=1))
    assert_same_weights(inherited["model"].state_dict(), autoformer.extract(load_supernet(path), subnet).state_dict())
