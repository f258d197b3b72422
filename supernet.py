"""The AutoFormer search space and its supernet, in two kinds of weight sharing.

A subnet is a vision transformer chosen from the space: one embed dim E for the whole net, a depth,
and per layer a number of heads and an MLP ratio. How the subnets share weights is the supernet's
`sharing`, written in one place, `chosen`:

  entangled  AutoFormer's: all subnets share one set of *super* weights; a layer of the subnet reads
             the leading block W[:out, :in] of the super layer (kernels.py holds that rule), so
             training one subnet trains every subnet that overlaps it.
  classical  the baseline that AutoFormer's ablation compares with (one-shot NAS as SPOS): every
             choice owns its weights, each of exactly its size: an attention per (embed dim, heads)
             in each layer, an MLP per (embed dim, MLP ratio), an embedding and a head per embed
             dim. Two subnets share a weight only where they make the same choice.

Both run the same sliced ops; on a tensor of exactly the size it needs, a slice takes it whole. The
module and parameter names of the entangled supernet follow the official implementation (github
microsoft/Cream, folder AutoFormer), so its released supernet checkpoints load into `Supernet`
unchanged (`load_supernet`).
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
    # Its subnets span 0.05 M to 1.22 M parameters, depth 2 to 6: wide enough that the built-in task
    # separates them (retrained from scratch, the smallest is about 15 points below the largest).
    "cpu": SearchSpace(embed_dims=(64, 96, 128), mlp_ratios=(1.0, 2.0, 4.0), num_heads=(1, 2, 4),
                       depths=(2, 4, 6), head_dim=32, img_size=32, patch_size=4, num_classes=10,
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
    E = subnet.embed_dim
    return embedding_params(space, E) + sum(attention_params(space, E, heads) + mlp_params(E, hidden)
                                            for heads, hidden in zip(subnet.num_heads, subnet.hidden_dims()))


def supernet_params(space, sharing="entangled"):
    """Parameters of the whole supernet. Entangled: its super tensors, the count of a subnet as wide
    and deep as the supernet. Classical: every choice's own tensors, in every layer."""
    if sharing == "entangled":
        S, heads, ratio = space.super_embed_dim, max(space.num_heads), space.super_mlp_ratio
        return count_params(space, Subnet(S, [ratio] * space.super_depth, [heads] * space.super_depth))
    layer = (sum(attention_params(space, E, heads) for E in space.embed_dims for heads in space.num_heads)
             + sum(mlp_params(E, int(E * ratio)) for E in space.embed_dims for ratio in space.mlp_ratios))
    return sum(embedding_params(space, E) for E in space.embed_dims) + space.super_depth * layer


def embedding_params(space, E):
    """What depends on the embed dim alone: patch embedding, cls token, position embedding, final norm, head."""
    total = space.in_chans * space.patch_size**2 * E + E  # patch embedding
    total += E * (space.num_patches + 2)  # cls token and position embedding
    return total + 2 * E + E * space.num_classes + space.num_classes  # final norm, head


def attention_params(space, E, heads):
    d, buckets = heads * space.head_dim, 2 * space.max_relative_position + 2
    return 2 * E + (E * 3 * d + 3 * d) + 4 * buckets * space.head_dim + (d * E + E)  # norm, qkv, tables, proj


def mlp_params(E, hidden):
    return 2 * E + (E * hidden + hidden) + (hidden * E + E)  # norm, fc1, fc2


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
    """The weights of an attention from width E to d = heads * head_dim units and back."""

    def __init__(self, space, E, d):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * d)  # rows interleaved q, k, v (kernels.py), whatever the sharing: one kernel
        self.rel_pos_embed_k = RelativePosition2D(space.head_dim, space.max_relative_position)
        self.rel_pos_embed_v = RelativePosition2D(space.head_dim, space.max_relative_position)
        self.proj = nn.Linear(d, E)

    def tables(self):
        k, v = self.rel_pos_embed_k, self.rel_pos_embed_v
        return k.embeddings_table_v, k.embeddings_table_h, v.embeddings_table_v, v.embeddings_table_h


# ----------------------------------------------------------------------------- weight sharing

SHARINGS = ("entangled", "classical")


def chosen(sharing, key, *owners):
    """The weight-sharing rule, in one place: the module (or tensor) that the choice named `key`
    uses, of each owner.

    entangled  an owner is one super module that every choice uses: the sliced ops of kernels.py
               take its leading block, so all choices share its leading entries.
    classical  an owner holds one module per choice, keyed by the choice's name and of exactly
               its size: the choice gets its own, which the same ops take whole.
    """
    if sharing == "entangled":
        return owners
    return tuple(owner[key] for owner in owners)


def embed_key(E):
    return f"e{E}"


def attention_key(E, num_heads):
    return f"e{E}_h{num_heads}"


def mlp_key(E, mlp_ratio):
    return f"e{E}_r{mlp_ratio:g}".replace(".", "p")  # a module name holds no dot: 3.5 -> r3p5


