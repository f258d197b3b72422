"""The supernet against a literal re-statement of the AutoFormer semantics, the counters, weight
entanglement, the official state-dict layout, and the errors on bad input."""
import argparse
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from autoformer import AutoFormer, evaluate, export, extract, load_exported
from cli import write_atomic
from kernels import relative_attention
from supernet import (AUTOFORMER_B, AUTOFORMER_S, AUTOFORMER_T, SPACES, CheckpointError, Subnet, Supernet,
                      count_params, load_checkpoint, load_supernet)

# A scaled-down space that still has every feature: several heads, clipped relative distances
# (max_relative_position 2 on a 5 x 5 grid), unequal embed and head widths.
SMALL = dataclasses.replace(SPACES["tiny"], embed_dims=(24, 32, 40), num_heads=(1, 2, 3), depths=(1, 2, 3),
                            head_dim=16, img_size=20, patch_size=4, num_classes=7, max_relative_position=2)


def literal_layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def literal_buckets(num_tokens, max_rel):
    """(N, N) row and column bucket of every (query, key) pair, written out pair by pair."""
    grid = int(round((num_tokens - 1) ** 0.5))
    rows = torch.zeros(num_tokens, num_tokens, dtype=torch.long)
    cols = torch.zeros(num_tokens, num_tokens, dtype=torch.long)
    for i in range(1, num_tokens):
        for j in range(1, num_tokens):
            dr = (j - 1) // grid - (i - 1) // grid
            dc = (j - 1) % grid - (i - 1) % grid
            rows[i, j] = max(-max_rel, min(max_rel, dr)) + max_rel + 1
            cols[i, j] = max(-max_rel, min(max_rel, dc)) + max_rel + 1
    return rows, cols


def literal_attention(q, k, v, tables, max_rel):
    """Shaw-style 2-D relative attention with the explicit N x N x D tensors of the official code."""
    B, H, N, D = q.shape
    rows, cols = literal_buckets(N, max_rel)
    key_rows, key_cols, value_rows, value_cols = (t[:, :D] for t in tables)
    rel_k = key_rows[rows] + key_cols[cols]  # (N, N, D)
    rel_v = value_rows[rows] + value_cols[cols]  # (N, N, D)
    logits = (q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, rel_k)) * D**-0.5
    p = logits.softmax(-1)
    out = p @ v + torch.einsum("bhij,ijd->bhid", p, rel_v)  # (B, H, N, D)
    return out.transpose(1, 2).reshape(B, N, H * D)


def literal_forward(model, images, subnet):
    """The supernet's forward for `subnet`, restated with explicit slicing and explicit tables."""
    space, E, D = model.space, subnet.embed_dim, model.space.head_dim
    B, C, P = images.shape[0], space.in_chans, space.patch_size
    G = space.img_size // P
    conv = model.patch_embed_super.proj
    patches = images.reshape(B, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, C * P * P)
    x = patches @ conv.weight[:E].reshape(E, -1).t() + conv.bias[:E]
    x = torch.cat([model.cls_token[:, :, :E].expand(B, 1, E), x], 1) + model.pos_embed[:, :, :E]
    for i in range(subnet.depth):
        blk, heads, hidden = model.blocks[i], subnet.num_heads[i], int(E * subnet.mlp_ratios[i])
        d = heads * D
        a = literal_layer_norm(x, blk.attn_layer_norm.weight[:E], blk.attn_layer_norm.bias[:E])
        W, b = blk.attn.qkv.weight[: 3 * d, :E], blk.attn.qkv.bias
        q = a @ W[0::3].t() + b[0:d]  # rows 0, 3, 6, ... with the contiguous bias quirk
        k = a @ W[1::3].t() + b[d : 2 * d]
        v = a @ W[2::3].t() + b[2 * d : 3 * d]
        q, k, v = (t.reshape(B, -1, heads, D).transpose(1, 2) for t in (q, k, v))
        out = literal_attention(q, k, v, blk.attn.tables(), space.max_relative_position)
        x = x + out @ blk.attn.proj.weight[:E, :d].t() + blk.attn.proj.bias[:E]
        a = literal_layer_norm(x, blk.ffn_layer_norm.weight[:E], blk.ffn_layer_norm.bias[:E])
        a = F.gelu(a @ blk.fc1.weight[:hidden, :E].t() + blk.fc1.bias[:hidden])
        x = x + a @ blk.fc2.weight[:E, :hidden].t() + blk.fc2.bias[:E]
    x = literal_layer_norm(x, model.norm.weight[:E], model.norm.bias[:E])[:, 1:].mean(1)
    return x @ model.head.weight[:, :E].t() + model.head.bias


