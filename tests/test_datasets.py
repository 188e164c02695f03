"""Datasets as TRL's DPOTrainer takes them, with `datasets`' own classes: streams (`IterableDataset`,
`IterableDatasetDict`) with max_steps, named eval sets (a dict, `DatasetDict`) logged as ``eval_<name>_``,
the required train_dataset, and `trainer.train_dataset` / `trainer.eval_dataset`.

Each streamed result is checked against its map-style twin: the same rows as a `datasets.Dataset`."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from preftune import DPOConfig, DPOTrainer
from preftune.data import pipeline
from preftune.data.demo import demo_dataset
from preftune.data.pipeline import FROM_CONFIG, StepPlan
from preftune.testing import tiny_model, tiny_tokenizer

VOCAB = 300


def rows(n: int, start: int = 0) -> list[dict]:
    """n distinct standard pairs: row i is told apart by its prompt."""
    return [{"prompt": f"Question {i}: say yes?", "chosen": f" yes {i}", "rejected": f" no no {i}"}
            for i in range(start, start + n)]


def stream(data: list[dict], counter: list | None = None) -> IterableDataset:
    """`data` as a real streaming dataset; `counter` (a list) gets one entry per row the stream yields."""

    def gen():
        for row in data:
            if counter is not None:
                counter.append(row["prompt"])
            yield row

    return IterableDataset.from_generator(gen)


def endless() -> IterableDataset:
    def gen():
        for i in itertools.count():
            yield rows(1, i)[0]

    return IterableDataset.from_generator(gen)


def config(tmp_path, name: str = "out", **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                per_device_eval_batch_size=4, logging_steps=1, save_strategy="no", max_length=96,
                max_prompt_length=64, learning_rate=1e-2, seed=0, report_to=["none"], use_cpu=True)
    base.update(kw)
    return DPOConfig(**base)


def make(tmp_path, train, eval_dataset=None, *, name: str = "out", **kw) -> DPOTrainer:
    return DPOTrainer(model=tiny_model(VOCAB), args=config(tmp_path, name, **kw), train_dataset=train,
                      eval_dataset=eval_dataset, processing_class=tiny_tokenizer())


def weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def metric_rows(trainer) -> list[dict]:
    return [json.loads(x) for x in (Path(trainer.args.output_dir) / "metrics.jsonl").read_text().splitlines()]


def trained_indices(trainer) -> list[list[int]]:
    """The sample indices of each micro-batch the loop trains on (a spy on `_sample_losses`)."""
    seen, inner = [], trainer._sample_losses

    def spy(indices):
        seen.append(list(indices))
        return inner(indices)

    trainer._sample_losses = spy
    return seen


# ------------------------------------------------------------------------------- streams for training


def test_a_stream_trains_on_its_first_max_steps_x_batch_rows_in_order(tmp_path):
    counter = []
    trainer = make(tmp_path, stream(rows(40), counter), max_steps=3, per_device_train_batch_size=2)
    assert len(trainer.train_split) == 6  # max_steps x global batch, not the stream's 40 rows
    assert [p.prompt for p in trainer.train_split.rows] == [r["prompt"] for r in rows(6)]
    assert len(counter) <= 6 + 1  # the rest of the stream is never read
    seen = trained_indices(trainer)
    trainer.train()
    assert seen == [[0, 1], [2, 3], [4, 5]]  # the stream's order: not shuffled, as HF's Trainer takes a stream
    assert trainer.state.global_step == 3


def test_a_stream_trains_like_the_same_rows_as_a_dataset(tmp_path):
    """One optimizer step over 4 pairs (2 x 2 accumulation): the gradient sums the same 4 pairs whatever their
    order, so the stream (first 4 of 9 rows) and a Dataset of exactly those 4 rows end at the same weights."""
    kw = dict(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    streamed = make(tmp_path, stream(rows(9)), name="stream", **kw)
    streamed.train()
    mapped = make(tmp_path, Dataset.from_list(rows(4)), name="map", **kw)
    mapped.train()
    a, b = weights(streamed), weights(mapped)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)
    other = make(tmp_path, Dataset.from_list(rows(4, start=4)), name="other", **kw)
    other.train()
    assert any(not torch.allclose(a[n], weights(other)[n], atol=1e-6) for n in a)  # the check can fail


def test_a_stream_makes_up_for_skipped_rows_and_an_endless_stream_trains(tmp_path):
    data = rows(8)
    data[1] = {"prompt": "broken", "chosen": None, "rejected": " no"}
    trainer = make(tmp_path, stream(data), max_steps=2, bad_rows="skip")
    assert [p.prompt for p in trainer.train_split.rows] == [data[i]["prompt"] for i in (0, 2, 3, 4)]
    assert len(trainer.train_split.skipped) == 1
    endless_run = make(tmp_path, endless(), name="endless", max_steps=2)
    assert len(endless_run.train_split) == 4
    endless_run.train()
    assert endless_run.state.global_step == 2


def test_a_short_stream_is_gone_over_again_in_order(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    trainer = make(tmp_path, stream(rows(5)), max_steps=4)
    assert "ended after 5 usable pairs, fewer than the 8" in caplog.text
    seen = trained_indices(trainer)
    trainer.train()
    assert seen == [[0, 1], [2, 3], [0, 1], [2, 3]]  # whole global batches, the tail pair left out


def test_a_stream_needs_max_steps(tmp_path):
    with pytest.raises(ValueError, match=r"args.max_steps must be set to a positive value.*was -1.*IterableDataset"):
        DPOTrainer(args=config(tmp_path, max_steps=-1), train_dataset=stream(rows(4)))


def test_precompute_true_refuses_a_stream_and_the_automatic_precompute_covers_it(tmp_path):
    message = r"`precompute_ref_log_probs=True` is not supported with IterableDataset"
    with pytest.raises(ValueError, match=message):
        DPOTrainer(args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=stream(rows(4)))
    with pytest.raises(ValueError, match=message):
        DPOTrainer(args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=rows(4),
                   eval_dataset={"s": stream(rows(4))})
    explicit = make(tmp_path, rows(4), name="explicit", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=message):
        explicit.evaluate(stream(rows(4)))
    auto = make(tmp_path, stream(rows(20)), name="auto", max_steps=2)  # default: the run's pairs, precomputed
    auto.train()
    assert auto.reference.needs_forward is False
    assert auto.reference.table.shape[0] == 4 and not torch.isnan(auto.reference.table).any()
    live = make(tmp_path, stream(rows(20)), name="live", max_steps=2, precompute_ref_log_probs=False)
    live.train()
    for x, y in zip(metric_rows(live), metric_rows(auto), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_step_plan_without_shuffle_keeps_the_order_and_the_default_still_shuffles():
    ordered = StepPlan(10, 2, 1, 1, seed=3, shuffle=False)
    assert ordered.permutation(0) == ordered.permutation(5) == list(range(10))
    shuffled = StepPlan(10, 2, 1, 1, seed=3)
    assert shuffled.permutation(0) != list(range(10))
    assert sorted(shuffled.permutation(0)) == list(range(10))


# ----------------------------------------------------------------------------- streams for evaluation


def test_a_stream_is_evaluated_whole_like_the_same_rows_as_a_dataset(tmp_path):
    trainer = make(tmp_path, rows(4), stream(rows(7, start=50)))
    assert len(trainer.eval_split) == 7
    from_stream = trainer.evaluate()
    assert from_stream == pytest.approx(trainer.evaluate(Dataset.from_list(rows(7, start=50))))
    assert from_stream == pytest.approx(trainer.evaluate(stream(rows(7, start=50))))
    other = trainer.evaluate(rows(7, start=60))["eval_logps/chosen"]
    assert from_stream["eval_logps/chosen"] != pytest.approx(other, abs=1e-4)  # the check can fail


def test_an_unbounded_eval_stream_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_STREAM_EVAL_ROWS", 12)
    with pytest.raises(ValueError, match=r"eval data \(IterableDataset\): the stream has more than 12 rows.*take"):
        make(tmp_path, rows(4), endless())
    assert len(make(tmp_path, rows(4), endless().take(12)).eval_split) == 12


# ----------------------------------------------------------------------------------- named eval sets


def test_named_eval_sets_are_each_evaluated_with_their_prefix(tmp_path):
    sets = {"easy": Dataset.from_list(rows(4, start=100)), "hard": stream(rows(5, start=200))}
    trainer = make(tmp_path, rows(4), sets, eval_strategy="steps", eval_steps=1, max_steps=2,
                   precompute_ref_log_probs=False)
    assert set(trainer.eval_split) == {"easy", "hard"}
    trainer.train()
    evals = [r for r in metric_rows(trainer) if any(k.startswith("eval_") for k in r)]
    assert len(evals) == 2 and all({"eval_easy_loss", "eval_hard_loss"} <= set(r) for r in evals)
    assert not any("eval_loss" in r for r in evals)
    after = trainer.evaluate()
    assert {k for k in after if k.endswith("_loss")} == {"eval_easy_loss", "eval_hard_loss"}
    assert after["eval_hard_rewards/margins"] != 0.0
    alone = trainer.evaluate(Dataset.from_list(rows(5, start=200)))  # the twin: one set, evaluated alone
    assert {f"eval_hard_{k[5:]}": v for k, v in alone.items()} == pytest.approx(
        {k: v for k, v in after.items() if k.startswith("eval_hard_")})
    assert after["eval_easy_logps/chosen"] != pytest.approx(after["eval_hard_logps/chosen"], abs=1e-4)
    assert trainer.evaluate("easy")["eval_loss"] == pytest.approx(after["eval_easy_loss"])  # a name selects a set
    assert trainer.evaluate(metric_key_prefix="test") == pytest.approx(
        {k.replace("eval_", "test_", 1): v for k, v in after.items()})


def test_named_eval_sets_read_the_same_reference_precomputed_or_live(tmp_path):
    """The automatic precompute covers each named eval set: after training, its tables give what a live
    (frozen) reference gives."""
    sets = {"a": rows(4, start=100), "b": rows(3, start=200)}
    cached = make(tmp_path, rows(4), sets, name="cached")
    cached.train()
    assert set(cached._eval_reference_tables) == {"eval_a", "eval_b"}
    live = make(tmp_path, rows(4), sets, name="live", precompute_ref_log_probs=False)
    live.train()
    got, want = cached.evaluate(), live.evaluate()
    assert want["eval_a_rewards/margins"] != 0.0
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_a_dataset_dict_for_evaluation_is_a_set_of_named_eval_sets(tmp_path):
    dd = DatasetDict({"validation": Dataset.from_list(rows(3, start=10)), "test": Dataset.from_list(rows(4, start=20))})
    trainer = make(tmp_path, rows(4), dd)
    metrics = trainer.evaluate()
    assert {"eval_validation_loss", "eval_test_loss"} <= set(metrics)
    idd = IterableDatasetDict({"validation": stream(rows(3, start=10)), "test": stream(rows(4, start=20))})
    assert make(tmp_path, rows(4), idd, name="s").evaluate() == pytest.approx(metrics)
    assert trainer.evaluate(idd) == pytest.approx(metrics)  # a dict given to evaluate() too


def test_a_dataset_dict_for_training_is_refused_as_trl_refuses_it(tmp_path):
    dd = DatasetDict({"train": Dataset.from_list(rows(4)), "test": Dataset.from_list(rows(2))})
    with pytest.raises(TypeError, match=r"`train_dataset` must be a `Dataset` or `IterableDataset`, got `DatasetDict`"
                                        r".*\['test', 'train'\].*dataset\['train'\]"):
        DPOTrainer(args=config(tmp_path), train_dataset=dd)
    with pytest.raises(TypeError, match="got `IterableDatasetDict`"):
        DPOTrainer(args=config(tmp_path), train_dataset=IterableDatasetDict({"train": stream(rows(4))}))
    trainer = make(tmp_path, dd["train"], dd)  # a split of it trains; the dict evaluates by name
    assert {"eval_train_loss", "eval_test_loss"} <= set(trainer.evaluate())


# ------------------------------------------------------------------------- required train_dataset, attributes


def test_train_dataset_is_required(tmp_path):
    with pytest.raises(ValueError, match=r"`train_dataset` is required"):
        DPOTrainer(args=config(tmp_path))  # before any model is loaded: no model argument needed
    with pytest.raises(ValueError, match=r"`train_dataset` is required"):
        DPOTrainer(model=tiny_model(VOCAB), args=config(tmp_path, dataset_name="data.jsonl"),
                   processing_class=tiny_tokenizer())  # never a silent fallback to the config's data


def test_the_config_data_is_read_when_asked_for(tmp_path):
    trainer = make(tmp_path, FROM_CONFIG, demo_train_size=6, demo_eval_size=3)
    assert trainer.train_dataset == demo_dataset("train", n=6)
    assert trainer.eval_dataset == demo_dataset("eval", n=3)
    assert (len(trainer.train_split), len(trainer.eval_split)) == (6, 3)


def test_train_dataset_and_eval_dataset_are_the_objects_given(tmp_path):
    train, sets = Dataset.from_list(rows(4)), {"x": stream(rows(3))}
    trainer = make(tmp_path, train, sets)
    assert trainer.train_dataset is train and trainer.eval_dataset is sets
    plain = make(tmp_path, rows(4), name="plain")
    assert plain.train_dataset == rows(4) and plain.eval_dataset is None
    streamed = stream(rows(8))
    assert make(tmp_path, streamed, name="s").train_dataset is streamed


def test_a_stream_collated_ahead_by_loader_workers_trains_the_same(tmp_path):
    here = make(tmp_path, stream(rows(12)), name="here", max_steps=3)
    here.train()
    ahead = make(tmp_path, stream(rows(12)), name="ahead", max_steps=3, dataloader_num_workers=1)
    assert ahead._plan()[0].permutation(0) == list(range(6))
    ahead.train()
    a, b = weights(here), weights(ahead)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=0, rtol=0)
