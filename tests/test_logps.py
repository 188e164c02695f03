"""preftune.logps: the chunked completion-only head and every batch layout against full logits."""

from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from preftune.data.batching import collate
from preftune.logps import (
    TokenLogps,
    head_token_logps,
    logps_from_logits,
    model_logps,
    model_pair_logps,
    model_token_logps,
    sequence_logps,
)
from preftune.losses import wpo_weights
from preftune.testing import tiny_model

V = 300
# prompts of different lengths, responses of different lengths, a 1-token response
FEATS = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 40], "rejected_ids": [10, 11], "index": 0},
    {"prompt_ids": [20, 21, 22, 23, 24, 25, 26], "chosen_ids": [30], "rejected_ids": [31, 32, 33, 34], "index": 1},
    {"prompt_ids": [50], "chosen_ids": [51, 52, 53, 54, 55], "rejected_ids": [56], "index": 2},
]


def full_logits_logps(model, feats):
    """The obvious path: padded batch -> model(...).logits -> logps_from_logits."""
    b = collate(feats, layout="padded", pad_token_id=0)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return logps_from_logits(logits, b["labels"])


def param_grads(model, logps):
    """Gradients of a loss that weighs each response differently."""
    model.zero_grad()
    w = torch.linspace(-1.0, 2.0, logps.numel())
    (logps * w).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_logps_from_logits_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 6, 1, 2, 0]])  # row 0: prompt 2 + pad 1
    logps, counts = logps_from_logits(logits, labels)
    expected = []
    for n in range(2):
        total = 0.0
        for t in range(4):
            y = int(labels[n, t + 1])
            if y != -100:
                row = logits[n, t].tolist()
                total += row[y] - math.log(sum(math.exp(v) for v in row))
        expected.append(total)
    assert torch.allclose(logps, torch.tensor(expected), atol=1e-5)
    assert counts.tolist() == [2, 4]
    mean, _ = logps_from_logits(logits, labels, average=True)
    assert torch.allclose(mean, torch.tensor(expected) / torch.tensor([2.0, 4.0]))
    logps.sum().backward()
    g = logits.grad.abs().sum(-1)  # (2, 5): only positions whose next label is a completion token
    assert g[0].nonzero().view(-1).tolist() == [1, 2] and g[1].nonzero().view(-1).tolist() == [0, 1, 2, 3]
    low, _ = logps_from_logits(logits.detach().bfloat16(), labels)
    assert low.dtype == torch.float32 and torch.allclose(low, logps.detach(), atol=0.1)


def dense_token_logps(h, W, b, targets, scale=None, softcap=None):
    z = h.float() @ W.float().T + (0 if b is None else b)
    z = z * scale if scale is not None else z
    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
    return F.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("transform", [{}, {"scale": 0.7, "softcap": 3.0}])
@pytest.mark.parametrize("chunk_size", [1, 5, 17, 64])
def test_chunked_head_matches_dense(chunk_size, transform):
    torch.manual_seed(1)
    R, T, H, Vs, S = 2, 11, 8, 13, 3
    hidden = torch.randn(R, T, H, requires_grad=True)
    W = torch.randn(Vs, H, requires_grad=True)
    bias = torch.randn(Vs, requires_grad=True)
    positions = torch.tensor([0, 3, 3, 4, 9, 12, 13, 14, 20, 21, 5])  # K=11, a repeated index
    targets = torch.randint(0, Vs, (positions.numel(),))
    segments = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1])
    scale, softcap = transform.get("scale"), transform.get("softcap")
    logps, counts = sequence_logps(hidden, W, positions, targets, segments, S, lm_head_bias=bias,
                                   chunk_size=chunk_size, logit_scale=scale, logit_softcap=softcap)
    tok = dense_token_logps(hidden.view(-1, H)[positions], W, bias, targets, scale, softcap)
    ref = torch.zeros(S).index_add(0, segments, tok)
    assert logps.dtype == torch.float32 and counts.tolist() == [3, 4, 4]
    assert torch.allclose(logps, ref, atol=1e-5)
    w = torch.tensor([1.0, -2.0, 0.5])
    got = torch.autograd.grad((logps * w).sum(), (hidden, W, bias))
    want = torch.autograd.grad((ref * w).sum(), (hidden, W, bias))
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-5)
    # the head saw only gathered positions: every other hidden row has zero gradient
    touched = torch.zeros(R * T, dtype=torch.bool)
    touched[positions] = True
    assert got[0].view(-1, H)[~touched].abs().max() == 0


