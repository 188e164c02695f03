"""preftune.evaluate: batched generation against a hand-written greedy loop, verifier and win-rate counts,
Wilson intervals against a bisection twin, reward-function loading, the before/after table."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.evaluate import (
    compare_texts,
    format_table,
    generate,
    load_reward_fn,
    score_texts,
    table_row,
    verifier_eval,
    wilson_interval,
    win_rate,
)
from preftune.testing import tiny_model, tiny_tokenizer

PROMPTS = [
    "hi",
    [{"role": "user", "content": "What is 2+2?"}],
    "a considerably longer prompt that needs no padding at all",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    "x",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok), seed=0)


def greedy_ids_by_hand(model, tokenizer, prompt, max_new_tokens: int, eos: tuple[int, ...] = ()) -> list[int]:
    """The slow twin: one unpadded prompt, full forward each step, argmax, stop at EOS (or `eos`)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]  # (V,)
            nxt = int(logits.argmax())
            if nxt == tokenizer.eos_token_id or nxt in eos:
                break
            ids.append(nxt)
            new.append(nxt)
    return new


def greedy_by_hand(model, tokenizer, prompt, max_new_tokens: int, eos: tuple[int, ...] = ()) -> str:
    return tokenizer.decode(greedy_ids_by_hand(model, tokenizer, prompt, max_new_tokens, eos), skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# generate


def test_greedy_matches_hand_loop_batched_and_unbatched(model, tok):
    model.train()
    expected = [greedy_by_hand(model.eval(), tok, p, 10) for p in PROMPTS]
    model.train()
    batched = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=16, progress=False)
    unbatched = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=1, progress=False)
    pairs = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=2, progress=False)
    assert batched == unbatched == pairs == expected
    assert generate(model, tok, PROMPTS, max_new_tokens=10, progress=False) == batched  # deterministic
    assert model.training and tok.padding_side == "right"  # state restored


def test_rows_stop_at_their_own_eos(tok):
    model = tiny_model(len(tok), seed=0).eval()
    runs = [greedy_ids_by_hand(model, tok, p, 10) for p in PROMPTS]
    # pretend a token some row emits mid-way is an extra EOS the model's generation config declares
    stop = next(ids[j] for ids in runs for j in range(2, 9) if ids[j] not in ids[:j])
    model.generation_config.eos_token_id = stop
    lengths = [len(greedy_ids_by_hand(model, tok, p, 10, eos=(stop,))) for p in PROMPTS]
    assert any(2 <= n < 10 for n in lengths) and len(set(lengths)) > 1, lengths  # rows stop at different steps
    expected = [greedy_by_hand(model, tok, p, 10, eos=(stop,)) for p in PROMPTS]
    assert generate(model, tok, PROMPTS, max_new_tokens=10, progress=False) == expected


def test_tokenizer_without_pad_token_gives_same_text(model, tok):
    no_pad = tiny_tokenizer(pad_token=None)
    assert no_pad.pad_token_id is None
    a = generate(model, tok, PROMPTS, max_new_tokens=8, progress=False)
    b = generate(model, no_pad, PROMPTS, max_new_tokens=8, progress=False)
    assert a == b


def test_sampling_is_seeded_and_leaves_global_rng_alone(model, tok):
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=1.0, progress=False)
    a = generate(model, tok, PROMPTS, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tok, PROMPTS, seed=1, **kw) == a
    assert generate(model, tok, PROMPTS, seed=2, **kw) != a
    assert generate(model, tok, [], progress=False) == []


def test_generate_rejects_bad_prompts(model, tok):
    with pytest.raises(TypeError, match="str or a list"):
        generate(model, tok, [123], progress=False)
    with pytest.raises(ValueError, match="chat template"):
        generate(model, tiny_tokenizer(chat_template=False), [[{"role": "user", "content": "x"}]], progress=False)


# --------------------------------------------------------------------------------------------------
# Wilson interval


