"""Attention with 2-D relative position, as AutoFormer's supernet uses it: a PyTorch reference and
fused Triton kernels.

The relative position is the paper's (Shaw et al. style, on keys and values), computed without ever
building the N x N x D tensors of the official code. A table lookup commutes with a dot product, and
a key's lookups depend on its grid row and column only: key j sits in a *slot* per table (0 for cls,
1 + r for grid line r), and query i maps each slot to a *bucket*, the clipped distance between the
lines. So the key term is q @ table^T (T = 2 * max_relative_position + 2 buckets) looked up per slot,
and the value term is the probability mass per slot, re-binned into buckets, times the table.
`slot_buckets` and `key_slots` are these index maps.

`relative_attention_torch`, the reference, spreads the per-slot terms over the keys with the one-hot
matrix of the keys' slots inside the attention's own matrix products: they ride along as extra
features, so every step over N x N is a matrix product or the softmax (separate element-wise passes
over N x N are what cost on a CPU, in bf16 most of all):
    logits = [q | key term per slot] @ [k | key_slots]^T,   [out | mass per slot] = p @ [v | key_slots]

`relative_attention_triton` is flash attention (online softmax over key tiles, no N x N matrix in
memory) with the same algorithm. Per query tile the kernel turns buckets into slots once; per key
tile, everything relative is then a small tensor-core dot with the one-hot (BLOCK_N, G_PAD) matrix
of the keys' slots:
  key term:   q_rows = q @ key_rows^T, (BLOCK_M, T) per bucket, gathered into (BLOCK_M, G_PAD)
              per slot; the logits get q_rows @ onehot_rows^T (+ the same for columns).
  value term: p @ onehot_rows sums p per slot; after the last tile the slots are re-binned into
              buckets per query and multiplied by value_rows (+ the same for columns).
The backward recomputes p from the saved log-sum-exp, flash-attention-2 style: one kernel per
query tile (dq, the per-bucket sums that give the table gradients, and Delta = rowsum(dO * O)),
then one per key tile (dk, dv).

Imports run one way: aot.py -> kernels.py -> attention.py -> launch.py (the launch plumbing both
Triton files share). kernels.relative_attention picks one of the two implementations here
(kernels.use_triton is the only backend switch).
"""
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import launch


# --- The reference: plain PyTorch ----------------------------------------------------------------


def cached_constant(fn):
    """Memoise an index tensor. Built outside inference mode: a tensor first made inside
    torch.inference_mode (an evaluation) could not be saved for a later training step's backward."""
    @functools.lru_cache(maxsize=None)
    @functools.wraps(fn)
    def build(*args):
        with torch.inference_mode(False):
            return fn(*args)
    return build


@cached_constant
def slot_buckets(num_tokens, max_relative_position, device):
    """The relative-position bucket of every (query token, key slot) pair: (N, 2 * (1 + G)) int64.

    N = 1 + G * G tokens: token 0 is cls, token 1 + G * r + c the patch on grid row r, column c. The
    keys' slots come in two halves, by row and by column: slot 0 of a half is the cls key, slot 1 + r
    the keys on grid row (or column) r. Buckets index the two tables stacked, (2T, D) with
    T = 2 * max_relative_position + 2: row distances r - row(i) in the first T, column distances in
    the second, each clipped to +-max_relative_position and shifted by max_relative_position + 1.
    Any pair involving the cls token (the cls query's whole line, every query's slot 0) uses
    bucket 0 of each table, as in the official code.
    """
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"relative position needs 1 + G*G tokens on a square grid, got {num_tokens}")
    line = torch.arange(grid, device=device)
    m = max_relative_position
    rows = (line[None, :] - line.repeat_interleave(grid)[:, None]).clamp(-m, m) + m + 1  # (G*G, G)
    cols = (line[None, :] - line.repeat(grid)[:, None]).clamp(-m, m) + m + 1  # (G*G, G)
    rows, cols = F.pad(rows, (1, 0, 1, 0)), F.pad(cols, (1, 0, 1, 0))  # (N, 1 + G) each
    return torch.cat([rows, cols + 2 * m + 2], -1)  # (N, 2(1+G))


