"""A whole training run as the command line does it: train, save the final model, write the report,
and print what changed (the before/after table on held-out pairs, and on the bundled demo data the
verifier pass rates of generations)."""

from __future__ import annotations

import logging
from pathlib import Path

from preftune.config import DPOConfig

logger = logging.getLogger("preftune")

SUMMARY_KEYS = (
    ("eval_rewards/accuracies", "reward accuracy"),
    ("eval_rewards/margins", "reward margin"),
    ("eval_loss", "loss"),
    ("eval_logps/chosen", "log p(chosen)"),
    ("eval_logps/rejected", "log p(rejected)"),
)


def summary_table(before: dict | None, after: dict | None, n_eval: int) -> str:
    """Before/after lines for the held-out pairs. Before training the policy is the reference, so its
    implicit rewards are all zero: accuracy 0 and margin 0 are the starting point by definition."""
    lines = [f"held-out pairs: {n_eval}", f"{'metric':<18}{'before':>12}{'after':>12}"]
    for key, label in SUMMARY_KEYS:
        if (before and key in before) or (after and key in after):
            b = f"{before[key]:.4f}" if before and key in before else "-"
            a = f"{after[key]:.4f}" if after and key in after else "-"
            lines.append(f"{label:<18}{b:>12}{a:>12}")
    if before:
        lines.append("(before training the policy is its reference: rewards are 0 up to float error, so 'before'\n"
                     " accuracy counts strict wins of float noise; the margin shows the true starting point)")
    return "\n".join(lines)


def demo_generation_eval(trainer):
    """Verifier pass rates before (reference) and after (trained) on held-out demo prompts.

    Only for the bundled demo data, whose rows carry the task each verifier checks."""
    args = trainer.args
    n = int(getattr(args, "demo_generation_prompts", 32) or 0)
    if n <= 0 or args.dataset_name is not None or args.eval_dataset is not None:
        return [], []
    if trainer.is_peft:
        reference = None  # generation_eval disables the adapters for the 'before' side
    else:
        reference = getattr(trainer.reference, "model", None)
        if reference is None and trainer.needs_reference and trainer.model_path:
            from preftune import models  # the reference was precomputed and freed: reload the starting model

            reference = models.load_model(trainer.model_path, dtype=args.dtype)
        if reference is None:
            return [], []  # reference-free loss on a model built in code: nothing to compare against
    from preftune.data.demo import demo_dataset, verify
    from preftune.evaluate import generation_eval

    rows = demo_dataset("eval", n=n, tasks=getattr(args, "demo_tasks", None))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return generation_eval(policy, reference, trainer.tokenizer, rows, verify_fn=verify, max_new_tokens=40)


def train(config: DPOConfig | None = None, *, eval_at_end: bool = False, **overrides):
    """Train from a config (the CLI's entry point): train, save the final model, report. Returns the trainer.
    eval_at_end: evaluate the eval set after the last step even with eval_strategy='no'."""
    from preftune.data.pipeline import FROM_CONFIG
    from preftune.trainer import DPOTrainer

    config = config if config is not None else DPOConfig(**overrides)
    trainer = DPOTrainer(args=config, train_dataset=FROM_CONFIG)  # the config's dataset_name, else the demo data
    trainer.eval_at_end = eval_at_end
    trainer.train()
    from preftune.hub import HubUploadError

    try:
        out, failed = trainer.save_model(), None
    except HubUploadError as e:  # the model is saved; report the run, then the failed upload
        out, failed = e.folder, e
    if trainer.accelerator.is_main_process:
        _report(trainer, out)
    if failed is not None:
        raise failed
    return trainer


def _report(trainer, out: Path) -> None:
    before, after = getattr(trainer, "initial_eval", None), getattr(trainer, "final_eval", None)
    text = summary_table(before, after, len(trainer.eval_split)) if after else (
        "no evaluation ran (set eval_strategy and an eval_dataset for a before/after table)")
    eval_table, samples = demo_generation_eval(trainer)
    report = None
    try:
        from preftune.report import (
            detect_likelihood_collapse,
            print_collapse_warning,
            read_metrics,
            write_report,
        )

        report = write_report(out, eval_table=eval_table or None, samples=samples or None)
        print_collapse_warning(detect_likelihood_collapse(read_metrics(out)[0]))
    except Exception as e:  # the report must never cost the trained model
        logger.warning("could not write the run report: %s", e)
    print("\n" + text)
    if eval_table:
        from preftune.evaluate import format_table

        print("\ngeneration on held-out demo prompts (greedy), scored by each task's verifier:")
        print(format_table(eval_table))
    print(f"\ntrained model: {out.resolve()}")
    if report is not None:
        print(f"report: {Path(report).resolve()}")
