"""One AutoFormer as a plain model: a dense vision transformer with exactly one subnet's sizes.

`extract(supernet, subnet)` copies the subnet's slices out of the supernet into an `AutoFormer`
made of ordinary nn.Linear / nn.LayerNorm layers, with the qkv rows regrouped into the usual
[q; k; v] order. Its logits equal the supernet's for that subnet.
"""
import torch
import torch.nn as nn

from kernels import relative_attention
from supernet import RelativePosition2D, check_images


class Block(nn.Module):
    def __init__(self, space, embed_dim, num_heads, hidden):
        super().__init__()
        self.num_heads, self.space = num_heads, space
        d = num_heads * space.head_dim
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * d)  # rows [q; k; v], each head_dim-major per head
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

    def forward(self, images):
        check_images(images, self.space)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, G*G, E)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N, E)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 1:].mean(dim=1))


@torch.no_grad()
def extract(supernet, subnet):
    """Copy the weights `subnet` uses out of `supernet` into a new AutoFormer."""
    space = supernet.space
    model = AutoFormer(space, subnet).to(supernet.pos_embed.device, supernet.pos_embed.dtype)
    E, D = subnet.embed_dim, space.head_dim

    def take(dst, src, *sizes):  # dst <- the leading block of src
        dst.copy_(src[tuple(slice(0, n) for n in sizes)])

    take(model.patch_embed.weight, supernet.patch_embed_super.proj.weight, E)
    take(model.patch_embed.bias, supernet.patch_embed_super.proj.bias, E)
    take(model.cls_token, supernet.cls_token, 1, 1, E)
    take(model.pos_embed, supernet.pos_embed, 1, space.num_patches + 1, E)
    for block, sup, heads in zip(model.blocks, supernet.blocks, subnet.num_heads):
        d = heads * D
        # Interleaved super rows 3j+t become row t*d + j; the bias was contiguous all along.
        rows = sup.attn.qkv.weight[: 3 * d, :E].view(d, 3, E).transpose(0, 1).reshape(3 * d, E)  # [q; k; v]
        block.qkv.weight.copy_(rows)
        take(block.qkv.bias, sup.attn.qkv.bias, 3 * d)
        for mine, theirs in ((block.rel_pos_k, sup.attn.rel_pos_embed_k), (block.rel_pos_v, sup.attn.rel_pos_embed_v)):
            take(mine.embeddings_table_v, theirs.embeddings_table_v, theirs.embeddings_table_v.shape[0], D)
            take(mine.embeddings_table_h, theirs.embeddings_table_h, theirs.embeddings_table_h.shape[0], D)
        for mine, theirs in ((block.attn_norm, sup.attn_layer_norm), (block.ffn_norm, sup.ffn_layer_norm),
                             (block.proj, sup.attn.proj), (block.fc1, sup.fc1), (block.fc2, sup.fc2)):
            take(mine.weight, theirs.weight, *mine.weight.shape)
            take(mine.bias, theirs.bias, *mine.bias.shape)
    for mine, theirs in ((model.norm, supernet.norm), (model.head, supernet.head)):
        take(mine.weight, theirs.weight, *mine.weight.shape)
        take(mine.bias, theirs.bias, *mine.bias.shape)
    return model.train(supernet.training)
