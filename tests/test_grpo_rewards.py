"""preftune.grpo.rewards (the calling convention, async, errors, reward models) and preftune.rewards
(the built-in rewards, the registry and load_reward)."""

import asyncio
import functools
import logging
import math
import random

import pytest
import torch

from preftune.data import demo
from preftune.grpo.rewards import RewardError, RewardFunctions
from preftune.rewards import (
    REGISTRY,
    accuracy_reward,
    answers_match,
    demo_reward,
    demo_shaping_reward,
    get_cosine_scaled_reward,
    get_length_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    load_reward,
    make_reward,
    parse_number,
    reasoning_accuracy_reward,
    think_format_reward,
)


def msg(text):
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------------------------------
# accuracy_reward


@pytest.mark.parametrize("text, value", [
    ("12", 12), ("12.0", 12), ("1,200", 1200), ("-3", -3), ("3/4", 0.75), (r"\frac{3}{4}", 0.75),
    (r"\dfrac{1}{3}", 1 / 3), ("$12", 12), ("50%", 50), ("12.", 12), (" 7 ", 7), (r"1{,}200", 1200), (".5", 0.5),
])
def test_parse_number(text, value):
    assert float(parse_number(text)) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", ["", "twelve", "12 apples and 3", "x+1", "1/0"])
def test_parse_number_refuses_non_numbers(text):
    assert parse_number(text) is None


def test_accuracy_reward_numbers_boxed_and_missing_gold():
    completions = [
        "7 + 5 = 12",                        # last number
        "The answer is 12.0.",               # 12.0 == 12
        r"So \boxed{12}. Check: 13",         # boxed wins over later numbers
        "I think 11",                        # wrong
        "no number here",                    # nothing to compare
        "It costs 1,200 dollars",            # thousands separator
        r"\boxed{\frac{1}{3}}",              # fraction
        "12",                                # gold missing -> None
        "12",                                # gold missing (None) -> None
        r"\boxed{\frac{1}{2}}",              # wrong fraction
        r"x = \boxed{\text{Paris}}",         # non-numeric gold compared as text
    ]
    solution = ["12", "12", "12", "12", "12", "1200", r"\frac{1}{3}", "", None, r"$\frac{1}{3}$", r"\boxed{paris}"]
    assert accuracy_reward(completions, solution=solution) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, None, None,
                                                               0.0, 1.0]


def test_accuracy_reward_message_completions_answer_column_and_logs():
    logged = {}
    out = accuracy_reward([msg("so 6 x 7 = 42"), msg("41")], answer=["42", "42"],
                          log_extra=lambda col, vals: logged.setdefault(col, vals))
    assert out == [1.0, 0.0]
    assert logged == {"solution": ["42", "42"], "gold_parsed": ["42", "42"], "answer_parsed": ["42", "41"]}
    with pytest.raises(ValueError, match="'solution' or 'answer'"):
        accuracy_reward(["1"], task=["x"])


def test_answers_match_is_exact_on_values():
    assert answers_match("24/2", "12") and answers_match("0.75", "3/4") and not answers_match("0.333", "1/3")
    assert not answers_match(None, "1") and not answers_match("12", "twelve")


def test_reasoning_accuracy_reward():
    completions = ["<think>maybe 11</think> it is 12", "<think>12 I guess", "<think>x</think> 11", "a</think>12"]
    assert reasoning_accuracy_reward(completions, solution=["12", "12", "12", ""]) == [1.0, 0.0, 0.0, None]
    assert reasoning_accuracy_reward(["<think>x</think> 12"], solution=[""]) == [None]
    assert reasoning_accuracy_reward(["<think>x<end> 12"], solution=["12"], reasoning_delimiters=["<end>"]) == [1.0]


def test_cosine_scaled_reward_by_hand():
    f = get_cosine_scaled_reward(max_len=100)
    assert f.__name__ == "cosine_scaled_reward"
    ids = [[1] * 50, [1] * 50, [1] * 0, [1] * 0, [1] * 200, [1] * 200, [1] * 10]
    out = f(completions=["12", "13", "12", "13", "12", "13", "12"], completion_ids=ids,
            solution=["12"] * 6 + [""])
    # half-way: cos(pi/2) = 0 -> the middle of each range; at 0 the short end; past max_len the long end
    assert out[:6] == pytest.approx([0.75, -0.75, 1.0, -1.0, 0.5, -0.5]) and out[6] is None


# --------------------------------------------------------------------------------------------------
# think_format_reward


