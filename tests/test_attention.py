"""preftune.attention: the prefix_packed layout's variable-length attention.

The twins: the ``prefix`` layout's (R, 1, T, T) mask under plain SDPA (and, through
``test_equivalence.py``, which covers every layout, the plain full-logits path). On CPU the
attention runs ``per_sequence``; on a GPU in bfloat16 flash's variable-length kernel, held to the
masked attention and to ``per_sequence`` within bfloat16 rounding.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from preftune import attention
from preftune.config import ConfigError, DPOConfig
from preftune.data.batching import collate
from preftune.logps import model_logps
from preftune.models import set_activation_checkpointing
from preftune.testing import tiny_model

ON_GPU = torch.cuda.is_available()


def feats(n=4, seed=0, vocab=60):
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]

    return [dict(prompt_ids=ids(1, 9), chosen_ids=ids(1, 6), rejected_ids=ids(1, 6), index=i) for i in range(n)]


def test_collate_by_hand():
    f = [dict(prompt_ids=[5, 6], chosen_ids=[7], rejected_ids=[8, 9], index=0),
         dict(prompt_ids=[10], chosen_ids=[11, 12], rejected_ids=[13], index=1)]  # fmt: skip
    b = collate(f, layout="prefix_packed", pad_token_id=0, pad_to_multiple_of=64)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]  # no padding, rows not rounded
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    assert b["attention_mask"] is None and b["num_tokens"] == 9
    m = b["varlen"]
    assert m.cu_q.tolist() == m.cu_q_host == [0, 3, 5, 8, 9]  # [p+c] [r] per pair, in row order
    assert m.cu_k.tolist() == m.cu_k_host == [0, 3, 7, 10, 12]  # [p+c] [p+r]
    assert m.k_index.tolist() == [0, 1, 2, 0, 1, 3, 4, 5, 6, 7, 5, 8]
    assert (m.max_q, m.max_k) == (3, 4) and m.cu_q.dtype == m.cu_k.dtype == torch.int32
    # the head reads the same tokens as in the prefix layout: last prompt token twice, then each completion
    assert b["positions"].tolist() == [1, 1, 3, 5, 6, 5]
    assert b["targets"].tolist() == [7, 8, 9, 11, 12, 13]
    p = collate(f, layout="prefix", pad_token_id=0)
    assert b["targets"].tolist() == p["targets"].tolist() and b["segments"].tolist() == p["segments"].tolist()


def _masked_reference(q, k, v, batch_prefix, scale):
    """The prefix layout's rows (B, T) under its 4D mask: the attention prefix_packed must reproduce."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=batch_prefix["attention_mask"], scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip


