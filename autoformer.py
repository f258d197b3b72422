"""One AutoFormer as a plain model: a dense vision transformer with exactly one subnet's sizes.

`extract(supernet, subnet)` copies the subnet's slices out of the supernet, of either weight
sharing, into an `AutoFormer` made of ordinary nn.Linear / nn.LayerNorm layers, with the qkv rows
regrouped into the usual [q; k; v] order. Its logits equal the supernet's for that subnet.

The command line is the entry point for one searched model (NAME: autoformer-t/s/b or a JSON file):
    python autoformer.py info                                     # the paper's three models
    python autoformer.py info --subnet out/search/best.json       # params, MACs, the layers
    python autoformer.py evaluate --checkpoint out/ckpt.pt --subnet out/search/best.json
    python autoformer.py export --checkpoint out/ckpt.pt --subnet out/search/best.json --out model.pt
and `load_exported("model.pt")` gives the exported model back. A released supernet records no
space and no data set: --space names the one, --data ImageNet's folder (train/, val/):
    python autoformer.py evaluate --checkpoint supernet-tiny.pth --space tiny --subnet autoformer-t --data IMAGENET
"""
import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.nn as nn

from cli import open_supernet, read_subnet, refuse_official_flags, val_batches, write_atomic
from data import Crops
from kernels import relative_attention
from supernet import (PUBLISHED, SPACES, CheckpointError, RelativePosition2D, Subnet, Supernet, check_images,
                      count_flops, count_params, load_checkpoint, load_weights, official_init, space_of)

# ImageNet val top-1 of the paper's three models with the weights they inherit from the released
# supernets, as the paper and the official README give them: what `evaluate` should reproduce.
PAPER_TOP1 = {"autoformer-t": 74.7, "autoformer-s": 81.7, "autoformer-b": 82.4}


class Block(nn.Module):
    def __init__(self, space, embed_dim, num_heads, hidden):
        super().__init__()
        self.num_heads, self.space = num_heads, space
        d = num_heads * space.head_dim
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * d)  # rows [q; k; v], each grouped by head: h * head_dim + e
        self.rel_pos_k = RelativePosition2D(space.head_dim, space.max_relative_position)
        self.rel_pos_v = RelativePosition2D(space.head_dim, space.max_relative_position)
        self.proj = nn.Linear(d, embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(B, N, 3, self.num_heads, self.space.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, D)
        tables = (self.rel_pos_k.embeddings_table_v, self.rel_pos_k.embeddings_table_h,
                  self.rel_pos_v.embeddings_table_v, self.rel_pos_v.embeddings_table_h)
        x = x + self.proj(relative_attention(q, k, v, tables, self.space.max_relative_position))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ffn_norm(x))))


class AutoFormer(nn.Module):
    """A standalone ViT for one `subnet` of `space`; `forward(images) -> logits`."""

    def __init__(self, space, subnet):
        super().__init__()
        space.validate(subnet)
        self.space, self.subnet = space, subnet
        E = subnet.embed_dim
        self.patch_embed = nn.Conv2d(space.in_chans, E, space.patch_size, space.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, space.num_patches + 1, E))
        self.blocks = nn.ModuleList(Block(space, E, heads, hidden)
                                    for heads, hidden in zip(subnet.num_heads, subnet.hidden_dims()))
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, space.num_classes)
        official_init(self)  # for training from scratch (train.py --subnet)

    def forward(self, images):
        check_images(images, self.space)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, G*G, E)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N, E)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 1:].mean(dim=1))


