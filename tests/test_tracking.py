"""preftune.tracking: report_to parsing, tensorboard scalars read back, wandb offline and missing."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from preftune import tracking
from preftune.tracking import make_trackers, resolve_report_to

CONFIG = {"beta": 0.1, "loss_type": "sigmoid", "output_dir": "runs/x"}


def test_resolve_report_to():
    assert resolve_report_to(None) == [] and resolve_report_to("none") == [] and resolve_report_to([]) == []
    assert resolve_report_to("tensorboard") == ["tensorboard"]
    assert resolve_report_to(["tensorboard", "none", "TensorBoard"]) == ["tensorboard"]
    assert resolve_report_to("wandb, tensorboard") == ["wandb", "tensorboard"]
    installed = [b for b in tracking.BACKENDS if tracking._installed(b)]
    assert "tensorboard" in installed
    assert resolve_report_to("all") == installed
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow'; choose from 'tensorboard', 'wandb', 'all', 'none'"):
        resolve_report_to(["tensorboard", "mlflow"])
    with pytest.raises(ValueError, match="unknown tracker"):
        make_trackers("comet", "/nonexistent", CONFIG)


def test_none_makes_no_trackers(tmp_path):
    trackers = make_trackers(None, tmp_path, CONFIG)
    trackers.log({"loss": 1.0}, step=1)
    trackers.close()
    assert trackers.names == [] and list(tmp_path.iterdir()) == []


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with make_trackers("tensorboard", tmp_path, CONFIG, run_name="demo") as trackers:
        assert trackers.names == ["tensorboard"]
        trackers.log({"loss": 0.69, "rewards/chosen": 0.0, "epoch": 0.5, "note": "text", "flag": True,
                      "bad": float("nan")}, step=1)
        trackers.log({"loss": 0.5, "rewards/chosen": 0.25, "epoch": 1.0}, step=2)
        trackers.log({"eval_loss": 0.6, "eval_rewards/accuracies": 0.75, "step": 2}, step=2)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"loss", "rewards/chosen", "epoch", "eval_loss", "eval_rewards/accuracies"}

    def read(tag):
        return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]

    assert read("loss") == [(1, 0.69), (2, 0.5)]
    assert read("rewards/chosen") == [(1, 0.0), (2, 0.25)]
    assert read("eval_rewards/accuracies") == [(2, 0.75)]
    assert acc.Tags()["tensors"]  # the config, logged as text


def test_missing_backend_warns_and_skips(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec("wandb") -> None: "not installed"
    with pytest.warns(UserWarning, match=r"report_to='wandb': wandb is not installed \(pip install wandb\)"):
        trackers = make_trackers(["wandb", "tensorboard"], tmp_path, CONFIG)
    assert trackers.names == ["tensorboard"]
    trackers.close()
    assert resolve_report_to("all") == ["tensorboard"]


def test_wandb_offline_run(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, metrics, step):
            calls.setdefault("log", []).append((metrics, step))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trackers = make_trackers("wandb", tmp_path, {**CONFIG, "path": tmp_path}, run_name="r1")
    trackers.log({"loss": 0.5, "note": "x", "rewards/margins": 1.0}, step=3)
    trackers.close()
    init_kw = calls["init"]
    assert init_kw["mode"] == "offline" and init_kw["dir"] == str(tmp_path) and init_kw["name"] == "r1"
    assert init_kw["config"]["beta"] == 0.1 and init_kw["config"]["path"] == str(tmp_path)
    assert calls["log"] == [({"loss": 0.5, "rewards/margins": 1.0}, 3)] and calls["finished"]