@cached_constant
def key_slots(num_tokens, device):
    """The one-hot (N, 2 * (1 + G)) matrix of every key's two slots (see slot_buckets).

    A per-slot term of query i spreads over the keys as term_i @ key_slots.T, and the probability
    mass of query i per slot is p_i @ key_slots.
    """
    grid = math.isqrt(num_tokens - 1)
    line = torch.arange(grid, device=device) + 1
    row_slot, col_slot = F.pad(line.repeat_interleave(grid), (1, 0)), F.pad(line.repeat(grid), (1, 0))  # (N,)
    return torch.cat([F.one_hot(row_slot, grid + 1), F.one_hot(col_slot, grid + 1)], -1)  # (N, 2(1+G))


def relative_attention_torch(q, k, v, tables, max_relative_position):
    """Softmax attention with 2-D relative position on keys and values.

    q, k, v: (B, heads, N, D). tables: the four super tables (key rows, key columns, value rows,
    value columns), each (2 * max_relative_position + 2, super D), shared by all heads; their first
    D columns are used. With Rk[i, j] = key_rows[row bucket] + key_cols[column bucket] (Rv likewise):
        p = softmax(D^-0.5 * (q_i . k_j + q_i . Rk[i, j])),   out_i = sum_j p_ij (v_j + Rv[i, j]).
    Returns (B, N, heads * D), heads merged. How, without an N x N x D tensor: the module docstring.
    """
    B, H, N, D = q.shape
    key_tables = torch.cat([t[:, :D] for t in tables[:2]])  # (2T, D): by row, then by column
    value_tables = torch.cat([t[:, :D] for t in tables[2:]])  # (2T, D)
    buckets = slot_buckets(N, max_relative_position, q.device)  # (N, S), S = 2(1+G) slots
    S, T2 = buckets.shape[1], key_tables.shape[0]
    slots = key_slots(N, q.device).to(q.dtype).expand(B, H, N, S)

    # The scale is the head dim's, whatever the embed dim. (contiguous first: q is a view into the qkv
    # output, and the product below would otherwise keep a reshaped copy of it for the backward.)
    q = q.contiguous() * D**-0.5
    # q . Rk[i, j] = sum over the two halves of q . table[bucket]: dot with every bucket, then look up
    # query i's buckets (index_select, not gather: its backward keeps the index, not the input).
    by_bucket = (q @ key_tables.t()).view(B, H, N * T2)  # key_tables.t(): (D, 2T); (B, H, N * 2T)
    query_offsets = torch.arange(0, N * T2, T2, device=q.device)[:, None]  # (N, 1)
    key_term = by_bucket.index_select(-1, (buckets + query_offsets).flatten()).view(B, H, N, S)  # (B, H, N, S)
    keys = torch.cat([k, slots], -1).transpose(-2, -1)  # (B, H, D + S, N)
    logits = torch.cat([q, key_term], -1) @ keys  # (B, H, N, N)
    p = logits.softmax(dim=-1)

    # sum_j p_ij Rv[i, j] = (mass of p_i per bucket) @ the value tables; the mass per slot comes out of
    # the same product as p @ v, and query i's slots add into its buckets (clipped ones share one).
    out, slot_mass = (p @ torch.cat([v, slots], -1)).split([D, S], -1)  # (B, H, N, D), (B, H, N, S)
    mass = slot_mass.new_zeros(B, H, N, T2).scatter_add(-1, buckets.expand(B, H, N, S), slot_mass)  # (B, H, N, 2T)
    out = out + mass @ value_tables  # (B, H, N, D)
    return out.transpose(1, 2).reshape(B, N, H * D)  # (B, N, heads * D)