@torch.no_grad()
def extract(supernet, subnet):
    """Copy the weights `subnet` uses out of `supernet`, of either sharing, into a new AutoFormer:
    the leading block of each tensor that the supernet's `weights` gives for the subnet's choices
    (of a classical supernet's own tensors, the whole)."""
    space, E, D = supernet.space, subnet.embed_dim, supernet.space.head_dim
    patch_embed, cls_token, pos_embed, norm, head = supernet.weights(E)
    with torch.device("meta"):  # every tensor is copied in below: no initialisation to pay for
        model = AutoFormer(space, subnet)
    model = model.to_empty(device=pos_embed.device).to(pos_embed.dtype)

    def take(dst, src, *sizes):  # dst <- the leading block of src
        dst.copy_(src[tuple(slice(0, n) for n in sizes)])

    take(model.patch_embed.weight, patch_embed.proj.weight, E)
    take(model.patch_embed.bias, patch_embed.proj.bias, E)
    take(model.cls_token, cls_token, 1, 1, E)
    take(model.pos_embed, pos_embed, 1, space.num_patches + 1, E)
    for block, sup, heads, ratio in zip(model.blocks, supernet.blocks, subnet.num_heads, subnet.mlp_ratios):
        (attn_norm, attn), (ffn_norm, fc1, fc2) = sup.weights(E, heads, ratio)
        d = heads * D
        # Interleaved rows 3j+t become row t*d + j; the bias was contiguous all along.
        # (d, 3, E) -> (3, d, E) -> (3d, E): the rows in [q; k; v] order
        rows = attn.qkv.weight[: 3 * d, :E].view(d, 3, E).transpose(0, 1).reshape(3 * d, E)
        block.qkv.weight.copy_(rows)
        take(block.qkv.bias, attn.qkv.bias, 3 * d)
        for mine, theirs in ((block.rel_pos_k, attn.rel_pos_embed_k), (block.rel_pos_v, attn.rel_pos_embed_v)):
            take(mine.embeddings_table_v, theirs.embeddings_table_v, theirs.embeddings_table_v.shape[0], D)
            take(mine.embeddings_table_h, theirs.embeddings_table_h, theirs.embeddings_table_h.shape[0], D)
        for mine, theirs in ((block.attn_norm, attn_norm), (block.ffn_norm, ffn_norm), (block.proj, attn.proj),
                             (block.fc1, fc1), (block.fc2, fc2)):
            take(mine.weight, theirs.weight, *mine.weight.shape)
            take(mine.bias, theirs.bias, *mine.bias.shape)
    for mine, theirs in ((model.norm, norm), (model.head, head)):
        take(mine.weight, theirs.weight, *mine.weight.shape)
        take(mine.bias, theirs.bias, *mine.bias.shape)
    return model.train(supernet.training)


@torch.inference_mode()
def evaluate(model, data, subnet=None, dtype=None, batch_size=1000):
    """Top-1 accuracy in percent (and top-5 with >= 100 classes) of a Supernet running `subnet`, or
    of a standalone AutoFormer, on `data`: a DataLoader (or any iterable) of (images, labels)
    batches, one (images, labels) pair of tensors already decoded and normalised, or data.Crops,
    either of these cut here into `batch_size` chunks. search.py scores ~1000 subnets on the same
    held-out images: decoding them once and feeding large chunks is what makes that cheap. `dtype`
    (torch.bfloat16 / float16) autocasts. Returns {"top1": %, "loglik": the mean log-probability of
    the right class, "images": n} plus "top5": % when the space has >= 100 classes.
    """
    if isinstance(model, Supernet) and subnet is None:
        raise ValueError("evaluate: a Supernet needs the subnet to run")
    if isinstance(model, AutoFormer) and subnet not in (None, model.subnet):
        raise ValueError("evaluate: this AutoFormer is one fixed subnet; pass subnet=None")
    weight = next(model.parameters())
    if isinstance(data, Crops):  # uint8, normalised chunk by chunk into the model's dtype
        data = data.batches(batch_size, weight.dtype)
    elif isinstance(data, (tuple, list)) and torch.is_tensor(data[0]):  # one (images, labels) pair
        data = zip(data[0].split(batch_size), data[1].split(batch_size))
    was_training, device = model.training, weight.device
    k = 5 if model.space.num_classes >= 100 else 1
    hits, n = torch.zeros(k, dtype=torch.long, device=device), 0
    loglik = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    for images, labels in data:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images, subnet) if subnet is not None else model(images)
        found = (logits.topk(k, dim=-1).indices == labels[:, None]).cumsum(-1).clamp(max=1)  # (B, k)
        hits += found.sum(0)  # hits[j]: labels within the top j+1; stays on the device, no sync
        loglik += logits.float().log_softmax(-1).gather(1, labels[:, None]).sum()  # of the (B, 1) right classes
        n += len(labels)
    model.train(was_training)
    result = {"top1": 100.0 * hits[0].item() / max(n, 1), "loglik": loglik.item() / max(n, 1), "images": n}
    if k == 5:
        result["top5"] = 100.0 * hits[4].item() / max(n, 1)
    return result


# ----------------------------------------------------------------------------- one searched model


def export(supernet, subnet, path):
    """Save `subnet` as a standalone AutoFormer: its weights, its subnet and its space."""
    exported = {"model": extract(supernet, subnet).state_dict(), "space": dataclasses.asdict(supernet.space),
                "subnet": json.loads(subnet.to_json())}
    write_atomic(path, lambda f: torch.save(exported, f))