def random_model(space, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = Supernet(space).to(dtype)
    with torch.no_grad():  # larger than the 0.02 init, so that every term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_relative_attention_equals_literal_with_clipping():
    torch.manual_seed(0)
    for grid, max_rel in ((5, 2), (4, 14), (7, 3)):
        N, D = grid * grid + 1, 8
        q, k, v = (torch.randn(2, 3, N, D, dtype=torch.float64) for _ in range(3))
        tables = [torch.randn(2 * max_rel + 2, D + 4, dtype=torch.float64) for _ in range(4)]
        torch.testing.assert_close(relative_attention(q, k, v, tables, max_rel),
                                   literal_attention(q, k, v, tables, max_rel), rtol=1e-10, atol=1e-10)


def test_logits_and_gradients_equal_literal_for_many_subnets():
    model = random_model(SMALL, 0)
    rng = random.Random(0)
    for trial in range(12):
        subnet = SMALL.sample(rng)
        images = torch.randn(3, 3, 20, 20, dtype=torch.float64, requires_grad=True)
        weights = torch.randn(3, SMALL.num_classes, dtype=torch.float64)
        grads = []
        for forward in (model.forward, lambda x, s: literal_forward(model, x, s)):
            model.zero_grad()
            images.grad = None
            logits = forward(images, subnet)
            (logits * weights).sum().backward()
            grads.append((logits.detach(), images.grad.clone(),
                          {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (ours, our_dx, our_dw), (literal, lit_dx, lit_dw) = grads
        torch.testing.assert_close(ours, literal, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(our_dx, lit_dx, rtol=1e-9, atol=1e-9)
        assert our_dw.keys() == lit_dw.keys()
        for name in our_dw:
            torch.testing.assert_close(our_dw[name], lit_dw[name], rtol=1e-9, atol=1e-9, msg=name)


def test_tiny_space_at_224px_equals_literal():
    model = random_model(SPACES["tiny"], 1, torch.float32).eval()
    for p in model.parameters():
        p.data.mul_(0.1)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for subnet in (AUTOFORMER_T, SPACES["tiny"].sample(random.Random(3))):
            torch.testing.assert_close(model(images, subnet), literal_forward(model, images, subnet),
                                       rtol=1e-4, atol=1e-4)


def test_extract_equals_supernet_and_counts_match():
    model = random_model(SMALL, 2).eval()
    rng = random.Random(1)
    for _ in range(8):
        subnet = SMALL.sample(rng)
        standalone = extract(model, subnet)
        images = torch.randn(2, 3, 20, 20, dtype=torch.float64)
        torch.testing.assert_close(standalone(images), model(images, subnet), rtol=1e-10, atol=1e-10)
        assert sum(p.numel() for p in standalone.parameters()) == count_params(SMALL, subnet)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_count_params_equals_standalone_model(name):
    space, rng = SPACES[name], random.Random(name)
    for subnet in [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(5)]:
        with torch.device("meta"):  # shapes only, no memory
            model = AutoFormer(space, subnet)
        assert sum(p.numel() for p in model.parameters()) == count_params(space, subnet)


def test_published_parameter_counts():
    assert count_params(SPACES["tiny"], AUTOFORMER_T) == 5_867_944
    assert count_params(SPACES["small"], AUTOFORMER_S) == 22_891_432
    assert count_params(SPACES["base"], AUTOFORMER_B) == 53_691_688


def test_gradient_step_changes_only_the_used_slices():
    space = SMALL
    model = random_model(space, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    subnet = Subnet(embed_dim=32, mlp_ratios=[3.5, 3.0], num_heads=[2, 1])  # depth 2 of 3
    E, D = 32, space.head_dim
    loss = model(torch.randn(2, 3, 20, 20, dtype=torch.float64), subnet).square().sum()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {n: p.detach() != before[n] for n, p in model.named_parameters()}

    def only_block(mask, *sizes):  # every entry of the leading block changed, nothing else
        region = torch.zeros_like(mask)
        region[tuple(slice(0, n) for n in sizes)] = True
        assert mask[region].all() and not mask[~region].any()

    qkv = changed["blocks.0.attn.qkv.weight"]  # 2 heads: d = 32, rows 3j+t for j < 32
    only_block(qkv, 3 * 2 * D, E)
    assert qkv[3 * 2 * D - 1, :E].all() and not qkv[3 * 2 * D, :].any()  # v unit 31 used, q unit 32 not
    only_block(changed["blocks.1.attn.qkv.weight"], 3 * 1 * D, E)
    bias = changed["blocks.0.attn.qkv.bias"]  # contiguous [q | k | v]; softmax ignores the k bias
    assert bias[: 2 * D].all() and bias[4 * D : 6 * D].all() and not bias[6 * D :].any()
    only_block(changed["blocks.0.attn.proj.weight"], E, 2 * D)
    only_block(changed["blocks.0.fc1.weight"], int(32 * 3.5), E)
    only_block(changed["blocks.1.fc2.weight"], E, int(32 * 3.0))
    only_block(changed["blocks.0.attn.rel_pos_embed_k.embeddings_table_v"], 2 * 2 + 2, D)
    only_block(changed["head.weight"], space.num_classes, E)
    only_block(changed["pos_embed"], 1, space.num_patches + 1, E)
    only_block(changed["cls_token"], 1, 1, E)
    only_block(changed["patch_embed_super.proj.weight"], E)
    assert not any(mask.any() for n, mask in changed.items() if n.startswith("blocks.2."))


def official_shapes(space):
    """The state-dict layout of the released supernet checkpoints, written out."""
    S, C = space.super_embed_dim, space.num_classes
    hidden, d = int(S * space.super_mlp_ratio), max(space.num_heads) * space.head_dim
    buckets = 2 * space.max_relative_position + 2
    shapes = {"cls_token": (1, 1, S), "pos_embed": (1, space.num_patches + 1, S),
              "patch_embed_super.proj.weight": (S, 3, space.patch_size, space.patch_size),
              "patch_embed_super.proj.bias": (S,), "norm.weight": (S,), "norm.bias": (S,),
              "head.weight": (C, S), "head.bias": (C,)}
    for i in range(space.super_depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * d, S), b + "attn.qkv.bias": (3 * d,),
                       b + "attn.proj.weight": (S, d), b + "attn.proj.bias": (S,),
                       b + "fc1.weight": (hidden, S), b + "fc1.bias": (hidden,),
                       b + "fc2.weight": (S, hidden), b + "fc2.bias": (S,)})
        for table in ("rel_pos_embed_k.embeddings_table_v", "rel_pos_embed_k.embeddings_table_h",
                      "rel_pos_embed_v.embeddings_table_v", "rel_pos_embed_v.embeddings_table_h"):
            shapes[b + "attn." + table] = (buckets, space.head_dim)
        for norm in ("attn_layer_norm", "ffn_layer_norm"):
            shapes.update({b + norm + ".weight": (S,), b + norm + ".bias": (S,)})
    return shapes


@pytest.mark.parametrize("name,width,depth", [("tiny", 256, 14), ("small", 448, 14), ("base", 640, 16)])
def test_state_dict_matches_official_layout(name, width, depth):
    space = SPACES[name]
    assert (space.super_embed_dim, space.super_depth) == (width, depth)
    with torch.device("meta"):
        state = Supernet(space).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(space)
    if name == "tiny":
        assert official_shapes(space)["blocks.0.attn.qkv.weight"] == (768, 256)
        assert official_shapes(space)["blocks.0.fc1.weight"] == (1024, 256)
        assert official_shapes(space)["blocks.0.attn.rel_pos_embed_k.embeddings_table_v"] == (30, 64)


def test_sampling_is_uniform_deterministic_and_inside_the_space():
    space = SPACES["tiny"]
    draws = [space.sample(random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    subnets = [space.sample(rng) for _ in range(3000)]
    for s in subnets:
        space.validate(s)
    for depth in space.depths:  # each of 3 choices about a third of the time
        assert 850 < sum(s.depth == depth for s in subnets) < 1150
    assert space.validate(space.smallest()).depth == 12 and space.largest().embed_dim == 240
    assert Subnet.from_json(AUTOFORMER_B.to_json()) == AUTOFORMER_B


@pytest.mark.parametrize("subnet,message", [
    (Subnet(200, [3.0] * 12, [3] * 12), "embed_dim=200 is not in the space: choices are [192, 216, 240]"),
    (Subnet(192, [3.0] * 11, [3] * 11), "depth=11 is not in the space: choices are [12, 13, 14]"),
    (Subnet(192, [3.0] * 5 + [2.5] + [3.0] * 6, [3] * 12), "mlp_ratios[5]=2.5 is not in the space"),
    (Subnet(192, [3.0] * 12, [3] * 11 + [5]), "num_heads[11]=5 is not in the space: choices are [3, 4]"),
])
def test_subnet_outside_the_space_is_named(subnet, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SPACES["tiny"].validate(subnet)


def test_bad_subnet_json_and_lengths():
    with pytest.raises(ValueError, match="needs exactly the fields"):
        Subnet.from_json('{"embed_dim": 192, "depth": 12}')
    with pytest.raises(ValueError, match="not valid JSON"):
        Subnet.from_json("{embed_dim: 192")
    with pytest.raises(ValueError, match="2 mlp_ratios but 3 num_heads"):
        Subnet(192, [3.0, 3.0], [3, 3, 3])
    with pytest.raises(ValueError, match=r"num_heads\[1\]=2.9: expected a whole number"):
        Subnet(192, [3.0, 3.0], [3, 2.9])  # int() would make it 2, a valid choice
    with pytest.raises(ValueError, match="embed_dim='192': expected a whole number"):
        Subnet.from_json('{"embed_dim": "192", "mlp_ratios": [3.0], "num_heads": [3]}')


def test_initialisation_is_the_official_one():
    """Linear weights, tokens and tables ~ N(0, 0.02); linear biases 0; LayerNorms identity; the
    patch conv left at PyTorch's default (the official _init_weights skips it, bias included). Every
    choice's own tensors of a classical supernet alike."""
    torch.manual_seed(0)
    for model in (Supernet(SMALL), Supernet(SMALL, sharing="classical"), AutoFormer(SMALL, SMALL.largest())):
        for name, p in model.named_parameters():
            if "patch_embed" in name:
                bound = (SMALL.in_chans * SMALL.patch_size**2) ** -0.5  # nn.Conv2d's default: U(-bound, bound)
                assert 0.3 * bound < p.abs().max() <= bound, name
            elif "norm" in name:
                assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
            elif name.endswith("bias"):
                assert torch.all(p == 0), name
            else:
                assert 0.012 < p.std() < 0.03, name


def test_evaluate_reports_the_mean_log_likelihood_of_the_right_class():
    torch.manual_seed(0)
    model, subnet = Supernet(SMALL).eval(), SMALL.largest()
    images, labels = torch.randn(10, 3, SMALL.img_size, SMALL.img_size), torch.randint(0, SMALL.num_classes, (10,))
    result = evaluate(model, (images, labels), subnet, batch_size=4)  # three chunks, summed
    with torch.no_grad():
        logits = model(images, subnet)
    assert result["loglik"] == pytest.approx(-F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["top1"] == pytest.approx(100 * (logits.argmax(-1) == labels).float().mean().item())


def test_training_right_after_an_evaluation_in_inference_mode():
    import attention
    attention.slot_buckets.cache_clear()
    attention.key_slots.cache_clear()
    model, x = random_model(SMALL, 6, torch.float32), torch.randn(2, 3, 20, 20)
    with torch.inference_mode():  # as autoformer.evaluate: the index tables are first built here
        model(x, SMALL.largest())
    model(x, SMALL.largest()).sum().backward()  # and saved for this backward
    assert model.blocks[0].attn.rel_pos_embed_v.embeddings_table_v.grad.abs().sum() > 0


def test_exported_model_loads_and_damaged_ones_are_named(tmp_path):
    model, subnet = random_model(SMALL, 7, torch.float32).eval(), SMALL.smallest()
    path = tmp_path / "model.pt"
    export(model, subnet, path)
    x = torch.randn(2, 3, 20, 20)
    assert torch.allclose(load_exported(path)(x), model(x, subnet), atol=1e-5)
    saved = torch.load(path, weights_only=True)
    del saved["model"]["head.bias"]
    torch.save(saved, path)
    with pytest.raises(CheckpointError,
                       match=r"model.pt: the weights do not fit this AutoFormer: they lack head.bias, of shape \(7,\)"):
        load_exported(path)
    saved["subnet"]["num_heads"] = 3
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="model.pt: the recorded 'subnet' is not a subnet"):
        load_exported(path)


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
    path = tmp_path / "new folder" / "state.json"
    write_atomic(path, "first")
    assert path.read_text() == "first"

    def crash_midway(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, crash_midway)
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left behind
    write_atomic(path, lambda f: torch.save({"step": torch.tensor(3)}, f))
    assert torch.load(path, weights_only=True)["step"] == 3


def test_wrong_image_size_is_named():
    model = Supernet(SMALL)
    with pytest.raises(ValueError, match=r"images have shape \(2, 3, 32, 32\), this space expects \(B, 3, 20, 20\)"):
        model(torch.zeros(2, 3, 32, 32), SMALL.smallest())


def test_checkpoints_load_and_bad_ones_are_named(tmp_path):
    model = random_model(SMALL, 4, torch.float32)
    official = tmp_path / "official.pth"  # the released files' layout: no space, an argparse.Namespace
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-3), "epoch": 3}, official)
    loaded = load_supernet(official, SMALL)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    ours = tmp_path / "ours.pt"
    torch.save({"model": model.state_dict(), "space": dataclasses.asdict(SMALL)}, ours)
    assert load_supernet(ours).space == SMALL

    other = dataclasses.replace(SMALL, embed_dims=(24, 64))  # a wider supernet
    wider = tmp_path / "wider.pth"
    torch.save({"model": Supernet(other).state_dict()}, wider)
    with pytest.raises(CheckpointError, match=r"wider.pth: cls_token has shape \(1, 1, 64\), "
                                              r"this Supernet needs \(1, 1, 48\)"):
        load_supernet(wider, SMALL)
    odd_space = tmp_path / "odd_space.pt"
    torch.save({"model": model.state_dict(), "space": dict(dataclasses.asdict(SMALL), window=3)}, odd_space)
    with pytest.raises(CheckpointError, match="odd_space.pt: the recorded 'space' is not a search space"):
        load_supernet(odd_space)
    with pytest.raises(CheckpointError, match="ours.pt: trained in space"):
        load_supernet(ours, other)
    with pytest.raises(CheckpointError, match="records no search space"):
        load_supernet(official)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ours.read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"{path.name}: not a readable checkpoint"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    state_only = tmp_path / "state_only.pt"
    torch.save(model.state_dict(), state_only)
    with pytest.raises(CheckpointError, match="not a supernet checkpoint"):
        load_checkpoint(state_only)


class Exploit:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Exploit()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: not a readable checkpoint"):
        load_checkpoint(evil)
    assert "arbitrary code ran" not in capsys.readouterr().out
