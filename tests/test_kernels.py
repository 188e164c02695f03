"""preftune.kernels (Triton) against the eager ops they replace.

On a GPU the kernels run as compiled; elsewhere in Triton's interpreter (``TRITON_INTERPRET=1``,
set by ``conftest.py`` before anything imports Triton), so CPU-only CI checks the same kernel code. The eager twins: the formulas of ``transformers``' Llama RMSNorm and ``silu(gate) * up``
under autograd, and the fused layers without kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from preftune import fused  # noqa: E402
from preftune.fused import fuse_layers, unfuse_layers  # noqa: E402
from preftune.models import set_activation_checkpointing  # noqa: E402
from preftune.testing import tiny_model  # noqa: E402

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def kern(monkeypatch):
    """(the kernels module, the device its kernels run on)."""
    import preftune.kernels as kernels

    if not ON_GPU:
        if not kernels.INTERPRETED:
            pytest.skip("no GPU, and Triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)")
        monkeypatch.setattr(kernels, "_interpreter_on_cpu", lambda: True)
    return kernels, "cuda" if ON_GPU else "cpu"


def _eager_rmsnorm(x, weight, eps):
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    return torch.allclose(a.float(), b.float(), **tol)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("hidden", [64, 72])
def test_rmsnorm_kernels_match_eager(kern, x_dtype, w_dtype, hidden):
    kernels, device = kern
    torch.manual_seed(hidden)
    base = torch.randn(3, hidden, 13, device=device) * 3
    x = base.transpose(1, 2).to(x_dtype).requires_grad_()  # (3, 13, hidden), not contiguous: rows are copied
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(w_dtype).requires_grad_()
    dy = torch.randn(3, 13, hidden, device=device).to(torch.promote_types(x_dtype, w_dtype))

    y_ref = _eager_rmsnorm(x, weight, 1e-6)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, weight), dy)
    y, rstd = kernels.rmsnorm_forward(x.detach(), weight.detach(), 1e-6)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert _close(y, y_ref, x_dtype)
    xf = x.detach().float()
    assert torch.allclose(rstd, torch.rsqrt(xf.pow(2).mean(-1) + 1e-6).reshape(-1), rtol=1e-5)
    dx, dw = kernels.rmsnorm_backward(dy, x.detach(), weight.detach(), rstd)
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    assert _close(dx, dx_ref, x_dtype)
    # d weight sums products over all rows: held to the float64 sum, relative to the sum of |products|
    # (the interpreter rounds float32 -> bfloat16 by truncation, a GPU to nearest)
    xd = x.detach().double()
    n = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x_dtype).double()
    exact, scale = (dy.double() * n).sum((0, 1)), (dy.double() * n).abs().sum((0, 1))
    rel = 1e-6 if x_dtype == torch.float32 and w_dtype == torch.float32 else 1e-2
    for got in (dw, dw_ref):
        assert ((got.double() - exact).abs() <= rel * scale + 1e-6).all()
    assert kernels.rmsnorm_backward(dy, x.detach(), weight.detach(), rstd, need_dx=False)[0] is None
    only_dx = kernels.rmsnorm_backward(dy, x.detach(), weight.detach(), rstd, need_dw=False)
    assert only_dx[1] is None and torch.equal(only_dx[0], dx)


def test_rmsnorm_kernels_on_empty_rows(kern):
    kernels, device = kern
    x, w = torch.zeros(0, 8, device=device), torch.ones(8, device=device)
    y, rstd = kernels.rmsnorm_forward(x, w, 1e-6)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    dx, dw = kernels.rmsnorm_backward(torch.zeros(0, 8, device=device), x, w, rstd)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernels_match_eager(kern, dtype):
    kernels, device = kern
    torch.manual_seed(1)
    shape = (3, 37, 50)  # 5550 elements: not a multiple of the kernel's block
    gate = (torch.randn(shape, device=device) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    dprod = torch.randn(shape, device=device).to(dtype)
    ref = F.silu(gate) * up
    dgate_ref, dup_ref = torch.autograd.grad(ref, (gate, up), dprod)

    out = kernels.silu_mul(gate.detach(), up.detach())
    assert out.dtype == dtype and _close(out, ref, dtype)
    prod, dgate, dup = kernels.silu_mul_backward(dprod.clone(), gate.detach(), up.detach(), want_prod=True)
    assert torch.equal(prod, out)
    assert _close(dgate, dgate_ref, dtype) and _close(dup, dup_ref, dtype)
    # d gate written over d prod's memory gives the same numbers
    buf = dprod.clone()
    _, dgate_in, _ = kernels.silu_mul_backward(buf, gate.detach(), up.detach(), need_up=False, inplace=True)
    assert dgate_in.data_ptr() == buf.data_ptr() and torch.equal(dgate_in, dgate)
    assert kernels.silu_mul_backward(dprod, gate.detach(), up.detach(), need_gate=False)[1] is None


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False).logits
    loss = (out.float().log_softmax(-1)[..., 0] * torch.linspace(-1, 1, ids.shape[1], device=ids.device)).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
def test_fused_layers_with_kernels_match_eager(kern, dtype, lora, monkeypatch):
    """A whole model: fused layers on Triton kernels vs the eager model, values and every gradient,
    with grad and without (the reference pass); with LoRA on down_proj its adapter is in the fused MLP's node."""
    kernels, device = kern
    eager = tiny_model(intermediate_size=48).to(device=device, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        eager = get_peft_model(eager, LoraConfig(r=4, target_modules=["down_proj", "q_proj"], init_lora_weights=False))
    truth = copy.deepcopy(eager).float()  # for bfloat16: what both roundings are measured against
    model = copy.deepcopy(eager)
    counts = fuse_layers(model, triton=True)
    assert counts["mlp"] == 2 and counts["rmsnorm"] == 5
    calls = []
    for name in ("rmsnorm_forward", "rmsnorm_backward", "silu_mul", "silu_mul_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ids = torch.randint(0, 300, (3, 11), device=device)
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_k, grads_k = _loss_and_grads(model, ids)
    grads_t = _loss_and_grads(truth, ids)[1]
    assert {"rmsnorm_forward", "rmsnorm_backward", "silu_mul", "silu_mul_backward"} <= set(calls)
    assert _close(out_k, out_e, dtype)
    assert grads_e.keys() == grads_k.keys() and grads_e
    for name in grads_e:
        got, want = grads_k[name], grads_e[name]
        assert got.dtype == want.dtype
        if dtype == torch.float32:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), name
        else:  # bfloat16: as close to the float32 model's gradient as eager's bfloat16 one is (the
            # interpreter rounds float32 -> bfloat16 by truncation, so there within a looser bound)
            exact = grads_t[name]
            err_k, err_e = (got.float() - exact).norm(), (want.float() - exact).norm()
            bound = 3e-2 * exact.norm() if kernels.INTERPRETED else 2 * err_e + 2e-3 * exact.norm()
            assert err_k <= bound, (name, err_k, err_e)
    calls.clear()
    with torch.no_grad():
        assert _close(model(input_ids=ids).logits, eager(input_ids=ids).logits, dtype)
    assert set(calls) == {"rmsnorm_forward", "silu_mul"}
    assert unfuse_layers(model) == 7 + 4 * lora and not any("_preftune_triton" in vars(m) for m in model.modules())


def test_kernels_apply_only_to_plain_tensors_on_their_device(kern, monkeypatch):
    kernels, device = kern
    t = torch.zeros(4, device=device)
    assert kernels.usable(t, torch.nn.Parameter(t.clone()))
    assert not kernels.usable(t.to("meta"))

    class Sub(torch.Tensor):
        pass

    assert not kernels.usable(t.as_subclass(Sub))  # DTensor and other subclasses take the eager ops
    monkeypatch.setattr(kernels, "triton", None)
    assert not kernels.usable(t)


def test_norms_wider_than_the_kernels_take_keep_the_eager_ops(kern, monkeypatch):
    kernels, device = kern
    model = tiny_model(intermediate_size=48).to(device)
    fuse_layers(model, triton=True)
    monkeypatch.setattr(kernels, "MAX_NORM_WIDTH", model.config.hidden_size - 1)
    monkeypatch.setattr(kernels, "rmsnorm_forward", lambda *a, **k: pytest.fail("kernel used"))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 300, (2, 5), device=device))


