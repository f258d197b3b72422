"""The sliced operators of the AutoFormer supernet: a PyTorch reference and Triton kernels.

Weight entanglement means every subnet reads the *leading block* of a shared super weight:
a layer of width E uses W[:out, :in] and b[:out] of the super layer. The functions here are
the one place where that slicing rule is written down; supernet.py and autoformer.py only call
them. They take the full super parameters and slice them inside, so the gradient of a subnet
lands on exactly the entries it used.

Each op exists twice. `*_torch` is the reference, plain PyTorch slicing. `*_triton` runs Triton
kernels, forward and backward, that read the leading block of a super weight in place through
its strides and masks (no slice copies, no regrouped qkv rows). The public names (`sliced_linear`,
`sliced_mlp`, `sliced_layer_norm`, `interleaved_qkv`, `relative_attention`) pick one of the two in
`use_triton`.

The attention with 2-D relative position, its reference and its kernels, lives in attention.py;
this file only dispatches to it. Imports run one way, aot.py -> kernels.py -> attention.py ->
launch.py, the launch plumbing that both Triton files share (and the precision and autocast rules
of every kernel). aot.py compiles every launch ahead of time and reports registers and spills.
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import launch
from attention import relative_attention_torch, relative_attention_triton

BACKENDS = ("auto", "triton", "torch")


def use_triton(x):
    """The one switch between the implementations, read at every call from AUTOFORMER_BACKEND:
    auto (the default) runs Triton on CUDA tensors and the reference elsewhere, triton always runs
    the kernels (on a CPU only under TRITON_INTERPRET=1, set before triton is imported), torch
    always runs the reference."""
    backend = os.environ.get("AUTOFORMER_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"AUTOFORMER_BACKEND={backend!r}: choose one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return False
    if not x.is_cuda and not launch.INTERPRETED:
        raise RuntimeError("AUTOFORMER_BACKEND=triton on CPU tensors needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return True


def sliced_linear(x, weight, bias, out_features, gelu=False, residual=None):
    """act(x @ weight[:out, :in]^T + bias[:out]) (+ residual), with in = x.shape[-1]."""
    if use_triton(x):
        return sliced_linear_triton(x, weight, bias, out_features, gelu, residual)
    return sliced_linear_torch(x, weight, bias, out_features, gelu, residual)


def sliced_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, residual=None):
    """fc2(gelu(fc1(x))) (+ residual): E = x.shape[-1] -> hidden -> E, each layer its leading block."""
    if use_triton(x):
        return sliced_mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, residual)
    return sliced_mlp_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, residual)


def sliced_layer_norm(x, weight, bias):
    """LayerNorm over the E = x.shape[-1] active channels, with weight[:E] and bias[:E]."""
    if use_triton(x):
        return sliced_layer_norm_triton(x, weight, bias)
    return sliced_layer_norm_torch(x, weight, bias)


def interleaved_qkv(x, weight, bias, num_heads, head_dim):
    """(B, N, E) tokens -> q, k, v, each (B, heads, N, head_dim): see interleaved_qkv_torch."""
    if use_triton(x):
        return interleaved_qkv_triton(x, weight, bias, num_heads, head_dim)
    return interleaved_qkv_torch(x, weight, bias, num_heads, head_dim)


def relative_attention(q, k, v, tables, max_relative_position):
    """Attention with 2-D relative position, (B, heads, N, D) x 3 -> (B, N, heads * D): see
    relative_attention_torch."""
    if use_triton(q):
        return relative_attention_triton(q, k, v, tables, max_relative_position)
    return relative_attention_torch(q, k, v, tables, max_relative_position)


# ------------------------------------------------------------------------------------------------
# The reference: plain PyTorch slicing.
# ------------------------------------------------------------------------------------------------

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the official LayerNormSuper inherits


def sliced_linear_torch(x, weight, bias, out_features, gelu=False, residual=None):
    """act(x @ weight[:out, :in]^T + bias[:out]) (+ residual), with in = x.shape[-1]."""
    y = F.linear(x, weight[:out_features, : x.shape[-1]], bias[:out_features])
    if gelu:
        y = F.gelu(y)  # exact (erf) GELU, as the official code
    return y if residual is None else residual + y


class GeluLinear(torch.autograd.Function):
    """F.linear(F.gelu(h), weight, bias) that saves h but not gelu(h): the backward recomputes the
    GELU, so the MLP keeps one (B, N, hidden) activation per layer instead of two (the largest
    saved tensors of a training step) at no measurable cost in time."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)  # under autocast, in its dtype like any F.linear

    @staticmethod
    def backward(ctx, dy):
        h, weight = ctx.saved_tensors
        a = F.gelu(h)  # (..., hidden), recomputed
        dy2, a2 = dy.reshape(-1, dy.shape[-1]), a.reshape(-1, a.shape[-1])  # (M, E), (M, hidden)
        dh = torch.ops.aten.gelu_backward(dy @ weight.to(dy.dtype), h)
        return dh, (dy2.t() @ a2).to(weight.dtype), dy2.sum(0).to(weight.dtype)  # dy2.t(): (E, M)