# --- The fused Triton kernels (see the module docstring) -----------------------------------------


@triton.jit
def _grid_line(tokens, G, ROW: tl.constexpr):
    """The grid row (ROW) or column of tokens >= 1; 0 for the cls token, whose buckets are 0 anyway."""
    patch = tl.maximum(tokens - 1, 0)
    if ROW:
        return patch // G
    else:
        return patch % G


@triton.jit
def _bucket(q_line, k_line, cls, max_rel):
    """The bucket of a query line and a key line: their distance clipped to +-max_rel, shifted to
    1 .. 2 * max_rel + 1; 0 where `cls` (a pair with the cls token)."""
    return tl.where(cls, 0, tl.minimum(tl.maximum(k_line - q_line, -max_rel), max_rel) + max_rel + 1)


@triton.jit
def _slot_buckets(q_line, q_cls, max_rel, G_PAD: tl.constexpr):
    """(BLOCK_M, G_PAD): the bucket of every key slot for each query (slot 0 is cls, slot 1 + r line r)."""
    slots = tl.arange(0, G_PAD)
    return _bucket(q_line[:, None], (slots - 1)[None, :], q_cls[:, None] | (slots == 0)[None, :], max_rel)


@triton.jit
def _key_slots(offs_n, G, N, G_PAD: tl.constexpr, dtype: tl.constexpr):
    """One-hot (BLOCK_N, G_PAD) matrices of each key's row slot and column slot (0 on padded keys)."""
    slots = tl.arange(0, G_PAD)[None, :]
    valid = (offs_n < N)[:, None]
    row_slot = tl.where(offs_n == 0, 0, 1 + _grid_line(offs_n, G, True))[:, None]
    col_slot = tl.where(offs_n == 0, 0, 1 + _grid_line(offs_n, G, False))[:, None]
    row_onehot = tl.where(valid & (row_slot == slots), 1.0, 0.0)
    col_onehot = tl.where(valid & (col_slot == slots), 1.0, 0.0)
    return row_onehot.to(dtype), col_onehot.to(dtype)


@triton.jit
def _relative_dot(a, b, a_rows, a_cols, row_onehot, col_onehot, DOT_PRECISION: tl.constexpr):
    """a_i . (b_j + R[i, j]) for a tile, fp32: a @ b^T plus the per-slot dots a_rows, a_cols
    (BLOCK_M, G_PAD) spread over the keys by their slots. The logits with a = q and R from the key
    tables; in the backward, dP with a = dO and R from the value tables."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    s = tl.dot(a_rows, tl.trans(row_onehot), s, input_precision=DOT_PRECISION)
    return tl.dot(a_cols, tl.trans(col_onehot), s, input_precision=DOT_PRECISION)


@triton.jit
def _per_slot(a, table_ptr, stride_t, T, D, slot_buckets, T_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, G_PAD): a_i . table[bucket of slot s for query i], via a @ table^T per bucket and a
    register gather, in a's dtype (the operand of _relative_dot)."""
    table = _load_table(table_ptr, stride_t, T, D, T_PAD, BLOCK_D, a.dtype)
    per_bucket = tl.dot(a, tl.trans(table), input_precision=DOT_PRECISION)  # (BLOCK_M, T_PAD)
    return tl.gather(per_bucket, slot_buckets, 1).to(a.dtype)


@triton.jit
def _slots_to_buckets(mass, q_line, q_cls, max_rel, G_PAD: tl.constexpr, T_PAD: tl.constexpr):
    """Re-bin (BLOCK_M, G_PAD) sums per key slot into (BLOCK_M, T_PAD) sums per bucket, for each
    query's own line (several slots share a bucket where the distance is clipped). One slot at a
    time: a (BLOCK_M, G_PAD, T_PAD) one-hot would not fit in registers."""
    slots, buckets = tl.arange(0, G_PAD), tl.arange(0, T_PAD)
    out = tl.zeros((mass.shape[0], T_PAD), dtype=tl.float32)
    for s in range(G_PAD):
        column = tl.sum(tl.where(slots[None, :] == s, mass, 0.0), axis=1)  # (BLOCK_M,): mass[:, s]
        bucket = _bucket(q_line, s - 1, q_cls | (s == 0), max_rel)  # (BLOCK_M,)
        out += tl.where(bucket[:, None] == buckets[None, :], column[:, None], 0.0)
    return out