def test_fuse_layers_without_triton_uses_eager_ops(kern):
    kernels, device = kern
    model = tiny_model(intermediate_size=48).to(device)
    fuse_layers(model, triton=False)
    assert not any(fused._use_triton(m, torch.zeros(1, device=device)) for m in model.modules()
                   if "_preftune_triton" in vars(m))


def _eager_head(z, targets, scale, softcap):
    """The eager head on logits z (n, V) in the matmul's dtype: float32 log-softmax at the targets."""
    x = z.float()
    x = x * scale if scale is not None else x
    x = softcap * torch.tanh(x / softcap) if softcap is not None else x
    return F.log_softmax(x, dim=-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,softcap", [(None, None), (0.5, None), (None, 3.0), (2.0, 5.0)])
def test_head_kernels_match_eager(kern, monkeypatch, dtype, scale, softcap):
    """Forward: log-softmax at the targets and the log-sum-exp; backward: d logits (written over the
    logits) equal autograd through the eager float32 formula, rounded once to the logits' dtype. A
    64-wide block makes the 300-token vocabulary five blocks with a ragged last one."""
    kernels, device = kern
    monkeypatch.setattr(kernels, "_HEAD_BLOCK", 64)
    torch.manual_seed(0)
    z = (torch.randn(7, 300, device=device) * 4).to(dtype)
    targets = torch.randint(0, 300, (7,), device=device)
    targets[0], targets[1] = 0, 299  # the first and the last column
    grad = torch.randn(7, device=device)

    out, lse = kernels.head_logps_forward(z, targets, scale, softcap)
    zf = z.float().requires_grad_()
    want = _eager_head(zf, targets, scale, softcap)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.allclose(out, want.detach(), rtol=1e-5, atol=1e-5)
    x = z.float() * (scale or 1.0)
    x = softcap * torch.tanh(x / softcap) if softcap is not None else x
    assert torch.allclose(lse, torch.logsumexp(x, -1), rtol=1e-5, atol=1e-5)

    (dz_want,) = torch.autograd.grad(want, zf, grad)
    buf = z.clone()
    dz = kernels.head_logps_backward_(buf, targets, lse, grad, scale, softcap)
    assert dz.data_ptr() == buf.data_ptr() and dz.dtype == dtype  # written over the logits
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    assert torch.allclose(dz.float(), dz_want.to(dtype).float(), **tol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes -inf - -inf in numpy
def test_head_kernel_rows_of_minus_infinity_and_bad_targets(kern):
    """A row of -inf logits gives a log-sum-exp of -inf as torch's does; a target outside the
    vocabulary gives nan (caught by the trainer's non-finite check) instead of reading past the row."""
    kernels, device = kern
    z = torch.zeros(3, 10, device=device)
    z[0] = float("-inf")
    out, lse = kernels.head_logps_forward(z, torch.tensor([1, 10, -1], device=device))
    assert lse[0] == float("-inf") and torch.isnan(out[1:]).all()
    assert torch.allclose(lse[1:].cpu(), torch.full((2,), float(torch.tensor(10.0).log())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_with_kernels_matches_eager(kern, dtype, bias):
    """sequence_logps with triton=True vs the eager chunked head: per-response log-probs and the
    gradients of the hidden states, head weight and bias, over several chunks and a ragged last one,
    with logit scaling and soft-capping."""
    from preftune.logps import sequence_logps

    kernels, device = kern
    torch.manual_seed(1)
    K, H, V, S = 23, 16, 300, 4
    hidden = torch.randn(K, H, device=device, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, H, device=device) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (K,), device=device)
    segments = torch.randint(0, S, (K,), device=device)
    weights = torch.randn(S, device=device)
    results = []
    for triton in (False, True):
        logps, counts = sequence_logps(hidden, W, torch.arange(K, device=device), targets, segments, S,
                                       lm_head_bias=b, chunk_size=8, logit_scale=0.7, logit_softcap=20.0,
                                       triton=triton)
        params = (hidden, W) + ((b,) if bias else ())
        results.append((logps.detach(), counts, torch.autograd.grad((logps * weights).sum(), params)))
    (lp_e, c_e, g_e), (lp_k, c_k, g_k) = results
    empty = torch.zeros(0, dtype=torch.long, device=device)  # no completion token at all
    lp0, _ = sequence_logps(hidden, W, empty, empty, empty, 2, lm_head_bias=b, chunk_size=8, triton=True)
    assert torch.equal(lp0, torch.zeros(2, device=device))
    assert not torch.autograd.grad(lp0.sum(), W, allow_unused=True)[0].any()
    assert torch.equal(c_e, c_k)
    assert torch.allclose(lp_k, lp_e, rtol=1e-5, atol=1e-4)
    for got, want in zip(g_k, g_e):
        assert got.dtype == want.dtype
        if dtype == torch.float32:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        else:  # both round d logits to bfloat16 once (the interpreter by truncation)
            assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()


def test_model_logps_uses_the_head_kernels_when_marked(kern, monkeypatch):
    """A marked head runs the kernels (forward and backward) and gives the eager values and gradients;
    unmarked (triton_kernels=False) it does not."""
    from preftune import logps as L
    from preftune.data.batching import collate

    kernels, device = kern
    model = tiny_model().to(device)
    feats = [dict(index=i, prompt_ids=[1, 5, 6 + i], chosen_ids=[7, 8, 9][: 1 + i], rejected_ids=[10, 11])
             for i in range(3)]
    batch = collate(feats, layout="prefix", pad_token_id=0)
    calls = []
    for name in ("head_logps_forward", "head_logps_backward_"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))

    def run():
        model.zero_grad()
        out = L.model_logps(model, batch)
        (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
        return out.chosen_logps.detach(), out.rejected_logps.detach(), model.lm_head.weight.grad.clone()

    eager = run()
    assert not calls
    assert L.use_triton_head(model) and getattr(model.lm_head, L.TRITON_HEAD)
    fast = run()
    assert calls.count("head_logps_forward") == 1 and calls.count("head_logps_backward_") == 1
    for got, want in zip(fast, eager):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    L.use_triton_head(model, False)
    calls.clear()
    run()
    assert not calls


# ----------------------------------------------------------------------------- background warm-up


def test_warm_up_runs_every_kernel_in_the_background_and_usable_waits(kern, monkeypatch):
    kernels, device = kern
    ran, gate = [], __import__("threading").Event()
    for name in ("silu_mul", "silu_mul_backward", "rmsnorm_forward", "rope", "head_logps_forward",
                 "head_logps_backward_"):
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name, **k):
            gate.wait(10)  # held until the test has seen the thread running
            ran.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(kernels, name, spy)
    assert kernels.warm_up_async(device, torch.float32, norm_width=24, mlp_width=40, vocab=50, heads=(3, 1, 8))
    assert kernels._warming is not None and kernels._warming.is_alive() and not ran
    gate.set()
    assert kernels.usable(torch.ones(1, device=device))  # waits for the thread
    assert kernels._warming is None
    assert ran == ["silu_mul", "silu_mul_backward", "rmsnorm_forward"] + ["rope"] * 4 + ["head_logps_forward",
                                                                                     "head_logps_backward_"]


def test_warm_up_calls_queue_and_a_failure_stays_in_the_thread(kern, monkeypatch, caplog):
    kernels, device = kern
    order = []

    def boom(*a, **k):
        order.append(len(order))
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "silu_mul", boom)
    with caplog.at_level("DEBUG", logger="preftune.kernels"):
        assert kernels.warm_up_async(device, torch.float32)
        assert kernels.warm_up_async(device, torch.float32, vocab=50)  # queues behind the first
        kernels.wait_warm_up()
    assert order == [0, 1] and kernels._warming is None
    assert sum("no compiler" in r.getMessage() for r in caplog.records) == 2


def test_cpu_tensors_take_the_kernels_only_under_the_tests_fixture():
    """Outside the ``kern`` fixture, even under Triton's interpreter, CPU tensors keep the eager ops."""
    import preftune.kernels as kernels

    assert kernels._interpreter_on_cpu() is False
    assert not kernels.usable(torch.zeros(4))


def test_warm_up_is_a_no_op_where_the_kernels_do_not_run(monkeypatch):
    import preftune.kernels as kernels

    monkeypatch.setattr(kernels, "_interpreter_on_cpu", lambda: False)
    if not ON_GPU:
        assert not kernels.warm_up_async("cpu") and kernels._warming is None
    assert not kernels.warm_up_async("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_outputs_made_again_by_the_kernel_equal_the_kept_ones(kern, dtype, monkeypatch):
    """With the Triton norm, the outputs made again in backward (fused.recompute_norm_outputs, on in
    model_logps) come from the same kernel: the gradients equal those of keeping the outputs, bit for bit."""
    import contextlib

    from preftune.data.batching import collate
    from preftune.logps import model_logps

    kernels, device = kern
    torch.manual_seed(13)
    model = tiny_model(intermediate_size=48).to(device=device, dtype=dtype)
    fuse_layers(model, triton=True)
    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 40], "rejected_ids": [10, 11], "index": 0},
             {"prompt_ids": [20, 21], "chosen_ids": [30], "rejected_ids": [31, 32, 33], "index": 1}]
    batch = collate(feats, layout="prefix", pad_token_id=0, device=device)
    calls = []
    real = kernels.rmsnorm_forward
    monkeypatch.setattr(kernels, "rmsnorm_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        out = model_logps(model, batch)
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters()}

    n_recompute, made = grads()
    monkeypatch.setattr(fused, "recompute_norm_outputs", contextlib.nullcontext)
    n_kept, kept = grads()
    layers = model.config.num_hidden_layers
    assert n_kept == 2 * layers + 1 and n_recompute == n_kept + 2 * layers  # each kept output made once more
    for name in kept:
        assert torch.equal(made[name], kept[name]), name


