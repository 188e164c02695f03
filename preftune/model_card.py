"""The model card (``README.md``) of a saved model folder: what was trained, from what, how, and how it ended.

A Hugging Face model card is a Markdown file with a YAML header the hub reads (``base_model``,
``library_name``, ``tags``, ``datasets``). Only hub names go into the header: a local path there means
nothing to anyone the folder is handed to, so local models and files are named in the body instead.

``render_model_card`` is the pure function (its arguments to the card's text); ``write_model_card`` writes
it into a folder; ``run_card_inputs`` gathers those arguments from a run's resolved config and its
``metrics.jsonl``, for the trainer and for ``preftune merge``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"

# The embedded default model (preftune.models' aliases) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
# and dequantized: its hub lineage is this id.
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Training fields shown on every card, in this order (when the config has them).
TRAINING_FIELDS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length",
    "seed", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)  # fmt: skip


def is_hub_name(name: str | os.PathLike | None) -> bool:
    """True for an ``org/name`` string that is not a local path (a hub model or dataset id)."""
    if name is None:
        return False
    name = str(name)
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def _yaml_list(key: str, items: list[str]) -> list[str]:
    return [f"{key}:", *(f"- {json.dumps(i)}" for i in items)] if items else []


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(rows: dict[str, Any], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v).replace('|', '/')} |" for k, v in rows.items()]
    return lines


def render_model_card(*, base_model: str | None, datasets: list[str], algorithm: str, loss: str | list[str],
                      params: dict[str, Any], train_metrics: dict[str, Any] | None,
                      eval_metrics: dict[str, Any] | None, command_or_config: str, version: str,
                      library_name: str = "transformers", merged_from_adapter: bool = False) -> str:
    """The card's text.

    base_model: the model training started from (a hub id or a local path; None = not known).
    datasets: the training (and evaluation) data as named in the config; hub names go into the header.
    algorithm: e.g. "DPO". loss: the loss name, or several. params: the algorithm's and the training's
    hyper-parameters, shown as a table. train_metrics / eval_metrics: the last logged train and eval rows.
    command_or_config: the command line (one line) or the resolved YAML config (several lines).
    library_name: "peft" for a folder of LoRA adapters, "transformers" for a full model.
    merged_from_adapter: the folder is LoRA adapters merged into the base model (`preftune merge`).
    """
    losses = [loss] if isinstance(loss, str) else list(loss)
    hub_datasets = list(dict.fromkeys(d for d in datasets if is_hub_name(d)))
    tags = list(dict.fromkeys(["preftune", algorithm.lower(), *losses, *(["lora"] if library_name == "peft" else [])]))
    header = ["---"]
    if is_hub_name(base_model):
        header.append(f"base_model: {json.dumps(base_model)}")
    header.append(f"library_name: {library_name}")
    header += _yaml_list("tags", tags) + _yaml_list("datasets", hub_datasets) + ["---", ""]

    what = "LoRA adapters" if library_name == "peft" else "A model"
    body = [f"# {algorithm} with preftune", ""]
    how = f" (loss: {', '.join(f'`{n}`' for n in losses)})" if losses else ""
    body.append(f"{what} trained with {algorithm}{how} by "
                f"preftune {version}, starting from "
                f"{f'`{base_model}`' if base_model else 'a model given in code'}.")
    if merged_from_adapter:
        body.append("The LoRA adapters are merged into the base weights: the folder loads with "
                    "`AutoModelForCausalLM.from_pretrained` alone, without peft.")
    if datasets:
        body += ["", "Data: " + ", ".join(f"`{d}`" for d in datasets) + "."]
    body += ["", "## Parameters", "", *_table(params, ("parameter", "value"))]
    for title, metrics in (("Final training metrics", train_metrics), ("Final evaluation metrics", eval_metrics)):
        if metrics:
            body += ["", f"## {title}", "", *_table(metrics, ("metric", "value"))]
    if command_or_config.strip():
        multi = "\n" in command_or_config.strip()
        body += ["", "## How it was made", "",
                 "The config (`preftune train --config` it to rerun; the fields not listed keep their defaults):"
                 if multi else "The command:", "",
                 "```" + ("yaml" if multi else "bash"), command_or_config.strip(), "```"]
    return "\n".join(header + body) + "\n"


def write_model_card(out_dir: str | os.PathLike, *, base_model: str | None, datasets: list[str], algorithm: str,
                     loss: str | list[str], params: dict[str, Any], train_metrics: dict[str, Any] | None,
                     eval_metrics: dict[str, Any] | None, command_or_config: str, version: str,
                     library_name: str | None = None, merged_from_adapter: bool = False) -> Path:
    """Write ``out_dir/README.md`` (replaced atomically). library_name None: "peft" when the folder holds
    ``adapter_config.json``, else "transformers". The other arguments: :func:`render_model_card`."""
    out_dir = Path(out_dir)
    if library_name is None:
        library_name = "peft" if (out_dir / "adapter_config.json").is_file() else "transformers"
    text = render_model_card(base_model=base_model, datasets=datasets, algorithm=algorithm, loss=loss,
                             params=params, train_metrics=train_metrics, eval_metrics=eval_metrics,
                             command_or_config=command_or_config, version=version, library_name=library_name,
                             merged_from_adapter=merged_from_adapter)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- a run's card inputs ------------------------------------------------------------------------------------


def last_metrics(metrics_path: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """The last train row and the last eval row (``eval_`` keys) of a ``metrics.jsonl``; None where absent.
    Unreadable lines (a run killed mid-write) are skipped."""
    train, evaluation = None, None
    path = Path(metrics_path)
    if not path.is_file():
        return None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        if any(k.startswith("eval_") for k in row):
            evaluation = row
        elif "loss" in row:
            train = row
    return train, evaluation


def loss_params(config: dict[str, Any]) -> dict[str, Any]:
    """The loss's parameters of a resolved DPO config: loss_type, beta, each chosen loss's own parameters,
    and the options that change the objective when they are set (RPO, LD-DPO, WPO, f-DPO, TR-DPO)."""
    from preftune.losses import LOSS_ALIASES, LOSSES

    names = config.get("loss_type", "sigmoid")
    names = [names] if isinstance(names, str) else list(names)
    out: dict[str, Any] = {"loss_type": names[0] if len(names) == 1 else names}
    if config.get("loss_weights") is not None:
        out["loss_weights"] = config["loss_weights"]
    out["beta"] = config.get("beta")
    specs = [LOSSES.get(LOSS_ALIASES.get(n, n)) for n in names]
    for spec in filter(None, specs):
        for key in spec.params:
            out.setdefault(key, config.get(key))
    if any(spec is not None and spec.uses_divergence for spec in specs):
        out["f_divergence_type"] = config.get("f_divergence_type", "reverse_kl")
        if out["f_divergence_type"] == "alpha_divergence":
            out["f_alpha_divergence_coef"] = config.get("f_alpha_divergence_coef")
    for key in ("rpo_alpha", "ld_alpha"):
        if config.get(key) is not None:
            out[key] = config[key]
    for key in ("use_weighting", "reference_free"):
        if config.get(key):
            out[key] = True
    if config.get("sync_ref_model"):
        out.update({k: config.get(k) for k in ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")})
    if config.get("ref_model_name_or_path"):
        out["ref_model_name_or_path"] = config["ref_model_name_or_path"]
    return out


def training_params(config: dict[str, Any]) -> dict[str, Any]:
    """TRAINING_FIELDS of a resolved config, less those that did nothing: epochs under max_steps, the warm-up
    spelling not used, LoRA's fields without use_peft."""
    out = {k: config[k] for k in TRAINING_FIELDS if k in config}
    if (out.get("max_steps") or -1) > 0:
        out.pop("num_train_epochs", None)
    else:
        out.pop("max_steps", None)
    out.pop("warmup_ratio" if (out.get("warmup_steps") or 0) > 0 else "warmup_steps", None)
    if not out.get("use_peft"):
        for k in [k for k in out if k.startswith("lora_")]:
            del out[k]
    elif "lora_target_modules" in out and out["lora_target_modules"] is None:
        out["lora_target_modules"] = "all-linear"
    return out


