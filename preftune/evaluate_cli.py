"""`preftune eval`: judge a trained model against its reference.

Two kinds of evidence, side by side in one before/after table:
- implicit-reward metrics on held-out pairs (accuracy, margins, chosen/rejected log-probs), computed
  by the same code path as training-time evaluation;
- generation: greedy (and optionally sampled) completions for held-out prompts, scored by the demo
  tasks' verifiers when the rows carry a `task`, or by a user reward (`--reward module:function`)
  as the win rate of the trained model over the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _run_config(model_dir: Path) -> dict:
    """The training run's resolved config, when the model directory is a preftune run directory."""
    import yaml

    path = model_dir / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text()) or {}
    return {}


def load_trained(model_dir: str | Path, *, ref_model: str | None = None, dtype: str = "auto"):
    """(policy, reference model or None, tokenizer, base id). For an adapter directory the reference is
    the base model with adapters disabled (None here); for a full model it is `ref_model`, else the
    model the run started from (its config.yaml), else the embedded default."""
    from preftune import models

    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise FileNotFoundError(f"--model {model_dir}: no such directory; pass the output_dir of a training run")
    adapter_cfg = model_dir / "adapter_config.json"
    run_cfg = _run_config(model_dir)
    if adapter_cfg.is_file():
        from peft import PeftModel

        if not (model_dir / "adapter_model.safetensors").is_file():
            raise ValueError(f"{model_dir}: no adapter_model.safetensors (pickled adapters are not loaded: they can "
                             "run code); re-save the adapter with safe_serialization=True")

        base_id = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path") or run_cfg.get("model_name_or_path")
        base = models.load_model(models.resolve_model_path(base_id), dtype=dtype)
        policy = PeftModel.from_pretrained(base, str(model_dir))
        tokenizer = models.load_tokenizer(model_dir if (model_dir / "tokenizer_config.json").is_file() else base_id)
        return policy, None, tokenizer, base_id
    policy = models.load_model(model_dir, dtype=dtype)
    tokenizer = models.load_tokenizer(model_dir)
    base_id = ref_model or run_cfg.get("ref_model_name_or_path") or run_cfg.get("model_name_or_path")
    reference = models.load_model(models.resolve_model_path(base_id), dtype=dtype)
    return policy, reference, tokenizer, base_id


@contextlib.contextmanager
def _as_reference(policy, reference):
    """The model that generates the 'before' side: the reference, or the policy with adapters off."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def generation_eval(policy, reference, tokenizer, rows: list[dict], *, reward_fn=None, verify_fn=None,
                    max_new_tokens: int = 48, batch_size: int = 16, sampled: bool = False, seed: int = 0):
    """Before/after table rows and sample generations for `rows` (each with a `prompt`)."""
    from preftune.evaluate import compare_texts, generate, score_texts, table_row

    prompts = [r["prompt"] for r in rows]
    modes = [("greedy", dict(do_sample=False))] + ([("sampled", dict(do_sample=True, seed=seed))] if sampled else [])
    table, samples = [], []
    for label, kw in modes:
        with _as_reference(policy, reference) as ref:
            before_texts = generate(ref, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)
        after_texts = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)
        if verify_fn is not None:
            table.append(table_row(f"verifier pass rate ({label})", score_texts(rows, before_texts, verify_fn),
                                   score_texts(rows, after_texts, verify_fn)))
        if reward_fn is not None:
            table.append(table_row(f"win rate vs reference ({label})", None,
                                   compare_texts(rows, after_texts, before_texts, reward_fn)))
        if label == "greedy":
            samples = [{"prompt": p, "reference": b, "trained": a}
                       for p, b, a in list(zip(prompts, before_texts, after_texts))[:6]]
    return table, samples


def reward_table(before: dict | None, after: dict) -> list[dict]:
    """Implicit-reward metrics as table rows (accuracy, margins, log-probs)."""
    keys = [("eval_rewards/accuracies", "reward accuracy"), ("eval_rewards/margins", "reward margin"),
            ("eval_logps/chosen", "log p(chosen)"), ("eval_logps/rejected", "log p(rejected)"),
            ("eval_loss", "DPO loss")]
    return [{"metric": label, "before": (before or {}).get(k), "after": after.get(k), "n": after.get("n"),
             "before_ci": None, "after_ci": None} for k, label in keys if k in after]


def run_eval_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="preftune eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained model or adapter directory (a run's output_dir)")
    p.add_argument("--ref_model", default=None, help="reference model (default: the run's starting model)")
    p.add_argument("--dataset", default=None, help="held-out preference data (default: the bundled demo eval split)")
    p.add_argument("--dataset_split", default=None)
    p.add_argument("--reward", default=None, help="module:function or file.py:function, reward(row, text) -> float")
    p.add_argument("--num_prompts", type=int, default=64, help="prompts to generate from (0: no generation)")
    p.add_argument("--num_pairs", type=int, default=200, help="held-out pairs for the implicit-reward metrics")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sampled", action="store_true", help="also evaluate sampled generations")
    p.add_argument("--output", default=None, help="write the table as JSON here")
    a = p.parse_args(argv)

    from preftune.config import DPOConfig
    from preftune.data.demo import demo_dataset, verify
    from preftune.data.formats import load_rows
    from preftune.evaluate import format_table, load_reward_fn
    from preftune.trainer import DPOTrainer

    reward_fn = load_reward_fn(a.reward) if a.reward else None
    policy, reference, tokenizer, base_id = load_trained(a.model, ref_model=a.ref_model)
    rows = list(demo_dataset("eval") if a.dataset is None else load_rows(a.dataset, split=a.dataset_split))
    if not rows:
        raise ValueError(f"--dataset {a.dataset}: no rows")
    run_cfg = _run_config(Path(a.model))
    keep = {k: run_cfg[k] for k in ("beta", "loss_type", "max_length", "max_prompt_length", "truncation_mode",
                                     "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing",
                                     "simpo_gamma") if run_cfg.get(k) is not None}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, report_to="none", **keep)
        pairs = rows[: a.num_pairs]
        trainer = DPOTrainer(model=policy, ref_model=reference, args=cfg, train_dataset=pairs, eval_dataset=pairs,
                             processing_class=tokenizer)
        after = trainer.evaluate()
    after["n"] = len(trainer.eval_split)
    before = {"eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0}  # policy == reference: all rewards 0
    table = reward_table(before, after)
    samples = []
    gen_rows = [r for r in rows if "prompt" in r][: a.num_prompts]
    if gen_rows:
        verify_fn = verify if all("task" in r for r in gen_rows) else None
        if verify_fn is None and reward_fn is None:
            logger.info("no verifier (rows have no `task`) and no --reward: skipping generation-based evaluation")
        else:
            gen_table, samples = generation_eval(policy, reference, tokenizer, gen_rows, reward_fn=reward_fn,
                                                 verify_fn=verify_fn, max_new_tokens=a.max_new_tokens,
                                                 batch_size=a.batch_size, sampled=a.sampled)
            table += gen_table
    ref_label = f"{base_id} (adapters disabled)" if reference is None else str(base_id or "embedded default")
    print(f"model: {a.model}   reference: {ref_label}")
    print(format_table(table))
    for s in samples[:3]:
        print(f"\nprompt:    {s['prompt'] if isinstance(s['prompt'], str) else s['prompt'][-1]['content']}")
        print(f"reference: {s['reference']!r}\ntrained:   {s['trained']!r}")
    if a.output:
        Path(a.output).write_text(json.dumps({"table": table, "samples": samples}, indent=1, default=str))
    return 0
