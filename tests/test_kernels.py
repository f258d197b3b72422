"""Each Triton kernel against its PyTorch reference, forward and every gradient: compiled on CUDA
tensors where a CUDA device is present, else in Triton's interpreter on the CPU (conftest.py
chooses). Fresh random inputs, awkward sizes that are no multiple of any block (N = 65 and 197,
E = 216 and 240 of 256, 756 hidden units, 3 and 7 heads), on CUDA also the largest layer of the
tiny, small and base spaces at batch 32; fp32 / bf16 / fp16 activations with fp32 parameters; every
kernel output poisoned with NaN before the launch, so that an element a kernel forgets to write
fails the test. In bf16 and fp16 every output and gradient also meets launch.py's accuracy rule:
at most twice the error of PyTorch's own reference run in that dtype. Then the whole supernet with
AUTOFORMER_BACKEND=triton against torch, and 20 training steps. The rule holds under the
interpreter as on a GPU, since launch.py makes the interpreter's arithmetic the GPU's."""
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

import aot
import attention
import kernels
import launch
from supernet import SHARINGS, SPACES, Supernet

DEVICE = "cpu" if launch.INTERPRETED else "cuda"
on_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: the interpreter would take hours")

# Max error relative to the reference's largest magnitude, whatever PyTorch's own error: bf16 and
# fp16 round the activations, p and dS to 8 and 11 bits.
TOLERANCE = {torch.float32: launch.FP32_TOLERANCE, torch.bfloat16: 3e-2, torch.float16: 4e-3}
DTYPES = list(TOLERANCE)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a kernel fills starts as NaN (or -1 for integers)."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    monkeypatch.setattr(launch, "new_output", nan_output)