def test_chunked_head_without_completion_tokens_gives_zero_gradients():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    W = torch.randn(13, 8, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    logps, counts = sequence_logps(hidden, W, empty, empty, empty, 2, chunk_size=4)
    assert logps.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    gh, gw = torch.autograd.grad(logps.sum(), (hidden, W))
    assert gh.abs().max() == 0 and gw.shape == W.shape and gw.abs().max() == 0


def test_chunked_head_saves_no_tokens_by_vocab_tensor():
    torch.manual_seed(2)
    K, H, Vs = 64, 8, 500
    hidden = torch.randn(K, H, requires_grad=True)
    W = torch.randn(Vs, H, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = sequence_logps(hidden, W, torch.arange(K), torch.randint(0, Vs, (K,)),
                                  torch.zeros(K, dtype=torch.long), 1, chunk_size=16)
    assert sizes and max(sizes) < K * Vs  # the dense path would save a (K, V) log-softmax
    logps.backward()
    assert hidden.grad is not None and W.grad is not None
    # the same hook on the dense twin does catch a (K, V) tensor, so the check can fail
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_token_logps(hidden, W, None, torch.zeros(K, dtype=torch.long))
    assert max(sizes) >= K * Vs


def test_head_module_fallback_and_low_precision():
    torch.manual_seed(3)
    K, H, Vs = 9, 8, 20
    hidden = torch.randn(K, H, requires_grad=True)
    head = torch.nn.Linear(H, Vs)
    args = (torch.arange(K), torch.randint(0, Vs, (K,)), torch.tensor([0, 1] * 4 + [0]), 2)
    a, _ = sequence_logps(hidden, head.weight, *args, lm_head_bias=head.bias, chunk_size=4)
    b, _ = sequence_logps(hidden, None, *args, head_module=head, chunk_size=4)
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.sum(), (hidden, head.weight))
    gb = torch.autograd.grad(b.sum(), (hidden, head.weight))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), head.weight.detach().bfloat16().requires_grad_()
    c, _ = sequence_logps(h16, w16, *args, chunk_size=4)
    assert c.dtype == torch.float32
    c.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def model():
    return tiny_model(V, seed=0).eval()


def test_layouts_equal_full_logits_values_and_grads(model):
    ref, ref_counts = full_logits_logps(model, FEATS)
    ref_grads = param_grads(model, ref)
    assert ref_counts.tolist() == [3, 1, 5, 2, 4, 1]
    for layout in ("padded", "packed", "prefix"):
        batch = collate(FEATS, layout=layout, pad_token_id=0, pad_to_multiple_of=8)
        out = model_logps(model, batch, chunk_size=4)
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        assert torch.allclose(logps, ref, atol=1e-5), layout
        assert torch.cat([out.chosen_lengths, out.rejected_lengths]).tolist() == ref_counts.tolist()
        grads = param_grads(model, logps)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], atol=1e-5), (layout, name)


def test_average_nll_and_inference_mode(model):
    batch = collate(FEATS, layout="packed", pad_token_id=0)
    summed = model_logps(model, batch)
    mean = model_logps(model, batch, average=True)
    lengths = summed.chosen_lengths.float()
    assert torch.allclose(mean.chosen_logps, summed.chosen_logps / lengths)
    assert torch.allclose(summed.chosen_nll, -summed.chosen_logps / lengths)
    with torch.inference_mode():
        again = model_logps(model, batch)
    assert torch.allclose(again.rejected_logps, summed.rejected_logps.detach())


def test_tied_embeddings_and_eager_prefix():
    tied = tiny_model(V, seed=4, tie_word_embeddings=True).eval()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    ref, _ = full_logits_logps(tied, FEATS)
    ref_grads = param_grads(tied, ref)
    out = model_logps(tied, collate(FEATS, layout="prefix", pad_token_id=0), chunk_size=2)
    logps = torch.cat([out.chosen_logps, out.rejected_logps])
    assert torch.allclose(logps, ref, atol=1e-5)
    grads = param_grads(tied, logps)
    assert torch.allclose(grads["model.embed_tokens.weight"], ref_grads["model.embed_tokens.weight"], atol=1e-5)
    tied.config._attn_implementation = "eager"  # the bool prefix mask becomes an additive float mask
    eager = model_logps(tied, collate(FEATS, layout="prefix", pad_token_id=0))
    assert torch.allclose(eager.rejected_logps, out.rejected_logps, atol=1e-5)
    packed = model_logps(tied, collate(FEATS, layout="packed", pad_token_id=0))  # eager builds the block mask too
    assert torch.allclose(packed.chosen_logps, out.chosen_logps, atol=1e-5)
    tied.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prefix layout"):
        model_logps(tied, collate(FEATS, layout="prefix", pad_token_id=0))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_model_matches_full_logits(targets):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(V, seed=5)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False))
    peft_model.eval()
    ref, _ = full_logits_logps(peft_model, FEATS)
    ref_grads = param_grads(peft_model, ref)
    assert ref_grads and all("lora_" in n for n in ref_grads)  # only adapters train
    out = model_logps(peft_model, collate(FEATS, layout="packed", pad_token_id=0), chunk_size=3)
    logps = torch.cat([out.chosen_logps, out.rejected_logps])
    assert torch.allclose(logps, ref, atol=1e-5)
    grads = param_grads(peft_model, logps)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5) for n in grads)


def test_bf16_model_gives_float32():
    m = tiny_model(V, seed=6).eval().to(torch.bfloat16)
    out = model_logps(m, collate(FEATS, layout="packed", pad_token_id=0))
    assert out.chosen_logps.dtype == torch.float32 and out.chosen_nll.dtype == torch.float32
    ref, _ = full_logits_logps(m, FEATS)
    assert torch.allclose(torch.cat([out.chosen_logps, out.rejected_logps]), ref, atol=0.1)


