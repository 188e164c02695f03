"""The HF Trainer's callback contract on preftune's loop: transformers' own `TrainerState`, `TrainerControl`,
`TrainerCallback` and `CallbackHandler`, and the small pieces of the HF Trainer's bookkeeping around them
(the best metric, the log history of a checkpoint written before preftune kept one).

preftune's own cadence (logging_steps, eval_strategy, save_strategy) decides when the loop logs, evaluates and
saves; there is no `DefaultFlowCallback`. A callback that sets ``control.should_log``, ``should_evaluate``,
``should_save`` or ``should_training_stop`` adds to that cadence: the loop obeys the flags after the step (and
after the epoch) on which they were set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import CallbackHandler, ExportableState


def _check_callback(cb) -> None:
    cls = cb if isinstance(cb, type) else type(cb)
    if not issubclass(cls, TrainerCallback):
        raise TypeError(
            f"callbacks: {cls.__name__} is not a transformers.TrainerCallback; preftune calls callbacks as the HF "
            "Trainer does (on_log(args, state, control, logs=..., **kwargs), on_step_end, ...). Subclass "
            "transformers.TrainerCallback and override the events you need")


@contextlib.contextmanager
def _quiet(name: str):
    """Silence one transformers logger for a moment (its `CallbackHandler` warns when it holds no
    `DefaultFlowCallback`, which preftune's own cadence replaces on purpose)."""
    log = logging.getLogger(name)
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


def make_callback_handler(callbacks, model, processing_class) -> CallbackHandler:
    """transformers' `CallbackHandler` over `callbacks` (instances or classes of `TrainerCallback`)."""
    callbacks = list(callbacks or [])
    for cb in callbacks:
        _check_callback(cb)
    with _quiet("transformers.trainer_callback"):
        return CallbackHandler(callbacks, model, processing_class, None, None)


def stateful_callbacks(handler: CallbackHandler, control) -> list:
    """The callbacks (and control) whose state the HF Trainer saves in trainer_state.json."""
    return [cb for cb in handler.callbacks + [control] if isinstance(cb, ExportableState)]


def note_callback_states(state: TrainerState, handler: CallbackHandler, control) -> None:
    """Record the `ExportableState` callbacks' state in ``state.stateful_callbacks`` before a save (as the
    HF Trainer does)."""
    out: dict = {}
    for cb in stateful_callbacks(handler, control):
        name = type(cb).__name__
        if name in out:
            out[name] = (out[name] if isinstance(out[name], list) else [out[name]]) + [cb.state()]
        else:
            out[name] = cb.state()
    state.stateful_callbacks = out


def metric_key(args) -> str:
    name = args.metric_for_best_model
    return name if name.startswith("eval_") else f"eval_{name}"


def update_best_metric(args, state: TrainerState, metrics: dict) -> bool:
    """The HF Trainer's rule, after an evaluation during training: with ``metric_for_best_model`` set, a
    better value (``greater_is_better``) becomes ``state.best_metric`` and its step ``best_global_step`` (the
    checkpoint saved at that step becomes ``best_model_checkpoint``). Returns whether it is a new best."""
    if args.metric_for_best_model is None:
        return False
    key = metric_key(args)
    if key not in metrics:
        raise KeyError(f"metric_for_best_model={args.metric_for_best_model!r}: the evaluation has no {key!r}; it "
                       f"has {sorted(metrics)}. Set metric_for_best_model to one of them (compute_metrics can add "
                       "more)")
    value = float(metrics[key])
    better = (lambda a, b: a > b) if args.greater_is_better else (lambda a, b: a < b)
    if state.best_metric is None:
        state.best_metric = -math.inf if args.greater_is_better else math.inf
    if not better(value, state.best_metric):
        return False
    state.best_metric = value
    if args.save_strategy in ("steps", "epoch"):
        state.best_global_step = state.global_step
    return True


def history_row(row: dict) -> dict:
    """A metrics.jsonl row as the HF Trainer's log history holds it: the logged values, then ``step``."""
    out = {k: v for k, v in row.items() if k != "step"}
    out["step"] = int(row["step"])
    return out


def legacy_log_history(metrics_path: Path, lines: int) -> list[dict]:
    """The log history of a checkpoint written before preftune kept an HF `TrainerState`: the first `lines`
    rows of metrics.jsonl (those written when the checkpoint was taken)."""
    path = Path(metrics_path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[:lines]:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(history_row(json.loads(line)))
    return out


__all__ = ["make_callback_handler", "note_callback_states", "update_best_metric", "history_row",
           "legacy_log_history", "metric_key"]
