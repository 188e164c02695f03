"""Experiment trackers (``report_to``) through transformers' own integration callbacks.

The loop runs transformers' `CallbackHandler` (`preftune.callbacks`), so ``report_to`` adds the callbacks
the HF Trainer adds for it (`transformers.integrations.INTEGRATION_TO_CALLBACK`: TensorBoardCallback,
WandbCallback, MLflowCallback, CometCallback, TrackioCallback, ...), ahead of the user's callbacks, and they
log what every other callback's ``on_log`` gets: the same tags (``train/loss``, ``eval/loss``), the same
environment variables (``WANDB_PROJECT``, ``WANDB_MODE``, ``TENSORBOARD_LOGGING_DIR``, ...) and the same
places as under the HF Trainer. TensorBoard writes to ``output_dir/runs/<date>_<host>`` unless
``TENSORBOARD_LOGGING_DIR`` says otherwise. metrics.jsonl is written whatever ``report_to`` says.

preftune's part is small: ``"all"`` and ``"none"`` resolved as TrainingArguments resolves them, a missing
package refused by its report_to name before the model is loaded, and the tracker settings that would
change nothing (a Trackio ``project`` without ``trackio``) said so.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("preftune")

# the integrations that name a run with ``run_name`` (transformers' callbacks read ``args.run_name``)
RUN_NAME_READERS = ("wandb", "trackio", "mlflow", "dagshub", "comet_ml", "swanlab")
TRACKIO_SETTINGS = {"project": "huggingface", "trackio_space_id": None, "trackio_bucket_id": None,
                    "trackio_static_space_id": None}


def resolve_report_to(report_to) -> list[str]:
    """``report_to`` (a validated config's list, or None / a name) as integration names: ``"none"`` and
    empty values are [], ``"all"`` is every installed integration (transformers'
    `get_available_reporting_integrations`), duplicates are dropped."""
    items = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names: list[str] = []
    for item in items:
        if item in ("", "none"):
            continue
        if item == "all":
            from transformers.integrations import get_available_reporting_integrations

            expanded = get_available_reporting_integrations()
        else:
            expanded = [item]
        names += [n for n in expanded if n not in names]
    return names


def integration_callbacks(args) -> list:
    """The callbacks ``args.report_to`` asks for, made as the HF Trainer makes them. A name whose package is
    missing raises a ValueError naming it (transformers' own message says what to install)."""
    names = resolve_report_to(args.report_to)
    _check_settings(args, names)
    if not names:
        return []
    from transformers.integrations import INTEGRATION_TO_CALLBACK, TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    out = []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(f"report_to={name!r}: transformers has no such integration; choose from "
                             f"{', '.join(INTEGRATION_TO_CALLBACK)}, all or none")
        try:
            callback = INTEGRATION_TO_CALLBACK[name]()
        except (RuntimeError, ImportError) as e:
            raise ValueError(f"report_to={name!r}: {e} Or drop {name!r} from report_to.") from None
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            # where the HF Trainer puts it; set now so that an evaluate() before train() writes there too
            callback.logging_dir = os.path.join(args.output_dir, default_logdir())
        out.append(callback)
    return out


def _check_settings(args, names: list[str]) -> None:
    if "trackio" in names and not hasattr(args, "hub_private_repo"):
        raise ValueError(f"report_to='trackio': transformers' TrackioCallback reads hub_private_repo, which "
                         f"{type(args).__name__} does not have; report to another tracker")
    if "wandb" in names and os.environ.get("WANDB_LOG_MODEL", "false").lower() == "end":
        raise ValueError("report_to='wandb' with WANDB_LOG_MODEL=end: transformers' WandbCallback then saves the "
                         "model through an HF Trainer built from the config, which a preftune config cannot build; "
                         "set WANDB_LOG_MODEL=checkpoint (uploads each checkpoint folder) or false")
    if "trackio" not in names:
        for name, unset in TRACKIO_SETTINGS.items():
            if getattr(args, name) != unset:
                logger.warning("%s=%r is a Trackio setting and report_to=%r has no 'trackio': it changes nothing",
                               name, getattr(args, name), args.report_to)
    if args.run_name is not None and not set(names) & set(RUN_NAME_READERS):
        logger.warning("run_name=%r names the run in %s; report_to=%r has none of them: it changes nothing",
                       args.run_name, ", ".join(RUN_NAME_READERS), args.report_to)


__all__ = ["integration_callbacks", "resolve_report_to"]
