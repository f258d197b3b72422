"""The sliced operators of the AutoFormer supernet, in pure PyTorch.

Weight entanglement means every subnet reads the *leading block* of a shared super weight:
a layer of width E uses W[:out, :in] and b[:out] of the super layer. The functions here are
the one place where that slicing rule is written down; supernet.py and autoformer.py only call
them. They take the full super parameters and slice views, never copies, so the gradient of a
subnet lands on exactly the entries it used.

The attention uses the 2-D relative position of the paper (Shaw et al. style, on keys and values)
without ever building the N x N x D tensors of the official code: a table lookup commutes with a
dot product, so the key term is q @ table^T (N x T per head, T = 2 * max_relative_position + 2
buckets) gathered by bucket, and the value term is the probability mass per bucket times the table.
"""
import functools
import math

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the official LayerNormSuper inherits


def sliced_linear(x, weight, bias, out_features, gelu=False, residual=None):
    """act(x @ weight[:out, :in]^T + bias[:out]) (+ residual), with in = x.shape[-1]."""
    y = F.linear(x, weight[:out_features, : x.shape[-1]], bias[:out_features])
    if gelu:
        y = F.gelu(y)  # exact (erf) GELU, as the official code
    return y if residual is None else residual + y


def sliced_layer_norm(x, weight, bias):
    """LayerNorm over the E = x.shape[-1] active channels, with weight[:E] and bias[:E]."""
    E = x.shape[-1]
    return F.layer_norm(x, (E,), weight[:E], bias[:E], LAYER_NORM_EPS)


def interleaved_qkv(x, weight, bias, num_heads, head_dim):
    """Project (B, N, E) tokens to q, k, v, each (B, heads, N, head_dim).

    The super qkv weight interleaves its rows: row 3j is unit j of q, 3j+1 of k, 3j+2 of v, so a
    subnet with d = heads * head_dim reads the leading rows [0, 3d). The official code then adds the
    *contiguous* bias[:3d] to its regrouped [q; k; v] output (q gets bias[0:d], k bias[d:2d],
    v bias[2d:3d]); the released checkpoints were trained with that quirk, so we keep it.
    """
    B, N, E = x.shape
    d = num_heads * head_dim
    y = F.linear(x, weight[: 3 * d, :E])  # (B, N, 3d), channel 3j+t is unit j of q/k/v (t=0/1/2)
    y = y.view(B, N, d, 3) + bias[: 3 * d].view(3, d).t()  # (B, N, d, 3)
    y = y.view(B, N, num_heads, head_dim, 3).permute(4, 0, 2, 1, 3)  # (3, B, heads, N, D)
    return y.contiguous().unbind(0)  # one copy for all three, then contiguous views


@functools.lru_cache(maxsize=None)
def relative_buckets(num_tokens, max_relative_position, device):
    """Relative-position buckets from every query token to every key *grid row* and *grid column*.

    Returns (rows, cols), each (N, 1 + G) int64 for N = 1 + G * G tokens: rows[i, 1 + r] is the bucket
    of the row distance r - row(i) (clipped to +-max_relative_position, shifted by
    max_relative_position + 1), cols likewise for columns. Slot 0 stands for the cls key, and the cls
    query's whole line is 0: any pair involving the cls token uses bucket 0, as in the official code.
    """
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"relative position needs 1 + G*G tokens on a square grid, got {num_tokens}")
    line = torch.arange(grid, device=device)
    m = max_relative_position
    rows = (line[None, :] - line.repeat_interleave(grid)[:, None]).clamp(-m, m) + m + 1  # (G*G, G)
    cols = (line[None, :] - line.repeat(grid)[:, None]).clamp(-m, m) + m + 1  # (G*G, G)
    return F.pad(rows, (1, 0, 1, 0)), F.pad(cols, (1, 0, 1, 0))  # (N, 1 + G) each


def grid_to_tokens(row_term, col_term):
    """Spread per-(query, key row) and per-(query, key column) terms over all N keys.

    (..., N, 1 + G) twice -> (..., N, N): key 0 (cls) gets slot 0 of both, patch key (r, c) gets
    row_term[1 + r] + col_term[1 + c].
    """
    cls = row_term[..., :1] + col_term[..., :1]  # (..., N, 1)
    patches = row_term[..., 1:, None] + col_term[..., None, 1:]  # (..., N, G, G)
    return torch.cat([cls, patches.flatten(-2)], dim=-1)  # (..., N, N)


def tokens_to_grid(p):
    """The adjoint of grid_to_tokens: sum (..., N, N) over each key row and each key column."""
    grid = math.isqrt(p.shape[-1] - 1)
    patches = p[..., 1:].unflatten(-1, (grid, grid))  # (..., N, G, G)
    cls = p[..., :1]
    return torch.cat([cls, patches.sum(-1)], -1), torch.cat([cls, patches.sum(-2)], -1)  # (..., N, 1+G)


def relative_attention(q, k, v, tables, max_relative_position):
    """Softmax attention with 2-D relative position on keys and values.

    q, k, v: (B, heads, N, D). tables: the four super tables (key rows, key columns, value rows,
    value columns), each (2 * max_relative_position + 2, super D), shared by all heads; their first
    D columns are used. With Rk[i, j] = key_rows[row bucket] + key_cols[column bucket] (Rv likewise):
        p = softmax(D^-0.5 * (q_i . k_j + q_i . Rk[i, j])),   out_i = sum_j p_ij (v_j + Rv[i, j]).
    Returns (B, N, heads * D), heads merged.
    """
    B, H, N, D = q.shape
    key_rows, key_cols, value_rows, value_cols = (t[:, :D] for t in tables)
    rows, cols = relative_buckets(N, max_relative_position, q.device)
    rows, cols = rows.expand(B, H, -1, -1), cols.expand(B, H, -1, -1)  # (B, H, N, 1+G)

    q = q * D**-0.5  # the scale is the head dim's, whatever the embed dim
    # q . Rk[i, j] = q . key_rows[bucket] + q . key_cols[bucket]: dot with every bucket, then look up.
    row_term = (q @ key_rows.t()).gather(-1, rows)  # (B, H, N, 1+G)
    col_term = (q @ key_cols.t()).gather(-1, cols)  # (B, H, N, 1+G)
    p = (q @ k.transpose(-2, -1) + grid_to_tokens(row_term, col_term)).softmax(dim=-1)  # (B, H, N, N)

    # sum_j p_ij Rv[i, j] = (mass of p_i per row bucket) @ value_rows + (per column bucket) @ value_cols.
    row_mass, col_mass = tokens_to_grid(p)  # (B, H, N, 1+G) each
    buckets = value_rows.shape[0]
    row_mass = p.new_zeros(B, H, N, buckets).scatter_add(-1, rows, row_mass)  # (B, H, N, T)
    col_mass = p.new_zeros(B, H, N, buckets).scatter_add(-1, cols, col_mass)  # (B, H, N, T)
    out = p @ v + row_mass @ value_rows + col_mass @ value_cols  # (B, H, N, D)
    return out.transpose(1, 2).reshape(B, N, H * D)  # (B, N, heads * D)