def choice_sizes(space, sharing):
    """The owners' sizes, each {key: sizes}: (E,) of the embed dims, (E, heads * head_dim) of a
    layer's attentions, (E, hidden) of a layer's MLPs. Entangled: the super sizes alone."""
    S, D = space.super_embed_dim, space.head_dim
    if sharing == "entangled":
        hidden = int(S * space.super_mlp_ratio)
        return {"super": (S,)}, {"super": (S, max(space.num_heads) * D)}, {"super": (S, hidden)}
    return ({embed_key(E): (E,) for E in space.embed_dims},
            {attention_key(E, h): (E, h * D) for E in space.embed_dims for h in space.num_heads},
            {mlp_key(E, r): (E, int(E * r)) for E in space.embed_dims for r in space.mlp_ratios})


def owned(sharing, sizes, make):
    """An owner for `chosen`, built by make(*sizes) for the sizes of choice_sizes: entangled, the
    one super module itself; classical, one per choice, keyed by its name, in an nn.ModuleDict (an
    nn.ParameterDict for bare tensors)."""
    made = {key: make(*size) for key, size in sizes.items()}
    if sharing == "entangled":
        return made["super"]
    tensors = isinstance(next(iter(made.values())), nn.Parameter)
    return nn.ParameterDict(made) if tensors else nn.ModuleDict(made)


class Block(nn.Module):
    """A pre-norm transformer layer, x = x + attention(norm(x)), then x = x + mlp(norm(x)), whose
    width, heads and MLP ratio are arguments of `forward`: the width is that of x."""

    def __init__(self, space, drop_path_rate, sharing):
        super().__init__()
        self.space, self.drop_path_rate, self.sharing = space, drop_path_rate, sharing
        _, attentions, mlps = choice_sizes(space, sharing)
        self.attn_layer_norm = owned(sharing, attentions, lambda E, d: nn.LayerNorm(E))
        self.attn = owned(sharing, attentions, lambda E, d: Attention(space, E, d))
        self.ffn_layer_norm = owned(sharing, mlps, lambda E, hidden: nn.LayerNorm(E))
        self.fc1 = owned(sharing, mlps, lambda E, hidden: nn.Linear(E, hidden))
        self.fc2 = owned(sharing, mlps, lambda E, hidden: nn.Linear(hidden, E))

    def weights(self, E, num_heads, mlp_ratio):
        """The modules of this layer that a choice uses: (its norm, attention), (its norm, fc1, fc2)."""
        return (chosen(self.sharing, attention_key(E, num_heads), self.attn_layer_norm, self.attn),
                chosen(self.sharing, mlp_key(E, mlp_ratio), self.ffn_layer_norm, self.fc1, self.fc2))

    def forward(self, x, num_heads, mlp_ratio):
        E = x.shape[-1]
        (ln1, attn), (ln2, fc1, fc2) = self.weights(E, num_heads, mlp_ratio)
        x = self.attention(sliced_layer_norm(x, ln1.weight, ln1.bias), attn, num_heads, residual=x)
        x = self.mlp(sliced_layer_norm(x, ln2.weight, ln2.bias), fc1, fc2, int(E * mlp_ratio), residual=x)
        return x

    def attention(self, h, attn, num_heads, residual):
        """residual + proj(attention(h)), h the normalised tokens (B, N, E)."""
        E, proj = residual.shape[-1], (attn.proj.weight, attn.proj.bias)
        q, k, v = interleaved_qkv(h, attn.qkv.weight, attn.qkv.bias, num_heads, self.space.head_dim)  # (B, heads, N, D)
        heads_out = relative_attention(q, k, v, attn.tables(), self.space.max_relative_position)  # (B, N, heads * D)
        if self.dropping():
            return residual + drop_path(sliced_linear(heads_out, *proj, E), self.drop_path_rate)
        return sliced_linear(heads_out, *proj, E, residual=residual)

    def mlp(self, h, fc1, fc2, hidden, residual):
        """residual + fc2(gelu(fc1(h))), with `hidden` units (int(E * ratio), as Subnet.hidden_dims)."""
        weights = fc1.weight, fc1.bias, fc2.weight, fc2.bias
        if self.dropping():
            return residual + drop_path(sliced_mlp(h, *weights, hidden), self.drop_path_rate)
        return sliced_mlp(h, *weights, hidden, residual=residual)

    def dropping(self):
        # The residual add runs inside the branch's last op (residual=), saving a pass over x, except
        # where drop path must scale the branch before the add.
        return self.training and self.drop_path_rate > 0


def official_init(model):
    """The official initialisation, for a supernet of either sharing and for a standalone AutoFormer
    alike: truncated normal (std 0.02) for linear weights, the tokens and the tables; zero linear
    biases; LayerNorms at identity. The patch conv, weight and bias, keeps PyTorch's default, as the
    official `_init_weights` touches only nn.Linear and nn.LayerNorm (and the tokens and tables
    explicitly)."""
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
    def __init__(self, space, E):
        super().__init__()
        self.proj = nn.Conv2d(space.in_chans, E, space.patch_size, space.patch_size)


