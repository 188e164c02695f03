"""`preftune merge RUN_DIR --out DIR`: a LoRA run's adapters merged into a full Hugging Face model.

The adapters (``adapter_config.json`` + ``adapter_model.safetensors``) are loaded onto their base model in
float32, folded into its weights with peft's ``merge_and_unload``, and the plain model is saved as
safetensors with the run's tokenizer and a model card: a folder that
``AutoModelForCausalLM.from_pretrained`` loads without peft.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_DTYPES = ("float32", "bfloat16", "float16")


def _check_adapter_dir(run_dir: Path) -> None:
    """Refuse, saying what the folder holds instead, a folder without LoRA adapters in safetensors."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory; pass the output_dir of a LoRA run (use_peft)")
    if (run_dir / ADAPTER_CONFIG).is_file() and (run_dir / ADAPTER_WEIGHTS).is_file():
        return
    if (run_dir / ADAPTER_CONFIG).is_file() and (run_dir / "adapter_model.bin").is_file():
        raise ValueError(f"{run_dir} holds its adapters as adapter_model.bin (pickle, which can run code when "
                         "loaded); preftune merges safetensors only: save them again with safe_serialization=True")
    if (run_dir / "config.json").is_file() and any(run_dir.glob("*.safetensors")):
        raise ValueError(f"{run_dir} holds a full model, not LoRA adapters ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): "
                         "there is nothing to merge; load the folder as it is")
    hint = ""
    if any(p.is_dir() for p in run_dir.glob("checkpoint-*")):
        hint = " (a run stopped before its final save: pass a checkpoint's model/ folder, e.g. checkpoint-N/model)"
    raise FileNotFoundError(f"{run_dir} has no LoRA adapters ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}){hint}; "
                            "pass the output_dir of a run trained with use_peft")


def _read_run_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml (in the folder or the one above a checkpoint's model/), or {}."""
    import yaml

    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
    return {}


def base_model_of(run_dir: Path, config: dict) -> str:
    """Where the adapters' base model is: adapter_config.json's base_model_name_or_path (the folder the run
    loaded), else the run config's model_name_or_path. Neither set (a model built in code): an error asking
    for --base_model, since guessing would merge onto the wrong weights."""
    adapter = json.loads((run_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = adapter.get("base_model_name_or_path") or config.get("model_name_or_path")
    if not base:
        raise ValueError(f"{run_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path) and the run has "
                         "no config.yaml with model_name_or_path; pass the base model with --base_model DIR_OR_HUB_ID")
    return str(base)


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None,
              dtype: str = "float32", overwrite: bool = False) -> Path:
    """Merge the LoRA adapters saved in ``run_dir`` into their base model and save it in ``out_dir``.

    base_model: the model the adapters were trained on (default: :func:`base_model_of`). dtype: the merged
    weights' dtype (the merge itself runs in float32). out_dir must not exist or be empty unless overwrite
    (then an existing folder is replaced once the new one is complete); it is written in a temporary sibling
    and renamed into place, so a failed merge leaves no half-written folder. Returns out_dir.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from preftune import models
    from preftune.model_card import run_card_inputs, write_model_card

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(MERGE_DTYPES)}")
    _check_adapter_dir(run_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out_dir} exists and is not an empty folder; choose a new one or remove it")
    config = _read_run_config(run_dir)
    base = base_model or base_model_of(run_dir, config)
    base_path = models.resolve_model_path(base, cache_dir=config.get("cache_dir"))
    logger.info("merging the adapters of %s into %s", run_dir, base_path)
    model = models.load_model(base_path, dtype=torch.float32, device="cpu",
                              trust_remote_code=bool(config.get("trust_remote_code", False)))
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias: not the user's to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(run_dir), is_trainable=False)
        merged = model.merge_and_unload()
    merged.to(models.DTYPE_NAMES[dtype])
    tok_source = run_dir if (run_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            metrics = run_dir.parent.parent / "metrics.jsonl"
        card_base = base_model or config.get("model_name_or_path") or base
        if Path(card_base).name == models.EMBEDDED_MODEL_NAME:  # the embedded model's converted folder
            card_base = "default"
        inputs = run_card_inputs({**config, "model_name_or_path": card_base}, metrics_path=metrics) if config else dict(
            base_model=base, datasets=[], algorithm="LoRA", loss=[], params={}, train_metrics=None,
            eval_metrics=None, command_or_config="", version=_version())
        inputs["params"] = {**inputs["params"], "merged_dtype": dtype}
        write_model_card(tmp, **inputs, library_name="transformers", merged_from_adapter=True)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)  # empty, or overwrite
        elif out_dir.exists():
            out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _version() -> str:
    from preftune import __version__

    return __version__


__all__ = ["merge_run", "base_model_of", "MERGE_DTYPES"]