def load_exported(path):
    """The AutoFormer that `export` saved, ready to run: `model = load_exported("model.pt")`."""
    saved = load_checkpoint(path)
    if "subnet" not in saved:
        raise CheckpointError(f"{path}: not an exported AutoFormer (no 'subnet'): a supernet checkpoint?")
    try:
        subnet = Subnet(**saved["subnet"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the recorded 'subnet' is not a subnet ({e})") from None
    return load_weights(AutoFormer(space_of(saved, path), subnet), saved["model"], path).eval()


def info(subnet_name, space_name):
    """Print the parameters, MACs and layers of one subnet, or without a name the paper's three."""
    if not subnet_name:
        print(f"{'name':12}  {'space':5}  {'parameters':>10}  {'MACs':>7}  the paper's ImageNet top-1 (inherited "
              "weights)")
        for name, (space_name, subnet) in PUBLISHED.items():
            space = SPACES[space_name]
            print(f"{name:12}  {space_name:5}  {count_params(space, subnet) / 1e6:8.3f} M  "
                  f"{count_flops(space, subnet) / 1e9:5.2f} G  {PAPER_TOP1[name]:.1f} %")
        return
    published_space, subnet = read_subnet(subnet_name)
    space = SPACES[space_name or published_space or "cpu"]
    space.validate(subnet)
    print(f"{subnet_name}: {count_params(space, subnet) / 1e6:.3f} M parameters, "
          f"{count_flops(space, subnet) / 1e6:.1f} M MACs per {space.img_size} px image, "
          f"embed dim {subnet.embed_dim}, depth {subnet.depth}")
    print("layer  heads  mlp ratio  hidden")
    for i, (heads, ratio, hidden) in enumerate(zip(subnet.num_heads, subnet.mlp_ratios, subnet.hidden_dims())):
        print(f"{i:5d}  {heads:5d}  {ratio:9g}  {hidden:6d}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    commands = p.add_subparsers(dest="command", required=True)
    described = commands.add_parser("info", help="parameters, MACs and the layers of a subnet; the paper's models")
    described.add_argument("--subnet", help="autoformer-t/s/b or a Subnet JSON file; none: the paper's three models")
    described.add_argument("--space", choices=SPACES, help="its space (default: the published model's, else cpu)")
    for name, text in (("evaluate", "top-1 on the val split with weights inherited from the supernet"),
                       ("export", "save the subnet as a standalone model (load it with load_exported)")):
        command = commands.add_parser(name, help=text, allow_abbrev=False)
        command.add_argument("--checkpoint", default="out/ckpt.pt", help="supernet checkpoint: ours, or an official "
                             "supernet-*.pth (default: %(default)s)")
        command.add_argument("--space", default="", help="the space of an official checkpoint, which records none: "
                             "tiny, small or base")
        command.add_argument("--subnet", required=True, help="autoformer-t/s/b or a Subnet JSON file (best.json)")
    evaluate_ = commands.choices["evaluate"]
    evaluate_.add_argument("--data", default="", help="ImageNet's folder (train/, val/) for an official checkpoint; "
                           "for ours, the data folder if it moved since training")
    evaluate_.add_argument("--batch-size", type=int, default=250, help="images per forward (default: %(default)s)")
    evaluate_.add_argument("--workers", type=int, default=min(8, os.cpu_count()),
                           help="processes decoding images (default: %(default)s)")
    commands.choices["export"].add_argument("--out", required=True, help="file to write, e.g. model.pt")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "info":
            return info(args.subnet, args.space)
        subnet = read_subnet(args.subnet)[1]
        checkpoint = load_checkpoint(args.checkpoint, supernet=True)
        refuse_official_flags(checkpoint, args.checkpoint, {"--space": args.space})
        supernet = open_supernet(checkpoint, args.checkpoint, args.space)
        supernet.space.validate(subnet)
        if args.command == "export":
            export(supernet, subnet, args.out)
            print(f"wrote {args.out}: {count_params(supernet.space, subnet) / 1e6:.3g} M parameters; "
                  f"load it with autoformer.load_exported({str(args.out)!r})")
            return
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        val = val_batches(checkpoint, args.checkpoint, supernet.space, args.data, args.batch_size, args.workers, device)
        result = evaluate(supernet.to(device), val, subnet)
        print(f"{args.subnet}: val top-1 {result['top1']:.2f}% on {result['images']} images"
              + (f", top-5 {result['top5']:.2f}%" if "top5" in result else ""))
    except (ValueError, OSError) as e:  # CheckpointError, DataError, a subnet outside the space
        print(f"autoformer.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
