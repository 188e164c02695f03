"""preftune.data.batching.collate_groups: GRPO groups (a prompt and its G completions) in every layout.

Checked by hand, against each other, and against the slow, obvious twin: each completion run through
the model alone (prompt + completion, one row, no padding) with its full logits and a log-softmax.
Pairs are groups of two (``collate`` is a thin case of the same code): test_batching.py and
test_attention.py hold its tensors by hand.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batching import per_segment  # {response: [targets]}, as the pair layouts' tests read a batch
from transformers.masking_utils import find_packed_sequence_indices

from preftune import attention
from preftune.data.batching import LAYOUTS, collate, collate_groups, group_num_tokens
from preftune.logps import model_token_logps
from preftune.testing import tiny_model

PAD = 0
GROUPS = [
    {"prompt_ids": [5, 6, 7], "completions": [[8, 9], [10], [11, 12, 13]], "index": 7},
    {"prompt_ids": [20], "completions": [[30, 31]], "index": 2},  # a group of 1
    {"prompt_ids": [40, 41], "completions": [[], [42, 43]], "index": 5},  # an empty first completion
]


def test_padded_by_hand():
    b = collate_groups(GROUPS, layout="padded", pad_token_id=PAD)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, PAD],
        [5, 6, 7, 10, PAD, PAD],
        [5, 6, 7, 11, 12, 13],
        [20, 30, 31, PAD, PAD, PAD],
        [40, 41, PAD, PAD, PAD, PAD],  # the empty completion keeps its row: one row per completion
        [40, 41, 42, 43, PAD, PAD],
    ]
    assert b["labels"][4].tolist() == [-100] * 6 and b["labels"][5].tolist() == [-100, -100, 42, 43, -100, -100]
    assert b["attention_mask"][3].tolist() == [1, 1, 1, 0, 0, 0]
    assert b["positions"].tolist() == [2, 3, 8, 14, 15, 16, 18, 19, 31, 32]
    assert b["segments"].tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 5, 5]
    assert b["num_responses"] == 6 and b["group_index"].tolist() == [7, 2, 5] and "num_pairs" not in b
    assert b["num_tokens"] == 5 + 4 + 6 + 3 + 2 + 4


def test_prefix_by_hand():
    b = collate_groups(GROUPS, layout="prefix", pad_token_id=PAD)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 10, 11, 12, 13],
        [20, 30, 31, PAD, PAD, PAD, PAD, PAD, PAD],
        [40, 41, 42, 43, PAD, PAD, PAD, PAD, PAD],
    ]
    # every completion's positions continue from its prompt
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert b["position_ids"][2, :4].tolist() == [0, 1, 2, 3]
    # the last prompt token (flat 2) predicts the first token of each of the three completions
    assert b["positions"].tolist() == [2, 3, 2, 2, 6, 7, 9, 10, 19, 20]
    assert b["segments"].tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 5, 5]
    assert b["targets"].tolist() == [8, 9, 10, 11, 12, 13, 30, 31, 42, 43]
    m = b["attention_mask"][0, 0].int().tolist()
    assert m[4] == [1, 1, 1, 1, 1, 0, 0, 0, 0]  # completion 0: prompt + itself, causal
    assert m[5] == [1, 1, 1, 0, 0, 1, 0, 0, 0]  # completion 1 sees no completion 0
    assert m[8] == [1, 1, 1, 0, 0, 0, 1, 1, 1]  # completion 2 sees neither 0 nor 1
    assert b["attention_mask"][1, 0, 5].int().tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # pad sees itself only
    assert b["num_tokens"] == 9 + 3 + 4


def test_prefix_packed_by_hand():
    b = collate_groups(GROUPS, layout="prefix_packed", pad_token_id=PAD, pad_to_multiple_of=64)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 30, 31, 40, 41, 42, 43]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3]]
    m = b["varlen"]
    # queries: [prompt+c0] [c1] [c2] | [prompt+c0] | [prompt+c0 (empty c0)] [c1]: rows in order
    assert m.cu_q_host == m.cu_q.tolist() == [0, 5, 6, 9, 12, 14, 16]
    assert m.cu_k_host == m.cu_k.tolist() == [0, 5, 9, 15, 18, 20, 24]  # a later completion: prompt + itself
    assert m.k_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15]
    assert (m.max_q, m.max_k) == (5, 6)
    p = collate_groups(GROUPS, layout="prefix", pad_token_id=PAD)
    assert b["targets"].tolist() == p["targets"].tolist() and b["segments"].tolist() == p["segments"].tolist()
    assert b["positions"].tolist() == [2, 3, 2, 2, 6, 7, 9, 10, 13, 14]


def test_a_pair_is_a_group_of_two_numbered_the_pair_way():
    """collate's prefix rows are collate_groups' rows of [chosen, rejected]; only the numbering differs
    (pairs: chosen i -> i, rejected -> B + i; groups: in order)."""
    rng = random.Random(1)
    feats = [dict(prompt_ids=[rng.randrange(4, 60) for _ in range(rng.randint(1, 7))],
                  chosen_ids=[rng.randrange(4, 60) for _ in range(rng.randint(1, 5))],
                  rejected_ids=[rng.randrange(4, 60) for _ in range(rng.randint(1, 5))], index=i)
             for i in range(4)]  # fmt: skip
    groups = [dict(prompt_ids=f["prompt_ids"], completions=[f["chosen_ids"], f["rejected_ids"]], index=f["index"])
              for f in feats]  # fmt: skip
    B = len(feats)
    renumber = torch.tensor([2 * i for i in range(B)] + [2 * i + 1 for i in range(B)])  # pair response -> group's
    for layout in LAYOUTS:
        p = collate(feats, layout=layout, pad_token_id=PAD)
        g = collate_groups(groups, layout=layout, pad_token_id=PAD)
        assert per_segment(g) == {int(renumber[r]): t for r, t in per_segment(p).items()}
        assert g["group_index"].tolist() == p["pair_index"].tolist() and g["num_responses"] == 2 * B
        if layout in ("prefix", "prefix_packed"):  # the same rows
            for key in ("input_ids", "position_ids", "positions", "targets", "attention_mask"):
                assert (p[key] is None and g[key] is None) or torch.equal(p[key], g[key]), (layout, key)
            assert torch.equal(renumber[p["segments"]], g["segments"])
        if layout == "prefix_packed":
            assert p["varlen"].cu_q_host == g["varlen"].cu_q_host and torch.equal(p["varlen"].k_index,
                                                                                 g["varlen"].k_index)


groups_strategy = st.lists(
    st.fixed_dictionaries({
        "prompt_ids": st.lists(st.integers(1, 50), min_size=1, max_size=6),
        "completions": st.lists(st.lists(st.integers(1, 50), max_size=5), min_size=1, max_size=4),
    }), min_size=1, max_size=4)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(groups_strategy, st.sampled_from([None, 8]))
def test_layouts_agree_on_what_is_predicted(raw, multiple):
    groups = [dict(g, index=i) for i, g in enumerate(raw)]
    completions = [c for g in groups for c in g["completions"]]
    expected = {r: c for r, c in enumerate(completions) if c}
    for layout in LAYOUTS:
        b = collate_groups(groups, layout=layout, pad_token_id=PAD, pad_to_multiple_of=multiple)
        assert per_segment(b) == expected, layout
        assert b["num_responses"] == len(completions)
        assert b["num_tokens"] == sum(group_num_tokens(g, layout) for g in groups)
        R, T = b["input_ids"].shape
        assert b["position_ids"].shape == (R, T)
        flat = b["input_ids"].view(-1)
        if layout in ("padded", "packed"):
            assert flat[b["positions"] + 1].tolist() == b["targets"].tolist()
        if layout == "packed":  # transformers finds one sequence per completion (+ the tail pad)
            seq = find_packed_sequence_indices(b["position_ids"])  # None: one sequence, not packed
            assert (1 if seq is None else int(seq[0][: b["num_tokens"]].max()) + 1) == len(completions)
        if layout == "prefix":  # every predicting query sees its prompt's first token and itself
            mask = b["attention_mask"][:, 0].reshape(R * T, T)
            assert mask[b["positions"], b["positions"] % T].all()
            assert mask[b["positions"], (b["positions"] // T) * 0].all()


def test_errors_name_the_group_and_the_fix():
    with pytest.raises(ValueError, match="empty list of groups"):
        collate_groups([], pad_token_id=PAD)
    with pytest.raises(ValueError, match="layout='ragged'"):
        collate_groups(GROUPS, layout="ragged", pad_token_id=PAD)
    with pytest.raises(ValueError, match="collate_groups: pad_token_id"):
        collate_groups(GROUPS, pad_token_id=None)
    with pytest.raises(ValueError, match=r"group 1 \(index=2\) has an empty 'prompt_ids'"):
        collate_groups([GROUPS[0], dict(GROUPS[1], prompt_ids=[])], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"group 0 \(index=7\) has no completions"):
        collate_groups([dict(GROUPS[0], completions=[])], pad_token_id=PAD)
    with pytest.raises(ValueError, match="list of token-id lists.*wrap a single completion"):
        collate_groups([dict(GROUPS[0], completions=[1, 2, 3])], pad_token_id=PAD)
    with pytest.raises(ValueError, match="has no 'index'"):
        collate_groups([{"prompt_ids": [1], "completions": [[2]]}], pad_token_id=PAD)


def test_prefix_mask_is_built_on_the_requested_device():
    b = collate_groups(GROUPS, layout="prefix", pad_token_id=PAD, pad_to_multiple_of=8, device="meta")
    ref = collate_groups(GROUPS, layout="prefix", pad_token_id=PAD, pad_to_multiple_of=8)
    assert b["attention_mask"].device.type == "meta" and b["attention_mask"].shape == ref["attention_mask"].shape
    assert b["input_ids"].device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# Under a model: every layout equals the padded one and the slow twin, values and gradients
# --------------------------------------------------------------------------------------------------
V = 64


def model_groups(seed=0):
    """Prompts of different lengths, completions of different lengths, a group of 1, empty completions
    (first and later in their group), and a group of 8 with a 300-token prompt."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, V) for _ in range(n)]

    return [
        dict(prompt_ids=ids(300), completions=[ids(rng.randint(1, 12)) for _ in range(7)] + [[]], index=0),
        dict(prompt_ids=ids(5), completions=[ids(3), ids(9), ids(1)], index=1),
        dict(prompt_ids=ids(1), completions=[ids(4)], index=2),  # a group of 1, a one-token prompt
        dict(prompt_ids=ids(12), completions=[[], ids(6)], index=3),
        dict(prompt_ids=ids(7), completions=[ids(2), [], ids(5), ids(11)], index=4),
    ]


