"""DPOConfig: the DPO fields on top of TrainConfig's shared training fields (``preftune.config_base``).

Field names, meanings and defaults follow the DPOConfig/TrainingArguments names that preference-tuning
scripts already use, so ``DPOConfig(output_dir=..., beta=0.1, loss_type="sigmoid", ...)`` written for
them runs here unchanged. Fields that exist only in preftune say ``[preftune]`` in their help text.

The loss hyper-parameters (beta, label_smoothing, rpo_alpha, simpo_gamma, ...) are not written here: each
is declared once, where its loss is registered (``preftune.losses``), and DPOConfig gets one field per
declaration with its default, help text and allowed range. A new loss parameter is therefore one edit.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Union

from preftune import losses
from preftune.config_base import (
    LR_SCHEDULERS,
    Checks,
    ConfigError,
    TrainConfig,
    _did_you_mean,
    config_dataclass,
    config_field,
)

__all__ = ["DPOConfig", "ConfigError", "TrainConfig", "F_DIVERGENCES", "LR_SCHEDULERS"]

F_DIVERGENCES = losses.F_DIVERGENCES
_f = config_field


def _with_loss_params(cls: type) -> type:
    """Add one float field per loss hyper-parameter (``losses.config_params()``), in the "loss" group right
    after ``loss_weights``: default, help and "[preftune]" marker from the parameter's declaration."""
    annotations: dict[str, Any] = {}
    for name, annotation in cls.__dict__["__annotations__"].items():
        annotations[name] = annotation
        if name == "loss_weights":
            for key, p in losses.config_params().items():
                annotations[key] = "Optional[float]" if p.default is None else "float"
                setattr(cls, key, _f(p.default, p.doc or p.help, group="loss", extra=p.extra))
    cls.__annotations__ = annotations
    return cls