def _rows_to_packed(x, lengths):  # (B, H, T, D) -> (N, H, D) of the real tokens, row after row
    return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_per_sequence_equals_the_masked_prefix_rows(hq, hkv):
    f = feats(5, seed=hq + hkv)
    lengths = [len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in f]
    pref = collate(f, layout="prefix", pad_token_id=0)
    meta = collate(f, layout="prefix_packed", pad_token_id=0)["varlen"]
    B, T, D = len(f), pref["input_ids"].shape[1], 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    want = _masked_reference(q, k, v, pref, 0.3)
    qp, kp, vp = (_rows_to_packed(t, lengths) for t in (q, k, v))
    got = attention.varlen_prefix_attention(qp, kp, vp, meta, 0.3)
    torch.testing.assert_close(got, _rows_to_packed(want, lengths), rtol=1e-10, atol=1e-12)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    g_want = torch.autograd.grad((_rows_to_packed(want, lengths) * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("signature", ["window_size", "window_size+enable_gqa", "is_causal"])
def test_the_flash_branch_passes_what_the_kernel_needs(monkeypatch, signature):
    """The GPU branch on CPU with a stand-in kernel of flash's semantics: gathered keys, cu/max
    arguments, causality in either spelling, grouped heads passed as they are or repeated."""
    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None, enable_gqa=False):
        seen.update(window_size=window_size, is_causal=is_causal, heads=k.shape[1])
        assert (window_size == (-1, 0)) != bool(is_causal)
        assert (max_q, max_k) == (max((cu_q[1:] - cu_q[:-1]).tolist()), max((cu_k[1:] - cu_k[:-1]).tolist()))
        assert enable_gqa or q.shape[1] == k.shape[1]
        assert cu_q is meta.cu_q and cu_k is meta.cu_k
        outs = []
        for j in range(len(cu_q) - 1):
            a, b, c, d = cu_q[j], cu_q[j + 1], cu_k[j], cu_k[j + 1]
            keep = torch.ones(b - a, d - c, dtype=torch.bool).tril(diagonal=int((d - c) - (b - a)))
            outs.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                                       v[c:d].transpose(0, 1), attn_mask=keep, scale=scale,
                                                       enable_gqa=enable_gqa).transpose(0, 1))  # fmt: skip
        return torch.cat(outs)

    params = {"window_size+enable_gqa": {"window_size", "enable_gqa"}}.get(signature, {signature})
    monkeypatch.setattr(attention, "_flash_varlen", lambda: (kernel, frozenset(params)))
    monkeypatch.setattr(attention, "flash_usable", lambda q: True)
    f = feats(5, seed=13)
    meta = collate(f, layout="prefix_packed", pad_token_id=0)["varlen"]
    N = meta.cu_q_host[-1]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(N, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = attention.varlen_prefix_attention(q, k, v, meta, 0.3)
    torch.testing.assert_close(got, attention.per_sequence(q, k, v, meta, 0.3), rtol=1e-10, atol=1e-12)
    assert seen["heads"] == (2 if "enable_gqa" in params else 4)


def test_model_logps_equal_prefix_and_leave_the_config_alone():
    model = tiny_model(vocab_size=60, seed=3)
    f = feats(6, seed=4)
    want = model_logps(model, collate(f, layout="prefix", pad_token_id=0), chunk_size=4)
    got = model_logps(model, collate(f, layout="prefix_packed", pad_token_id=0), chunk_size=4)
    for a, b in ((got.chosen_logps, want.chosen_logps), (got.rejected_logps, want.rejected_logps)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert got.chosen_lengths.tolist() == want.chosen_lengths.tolist()
    assert model.config._attn_implementation == "sdpa"
    with torch.inference_mode():  # the reference pass
        ref = model_logps(model, collate(f, layout="prefix_packed", pad_token_id=0), chunk_size=4)
    torch.testing.assert_close(ref.rejected_logps, want.rejected_logps.detach(), rtol=0, atol=1e-5)


def test_refusals_name_the_fix():
    f = feats(2)
    batch = collate(f, layout="prefix_packed", pad_token_id=0)
    model = tiny_model(vocab_size=60)
    set_activation_checkpointing(model, True, {"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing.*batch_layout='prefix'"):
        model_logps(model, batch)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="prefix_packed.*gradient_checkpointing"):
        DPOConfig(batch_layout="prefix_packed", gradient_checkpointing=True).validate()
    dropout = tiny_model(vocab_size=60, attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="attention dropout 0.1.*attention_dropout = 0"):
        model_logps(dropout, batch)
    assert dropout.config._attn_implementation == "sdpa"  # restored after the error too
    window = tiny_model(vocab_size=60)
    window.config._attn_implementation = "sdpa"
    with pytest.raises(NotImplementedError, match="sliding window"):
        attention._transformers_attention(window.model.layers[0].self_attn, *(torch.zeros(1, 2, 3, 4),) * 3, None,
                                          sliding_window=2, **{attention.KWARG: batch["varlen"]})  # fmt: skip


def test_a_model_whose_attention_bypasses_the_interface_is_refused(monkeypatch):
    """Attention code that ignores config._attn_implementation would attend across the packed pairs:
    refused, not silently wrong."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model(vocab_size=60)
    batch = collate(feats(2), layout="prefix_packed", pad_token_id=0)
    monkeypatch.setattr(type(ALL_ATTENTION_FUNCTIONS), "get_interface", lambda self, name, default: sdpa_attention_forward)
    with pytest.raises(NotImplementedError, match="0 of this model's 2 layers.*batch_layout='prefix'"):
        model_logps(model, batch)
    assert model.config._attn_implementation == "sdpa"


def test_attention_calls_without_the_batch_are_plain_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attn = tiny_model(vocab_size=60).model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    got = attention._transformers_attention(attn, q, k, v, mask, scaling=0.3)[0]
    torch.testing.assert_close(got, sdpa_attention_forward(attn, q, k, v, mask, scaling=0.3)[0])


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_flash_kernel_equals_the_twin_in_bfloat16():
    f = feats(8, seed=7)
    meta = collate(f, layout="prefix_packed", pad_token_id=0, device="cuda")["varlen"]
    N = meta.cu_q_host[-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(N, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(N, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    assert attention.flash_usable(q)
    got = attention.varlen_prefix_attention(q, k, v, meta, 0.125)
    want = attention.per_sequence(q.float(), k.float(), v.float(), meta, 0.125)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    w = torch.randn(got.shape, device="cuda", generator=g)
    ga = torch.autograd.grad((got.float() * w).sum(), (q, k, v))
    gb = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        assert (a.float() - b).abs().max() <= 3e-2 * b.abs().max()
    model = tiny_model(vocab_size=60, seed=3).cuda().to(torch.bfloat16)
    a = model_logps(model, collate(f, layout="prefix", pad_token_id=0, device="cuda"))
    b = model_logps(model, collate(f, layout="prefix_packed", pad_token_id=0, device="cuda"))
    torch.testing.assert_close(b.chosen_logps, a.chosen_logps, rtol=2e-2, atol=0.15)
    torch.testing.assert_close(b.rejected_logps, a.rejected_logps, rtol=2e-2, atol=0.15)


def test_through_peft_with_adapters_on_and_off():
    from peft import LoraConfig, get_peft_model

    from preftune.reference import AdapterDisabledReference

    torch.manual_seed(0)
    model = get_peft_model(tiny_model(vocab_size=60, seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights=False))  # fmt: skip
    f = feats(3, seed=9)
    for reference in (None, AdapterDisabledReference(model)):
        run = (lambda b: model_logps(model, b)) if reference is None else reference.logps
        want, got = (run(collate(f, layout=lay, pad_token_id=0)) for lay in ("prefix", "prefix_packed"))
        torch.testing.assert_close(got.rejected_logps, want.rejected_logps, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=0, atol=1e-5)


def test_checkpointing_is_read_from_the_layers_as_transformers_says_it(monkeypatch):
    """attention._checkpointing (asked on every model_logps forward) agrees with transformers' property
    on and off, without walking every module as that property does."""
    from preftune.attention import _checkpointing

    model = tiny_model()
    for enable in (True, False):
        set_activation_checkpointing(model, enable, {"use_reentrant": False})
        want = bool(model.is_activation_checkpointing)
        with monkeypatch.context() as m:
            m.setattr(torch.nn.Module, "modules", lambda self: pytest.fail("walked every module"))
            assert _checkpointing(model) is want is enable
