"""The AutoFormer search space and its weight-entangled supernet.

A subnet is a vision transformer chosen from the space: one embed dim E for the whole net, a depth,
and per layer a number of heads and an MLP ratio. All subnets share one set of *super* weights: a
layer of the subnet reads the leading block W[:out, :in] of the super layer (kernels.py holds that
rule), so training one subnet trains every subnet that overlaps it. The module and parameter names
follow the official implementation (github microsoft/Cream, folder AutoFormer), so its released
supernet checkpoints load into `Supernet` unchanged (`load_supernet`).
"""
import argparse
import dataclasses
import json
import operator
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import interleaved_qkv, relative_attention, sliced_layer_norm, sliced_linear, sliced_mlp


def whole_number(field, value):
    """int(value) for an int (numpy's too), else ValueError: int() would truncate 2.9 to 2."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"subnet {field}={value!r}: expected a whole number") from None


@dataclass(frozen=True)
class Subnet:
    """One architecture of the space: `depth` is len(mlp_ratios) == len(num_heads)."""

    embed_dim: int
    mlp_ratios: tuple[float, ...]
    num_heads: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "embed_dim", whole_number("embed_dim", self.embed_dim))
        object.__setattr__(self, "mlp_ratios", tuple(float(r) for r in self.mlp_ratios))
        object.__setattr__(self, "num_heads", tuple(whole_number(f"num_heads[{i}]", h)
                                                    for i, h in enumerate(self.num_heads)))
        if len(self.mlp_ratios) != len(self.num_heads):
            raise ValueError(f"subnet has {len(self.mlp_ratios)} mlp_ratios but {len(self.num_heads)} "
                             "num_heads: both need one entry per layer")

    @property
    def depth(self):
        return len(self.num_heads)

    def hidden_dims(self):
        """Hidden units of each layer's MLP, int(E * ratio) as in the official code."""
        return [int(self.embed_dim * r) for r in self.mlp_ratios]

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"subnet is not valid JSON: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or set(fields) != names:
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise ValueError(f"subnet JSON needs exactly the fields {sorted(names)}, got {got}")
        return cls(**fields)


@dataclass(frozen=True)
class SearchSpace:
    """The choices of each decision, and the fixed shape of the images and of the heads."""

    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    num_heads: tuple[int, ...]
    depths: tuple[int, ...]
    head_dim: int = 64
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    max_relative_position: int = 14

    @property
    def super_embed_dim(self):
        return max(max(self.embed_dims), max(self.num_heads) * self.head_dim)

    @property
    def super_depth(self):
        return max(self.depths)

    @property
    def super_mlp_ratio(self):
        return max(self.mlp_ratios)

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    def validate(self, subnet):
        """Raise ValueError naming the first field of `subnet` that lies outside this space."""
        def check(field, value, choices):
            if value not in choices:
                raise ValueError(f"subnet {field}={value} is not in the space: choices are {list(choices)}")
        check("embed_dim", subnet.embed_dim, self.embed_dims)
        check("depth", subnet.depth, self.depths)
        for i, (ratio, heads) in enumerate(zip(subnet.mlp_ratios, subnet.num_heads)):
            check(f"mlp_ratios[{i}]", ratio, self.mlp_ratios)
            check(f"num_heads[{i}]", heads, self.num_heads)
        return subnet

    def sample(self, rng):
        """Uniform per decision, in the official order: depth, the ratios, the heads, the embed dim."""
        depth = rng.choice(self.depths)
        ratios = [rng.choice(self.mlp_ratios) for _ in range(depth)]
        heads = [rng.choice(self.num_heads) for _ in range(depth)]
        return Subnet(rng.choice(self.embed_dims), ratios, heads)

    def smallest(self):
        depth = min(self.depths)
        return Subnet(min(self.embed_dims), [min(self.mlp_ratios)] * depth, [min(self.num_heads)] * depth)

    def largest(self):
        depth = max(self.depths)
        return Subnet(max(self.embed_dims), [max(self.mlp_ratios)] * depth, [max(self.num_heads)] * depth)