@config_dataclass
@_with_loss_params
class DPOConfig(TrainConfig):
    """Everything one DPO run needs. See ``preftune train --help`` for every field with its default."""

    # TRL's DPOConfig fields that preftune does not take, with what to use instead (plus TrainConfig's).
    ACCEPTED_IGNORED: ClassVar[dict[str, str]] = {
        **TrainConfig.ACCEPTED_IGNORED,
        "use_logits_to_keep": "preftune always computes logits for completion tokens only",
        "use_liger_loss": "preftune's own chunked head never builds the full logits; the Liger kernel is not used",
    }
    SUPPORTED_ONLY: ClassVar[dict[str, tuple[tuple, str]]] = {
        **TrainConfig.SUPPORTED_ONLY,
        "activation_offloading": ((False,), "to save activation memory use gradient_checkpointing, or "
                                  "recompute_mlp with fused_layers"),
        "pad_token": ((None,), "set tokenizer.pad_token before building the trainer (the padded positions are "
                      "masked either way)"),
    }
    VALIDATED_ONLY: ClassVar[tuple[str, ...]] = (*TrainConfig.VALIDATED_ONLY, "label_pad_token_id", "padding_free",
                                                 "activation_offloading", "pad_token")
    REFUSED: ClassVar[dict[str, str]] = {
        **TrainConfig.REFUSED,
        "generate_during_eval": "preftune does not generate during training; `preftune eval` scores generations "
        "of the trained model against its reference (and on the demo data `preftune train` does so at the end: "
        "demo_generation_prompts)",
        **dict.fromkeys(("model_adapter_name", "ref_adapter_name"),
                        "preftune trains one LoRA adapter (use_peft, or peft_config= in Python) and its reference "
                        "is the model with that adapter off; for another reference set ref_model_name_or_path"),
        "force_use_ref_model": "not needed: set ref_model_name_or_path (or pass ref_model=) and that model is "
        "the reference, with or without LoRA",
        "padding_value": "padding takes the tokenizer's pad token (its eos when it has none); set "
        "tokenizer.pad_token before training to choose another (the padded positions are masked either way)",
    }
    CLI_DESCRIPTION: ClassVar[str] = "Train with DPO. Every field below is also a key of the --config YAML file."

    # ---- reference model -----------------------------------------------------------------------------
    ref_model_name_or_path: Optional[str] = _f(
        None, "Separate reference model. None = a frozen copy of the policy (or the policy with adapters off "
        "under LoRA).", group="run", extra=True)
    ref_model_init_kwargs: Optional[Union[dict, str]] = _f(None, "Same, for the reference model.", group="run")

    # ---- data: pairs, truncation, the demo tasks -----------------------------------------------------
    demo_train_size: Optional[int] = _f(None, "Number of bundled demo training pairs (None = the demo's own).",
                                        group="data", extra=True)
    demo_eval_size: Optional[int] = _f(None, "Number of bundled demo eval pairs (None = the demo's own).",
                                       group="data", extra=True)
    demo_tasks: Optional[list[str]] = _f(None, "Bundled demo tasks to train, evaluate and generate on (None = all: "
                                         "number_only, arithmetic, concise, constraint).", group="data", extra=True)
    demo_generation_prompts: int = _f(32, "With the demo data: held-out prompts generated from at the end of "
                                      "`preftune train` and scored by each task's verifier, before (reference) "
                                      "and after training (0 = skip).", group="data", extra=True)
    max_length: Optional[int] = _f(1024, "Max tokens of prompt + completion; longer pairs are truncated.",
                                   group="data")
    max_prompt_length: Optional[int] = _f(
        None, "Max prompt tokens (truncated first, per truncation_mode). None = no separate limit: a pair longer "
        "than max_length is cut as one sequence (keep_end drops the prompt's first tokens, keep_start the "
        "responses' last).", group="data")
    max_completion_length: Optional[int] = _f(None, "Max tokens of each completion.", group="data")
    truncation_mode: str = _f("keep_end", "Which end of an over-long prompt to keep (of the whole sequence when "
                              "max_prompt_length is None).", group="data",
                              choices=("keep_end", "keep_start"))
    label_pad_token_id: int = _f(-100, "Label value of masked positions (only -100 is supported).", group="data")

    # ---- batching ------------------------------------------------------------------------------------
    batch_layout: str = _f("auto", "'padded' = chosen and rejected rows padded; 'packed' = no padding, "
                           "positions restart per sequence; 'prefix' = prompt once, then chosen and rejected "
                           "(fewest tokens); 'prefix_packed' = the 'prefix' rows end to end without padding, "
                           "attention as variable-length sequences (flash's kernel on a GPU; no gradient "
                           "checkpointing); 'auto' = 'prefix' (fastest and leanest measured, on CPU and on an "
                           "H200 with cuDNN attention). All give the same log-probs.", group="batch",
                           choices=("auto", "padded", "packed", "prefix", "prefix_packed"), extra=True)
    padding_free: bool = _f(False, "Batches without padding: satisfied by batch_layout 'packed', 'prefix' or "
                            "'prefix_packed'.", group="batch")
    use_logits_to_keep: bool = _f(False, "Accepted for compatibility: preftune always computes logits for "
                                  "completion tokens only.", group="batch")
    use_liger_loss: bool = _f(False, "Accepted for compatibility and ignored: log-probs are always chunked.",
                              group="batch")
    activation_offloading: bool = _f(False, "Only false: use gradient_checkpointing or recompute_mlp.",
                                     group="batch")
    pad_token: Optional[str] = _f(None, "Only None: set tokenizer.pad_token before building the trainer.",
                                  group="data")

    # ---- loss (the hyper-parameters declared in preftune.losses follow loss_weights) -----------------
    loss_type: Union[str, list[str]] = _f("sigmoid", "Preference loss, or several ('sigmoid,sft' or a list) "
                                          "summed with loss_weights. `preftune losses` lists them.", group="loss",
                                          factory=lambda: "sigmoid")  # a factory: HfArgumentParser then keeps it
    loss_weights: Optional[list[float]] = _f(None, "One weight per loss_type entry (default 1.0 each).",
                                             group="loss")
    f_divergence_type: str = _f("reverse_kl", "Divergence to the reference: reverse_kl is standard DPO.",
                                group="loss", choices=F_DIVERGENCES)
    reference_free: bool = _f(False, "Use a uniform reference (all reference log-probs 0): no reference forward.",
                              group="loss")
    use_weighting: bool = _f(False, "Weight each pair by its policy probability (WPO).", group="loss")
    ld_alpha: Optional[float] = _f(None, "LD-DPO weight in [0, 1] of tokens beyond the shorter response's "
                                   "length; None = off.", group="loss")
    router_aux_loss_coef: Optional[float] = _f(
        None, "Weight of a mixture-of-experts model's router load-balancing loss, added to the training loss. None "
        "= the coefficient the model's config declares (0.0 where none); 0.0 = off. Refused for a model "
        "without router logits.", group="loss")

    # ---- reference -----------------------------------------------------------------------------------
    precompute_ref_log_probs: Optional[bool] = _f(
        None, "Compute reference log-probs once before training (cached on disk) and free the reference model. "
        "None (default) = automatic: precomputed, for exactly the pairs the run will train on, whenever the "
        "reference is a frozen model on one process or DDP (never more forwards than a live reference, and no "
        "reference model kept in memory); live with LoRA (adapters off cost no memory), TR-DPO or sharding. "
        "False = always a live reference.", group="reference")
    precompute_ref_batch_size: Optional[int] = _f(None, "Pairs per forward while precomputing (None = the "
                                                  "train/eval batch size).", group="reference")
    sync_ref_model: bool = _f(False, "TR-DPO: move the reference toward the policy every ref_model_sync_steps.",
                              group="reference")
    ref_model_mixup_alpha: float = _f(0.6, "TR-DPO alpha in [0, 1]: ref = alpha * policy + (1 - alpha) * ref.",
                                      group="reference")
    ref_model_sync_steps: int = _f(512, "TR-DPO: optimizer steps between reference updates.", group="reference")

    # ---- derived values ------------------------------------------------------------------------------
    @property
    def loss_types(self) -> list[str]:
        """loss_type as a list (one entry for a single loss)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def resolved_loss_weights(self) -> list[float]:
        """One weight per loss type; 1.0 each when loss_weights is None."""
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_types)

    @property
    def needs_reference(self) -> bool:
        """Whether any reference log-probs are needed (False for reference-free losses / reference_free)."""
        if self.reference_free:
            return False
        registry = _loss_registry()
        return any(registry[n].needs_reference for n in self.loss_types)

    def describe_batch(self, num_processes: int = 1) -> str:
        """One start-of-run log line spelling out eq. (6.13) and the 2x sequence count of eq. (6.14)."""
        g = self.global_batch_size(num_processes)
        return (f"global batch {g} pairs = {self.per_device_train_batch_size} per device x {num_processes} "
                f"process{'es' if num_processes != 1 else ''} x {self.gradient_accumulation_steps} accumulation "
                f"step{'s' if self.gradient_accumulation_steps != 1 else ''} ({2 * g} sequences per optimizer step)")

    @staticmethod
    def demo_defaults() -> dict[str, Any]:
        """Overrides for the no-argument `preftune train` run: the embedded model on the demo tasks."""
        return {"output_dir": "runs/dpo-demo", "learning_rate": 1e-4, "max_steps": 50,
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 192,
                "max_prompt_length": 128, "eval_strategy": "steps", "eval_steps": 25, "eval_on_start": True,
                "logging_steps": 5,
                "save_strategy": "no", "warmup_ratio": 0.1, "demo_eval_size": 64, "per_device_eval_batch_size": 16,
                # RPO's NLL term on the chosen response: measured on this demo, plain DPO lowered log p(chosen)
                # and the greedy verifier pass rate fell 0.06 -> 0.00; with it, 0.06 -> 0.19 (lr 1e-5, all four tasks).
                "rpo_alpha": 1.0,
                # The two tasks a 135M model learns in 50 steps (it cannot do the arithmetic ones): measured,
                # held-out greedy pass rate 0.17 -> 0.55, n = 64, Wilson intervals apart (docs/benchmarks.md).
                "demo_tasks": ["concise", "constraint"], "demo_generation_prompts": 64}

    # ---- checks --------------------------------------------------------------------------------------
    def _before_coercion(self) -> None:
        super()._before_coercion()
        if hasattr(self.f_divergence_type, "value"):  # an enum member from other tooling
            self.f_divergence_type = self.f_divergence_type.value

    def _after_coercion(self) -> None:
        super()._after_coercion()
        if isinstance(self.loss_type, list) and len(self.loss_type) == 1:
            self.loss_type = self.loss_type[0]

    def checks(self) -> list[tuple[str, str]]:
        """TrainConfig's checks, the DPO fields' ranges and combinations, then the losses' own."""
        errors = super().checks()
        c, k = self, Checks(self)
        k.need(c.ref_model_sync_steps >= 1, "ref_model_sync_steps", "must be an integer >= 1")
        for name in ("max_length", "max_prompt_length", "max_completion_length", "precompute_ref_batch_size",
                     "demo_train_size", "demo_eval_size"):
            k.need(getattr(c, name) is None or getattr(c, name) >= 1, name, "must be None or an integer >= 1")
        k.need(c.demo_generation_prompts >= 0, "demo_generation_prompts", "must be >= 0")
        from preftune.data.demo import TASKS as DEMO_TASKS

        k.need(c.demo_tasks is None or (len(c.demo_tasks) > 0 and all(t in DEMO_TASKS for t in c.demo_tasks)),
               "demo_tasks", f"must be None or a non-empty list of {', '.join(DEMO_TASKS)}")
        # the loss computes any alpha; the config keeps the interval f-DPO's alpha-divergence is defined on
        k.number("f_alpha_divergence_coef", 0, 1)
        k.number("ref_model_mixup_alpha", 0, 1)
        k.number("ld_alpha", 0, 1, optional=True)
        k.number("router_aux_loss_coef", 0, optional=True)
        k.need(c.label_pad_token_id == -100, "label_pad_token_id", "only -100 is supported")
        if c.max_length is not None and c.max_prompt_length is not None and c.max_prompt_length >= c.max_length:
            k.add("max_prompt_length", f"max_prompt_length={c.max_prompt_length} must be < max_length="
                  f"{c.max_length} (the completion needs room)")
        if c.sync_ref_model and c.precompute_ref_log_probs is True:
            k.add("sync_ref_model", "sync_ref_model=True with precompute_ref_log_probs=True: a reference that moves "
                  "during training cannot be precomputed; drop one")
        if c.padding_free and c.batch_layout == "padded":
            k.add("padding_free", "padding_free=True with batch_layout='padded': use 'packed' or 'prefix'")
        if c.gradient_checkpointing and c.batch_layout == "prefix_packed":
            k.add("batch_layout", "batch_layout='prefix_packed' with gradient_checkpointing=True: the recompute in "
                  "backward would not see the variable-length attention; use 'prefix'")
        errors += k.errors
        return errors + _check_losses(c, already={f for f, _ in errors})