def alone(model, groups):
    """The slow, obvious twin: each completion run on its own (prompt + completion, one row, no padding,
    no mask), full logits, log-softmax, the completion's tokens gathered. A list of (L_r,) per response."""
    out = []
    for g in groups:
        P = len(g["prompt_ids"])
        for c in g["completions"]:
            ids = torch.tensor([g["prompt_ids"] + c])
            logits = model(input_ids=ids).logits[0, P - 1 : P - 1 + len(c)].float()  # (L, V)
            out.append(F.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def per_response(tok, num_responses):
    """A TokenLogps as a list of (L_r,) per response, each in sequence order (gradients flow)."""
    rows, mask = tok.padded()
    assert rows.shape[0] == num_responses
    return [rows[r][mask[r]] for r in range(num_responses)]


def weighted(per_resp):
    """A loss that weighs every token differently, so a gradient wrong at one token shows."""
    g = torch.Generator().manual_seed(0)
    return sum((lp * torch.randn(lp.shape, generator=g)).sum() for lp in per_resp if lp.numel())


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def qwen2_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    m = tiny_model(V, seed=3) if request.param == "llama" else qwen2_model()
    return m.eval()  # no dropout; gradients still flow


@pytest.fixture(scope="module")
def twin(model):
    groups = model_groups()
    want = alone(model, groups)
    return groups, [w.detach() for w in want], grads_of(model, weighted(want))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_equals_the_twin_and_the_padded_layout(model, twin, layout):
    groups, want, want_grads = twin
    R = sum(len(g["completions"]) for g in groups)
    multiple = 8 if layout != "prefix_packed" else None
    with torch.no_grad():
        padded = per_response(model_token_logps(model, collate_groups(groups, pad_token_id=PAD), chunk_size=16), R)
    batch = collate_groups(groups, layout=layout, pad_token_id=PAD, pad_to_multiple_of=multiple)
    tok = model_token_logps(model, batch, chunk_size=16)
    assert tok.lengths.tolist() == [len(c) for g in groups for c in g["completions"]]
    got = per_response(tok, R)
    for r, (a, b, c) in enumerate(zip(got, want, padded)):
        assert a.shape == b.shape == c.shape, r
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-5, msg=f"response {r} vs alone")
        torch.testing.assert_close(a.detach(), c, rtol=0, atol=1e-5, msg=f"response {r} vs padded")
    got_grads = grads_of(model, weighted(got))
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_prefix_packed_runs_one_attention_sequence_per_nonempty_completion(model):
    """The varlen path really runs (every layer through the interface) and its twin's sequences are the
    completions: a group's later empty completion has none."""
    groups = model_groups()
    b = collate_groups(groups, layout="prefix_packed", pad_token_id=PAD)
    nonempty_later = sum(1 for g in groups for c in g["completions"][1:] if c)
    assert len(b["varlen"].cu_q_host) - 1 == len(groups) + nonempty_later
    calls = attention._calls[0]
    with torch.no_grad():
        model_token_logps(model, b)
    assert attention._calls[0] - calls == model.config.num_hidden_layers