def test_think_format_reward():
    completions = [
        "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",  # the documented pass
        "<think>\nThis is my reasoning.\nThis is my answer.",            # never closed
        "<think>a</think>",                                              # empty answer is allowed
        "<think>a<think>b</think>c",                                     # a second <think>
        " <think>a</think>b",                                            # must open at the start
        "answer <think>a</think>",                                       # reasoning after the answer
    ]
    assert think_format_reward(completions) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert think_format_reward([msg(completions[0])]) == [1.0]


# --------------------------------------------------------------------------------------------------
# length and repetition


def test_soft_overlong_punishment_formula():
    f = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert f.__name__ == "soft_overlong_punishment_reward"
    lengths = [0, 80, 90, 100, 101]
    assert f(completion_ids=[[1] * n for n in lengths]) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert get_soft_overlong_punishment(10, 0)(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(10, 11)


def test_repetition_penalty_reward():
    f = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    assert f.__name__ == "repetition_penalty_reward"
    # [5,5,5,5,5]: bigrams (5,5) x4, 1 distinct -> 1 - 1/4 = 0.75
    assert f(completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5], [7], [1, 2, 1, 2]]) == pytest.approx([0.0, -0.75, 0.0, -1 / 3])
    assert get_repetition_penalty_reward()(completion_ids=[[1, 2, 3] * 3]) == [pytest.approx(-(1 - 3 / 7))]
    with pytest.raises(ValueError, match="max_penalty"):
        get_repetition_penalty_reward(max_penalty=0.5)


def test_length_reward():
    f = get_length_reward(10)
    assert f.__name__ == "length_reward"
    assert f(completions=["x"] * 4, completion_ids=[[1] * n for n in (10, 5, 15, 30)]) == [1.0, 0.5, 0.5, 0.0]
    words = get_length_reward(4, unit="words")
    assert words(completions=[msg("a b c d"), "a b"], completion_ids=[[], []]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="unit"):
        get_length_reward(4, unit="chars")


def test_same_values_as_trl_on_random_inputs():
    trl_rewards = pytest.importorskip("trl.rewards")
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "a", "\n", " ", "b"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(500)]
    assert think_format_reward([msg(t) for t in texts]) == trl_rewards.think_format_reward([msg(t) for t in texts])
    ids = [[rng.randint(0, 3) for _ in range(rng.randint(0, 40))] for _ in range(300)]
    for cap, cache in ((30, 10), (20, 0), (40, 40)):
        assert get_soft_overlong_punishment(cap, cache)(completion_ids=ids) == pytest.approx(
            trl_rewards.get_soft_overlong_punishment(cap, cache)(completion_ids=ids))
    for n, p in ((1, -1.0), (3, -0.5)):
        assert get_repetition_penalty_reward(n, p)(completion_ids=ids) == pytest.approx(
            trl_rewards.get_repetition_penalty_reward(n, p)(completion_ids=ids))


# --------------------------------------------------------------------------------------------------
# the demo tasks


def _columns(rows):
    return {k: [r[k] for r in rows] for k in ("task", "answer", "constraint", "max_words")}


def test_demo_reward_is_the_verifier_and_none_off_task():
    rows = demo.demo_dataset("eval", n=40)
    texts = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    both = rows + rows
    assert demo_reward([msg(t) for t in texts], **_columns(both)) == [float(demo.verify(r, t)) for r, t in
                                                                     zip(both, texts)]
    assert demo_reward(["x"], task=[""], answer=[""], constraint=[""], max_words=[0]) == [None]
    with pytest.raises(ValueError, match="'task' column"):
        demo_reward(["x"], answer=["1"])


def test_demo_shaping_is_one_exactly_when_the_verifier_passes():
    rows = demo.demo_dataset("eval", n=80)
    rng = random.Random(0)
    texts, both = [], []
    for r in rows:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        words = chosen.split()
        for t in (chosen, rejected, " ".join(rng.sample(words, len(words))), chosen.upper(), chosen + " extra",
                  '"' + chosen, r["answer"], ""):
            texts.append(t)
            both.append(r)
    shaped = demo_shaping_reward(texts, **_columns(both))
    for r, t, s in zip(both, texts, shaped):
        assert 0.0 <= s <= 1.0
        assert (s == 1.0) == demo.verify(r, t), (r["task"], r.get("constraint"), t, s)