@triton.jit
def _load_table(t_ptr, stride_t, T, D, T_PAD: tl.constexpr, BLOCK_D: tl.constexpr, dtype: tl.constexpr):
    """The used (T, D) block of a (T, super D) relative-position table, as a (T_PAD, BLOCK_D) tile."""
    t, d = tl.arange(0, T_PAD), tl.arange(0, BLOCK_D)
    tab = tl.load(t_ptr + t[:, None] * stride_t + d[None, :], mask=(t < T)[:, None] & (d < D)[None, :], other=0.0)
    return tab.to(dtype)


# One query tile Q (BLOCK_M queries) of one (image, head), flash attention over the key tiles:
#   q_rows, q_cols = Q @ key_rows^T, Q @ key_cols^T gathered per slot          (BLOCK_M, G_PAD) each
#   m, l, acc, row_mass, col_mass = -inf, 0, 0, 0, 0
#   for each key tile K, V (BLOCK_N keys), with R, C the one-hot (BLOCK_N, G_PAD) of its keys' slots:
#       s = (Q @ K^T + q_rows @ R^T + q_cols @ C^T) * scale * log2(e)
#       m_new = max(m, rowmax(s));   alpha = 2^(m - m_new);   p = 2^(s - m_new)
#       l = l * alpha + rowsum(p);   m = m_new
#       acc = acc * alpha + p @ V;   row_mass = row_mass * alpha + p @ R;   col_mass likewise with C
#   acc += buckets(row_mass) @ value_rows + buckets(col_mass) @ value_cols
#   O = acc / l;   lse = m + log2(l)
@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) each, all with the strides below
    kr_ptr, kc_ptr, vr_ptr, vc_ptr,  # the four tables (T, super D), row stride stride_t, unit column stride
    o_ptr, lse_ptr,  # out (B, N, H * D) contiguous; log2-sum-exp of each query's logits (B * H, N) fp32
    H, N, G, D, max_rel, sm_scale,  # heads, tokens (1 + G * G), grid side, head dim, clip distance, D^-0.5
    stride_b, stride_h, stride_n, stride_d, stride_t,  # strides of q, k, v and of the tables
    T_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile of one (image, head): all key tiles with an online softmax, then the value
    tables' term from the per-slot masses."""
    # -- the query tile, and its key-table terms per slot
    bh = tl.program_id(1)
    base = (bh // H) * stride_b + (bh % H) * stride_h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    T = 2 * max_rel + 2
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d,
                mask=(offs_m < N)[:, None] & (offs_d < D)[None, :], other=0.0)
    dtype = q.dtype
    q_cls, q_row, q_col = offs_m == 0, _grid_line(offs_m, G, True), _grid_line(offs_m, G, False)
    row_buckets = _slot_buckets(q_row, q_cls, max_rel, G_PAD)  # (BLOCK_M, G_PAD)
    col_buckets = _slot_buckets(q_col, q_cls, max_rel, G_PAD)
    q_rows = _per_slot(q, kr_ptr, stride_t, T, D, row_buckets, T_PAD, BLOCK_D, DOT_PRECISION)
    q_cols = _per_slot(q, kc_ptr, stride_t, T, D, col_buckets, T_PAD, BLOCK_D, DOT_PRECISION)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))

    # -- the online softmax over the key tiles
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of the logits (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # running sum of p @ v
    row_mass = tl.zeros((BLOCK_M, G_PAD), dtype=tl.float32)  # running p per key row slot
    col_mass = tl.zeros((BLOCK_M, G_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
        kv_mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        row_onehot, col_onehot = _key_slots(offs_n, G, N, G_PAD, dtype)
        s = _relative_dot(q, k, q_rows, q_cols, row_onehot, col_onehot, DOT_PRECISION) * qk_scale
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        row_mass = tl.dot(p, row_onehot, row_mass * alpha[:, None], input_precision=DOT_PRECISION)
        col_mass = tl.dot(p, col_onehot, col_mass * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # -- the value tables' term, then normalise
    row_mass = _slots_to_buckets(row_mass, q_row, q_cls, max_rel, G_PAD, T_PAD)  # (BLOCK_M, T_PAD)
    col_mass = _slots_to_buckets(col_mass, q_col, q_cls, max_rel, G_PAD, T_PAD)
    acc = tl.dot(row_mass.to(dtype), _load_table(vr_ptr, stride_t, T, D, T_PAD, BLOCK_D, dtype), acc,
                 input_precision=DOT_PRECISION)
    acc = tl.dot(col_mass.to(dtype), _load_table(vc_ptr, stride_t, T, D, T_PAD, BLOCK_D, dtype), acc,
                 input_precision=DOT_PRECISION)
    out = acc / l_i[:, None]
    o_offs = ((bh // H) * N + offs_m[:, None]) * (H * D) + (bh % H) * D + offs_d[None, :]
    tl.store(o_ptr + o_offs, out.to(dtype), mask=(offs_m < N)[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


# One query tile of one (image, head), p recomputed from the saved lse (flash attention 2):
#   Delta = rowsum(dO * O);   the per-slot terms of Q (key tables) and dO (value tables), also stored
#   for each key tile K, V, with R, C its one-hot slot matrices:
#       p = 2^(s - lse);   dp = dO @ V^T + do_rows @ R^T + do_cols @ C^T;   ds = p * (dp - Delta)
#       dq += ds @ K;   ds_row += ds @ R;   p_row += p @ R;   ds_col, p_col likewise with C
#   dq += buckets(ds_row) @ key_rows + buckets(ds_col) @ key_cols;   dQ = dq * scale
#   this tile's share of the table gradients: buckets(ds)^T @ Q * scale, buckets(p)^T @ dO
@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) each, all with the strides below
    kr_ptr, kc_ptr, vr_ptr, vc_ptr,  # the four tables, as in the forward
    o_ptr, do_ptr, lse_ptr,  # out and its gradient (B, N, H * D) contiguous; the forward's lse (B * H, N)
    dq_ptr,  # dq (B, H, N, D) contiguous
    delta_ptr, slots_ptr,  # out, for the dk/dv kernel: Delta (B * H, N); per-slot dots (4, B * H, N, G_PAD)
    dtab_ptr,  # out: this program's (4, T_PAD, BLOCK_D) share of the four tables' gradients, fp32
    H, N, G, D, max_rel, sm_scale,  # as in the forward
    stride_b, stride_h, stride_n, stride_d, stride_t,  # as in the forward
    T_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile of one (image, head): dq over all key tiles, and from the per-bucket sums of
    dS and of p: the dq of the key tables' term and this tile's share of all four table gradients."""
    # -- the query tile, Delta, and the per-slot terms, stored for the dk/dv kernel
    bh = tl.program_id(1)
    base = (bh // H) * stride_b + (bh % H) * stride_h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    T = 2 * max_rel + 2
    mask_md = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask_md, other=0.0)
    dtype = q.dtype
    o_offs = ((bh // H) * N + offs_m[:, None]) * (H * D) + (bh % H) * D + offs_d[None, :]
    do = tl.load(do_ptr + o_offs, mask=mask_md, other=0.0).to(dtype)
    delta = tl.sum(do.to(tl.float32) * tl.load(o_ptr + o_offs, mask=mask_md, other=0.0).to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + bh * N + offs_m, mask=offs_m < N, other=float("inf"))  # p = 0 on padded rows
    q_cls, q_row, q_col = offs_m == 0, _grid_line(offs_m, G, True), _grid_line(offs_m, G, False)
    row_buckets = _slot_buckets(q_row, q_cls, max_rel, G_PAD)  # (BLOCK_M, G_PAD)
    col_buckets = _slot_buckets(q_col, q_cls, max_rel, G_PAD)
    q_rows = _per_slot(q, kr_ptr, stride_t, T, D, row_buckets, T_PAD, BLOCK_D, DOT_PRECISION)
    q_cols = _per_slot(q, kc_ptr, stride_t, T, D, col_buckets, T_PAD, BLOCK_D, DOT_PRECISION)
    do_rows = _per_slot(do, vr_ptr, stride_t, T, D, row_buckets, T_PAD, BLOCK_D, DOT_PRECISION)
    do_cols = _per_slot(do, vc_ptr, stride_t, T, D, col_buckets, T_PAD, BLOCK_D, DOT_PRECISION)
    tl.store(delta_ptr + bh * N + offs_m, delta, mask=offs_m < N)
    slots = slots_ptr + (bh * N + offs_m[:, None]) * G_PAD + tl.arange(0, G_PAD)[None, :]
    plane = tl.num_programs(1) * N * G_PAD
    tl.store(slots, q_rows, mask=(offs_m < N)[:, None])
    tl.store(slots + plane, q_cols, mask=(offs_m < N)[:, None])
    tl.store(slots + 2 * plane, do_rows, mask=(offs_m < N)[:, None])
    tl.store(slots + 3 * plane, do_cols, mask=(offs_m < N)[:, None])

    # -- dq and the per-slot sums of dS and p over the key tiles
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds_row = tl.zeros((BLOCK_M, G_PAD), dtype=tl.float32)  # dS summed per key row slot
    ds_col = tl.zeros((BLOCK_M, G_PAD), dtype=tl.float32)
    p_row = tl.zeros((BLOCK_M, G_PAD), dtype=tl.float32)  # p summed per key row slot
    p_col = tl.zeros((BLOCK_M, G_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
        kv_mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        row_onehot, col_onehot = _key_slots(offs_n, G, N, G_PAD, dtype)
        s = _relative_dot(q, k, q_rows, q_cols, row_onehot, col_onehot, DOT_PRECISION)
        p = tl.where((offs_n < N)[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = _relative_dot(do, v, do_rows, do_cols, row_onehot, col_onehot, DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(dtype)  # dL/dlogit, without the scale
        p = p.to(dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
        ds_row = tl.dot(ds, row_onehot, ds_row, input_precision=DOT_PRECISION)
        ds_col = tl.dot(ds, col_onehot, ds_col, input_precision=DOT_PRECISION)
        p_row = tl.dot(p, row_onehot, p_row, input_precision=DOT_PRECISION)
        p_col = tl.dot(p, col_onehot, p_col, input_precision=DOT_PRECISION)

    # -- per bucket: the key tables' share of dq, and the table gradients
    ds_row = _slots_to_buckets(ds_row, q_row, q_cls, max_rel, G_PAD, T_PAD).to(dtype)  # (BLOCK_M, T_PAD)
    ds_col = _slots_to_buckets(ds_col, q_col, q_cls, max_rel, G_PAD, T_PAD).to(dtype)
    p_row = _slots_to_buckets(p_row, q_row, q_cls, max_rel, G_PAD, T_PAD).to(dtype)
    p_col = _slots_to_buckets(p_col, q_col, q_cls, max_rel, G_PAD, T_PAD).to(dtype)
    dq = tl.dot(ds_row, _load_table(kr_ptr, stride_t, T, D, T_PAD, BLOCK_D, dtype), dq, input_precision=DOT_PRECISION)
    dq = tl.dot(ds_col, _load_table(kc_ptr, stride_t, T, D, T_PAD, BLOCK_D, dtype), dq, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + (bh * N + offs_m[:, None]) * D + offs_d[None, :], (dq * sm_scale).to(dtype), mask=mask_md)

    tab = dtab_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * (4 * T_PAD * BLOCK_D)
    tab += tl.arange(0, T_PAD)[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(tab, tl.dot(tl.trans(ds_row), q, input_precision=DOT_PRECISION) * sm_scale)
    tl.store(tab + T_PAD * BLOCK_D, tl.dot(tl.trans(ds_col), q, input_precision=DOT_PRECISION) * sm_scale)
    tl.store(tab + 2 * T_PAD * BLOCK_D, tl.dot(tl.trans(p_row), do, input_precision=DOT_PRECISION))
    tl.store(tab + 3 * T_PAD * BLOCK_D, tl.dot(tl.trans(p_col), do, input_precision=DOT_PRECISION))


# One key tile K, V of one (image, head), with R, C its one-hot slot matrices:
#   for each query tile Q, with its stored per-slot terms, lse and Delta:
#       p = 2^(s - lse);   dv += p^T @ dO
#       dp = dO @ V^T + do_rows @ R^T + do_cols @ C^T;   ds = p * (dp - Delta);   dk += ds^T @ Q
#   dK = dk * scale;   dV = dv
@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) each, all with the strides below
    do_ptr, lse_ptr, delta_ptr, slots_ptr,  # dO (B, N, H * D) contiguous; lse, Delta, per-slot dots as stored
    dk_ptr, dv_ptr,  # dk, dv (B, H, N, D) contiguous
    H, N, G, D, sm_scale,  # as in the forward
    stride_b, stride_h, stride_n, stride_d,  # strides of q, k, v
    G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of one (image, head): dk and dv over all query tiles."""
    bh = tl.program_id(1)
    base = (bh // H) * stride_b + (bh % H) * stride_h
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_ptr + base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=kv_mask, other=0.0)
    dtype = k.dtype
    row_onehot, col_onehot = _key_slots(offs_n, G, N, G_PAD, dtype)
    qk_scale = sm_scale * 1.4426950408889634
    plane = tl.num_programs(1) * N * G_PAD
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_md = (offs_m < N)[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_ptr + base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask_md, other=0.0)
        o_offs = ((bh // H) * N + offs_m[:, None]) * (H * D) + (bh % H) * D + offs_d[None, :]
        do = tl.load(do_ptr + o_offs, mask=mask_md, other=0.0).to(dtype)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=offs_m < N, other=float("inf"))  # p = 0 on padded rows
        delta = tl.load(delta_ptr + bh * N + offs_m, mask=offs_m < N, other=0.0)
        slots = slots_ptr + (bh * N + offs_m[:, None]) * G_PAD + tl.arange(0, G_PAD)[None, :]
        rows = (offs_m < N)[:, None]
        s = _relative_dot(q, k, tl.load(slots, mask=rows, other=0.0).to(dtype),
                          tl.load(slots + plane, mask=rows, other=0.0).to(dtype), row_onehot, col_onehot, DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        dv = tl.dot(tl.trans(p.to(dtype)), do, dv, input_precision=DOT_PRECISION)
        dp = _relative_dot(do, v, tl.load(slots + 2 * plane, mask=rows, other=0.0).to(dtype),
                           tl.load(slots + 3 * plane, mask=rows, other=0.0).to(dtype), row_onehot, col_onehot,
                           DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(dtype)), q, dk, input_precision=DOT_PRECISION)
    out_offs = (bh * N + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(dk_ptr + out_offs, (dk * sm_scale).to(dtype), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dtype), mask=kv_mask)


def _attention_meta(kernel, q, G, max_rel):
    return dict(T_PAD=launch.pow2(2 * max_rel + 2), G_PAD=launch.pow2(G + 1), BLOCK_D=launch.pow2(q.shape[-1]),
                DOT_PRECISION=launch.dot_precision(q.dtype), **launch.CONFIGS[kernel])


class RelativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_rows, key_cols, value_rows, value_cols, max_rel):
        B, H, N, D = q.shape
        G = math.isqrt(N - 1)
        meta = _attention_meta("_attention_fwd_kernel", q, G, max_rel)
        out = launch.new_output((B, N, H * D), q.dtype, q.device)
        lse = launch.new_output((B * H, N), torch.float32, q.device)
        grid = (triton.cdiv(N, meta["BLOCK_M"]), B * H)
        launch.run(_attention_fwd_kernel, grid, q, k, v, key_rows, key_cols, value_rows, value_cols, out, lse,
                   H, N, G, D, max_rel, D**-0.5, *q.stride(), key_rows.stride(0), **meta)
        ctx.save_for_backward(q, k, v, key_rows, key_cols, value_rows, value_cols, out, lse)
        ctx.max_rel = max_rel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_rows, key_cols, value_rows, value_cols, out, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        max_rel, dout = ctx.max_rel, dout.contiguous()  # (B, N, H * D)
        G = math.isqrt(N - 1)
        meta = _attention_meta("_attention_bwd_dq_kernel", q, G, max_rel)
        dq, dk, dv = (launch.new_output((B, H, N, D), q.dtype, q.device) for _ in range(3))
        delta = launch.new_output((B * H, N), torch.float32, q.device)
        slots = launch.new_output((4, B * H, N, meta["G_PAD"]), torch.float32, q.device)
        grid = (triton.cdiv(N, meta["BLOCK_M"]), B * H)
        dtab = launch.new_output((grid[0] * grid[1], 4, meta["T_PAD"], meta["BLOCK_D"]), torch.float32, q.device)
        launch.run(_attention_bwd_dq_kernel, grid, q, k, v, key_rows, key_cols, value_rows, value_cols, out, dout,
                   lse, dq, delta, slots, dtab, H, N, G, D, max_rel, D**-0.5, *q.stride(), key_rows.stride(0), **meta)
        meta = _attention_meta("_attention_bwd_dkdv_kernel", q, G, max_rel)
        del meta["T_PAD"]  # the dk/dv kernel reads per-slot dots only
        grid = (triton.cdiv(N, meta["BLOCK_N"]), B * H)
        launch.run(_attention_bwd_dkdv_kernel, grid, q, k, v, dout, lse, delta, slots, dk, dv,
                   H, N, G, D, D**-0.5, *q.stride(), **meta)
        T = 2 * max_rel + 2
        dtab = dtab.sum(0)[:, :T, :D]  # (4, T, D): the query tiles' shares, summed
        grads = []
        for table, grad in zip((key_rows, key_cols, value_rows, value_cols), dtab):
            g = launch.block_grad(table, T, D)
            g[:, :D] = grad
            grads.append(g)
        return dq, dk, dv, *grads, None


def relative_attention_triton(q, k, v, tables, max_relative_position):
    """relative_attention_torch as fused flash-attention kernels: see the module docstring."""
    B, H, N, D = q.shape
    T = 2 * max_relative_position + 2
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if math.isqrt(N - 1) ** 2 != N - 1:
        raise ValueError(f"relative position needs 1 + G*G tokens on a square grid, got {N}")
    if any(t.shape[0] != T or t.shape[1] < D for t in tables):
        raise ValueError(f"tables {[tuple(t.shape) for t in tables]} do not fit {T} buckets and head dim {D}")
    dtype = launch.autocast_dtype(q)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tables = [t.contiguous() for t in tables]  # parameters already are: no copy
    if len({t.stride(0) for t in tables}) > 1:
        raise ValueError("the four relative-position tables need the same super head dim")
    return RelativeAttention.apply(q, k, v, *tables, max_relative_position)
