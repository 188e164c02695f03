"""preftune.grpo.rollout: the shared-prefill batched rollout against generate and a row-by-row twin."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from preftune.grpo.rollout import (
    GENERATION_KWARGS,
    generate_groups,
    next_tokens,
    row_uniforms,
    sample_rows,
    seed_tensor,
)
from preftune.models import set_activation_checkpointing
from preftune.testing import tiny_model

V = 300
PAD = 0
# different lengths, so the batch is left-padded; a 1-token prompt
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [40]]
# about one id in ten ends a sampled completion: rows finish at different steps
EOS_MANY = list(range(3, V, 10))


@pytest.fixture(scope="module")
def model():
    m = tiny_model(V, seed=1)
    m.eval()
    return m


def _generate_one(model, prompt, max_new_tokens, eos, **kw):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=PAD, **kw)
    return out[0, len(prompt):].tolist()


def _greedy_eos(model, max_new_tokens):
    """EOS ids taken from the greedy outputs: some rows end early, at different steps, some run out."""
    plain = [_generate_one(model, p, max_new_tokens, None) for p in PROMPTS]
    return [plain[0][2], plain[2][6]]


@pytest.mark.parametrize("compact", [True, 3, False])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_generate_per_prompt(model, compact, penalty):
    n_new, G = 10, 3
    eos = _greedy_eos(model, n_new)
    r = generate_groups(model, PROMPTS, G, max_new_tokens=n_new, eos_token_ids=eos, pad_token_id=PAD,
                        do_sample=False, repetition_penalty=penalty, compact=compact)
    expected = [_generate_one(model, p, n_new, eos, repetition_penalty=penalty) for p in PROMPTS]
    for i, want in enumerate(expected):
        for j in range(G):
            assert r.completion_ids[i * G + j] == want, (i, j)
            assert r.truncated[i * G + j] == (want[-1] not in eos)
    assert any(r.truncated) and not all(r.truncated)  # the test covers both endings
    assert len({len(c) for c in r.completion_ids}) > 1


def _twin(model, prompt, seed, max_new_tokens, eos, *, temperature, top_k, top_p, min_p, repetition_penalty):
    """One row alone: full forward every step (no cache, no padding), generate's processor order."""
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p))
    seq, words = list(prompt), seed_tensor([seed])
    for step in range(max_new_tokens):
        ids = torch.tensor([seq])
        scores = procs(ids, model(ids).logits[:, -1].float())
        tok = int(sample_rows(torch.softmax(scores, -1), row_uniforms(words, step))[0])
        seq.append(tok)
        if tok in eos:
            break
    return seq[len(prompt):]


SAMPLING = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0),
    dict(temperature=0.7, top_k=50, top_p=0.9, min_p=None, repetition_penalty=1.2),
    dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.5, repetition_penalty=0.8),
]


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("compact", [True, False])
def test_sampled_rows_equal_the_row_by_row_twin(model, sampling, compact):
    n_new, G = 12, 3
    seeds = [1000 + 7 * r for r in range(len(PROMPTS) * G)]
    r = generate_groups(model, PROMPTS, G, max_new_tokens=n_new, eos_token_ids=EOS_MANY, pad_token_id=PAD,
                        seeds=seeds, compact=compact, **sampling)
    for i, p in enumerate(PROMPTS):
        for j in range(G):
            row = i * G + j
            want = _twin(model, p, seeds[row], n_new, EOS_MANY, **sampling)
            assert r.completion_ids[row] == want, (i, j)
            assert r.truncated[row] == (want[-1] not in EOS_MANY)
    assert any(r.truncated) and not all(r.truncated)
    # G rows of one prompt with different seeds differ
    assert len({tuple(r.completion_ids[j]) for j in range(G)}) > 1