def sliced_mlp_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, residual=None):
    """fc2(gelu(fc1(x))) (+ residual): E = x.shape[-1] -> hidden -> E, each layer its leading block."""
    E = x.shape[-1]
    h = F.linear(x, fc1_weight[:hidden, :E], fc1_bias[:hidden])  # (..., hidden), before the GELU
    y = GeluLinear.apply(h, fc2_weight[:E, :hidden], fc2_bias[:E])
    return y if residual is None else residual + y


def sliced_layer_norm_torch(x, weight, bias):
    """LayerNorm over the E = x.shape[-1] active channels, with weight[:E] and bias[:E]."""
    E = x.shape[-1]
    return F.layer_norm(x, (E,), weight[:E], bias[:E], LAYER_NORM_EPS)


def interleaved_qkv_torch(x, weight, bias, num_heads, head_dim):
    """Project (B, N, E) tokens to q, k, v, each (B, heads, N, head_dim).

    The super qkv weight interleaves its rows: row 3j is unit j of q, 3j+1 of k, 3j+2 of v, so a
    subnet with d = heads * head_dim reads the leading rows [0, 3d). The official code then adds the
    *contiguous* bias[:3d] to its regrouped [q; k; v] output (q gets bias[0:d], k bias[d:2d],
    v bias[2d:3d]); the released checkpoints were trained with that quirk, so we keep it.
    """
    B, N, E = x.shape
    d = num_heads * head_dim
    # Regroup the (small) weight rows rather than the (large) output: rows 3j + t -> t * d + j.
    w = weight[: 3 * d, :E].view(d, 3, E).transpose(0, 1).reshape(3 * d, E)  # (3d, E): [q; k; v]
    y = F.linear(x, w, bias[: 3 * d])  # (B, N, 3d): [q | k | v]
    y = y.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, D)
    return y.unbind(0)  # views: the attention copies its operands anyway


# ------------------------------------------------------------------------------------------------
# The Triton kernels.
#
# Precision and autocast: the rules are written out in launch.py.
# ------------------------------------------------------------------------------------------------


# --- 1 and 2: the sliced linear layer and the interleaved qkv projection -------------------------
#
# Both are Y = X @ W[rows, :K]^T + b[:n_out] over a leading block of a super weight. They differ in
# two index maps only, chosen by the constexpr QKV: which super row feeds output column c, and
# where column c of row m is stored. The kernels take both maps from the helpers below.


