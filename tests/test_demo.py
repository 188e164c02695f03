"""The bundled demo data: determinism, disjoint splits, verifiers, and that it loads and tokenizes."""

from __future__ import annotations

from collections import Counter

import pytest

from preftune.data.demo import (
    CONSTRAINTS,
    DEFAULT_SIZES,
    TASKS,
    demo_dataset,
    prompt_split,
    verify,
    write_demo,
)
from preftune.data.formats import load_rows, normalize
from preftune.data.tokenize import tokenize_dataset
from preftune.testing import tiny_tokenizer


def text(row, key):
    (message,) = row[key]
    return message["content"]


@pytest.fixture(scope="module")
def splits():
    return {split: demo_dataset(split) for split in DEFAULT_SIZES}


def test_default_sizes_and_balanced_tasks(splits):
    assert len(splits["train"]) == 2400 and len(splits["eval"]) == 200
    assert Counter(r["task"] for r in splits["train"]) == {name: 600 for name in TASKS}
    assert Counter(r["task"] for r in splits["eval"]) == {name: 50 for name in TASKS}


def test_same_seed_same_rows_other_seed_other_rows():
    assert demo_dataset("train", n=300, seed=3) == demo_dataset("train", n=300, seed=3)
    assert demo_dataset("train", n=300, seed=3) != demo_dataset("train", n=300, seed=4)
    assert demo_dataset("eval", n=50, seed=1) == demo_dataset("eval", n=50, seed=1)


def test_splits_are_disjoint_and_prompts_unique(splits):
    prompts = {s: [text(r, "prompt") for r in rows] for s, rows in splits.items()}
    for s, ps in prompts.items():
        assert len(set(ps)) == len(ps)
        assert all(prompt_split(p) == s for p in ps)
    assert not set(prompts["train"]) & set(prompts["eval"])
    other_seed = {text(r, "prompt") for r in demo_dataset("eval", seed=7)}
    assert not set(prompts["train"]) & other_seed  # disjoint whatever the seeds


@pytest.mark.parametrize("seed", [0, 1])
def test_verifiers_accept_chosen_and_reject_rejected(splits, seed):
    rows = splits["train"] + splits["eval"] if seed == 0 else demo_dataset("train", n=800, seed=seed)
    for row in rows:
        assert verify(row, text(row, "chosen")), row
        assert not verify(row, text(row, "rejected")), row
        assert TASKS[row["task"]].verify(row, text(row, "chosen"))
    assert {r["constraint"] for r in rows if r["task"] == "constraint"} == set(CONSTRAINTS)


def test_responses_are_short(splits):
    for row in splits["train"]:
        for key in ("chosen", "rejected"):
            assert len(text(row, key).split()) <= 30 and len(text(row, key)) <= 160


def test_verifiers_by_hand():
    num = {"task": "number_only", "answer": "12"}
    assert verify(num, "12") and verify(num, " 12\n")
    assert not verify(num, "12.") and not verify(num, "The answer is 12") and not verify(num, "13")
    ari = {"task": "arithmetic", "answer": "56"}
    assert verify(ari, "7 x 8 = 56.") and verify(ari, "56") and not verify(ari, "7 x 8 = 54.")
    assert not verify(ari, "no idea")
    con = {"task": "concise", "answer": "Tuesday", "max_words": 15}
    assert verify(con, "Tuesday comes after Monday.") and not verify(con, "Monday.")
    assert not verify(con, "Well " * 15 + "Tuesday.")
    row = {"task": "constraint", "answer": "odd"}
    assert verify({**row, "constraint": "uppercase"}, "17 IS ODD.")
    assert not verify({**row, "constraint": "uppercase"}, "17 is odd.")
    assert verify({**row, "constraint": "lowercase"}, "17 is odd.")
    assert not verify({**row, "constraint": "lowercase"}, "17 IS ODD.")
    assert verify({**row, "constraint": "exclamation"}, "17 is odd!")
    assert verify({**row, "constraint": "answer_prefix"}, "Answer: 17 is odd.")
    assert verify({**row, "constraint": "quoted"}, '"17 is odd."')
    assert not verify({**row, "constraint": "quoted"}, '"17 is even."')  # answer must be there too
    with pytest.raises(KeyError, match="not a demo task"):
        verify({"task": "poetry"}, "")


def test_a_subset_of_tasks_is_balanced_and_stays_held_out():
    tasks = ["concise", "constraint"]
    train, held_out = demo_dataset("train", n=400, tasks=tasks), demo_dataset("eval", n=64, tasks=tasks)
    assert Counter(r["task"] for r in train) == {"concise": 200, "constraint": 200}
    assert Counter(r["task"] for r in held_out) == {"concise": 32, "constraint": 32}
    assert not {text(r, "prompt") for r in train} & {text(r, "prompt") for r in held_out}
    assert all(prompt_split(text(r, "prompt")) == "eval" for r in held_out)
    assert demo_dataset("eval", n=8, tasks=list(TASKS)) == demo_dataset("eval", n=8)  # None = all four
    for bad in (["poetry"], []):
        with pytest.raises(ValueError, match="demo tasks"):
            demo_dataset("train", n=4, tasks=bad)


def test_bad_split():
    with pytest.raises(ValueError, match="split='test'"):
        demo_dataset("test")


def test_write_demo_loads_normalizes_and_tokenizes(tmp_path):
    paths = write_demo(tmp_path / "demo", n_train=40, n_eval=8, seed=2)
    assert sorted(paths) == ["eval", "train"] and paths["train"].name == "train.jsonl"
    rows = load_rows(paths["train"])
    assert list(rows) == demo_dataset("train", n=40, seed=2)
    norm = normalize(rows, origin_name="demo")
    assert norm.format == "conversational" and len(norm.pairs) == 40 and not norm.skipped
    out = tokenize_dataset(norm, tiny_tokenizer())
    assert len(out) == 40 and not out.dropped and out.template_note is None
    tok = tiny_tokenizer()
    assert all(f["chosen_ids"][-2:] == [tok.eos_token_id, tok.encode("\n")[0]] for f in out)


def test_rows_load_as_a_dataset():
    import datasets

    rows = demo_dataset("eval", n=20)
    norm = normalize(load_rows(datasets.Dataset.from_list(rows)))
    assert [(p.prompt, p.chosen, p.rejected) for p in norm.pairs] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                      for r in rows]