def test_generation_kwargs_override_and_unknown_keys_are_refused(model):
    kw = dict(max_new_tokens=8, eos_token_ids=EOS_MANY, pad_token_id=PAD, seeds=list(range(4)))
    a = generate_groups(model, PROMPTS, 1, temperature=0.5, top_k=20, **kw)
    b = generate_groups(model, PROMPTS, 1, generation_kwargs={"temperature": 0.5, "top_k": 20}, **kw)
    c = generate_groups(model, PROMPTS, 1, **kw)
    assert a.completion_ids == b.completion_ids != c.completion_ids
    with pytest.raises(ValueError, match="'num_beams'.*'output_scores'|'output_scores'.*'num_beams'"):
        generate_groups(model, PROMPTS, 1, generation_kwargs={"num_beams": 2, "output_scores": True, "top_k": 3},
                        **kw)
    assert "repetition_penalty" in GENERATION_KWARGS
    with pytest.raises(ValueError, match="one seed per completion"):
        generate_groups(model, PROMPTS, 2, **kw)


def test_same_prompt_and_seed_give_the_same_completion_in_any_batch(model):
    n_new, G = 12, 2
    kw = dict(max_new_tokens=n_new, eos_token_ids=EOS_MANY, pad_token_id=PAD, temperature=0.9, top_p=0.95)
    alone = generate_groups(model, [PROMPTS[1]], G, seeds=[42, 43], **kw)
    # the same prompt inside a bigger batch, at another position, with longer prompts around it
    big = generate_groups(model, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], G, seeds=[1, 2, 3, 4, 42, 43], **kw)
    assert big.completion_ids[4:6] == alone.completion_ids
    assert big.truncated[4:6] == alone.truncated
    # and split over two calls, like two processes
    half = generate_groups(model, [PROMPTS[2], PROMPTS[0]], G, seeds=[1, 2, 3, 4], **kw)
    assert big.completion_ids[:4] == half.completion_ids


def test_eos_ends_a_completion_and_truncated_means_no_eos(model):
    r = generate_groups(model, PROMPTS, 4, max_new_tokens=6, eos_token_ids=EOS_MANY, pad_token_id=PAD,
                        seeds=list(range(16)))
    for c, t in zip(r.completion_ids, r.truncated):
        eos_at = [k for k, tok in enumerate(c) if tok in EOS_MANY]
        if t:
            assert len(c) == 6 and not eos_at
        else:
            assert eos_at == [len(c) - 1] and len(c) <= 6  # the first EOS is kept, nothing after it
    assert any(r.truncated) and not all(r.truncated)
    assert set(r.timings) == {"prefill_s", "decode_s"}
    # every token an EOS: each completion is exactly one token
    r = generate_groups(model, PROMPTS, 2, max_new_tokens=5, eos_token_ids=list(range(V)), pad_token_id=PAD)
    assert all(len(c) == 1 for c in r.completion_ids) and not any(r.truncated)


def test_training_mode_restored_with_peft_and_gradient_checkpointing():
    peft = pytest.importorskip("peft")
    base = tiny_model(V, seed=1)
    base.eval()
    eos = [7]
    want = [_generate_one(base, p, 8, eos) for p in PROMPTS]
    model = peft.get_peft_model(tiny_model(V, seed=1), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    set_activation_checkpointing(model, True)
    model.config.use_cache = False
    model.train()
    modes = {n: m.training for n, m in model.named_modules()}
    r = generate_groups(model, PROMPTS, 2, max_new_tokens=8, eos_token_ids=eos, pad_token_id=PAD, do_sample=False)
    assert r.completion_ids == [w for w in want for _ in range(2)]  # LoRA starts as the identity
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.is_grad_enabled()  # no_grad did not leak


# --------------------------------------------------------------------------------------------------
# the sampler on its own


def _chi2_threshold(df: int, z: float = 4.26) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z=4.26 is p = 1e-5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts, probs, n):
    keep = probs > 0
    expected = probs[keep] * n
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])


