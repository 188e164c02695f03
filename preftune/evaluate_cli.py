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


def pair_metrics(policy, reference, tokenizer, rows: list[dict], run_config: dict) -> dict:
    """Implicit-reward metrics (prefixed `eval_`, plus `n`) of the policy against its reference on preference
    rows, with the run's loss and truncation settings; the reference is the given model, or the policy with
    its adapters off. The same per-pair code as training-time evaluation (`preftune.dpo`), no trainer."""
    from preftune.config import DPOConfig
    from preftune.data.batching import collate
    from preftune.data.pipeline import prepare_one
    from preftune.dpo import DPOObjective, evaluate_pairs
    from preftune.logps import _unwrap, attention_kernels
    from preftune.loop import resolve_layout
    from preftune.policy import attention_heads
    from preftune.reference import AdapterDisabledReference, FrozenModelReference

    keep = {k: run_config[k] for k in ("beta", "loss_type", "loss_weights", "max_length", "max_prompt_length",
                                        "max_completion_length", "truncation_mode", "f_divergence_type",
                                        "f_alpha_divergence_coef", "label_smoothing", "simpo_gamma", "rpo_alpha",
                                        "reference_free", "ld_alpha", "use_weighting")
            if run_config.get(k) is not None}
    cfg = DPOConfig(output_dir=".", report_to="none", **keep)
    split = prepare_one(rows, tokenizer, cfg, name="eval")
    objective = DPOObjective.from_args(cfg)
    source = None
    if objective.needs_reference:
        source = FrozenModelReference(reference) if reference is not None else AdapterDisabledReference(policy)
    base = _unwrap(policy)
    param = next(base.parameters())
    layout = resolve_layout(cfg.batch_layout)
    with attention_kernels(param.device, False, attention_heads(getattr(base, "config", None)), param.dtype):
        out = evaluate_pairs(objective, policy, source, split.features, batch_size=cfg.per_device_eval_batch_size,
                             collate=lambda feats: collate(feats, layout=layout, pad_token_id=tokenizer.pad_token_id,
                                                           device=param.device))
    out["n"] = len(split)
    return out


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

    from preftune.data.demo import demo_dataset, verify
    from preftune.data.formats import load_rows
    from preftune.evaluate import format_table, generation_eval, load_reward_fn

    reward_fn = load_reward_fn(a.reward) if a.reward else None
    policy, reference, tokenizer, base_id = load_trained(a.model, ref_model=a.ref_model)
    rows = list(demo_dataset("eval") if a.dataset is None else load_rows(a.dataset, split=a.dataset_split))
    if not rows:
        raise ValueError(f"--dataset {a.dataset}: no rows")
    after = pair_metrics(policy, reference, tokenizer, rows[: a.num_pairs], _run_config(Path(a.model)))
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