def changed_fields(config: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of a resolved config that differ from the defaults (default: DPOConfig's), output_dir kept:
    with the same preftune version, `preftune train --config` of them reruns the run."""
    if defaults is None:
        from preftune.config import DPOConfig

        defaults = DPOConfig().to_dict()
    return {k: v for k, v in config.items() if k == "output_dir" or k not in defaults or defaults[k] != v}


def _names_data(value: Any) -> bool:
    """A dataset name or path (not a held-out fraction, nor a bare split name such as "test")."""
    return isinstance(value, str) and bool(value) and (
        is_hub_name(value) or Path(value).expanduser().exists() or "/" in value or "." in value)


def run_card_inputs(config: dict[str, Any], *, metrics_path: str | os.PathLike | None = None,
                    command_or_config: str | None = None, base_model: str | None = None, algorithm: str = "DPO",
                    defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """write_model_card's keyword arguments for a run, from its resolved config (``DPOConfig.to_dict()`` or
    a loaded ``config.yaml``) and its ``metrics.jsonl``. command_or_config None: the fields that differ from
    ``defaults`` (the config class's ``to_dict()`` of a default instance; None = DPOConfig's), as YAML.
    base_model None: the config's model_name_or_path (unset or "default": the embedded SmolLM2)."""
    import yaml

    from preftune import __version__
    from preftune.models import EMBEDDED_ALIASES

    if base_model is None:
        name = config.get("model_name_or_path")
        base_model = EMBEDDED_BASE if name is None or str(name).lower() in EMBEDDED_ALIASES else str(name)
    datasets = list(dict.fromkeys(str(d) for d in (config.get("dataset_name"), config.get("eval_dataset"))
                                  if _names_data(d)))
    if config.get("dataset_name") is None:
        datasets.insert(0, "preftune's bundled demo preference data")
    train, evaluation = last_metrics(metrics_path) if metrics_path is not None else (None, None)
    params = {**loss_params(config), **training_params(config)}
    if command_or_config is None:
        command_or_config = yaml.safe_dump(changed_fields(config, defaults), sort_keys=False,
                                           default_flow_style=False, allow_unicode=True)
    return dict(base_model=base_model, datasets=datasets, algorithm=algorithm, loss=params["loss_type"], params=params,
                train_metrics=train, eval_metrics=evaluation, command_or_config=command_or_config,
                version=__version__)


__all__ = ["CARD_FILE", "EMBEDDED_BASE", "render_model_card", "write_model_card", "run_card_inputs", "last_metrics",
           "loss_params", "training_params", "changed_fields", "is_hub_name"]