@pytest.mark.parametrize("over", ["rows", "steps"])
def test_draws_follow_softmax_of_logits_over_temperature(over):
    n, T = 40000, 0.8
    penalty, warpers = LogitsProcessorList(), LogitsProcessorList([TemperatureLogitsWarper(T)])
    if over == "rows":  # many rows with different seeds, one step
        toks = next_tokens(LOGITS.expand(n, -1), None, seed_tensor(range(n)), 0, penalty, warpers, True)
    else:  # one seed, many steps
        words = seed_tensor([12345])
        toks = torch.cat([next_tokens(LOGITS[None], None, words, s, penalty, warpers, True) for s in range(n)])
    counts = torch.bincount(toks, minlength=len(LOGITS)).double()
    stat, df = _chi2(counts, torch.softmax(LOGITS.double() / T, -1), n)
    assert stat < _chi2_threshold(df), stat
    # the test has power: the same draws are far from the distribution without the temperature
    wrong, _ = _chi2(counts, torch.softmax(LOGITS.double(), -1), n)
    assert wrong > 10 * _chi2_threshold(df)


@pytest.mark.parametrize("warper, allowed", [
    (TopKLogitsWarper(3), {0, 7, 1}),
    (TopPLogitsWarper(0.6), {0, 7}),  # p = .40, .24, .15, ...: .40 + .24 >= .6 keeps two
    (MinPLogitsWarper(0.3), {0, 7, 1}),  # kept: p >= 0.3 * p_max, i.e. logit >= 2 + ln 0.3 = 0.80
])
def test_filtering_warpers_never_emit_excluded_tokens(warper, allowed):
    n = 20000
    probs = torch.softmax(LOGITS, -1)
    toks = next_tokens(LOGITS.expand(n, -1), None, seed_tensor(range(n)), 3, LogitsProcessorList(),
                       LogitsProcessorList([warper]), True)
    seen = set(torch.unique(toks).tolist())
    assert seen == allowed
    kept = torch.tensor(sorted(allowed))
    counts = torch.bincount(toks, minlength=len(LOGITS)).double()[kept]
    stat, df = _chi2(counts, probs[kept].double() / probs[kept].sum(), n)
    assert df == 0 or stat < _chi2_threshold(df)


def test_uniforms_depend_on_seed_and_step_only():
    words = seed_tensor([3, 2**40 + 3, -1, 3])
    u0, u1 = row_uniforms(words, 0), row_uniforms(words, 1)
    assert u0[0] == u0[3] and len({float(x) for x in u0[:3]}) == 3  # high bits of the seed count
    assert not torch.equal(u0, u1)
    assert torch.equal(row_uniforms(words[1:2], 0), u0[1:2])
    u = row_uniforms(seed_tensor(range(100000)), 5)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=20, min=0, max=1).double()
    stat, df = _chi2(hist, torch.full((20,), 1 / 20, dtype=torch.double), 100000)
    assert stat < _chi2_threshold(df)


def test_lora_generation_with_merged_weights_equals_the_adapters_forward():
    """merged_lora: the same greedy tokens as the base matmul plus the adapter's, the logits to float rounding, the
    base weights untouched and every forward restored after."""
    import copy

    from peft import LoraConfig, get_peft_model

    from preftune.grpo.rollout import generate_groups, merged_lora
    from preftune.testing import tiny_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model(300, seed=3), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # a trained-looking adapter (peft starts B at 0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with merged_lora(model) as n:
            fast = model(input_ids=ids).logits
    assert n == 14  # 7 linears x 2 layers
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "Linear"
                   and hasattr(m, "lora_A"))
    prompts = [[5, 17, 42], [9, 100, 7, 8, 2]]
    kw = dict(max_new_tokens=8, eos_token_ids=[0], pad_token_id=1, do_sample=False)
    merged_out = generate_groups(model, prompts, 2, **kw)
    plain_out = generate_groups(copy.deepcopy(model), prompts, 2, merge_lora=False, **kw)
    assert merged_out.completion_ids == plain_out.completion_ids
