"""Experiment trackers behind one tiny interface: ``make_trackers(report_to, run_dir, config)``
returns an object with ``.log(metrics, step)`` and ``.close()``.

Backends (``report_to``, TRL's field name and values):

- ``"tensorboard"``: ``torch.utils.tensorboard.SummaryWriter`` into ``<run_dir>/tensorboard``; metric
  names become tags as they are (``rewards/chosen`` groups under ``rewards``), the config is logged
  as text. View with ``tensorboard --logdir <run_dir>/tensorboard``.
- ``"wandb"``: a Weights & Biases run in ``<run_dir>``, offline unless ``WANDB_MODE`` says otherwise
  (sync later with ``wandb sync``).
- ``"none"`` / None / [] — nothing; ``"all"`` — every installed backend.

A requested backend whose package is missing is skipped with a one-line warning, so a run never
dies for want of a logger. Call it on the main process only; the trainer does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

BACKENDS = ("tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _scalars(metrics: dict) -> dict[str, float]:
    """The finite numeric entries of `metrics` (bools and strings dropped; `step` is the x axis)."""
    out = {}
    for key, value in metrics.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, run_name: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = json.dumps(config, indent=2, default=str)
        title = f"config ({run_name})" if run_name else "config"
        self.writer.add_text(title, "```\n" + text + "\n```", global_step=0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, run_name: str | None = None):
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        project = os.environ.get("WANDB_PROJECT", "preftune")
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode,
                              config=json.loads(json.dumps(config, default=str)))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=int(step))

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Trackers:
    """Fan-out over the active trackers; also a context manager (closes on exit)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, metrics: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_report_to(report_to) -> list[str]:
    """Normalise ``report_to`` (None, a name, a comma-separated string or a list) to backend names.

    ``"all"`` expands to the installed backends; ``"none"`` and empty values to []. An unknown name
    raises ValueError listing the choices.
    """
    if report_to is None:
        return []
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if item in ("", "none"):
            continue
        if item == "all":
            expanded = [b for b in BACKENDS if _installed(_PACKAGES[b])]
        elif item in BACKENDS:
            expanded = [item]
        else:
            choices = ", ".join(repr(c) for c in (*BACKENDS, "all", "none"))
            raise ValueError(f"report_to: unknown tracker {item!r}; choose from {choices}")
        names += [n for n in expanded if n not in names]
    return names


def make_trackers(report_to, run_dir, config: dict, run_name: str | None = None) -> Trackers:
    """Open the trackers named by `report_to` for the run in `run_dir` (see the module docstring)."""
    active = []
    for name in resolve_report_to(report_to):
        if not _installed(_PACKAGES[name]):
            warnings.warn(f"report_to={name!r}: {name} is not installed ({_INSTALL[name]}); not logging to it",
                          stacklevel=2)
            continue
        active.append(_CLASSES[name](Path(run_dir), config, run_name))
    return Trackers(active)