# ---- the loss registry -----------------------------------------------------------------------------------
def _loss_registry() -> dict:
    """preftune.losses.LOSSES plus its aliases (name -> spec)."""
    return {**losses.LOSSES, **{a: losses.LOSSES[n] for a, n in losses.LOSS_ALIASES.items()}}


def _check_losses(c: DPOConfig, already: set[str]) -> list[tuple[str, str]]:
    """loss_type names, loss_weights, every loss hyper-parameter's declared range, reference-only options."""
    errors: list[tuple[str, str]] = []
    names = c.loss_types
    if not names:
        return [("loss_type", "loss_type=[]: name at least one loss")]
    if c.loss_weights is not None:
        if len(c.loss_weights) != len(names):
            errors.append(("loss_weights", f"loss_weights={c.loss_weights!r}: needs {len(names)} value(s), one "
                           f"per loss_type entry {names}"))
        elif not all(math.isfinite(w) for w in c.loss_weights) or not any(c.loss_weights):
            errors.append(("loss_weights", f"loss_weights={c.loss_weights!r}: must be finite, not all zero"))
    registry = _loss_registry()
    k = Checks(c)
    for key, p in losses.config_params().items():  # every value, whichever loss reads it
        if key in already:
            continue
        readers = losses.param_readers(key)
        shown = [n for n in names if n in registry and registry[n].name in readers] or readers
        who = ("every loss" if key in losses.GLOBAL_PARAMS else
               f"loss_type={shown[0]!r}" if len(shown) == 1 else f"loss_type in {shown}")
        k.number(key, p.low, p.high, lo_open=p.low_open, hi_open=p.high_open, optional=p.default is None,
                 why=f"{p.help}; read by {who}")
    errors += k.errors
    for n in names:
        if n not in registry:
            errors.append(("loss_type", f"loss_type={n!r}: not a known loss; choose from {', '.join(registry)}"
                           f"{_did_you_mean(n, list(registry), '')}"))
    if any(f == "loss_type" for f, _ in errors):
        return errors
    if not c.needs_reference:
        why = "reference_free=True" if c.reference_free else f"loss_type={c.loss_type!r} uses no reference model"
        for flag in ("sync_ref_model", "precompute_ref_log_probs"):
            if getattr(c, flag) is True:
                errors.append((flag, f"{flag}=True but {why}: nothing to {flag.split('_')[0]}; drop the flag"))
    return errors