_IMAGENET = dict(mlp_ratios=(3.0, 3.5, 4.0), head_dim=64, img_size=224, patch_size=16, num_classes=1000)
SPACES = {
    # The official ImageNet spaces, as the published models' YAMLs give them (experiments/subnet/
    # AutoFormer-{T,S,B}.yaml), with 3.0 added to tiny's MLP ratios since AutoFormer-T uses it. The
    # supernet YAMLs are narrower (tiny ratios {3.5, 4}, base heads {9, 10}); shapes are the same.
    "tiny": SearchSpace(embed_dims=(192, 216, 240), num_heads=(3, 4), depths=(12, 13, 14), **_IMAGENET),
    "small": SearchSpace(embed_dims=(320, 384, 448), num_heads=(5, 6, 7), depths=(12, 13, 14), **_IMAGENET),
    "base": SearchSpace(embed_dims=(528, 576, 624), num_heads=(8, 9, 10), depths=(14, 15, 16), **_IMAGENET),
    # For a 2-core CPU: 32 x 32 images, 8 x 8 patches of 4 px, 10 classes; `python train.py` uses it.
    "cpu": SearchSpace(embed_dims=(64, 96, 128), mlp_ratios=(2.0, 3.0, 4.0), num_heads=(2, 3, 4),
                       depths=(4, 5, 6), head_dim=32, img_size=32, patch_size=4, num_classes=10,
                       max_relative_position=7),
}

# The three searched models of the paper (experiments/subnet/AutoFormer-{T,S,B}.yaml).
AUTOFORMER_T = Subnet(192, [3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0, 3.5],
                      [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 3, 3])
AUTOFORMER_S = Subnet(384, [3.0, 3.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.5, 4.0],
                      [6, 6, 5, 7, 5, 5, 5, 6, 6, 7, 7, 6, 7])
AUTOFORMER_B = Subnet(576, [3.5, 3.5, 4.0, 3.5, 4.0, 3.5, 3.5, 3.0, 4.0, 4.0, 3.0, 4.0, 3.0, 3.5],
                      [9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10])
PUBLISHED = {"autoformer-t": ("tiny", AUTOFORMER_T), "autoformer-s": ("small", AUTOFORMER_S),
             "autoformer-b": ("base", AUTOFORMER_B)}


def count_params(space, subnet):
    """Parameters of the subnet, counted as the official `get_sampled_params_numel`: every sliced
    weight and bias of the active layers (the relative-position tables included), the final norm,
    the head, the cls token and the absolute position embedding."""
    E, D = subnet.embed_dim, space.head_dim
    buckets = 2 * space.max_relative_position + 2
    total = space.in_chans * space.patch_size**2 * E + E  # patch embedding
    total += E * (space.num_patches + 2)  # cls token and position embedding
    for heads, hidden in zip(subnet.num_heads, subnet.hidden_dims()):
        d = heads * D
        total += 2 * E + (E * 3 * d + 3 * d) + 4 * buckets * D + (d * E + E)  # norm, qkv, tables, proj
        total += 2 * E + (E * hidden + hidden) + (hidden * E + E)  # norm, fc1, fc2
    return total + 2 * E + E * space.num_classes + space.num_classes  # final norm, head


def count_flops(space, subnet):
    """Multiply-accumulates (MACs) of one forward pass on one image.

    Counted: the model's matrix products, i.e. the patch embedding, qkv, q.k, p.v, proj, fc1, fc2
    and the head, plus the relative-position terms *as this code computes them*: per head, q against
    the 2 * T buckets of the two key tables (N x 2T x D) and the per-bucket probability mass against
    the two value tables (N x 2T x D), T = 2 * max_relative_position + 2. Not counted: LayerNorm,
    softmax, GELU, additions, the bucket gathers and sums, as is customary (fvcore, DeiT), nor the
    one-hot key-slot columns that carry those gathers and sums through q.k and p.v (attention.py):
    they are how this code moves the terms, not part of the model.
    """
    E, D, N = subnet.embed_dim, space.head_dim, space.num_patches + 1
    buckets = 2 * space.max_relative_position + 2
    total = space.num_patches * space.in_chans * space.patch_size**2 * E
    for heads, hidden in zip(subnet.num_heads, subnet.hidden_dims()):
        d = heads * D
        attention = 2 * N * N * d + 2 * N * 2 * buckets * d
        total += N * E * 3 * d + attention + N * d * E + 2 * N * E * hidden
    return total + E * space.num_classes


def drop_path(x, rate):
    """Stochastic depth: drop the residual branch of whole samples, rescale the kept ones."""
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1.0 - rate)