def close(actual, expected, dtype, what):
    """actual within TOLERANCE[dtype] of expected, the fp32 reference, and finite."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: not finite (an unwritten element?)"
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} vs max value {scale:.3g}"


def as_accurate_as_torch(actual, expected, torch_low, dtype, what):
    """launch.py's accuracy rule: actual errs from expected, the fp32 reference, at most twice as much
    as torch_low, the reference run in `dtype` (launch.error_bound)."""
    actual, expected, torch_low = actual.float(), expected.float(), torch_low.float()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    error, torch_error = ((a - expected).abs().max().item() for a in (actual, torch_low))
    scale = expected.abs().max().item()
    assert error <= launch.error_bound(dtype, scale, torch_error), \
        f"{what}: max error {error:.3g}, PyTorch's in {dtype} {torch_error:.3g} (max value {scale:.3g})"


def run_op(op, activations, params, upstream=None, autocast=None):
    """op(*activations, *params) and its backward from `upstream` (random, rounded to the outputs'
    dtypes, when None): (outputs + gradients of all inputs, upstream)."""
    leaves = [t.detach().clone().requires_grad_() for t in activations + params]
    with torch.autocast(DEVICE, dtype=autocast or torch.float32, enabled=autocast is not None):
        outs = op(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if upstream is None:  # exact in every run's dtype, so that all runs start the backward alike
        upstream = [torch.randn(o.shape, device=DEVICE).to(o.dtype).float() for o in outs]
    torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return list(outs) + [t.grad for t in leaves], upstream


def check(triton_op, torch_op, activations, params, dtype):
    """Run triton_op on the activations in `dtype` (parameters fp32, as under autocast) and torch_op
    on everything in fp32 from the same values; compare the outputs and all gradients. In bf16 and
    fp16 torch_op runs a third time, in that dtype under autocast, for the accuracy rule."""
    low = [a.to(DEVICE, dtype) for a in activations]
    params = [p.to(DEVICE) for p in params]
    results, upstream = run_op(triton_op, low, params)
    reference, _ = run_op(torch_op, [a.float() for a in low], params, upstream)
    torch_low = run_op(torch_op, low, params, upstream, dtype)[0] if dtype != torch.float32 else [None] * len(results)
    n_out = len(upstream)
    for i, (t, r, p) in enumerate(zip(results, reference, torch_low)):
        expected_dtypes = (low[0].dtype, torch.float32) if i < n_out else ((low + params)[i - n_out].dtype,)
        assert t.shape == r.shape and t.dtype in expected_dtypes
        what = f"output {i}" if i < n_out else f"gradient of input {i - n_out}"
        close(t, r, dtype, what)
        if p is not None:  # PyTorch's result in the dtype the kernel returns (CUDA autocast's LayerNorm: fp32)
            as_accurate_as_torch(t, r, p.to(t.dtype), dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["fc1", "fc2", "proj", "head"])
def test_sliced_linear(case, dtype):
    """fc1 216 -> 756 + GELU, fc2 756 -> 216 + residual, proj 7 heads x 16 -> 240 + residual, head."""
    lead, K, n_out, S_out, S_in, gelu, residual = {
        "fc1": ((1, 65), 216, 756, 1024, 256, True, False),
        "fc2": ((1, 65), 756, 216, 256, 1024, False, True),
        "proj": ((2, 65), 112, 240, 256, 256, False, True),
        "head": ((3,), 240, 10, 10, 256, False, False),
    }[case]
    activations = [torch.randn(*lead, K)] + ([torch.randn(*lead, n_out)] if residual else [])
    params = [torch.randn(S_out, S_in) * K**-0.5, torch.randn(S_out)]

    def op(impl):
        return lambda x, *rest: impl(x, rest[-2], rest[-1], n_out, gelu, rest[0] if residual else None)
    check(op(kernels.sliced_linear_triton), op(kernels.sliced_linear_torch), activations, params, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliced_mlp(dtype):
    """fc1 216 -> 756, GELU, fc2 756 -> 216, residual: the two Triton launches against GeluLinear."""
    params = [torch.randn(1024, 256) * 216**-0.5, torch.randn(1024), torch.randn(256, 1024) * 756**-0.5,
              torch.randn(256)]
    check(lambda x, r, *p: kernels.sliced_mlp_triton(x, *p, 756, residual=r),
          lambda x, r, *p: kernels.sliced_mlp_torch(x, *p, 756, residual=r),
          [torch.randn(1, 65, 216), torch.randn(1, 65, 216)], params, dtype)


@pytest.mark.parametrize("autocast", [False, True])
def test_gelu_linear_saves_one_activation(autocast):
    """sliced_mlp_torch equals the plain composition, gradients included, while autograd keeps one
    (B, N, hidden) tensor for the backward, not two."""
    torch.manual_seed(0)
    x = torch.randn(2, 17, 24, requires_grad=True)
    params = [(torch.randn(shape) * 0.3).requires_grad_() for shape in ((64, 32), (64,), (32, 64), (32,))]
    hidden_saved = []

    def pack(t):
        if t.shape[-1] == 40 and t.numel() == 2 * 17 * 40:  # (2, 17, 40) or its (34, 40) view
            hidden_saved.append(t.untyped_storage().data_ptr())
        return t

    results = []
    for mlp in (kernels.sliced_mlp_torch, lambda x, w1, b1, w2, b2, hidden: kernels.sliced_linear_torch(
            kernels.sliced_linear_torch(x, w1, b1, hidden, gelu=True), w2, b2, x.shape[-1])):
        hidden_saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = mlp(x, *params, 40)
        saved = len(set(hidden_saved))
        results.append((y, torch.autograd.grad(y.float().square().sum(), [x, *params]), saved))
    (y, grads, saved), (y_ref, grads_ref, saved_ref) = results
    assert (saved, saved_ref) == (1, 2)
    tolerance = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(y, y_ref, rtol=tolerance, atol=tolerance)
    for g, r in zip(grads, grads_ref):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=tolerance, atol=tolerance * r.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, head_dim, E", [(3, 32, 216), (7, 16, 240)])
def test_interleaved_qkv(heads, head_dim, E, dtype):
    params = [torch.randn(3 * 8 * 32, 256) * E**-0.5, torch.randn(3 * 8 * 32)]
    check(lambda x, w, b: kernels.interleaved_qkv_triton(x, w, b, heads, head_dim),
          lambda x, w, b: kernels.interleaved_qkv_torch(x, w, b, heads, head_dim),
          [torch.randn(1, 65, E)], params, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 197, 216), (2, 65, 240)])
def test_sliced_layer_norm(shape, dtype):
    x = torch.randn(shape) * 3 + 1
    check(kernels.sliced_layer_norm_triton, kernels.sliced_layer_norm_torch, [x],
          [torch.randn(256), torch.randn(256)], dtype)


# ImageNet's 197 tokens in the interpreter in fp32 only: its time grows with the programs.
IMAGENET_DTYPES = DTYPES if DEVICE == "cuda" else [torch.float32]


@pytest.mark.parametrize("B, H, N, D, max_rel, dtype",
                         [(1, 7, 65, 32, 7, dtype) for dtype in DTYPES] + [(2, 1, 26, 64, 2, dtype) for dtype in DTYPES]
                         + [(1, 3, 197, 16, 14, dtype) for dtype in IMAGENET_DTYPES])
def test_relative_attention(B, H, N, D, max_rel, dtype):
    """The cpu space (65 tokens, 8 x 8 grid), a 5 x 5 grid whose distances are clipped at 2, and
    ImageNet's 197 tokens; tables of a super head dim 64."""
    qkv = [torch.randn(B, H, N, D) for _ in range(3)]
    tables = [torch.randn(2 * max_rel + 2, 64) * 0.5 for _ in range(4)]
    check(lambda q, k, v, *t: attention.relative_attention_triton(q, k, v, t, max_rel),
          lambda q, k, v, *t: attention.relative_attention_torch(q, k, v, t, max_rel), qkv, tables, dtype)