def test_demo_shaping_partial_credit_by_hand():
    def one(text, **row):
        return demo_shaping_reward([text], **{k: [v] for k, v in row.items()})[0]

    assert one("12", task="number_only", answer="12") == 1.0
    assert one("The answer is 12.", task="number_only", answer="12") == 0.5 + 0.5 / 4
    assert one("13", task="number_only", answer="12") == 0.5  # brevity only
    assert one("7 + 5 = 12.", task="arithmetic", answer="12") == 1.0
    assert one("7 + 5 = 13.", task="arithmetic", answer="12") == pytest.approx(0.25 * (1 - 1 / 12))  # 12 absent; 13 is 1/12 away
    assert one("Tuesday comes after Monday.", task="concise", answer="Tuesday", max_words=15) == 1.0
    assert one("It is Tuesday " + "x " * 26, task="concise", answer="Tuesday", max_words=15) == pytest.approx(
        0.5 + 0.5 * 15 / 29)
    assert one("Tuesday!", task="constraint", answer="Tuesday", constraint="exclamation") == 1.0
    assert one("Tuesday! ok", task="constraint", answer="Tuesday", constraint="exclamation") == 0.75
    assert one('"Tuesday', task="constraint", answer="Tuesday", constraint="quoted") == 0.75
    assert one("TUESDay", task="constraint", answer="Tuesday", constraint="uppercase") == 0.5 + 0.5 * 5 / 7


# --------------------------------------------------------------------------------------------------
# registry and load_reward


class _Cfg:
    max_completion_length = 64


def test_registry_names_and_make_reward():
    assert set(REGISTRY) == {"accuracy", "reasoning_accuracy", "cosine_scaled", "think_format", "soft_overlong_punishment", "repetition_penalty", "length",
                             "demo", "demo_shaping"}
    assert make_reward("accuracy") is accuracy_reward
    f = make_reward("soft_overlong_punishment(soft_punish_cache=16)", _Cfg())
    assert (f.max_completion_len, f.soft_punish_cache) == (64, 16)
    assert make_reward("soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)", _Cfg()).max_completion_len == 8
    assert make_reward("repetition_penalty").ngram_size == 3
    assert make_reward("cosine_scaled", _Cfg()).max_len == 64
    assert make_reward("length(target_len=20, unit='words')").unit == "words"
    with pytest.raises(ValueError, match="needs soft_punish_cache"):
        make_reward("soft_overlong_punishment", _Cfg())
    with pytest.raises(ValueError, match="needs target_len"):
        make_reward("length")
    with pytest.raises(ValueError, match="no argument 'target'"):
        make_reward("length(target=3)")
    with pytest.raises(ValueError, match="takes no arguments"):
        make_reward("accuracy(x=1)")
    with pytest.raises(ValueError, match="not a built-in reward"):
        make_reward("acuracy")


def test_load_reward_forms(tmp_path):
    assert load_reward("demo") is demo_reward
    assert load_reward("length(target_len=5)").target_len == 5
    assert load_reward("preftune.rewards:think_format_reward") is think_format_reward
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    assert load_reward(f"{tmp_path / 'my_rewards.py'}:short")(["a"]) == [1.0]
    assert load_reward(str(tmp_path)) == str(tmp_path)  # a reward model folder, loaded by RewardFunctions
    assert load_reward("org/reward-model") == "org/reward-model"
    assert load_reward(think_format_reward) is think_format_reward
    with pytest.raises(ValueError, match="not a built-in reward"):
        load_reward("no_such_reward")
    with pytest.raises(ValueError, match="has no attribute"):
        load_reward("preftune.rewards:nope")


# --------------------------------------------------------------------------------------------------
# RewardFunctions: the calling convention


def _recorder(name, calls, value=1.0):
    def f(**kwargs):
        calls.append(kwargs)
        return [value] * len(kwargs["completions"])
    f.__name__ = name
    return f


def test_calling_convention_standard():
    calls = []
    rf = RewardFunctions([_recorder("rec", calls)])
    state = object()
    out = rf(["p1", "p1"], [" a", " b"], [[1], [2, 3]],
             {"prompt": ["p1", "p1"], "solution": ["x", "x"], "level": [1, 1]}, trainer_state=state)
    (kw,) = calls
    assert set(kw) == {"prompts", "completions", "completion_ids", "solution", "level", "trainer_state",
                       "log_extra", "log_metric"}
    assert kw["prompts"] == ["p1", "p1"] and kw["completions"] == [" a", " b"]
    assert kw["completion_ids"] == [[1], [2, 3]] and kw["solution"] == ["x", "x"] and kw["trainer_state"] is state
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (2, 1)
    assert rf.names == ["rec"]