class RelativePosition2D(nn.Module):
    """The two tables of one relative-position term: by row distance (v) and by column distance (h)."""

    def __init__(self, head_dim, max_relative_position):
        super().__init__()
        buckets = 2 * max_relative_position + 2  # 0 for the cls token, then -max .. +max
        self.embeddings_table_v = nn.Parameter(torch.zeros(buckets, head_dim))
        self.embeddings_table_h = nn.Parameter(torch.zeros(buckets, head_dim))


class Attention(nn.Module):
    def __init__(self, space):
        super().__init__()
        d = max(space.num_heads) * space.head_dim
        self.qkv = nn.Linear(space.super_embed_dim, 3 * d)  # rows interleaved q, k, v: see kernels.py
        self.rel_pos_embed_k = RelativePosition2D(space.head_dim, space.max_relative_position)
        self.rel_pos_embed_v = RelativePosition2D(space.head_dim, space.max_relative_position)
        self.proj = nn.Linear(d, space.super_embed_dim)

    def tables(self):
        k, v = self.rel_pos_embed_k, self.rel_pos_embed_v
        return k.embeddings_table_v, k.embeddings_table_h, v.embeddings_table_v, v.embeddings_table_h


class Block(nn.Module):
    """A pre-norm transformer layer, x = x + attention(norm(x)), then x = x + mlp(norm(x)), whose
    width, heads and MLP size are arguments of `forward`: the width is that of x."""

    def __init__(self, space, drop_path_rate):
        super().__init__()
        self.space, self.drop_path_rate = space, drop_path_rate
        S = space.super_embed_dim
        self.attn_layer_norm = nn.LayerNorm(S)
        self.attn = Attention(space)
        self.ffn_layer_norm = nn.LayerNorm(S)
        self.fc1 = nn.Linear(S, int(S * space.super_mlp_ratio))
        self.fc2 = nn.Linear(int(S * space.super_mlp_ratio), S)

    def forward(self, x, num_heads, hidden):
        ln1, ln2 = self.attn_layer_norm, self.ffn_layer_norm
        x = self.attention(sliced_layer_norm(x, ln1.weight, ln1.bias), num_heads, residual=x)
        x = self.mlp(sliced_layer_norm(x, ln2.weight, ln2.bias), hidden, residual=x)
        return x

    def attention(self, h, num_heads, residual):
        """residual + proj(attention(h)), h the normalised tokens (B, N, E)."""
        E, attn, proj = residual.shape[-1], self.attn, (self.attn.proj.weight, self.attn.proj.bias)
        q, k, v = interleaved_qkv(h, attn.qkv.weight, attn.qkv.bias, num_heads, self.space.head_dim)  # (B, heads, N, D)
        heads_out = relative_attention(q, k, v, attn.tables(), self.space.max_relative_position)  # (B, N, heads * D)
        if self.dropping():
            return residual + drop_path(sliced_linear(heads_out, *proj, E), self.drop_path_rate)
        return sliced_linear(heads_out, *proj, E, residual=residual)

    def mlp(self, h, hidden, residual):
        """residual + fc2(gelu(fc1(h))), with `hidden` units."""
        weights = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        if self.dropping():
            return residual + drop_path(sliced_mlp(h, *weights, hidden), self.drop_path_rate)
        return sliced_mlp(h, *weights, hidden, residual=residual)

    def dropping(self):
        # The residual add runs inside the branch's last op (residual=), saving a pass over x, except
        # where drop path must scale the branch before the add.
        return self.training and self.drop_path_rate > 0


def official_init(model):
    """The official initialisation, for a supernet and for a standalone AutoFormer alike: truncated
    normal (std 0.02) for linear weights, the tokens and the tables; zero linear biases; LayerNorms
    at identity. The patch conv, weight and bias, keeps PyTorch's default, as the official
    `_init_weights` touches only nn.Linear and nn.LayerNorm (and the tokens and tables explicitly)."""
    for name, p in model.named_parameters():
        if "patch_embed" in name:
            continue
        if "norm" in name:
            nn.init.constant_(p, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)


class PatchEmbed(nn.Module):
    def __init__(self, space):
        super().__init__()
        self.proj = nn.Conv2d(space.in_chans, space.super_embed_dim, space.patch_size, space.patch_size)