def test_relative_attention_strided_inputs():
    """q, k, v as autoformer.py passes them: permuted views of one (B, N, 3, heads, D) tensor."""
    qkv = torch.randn(2, 17, 3, 3, 16, device=DEVICE).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, D), no copy
    tables = [torch.randn(6, 16) for _ in range(4)]
    check(lambda q, k, v, *t: attention.relative_attention_triton(q, k, v, t, 2),
          lambda q, k, v, *t: attention.relative_attention_torch(q, k, v, t, 2), list(qkv.unbind(0)), tables,
          torch.float32)


@on_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", aot.OPS)
@pytest.mark.parametrize("space", ["tiny", "small", "base"])
def test_largest_layer(space, op, dtype):
    """Every op at the largest layer of a space, batch 32, N = 197: the launches of real training."""
    torch.manual_seed(0)
    check(*aot.op_case(op, batch=32, **aot.space_layer(SPACES[space])), dtype)


def test_backend_switch(monkeypatch):
    """auto and torch run the reference on CPU tensors without touching Triton; triton runs it."""
    launches = []
    monkeypatch.setattr(launch, "run", lambda kernel, *args, **meta: launches.append(kernel))
    x, w, b = torch.randn(2, 8), torch.randn(8), torch.randn(8)
    for backend in ("auto", "torch"):
        monkeypatch.setenv("AUTOFORMER_BACKEND", backend)
        kernels.sliced_layer_norm(x, w, b)
    assert launches == []
    monkeypatch.setenv("AUTOFORMER_BACKEND", "triton")
    kernels.sliced_layer_norm(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE))
    assert launches == [kernels._layer_norm_fwd_kernel]
    monkeypatch.setenv("AUTOFORMER_BACKEND", "cuda")
    with pytest.raises(ValueError, match="AUTOFORMER_BACKEND"):
        kernels.sliced_layer_norm(x, w, b)


# Every feature of the supernet at a few milliseconds a layer in the interpreter: unequal widths,
# 1 and 3 heads, clipped relative distances (max 2 on a 4 x 4 grid).
SMALL = dataclasses.replace(SPACES["cpu"], embed_dims=(24, 40), mlp_ratios=(2.0, 3.5), num_heads=(1, 3),
                            depths=(1, 2), head_dim=16, img_size=16, patch_size=4, num_classes=5,
                            max_relative_position=2)
# The bf16 tests on a GPU take the tiny space itself: 224 px, N = 197, 12 to 14 layers.
LOW_PRECISION_SPACE = SMALL if DEVICE == "cpu" else SPACES["tiny"]