def test_logit_softcapping_config_is_honored(model):
    batch = collate(FEATS, layout="padded", pad_token_id=0)
    plain = model_logps(model, batch)
    model.config.final_logit_softcapping = 2.0
    try:
        capped = model_logps(model, batch)
    finally:
        del model.config.final_logit_softcapping
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref, _ = logps_from_logits(2.0 * torch.tanh(logits / 2.0), batch["labels"])
    assert torch.allclose(torch.cat([capped.chosen_logps, capped.rejected_logps]), ref, atol=1e-5)
    assert not torch.allclose(capped.chosen_logps, plain.chosen_logps)
    model.config.lm_head_multiplier = 2.0  # a logit rescaling the chunked head does not reproduce
    try:
        with pytest.raises(NotImplementedError, match="lm_head_multiplier"):
            model_logps(model, batch)
    finally:
        del model.config.lm_head_multiplier


def test_fsdp2_wrapped_head_takes_the_plain_path():
    """FSDP2 swaps lm_head's class for FSDPLinear (a Linear subclass with Linear's forward).

    accelerate puts [final norm, lm_head] in one FSDP2 unit; calling lm_head alone, chunk by chunk,
    makes that unit re-shard the norm's weight before the norm's own backward reads it (a use after
    free: SIGSEGV on CPU, an asynchronous illegal memory access on CUDA). The head must be used
    through its weight, never called as a module."""
    from torch.distributed.fsdp import FSDPModule

    model = tiny_model(V, seed=5)
    batch = collate(FEATS, layout="padded", pad_token_id=0)
    want = model_logps(model, batch, chunk_size=2)
    model.lm_head.__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    got = model_logps(model, batch, chunk_size=2)
    assert calls == [1]  # the model's own forward with logits_to_keep = nothing; no per-chunk calls
    assert torch.equal(got.chosen_logps, want.chosen_logps) and torch.equal(got.rejected_logps, want.rejected_logps)


def test_auto_chunk_size_bounds_one_chunk_of_float32_logits():
    from preftune.logps import auto_chunk_size

    assert auto_chunk_size(300) == auto_chunk_size(49152) == auto_chunk_size(131072) == 1024
    assert auto_chunk_size(151936) == 512  # Qwen2
    assert auto_chunk_size(262144) == 512 and auto_chunk_size(10**7) == 64
    for v in (49152, 128256, 151936, 262144):
        assert auto_chunk_size(v) * v * 4 <= 512 * 2**20


def test_automatic_chunk_equals_an_explicit_one(model):
    batch = collate(FEATS, layout="prefix", pad_token_id=0)
    a, b = model_logps(model, batch), model_logps(model, batch, chunk_size=1024)
    assert torch.equal(a.chosen_logps, b.chosen_logps) and torch.equal(a.rejected_logps, b.rejected_logps)


