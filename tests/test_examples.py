"""examples/: every YAML recipe (DPO and GRPO) loads as written and trains one optimizer step on a tiny model, with
its hub model and dataset swapped for a tiny model saved to disk and local rows in the hub dataset's columns; the
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

GRPO_HUB = {"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "dataset_name": "trl-lib/DeepMath-103K"}
GRPO_RECIPES = {
    "grpo.yaml": {**GRPO_HUB, "loss_type": "grpo", "scale_rewards": "group", "beta": 0.04, "num_generations": 8,
                  "reward_funcs": ["accuracy"], "log_completions": True},
    "dr_grpo.yaml": {**GRPO_HUB, "loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.0},
    "dapo.yaml": {**GRPO_HUB, "loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0,
                  "mask_truncated_completions": True, "dynamic_sampling": True, "reward_funcs": ["accuracy", "soft_overlong_punishment(max_completion_len=1024, soft_punish_cache=256)"]},
    "gspo.yaml": {**GRPO_HUB, "importance_sampling_level": "sequence", "loss_type": "grpo", "beta": 0.0,
                  "epsilon": 3e-4, "epsilon_high": 4e-4, "steps_per_generation": 4, "gradient_accumulation_steps": 1},
    "two_grpo.yaml": {**GRPO_HUB, "num_generations": 2, "reward_funcs": ["accuracy"]},
    "gdpo.yaml": {**GRPO_HUB, "multi_objective_aggregation": "normalize_then_sum", "reward_weights": [1.0, 1.0],
                  "reward_funcs": ["accuracy", "soft_overlong_punishment(max_completion_len=512, soft_punish_cache=256)"]},
}


def ultrafeedback_rows(split: str, n: int) -> list[dict]:
    """Demo pairs in trl-lib/ultrafeedback_binarized's columns: `chosen` and `rejected` conversations that share
    their user message (the implicit prompt), plus the score columns preftune ignores."""
    rows = []
    for row in demo_dataset(split, n=n):  # the demo's prompt, chosen and rejected are message lists
        rows.append({"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def deepmath_rows(n: int) -> list[dict]:
    """Prompt rows in trl-lib/DeepMath-103K's columns: a conversational `prompt` and the `solution` that the
    accuracy reward reads."""
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 2}? Put the answer in \\boxed{{}}."}],
             "solution": str(2 * i + 2)} for i in range(n)]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    make_model_dir(root / "model")
    for split, n in (("train", 4), ("test", 2)):
        write_jsonl(root / f"{split}.jsonl", ultrafeedback_rows(split if split == "train" else "eval", n))
    write_jsonl(root / "prompts.jsonl", deepmath_rows(8))
    return root


def test_every_recipe_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(RECIPES) | set(GRPO_RECIPES)


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


@pytest.mark.parametrize("name", sorted(GRPO_RECIPES))
def test_grpo_recipe_loads_as_written(name):
    from preftune.grpo.config import GRPOConfig
    from preftune.rewards import load_reward

    config = GRPOConfig.from_yaml(str(EXAMPLES / name))
    for key, want in GRPO_RECIPES[name].items():
        assert getattr(config, key) == want, key
    config.generation_layout(1)  # whole groups per generation batch on one process
    for spec in config.reward_funcs:  # every reward named exists and builds with the recipe's own lengths
        assert callable(load_reward(spec, config))


@pytest.mark.parametrize("name", sorted(GRPO_RECIPES))
def test_grpo_recipe_trains_one_step(name, local, tmp_path):
    from preftune.data.pipeline import FROM_CONFIG
    from preftune.grpo.config import GRPOConfig
    from preftune.grpo.trainer import GRPOTrainer

    swap = dict(model_name_or_path=str(local / "model"), dataset_name=str(local / "prompts.jsonl"),
                output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, max_completion_length=6, logging_steps=1, save_strategy="no",
                report_to=[], disable_tqdm=True)
    if name != "two_grpo.yaml":  # G = 2 where the recipe's group size is not its point
        swap["num_generations"] = 2
    if GRPO_RECIPES[name].get("steps_per_generation"):  # GSPO's point: one generation batch, several steps
        swap["per_device_train_batch_size"] = 2
        swap.pop("gradient_accumulation_steps")
    config = GRPOConfig.from_yaml(str(EXAMPLES / name), **swap)
    trainer = GRPOTrainer(args=config, train_dataset=FROM_CONFIG)  # the data and rewards the recipe names
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1] and math.isfinite(train[0]["loss"])
    names = trainer.reward_func_names
    assert names[0] == "accuracy_reward" and all(f"rewards/{n}/mean" in train[0] for n in names)
    if config.dynamic_sampling:
        assert "dynamic_sampling/resample_rounds" in train[0]
    logged = tmp_path / "run" / "completions.jsonl"
    assert logged.is_file() == config.log_completions
    if config.log_completions:
        row = json.loads(logged.read_text().splitlines()[0])
        assert set(row) == {"step", "round", "prompt", "completion", "rewards", "advantage"}
        assert set(row["rewards"]) == set(names)


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