def flash_semantics(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None,
                    enable_gqa=False):
    """Flash's variable-length kernel written out: per sequence, its queries over its (gathered) keys,
    causal with the queries aligned to the end of the keys."""
    assert (max_q, max_k) == (int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max()))
    assert bool((cu_q[1:] > cu_q[:-1]).all()), "an empty sequence"
    outs = []
    for j in range(len(cu_q) - 1):
        a, b, c, d = cu_q[j], cu_q[j + 1], cu_k[j], cu_k[j + 1]
        keep = torch.ones(b - a, d - c, dtype=torch.bool).tril(diagonal=int((d - c) - (b - a)))
        outs.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                                   v[c:d].transpose(0, 1), attn_mask=keep, scale=scale,
                                                   enable_gqa=enable_gqa).transpose(0, 1))  # fmt: skip
    return torch.cat(outs)


def test_gathered_keys_give_the_masked_prefix_attention(monkeypatch):
    """The flash branch (its kernel written out, on CPU) reads the gathered keys k_index and cu_k, which
    per_sequence does not use: both, and the prefix layout's masked rows, agree for G completions with
    empty ones."""
    monkeypatch.setattr(attention, "_flash_varlen", lambda: (flash_semantics, frozenset({"is_causal", "enable_gqa"})))
    monkeypatch.setattr(attention, "flash_usable", lambda q: True)
    groups = [dict(g, prompt_ids=g["prompt_ids"][:9]) for g in model_groups(seed=1)]  # shorter prompts
    pref = collate_groups(groups, layout="prefix", pad_token_id=PAD)
    meta = collate_groups(groups, layout="prefix_packed", pad_token_id=PAD)["varlen"]
    lengths = [group_num_tokens(g, "prefix") for g in groups]
    G, T, N = len(groups), pref["input_ids"].shape[1], meta.cu_q_host[-1]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(G, h, T, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=pref["attention_mask"], scale=0.3, enable_gqa=True)

    def rows_to_packed(x):  # (G, H, T, D) -> (N, H, D), the real tokens row after row
        return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])

    qp, kp, vp = (rows_to_packed(t) for t in (q, k, v))
    assert qp.shape[0] == N
    got = attention.varlen_prefix_attention(qp, kp, vp, meta, 0.3)
    torch.testing.assert_close(got, rows_to_packed(want), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attention.per_sequence(qp, kp, vp, meta, 0.3), got, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_flash_kernel_on_groups_equals_the_prefix_layout_in_bfloat16():
    groups = model_groups(seed=2)
    model = tiny_model(V, seed=3).cuda().to(torch.bfloat16)
    a = model_token_logps(model, collate_groups(groups, layout="prefix", pad_token_id=PAD, device="cuda"))
    b_batch = collate_groups(groups, layout="prefix_packed", pad_token_id=PAD, device="cuda")
    b = model_token_logps(model, b_batch)
    torch.testing.assert_close(b.sums(), a.sums(), rtol=2e-2, atol=0.15)
    q = torch.randn(b_batch["varlen"].cu_q_host[-1], 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])
    assert attention.flash_usable(q)
    got = attention.varlen_prefix_attention(q, k, v, b_batch["varlen"], 0.125)
    want = attention.per_sequence(q.float(), k.float(), v.float(), b_batch["varlen"], 0.125)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
