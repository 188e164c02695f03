"""preftune.data.pipeline: sources -> tokenized splits, drop reports, and the StepPlan data order."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from preftune.config import DPOConfig
from preftune.data.demo import demo_dataset
from preftune.data.pipeline import StepPlan, prepare_one, prepare_splits, report_skips, resolve_sources
from preftune.testing import tiny_tokenizer


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(start, start + n)]


def args(**kw) -> DPOConfig:
    return DPOConfig(**{"max_length": 64, "max_prompt_length": 32, "output_dir": "unused", **kw})


# ------------------------------------------------------------------------------------------ sources


def test_resolve_sources():
    assert resolve_sources(SimpleNamespace(dataset_name=None, eval_dataset=None)) == (("demo", "train"),
                                                                                     ("demo", "eval"), None)
    assert resolve_sources(SimpleNamespace(dataset_name="d.jsonl", eval_dataset="0.25")) == ("d.jsonl", None, 0.25)
    assert resolve_sources(SimpleNamespace(dataset_name="d.jsonl", eval_dataset=0.1)) == ("d.jsonl", None, 0.1)
    assert resolve_sources(SimpleNamespace(dataset_name="d.jsonl", eval_dataset="e.jsonl")) == ("d.jsonl",
                                                                                                "e.jsonl", None)
    with pytest.raises(ValueError, match="eval_dataset='1.5'.*in \\(0, 1\\)"):
        resolve_sources(SimpleNamespace(dataset_name="d.jsonl", eval_dataset="1.5"))


def test_demo_data_is_the_default(tmp_path):
    train, ev = prepare_splits(args(demo_train_size=12, demo_eval_size=5), tiny_tokenizer())
    assert (len(train), len(ev)) == (12, 5)
    assert train.format == "conversational"
    assert [p.prompt for p in train.rows] == [r["prompt"] for r in demo_dataset("train", n=12)]


def test_held_out_fraction_is_disjoint_and_seeded(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(20)))
    a = args(dataset_name=str(path), eval_dataset=0.25, seed=3)
    train, ev = prepare_splits(a, tiny_tokenizer())
    assert (len(train), len(ev)) == (15, 5)
    train_prompts = {p.prompt for p in train.rows}
    eval_prompts = {p.prompt for p in ev.rows}
    assert not train_prompts & eval_prompts and len(train_prompts | eval_prompts) == 20
    again = prepare_splits(a, tiny_tokenizer())[1]
    assert [p.prompt for p in again.rows] == [p.prompt for p in ev.rows]
    assert [f["index"] for f in ev.features] == list(range(5))  # reference-cache rows restart per split


def test_split_name_and_eval_file(tmp_path):
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({"train": Dataset.from_list(rows(6)), "test": Dataset.from_list(rows(3, 100))})
    train, ev = prepare_splits(args(), tiny_tokenizer(), dd, "test")
    assert (len(train), len(ev)) == (6, 3)
    assert ev.rows[0].prompt == "question 100?"
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(2, 50)))
    _, ev = prepare_splits(args(), tiny_tokenizer(), rows(4), str(path))
    assert [p.prompt for p in ev.rows] == ["question 50?", "question 51?"]
    assert len(prepare_one(rows(3), tiny_tokenizer(), args())) == 3


def test_bad_rows_skipped_and_reported(tmp_path):
    data = rows(4) + [{"prompt": "p", "chosen": None, "rejected": "r"}]
    train, _ = prepare_splits(args(bad_rows="skip"), tiny_tokenizer(), data)
    assert len(train) == 4 and len(train.skipped) == 1
    msg = report_skips(train, tmp_path)
    assert msg.startswith("train data: skipped 1 bad rows") and str(tmp_path / "skipped_rows.jsonl") in msg
    assert len((tmp_path / "skipped_rows.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError):
        prepare_splits(args(), tiny_tokenizer(), data)  # bad_rows="error" is the default


def test_drop_report_counts_each_reason(tmp_path):
    data = rows(3) + [{"prompt": "z" * 100, "chosen": "a", "rejected": "b"}]
    train, _ = prepare_splits(args(max_prompt_length=None, max_length=40, truncation_mode="keep_start"), tiny_tokenizer(), data)
    assert len(train) == 3
    assert report_skips(train, None) == "train data: dropped by truncation: prompt_too_long=1"
    clean, _ = prepare_splits(args(), tiny_tokenizer(), rows(3))
    assert report_skips(clean, tmp_path) is None


def test_nothing_left_names_the_split_and_the_fix():
    data = [{"prompt": "z" * 100, "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="train data .*no usable preference pair.*raise max_length"):
        prepare_splits(args(max_prompt_length=None, max_length=40, truncation_mode="keep_start"), tiny_tokenizer(), data)


# ------------------------------------------------------------------------------------------- StepPlan


def test_step_plan_sizes():
    plan = StepPlan(num_samples=50, micro_batch=2, num_processes=3, accumulation=4, seed=0)
    assert plan.global_batch == 24 and plan.steps_per_epoch == 2  # eq. 6.13, tail of 2 left out
    assert plan.total_steps(1.5, -1) == 3 and plan.total_steps(3, 7) == 7


def test_step_plan_same_global_batches_for_any_split():
    """2 processes x K=1 and 1 process x K=2 (same micro-batch) train on the same pairs per step."""
    a = StepPlan(num_samples=17, micro_batch=2, num_processes=1, accumulation=2, seed=5)
    b = StepPlan(num_samples=17, micro_batch=2, num_processes=2, accumulation=1, seed=5)
    for epoch in range(2):
        perm = a.permutation(epoch)
        assert perm == b.permutation(epoch) and sorted(perm) == list(range(17))
        for step in range(a.steps_per_epoch):
            flat_a = [i for mb in a.micro_batches(perm, step, 0) for i in mb]
            flat_b = [i for r in range(2) for mb in b.micro_batches(perm, step, r) for i in mb]
            assert sorted(flat_a) == sorted(flat_b) == sorted(perm[step * 4 : step * 4 + 4])
    assert a.permutation(0) != a.permutation(1)
    assert StepPlan(17, 2, 1, 2, seed=6).permutation(0) != a.permutation(0)


def test_step_plan_epoch_covers_each_pair_once():
    plan = StepPlan(num_samples=12, micro_batch=3, num_processes=1, accumulation=2, seed=1)
    perm = plan.permutation(0)
    seen = [i for s in range(plan.steps_per_epoch) for mb in plan.micro_batches(perm, s, 0) for i in mb]
    assert sorted(seen) == list(range(12))


# ------------------------------------------------------------------------------------ dataset_config


def test_dataset_config_selects_the_configuration_for_train_and_eval(tmp_path, monkeypatch):
    import datasets
    from test_formats import dataset_folder

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    folder = dataset_folder(tmp_path / "prefs")
    train, ev = prepare_splits(args(dataset_name=str(folder), dataset_config="fr", eval_dataset="test"),
                               tiny_tokenizer())
    assert [p.prompt for p in train.rows] == ["salut"] and [p.prompt for p in ev.rows] == ["test"]
    train, ev = prepare_splits(args(dataset_name=str(folder), dataset_config="en"), tiny_tokenizer())
    assert [p.prompt for p in train.rows] == ["hi", "yo"] and ev is None
    # without dataset_config the folder is read as a folder of files, as before
    train, _ = prepare_splits(args(dataset_name=str(folder / "en")), tiny_tokenizer())
    assert len(train) == 2


def test_dataset_config_goes_to_an_eval_hub_name_but_not_to_a_local_eval_file(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_hub(path, split=None, **kw):
        calls.append((path, split, kw.get("name")))
        return datasets.Dataset.from_list(rows(3, 10 if "eval" in path else 0))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    prepare_splits(args(dataset_name="someone/prefs", dataset_config="en", eval_dataset="someone/eval-prefs"),
                   tiny_tokenizer())
    assert calls == [("someone/prefs", "train", "en"), ("someone/eval-prefs", "train", "en")]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(2, 50)))
    _, ev = prepare_splits(args(dataset_name="someone/prefs", dataset_config="en", eval_dataset=str(path)),
                           tiny_tokenizer())
    assert len(ev) == 2 and calls[-1] == ("someone/prefs", "train", "en")


def test_dataset_config_is_refused_without_a_dataset(tmp_path):
    with pytest.raises(ValueError, match="dataset_config='en' .*no dataset_name is set.*unset dataset_config"):
        prepare_splits(args(dataset_config="en"), tiny_tokenizer())
    with pytest.raises(ValueError, match="dataset_config='en': the data is a list in memory"):
        prepare_splits(args(dataset_config="en"), tiny_tokenizer(), rows(4))