def wilson_by_bisection(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Slow twin: the Wilson bounds are the p where |p̂ − p| = z·sqrt(p(1 − p)/n)."""
    phat = k / n

    def f(p):
        return (phat - p) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):  # f changes sign on [lo, hi]
        for _ in range(200):
            mid = (lo + hi) / 2
            if (f(lo) > 0) == (f(mid) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if phat == 0 else root(0.0, phat)
    high = 1.0 if phat == 1 else root(phat, 1.0)
    return low, high


def test_wilson_hand_numbers_and_twin():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(0, 1), (1, 1), (3, 7), (2.5, 6), (50, 100), (99, 100), (10, 10)]:
        fast = wilson_interval(k, n)
        slow = wilson_by_bisection(k, n)
        assert fast == pytest.approx(slow, abs=1e-9), (k, n)


# --------------------------------------------------------------------------------------------------
# scoring on hand numbers


def test_score_texts_counts():
    rows = [{"answer": "4"}, {"answer": "5"}, {"answer": "6"}, {"answer": "7"}]
    texts = ["4", "5!", "six", "7"]
    res = score_texts(rows, texts, lambda row, text: row["answer"] in text)
    assert res["n"] == 4 and res["passed"] == 3 and res["rate"] == 0.75
    assert (res["ci_low"], res["ci_high"]) == wilson_interval(3, 4)
    partial = score_texts(rows, texts, lambda row, text: 0.5)
    assert partial["passed"] == 2.0 and partial["rate"] == 0.5
    with pytest.raises(ValueError, match="row 0"):
        score_texts(rows, texts, lambda row, text: 2.0)
    with pytest.raises(ValueError, match="4 rows but 3 texts"):
        score_texts(rows, texts[:3], lambda row, text: True)


def test_compare_texts_counts_ties_half():
    rows = [{}] * 5
    reward = lambda row, text: float(len(text))  # noqa: E731
    res = compare_texts(rows, ["aaa", "a", "aa", "aaaa", "b"], ["aa", "aa", "bb", "a", "c"], reward)
    assert (res["wins"], res["ties"], res["losses"]) == (2, 2, 1)
    assert res["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert (res["ci_low"], res["ci_high"]) == wilson_interval(3.0, 5)


# --------------------------------------------------------------------------------------------------
# with a model


def test_verifier_eval_with_tiny_model(model, tok):
    expected = [greedy_by_hand(model.eval(), tok, p, 6) for p in PROMPTS]
    model.train()
    rows = [{"prompt": p, "expect": e if i % 2 == 0 else e + "never"} for i, (p, e) in enumerate(zip(PROMPTS, expected))]
    res = verifier_eval(model, tok, rows, lambda row, text: text == row["expect"], max_new_tokens=6,
                        batch_size=2, progress=False, return_texts=True)
    assert res["n"] == 5 and res["passed"] == 3 and res["rate"] == pytest.approx(0.6)
    assert res["texts"] == expected


def test_win_rate_with_tiny_models(tok):
    policy, reference = tiny_model(len(tok), seed=0), tiny_model(len(tok), seed=1)
    rows = [{"prompt": p} for p in PROMPTS]
    reward = lambda row, text: float(sum(ord(c) for c in text) % 7)  # noqa: E731
    res = win_rate(policy, reference, tok, rows, reward, max_new_tokens=5, progress=False, return_texts=True)
    mine = generate(policy, tok, PROMPTS, max_new_tokens=5, progress=False)
    theirs = generate(reference, tok, PROMPTS, max_new_tokens=5, progress=False)
    assert res["policy_texts"] == mine and res["reference_texts"] == theirs
    twin = compare_texts(rows, mine, theirs, reward)
    assert {k: res[k] for k in twin} == twin and res["wins"] + res["ties"] + res["losses"] == 5
    against_itself = win_rate(policy, policy, tok, rows, reward, max_new_tokens=5, progress=False)
    assert against_itself["ties"] == 5 and against_itself["win_rate"] == 0.5


# --------------------------------------------------------------------------------------------------
# load_reward_fn


def test_load_reward_fn(tmp_path):
    assert load_reward_fn("math:sqrt") is math.sqrt
    assert load_reward_fn("os.path:join")("a", "b").endswith("b")
    (tmp_path / "my_rewards.py").write_text("class R:\n    @staticmethod\n    def score(row, text):\n        return 1.5\n")
    assert load_reward_fn(f"{tmp_path / 'my_rewards.py'}:R.score")({}, "") == 1.5
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_reward_fn("math.sqrt")
    with pytest.raises(ValueError, match="module 'no_such_module_xyz' not found"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_fn("math:nope")
    with pytest.raises(ValueError, match="not a function"):
        load_reward_fn("math:pi")
    with pytest.raises(ValueError, match="not found"):
        load_reward_fn(f"{tmp_path / 'missing.py'}:f")


# --------------------------------------------------------------------------------------------------
# table


def test_table_row_and_format_table():
    before = score_texts([{}] * 4, ["a", "b", "c", "d"], lambda r, t: t == "a")
    after = score_texts([{}] * 4, ["a", "b", "c", "d"], lambda r, t: t != "d")
    wr = compare_texts([{}] * 4, ["aa", "a", "aa", "a"], ["a", "a", "a", "aa"], lambda r, t: len(t))
    rows = [table_row("demo pass rate", before, after), table_row("win rate vs reference", None, wr)]
    assert rows[0]["before"] == 0.25 and rows[0]["after"] == 0.75 and rows[0]["n"] == 4
    assert rows[0]["after_ci"] == wilson_interval(3, 4) and rows[1]["before"] is None
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "n", "95%", "CI"]
    assert set(lines[1]) <= {"-", " "}
    lo, hi = wilson_interval(3, 4)
    assert lines[2].startswith("demo pass rate") and f"[{lo:.3f}, {hi:.3f}]" in lines[2] and "0.750" in lines[2]
    assert lines[3].split()[:6] == ["win", "rate", "vs", "reference", "-", "0.625"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
