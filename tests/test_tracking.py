"""preftune.tracking: report_to through transformers' integration callbacks. TensorBoard's event files hold
the scalars metrics.jsonl holds; none / [] write none; all is the installed integrations; an unknown or
uninstalled tracker is refused by name before training; wandb offline where it is installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers.integrations import (
    INTEGRATION_TO_CALLBACK,
    TensorBoardCallback,
    get_available_reporting_integrations,
)

from preftune import DPOConfig, DPOTrainer
from preftune.config_base import REPORT_TO, ConfigError
from preftune.data.demo import demo_dataset
from preftune.testing import tiny_model, tiny_tokenizer
from preftune.tracking import integration_callbacks, resolve_report_to


def trainer(tmp_path, report_to, **kw) -> DPOTrainer:
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                     per_device_eval_batch_size=4, logging_steps=1, save_strategy="no", max_length=160,
                     max_prompt_length=96, learning_rate=1e-3, seed=0, report_to=report_to, **kw)
    return DPOTrainer(model=tiny_model(300), args=args, train_dataset=demo_dataset("train", n=6),
                      eval_dataset=demo_dataset("eval", n=4), processing_class=tiny_tokenizer())


def integrations(t: DPOTrainer) -> list[type]:
    return [type(cb) for cb in t.callback_handler.callbacks if type(cb) in INTEGRATION_TO_CALLBACK.values()]


def event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


def test_report_to_names_are_transformers_integrations():
    assert set(REPORT_TO) == {*INTEGRATION_TO_CALLBACK, "all", "none"}
    assert DPOConfig(report_to="wandb").report_to == ["wandb"]  # refused by the config until now
    assert DPOConfig(report_to=["tensorboard", "comet-ml", "MLflow"]).report_to == ["tensorboard", "comet_ml", "mlflow"]
    assert DPOConfig(report_to="trackio,wandb").report_to == ["trackio", "wandb"]


def test_unknown_tracker_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"report_to='tensorbord': must be one of .*did you mean 'tensorboard'"):
        DPOConfig(report_to=["tensorbord"])
    with pytest.raises(ValueError, match=r"report_to='aim': transformers has no such integration"):
        integration_callbacks(type("Args", (), {"report_to": ["aim"], "run_name": None, "project": "huggingface",
                                                "trackio_space_id": None, "trackio_bucket_id": None,
                                                "trackio_static_space_id": None, "output_dir": "x"})())


def test_resolve_report_to():
    assert resolve_report_to(["none"]) == [] and resolve_report_to([]) == [] and resolve_report_to(None) == []
    assert resolve_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert resolve_report_to(["all"]) == get_available_reporting_integrations()
    assert "tensorboard" in resolve_report_to(["all"])  # installed with the test dependencies


def test_all_is_the_installed_integrations(tmp_path):
    t = trainer(tmp_path, "all")
    assert integrations(t) == [INTEGRATION_TO_CALLBACK[n] for n in get_available_reporting_integrations()]
    first = [type(cb) for cb in t.callback_handler.callbacks[:len(integrations(t))]]
    assert first == integrations(t) and TensorBoardCallback in first  # ahead of the user's, as the HF Trainer


def test_missing_integration_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import transformers.integrations.integration_utils as iu

    monkeypatch.setattr(iu, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"report_to='tensorboard': TensorBoardCallback requires tensorboard to be "
                                         r"installed.* Or drop 'tensorboard' from report_to"):
        DPOTrainer(model="no/such-model", args=DPOConfig(output_dir=str(tmp_path), report_to="tensorboard"),
                   train_dataset=demo_dataset("train", n=2), processing_class=tiny_tokenizer())


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    t = trainer(tmp_path, "tensorboard", eval_strategy="steps", eval_steps=2)
    t.train()
    out = Path(t.args.output_dir)
    files = event_files(out)
    assert len(files) == 1 and files[0].parent.parent == out / "runs"  # where the HF Trainer writes them
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def read(tag):
        return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)]

    # transformers' tags: train/<key>, eval/<key without eval_>; metrics.jsonl is the reference
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]
    assert read("train/loss") == [(r["step"], r["loss"]) for r in train]
    assert read("train/rewards/margins") == [(r["step"], r["rewards/margins"]) for r in train]
    assert read("train/learning_rate") == [(r["step"], r["learning_rate"]) for r in train]
    assert read("eval/loss") == [(r["step"], r["eval_loss"]) for r in evals]
    assert read("eval/rewards/accuracies") == [(r["step"], r["eval_rewards/accuracies"]) for r in evals]
    assert read("train/train_loss") == [(3, t.state.log_history[-1]["train_loss"])]  # the run's summary row
    args_text = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(args_text)["report_to"] == ["tensorboard"]  # the config, logged as the HF Trainer does


def test_tensorboard_logging_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    t = trainer(tmp_path, "tensorboard")
    t.train()
    assert len(event_files(tmp_path / "tb")) == 1 and not (Path(t.args.output_dir) / "runs").exists()


@pytest.mark.parametrize("report_to", ["none", []])
def test_none_writes_no_tracker_files(tmp_path, report_to):
    t = trainer(tmp_path, report_to)
    assert t.args.report_to == ["none"] and integrations(t) == []
    t.train()
    out = Path(t.args.output_dir)
    assert (out / "metrics.jsonl").is_file()  # always: it feeds the report
    assert event_files(tmp_path) == [] and not (out / "runs").exists() and not (tmp_path / "wandb").exists()


def test_settings_for_an_absent_tracker_say_they_change_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="preftune")
    trainer(tmp_path, "tensorboard", project="mine", run_name="r1")
    assert "project='mine' is a Trackio setting and report_to=['tensorboard'] has no 'trackio'" in caplog.text
    assert "run_name='r1' names the run in wandb" in caplog.text


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = trainer(tmp_path, "wandb", run_name="tracked")
    t.train()
    import wandb

    run = wandb.run
    assert run is not None and run.name == "tracked" and run.config["beta"] == t.args.beta
    last_train = [row for row in t.state.log_history if "loss" in row][-1]
    assert run.summary["train/loss"] == pytest.approx(last_train["loss"])
    wandb.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
