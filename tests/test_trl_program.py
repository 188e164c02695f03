"""A program written the way TRL's own DPO script and documentation write one, with only the import line
changed to preftune: TrlParser over (ScriptArguments, DPOConfig, ModelConfig), a model and tokenizer loaded
by transformers, datasets from `datasets`, LoRA from TRL's `get_peft_config`, stock transformers
callbacks, compute_metrics, and the HF Trainer's methods after training."""

from __future__ import annotations

import json
import math

import pytest
from _train_worker import make_model_dir, pair_rows, write_jsonl

from preftune import DPOConfig, DPOTrainer  # the one line a TRL user changes: was `from trl import ...`

trl = pytest.importorskip("trl")


def test_a_trl_dpo_script_runs_with_the_import_swapped(tmp_path):
    from datasets import Dataset, IterableDataset, load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, TrainerCallback
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

    model_dir = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    argv = ["--dataset_name", "json", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"),
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--max_steps", "4",
            "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
            "--save_steps", "2", "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
            "--report_to", "none", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
            "--lora_target_modules", "all-linear", "--max_length", "96"]
    script_args, training_args, model_args = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(argv)

    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dataset = load_dataset(script_args.dataset_name, data_files=str(data))  # a DatasetDict with "train"
    split = dataset["train"].train_test_split(test_size=8, seed=0)

    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    def compute_metrics(prediction):
        return {"pairs": float(len(prediction.predictions))}

    trainer = DPOTrainer(
        model=model, ref_model=None, args=training_args, train_dataset=split["train"],
        eval_dataset=split["test"], processing_class=tokenizer, peft_config=get_peft_config(model_args),
        callbacks=[Recorder(), EarlyStoppingCallback(early_stopping_patience=5)], compute_metrics=compute_metrics,
    )
    output = trainer.train()
    assert output.global_step == trainer.state.global_step == 4 and math.isfinite(output.training_loss)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_pairs"] == 8.0
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    assert trainer.state.best_model_checkpoint is not None
    assert any("loss" in row for row in seen) and any("eval_loss" in row for row in seen)
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [1, 2, 3, 4]
    out = tmp_path / "out"
    assert json.loads((out / "eval_results.json").read_text())["eval_pairs"] == 8.0
    assert (out / "adapter_model.safetensors").is_file() and (out / "trainer_state.json").is_file()

    # streaming, as TRL takes it: an IterableDataset with max_steps
    stream = Dataset.from_list(pair_rows(8, seed=1)).to_iterable_dataset()
    assert isinstance(stream, IterableDataset)
    streamed = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=DPOConfig(
        output_dir=str(tmp_path / "stream"), max_steps=2, per_device_train_batch_size=2, report_to=[],
        learning_rate=1e-3), train_dataset=stream, processing_class=tokenizer)
    assert streamed.train().global_step == 2