def _eager_rope():
    """transformers' Llama apply_rotary_pos_emb as written there (fuse_layers may have wrapped it)."""
    from transformers.models.llama import modeling_llama

    fn = modeling_llama.apply_rotary_pos_emb
    return getattr(fn, "_preftune_original", fn)


@pytest.mark.parametrize("x_dtype,c_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("heads,dim,cos_rows", [(3, 16, 2), (5, 12, 1)])
def test_rope_kernel_matches_eager(kern, x_dtype, c_dtype, heads, dim, cos_rows):
    """kernels.rope through fused._Rope vs the eager formula: values, strides and the gradients of q
    and k. q and k as the projections give them: (B, T, H, D) transposed to (B, H, T, D); K/V heads fewer."""
    kernels, device = kern
    g = torch.Generator(device=device).manual_seed(heads * dim)
    B, T = 2, 7

    def heads_view(h):
        return (torch.randn(B, T, h, dim, device=device, generator=g) * 2).to(x_dtype).transpose(1, 2)

    q, k = heads_view(heads), heads_view(1)
    angle = torch.randn(cos_rows, T, dim // 2, device=device, generator=g) * 3
    angle = torch.cat([angle, angle], -1)  # the halves repeat, as rotary embeddings build them
    cos, sin = angle.cos().to(c_dtype), angle.sin().to(c_dtype)
    dq_out, dk_out = heads_view(heads).float(), heads_view(1).float()

    def run(fn):
        qi, ki = q.detach().requires_grad_(), k.detach().requires_grad_()
        qo, ko = fn(qi, ki, cos, sin)
        ((qo.float() * dq_out).sum() + (ko.float() * dk_out).sum()).backward()
        return qo.detach(), ko.detach(), qi.grad, ki.grad

    want = run(_eager_rope())
    got = run(fused._Rope.apply)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if x_dtype == torch.float32:  # float32: up to a fused multiply-add's rounding
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:  # each product and each sum rounded to bfloat16 where eager rounds them: bit for bit
            assert torch.equal(a, b)
    assert got[0].stride() == q.stride() and got[1].stride() == k.stride()  # the projection's layout kept


def test_rope_kernels_run_inside_model_logps_only(kern, monkeypatch):
    """fuse_layers(triton=True) patches the modeling module's apply_rotary_pos_emb: inside model_logps
    of a model marked for the kernels (fast_rope) they compute it, values and gradients as eager's;
    for an unmarked model, elsewhere, or with arguments the kernel does not take, transformers'
    function runs."""
    from transformers.models.llama import modeling_llama

    from preftune.data.batching import collate
    from preftune.logps import model_logps, use_triton_head

    kernels, device = kern
    torch.manual_seed(5)
    eager = tiny_model(intermediate_size=48).to(device)
    model = copy.deepcopy(eager)
    assert fuse_layers(model, triton=True)["rope"] == model.config.num_hidden_layers
    use_triton_head(model)
    assert fuse_layers(copy.deepcopy(eager), triton=False)["rope"] == 0
    calls = []
    real = kernels.rope
    monkeypatch.setattr(kernels, "rope", lambda *a, **k: calls.append(k.get("backward", False)) or real(*a, **k))
    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 40], "rejected_ids": [10, 11], "index": 0},
             {"prompt_ids": [20, 21], "chosen_ids": [30], "rejected_ids": [31, 32, 33], "index": 1}]
    batch = collate(feats, layout="prefix", pad_token_id=0, device=device)

    def grads(net):
        net.zero_grad(set_to_none=True)
        out = model_logps(net, batch)
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        return out, {n: p.grad.clone() for n, p in net.named_parameters()}

    out_k, grads_k = grads(model)
    layers = model.config.num_hidden_layers
    assert calls.count(False) == 2 * layers and calls.count(True) == 2 * layers  # q and k, each way
    out_e, grads_e = grads(eager)  # the twin: not marked for the kernels, transformers' rotary ops
    assert len(calls) == 4 * layers
    calls.clear()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 300, (2, 5), device=device))  # outside model_logps
        q = torch.randn(1, 2, 3, 8, device=device)
        cos = torch.ones(1, 3, 8, device=device)
        modeling_llama.apply_rotary_pos_emb(q, q, cos, cos, unsqueeze_dim=1)
    assert calls == []
    from preftune.fused import fast_rope

    with fast_rope(), torch.no_grad():
        modeling_llama.apply_rotary_pos_emb(q, q, cos, cos)
        assert len(calls) == 2
        modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos.unsqueeze(2), cos.unsqueeze(2),
                                            unsqueeze_dim=2)  # another layout: transformers' own
        assert len(calls) == 2
    torch.testing.assert_close(out_k.chosen_logps, out_e.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k.rejected_logps, out_e.rejected_logps, rtol=1e-5, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_k[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rope_kernels_stay_off_under_gradient_checkpointing(kern, monkeypatch):
    """Checkpointing recomputes a layer in backward, outside model_logps' fast_rope: the forward must
    save what that recompute saves, so the kernels stay off; the gradients equal the unchecked ones."""
    from preftune.data.batching import collate
    from preftune.logps import model_logps, use_triton_head

    kernels, device = kern
    torch.manual_seed(6)
    plain = tiny_model(intermediate_size=48).to(device)
    fuse_layers(plain, triton=True)
    use_triton_head(plain)
    checked = copy.deepcopy(plain)
    set_activation_checkpointing(checked, True, {"use_reentrant": False})
    calls = []
    real = kernels.rope
    monkeypatch.setattr(kernels, "rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 40], "rejected_ids": [10, 11], "index": 0}]
    batch = collate(feats, layout="prefix", pad_token_id=0, device=device)

    def grads(net):
        out = model_logps(net, batch)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    want = grads(plain)
    assert calls
    calls.clear()
    got = grads(checked)
    assert calls == []
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_lora_mlp_with_dropout_on_the_kernels_matches_eager(kern):
    """A LoRA down_proj with its dropout on in training, through the fused MLP on the Triton kernels: the
    same draws as eager (same seed), values and every gradient; the product is made again in backward."""
    from peft import LoraConfig, get_peft_model

    kernels, device = kern
    torch.manual_seed(21)
    eager = get_peft_model(tiny_model(intermediate_size=48).to(device),
                           LoraConfig(r=4, lora_dropout=0.3, target_modules=["down_proj", "q_proj"],
                                      init_lora_weights=False))
    model = copy.deepcopy(eager)
    fuse_layers(model, triton=True)
    ids = torch.randint(0, 300, (3, 11), device=device)
    torch.manual_seed(22)
    out_e, grads_e = _loss_and_grads(eager, ids)
    torch.manual_seed(22)
    out_k, grads_k = _loss_and_grads(model, ids)
    assert torch.allclose(out_k, out_e, rtol=1e-5, atol=1e-5)
    assert grads_e.keys() == grads_k.keys() and grads_e
    for name in grads_e:
        assert torch.allclose(grads_k[name], grads_e[name], rtol=1e-4, atol=1e-5), name
