"""DPO through preftune's Python API, which is TRL's: `from preftune import DPOConfig, DPOTrainer`.

    python examples/train_dpo.py          # LoRA DPO of Qwen2-0.5B-Instruct on trl-lib/ultrafeedback_binarized
    python examples/train_dpo.py --model ./my-model --dataset data/train.jsonl --eval_dataset data/test.jsonl
    python examples/train_dpo.py --full   # all weights instead of LoRA adapters

The same run as examples/dpo_lora.yaml (`preftune train --config examples/dpo_lora.yaml`), written as a
script to start from when the training needs code: a model built or changed in Python, data made on the
fly, a callback. Datasets may be file paths, hub names, `datasets.Dataset` objects or lists of dicts.
"""

from __future__ import annotations

import argparse

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import DPOConfig, DPOTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct", help="hub id or local model folder")
    p.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized",
                   help="hub dataset or a .jsonl/.json/.parquet/.csv file with TRL's columns")
    p.add_argument("--eval_dataset", default="test", help="a split of --dataset, a file, or 'none'")
    p.add_argument("--output_dir", default="runs/qwen2-0.5b-dpo-lora")
    p.add_argument("--full", action="store_true", help="train all weights instead of LoRA adapters")
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps (-1: one epoch)")
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=4)
    p.add_argument("--max_length", type=int, default=1024)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> DPOTrainer:
    a = parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    eval_dataset = None if a.eval_dataset.lower() == "none" else a.eval_dataset

    args = DPOConfig(
        output_dir=a.output_dir,
        loss_type="sigmoid",
        beta=0.1,
        learning_rate=5e-7 if a.full else 5e-6,  # adapters take a larger rate than full fine-tuning
        warmup_ratio=0.1,
        num_train_epochs=1,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.per_device_train_batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        max_length=a.max_length,
        gradient_checkpointing=True,
        logging_steps=25,
        eval_strategy="steps" if eval_dataset else "no",
        eval_steps=50,
        save_steps=500,
    )
    peft_config = None if a.full else LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=a.dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    if eval_dataset:
        print(trainer.evaluate())  # {"eval_loss": ..., "eval_rewards/accuracies": ..., ...}
    trainer.save_model()  # Hugging Face files in output_dir (LoRA: the adapters; `preftune merge` folds them in)
    return trainer


if __name__ == "__main__":
    main()