def test_calling_convention_conversational_and_names():
    calls = []
    prompt = [{"role": "user", "content": "hi"}]
    partial = functools.partial(_recorder("inner", calls), extra=1)

    class Scorer:
        def __call__(self, completions, **kwargs):
            return [0.5] * len(completions)

    rf = RewardFunctions([partial, Scorer(), think_format_reward])
    out = rf([prompt, prompt], [msg("x"), msg("<think>a</think>b")], [[1], [2]], {"task": ["t", "t"]})
    assert rf.names == ["inner", "Scorer", "think_format_reward"]
    assert calls[0]["prompts"] == [prompt, prompt] and calls[0]["completions"][1] == msg("<think>a</think>b")
    assert calls[0]["extra"] == 1
    assert out.rewards.tolist() == [[1.0, 0.5, 0.0], [1.0, 0.5, 1.0]]


def test_none_is_nan_and_log_extra_log_metric():
    def partly(completions, log_extra, log_metric, **kwargs):
        log_extra("why", ["a", "b", "c"])
        log_metric("judge/calls", 3.0)
        return [1.0, None, 0.25]

    out = RewardFunctions(partly)(["p"] * 3, ["a", "b", "c"], [[1]] * 3, {})
    assert out.rewards[0, 0] == 1.0 and math.isnan(out.rewards[1, 0]) and out.rewards[2, 0] == 0.25
    assert out.logs == {"why": ["a", "b", "c"]} and out.metrics == {"judge/calls": [3.0]}


def test_all_none_warns_once_per_function_and_rows_with_no_reward_are_logged(caplog):
    def never(completions, **kwargs):
        return [None] * len(completions)

    rf = RewardFunctions(never)
    with pytest.warns(UserWarning, match="'never' returned None for every completion"), \
            caplog.at_level(logging.WARNING, logger="preftune.grpo.rewards"):
        out = rf(["p"], ["a"], [[1]], {})
    assert torch.isnan(out.rewards).all()
    assert "every reward function returned None" in caplog.text
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf(["p"], ["a"], [[1]], {})  # warned once already


# --------------------------------------------------------------------------------------------------
# RewardFunctions: async


def test_async_functions_run_concurrently():
    # Each waits for the other's event: run one after the other, the first would wait forever (the
    # timeout turns that into a failure instead of a hang).
    events = {}

    def make(me, other):
        async def f(completions, **kwargs):
            events.setdefault(me, asyncio.Event()).set()
            await asyncio.wait_for(events.setdefault(other, asyncio.Event()).wait(), timeout=10)
            return [1.0] * len(completions)
        f.__name__ = me
        return f

    rf = RewardFunctions([make("a", "b"), think_format_reward, make("b", "a")])
    try:
        out = rf(["p"], ["x"], [[1]], {})
        assert out.rewards.tolist() == [[1.0, 0.0, 1.0]] and rf.names == ["a", "think_format_reward", "b"]
        events.clear()
        assert rf(["p"], ["x"], [[1]], {}).rewards.tolist() == [[1.0, 0.0, 1.0]]  # the loop is reused
    finally:
        rf.close()


def test_async_callable_instance_and_its_errors():
    class Judge:
        async def __call__(self, completions, **kwargs):
            return [2.0] * len(completions)

    async def broken(prompts, **kwargs):
        raise RuntimeError("judge unreachable")

    rf = RewardFunctions([Judge(), broken])
    try:
        with pytest.raises(RewardError, match=r"'broken' raised RuntimeError: judge unreachable.*'What is 2\+2\?'") as e:
            rf(["What is 2+2?"], ["4"], [[1]], {})
        assert isinstance(e.value.__cause__, RuntimeError)
    finally:
        rf.close()


# --------------------------------------------------------------------------------------------------
# RewardFunctions: errors


def test_raising_function_names_itself_and_the_prompt():
    def picky(completions, solution, **kwargs):
        raise KeyError("solution format")

    with pytest.raises(RewardError, match=r"'picky' raised KeyError.*first prompt is 'Q: 7\+5'") as e:
        RewardFunctions(picky)(["Q: 7+5", "Q: 7+5"], ["12", "13"], [[1], [2]], {"solution": ["12", "12"]})
    assert isinstance(e.value.__cause__, KeyError)


@pytest.mark.parametrize("returned, match", [
    ([1.0], r"'bad' returned 1 rewards but 2 were expected"),
    ([1.0, 2.0, 3.0], r"returned 3 rewards but 2 were expected"),
    (1.0, r"'bad' returned a float: expected a list of 2"),
    (None, r"returned a NoneType"),
    ([1.0, "high"], r"'bad' returned 'high' \(str\) for completion 1: expected a float or None"),
])
def test_wrong_count_or_type_is_an_error(returned, match):
    def bad(completions, **kwargs):
        return returned

    with pytest.raises(RewardError, match=match):
        RewardFunctions(bad)(["p", "p"], ["a", "b"], [[1], [2]], {})