def check_images(images, space):
    """Raise ValueError unless `images` is a (B, in_chans, img_size, img_size) batch."""
    want = (space.in_chans, space.img_size, space.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images have shape {tuple(images.shape)}, this space expects (B, {want[0]}, "
                         f"{want[1]}, {want[2]})")


class Supernet(nn.Module):
    """All subnets of `space` in one module; `forward(images, subnet)` runs one of them. `sharing`:
    how they share the weights, "entangled" or "classical" (see `chosen`).

    Stateless: the subnet is an argument, nothing about it is cached between calls, so the same
    module serves any subnet right after any optimizer step.
    """

    def __init__(self, space, drop_path=0.0, sharing="entangled"):
        super().__init__()
        if sharing not in SHARINGS:
            raise ValueError(f"sharing={sharing!r}: choose one of {', '.join(SHARINGS)}")
        self.space, self.sharing = space, sharing
        embed_dims, tokens = choice_sizes(space, sharing)[0], space.num_patches + 1
        self.patch_embed_super = owned(sharing, embed_dims, lambda E: PatchEmbed(space, E))
        self.cls_token = owned(sharing, embed_dims, lambda E: nn.Parameter(torch.zeros(1, 1, E)))
        self.pos_embed = owned(sharing, embed_dims, lambda E: nn.Parameter(torch.zeros(1, tokens, E)))
        rates = torch.linspace(0, drop_path, space.super_depth, device="cpu").tolist()  # over the super depth
        self.blocks = nn.ModuleList(Block(space, rate, sharing) for rate in rates)
        self.norm = owned(sharing, embed_dims, nn.LayerNorm)
        self.head = owned(sharing, embed_dims, lambda E: nn.Linear(E, space.num_classes))
        official_init(self)

    def weights(self, E):
        """What the embed dim E uses: (patch embedding, cls token, position embedding, final norm, head)."""
        return chosen(self.sharing, embed_key(E), self.patch_embed_super, self.cls_token, self.pos_embed,
                      self.norm, self.head)

    def forward(self, images, subnet):
        self.space.validate(subnet)
        check_images(images, self.space)
        E = subnet.embed_dim
        patch_embed, cls_token, pos_embed, norm, head = self.weights(E)
        conv = patch_embed.proj
        x = F.conv2d(images, conv.weight[:E], conv.bias[:E], stride=self.space.patch_size)  # (B, E, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, E), patches in row-major order
        x = torch.cat([cls_token[..., :E].expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, E)
        x = x + pos_embed[..., :E]
        for block, heads, ratio in zip(self.blocks, subnet.num_heads, subnet.mlp_ratios):
            x = block(x, heads, ratio)
        x = sliced_layer_norm(x, norm.weight, norm.bias)
        x = x[:, 1:].mean(dim=1)  # (B, E): mean of the patch tokens, as the official `gp`
        return sliced_linear(x, head.weight, head.bias, self.space.num_classes)


class CheckpointError(ValueError):
    pass


def load_weights(model, state_dict, source, hint="weights of another space or subnet?"):
    """model.load_state_dict(state_dict), with an error naming `source`, the first key or shape that
    differs, in the model's order, and `hint`, instead of load_state_dict's list of every one. A
    Supernet refuses the weights of the other sharing as such."""
    own, kind = model.state_dict(), type(model).__name__
    found = sharing_of_weights(state_dict) if isinstance(model, Supernet) else None
    if found is not None and found != model.sharing:
        raise CheckpointError(f"{source}: the weights of a supernet with {found} sharing, but this Supernet has "
                              f"{model.sharing} sharing: build it with sharing={found!r}")
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


def sharing_of_weights(state_dict):
    """The sharing of the supernet whose state dict this is, told by its class token: one tensor
    (entangled) or one per embed dim (classical); None for neither."""
    if "cls_token" in state_dict:
        return "entangled"
    return "classical" if any(key.startswith("cls_token.") for key in state_dict) else None


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


def sharing_of(checkpoint, path):
    """The weight sharing of a supernet checkpoint: the one it records; entangled where it records
    none, as the official files."""
    sharing = checkpoint.get("sharing", "entangled")
    if sharing not in SHARINGS:
        raise CheckpointError(f"{path}: the recorded 'sharing' is {sharing!r}, expected one of {', '.join(SHARINGS)}")
    return sharing


def load_supernet(path, space=None):
    """The supernet of a checkpoint file, ready to run: `load_supernet("out/ckpt.pt")`."""
    checkpoint = load_checkpoint(path, supernet=True)
    space = space_of(checkpoint, path, space)
    return load_weights(Supernet(space, sharing=sharing_of(checkpoint, path)), checkpoint["model"], path)
