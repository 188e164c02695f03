"""`preftune eval` on a tiny trained run: reward metrics, verifier pass rates, win rate, adapters."""

from __future__ import annotations

import json

import pytest

from preftune import DPOConfig, DPOTrainer
from preftune.cli import main
from preftune.data.demo import demo_dataset
from preftune.testing import tiny_model, tiny_tokenizer


def _train_tiny(tmp_path, peft: bool = False):
    tok = tiny_tokenizer()
    base_dir = tmp_path / "base"
    base = tiny_model(len(tok))
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    args = DPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                     model_name_or_path=str(base_dir), max_length=192, max_prompt_length=128,
                     use_peft=peft, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                     lora_target_modules=["q_proj", "v_proj"])
    trainer = DPOTrainer(model=str(base_dir), args=args, train_dataset=demo_dataset("train", n=8))
    trainer.train()
    trainer.save_model()
    return base_dir, tmp_path / "run"


def test_eval_full_model_prints_reward_and_verifier_table(tmp_path, capsys):
    base_dir, run_dir = _train_tiny(tmp_path)
    out_json = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(run_dir), "--num_pairs", "6", "--num_prompts", "4",
               "--max_new_tokens", "6", "--output", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "reward accuracy" in text and "verifier pass rate (greedy)" in text
    assert f"reference: {base_dir}" in text  # the run's starting model, read from its config.yaml
    table = json.loads(out_json.read_text())["table"]
    acc = next(r for r in table if r["metric"] == "reward accuracy")
    assert acc["n"] == 6 and 0.0 <= acc["after"] <= 1.0
    gen = next(r for r in table if r["metric"].startswith("verifier"))
    assert gen["n"] == 4 and gen["before"] is not None and gen["after"] is not None


def test_eval_adapter_uses_base_as_reference_and_custom_reward(tmp_path, capsys):
    _, run_dir = _train_tiny(tmp_path, peft=True)
    assert (run_dir / "adapter_config.json").is_file()
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def reward(row, text):\n    return float(len(text))\n")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(4)))
    rc = main(["eval", "--model", str(run_dir), "--dataset", str(data), "--reward", f"{reward_file}:reward",
               "--num_prompts", "4", "--max_new_tokens", "5", "--output", str(tmp_path / "e.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "adapters disabled" in out and "win rate vs reference" in out
    row = next(r for r in json.loads((tmp_path / "e.json").read_text())["table"] if r["metric"].startswith("win"))
    assert row["n"] == 4 and 0.0 <= row["after"] <= 1.0


def test_eval_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["no_such_module_xyz:f", "json:no_such_function"])
def test_eval_bad_reward_spec(tmp_path, spec, capsys):
    _, run_dir = _train_tiny(tmp_path)
    assert main(["eval", "--model", str(run_dir), "--reward", spec]) == 1
    assert "reward" in capsys.readouterr().err.lower()