def test_numpy_and_tensor_returns_are_accepted():
    np = pytest.importorskip("numpy")
    rf = RewardFunctions([lambda completions, **kw: np.array([1.0, 2.0]),
                          lambda completions, **kw: torch.tensor([3.0, float("nan")]),
                          lambda completions, **kw: [np.float32(0.5), torch.tensor(1.5)]])
    out = rf(["p", "p"], ["a", "b"], [[1], [2]], {}).rewards
    assert out[:, 0].tolist() == [1.0, 2.0] and out[0, 1] == 3.0 and math.isnan(out[1, 1])
    assert out[:, 2].tolist() == [0.5, 1.5]


def test_bad_columns_and_set_up_errors():
    rf = RewardFunctions(think_format_reward)
    with pytest.raises(ValueError, match="column 'trainer_state'"):
        rf(["p"], ["a"], [[1]], {"trainer_state": [1]})
    with pytest.raises(ValueError, match="column 'level' has 2 values for 1 completions"):
        rf(["p"], ["a"], [[1]], {"level": [1, 2]})
    with pytest.raises(ValueError, match="reward_processing_classes has 2 entries"):
        RewardFunctions(think_format_reward, reward_processing_classes=[None, None])
    with pytest.raises(TypeError, match=r"reward_funcs\[0\] is a int"):
        RewardFunctions([3])


# --------------------------------------------------------------------------------------------------
# RewardFunctions: reward models


@pytest.fixture
def reward_model_dir(tmp_path):
    from transformers import LlamaForSequenceClassification

    from preftune.testing import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(num_labels=1))
    path = tmp_path / "tiny-rm"
    model.save_pretrained(path)
    tiny_tokenizer(pad_token=None).save_pretrained(path)  # no pad token: RewardFunctions sets it to EOS
    return path


def _direct_scores(path, texts):
    from transformers import AutoModelForSequenceClassification

    from preftune.testing import tiny_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for t in texts:  # one unpadded row at a time: no padding to get wrong
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_reward_model_by_path_matches_a_direct_forward(reward_model_dir):
    rf = RewardFunctions(str(reward_model_dir), batch_size=2)
    assert rf.names == ["tiny-rm"]
    assert rf.processing_classes[0].pad_token == "<|im_end|>"
    assert rf.funcs[0].config.pad_token_id == rf.processing_classes[0].pad_token_id
    prompts, completions = ["Q: 1+1?", "Q: 1+1?", "Tell a story"], [" 2", " two, I think", " Once"]
    out = rf(prompts, completions, [[1], [2], [3]], {})
    expected = _direct_scores(reward_model_dir, [p + c for p, c in zip(prompts, completions)])
    assert out.rewards[:, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_model_conversational_applies_the_chat_template(reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    from preftune.testing import tiny_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    tok = tiny_tokenizer()
    rf = RewardFunctions([model, think_format_reward], reward_processing_classes=[tok, None])
    prompt = [{"role": "user", "content": "Say hi"}]
    completions = [msg("hi"), msg("<think>x</think>hello there")]
    out = rf([prompt, prompt], completions, [[1], [2]], {})
    texts = [tok.apply_chat_template(prompt + c, tokenize=False) for c in completions]
    assert texts[0].endswith("<|im_start|>assistant\nhi<|im_end|>\n")
    assert out.rewards[:, 0].tolist() == pytest.approx(_direct_scores(reward_model_dir, texts), abs=1e-5)
    assert out.rewards[:, 1].tolist() == [0.0, 1.0]


def test_reward_model_errors_name_the_model(reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    model.train()
    rf = RewardFunctions(model, reward_processing_classes=__import__("preftune.testing").testing.tiny_tokenizer())
    assert not model.training
    with pytest.raises(RewardError, match="reward model 'tiny-rm' raised .*first prompt is 'p'"):
        rf(["p"], [42], [[1]], {})  # a completion that is not text


def test_reward_model_path_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded as a sequence-classification model"):
        RewardFunctions(str(tmp_path))


def test_an_infinite_reward_is_refused_by_name():
    from preftune.grpo.rewards import RewardError, RewardFunctions

    def huge(completions, **kwargs):
        return [1.0, float("-inf")]

    with pytest.raises(RewardError, match="'huge' returned -inf for completion 1"):
        RewardFunctions(huge)(["a", "b"], ["x", "y"], [[1], [2]], {})