def test_attention_kernels_keep_cudnn_off_on_a_gpu_only_when_asked():
    from preftune.logps import attention_kernels

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    with attention_kernels(torch.device("cuda"), cudnn=False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    for device, cudnn in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        with attention_kernels(device, cudnn=cudnn):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before


def test_gpu_grouped_kv_only_where_cudnn_takes_them(monkeypatch):
    """On a GPU with cuDNN, K/V heads go to SDPA grouped only when torch says cuDNN takes them with a
    mask for the model's heads (else SDPA would fall to the math kernel); never without cuDNN."""
    import preftune.logps as L

    answers = []
    monkeypatch.setattr(L, "_cudnn_takes_grouped_kv", lambda index, heads, dtype: answers.append(heads) or ok)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    cuda = torch.device("cuda", 0)
    for ok, heads, cudnn, want in ((True, (14, 2, 64), True, "1"), (False, (14, 2, 64), True, None),
                                   (True, (8, 8, 64), True, None), (True, None, True, None)):
        with L.attention_kernels(cuda, cudnn, heads):
            assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == want, (ok, heads)
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    assert answers == [(14, 2, 64), (14, 2, 64)]  # asked only for grouped heads
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")  # the user's choice stands
    ok = True
    with L.attention_kernels(cuda, True, (14, 2, 64)):
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"


@pytest.mark.parametrize("user", [None, "0", "1"])
def test_sdpa_grouped_kv_set_explicitly_holds_on_every_device_and_is_restored(monkeypatch, user):
    """sdpa_grouped_kv=True / False sets TRANSFORMERS_SDPA_FORCE_GQA to "1" / "0" inside the context,
    on CPU and on a GPU with or without cuDNN, over a value the user set; after, it is as before."""
    import preftune.logps as L

    monkeypatch.setattr(L, "_cudnn_takes_grouped_kv", lambda index, heads, dtype: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    if user is None:
        monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    else:
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", user)
    for device, cudnn in ((torch.device("cpu"), False), (torch.device("cuda", 0), True),
                          (torch.device("cuda", 0), False)):
        for grouped, want in ((True, "1"), (False, "0")):
            with L.attention_kernels(device, cudnn, (14, 2, 64), grouped_kv=grouped):
                assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == want, (device, cudnn, grouped)
            assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == user
        with L.attention_kernels(device, cudnn, (14, 2, 64)):  # automatic: the user's value stands
            if user is not None:
                assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == user
        assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == user


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_cudnn_grouped_kv_heads_give_the_repeated_heads_values():
    """Where cuDNN takes grouped K/V heads with the prefix mask: the same log-probs and gradients as the
    repeated heads, in bfloat16."""
    import preftune.logps as L

    model = tiny_model(seed=4).cuda().to(torch.bfloat16)
    cfg = model.config
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    index = torch.cuda.current_device()
    if not L._cudnn_takes_grouped_kv(index, heads, torch.bfloat16):
        pytest.skip("this torch/cuDNN does not take grouped K/V heads with a mask")
    batch = collate(FEATS, layout="prefix", pad_token_id=0, pad_to_multiple_of=64, device="cuda")
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((k.shape[1], kw.get("enable_gqa", False)))
        return real(q, k, v, *a, **kw)

    def run():
        model.zero_grad(set_to_none=True)
        out = model_logps(model, batch)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        return out, {n: p.grad.float().clone() for n, p in model.named_parameters()}

    with mock.patch.object(F, "scaled_dot_product_attention", spy):
        with L.attention_kernels(torch.device("cuda"), True):
            plain = run()
        assert set(seen) == {(heads[0], False)}
        seen.clear()
        with L.attention_kernels(torch.device("cuda"), True, heads, torch.bfloat16):
            grouped = run()
        assert set(seen) == {(heads[1], True)}
    for a, b in ((grouped[0].chosen_logps, plain[0].chosen_logps), (grouped[0].rejected_logps, plain[0].rejected_logps)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    for name, g in plain[1].items():
        torch.testing.assert_close(grouped[1][name], g, rtol=5e-2, atol=5e-2 * float(g.abs().max()), msg=name)


def test_cpu_attention_runs_on_grouped_kv_heads_with_the_same_values(model):
    """Inside attention_kernels on CPU, SDPA gets the K/V heads unrepeated (enable_gqa) and gives
    the same log-probs and gradients as the repeated heads outside it."""
    from preftune.logps import attention_kernels

    assert model.config.num_key_value_heads < model.config.num_attention_heads
    batch = collate(FEATS, layout="prefix", pad_token_id=0)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return real(q, k, v, *a, **kw)

    def run():
        model.zero_grad(set_to_none=True)
        out = model_logps(model, batch)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    with mock.patch.object(F, "scaled_dot_product_attention", spy):
        plain = run()
        assert {s[2] for s in seen} == {False} and {s[1] for s in seen} == {model.config.num_attention_heads}
        seen.clear()
        with attention_kernels(torch.device("cpu")):
            grouped = run()
        assert {s[2] for s in seen} == {True} and {s[1] for s in seen} == {model.config.num_key_value_heads}
        seen.clear()
        with attention_kernels(torch.device("cpu"), grouped_kv=False):  # sdpa_grouped_kv=False: repeated
            repeated = run()
        assert {s[2] for s in seen} == {False} and {s[1] for s in seen} == {model.config.num_attention_heads}
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    assert torch.equal(repeated[0].chosen_logps, plain[0].chosen_logps)
    torch.testing.assert_close(grouped[0].chosen_logps, plain[0].chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[0].rejected_logps, plain[0].rejected_logps, rtol=1e-5, atol=1e-5)
    for name, g in plain[1].items():
        torch.testing.assert_close(grouped[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_prefix_mask_is_made_once_as_the_additive_mask_sdpa_would_make(model, device):
    """The prefix layout's bool mask becomes one additive float mask per forward, read by every layer
    (SDPA made one per layer from the bool mask and the backward kept each): the same values and
    gradients. On a GPU in bfloat16, where SDPA may take cuDNN's kernel."""
    import copy

    import preftune.logps as L

    net = model if device == "cpu" else copy.deepcopy(model).to(device, torch.bfloat16)
    dtype = next(net.parameters()).dtype
    batch = collate(FEATS, layout="prefix", pad_token_id=0, device=device)
    masks = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    def run():
        net.zero_grad(set_to_none=True)
        masks.clear()
        with mock.patch.object(F, "scaled_dot_product_attention", spy):
            out = model_logps(net, batch)
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        return out, {n: p.grad.clone() for n, p in net.named_parameters()}

    made = run()
    assert len(masks) == net.config.num_hidden_layers
    assert {m.dtype for m in masks} == {dtype}
    assert len({m.untyped_storage().data_ptr() for m in masks}) == 1
    with mock.patch.object(L, "_attention_mask_for", lambda mask, impl, dtype: mask):  # the bool mask as it is
        bool_mask = run()
    assert {m.dtype for m in masks} == {torch.bool}
    assert torch.equal(made[0].chosen_logps, bool_mask[0].chosen_logps)
    assert torch.equal(made[0].rejected_logps, bool_mask[0].rejected_logps)
    for name, g in bool_mask[1].items():
        if device == "cpu":
            assert torch.equal(made[1][name], g), name
        else:  # cuDNN's attention backward may sum in another order from run to run
            torch.testing.assert_close(made[1][name], g, msg=name)


def test_in_place_logsumexp_equals_torch():
    from preftune.logps import _logsumexp_

    torch.manual_seed(0)
    z = torch.randn(37, 1000) * 30
    z[3, :500] = float("-inf")
    z[5] = float("-inf")  # a row with no mass: -inf, as torch gives
    want = torch.logsumexp(z, dim=1)
    got = _logsumexp_(z.clone())[0]
    assert torch.equal(got, want)
    assert got[5] == float("-inf")


def test_one_chunk_keeps_its_softmax_and_a_second_backward_recomputes():
    torch.manual_seed(3)
    K, H, Vs = 12, 8, 50
    hidden = torch.randn(K, H, requires_grad=True)
    W = torch.randn(Vs, H, requires_grad=True)
    targets, seg = torch.randint(0, Vs, (K,)), torch.arange(K) % 3
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    grads = {}
    for chunk in (K, 5):  # one chunk: softmax kept; three chunks: recomputed in backward
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps, _ = sequence_logps(hidden, W, torch.arange(K), targets, seg, 3, chunk_size=chunk)
        assert (K * Vs in sizes) is (chunk == K)
        loss = (logps * torch.tensor([1.0, -2.0, 0.5])).sum()
        first = torch.autograd.grad(loss, (hidden, W), retain_graph=True)
        second = torch.autograd.grad(loss, (hidden, W))  # the kept buffer was used up: recomputed
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        grads[chunk] = first
    for a, b in zip(grads[K], grads[5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # nothing kept without autograd
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sequence_logps(hidden, W, torch.arange(K), targets, seg, 3, chunk_size=K)
        assert K * Vs not in sizes


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_weight_gradient_accumulates_in_float32(device, dtype):
    """The head's weight gradient over chunks (``_add_weight_grad``; on a GPU in bfloat16 the matmul
    accumulates into the float32 sum itself) equals the float32 sum of the chunk products."""
    from preftune.logps import _add_weight_grad

    torch.manual_seed(0)
    chunks = [(torch.randn(5, 40, device=device).to(dtype), torch.randn(5, 8, device=device).to(dtype)) for _ in range(3)]
    grad_w = None
    for dz, hc in chunks:
        grad_w = _add_weight_grad(grad_w, dz, hc)
    want = sum(dz.double().T @ hc.double() for dz, hc in chunks)
    assert grad_w.dtype == torch.float32 and grad_w.shape == (40, 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grad_w.double(), want, rtol=tol, atol=tol)


class _BigTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Distinct storages of op outputs of one shape (ops run while the mode is on)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ptrs = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.ptrs.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("layout", ["padded", "prefix"])
def test_tied_embedding_adds_its_rows_into_the_head_gradient(layout, device, monkeypatch):
    """The input embedding of a tied weight puts its rows into the head's (V, H) gradient instead of a
    (V, H) gradient of its own: same values, gradients equal to float rounding (the rows summed in
    another order), pad rows (padding_idx) untouched as F.embedding's backward leaves them, and one
    (V, H) buffer in backward instead of two or three."""
    from preftune import logps as lp

    tied = tiny_model(V, seed=5, tie_word_embeddings=True, pad_token_id=0).to(device)
    embed = tied.get_input_embeddings()
    assert embed.padding_idx == 0 and lp._tied_embedding(tied, tied.get_output_embeddings()) is embed
    feats = [dict(f, prompt_ids=[0, *f["prompt_ids"]]) for f in FEATS]  # the pad id inside a prompt too
    batch = collate(feats, layout=layout, pad_token_id=0, pad_to_multiple_of=8)
    runs = {}
    applied = []
    real = lp._TiedEmbedding.apply
    monkeypatch.setattr(lp._TiedEmbedding, "apply", lambda *a: applied.append(1) or real(*a))
    for on in (False, True):
        assert lp.use_tied_embedding_grad(tied, on)
        applied.clear()
        out = model_logps(tied, batch, chunk_size=4)
        assert bool(applied) is on  # off: the embedding's own forward, autograd's own (V, H) gradient
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        tied.zero_grad()
        with _BigTensors(embed.weight.shape) as big:
            (logps * torch.linspace(-1.0, 2.0, logps.numel(), device=device)).sum().backward()
        runs[on] = (logps.detach(), {n: p.grad.clone() for n, p in tied.named_parameters()}, len(big.ptrs))
        assert "forward" not in vars(embed)  # the module's own forward is back
    (ref, ref_grads, ref_big), (got, grads, got_big) = runs[False], runs[True]
    assert torch.equal(got, ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # the pad row holds the head's part only on both paths (the dense one zeroes padding_idx), bit for bit
    assert torch.equal(grads["model.embed_tokens.weight"][0], ref_grads["model.embed_tokens.weight"][0])
    assert got_big == 1 and ref_big >= 2


def test_tied_embedding_grad_is_chosen_per_model_by_the_config(monkeypatch):
    """``tied_embedding_grad`` reaches model_logps through the model's head (policy.mark_head, which the
    policy's set-up calls); a model never marked takes the tied path."""
    from preftune import logps as lp
    from preftune.config import DPOConfig
    from preftune.policy import _adapt, mark_head

    applied = []
    real = lp._TiedEmbedding.apply
    monkeypatch.setattr(lp._TiedEmbedding, "apply", lambda *a: applied.append(1) or real(*a))
    batch = collate(FEATS, layout="prefix", pad_token_id=0)
    for marked in (None, True, False):
        tied = tiny_model(V, seed=5, tie_word_embeddings=True)
        if marked is not None:
            _adapt(tied, DPOConfig(tied_embedding_grad=marked, fused_layers=False), None, torch.device("cpu"))
        applied.clear()
        model_logps(tied, batch)
        assert bool(applied) is (marked is not False), marked
    ref = tiny_model(V, seed=5, tie_word_embeddings=True)
    mark_head(ref, DPOConfig(tied_embedding_grad=False, triton_kernels=False))
    head = ref.get_output_embeddings()
    assert getattr(head, lp.TIED_EMBEDDING_GRAD) is False and getattr(head, lp.TRITON_HEAD) is False


def test_tied_embedding_path_is_left_where_it_does_not_apply():
    from preftune import logps as lp

    untied = tiny_model(V, seed=5)
    assert lp._tied_embedding(untied, untied.get_output_embeddings()) is None
    tied = tiny_model(V, seed=5, tie_word_embeddings=True)
    head = tied.get_output_embeddings()
    tied.get_input_embeddings().weight.requires_grad_(False)  # frozen: no gradient to route
    assert lp._tied_embedding(tied, head) is None
    tied.get_input_embeddings().weight.requires_grad_(True)
    tied.get_input_embeddings().forward = lambda ids: None  # someone else's patched forward stays theirs
    assert lp._tied_embedding(tied, head) is None


# --------------------------------------------------------------------------------------------------
# Per-token log-probs (model_token_logps) and what is built on them
# --------------------------------------------------------------------------------------------------
def plain_token_values(model, feats, *, softcap=None, temperature=None):
    """The obvious path per token: padded batch -> full logits -> (softcap) -> / temperature, then
    each response's completion tokens left-aligned in (R, T_max) rows: (logps (differentiable),
    entropies (torch.distributions.Categorical), log sum_v p_v^2 (float64 softmax), mask)."""
    b = collate(feats, layout="padded", pad_token_id=0)
    z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()  # (R, T-1, V)
    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
    z = z / temperature if temperature is not None else z
    labels = b["labels"][:, 1:]
    mask = labels != -100  # (R, T-1)
    logp = F.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ent = torch.distributions.Categorical(logits=z.detach()).entropy()
    lss = torch.softmax(z.detach().double(), -1).pow(2).sum(-1).log().float()
    lengths = mask.sum(1)
    rows = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (R, T_max)

    def left(v):
        return torch.zeros(rows.shape, dtype=v.dtype).masked_scatter(rows, v[mask])

    return left(logp), left(ent), left(lss), rows


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", [None, 0.7])
@pytest.mark.parametrize("layout", ["padded", "packed", "prefix", "prefix_packed"])
def test_token_logps_entropies_and_sum_sq_match_full_logits(model, layout, temperature):
    """Per token, every layout: log-probs, entropies and log sum_v p_v^2 (at a temperature too) equal
    the full-logits twin's, the per-response sums equal model_logps' bit for bit, and the gradients of a
    per-token weighted loss equal the twin's."""
    want_lp, want_ent, want_lss, want_mask = plain_token_values(model, FEATS, temperature=temperature)
    weights = torch.linspace(-1.0, 2.0, want_lp.numel()).view(want_lp.shape)  # a different weight per token
    want_grads = grads_of(model, (want_lp * weights).sum())
    batch = collate(FEATS, layout=layout, pad_token_id=0, pad_to_multiple_of=None if layout == "prefix_packed" else 8)
    tok = model_token_logps(model, batch, chunk_size=4, temperature=temperature, entropies=True, sum_sq_probs=True)
    assert tok.logps.shape == tok.segments.shape == tok.entropies.shape == tok.log_sum_sq_probs.shape
    assert tok.lengths.tolist() == [3, 1, 5, 2, 4, 1]
    assert not tok.entropies.requires_grad and not tok.log_sum_sq_probs.requires_grad
    got_lp, got_mask = tok.padded()
    assert torch.equal(got_mask, want_mask)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.padded(tok.entropies)[0], want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.padded(tok.log_sum_sq_probs)[0], want_lss, rtol=1e-5, atol=1e-5)
    got_grads = grads_of(model, (got_lp * weights).sum())
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    if temperature is None:
        with torch.no_grad():
            sums = model_token_logps(model, batch, chunk_size=4).sums()
            out = model_logps(model, batch, chunk_size=4)
        assert torch.equal(sums, torch.cat([out.chosen_logps, out.rejected_logps]))


def test_temperature_divides_the_soft_capped_logits(model):
    """The temperature divides the logits after the config's soft-capping (and scale), as the model's own
    logits would be divided; not the logits before the cap. 1 is no temperature; others are refused."""
    batch = collate(FEATS, layout="prefix", pad_token_id=0)
    plain = model_token_logps(model, batch, chunk_size=4)
    same = model_token_logps(model, batch, chunk_size=4, temperature=1)
    assert torch.equal(plain.logps, same.logps)
    model.config.final_logit_softcapping = 0.1  # at the logits' own size, so the cap bends them
    try:
        got = model_token_logps(model, batch, chunk_size=4, temperature=0.5).padded()[0]
        want, _, _, _ = plain_token_values(model, FEATS, softcap=0.1, temperature=0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the other order, the cap over the divided logits: 0.1 tanh((z / 0.5) / 0.1) = 0.05 tanh(z / 0.05) / 0.5
        other, _, _, _ = plain_token_values(model, FEATS, softcap=0.05, temperature=0.5)
        assert (got - other).abs().max() > 1e-3
        for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
            with pytest.raises(ValueError, match="temperature"):
                model_token_logps(model, batch, temperature=bad)
    finally:
        del model.config.final_logit_softcapping


def dense_stats(h, W, b, scale=None, softcap=None):
    """(entropies, log sum_v p_v^2) of the dense logits, float64."""
    z = (h.double() @ W.double().T + (0 if b is None else b.double()))
    z = z * scale if scale is not None else z
    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
    p = torch.softmax(z, -1)
    return -(p * torch.log_softmax(z, -1)).sum(-1), p.pow(2).sum(-1).log()


@pytest.mark.parametrize("transform", [{}, {"scale": 0.7, "softcap": 3.0}])
@pytest.mark.parametrize("chunk_size", [1, 5, 11])  # 11 = K: one chunk, whose softmax is kept without softcap
def test_head_token_stats_match_dense_and_leave_the_logps_alone(chunk_size, transform):
    """The chunked head's entropies and log sum p^2 equal the dense ones; asking for them changes neither
    the log-probs nor their gradients, and saves no (K, V) tensor; the module-head fallback agrees."""
    torch.manual_seed(1)
    K, H, Vs = 11, 8, 300
    h = (3 * torch.randn(K, H)).requires_grad_()
    head = torch.nn.Linear(H, Vs)
    targets = torch.randint(0, Vs, (K,))
    kw = dict(chunk_size=chunk_size, logit_scale=transform.get("scale"), logit_softcap=transform.get("softcap"))
    args = (h, head.weight, torch.arange(K), targets)
    plain, none_e, none_s = head_token_logps(*args, lm_head_bias=head.bias, **kw)
    assert none_e is None and none_s is None
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent, lss = head_token_logps(*args, lm_head_bias=head.bias, entropies=True, sum_sq_probs=True, **kw)
    assert chunk_size == K or max(sizes) < K * Vs
    want_ent, want_lss = dense_stats(h.detach(), head.weight.detach(), head.bias.detach(), *transform.values())
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lss.double(), want_lss, rtol=1e-5, atol=1e-5)
    assert torch.equal(lp, plain) and not ent.requires_grad and not lss.requires_grad
    w = torch.linspace(-1, 1, K)
    for a, b in zip(torch.autograd.grad((lp * w).sum(), (h, head.weight)),
                    torch.autograd.grad((plain * w).sum(), (h, head.weight))):
        assert torch.equal(a, b)
    only_lss = head_token_logps(*args, lm_head_bias=head.bias, sum_sq_probs=True, **kw)
    assert only_lss[1] is None and torch.equal(only_lss[2], lss)
    mod = head_token_logps(h, None, torch.arange(K), targets, head_module=head, entropies=True, sum_sq_probs=True, **kw)
    for a, b in zip(mod, (lp, ent, lss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_token_logps_padded_view_by_hand():
    """Tokens in the prefix layouts' order (pair by pair: chosen, then rejected) regroup per response."""
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], requires_grad=True)
    tok = TokenLogps(values, segments=torch.tensor([0, 0, 2, 1, 1, 1, 3]), lengths=torch.tensor([2, 3, 1, 1]))
    assert tok.ranks().tolist() == [0, 1, 0, 0, 1, 2, 0]
    rows, mask = tok.padded(fill=-9.0)
    assert rows.tolist() == [[1, 2, -9], [4, 5, 6], [3, -9, -9], [7, -9, -9]]
    assert mask.tolist() == [[True, True, False], [True, True, True], [True, False, False], [True, False, False]]
    assert tok.sums().tolist() == [3.0, 15.0, 3.0, 7.0]
    (rows * mask * torch.arange(1.0, 4.0)).sum().backward()  # the weight of each token's rank
    assert values.grad.tolist() == [1.0, 2.0, 1.0, 1.0, 2.0, 3.0, 1.0]


@pytest.mark.parametrize("layout", ["padded", "prefix"])
def test_pair_logps_ld_dpo_and_wpo_match_the_formulas(model, layout):
    """model_pair_logps: the plain fields are model_logps' bit for bit; LD-DPO's sums (weight 1 on the
    first min(|y_w|, |y_l|) completion tokens, ld_alpha after) and WPO's weights (exp of the mean of
    log p_t - log sum_v p_v^2 over each response, summed over the pair, not capped) equal a loop over
    the full-logits twin's tokens, LD-DPO's sums with its gradients."""
    alpha, B = 0.3, len(FEATS)
    lp, _, lss, mask = plain_token_values(model, FEATS)
    lengths = mask.sum(1).tolist()
    want_ld, want_w = [], []
    for r in range(2 * B):
        public = min(lengths[r % B], lengths[(r % B) + B])
        want_ld.append(sum(lp[r, t] * (1.0 if t < public else alpha) for t in range(lengths[r])))
    for i in range(B):
        a = sum(float(lp[r, t].detach() - lss[r, t]) / lengths[r] for r in (i, B + i) for t in range(lengths[r]))
        want_w.append(math.exp(a))
    want_ld = torch.stack(want_ld)
    want_grads = grads_of(model, (want_ld * torch.linspace(-1.0, 2.0, 2 * B)).sum())

    batch = collate(FEATS, layout=layout, pad_token_id=0)
    out = model_pair_logps(model, batch, chunk_size=4, ld_alpha=alpha, wpo=True)
    with torch.no_grad():
        plain = model_logps(model, batch, chunk_size=4)
    for name in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "chosen_nll"):
        assert torch.equal(getattr(out, name).detach(), getattr(plain, name)), name
    assert plain.ld_chosen_logps is None and plain.wpo_weights is None
    got_ld = torch.cat([out.ld_chosen_logps, out.ld_rejected_logps])
    torch.testing.assert_close(got_ld, want_ld, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_ld, torch.cat([out.chosen_logps, out.rejected_logps]))  # alpha did something
    assert out.wpo_weights.shape == (B,) and not out.wpo_weights.requires_grad
    torch.testing.assert_close(out.wpo_weights.double(), torch.tensor(want_w, dtype=torch.float64), rtol=1e-5, atol=0)
    got_grads = grads_of(model, (got_ld * torch.linspace(-1.0, 2.0, 2 * B)).sum())
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    mean = model_pair_logps(model, batch, chunk_size=4, ld_alpha=alpha, average=True)
    torch.testing.assert_close(mean.ld_chosen_logps, out.ld_chosen_logps / out.chosen_lengths)
    same = model_pair_logps(model, batch, chunk_size=4, ld_alpha=1.0)
    torch.testing.assert_close(same.ld_rejected_logps, out.rejected_logps)
    with pytest.raises(ValueError, match="ld_alpha"):
        model_pair_logps(model, batch, ld_alpha=1.5)


def test_wpo_weight_is_not_capped_at_one():
    """A response the model prefers (p_t above sum_v p_v^2 at every token) weighs more than 1, as in TRL:
    the chunked head's log sum p^2 through wpo_weights."""
    torch.manual_seed(2)
    K, H, Vs = 6, 8, 50
    h, W = torch.randn(K, H), torch.randn(Vs, H)
    likely = (h @ W.T).argmax(1)  # each token the model's most likely one
    lp, _, lss = head_token_logps(h, W, torch.arange(K), likely, sum_sq_probs=True, chunk_size=4)
    tok = TokenLogps(lp, segments=torch.tensor([0, 0, 0, 1, 1, 1]), lengths=torch.tensor([3, 3]))
    (values, mask), (norm, _) = tok.padded(), tok.padded(lss)
    w = wpo_weights(values[:1], values[1:], norm[:1], norm[1:], mask[:1], mask[1:])
    assert float(w) > 1.0
    assert float(w) == pytest.approx(math.exp(float((lp - lss).view(2, 3).mean(1).sum())), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_head_gives_the_eager_token_stats(dtype, monkeypatch):
    """With the head's Triton kernels (compiled on a GPU, Triton's interpreter on CPU), at a temperature
    and with soft-capping: the eager chunked head's per-token log-probs, entropies and log sum p^2."""
    pytest.importorskip("triton")
    from preftune import kernels
    from preftune import logps as L

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not kernels.INTERPRETED:
        pytest.skip("no GPU, and Triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    monkeypatch.setattr(kernels, "usable", lambda *tensors: all(t.device.type == device for t in tensors))
    model = tiny_model(V, seed=3).to(device, dtype)
    model.config.final_logit_softcapping = 0.2
    batch = collate(FEATS, layout="prefix", pad_token_id=0, device=device)
    calls = []
    real = kernels.head_logps_forward
    monkeypatch.setattr(kernels, "head_logps_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for on in (False, True):
        L.use_triton_head(model, on)
        with torch.no_grad():
            tok = model_token_logps(model, batch, chunk_size=4, temperature=0.6, entropies=True, sum_sq_probs=True)
        runs.append((tok.logps, tok.entropies, tok.log_sum_sq_probs))
        assert bool(calls) is on
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