def run_supernet(model, images, subnet, backend, monkeypatch, autocast=False):
    monkeypatch.setenv("AUTOFORMER_BACKEND", backend)
    model.zero_grad()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        logits = model(images, subnet)
    logits.float().square().sum().backward()
    return logits.float(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def supernet_and_images(seed, space=SMALL, batch=2, sharing="entangled"):
    torch.manual_seed(seed)
    model = Supernet(space, sharing=sharing).to(DEVICE)
    return model, torch.randn(batch, 3, space.img_size, space.img_size, device=DEVICE)


@pytest.fixture
def fp32_convolutions(monkeypatch):
    """The fp32 reference in fp32 throughout: cuDNN would run the patch convolution in tf32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_supernet_triton_matches_torch(sharing, monkeypatch, fp32_convolutions):
    model, images = supernet_and_images(0, sharing=sharing)
    subnet = SMALL.sample(random.Random(0))
    logits, grads = run_supernet(model, images, subnet, "triton", monkeypatch)
    ref_logits, ref_grads = run_supernet(model, images, subnet, "torch", monkeypatch)
    close(logits, ref_logits, torch.float32, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        close(grads[name], ref_grads[name], torch.float32, name)


def test_supernet_autocast(monkeypatch):
    """Under bf16 autocast both backends run mixed precision; they agree to bf16 accuracy and every
    parameter gradient comes back in fp32."""
    model, images = supernet_and_images(2)
    logits, grads = run_supernet(model, images, SMALL.largest(), "triton", monkeypatch, autocast=True)
    ref_logits, ref_grads = run_supernet(model, images, SMALL.largest(), "torch", monkeypatch, autocast=True)
    close(logits, ref_logits, torch.bfloat16, "logits")
    for name in grads:  # two different bf16 roundings of the same sums: compare in norm
        assert grads[name].dtype == torch.float32
        error = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < 5e-2, f"{name}: relative error {error:.3g}"


def test_supernet_bf16_as_accurate_as_torch(monkeypatch, fp32_convolutions):
    """Training's precision, the whole model: with every op on Triton under bf16 autocast, the logits
    and every parameter gradient of the largest, the smallest and a random subnet err from the fp32
    reference at most twice as much as the torch backend's bf16 run does."""
    space = LOW_PRECISION_SPACE
    model, images = supernet_and_images(1, space, batch=2 if DEVICE == "cpu" else 8)
    for subnet in (space.largest(), space.smallest(), space.sample(random.Random(1))):
        ref_logits, ref_grads = run_supernet(model, images, subnet, "torch", monkeypatch)
        torch_logits, torch_grads = run_supernet(model, images, subnet, "torch", monkeypatch, autocast=True)
        logits, grads = run_supernet(model, images, subnet, "triton", monkeypatch, autocast=True)
        as_accurate_as_torch(logits, ref_logits, torch_logits, torch.bfloat16, f"{subnet}: logits")
        for name in grads:
            as_accurate_as_torch(grads[name], ref_grads[name], torch_grads[name], torch.bfloat16, f"{subnet}: {name}")


def train_losses(backend, autocast, steps, monkeypatch):
    """The losses of `steps` AdamW steps of the tiny supernet, one random subnet each, on one fixed
    batch of 32 with random labels: the same subnets, batch and initial weights in every call."""
    monkeypatch.setenv("AUTOFORMER_BACKEND", backend)
    space = LOW_PRECISION_SPACE
    model, images = supernet_and_images(3, space, batch=32)
    labels = torch.randint(0, space.num_classes, (32,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng, losses = random.Random(3), []
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(images, space.sample(rng)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


@on_cuda
def test_training_follows_torch(monkeypatch, fp32_convolutions):
    """20 training steps in bf16: the triton backend's losses stay as close to the fp32 run's as the
    torch backend's bf16 losses do (twice their largest distance, launch.error_bound), while the
    loss falls."""
    reference = train_losses("torch", False, 20, monkeypatch)
    torch_low = train_losses("torch", True, 20, monkeypatch)
    losses = train_losses("triton", True, 20, monkeypatch)
    assert reference[-5:].mean() < 0.9 * reference[:5].mean(), f"the fp32 run did not learn: {reference.tolist()}"
    as_accurate_as_torch(losses, reference, torch_low, torch.bfloat16, "training losses")
