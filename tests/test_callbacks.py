"""The HF Trainer's contract around the loop, with transformers' own classes: `TrainerState` (log history,
best metric, saved in checkpoints and restored on resume), `TrainerCallback` events in the HF Trainer's
order through its `CallbackHandler`, the `TrainerControl` flags obeyed, `EarlyStoppingCallback` with
`load_best_model_at_end`, `compute_metrics` with an `EvalPrediction`, `TrainOutput`, `optimizers=` and
the callback list's add/remove/pop. Tiny random models on CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    EarlyStoppingCallback,
    EvalPrediction,
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_utils import TrainOutput

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import conversational_rows, make_trainer, train_rows, weights  # noqa: E402

from preftune import DPOConfig  # noqa: E402
from preftune.config_base import ConfigError  # noqa: E402

EVENTS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_epoch_end", "on_step_begin", "on_pre_optimizer_step",
          "on_optimizer_step", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")
TIMING = ("pairs_per_second", "tokens_per_second", "train_runtime", "train_samples_per_second",
          "train_steps_per_second")


class Recorder(TrainerCallback):
    """Every event with the step it saw and its keyword arguments."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.calls: list[tuple[str, object, object, object, dict]] = []

    def __getattribute__(self, name):
        if name in EVENTS:
            def record(args, state, control, **kwargs):
                self.events.append((name, state.global_step))
                self.calls.append((name, args, state, control, kwargs))
            return record
        return super().__getattribute__(name)


def eval_rows(n: int = 4) -> list[dict]:
    return conversational_rows(n, "eval")


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model" / "model.safetensors"))


# ------------------------------------------------------------------------------------------- events


