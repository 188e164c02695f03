"""A whole GRPO run as the command line does it: train, save the final model, write the report, and on the
bundled demo prompts print the greedy verifier pass rate on held-out prompts before and after training."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("preftune")


def demo_pass_rates(trainer, before_model=None):
    """Greedy verifier pass rates on held-out demo prompts: (table rows, samples) as ``preftune.evaluate`` gives
    them. ``before_model`` is the starting policy (None under LoRA: the adapters are turned off for it)."""
    from preftune.data.demo import verify
    from preftune.evaluate import generation_eval
    from preftune.grpo.demo import demo_prompts

    args = trainer.args
    n = int(getattr(args, "demo_generation_prompts", 0) or 0)
    if n <= 0 or args.dataset_name is not None:
        return [], []
    rows = demo_prompts("eval", n=n, tasks=args.demo_tasks)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return generation_eval(policy, before_model, trainer.tokenizer, rows, verify_fn=verify,
                           max_new_tokens=int(args.max_completion_length))


def train(config=None, **overrides):
    """Train GRPO from a config (the command line's entry point); returns the trainer."""
    import copy

    from preftune.data.pipeline import FROM_CONFIG
    from preftune.grpo.config import GRPOConfig
    from preftune.grpo.trainer import GRPOTrainer
    from preftune.hub import HubUploadError

    config = config if config is not None else GRPOConfig(**overrides)
    eval_src = None
    if config.eval_dataset is not None:
        eval_src = config.eval_dataset
    trainer = GRPOTrainer(args=config, train_dataset=FROM_CONFIG, eval_dataset=eval_src)
    demo = int(getattr(config, "demo_generation_prompts", 0) or 0) > 0 and config.dataset_name is None
    before = None
    if demo and not trainer.is_peft:  # the starting weights, for the "before" column
        before = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
    trainer.train()
    try:
        out, failed = trainer.save_model(), None
    except HubUploadError as e:
        out, failed = e.folder, e
    if trainer.accelerator.is_main_process:
        _report(trainer, Path(out), before if demo else None, demo)
    if failed is not None:
        raise failed
    return trainer


def _report(trainer, out: Path, before, demo: bool) -> None:
    table, samples = demo_pass_rates(trainer, before) if demo else ([], [])
    report = None
    try:
        from preftune.report import write_report

        report = write_report(out, eval_table=table or None, samples=samples or None)
    except Exception as e:  # the report must never cost the trained model
        logger.warning("could not write the run report: %s", e)
    first, last = _reward_curve(out)
    if first is not None:
        print(f"\nmean reward: first steps {first:.3f} -> last steps {last:.3f}")
    if table:
        from preftune.evaluate import format_table

        print("\ngeneration on held-out demo prompts (greedy), scored by each task's verifier:")
        print(format_table(table))
    print(f"\ntrained model: {out.resolve()}")
    if report is not None:
        print(f"report: {Path(report).resolve()}")


def _reward_curve(out: Path, k: int = 10):
    """Mean logged reward of the first and last k logged training rows (None when nothing was logged)."""
    from preftune.report import read_metrics

    try:
        train, _ = read_metrics(out)
    except FileNotFoundError:
        return None, None
    rewards = [row["reward"] for row in train if "reward" in row]
    if not rewards:
        return None, None
    k = max(1, min(k, len(rewards) // 2 or 1))
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k