def check_images(images, space):
    """Raise ValueError unless `images` is a (B, in_chans, img_size, img_size) batch."""
    want = (space.in_chans, space.img_size, space.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images have shape {tuple(images.shape)}, this space expects (B, {want[0]}, "
                         f"{want[1]}, {want[2]})")


class Supernet(nn.Module):
    """All subnets of `space` in one set of weights; `forward(images, subnet)` runs one of them.

    Stateless: the subnet is an argument, nothing about it is cached between calls, so the same
    module serves any subnet right after any optimizer step.
    """

    def __init__(self, space, drop_path=0.0):
        super().__init__()
        self.space = space
        S = space.super_embed_dim
        self.patch_embed_super = PatchEmbed(space)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, S))
        self.pos_embed = nn.Parameter(torch.zeros(1, space.num_patches + 1, S))
        rates = torch.linspace(0, drop_path, space.super_depth, device="cpu").tolist()  # over the super depth
        self.blocks = nn.ModuleList(Block(space, rate) for rate in rates)
        self.norm = nn.LayerNorm(S)
        self.head = nn.Linear(S, space.num_classes)
        official_init(self)

    def forward(self, images, subnet):
        self.space.validate(subnet)
        check_images(images, self.space)
        E = subnet.embed_dim
        conv = self.patch_embed_super.proj
        x = F.conv2d(images, conv.weight[:E], conv.bias[:E], stride=self.space.patch_size)  # (B, E, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, E), patches in row-major order
        x = torch.cat([self.cls_token[..., :E].expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, E)
        x = x + self.pos_embed[..., :E]
        for block, heads, hidden in zip(self.blocks, subnet.num_heads, subnet.hidden_dims()):
            x = block(x, heads, hidden)
        x = sliced_layer_norm(x, self.norm.weight, self.norm.bias)
        x = x[:, 1:].mean(dim=1)  # (B, E): mean of the patch tokens, as the official `gp`
        return sliced_linear(x, self.head.weight, self.head.bias, self.space.num_classes)


class CheckpointError(ValueError):
    pass


def load_weights(model, state_dict, source, hint="weights of another space or subnet?"):
    """model.load_state_dict(state_dict), with an error naming `source`, the first key or shape that
    differs, in the model's order, and `hint`, instead of load_state_dict's list of every one."""
    own, kind = model.state_dict(), type(model).__name__
    for key, value in own.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: the weights do not fit this {kind}: they lack {key}, of shape "
                                  f"{tuple(value.shape)}: {hint}")
        if state_dict[key].shape != value.shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state_dict[key].shape)}, this {kind} "
                                  f"needs {tuple(value.shape)}: {hint}")
    extra = [key for key in state_dict if key not in own]
    if extra:
        raise CheckpointError(f"{source}: the weights do not fit this {kind}: {extra[0]} is not one of its weights "
                              f"({len(extra)} such keys): {hint}")
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(path, mmap=False, supernet=False):
    """Read a checkpoint (this project's or an official AutoFormer one) without unpickling code.

    Only tensors and plain containers load, plus argparse.Namespace, which the official files keep
    under "args". Returns the dict; its "model" entry is the state dict. mmap: map the tensors'
    bytes instead of reading them, for a cheap look at the other entries. supernet: refuse the
    checkpoint of a single AutoFormer (a train.py --subnet run's, an export), with a clear message
    rather than every key that does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            # torch maps only its zip format (its default since 1.6), not the legacy one
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... by the damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path}: not a supernet checkpoint (expected a dict with a 'model' state dict)")
    if supernet and "subnet" in checkpoint:
        raise CheckpointError(f"{path}: the checkpoint of one AutoFormer (a train.py --subnet run or an export), "
                              "not of a supernet")
    return checkpoint


def space_of(checkpoint, path, space=None):
    """The search space a checkpoint was trained in: recorded in ours, given for official files."""
    if "space" in checkpoint:
        try:
            recorded = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in checkpoint["space"].items()})
        except (AttributeError, TypeError) as e:  # not a dict, or other fields than a SearchSpace's
            raise CheckpointError(f"{path}: the recorded 'space' is not a search space ({e})") from None
        if space is not None and space != recorded:
            raise CheckpointError(f"{path}: trained in space {recorded}, not in the requested {space}")
        return recorded
    if space is None:
        raise CheckpointError(f"{path}: records no search space (an official checkpoint?): name one")
    return space


def load_supernet(path, space=None):
    """The supernet of a checkpoint file, ready to run: `load_supernet("out/ckpt.pt")`."""
    checkpoint = load_checkpoint(path, supernet=True)
    space = space_of(checkpoint, path, space)
    return load_weights(Supernet(space), checkpoint["model"], path)