def test_events_arrive_in_the_hf_trainers_order_with_its_arguments(tmp_path):
    rec = Recorder()
    # 8 pairs, 2 per step: 4 steps an epoch; 6 steps = an epoch and a half
    trainer = make_trainer(tmp_path, conversational_rows(8), eval_rows=eval_rows(), callbacks=[rec], max_steps=6,
                           logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)
    assert rec.events == [("on_init_end", 0)]
    trainer.train()

    def step(n, *after):
        return [("on_step_begin", n - 1), ("on_pre_optimizer_step", n - 1), ("on_optimizer_step", n - 1),
                ("on_step_end", n), *((e, n) for e in after)]

    assert rec.events == [
        ("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0),
        *step(1), *step(2, "on_log"), *step(3, "on_log", "on_evaluate", "on_save"),
        *step(4, "on_log", "on_epoch_end"), ("on_epoch_begin", 4),
        *step(5), *step(6, "on_log", "on_save", "on_epoch_end"),
        ("on_log", 6), ("on_evaluate", 6),  # the run's closing evaluation
        ("on_log", 6), ("on_train_end", 6),  # the summary row (train_loss, ...)
    ]
    for name, args, state, control, kwargs in rec.calls[1:]:  # train() starts a new TrainerState, as the HF Trainer
        assert args is trainer.args and state is trainer.state and isinstance(control, TrainerControl), name
        assert {"model", "processing_class", "optimizer", "lr_scheduler"} <= kwargs.keys(), name
    assert isinstance(trainer.state, TrainerState)
    logs = [kw["logs"] for name, *_, kw in rec.calls if name == "on_log"]
    assert "step" not in logs[0] and logs[0]["epoch"] == 0.5 and math.isfinite(logs[0]["loss"])
    assert "eval_loss" in logs[1] and "train_loss" in logs[-1]
    metrics = [kw["metrics"] for name, *_, kw in rec.calls if name == "on_evaluate"]
    assert all("eval_loss" in m and "eval_rewards/accuracies" in m for m in metrics)
    train_kw = next(kw for name, *_, kw in rec.calls if name == "on_step_end")
    assert train_kw["model"] is trainer.model and train_kw["optimizer"] is trainer.optimizer

    state = trainer.state
    assert (state.global_step, state.max_steps, state.epoch, state.num_train_epochs) == (6, 6, 1.5, 2)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (2, 3, 3)
    # every logged row, train and eval, as the HF Trainer writes them ({..., "epoch", "step"}); metrics.jsonl
    # holds the same rows (all but the closing summary)
    assert [(r["step"], "loss" in r, "eval_loss" in r) for r in state.log_history] == [
        (2, True, False), (3, False, True), (4, True, False), (6, True, False), (6, False, True), (6, False, False)]
    lines = [json.loads(x) for x in (Path(trainer.args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert state.log_history[:-1] == lines
    assert state.log_history[-1]["train_loss"] == pytest.approx(
        np.mean([r["loss"] for r in state.log_history if "loss" in r]), rel=1e-6)
    saved = TrainerState.load_from_json(str(Path(trainer.args.output_dir) / "checkpoint-3" / "trainer_state.json"))
    assert saved.global_step == 3 and saved.log_history == state.log_history[:2]


def test_printer_callback_and_a_callback_class_run(tmp_path, capsys):
    trainer = make_trainer(tmp_path, callbacks=[PrinterCallback], max_steps=2)  # a class is instantiated
    trainer.train()
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "'train_loss'" in printed


def test_old_style_callbacks_are_refused_by_name(tmp_path):
    class OnLogRow:
        def on_log(self, row):
            pass

    with pytest.raises(TypeError, match="OnLogRow is not a transformers.TrainerCallback"):
        make_trainer(tmp_path, callbacks=[OnLogRow()])


# ------------------------------------------------------------------------------------------- control


class SetAt(TrainerCallback):
    def __init__(self, step: int, flag: str, event: str = "on_step_end"):
        self.step, self.flag, self.event = step, flag, event

    def on_step_end(self, args, state, control, **kwargs):
        if self.event == "on_step_end" and state.global_step == self.step:
            setattr(control, self.flag, True)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.event == "on_epoch_end" and state.global_step == self.step:
            setattr(control, self.flag, True)


def test_should_training_stop_ends_the_run_after_that_step(tmp_path):
    rec = Recorder()
    trainer = make_trainer(tmp_path, eval_rows=eval_rows(), callbacks=[SetAt(2, "should_training_stop"), rec],
                           max_steps=6, logging_steps=5, eval_strategy="steps", eval_steps=5)
    out = trainer.train()
    assert out.global_step == 2 and trainer.state.global_step == 2 and trainer.train_state.samples_seen == 4
    # the steps not yet logged are logged, the epoch ends, the run's closing evaluation runs
    assert [r["step"] for r in train_rows(trainer)] == [2]
    assert rec.events[-7:] == [("on_step_end", 2), ("on_log", 2), ("on_epoch_end", 2), ("on_log", 2),
                               ("on_evaluate", 2), ("on_log", 2), ("on_train_end", 2)]


def test_should_save_evaluate_and_log_are_obeyed(tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(tmp_path, eval_rows=eval_rows(), max_steps=4, logging_steps=10, eval_strategy="no",
                           save_strategy="no",
                           callbacks=[SetAt(1, "should_save"), SetAt(2, "should_evaluate"), SetAt(3, "should_log"),
                                      SetAt(4, "should_save", event="on_epoch_end")])
    trainer.train()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-4"]
    rows = trainer.state.log_history
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]  # eval_strategy='no': no closing evaluation
    assert [r["step"] for r in rows if "loss" in r] == [3, 4]


def test_should_epoch_stop_mid_epoch_is_refused_by_name(tmp_path):
    trainer = make_trainer(tmp_path, conversational_rows(8), callbacks=[SetAt(1, "should_epoch_stop")], max_steps=4)
    with pytest.raises(ValueError, match="should_epoch_stop at step 1, in the middle of an epoch"):
        trainer.train()
    at_the_end = make_trainer(tmp_path, conversational_rows(8), name="end", max_steps=4,
                              callbacks=[SetAt(4, "should_epoch_stop")])  # the epoch ends there anyway
    assert at_the_end.train().global_step == 4


def test_should_evaluate_without_an_eval_set_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[SetAt(1, "should_evaluate")], max_steps=2)
    with pytest.raises(ValueError, match="should_evaluate but this trainer has no eval_dataset"):
        trainer.train()


# ------------------------------------------------------------------------------------------- best model


def scripted_metric(values):
    """A compute_metrics whose 'score' follows `values`, one per evaluation."""
    seen = []

    def compute(pred: EvalPrediction) -> dict:
        seen.append(pred)
        return {"score": values[min(len(seen) - 1, len(values) - 1)]}

    compute.seen = seen
    return compute


def test_early_stopping_and_load_best_model_at_end(tmp_path):
    out = tmp_path / "out"
    compute = scripted_metric([3.0, 1.0, 2.0, 4.0, 5.0])
    trainer = make_trainer(tmp_path, eval_rows=eval_rows(), max_steps=8, logging_steps=1, eval_strategy="steps",
                           eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
                           load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=False,
                           callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.compute_metrics = compute
    trainer.train()
    # best 1.0 at step 2; 2.0 and 4.0 do not improve on it: patience 2 runs out at step 4
    assert trainer.state.global_step == 4
    assert trainer.state.best_metric == 1.0 and trainer.state.best_global_step == 2
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    # save_total_limit=1 keeps the newest checkpoint and the best one
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    best, last = model_weights(out / "checkpoint-2"), model_weights(out / "checkpoint-4")
    now = weights(trainer)
    assert any(not torch.equal(best[n], last[n]) for n in best)
    assert all(torch.equal(now[n], best[n]) for n in best)  # the best weights are loaded at the end
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(out / "checkpoint-2") and saved["best_metric"] == 1.0
    assert saved["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] == 2


def test_load_best_model_at_end_needs_matching_strategies(tmp_path):
    with pytest.raises(ConfigError, match="load_best_model_at_end=True needs the save and eval strategies to match"):
        DPOConfig(output_dir=str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch")
    with pytest.raises(ConfigError, match="round multiple of eval_steps"):
        DPOConfig(output_dir=str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", eval_steps=2,
                  save_strategy="steps", save_steps=3)
    c = DPOConfig(output_dir=str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", eval_steps=2,
                  save_strategy="steps", save_steps=4)
    assert (c.metric_for_best_model, c.greater_is_better) == ("loss", False)


# ------------------------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_gets_per_pair_values_and_its_metric_is_logged(tmp_path):
    got = []

    def compute(pred):
        got.append(pred)
        c, r = pred.predictions[:, 2], pred.predictions[:, 3]
        return {"margin": float(np.mean(c - r)), "eval_first_chosen_logp": float(pred.predictions[0, 0])}

    trainer = make_trainer(tmp_path, eval_rows=eval_rows(5), max_steps=2, eval_strategy="steps", eval_steps=1,
                           per_device_eval_batch_size=2, precompute_ref_log_probs=False)  # a live reference: a
    # new set can be evaluated after training
    trainer.compute_metrics = compute
    trainer.train()
    pred = got[0]
    assert isinstance(pred, EvalPrediction) and pred.predictions.shape == (5, 4)
    assert pred.predictions.dtype == np.float32 and np.array_equal(pred.label_ids, np.zeros(5))
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert len(evals) == 2 and all(r["eval_margin"] == pytest.approx(r["eval_rewards/margins"], abs=1e-5)
                                   for r in evals)
    assert all("eval_first_chosen_logp" in r for r in evals)  # an eval_ key is not prefixed twice
    lines = [json.loads(x) for x in (Path(trainer.args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_margin"] for r in lines if "eval_margin" in r] == [r["eval_margin"] for r in evals]
    # the columns are the pairs' own values: the chosen log-prob of pair 0 evaluated alone (with the final
    # weights, those of the closing evaluation) is column 0
    last = got[-1]
    alone = trainer._eval_metrics(eval_rows(5)[:1])
    assert alone["eval_first_chosen_logp"] == pytest.approx(float(last.predictions[0, 0]), rel=1e-4)
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert "test_margin" in metrics and "test_loss" in metrics


# ------------------------------------------------------------------------------------------- resume


def test_state_after_interrupted_and_resumed_run_equals_the_uninterrupted(tmp_path):
    rows = conversational_rows(8)
    kw = dict(max_steps=5, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps",
              save_steps=2, metric_for_best_model="loss", eval_rows=eval_rows())
    whole = make_trainer(tmp_path, rows, name="whole", **kw)
    whole.train()
    cut = make_trainer(tmp_path, rows, name="cut", callbacks=[SetAt(3, "should_training_stop")], **kw)
    cut.train()
    resumed = make_trainer(tmp_path, rows, name="cut", resume_from_checkpoint="latest", **kw)
    resumed.train()

    def comparable(state):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in state.log_history if "train_loss" not in r]

    a, b = comparable(whole.state), comparable(resumed.state)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    for name in ("global_step", "epoch", "max_steps", "num_train_epochs", "best_global_step"):
        assert getattr(whole.state, name) == getattr(resumed.state, name), name
    assert whole.state.best_metric == pytest.approx(resumed.state.best_metric, rel=1e-5)
    assert resumed.state.best_model_checkpoint.endswith(Path(whole.state.best_model_checkpoint).name)


def test_callback_states_are_restored_when_asked(tmp_path):
    """restore_callback_states_from_checkpoint (TrainingArguments'): an ExportableState callback's saved state
    (EarlyStoppingCallback's patience counter) comes back on resume, through transformers' own code."""
    kw = dict(eval_rows=eval_rows(), max_steps=6, eval_strategy="steps", eval_steps=1, save_strategy="steps",
              save_steps=1, metric_for_best_model="score", greater_is_better=True)
    first = make_trainer(tmp_path, callbacks=[EarlyStoppingCallback(early_stopping_patience=5)], **kw)
    first.compute_metrics = scripted_metric([3.0, 2.0, 1.0, 0.0])  # never better after the first
    first.train()
    assert first.state.global_step == 6
    for restore in (False, True):
        again = make_trainer(tmp_path, callbacks=[EarlyStoppingCallback(early_stopping_patience=5)],
                             resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"), **kw)
        again.args.restore_callback_states_from_checkpoint = restore
        again.compute_metrics = scripted_metric([0.0])
        again.args.max_steps = 10
        again.train()
        # restored: 2 evaluations without improvement before, 3 more run the patience (5) out at step 6
        assert again.state.global_step == (6 if restore else 8), restore


def test_checkpoint_without_hf_state_still_resumes(tmp_path):
    """A checkpoint written before preftune kept transformers' TrainerState: its trainer_state.json is
    preftune's own state; the log history is rebuilt from metrics.jsonl and the resume stays exact."""
    rows = conversational_rows(8)
    kw = dict(max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2)
    whole = make_trainer(tmp_path, rows, name="whole", **kw)
    whole.train()
    cut = make_trainer(tmp_path, rows, name="cut", callbacks=[SetAt(3, "should_training_stop")], **kw)
    cut.train()
    old = tmp_path / "cut" / "checkpoint-2"
    (old / "trainer_state.json").unlink()
    shutil.move(old / "preftune_state.json", old / "trainer_state.json")
    resumed = make_trainer(tmp_path, rows, name="cut", resume_from_checkpoint="latest", **kw)
    resumed.train()
    wa, wb = weights(whole), weights(resumed)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert [r["step"] for r in resumed.state.log_history if "loss" in r] == [1, 2, 3, 4]
    assert resumed.train_state.samples_seen == 8


# ------------------------------------------------------------------------------------------- train() and friends


def test_train_output_and_metric_files(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, logging_steps=1)
    out = trainer.train()
    assert isinstance(out, TrainOutput) and out.global_step == 3
    losses = [r["loss"] for r in train_rows(trainer)]
    assert out.training_loss == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
            "epoch"} <= out.metrics.keys() and out.metrics["train_loss"] == out.training_loss
    trainer.log_metrics("train", out.metrics)
    trainer.save_metrics("train", out.metrics)
    trainer.save_state()
    d = Path(trainer.args.output_dir)
    assert json.loads((d / "train_results.json").read_text())["train_loss"] == out.training_loss
    assert json.loads((d / "all_results.json").read_text())["train_loss"] == out.training_loss
    assert TrainerState.load_from_json(str(d / "trainer_state.json")).global_step == 3


def test_given_optimizer_and_scheduler_are_used(tmp_path):
    from test_trainer import config

    from preftune import DPOTrainer
    from preftune.testing import tiny_model, tiny_tokenizer

    rows = conversational_rows(8)
    default = make_trainer(tmp_path, rows, name="default", max_steps=2)
    start = weights(default)
    default.train()
    assert any(not torch.equal(start[n], p) for n, p in weights(default).items())  # preftune's AdamW moves them

    model = tiny_model(300)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    trainer = DPOTrainer(model=model, args=config(tmp_path, "sgd", max_steps=2), train_dataset=rows,
                         processing_class=tiny_tokenizer(), optimizers=(sgd, sched))
    before = weights(trainer)
    trainer.train()
    assert trainer.lr_scheduler is sched and getattr(trainer.optimizer, "optimizer", trainer.optimizer) is sgd
    assert all(torch.equal(before[n], p) for n, p in weights(trainer).items())  # SGD at lr 0: nothing moved

    model = tiny_model(300)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    moved = DPOTrainer(model=model, args=config(tmp_path, "sgd_moves", max_steps=2), train_dataset=rows,
                       processing_class=tiny_tokenizer(), optimizers=(sgd, None))
    init = weights(moved)
    assert all(torch.equal(init[n], start[n]) for n in init)  # the same initial weights as the AdamW run
    moved.train()
    after, adamw = weights(moved), weights(default)
    assert any(not torch.equal(init[n], after[n]) for n in after)  # SGD did update the model
    assert all(not torch.allclose(after[n], adamw[n]) for n in after if not torch.equal(start[n], adamw[n]))

    stale = tiny_model(300)
    with pytest.raises(ValueError, match="not this trainer's model's"):
        DPOTrainer(model=tiny_model(300), args=config(tmp_path, "stale", max_steps=1), train_dataset=rows,
                   processing_class=tiny_tokenizer(),
                   optimizers=(torch.optim.SGD(stale.parameters(), lr=0.1), None)).train()


def test_given_optimizer_gets_the_configs_schedule(tmp_path):
    from test_trainer import config

    from preftune import DPOTrainer
    from preftune.testing import tiny_model, tiny_tokenizer

    model = tiny_model(300)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = DPOTrainer(model=model, args=config(tmp_path, max_steps=4, lr_scheduler_type="linear", logging_steps=1),
                         train_dataset=conversational_rows(8), processing_class=tiny_tokenizer(), optimizers=(sgd, None))
    trainer.train()
    assert [r["learning_rate"] for r in train_rows(trainer)] == pytest.approx([0.375, 0.25, 0.125, 0.0])


def test_refused_arguments_say_why(tmp_path):
    from test_trainer import config

    from preftune import DPOTrainer
    from preftune.testing import tiny_model, tiny_tokenizer

    model = tiny_model(300)
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 1.0)
    common = dict(model=model, args=config(tmp_path), train_dataset=conversational_rows(8),
                  processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match=r"optimizers=\(None, scheduler\)"):
        DPOTrainer(**common, optimizers=(None, sched))
    with pytest.raises(ValueError, match="data_collator: preftune builds its batches itself"):
        DPOTrainer(**common, data_collator=lambda feats: feats)


def test_add_remove_pop_callbacks(tmp_path):
    trainer = make_trainer(tmp_path)
    handler = trainer.callback_handler
    rec = Recorder()
    trainer.add_callback(rec)
    trainer.add_callback(PrinterCallback)
    assert handler.callbacks[-2] is rec and isinstance(handler.callbacks[-1], PrinterCallback)
    popped = trainer.pop_callback(PrinterCallback)
    assert isinstance(popped, PrinterCallback) and not any(isinstance(c, PrinterCallback) for c in handler.callbacks)
    assert trainer.pop_callback(PrinterCallback) is None
    assert trainer.pop_callback(rec) is rec and rec not in handler.callbacks
    trainer.add_callback(rec)
    trainer.remove_callback(Recorder)
    assert rec not in handler.callbacks
    trainer.add_callback(rec)
    trainer.remove_callback(rec)
    assert rec not in handler.callbacks
    with pytest.raises(TypeError, match="not a transformers.TrainerCallback"):
        trainer.add_callback(object())