@triton.jit
def _weight_rows(cols, n_out, QKV: tl.constexpr):
    """The super-weight row of output column c: c for a linear layer. For qkv, column c = t * d + j
    of [q; k; v] (t = 0, 1, 2; d = n_out / 3) is the interleaved row 3j + t."""
    if QKV:
        return 3 * (cols % (n_out // 3)) + cols // (n_out // 3)
    else:
        return cols


@triton.jit
def _output_ptrs(y_ptr, k_ptr, v_ptr, rows, cols, n_out, n_tokens, QKV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers to output element (m, c) of a (BLOCK_M, BLOCK_N) tile. Linear: y is (M, n_out),
    contiguous. qkv: column c = t * d + h * HEAD_DIM + e goes to q, k or v (t = 0, 1, 2), each a
    contiguous (B, heads, N, HEAD_DIM), at [m // N, h, m % N, e]: already split by head."""
    if QKV:
        d = n_out // 3
        t, h, e = cols // d, (cols % d) // HEAD_DIM, cols % HEAD_DIM  # (BLOCK_N,) each
        b, i = rows // n_tokens, rows % n_tokens  # (BLOCK_M,) each
        offs = ((b[:, None] * (d // HEAD_DIM) + h[None, :]) * n_tokens + i[:, None]) * HEAD_DIM + e[None, :]
        t = t[None, :]
        return tl.where(t == 0, y_ptr + offs, tl.where(t == 1, k_ptr + offs, v_ptr + offs))
    else:
        return y_ptr + rows[:, None] * n_out + cols[None, :]


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # exact GELU, z * Phi(z)


@triton.jit
def _load_grad(dy_ptr, dk_ptr, dv_ptr, z_ptr, rows, cols, M, n_out, n_tokens,
               QKV: tl.constexpr, GELU: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The gradient of the pre-activation for a (BLOCK_M, BLOCK_N) tile, fp32: the output gradient,
    times GELU'(z) = Phi(z) + z * phi(z) when the layer has a GELU (z: the saved pre-activation)."""
    mask = (rows < M)[:, None] & (cols < n_out)[None, :]
    dz = tl.load(_output_ptrs(dy_ptr, dk_ptr, dv_ptr, rows, cols, n_out, n_tokens, QKV, HEAD_DIM),
                 mask=mask, other=0.0).to(tl.float32)
    if GELU:
        z = tl.load(z_ptr + rows[:, None] * n_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        dz *= cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return dz


# Y = act(X @ W[w_rows, :K]^T + b) (+ R), one (BLOCK_M, BLOCK_N) tile of Y per program:
#   acc = 0                                                    fp32
#   for k0 in 0, BLOCK_K, 2 * BLOCK_K, ... < K:
#       acc += X[rows, k0 : k0 + BLOCK_K] @ W[w_rows(cols), k0 : k0 + BLOCK_K]^T
#   acc += b[cols];   if GELU: Z = acc, acc = gelu(acc);   if RESIDUAL: acc += R[rows, cols]
#   Y[rows, cols] = acc                                        (for QKV: into q, k, v by head)
@triton.jit
def _matmul_fwd_kernel(
    x_ptr, w_ptr, b_ptr,  # x (M, K); the super weight (>= n_out rows, >= K columns) and bias
    r_ptr, z_ptr,  # residual to add, and where to save the pre-activation for GELU: (M, n_out), contiguous
    y_ptr, k_ptr, v_ptr,  # the output; for QKV, q (at y_ptr), k and v: see _output_ptrs
    M, K, n_out, n_tokens,  # rows, reduced width, output columns, tokens per image (QKV only)
    stride_xm, stride_xk, stride_wn, stride_wk,  # strides of x and of the super weight
    QKV: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of act(x @ W[rows, :K]^T + b) (+ residual). Programs run in
    groups of GROUP_M row tiles, as in the matmul tutorial, so that a W tile is reused from L2."""
    # -- which tile: programs in groups of GROUP_M row tiles
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(n_out, BLOCK_N)
    group_first = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = min(num_m - group_first, GROUP_M)
    pid_m = group_first + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = _weight_rows(cols, n_out, QKV)

    # -- the reduction over K, W's tile cast to x's dtype in registers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + w_rows[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=(cols < n_out)[None, :] & (ks < K)[:, None], other=0.0)  # (BLOCK_K, BLOCK_N): W^T
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    # -- the fused epilogue: bias, GELU (saving its input), residual, one store
    acc += tl.load(b_ptr + cols, mask=cols < n_out, other=0.0).to(tl.float32)[None, :]
    mask = (rows < M)[:, None] & (cols < n_out)[None, :]
    if GELU:
        tl.store(z_ptr + rows[:, None] * n_out + cols[None, :], acc.to(z_ptr.dtype.element_ty), mask=mask)
        acc = _gelu(acc)
    if RESIDUAL:
        acc += tl.load(r_ptr + rows[:, None] * n_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y_ptrs = _output_ptrs(y_ptr, k_ptr, v_ptr, rows, cols, n_out, n_tokens, QKV, HEAD_DIM)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# dX = dZ @ W[w_rows, :K], with dZ = dY (* gelu'(Z)), one (BLOCK_M, BLOCK_K) tile of dX per program:
#   acc = 0
#   for c0 in 0, BLOCK_N, 2 * BLOCK_N, ... < n_out:
#       acc += dZ[rows, c0 : c0 + BLOCK_N] @ W[w_rows(c0 : c0 + BLOCK_N), ks]
#   dX[rows, ks] = acc
@triton.jit
def _matmul_bwd_dx_kernel(
    dy_ptr, dk_ptr, dv_ptr, z_ptr,  # output gradient(s) and the saved pre-activation, as in the forward
    w_ptr, dx_ptr,  # the super weight; dx (M, K), contiguous
    M, K, n_out, n_tokens,  # sizes, as in the forward
    stride_wn, stride_wk,  # strides of the super weight
    QKV: tl.constexpr, GELU: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of dx = dz @ W[rows, :K], reducing over the n_out columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dtype = dx_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, n_out, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        dz = _load_grad(dy_ptr, dk_ptr, dv_ptr, z_ptr, rows, cols, M, n_out, n_tokens, QKV, GELU, HEAD_DIM)
        w_rows = _weight_rows(cols, n_out, QKV)
        w = tl.load(w_ptr + w_rows[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=(cols < n_out)[:, None] & (ks < K)[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(dz.to(dtype), w.to(dtype), acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * K + ks[None, :], acc.to(dtype), mask=(rows < M)[:, None] & (ks < K)[None, :])


# dW[w_rows, :K] = dZ^T @ X and db = the column sums of dZ, one (BLOCK_N, BLOCK_K) tile of dW per program:
#   acc, db = 0, 0
#   for m0 in 0, BLOCK_M, 2 * BLOCK_M, ... < M:
#       acc += dZ[m0 : m0 + BLOCK_M, cols]^T @ X[m0 : m0 + BLOCK_M, ks];   db += column sums of that dZ
#   dW[w_rows(cols), ks] = acc;   the programs of the first K tile: db[cols] = db
@triton.jit
def _matmul_bwd_dw_kernel(
    dy_ptr, dk_ptr, dv_ptr, z_ptr,  # output gradient(s) and the saved pre-activation, as in the forward
    x_ptr, dw_ptr, db_ptr,  # x (M, K); the super weight's and bias's gradients, same shapes as them
    M, K, n_out, n_tokens,  # sizes, as in the forward
    stride_xm, stride_xk, stride_dwn, stride_dwk,  # strides of x and of the weight gradient
    QKV: tl.constexpr, GELU: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_K) tile of dW[rows, :K] = dz^T @ x, reducing over the M rows; the
    programs of the first K tile also sum dz over the rows into db."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dz = _load_grad(dy_ptr, dk_ptr, dv_ptr, z_ptr, rows, cols, M, n_out, n_tokens, QKV, GELU, HEAD_DIM)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = tl.dot(tl.trans(dz.to(dtype)), x, acc, input_precision=DOT_PRECISION)
        db += tl.sum(dz, axis=0)
    w_rows = _weight_rows(cols, n_out, QKV)
    tl.store(dw_ptr + w_rows[:, None] * stride_dwn + ks[None, :] * stride_dwk, acc.to(dw_ptr.dtype.element_ty),
             mask=(cols < n_out)[:, None] & (ks < K)[None, :])
    if tl.program_id(1) == 0:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=cols < n_out)


def _matmul_meta(kernel, x, QKV, GELU, head_dim):
    return dict(QKV=QKV, GELU=GELU, HEAD_DIM=head_dim, DOT_PRECISION=launch.dot_precision(x.dtype),
                **launch.CONFIGS[kernel])


def _matmul_forward(x, weight, bias, n_out, gelu, residual, qkv_shape=None):
    """x (M, K) -> y (M, n_out) and the pre-activation z (for GELU's backward, else None); with
    qkv_shape = (B, heads, N, D), -> q, k, v (3, B, heads, N, D) instead of y."""
    M, K = x.shape
    if weight.shape[0] < n_out or weight.shape[1] < K or bias.shape[0] < n_out:
        raise ValueError(f"a ({n_out}, {K}) block does not fit the super weight {tuple(weight.shape)}")
    y_dtype = residual.dtype if residual is not None else x.dtype
    y = launch.new_output((3, *qkv_shape) if qkv_shape else (M, n_out), y_dtype, x.device)
    # z, r, and k, v for a linear layer: dummies (y) where their flag is off, see launch.py's "Optional operands"
    z = launch.new_output((M, n_out), x.dtype, x.device) if gelu else y
    r = residual if residual is not None else y
    meta = _matmul_meta("_matmul_fwd_kernel", x, qkv_shape is not None, gelu, qkv_shape[3] if qkv_shape else 1)
    yq, yk, yv = (y[0], y[1], y[2]) if qkv_shape else (y, y, y)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    launch.run(_matmul_fwd_kernel, grid, x, weight, bias, r, z, yq, yk, yv, M, K, n_out,
               qkv_shape[2] if qkv_shape else 1, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
               RESIDUAL=residual is not None, **meta)
    return y, (z if gelu else None)


def _matmul_backward(dys, z, x, weight, bias, n_out, qkv_shape=None):
    """dx, dW, db of _matmul_forward from the output gradient(s) dys: (dy,) or (dq, dk, dv)."""
    M, K = x.shape
    dys = [dy.contiguous() for dy in dys] * (3 if len(dys) == 1 else 1)
    gelu, n_tokens, head_dim = z is not None, qkv_shape[2] if qkv_shape else 1, qkv_shape[3] if qkv_shape else 1
    dx = launch.new_output((M, K), x.dtype, x.device)
    meta = _matmul_meta("_matmul_bwd_dx_kernel", x, qkv_shape is not None, gelu, head_dim)
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))
    launch.run(_matmul_bwd_dx_kernel, grid, *dys, z if gelu else dx, weight, dx, M, K, n_out, n_tokens,
               weight.stride(0), weight.stride(1), **meta)
    dw, db = launch.block_grad(weight, n_out, K), launch.block_grad(bias, n_out)
    meta = _matmul_meta("_matmul_bwd_dw_kernel", x, qkv_shape is not None, gelu, head_dim)
    grid = (triton.cdiv(n_out, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))
    launch.run(_matmul_bwd_dw_kernel, grid, *dys, z if gelu else dx, x, dw, db, M, K, n_out, n_tokens,
               x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), **meta)
    return dx, dw, db


class SlicedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_features, gelu, residual):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K), M = all leading dims
        r2 = residual.reshape(-1, out_features).contiguous() if residual is not None else None  # (M, n_out)
        y, z = _matmul_forward(x2, weight, bias, out_features, gelu, r2)
        ctx.save_for_backward(x2, weight, bias, z)
        ctx.out_features, ctx.x_shape, ctx.residual = out_features, x.shape, residual is not None
        return y.view(*x.shape[:-1], out_features)  # (..., n_out)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, z = ctx.saved_tensors
        dy2 = dy.reshape(-1, ctx.out_features)  # (M, n_out)
        dx, dw, db = _matmul_backward((dy2,), z, x2, weight, bias, ctx.out_features)
        return dx.view(ctx.x_shape), dw, db, None, None, dy if ctx.residual else None  # dx: (..., K)


def sliced_linear_triton(x, weight, bias, out_features, gelu=False, residual=None):
    """sliced_linear_torch in one Triton matmul with bias, GELU and residual fused."""
    return SlicedLinear.apply(x.to(launch.autocast_dtype(x)), weight, bias, out_features, gelu, residual)


def sliced_mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, residual=None):
    """sliced_mlp_torch in two Triton matmuls: fc1 with bias and GELU fused, fc2 with bias and residual.
    (It keeps GELU's output for fc2's backward: on a GPU the step's memory is not the bottleneck.)"""
    h = sliced_linear_triton(x, fc1_weight, fc1_bias, hidden, gelu=True)
    return sliced_linear_triton(h, fc2_weight, fc2_bias, x.shape[-1], residual=residual)


class InterleavedQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, head_dim):
        B, N, E = x.shape
        x2 = x.reshape(B * N, E)  # (M, E)
        qkv_shape = (B, num_heads, N, head_dim)
        qkv, _ = _matmul_forward(x2, weight, bias, 3 * num_heads * head_dim, False, None, qkv_shape)
        ctx.save_for_backward(x2, weight, bias)
        ctx.x_shape, ctx.qkv_shape = x.shape, qkv_shape
        return qkv[0], qkv[1], qkv[2]  # (B, heads, N, D) each

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, weight, bias = ctx.saved_tensors
        dx, dw, db = _matmul_backward((dq, dk, dv), None, x2, weight, bias, 3 * math.prod(ctx.qkv_shape[1::2]),
                                      ctx.qkv_shape)
        return dx.view(ctx.x_shape), dw, db, None, None  # dx: (B, N, E)


def interleaved_qkv_triton(x, weight, bias, num_heads, head_dim):
    """interleaved_qkv_torch in one Triton matmul that reads the interleaved rows 3j + t in place,
    adds the contiguous bias (the official quirk) and stores q, k, v split by head."""
    return InterleavedQKV.apply(x.to(launch.autocast_dtype(x)), weight, bias, num_heads, head_dim)


# --- 3: LayerNorm over the first E channels ------------------------------------------------------


# BLOCK_ROWS rows per program, each whole (BLOCK_E >= E):
#   mean = sum(x) / E;   xc = x - mean;   rstd = 1 / sqrt(sum(xc^2) / E + eps)
#   y = xc * rstd * w[:E] + b[:E];   store y, and mean and rstd for the backward
@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr,  # x (M, E) with unit column stride; the super weight and bias (>= E)
    y_ptr, mean_ptr, rstd_ptr,  # y (M, E) contiguous; per-row mean and 1/std (M,), fp32
    M, E, stride_xm, eps,  # rows, active channels, x's row stride, epsilon
    BLOCK_E: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """BLOCK_ROWS whole rows per program: statistics over the E active channels only."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_E)
    mask = (rows < M)[:, None] & (cols < E)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / E
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / E + eps)
    w = tl.load(w_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None] * E + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


# ROWS_PER_PROGRAM rows per program, BLOCK_ROWS at a time:
#   xhat = (x - mean) * rstd;   wdy = w * dy
#   dx = (wdy - xhat * mean(xhat * wdy) - mean(wdy)) * rstd      (means over the E channels of a row)
#   dw_part += sum over the rows of dy * xhat;   db_part += sum over the rows of dy
# then one row of partial sums per program, which the wrapper adds up.
@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr,  # dy (M, E) contiguous; x, weight and statistics as saved
    dx_ptr, dw_part_ptr, db_part_ptr,  # dx (M, E) contiguous; this program's row of the partial sums (P, E)
    M, E, stride_xm,  # rows, active channels, x's row stride
    BLOCK_E: tl.constexpr, BLOCK_ROWS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """dx of ROWS_PER_PROGRAM rows, BLOCK_ROWS at a time, and their sums of dy * xhat and dy (the
    partial dweight and dbias, summed over the programs afterwards)."""
    cols = tl.arange(0, BLOCK_E)
    w = tl.load(w_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_E,), dtype=tl.float32)
    db = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_ROWS):
        rows = tl.program_id(0) * ROWS_PER_PROGRAM + r0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows < M)[:, None] & (cols < E)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / E
        c2 = tl.sum(wdy, axis=1) / E
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_part_ptr + tl.program_id(0) * E + cols, dw, mask=cols < E)
    tl.store(db_part_ptr + tl.program_id(0) * E + cols, db, mask=cols < E)


class SlicedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        E = x.shape[-1]
        if weight.shape[0] < E or bias.shape[0] < E:
            raise ValueError(f"{E} channels do not fit the super LayerNorm of {weight.shape[0]}")
        x2 = x.reshape(-1, E)  # (M, E)
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        M = x2.shape[0]
        y = launch.new_output((M, E), x.dtype, x.device)
        mean, rstd = (launch.new_output((M,), torch.float32, x.device) for _ in range(2))
        meta = dict(BLOCK_E=launch.pow2(E), **launch.CONFIGS["_layer_norm_fwd_kernel"])
        launch.run(_layer_norm_fwd_kernel, (triton.cdiv(M, meta["BLOCK_ROWS"]),), x2, weight, bias, y, mean, rstd,
                   M, E, x2.stride(0), LAYER_NORM_EPS, **meta)
        ctx.save_for_backward(x2, weight, bias, mean, rstd)  # bias: only for its gradient's shape
        ctx.x_shape = x.shape
        return y.view(x.shape)  # (..., E)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        M, E = x2.shape
        dy = dy.reshape(M, E).contiguous()  # (M, E)
        meta = dict(BLOCK_E=launch.pow2(E), **launch.CONFIGS["_layer_norm_bwd_kernel"])
        programs = triton.cdiv(M, meta["ROWS_PER_PROGRAM"])
        dx = launch.new_output((M, E), x2.dtype, x2.device)
        dw_part, db_part = (launch.new_output((programs, E), torch.float32, x2.device) for _ in range(2))
        launch.run(_layer_norm_bwd_kernel, (programs,), dy, x2, weight, mean, rstd, dx, dw_part, db_part,
                   M, E, x2.stride(0), **meta)
        dw, db = launch.block_grad(weight, E), launch.block_grad(bias, E)
        dw[:E], db[:E] = dw_part.sum(0), db_part.sum(0)  # a few hundred rows of partial sums
        return dx.view(ctx.x_shape), dw, db  # dx: (..., E)


def sliced_layer_norm_triton(x, weight, bias):
    """sliced_layer_norm_torch with Triton forward and backward kernels."""
    return SlicedLayerNorm.apply(x, weight, bias)
