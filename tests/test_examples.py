"""examples/: every YAML recipe loads as written and trains one optimizer step on a tiny model, with its hub
model and dataset swapped for a tiny model saved to disk and local rows in the hub dataset's columns; the
Python script runs too."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from _train_worker import make_model_dir, write_jsonl

from preftune.config import DPOConfig
from preftune.data.demo import demo_dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HUB = {"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "dataset_name": "trl-lib/ultrafeedback_binarized",
       "eval_dataset": "test"}

# What each recipe is for: the fields that make it that recipe, as loaded.
RECIPES = {
    "run.yaml": {"model_name_or_path": "./my-model", "dataset_name": "data/train.jsonl", "use_peft": True,
                 "loss_type": "sigmoid", "bad_rows": "skip"},
    "dpo_full.yaml": {**HUB, "loss_type": "sigmoid", "use_peft": False, "beta": 0.1},
    "dpo_lora.yaml": {**HUB, "loss_type": "sigmoid", "use_peft": True, "lora_r": 32},
    "simpo.yaml": {**HUB, "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "use_peft": False},
    "ipo.yaml": {**HUB, "loss_type": "ipo", "use_peft": True},
    "robust_dpo.yaml": {**HUB, "loss_type": "robust", "label_smoothing": 0.1},
    "rpo.yaml": {**HUB, "loss_type": "sigmoid", "rpo_alpha": 1.0},
    "tr_dpo.yaml": {**HUB, "sync_ref_model": True, "ref_model_mixup_alpha": 0.6, "use_peft": False},
    "f_dpo.yaml": {**HUB, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
}
# A run's own swaps beyond the model, the data and the length of the run: TR-DPO's reference moves at step 1.
EXTRA = {"tr_dpo.yaml": {"ref_model_sync_steps": 1}}


def ultrafeedback_rows(split: str, n: int) -> list[dict]:
    """Demo pairs in trl-lib/ultrafeedback_binarized's columns: `chosen` and `rejected` conversations that share
    their user message (the implicit prompt), plus the score columns preftune ignores."""
    rows = []
    for row in demo_dataset(split, n=n):  # the demo's prompt, chosen and rejected are message lists
        rows.append({"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    make_model_dir(root / "model")
    for split, n in (("train", 4), ("test", 2)):
        write_jsonl(root / f"{split}.jsonl", ultrafeedback_rows(split if split == "train" else "eval", n))
    return root


def test_every_recipe_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(RECIPES)


def test_the_readme_recipe_is_the_file():
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "examples/run.yaml" in readme
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (EXAMPLES / "run.yaml").read_text()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_as_written(name):
    config = DPOConfig.from_yaml(str(EXAMPLES / name))
    for key, want in RECIPES[name].items():
        assert getattr(config, key) == want, key


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_one_step(name, local, tmp_path):
    from preftune.data.pipeline import FROM_CONFIG
    from preftune.trainer import DPOTrainer

    swap = dict(model_name_or_path=str(local / "model"), dataset_name=str(local / "train.jsonl"),
                eval_dataset=str(local / "test.jsonl"), output_dir=str(tmp_path / "run"),
                cache_dir=str(tmp_path / "cache"), max_steps=1, per_device_train_batch_size=2,
                per_device_eval_batch_size=2, gradient_accumulation_steps=1, max_length=192, logging_steps=1,
                save_strategy="no")
    config = DPOConfig.from_yaml(str(EXAMPLES / name), **swap, **EXTRA.get(name, {}))
    trainer = DPOTrainer(args=config, train_dataset=FROM_CONFIG)  # the data the recipe names, as `preftune train`
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1] and math.isfinite(train[0]["loss"])
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def _script():
    spec = importlib.util.spec_from_file_location("train_dpo_example", EXAMPLES / "train_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_python_script_runs(mode, local, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(local / "model"), "--dataset", str(local / "train.jsonl"), "--eval_dataset",
            str(local / "test.jsonl"), "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size",
            "2", "--gradient_accumulation_steps", "1", "--max_length", "192", *(["--full"] if mode == "full" else [])]
    trainer = _script().main(argv)
    assert trainer.is_peft == (mode == "lora")
    assert (out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()
    assert "eval_loss" in capsys.readouterr().out
    defaults = _script().parse_args([])
    assert (defaults.model, defaults.dataset) == (HUB["model_name_or_path"], HUB["dataset_name"])
