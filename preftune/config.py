"""DPOConfig: one typed dataclass that drives the Python API, the YAML file and the command line.

Field names, meanings and defaults follow the DPOConfig/TrainingArguments names that preference-tuning
scripts already use, so ``DPOConfig(output_dir=..., beta=0.1, loss_type="sigmoid", ...)`` written for
them runs here unchanged. Fields that exist only in preftune say ``[preftune]`` in their help text.

Every value is coerced and checked when the config is built (``__post_init__``): strings from YAML or
the command line become numbers, booleans, lists and dicts; every error names the field, the bad
value and what is allowed, plus the YAML file and line or the command-line flag it came from.
Precedence, lowest first: dataclass defaults < ``defaults`` (e.g. ``demo_defaults()``) < YAML < flags.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import os
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
ALIASES = {"model": "model_name_or_path", "dataset": "dataset_name"}
# Keys other tools accept that preftune deliberately does not: say where that setting lives instead.
_ELSEWHERE = {
    **dict.fromkeys(("deepspeed", "fsdp", "fsdp_config", "local_rank", "ddp_backend"),
                    "multi-device settings come from `accelerate launch` / `accelerate config`, not from DPOConfig"),
    **dict.fromkeys(("hub_model_id", "hub_token", "hub_strategy", "hub_private_repo"),
                    "preftune does not talk to a model hub; upload output_dir yourself"),
    "tools": "tool-calling chat templates are not supported",
}


class ConfigError(ValueError):
    """One or more invalid config values. ``errors`` is a list of (field, message) pairs; ``origins``
    maps a field to where its value came from ("run.yaml:3", "--beta"), prefixed to its message."""

    def __init__(self, errors: list[tuple[str, str]], origins: Optional[dict[str, str]] = None):
        self.errors = list(errors)
        self.origins = dict(origins or {})
        lines = [f"{self.origins[f] + ': ' if f in self.origins else ''}{msg}" for f, msg in self.errors]
        super().__init__("invalid preftune config:\n  - " + "\n  - ".join(lines))

    def with_origins(self, origins: dict[str, str]) -> ConfigError:
        return ConfigError(self.errors, {**origins, **self.origins})


def _f(default: Any = None, doc: str = "", *, group: str, choices: Any = None, factory: Any = None,
       extra: bool = False) -> Any:
    meta = {"help": ("[preftune] " if extra else "") + doc, "group": group, "choices": choices}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class DPOConfig:
    """Everything one DPO run needs. See ``preftune train --help`` for every field with its default."""

    # ---- run and model -------------------------------------------------------------------------------
    output_dir: str = _f("trainer_output", "Directory for checkpoints, metrics.jsonl, config.yaml and the report.",
                         group="run")
    run_name: Optional[str] = _f(None, "Name of the run in logs; None = the output_dir's name.", group="run")
    model_name_or_path: Optional[str] = _f(
        None, "Local path or cached hub id of the policy model (alias --model). None = the embedded "
        "SmolLM2-135M-Instruct.", group="run", extra=True)
    ref_model_name_or_path: Optional[str] = _f(
        None, "Separate reference model. None = a frozen copy of the policy (or the policy with adapters off "
        "under LoRA).", group="run", extra=True)
    cache_dir: Optional[str] = _f(None, "Where converted models and reference log-prob caches live "
                                  "(None = ~/.cache/preftune).", group="run", extra=True)
    dtype: str = _f("auto", "Weight dtype: auto = float32 on CPU, bfloat16 on a GPU that supports it.",
                    group="run", choices=("auto", "float32", "bfloat16", "float16"), extra=True)
    trust_remote_code: bool = _f(False, "Allow model code from the model directory to run.", group="run",
                                 extra=True)
    chat_template: Optional[str] = _f(None, "A Jinja chat template (or a file holding one) that replaces the "
                                      "tokenizer's.", group="run", extra=True)
    model_init_kwargs: Optional[dict] = _f(None, "Keyword arguments (JSON on the command line) for "
                                           "from_pretrained of the policy.", group="run")
    ref_model_init_kwargs: Optional[dict] = _f(None, "Same, for the reference model.", group="run")
    model_adapter_name: Optional[str] = _f(None, "Name of the trained adapter when the model has several.",
                                           group="run")
    ref_adapter_name: Optional[str] = _f(None, "Name of an adapter that serves as the reference.", group="run")
    force_use_ref_model: bool = _f(False, "Use ref_model_name_or_path even when the policy is a LoRA model.",
                                   group="run")
    disable_dropout: bool = _f(True, "Turn dropout off in policy and reference (the log-ratios then compare "
                               "like with like).", group="run")
    use_peft: bool = _f(False, "Train LoRA adapters instead of all weights.", group="lora", extra=True)
    lora_r: int = _f(16, "LoRA rank.", group="lora", extra=True)
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).", group="lora", extra=True)
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch.", group="lora", extra=True)
    lora_target_modules: Optional[list[str]] = _f(None, "Module names to adapt; None or 'all-linear' = every "
                                                  "linear layer but the output head.", group="lora", extra=True)

    # ---- data ----------------------------------------------------------------------------------------
    dataset_name: Optional[str] = _f(None, "Training data: a .jsonl/.json/.parquet/.csv file, a directory, or a "
                                     "cached hub dataset (alias --dataset). None = the bundled demo tasks.",
                                     group="data", extra=True)
    dataset_config: Optional[str] = _f(None, "Configuration name of a hub dataset.", group="data", extra=True)
    dataset_split: str = _f("train", "Split of dataset_name used for training.", group="data", extra=True)
    eval_dataset: Optional[Union[float, str]] = _f(
        None, "Evaluation data: a file, a split name of dataset_name, or a fraction in (0, 1) held out from "
        "training. None = the demo's eval set, or no evaluation for other data.", group="data", extra=True)
    bad_rows: str = _f("error", "Malformed rows: 'error' stops at the first with its row number; 'skip' drops "
                       "and counts them.", group="data", choices=("error", "skip"), extra=True)
    allow_pickle: bool = _f(False, "Allow loading pickled data files (they can run code).", group="data",
                            extra=True)
    demo_train_size: Optional[int] = _f(None, "Number of bundled demo training pairs (None = the demo's own).",
                                        group="data", extra=True)
    demo_eval_size: Optional[int] = _f(None, "Number of bundled demo eval pairs (None = the demo's own).",
                                       group="data", extra=True)
    demo_generation_prompts: int = _f(32, "With the demo data: held-out prompts generated from at the end of "
                                      "`preftune train` and scored by each task's verifier, before (reference) "
                                      "and after training (0 = skip).", group="data", extra=True)
    dataset_num_proc: Optional[int] = _f(None, "Accepted for compatibility and ignored: the data is tokenized in "
                                         "batched calls, which a fast tokenizer spreads over every core itself.",
                                         group="data")
    max_length: Optional[int] = _f(1024, "Max tokens of prompt + completion; longer pairs are truncated.",
                                   group="data")
    max_prompt_length: Optional[int] = _f(512, "Max prompt tokens (truncated first, per truncation_mode).",
                                          group="data")
    max_completion_length: Optional[int] = _f(None, "Max tokens of each completion.", group="data")
    truncation_mode: str = _f("keep_end", "Which end of an over-long prompt to keep.", group="data",
                              choices=("keep_end", "keep_start"))
    padding_value: Optional[int] = _f(None, "Pad token id (None = the tokenizer's).", group="data")
    label_pad_token_id: int = _f(-100, "Label value of masked positions (only -100 is supported).", group="data")
    remove_unused_columns: bool = _f(True, "Accepted for compatibility and ignored: preftune keeps only the "
                                     "columns it needs.", group="data")

    # ---- batching and memory -------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "Preference pairs per device per forward (2x sequences).",
                                          group="batch")
    per_device_eval_batch_size: int = _f(8, "Pairs per device per evaluation forward.", group="batch")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", group="batch")
    batch_layout: str = _f("auto", "'padded' = chosen and rejected rows padded; 'packed' = no padding, "
                           "positions restart per sequence; 'prefix' = prompt once, then chosen and rejected "
                           "(fewest tokens); 'prefix_packed' = the 'prefix' rows end to end without padding, "
                           "attention as variable-length sequences (flash's kernel on a GPU; no gradient "
                           "checkpointing); 'auto' = 'prefix' (fastest and leanest measured, on CPU and on an "
                           "H200 with cuDNN attention). All give the same log-probs.", group="batch",
                           choices=("auto", "padded", "packed", "prefix", "prefix_packed"), extra=True)
    padding_free: bool = _f(False, "Batches without padding: satisfied by batch_layout 'packed', 'prefix' or "
                            "'prefix_packed'.", group="batch")
    pad_to_multiple_of: Optional[int] = _f(None, "Round every batch's row length up to a multiple of this. None = "
                                           "64 on a GPU (a bounded set of shapes for kernels that plan per shape), "
                                           "none on CPU (padding is compute there).", group="batch")
    cudnn_attention: Optional[bool] = _f(None, "Let SDPA use cuDNN's attention kernel on a GPU. cuDNN builds an "
                                         "execution plan per new shape (0.5-1 s each, measured on an H200), so "
                                         "None = on when row lengths are rounded (pad_to_multiple_of > 1), else "
                                         "off (flash or memory-efficient attention).", group="batch", extra=True)
    logps_chunk_size: Optional[int] = _f(None, "Completion tokens per chunk of the output head (memory vs speed). "
                                         "None = 1024, halved until a chunk's float32 logits fit 512 MiB "
                                         "(512 for a 152k vocabulary).", group="batch", extra=True)
    use_logits_to_keep: bool = _f(False, "Accepted for compatibility: preftune always computes logits for "
                                  "completion tokens only.", group="batch")
    use_liger_loss: bool = _f(False, "Accepted for compatibility and ignored: log-probs are always chunked.",
                              group="batch")
    fused_layers: bool = _f(True, "Llama-family SwiGLU MLPs and RMSNorms keep less for backward and recompute "
                            "the rest there (same values; about 40% less activation memory); LoRA linears add "
                            "their adapter in one matmul without copying their input.",
                            group="batch", extra=True)
    recompute_mlp: bool = _f(False, "With fused_layers: each SwiGLU MLP whose projections are plain (not LoRA) "
                             "keeps only its input for backward and computes gate and up again there: two "
                             "(tokens, intermediate) tensors less per layer for two more matmuls per layer (a "
                             "middle way to gradient_checkpointing; same values).", group="batch", extra=True)
    triton_kernels: bool = _f(True, "On a CUDA GPU where Triton is installed (PyTorch's CUDA wheels bring it): the "
                              "log-prob head's log-softmax runs as one Triton kernel each way over logits kept in "
                              "bfloat16 (no float32 copy), and with fused_layers each RMSNorm and SwiGLU product as "
                              "one kernel forward and one backward instead of 2-10 eager elementwise kernels (same "
                              "formulas; results within a bfloat16 rounding).", group="batch", extra=True)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.", group="batch")
    gradient_checkpointing_kwargs: Optional[dict] = _f(None, "Keyword arguments (JSON) for "
                                                       "gradient_checkpointing_enable.", group="batch")
    bf16: Optional[bool] = _f(None, "bfloat16 mixed precision. None = on for a GPU that supports it, off on "
                              "CPU (where bfloat16 is very slow).", group="batch")
    fp16: bool = _f(False, "float16 mixed precision with loss scaling.", group="batch")
    dataloader_num_workers: int = _f(0, "Worker processes of the data loader.", group="batch")
    use_cpu: bool = _f(False, "Train on CPU even when a GPU is present.", group="batch")

    # ---- loss ----------------------------------------------------------------------------------------
    loss_type: Union[str, list[str]] = _f("sigmoid", "Preference loss, or several ('sigmoid,sft' or a list) "
                                          "summed with loss_weights. `preftune losses` lists them.", group="loss")
    loss_weights: Optional[list[float]] = _f(None, "One weight per loss_type entry (default 1.0 each).",
                                             group="loss")
    beta: float = _f(0.1, "Strength of the KL-to-reference penalty; higher stays closer to the reference "
                     "(for ipo it is tau, for simpo the reward scale).", group="loss")
    label_smoothing: float = _f(0.0, "Assumed rate of flipped labels, in [0, 0.5) (cDPO / robust).",
                                group="loss")
    f_divergence_type: str = _f("reverse_kl", "Divergence to the reference: reverse_kl is standard DPO.",
                                group="loss", choices=F_DIVERGENCES)
    f_alpha_divergence_coef: float = _f(0.5, "alpha of alpha_divergence, in [0, 1] (0 = forward KL, "
                                        "1 = reverse KL).", group="loss")
    reference_free: bool = _f(False, "Use a uniform reference (all reference log-probs 0): no reference forward.",
                              group="loss")
    use_weighting: bool = _f(False, "Weight each pair by its policy probability (WPO).", group="loss")
    rpo_alpha: Optional[float] = _f(None, "Weight of the chosen-response NLL term (RPO); None = off.",
                                    group="loss")
    ld_alpha: Optional[float] = _f(None, "LD-DPO weight in [0, 1] of tokens beyond the shorter response's "
                                   "length; None = off.", group="loss")
    discopop_tau: float = _f(0.05, "Temperature of the discopop loss.", group="loss")
    simpo_gamma: float = _f(0.5, "Target reward margin gamma of the simpo loss.", group="loss", extra=True)
    hinge_delta: float = _f(1.0, "Margin delta at which the hinge (SLiC) loss reaches zero.", group="loss",
                            extra=True)
    max_nonfinite_steps: int = _f(10, "Stop after this many consecutive steps with a non-finite loss or "
                                  "gradient (each is skipped).", group="loss", extra=True)

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

    # ---- optimizer and schedule ----------------------------------------------------------------------
    learning_rate: float = _f(1e-6, "Peak AdamW learning rate.", group="optim")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.", group="optim")
    adam_beta1: float = _f(0.9, "AdamW beta1.", group="optim")
    adam_beta2: float = _f(0.999, "AdamW beta2.", group="optim")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", group="optim")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 = no clipping).", group="optim")
    optim: str = _f("adamw_torch_fused", "Optimizer: torch AdamW, fused kernel where the device has one.",
                    group="optim", choices=("adamw_torch", "adamw_torch_fused"))
    optim_in_backward: bool = _f(
        False, "Make the AdamW update inside backward as gradients complete (64 MiB of them at a time) and free "
        "them, so the whole gradient never exists at once. Same updates as a plain step; needs "
        "max_grad_norm=0, gradient_accumulation_steps=1, adamw_torch_fused, no fp16 and one process.",
        group="optim", extra=True)
    num_train_epochs: float = _f(3.0, "Passes over the training data (ignored when max_steps > 0).",
                                 group="optim")
    max_steps: int = _f(-1, "Total optimizer steps; -1 = from num_train_epochs.", group="optim")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule after warmup.", group="optim",
                                choices=LR_SCHEDULERS)
    lr_scheduler_kwargs: Optional[dict] = _f(None, "Extra schedule arguments (JSON), e.g. "
                                             '{"min_lr_rate": 0.1} for cosine_with_min_lr.', group="optim")
    warmup_ratio: float = _f(0.0, "Fraction of total steps of linear warmup.", group="optim")
    warmup_steps: Union[int, float] = _f(0, "Warmup steps (a value in (0, 1) is a fraction); overrides "
                                         "warmup_ratio when > 0.", group="optim")
    seed: int = _f(42, "Random seed for initialisation, dropout and shuffling.", group="optim")
    data_seed: Optional[int] = _f(None, "Separate seed for data shuffling; None = seed.", group="optim")

    # ---- logging, evaluation, checkpoints ------------------------------------------------------------
    logging_steps: Union[int, float] = _f(10, "Log every N optimizer steps (a value in (0, 1) is a fraction "
                                          "of the total).", group="log")
    logging_first_step: bool = _f(False, "Also log the first step.", group="log")
    report_to: list[str] = _f(None, "Extra metric sinks besides metrics.jsonl: none, tensorboard or all.",
                              group="log", choices=("none", "tensorboard", "all"), factory=lambda: ["none"])
    disable_tqdm: Optional[bool] = _f(None, "Hide the progress bar (None = shown on the main process).",
                                      group="log")
    eval_strategy: str = _f("no", "When to evaluate: no, steps (every eval_steps) or epoch.", group="log",
                            choices=("no", "steps", "epoch"))
    eval_steps: Optional[Union[int, float]] = _f(None, "Evaluate every N steps (None = logging_steps).",
                                                 group="log")
    eval_on_start: bool = _f(False, "Evaluate once before the first step.", group="log")
    generate_during_eval: bool = _f(False, "Generate from policy and reference at evaluation and log samples.",
                                    group="log")
    save_strategy: str = _f("steps", "When to checkpoint: no, steps (every save_steps) or epoch.", group="log",
                            choices=("no", "steps", "epoch"))
    save_steps: Union[int, float] = _f(500, "Checkpoint every N steps (a value in (0, 1) is a fraction).",
                                       group="log")
    save_total_limit: Optional[int] = _f(None, "Keep only the newest N checkpoints (None = all).", group="log")
    resume_from_checkpoint: Optional[str] = _f(None, "Checkpoint directory to resume from, or 'last' for the "
                                               "newest in output_dir.", group="log")
    push_to_hub: bool = _f(False, "Not supported (no model hub); must stay false.", group="log")

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
        if registry is None:
            return True
        return any(getattr(registry[n], "needs_reference", True) for n in self.loss_types)

    def global_batch_size(self, num_processes: int = 1) -> int:
        """Pairs per optimizer step, eq. (6.13): B_global = B_micro x N_GPUs x K_accum."""
        return self.per_device_train_batch_size * int(num_processes) * self.gradient_accumulation_steps

    def describe_batch(self, num_processes: int = 1) -> str:
        """One start-of-run log line spelling out eq. (6.13) and the 2x sequence count of eq. (6.14)."""
        g = self.global_batch_size(num_processes)
        return (f"global batch {g} pairs = {self.per_device_train_batch_size} per device x {num_processes} "
                f"process{'es' if num_processes != 1 else ''} x {self.gradient_accumulation_steps} accumulation "
                f"step{'s' if self.gradient_accumulation_steps != 1 else ''} ({2 * g} sequences per optimizer step)")

    def mixed_precision(self, *, bf16_supported: bool) -> str:
        """accelerate's mixed-precision name: 'fp16', 'bf16' or 'no'. bf16=None picks bf16 only where the
        caller says it is fast (a GPU with bf16 support), never on CPU."""
        if self.fp16:
            return "fp16"
        if self.bf16 is None:
            return "bf16" if bf16_supported and not self.use_cpu else "no"
        return "bf16" if self.bf16 else "no"

    def interval(self, name: str, total_steps: int) -> int:
        """logging_steps / eval_steps / save_steps / warmup_steps in steps: values in (0, 1) are fractions of
        total_steps (rounded up), others are step counts."""
        value = getattr(self, name)
        if value is None:
            return 0
        return math.ceil(value * total_steps) if 0 < value < 1 else int(value)

    def num_warmup_steps(self, total_steps: int) -> int:
        """warmup_steps when > 0, else ceil(warmup_ratio x total_steps)."""
        if self.warmup_steps > 0:
            return self.interval("warmup_steps", total_steps)
        return math.ceil(self.warmup_ratio * total_steps)

    @staticmethod
    def demo_defaults() -> dict[str, Any]:
        """Overrides for the no-argument `preftune train` run: the embedded model on the demo tasks."""
        return {"output_dir": "runs/dpo-demo", "learning_rate": 1e-5, "max_steps": 50,
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 192,
                "max_prompt_length": 128, "eval_strategy": "steps", "eval_steps": 25, "logging_steps": 5,
                "save_strategy": "no", "warmup_ratio": 0.1, "demo_eval_size": 64, "per_device_eval_batch_size": 16,
                # RPO's NLL term on the chosen response: measured on this demo, plain DPO lowered log p(chosen)
                # and the verifier pass rate of greedy answers fell from 0.06 to 0.00; with it, 0.06 -> 0.19.
                "rpo_alpha": 1.0}

    # ---- construction and checks ---------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce every field to its type, then check ranges and combinations; raise ConfigError listing all."""
        errors: list[tuple[str, str]] = []  # type errors: these stop the range/combination checks
        choice_errors: list[tuple[str, str]] = []
        if isinstance(self.resume_from_checkpoint, bool):
            self.resume_from_checkpoint = "last" if self.resume_from_checkpoint else None
        if hasattr(self.f_divergence_type, "value"):  # an enum member from other tooling
            self.f_divergence_type = self.f_divergence_type.value
        hints = _type_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name])
            except _Bad as e:
                errors.append((f.name, f"{f.name}={value!r}: expected {e}"))
                continue
            choices = f.metadata.get("choices")
            if choices:
                value = _check_choices(f.name, value, choices, choice_errors)
            setattr(self, f.name, value)
        if not errors:
            if isinstance(self.loss_type, list) and len(self.loss_type) == 1:
                self.loss_type = self.loss_type[0]
            if self.eval_strategy == "steps" and self.eval_steps is None:
                self.eval_steps = self.logging_steps
            errors += choice_errors + _check(self)
        else:
            errors += choice_errors
        if errors:
            raise ConfigError(errors)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain YAML/JSON-safe values."""
        return asdict(self)

    def to_yaml(self, path: Optional[str] = None) -> str:
        """The resolved config as YAML; written to ``path`` (atomically) when given. Returns the text."""
        import yaml

        text = "# preftune resolved config: `preftune train --config` this file to rerun.\n" + yaml.safe_dump(
            self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, origins: Optional[dict[str, str]] = None) -> DPOConfig:
        """Build from a mapping; aliases (model, dataset) are accepted, unknown keys get a suggestion."""
        try:
            return cls(**_rename(dict(d)))
        except ConfigError as e:
            raise e.with_origins(_alias_origins(origins or {})) from None

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> DPOConfig:
        """Load a YAML mapping of fields (``yaml.safe_load``); keyword overrides win over the file."""
        data, lines = _read_yaml(path)
        origins = {k: f"{path}:{line}" for k, line in lines.items() if k not in overrides}
        return cls.from_dict({**data, **overrides}, origins=origins)

    # ---- command line --------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add ``--config FILE.yaml`` and one ``--<field> VALUE`` flag per field, grouped, with help and default.
        Values stay strings here (validation coerces them); unset flags are absent from the namespace."""
        if parser.usage is None:
            parser.usage = "%(prog)s [--config FILE.yaml] [--<field> VALUE ...]   (--help lists every field)"
        parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                            help="YAML file of fields; flags given on the command line override it.")
        groups: dict[str, Any] = {}
        hints = _type_hints()
        for f in fields(cls):
            group = f.metadata["group"]
            if group not in groups:
                groups[group] = parser.add_argument_group(_GROUP_TITLES[group])
            flags = [f"--{f.name}"] + [f"--{a}" for a, n in ALIASES.items() if n == f.name]
            default = f.default if f.default is not MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            doc = f"{f.metadata['help']} [default: {_show(default)}]".replace("%", "%%")
            kind = _kind(hints[f.name])
            kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": doc}
            if kind == "bool":
                kw.update(nargs="?", const="true", metavar="true|false")
            elif kind == "list":
                kw.update(nargs="+", action="append", metavar="V")  # "a,b", "a b" or repeated flags
            else:
                kw["metavar"] = "{" + ",".join(choices) + "}" if choices else ("JSON" if kind == "dict" else "V")
            groups[group].add_argument(*flags, **kw)
        return parser

    @classmethod
    def parse_cli(cls, argv: Optional[list[str]] = None, *, parser: Optional[argparse.ArgumentParser] = None,
                  defaults: Optional[dict[str, Any]] = None, prog: str = "preftune train",
                  use_demo_defaults_when_empty: bool = False) -> tuple[DPOConfig, argparse.Namespace]:
        """Parse flags into a config. ``parser`` may carry the caller's own arguments: their values come back
        as the second element (a Namespace). Unknown flags raise ConfigError with a suggestion.
        Precedence: field defaults < ``defaults`` < the --config YAML < flags. With
        ``use_demo_defaults_when_empty``, a run on the bundled demo data (no --config, no --dataset_name)
        starts from ``demo_defaults()`` under ``defaults``, so `preftune train --max_steps 20` is a short demo."""
        import sys

        parser = parser if parser is not None else argparse.ArgumentParser(
            prog=prog, description="Train with DPO. Every field below is also a key of the --config YAML file.")
        parser.allow_abbrev = False  # "--bet" must not silently mean "--beta"
        cls.add_arguments(parser)
        argv = list(sys.argv[1:] if argv is None else argv)
        known = {s for a in parser._actions for s in a.option_strings}
        argv = [_underscore(t, known) for t in argv]
        ns, rest = parser.parse_known_args(argv)
        unknown = [t for t in rest if t.startswith("-")]
        if rest:
            errs = [(t, f"unknown flag {t!r}{_did_you_mean(t, sorted(known))}") for t in unknown]
            raise ConfigError(errs or [("argv", f"unexpected arguments {rest}; every value needs its --flag")])
        values, extras = {}, argparse.Namespace()
        names = {f.name for f in fields(cls)}
        for key, value in vars(ns).items():
            if key in names:
                values[key] = [x for group in value for x in group] if isinstance(value, list) else value
            elif key != "config":
                setattr(extras, key, value)
        merged, origins = dict(defaults or {}), {}
        if use_demo_defaults_when_empty and not getattr(ns, "config", None) and values.get("dataset_name") is None:
            merged = {**cls.demo_defaults(), **merged}
        if getattr(ns, "config", None):
            data, lines = _read_yaml(ns.config)
            merged.update(data)
            origins.update({k: f"{ns.config}:{line}" for k, line in lines.items()})
        merged.update(values)
        origins.update({k: f"--{k}" for k in values})
        return cls.from_dict(merged, origins=origins), extras


_GROUP_TITLES = {"run": "run and model", "lora": "LoRA adapters", "data": "data", "batch": "batching and memory",
                 "loss": "loss", "reference": "reference model", "optim": "optimizer and schedule",
                 "log": "logging, evaluation and checkpoints"}


# ---- helpers: keys ---------------------------------------------------------------------------------------
def _field_names() -> list[str]:
    return [f.name for f in fields(DPOConfig)]


def _did_you_mean(name: str, candidates: list[str], fallback: str = "; `preftune train --help` lists every field") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else fallback


def _rename(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map aliases to field names and reject unknown keys (all at once, each with a suggestion)."""
    names, errors = _field_names(), []
    for alias, name in ALIASES.items():
        if alias in kwargs:
            if name in kwargs:
                errors.append((alias, f"both {alias!r} and {name!r} given; they are the same field, keep one"))
            else:
                kwargs[name] = kwargs.pop(alias)
    for key in kwargs:
        if key in _ELSEWHERE:
            errors.append((key, f"{key!r} is not a DPOConfig field: {_ELSEWHERE[key]}"))
        elif key not in names and key not in ALIASES:
            errors.append((key, f"unknown field {key!r}{_did_you_mean(str(key), names + list(ALIASES))}"))
    if errors:
        raise ConfigError(errors)
    return kwargs


def _alias_origins(origins: dict[str, str]) -> dict[str, str]:
    return {**origins, **{n: origins[a] for a, n in ALIASES.items() if a in origins and n not in origins}}


def _underscore(token: str, known: set[str]) -> str:
    """--learning-rate -> --learning_rate (also inside --flag=value) when that is a known flag."""
    if not token.startswith("--"):
        return token
    flag, eq, value = token.partition("=")
    fixed = "--" + flag[2:].replace("-", "_")
    return fixed + eq + value if fixed in known else token


_dataclass_init = DPOConfig.__init__


def _checked_init(self: DPOConfig, *args: Any, **kwargs: Any) -> None:
    _dataclass_init(self, *args, **_rename(kwargs))


_checked_init.__doc__ = _dataclass_init.__doc__
_checked_init.__signature__ = inspect.signature(_dataclass_init)  # type: ignore[attr-defined]
DPOConfig.__init__ = _checked_init  # type: ignore[method-assign]


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's top-level mapping and the 1-based line of each key. Errors name the file and line."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError([("config", f"cannot read config file {path!r}: {e.strerror or e}")]) from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError([("config", f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}")]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([("config", f"{path}: the top level must be a mapping of field: value, "
                                      f"got {type(data).__name__}")])
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    return {str(k): v for k, v in data.items()}, lines


# ---- helpers: types --------------------------------------------------------------------------------------
class _Bad(Exception):
    """A value that cannot be read as the field's type; the message says what was expected."""


_HINTS: dict[str, Any] = {}


def _type_hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(get_type_hints(DPOConfig))
    return _HINTS


def _union_args(tp: Any) -> Optional[tuple]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else None


def _kind(tp: Any) -> str:
    args = _union_args(tp)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        if any(get_origin(a) is list for a in rest):
            return "list"
        return _kind(rest[0]) if len(rest) == 1 else "scalar"
    if tp is bool:
        return "bool"
    if get_origin(tp) is list:
        return "list"
    return "dict" if tp is dict else "scalar"


_TRUE, _FALSE = {"true", "yes", "y", "on", "1"}, {"false", "no", "n", "off", "0"}


def _coerce(value: Any, tp: Any) -> Any:
    """Read ``value`` (maybe a string from YAML or the command line) as type ``tp``, or raise _Bad."""
    args = _union_args(tp)
    if args is not None:
        if type(None) in args:
            if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
                return None
            rest = tuple(a for a in args if a is not type(None))
            return _coerce(value, rest[0] if len(rest) == 1 else Union[rest])
        if list[str] in args:  # loss_type: one name, "a,b" or a list
            out = _coerce(value, list[str])
            return out[0] if len(out) == 1 and isinstance(value, str) else out
        if set(args) == {int, float}:
            number = _coerce(value, float)
            return int(number) if number.is_integer() else number
        if set(args) == {float, str}:  # eval_dataset: a fraction, or a file / split name
            try:
                return _coerce(value, float)
            except _Bad:
                return _coerce(value, str)
        raise TypeError(f"unsupported field type {tp}")
    if value is None:
        raise _Bad("a value, not None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad("true or false")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, bool):
            raise _Bad(what)
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise _Bad(what) from None
        if tp is float:
            return number
        if not number.is_integer():
            raise _Bad(what)
        return int(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad("a string")
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Bad(f"a list (or comma-separated string) of {item.__name__}")
        # "a,b" and ["a,b", "c"] (repeated command-line flags) both split on commas
        value = [p for v in value for p in (v.split(",") if isinstance(v, str) else [v])
                 if not isinstance(p, str) or p.strip()]
        try:
            return [_coerce(v.strip() if isinstance(v, str) else v, item) for v in value]
        except _Bad as e:
            raise _Bad(f"a list (or comma-separated string) of {item.__name__}; an item is not {e}") from None
    if tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise _Bad(f"a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise _Bad("a mapping (a JSON object on the command line)")
        return dict(value)
    raise TypeError(f"unsupported field type {tp}")


def _show(value: Any) -> str:
    return "None" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _check_choices(name: str, value: Any, choices: tuple, errors: list) -> Any:
    items = value if isinstance(value, list) else [value]
    items = [v.strip().lower().replace("-", "_") for v in items]
    for v in items:
        if v not in choices:
            errors.append((name, f"{name}={v!r}: must be one of {', '.join(choices)}{_did_you_mean(v, list(choices), '')}"))
    return items if isinstance(value, list) else items[0]


# ---- helpers: cross-field checks -------------------------------------------------------------------------
def _loss_registry() -> Optional[dict]:
    """preftune.losses.LOSSES plus its aliases (name -> spec), or None while that module does not exist."""
    try:
        from preftune import losses
    except ImportError as e:
        if getattr(e, "name", None) == "preftune.losses" or "cannot import name 'losses'" in str(e):
            return None
        raise
    return {**losses.LOSSES, **{a: losses.LOSSES[n] for a, n in getattr(losses, "LOSS_ALIASES", {}).items()}}


def _check(c: DPOConfig) -> list[tuple[str, str]]:
    """Range and combination checks on an already-coerced config; each error names field, value, rule."""
    errors: list[tuple[str, str]] = []

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            errors.append((name, f"{name}={getattr(c, name)!r}: {rule}"))

    def number(name: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
               hi_open: bool = False, optional: bool = False) -> None:
        v = getattr(c, name)
        if v is None and optional:
            return
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if hi == math.inf:
            rule = f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            rule = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        need(ok, name, rule)

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "lora_r", "ref_model_sync_steps", "max_nonfinite_steps"):
        need(getattr(c, name) >= 1, name, "must be an integer >= 1")
    for name in ("max_length", "max_prompt_length", "max_completion_length", "precompute_ref_batch_size",
                 "pad_to_multiple_of", "logps_chunk_size",
                 "dataset_num_proc", "save_total_limit", "demo_train_size", "demo_eval_size"):
        need(getattr(c, name) is None or getattr(c, name) >= 1, name, "must be None or an integer >= 1")
    need(c.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
    need(c.demo_generation_prompts >= 0, "demo_generation_prompts", "must be >= 0")
    need(c.max_steps == -1 or c.max_steps >= 1, "max_steps", "must be -1 (use num_train_epochs) or >= 1")
    number("beta", 0, lo_open=True)
    number("label_smoothing", 0, 0.5, hi_open=True)
    number("f_alpha_divergence_coef", 0, 1)
    number("ref_model_mixup_alpha", 0, 1)
    number("rpo_alpha", 0, optional=True)
    number("ld_alpha", 0, 1, optional=True)
    number("discopop_tau", 0, lo_open=True)
    number("simpo_gamma", 0)
    number("learning_rate", 0)
    number("weight_decay", 0)
    number("adam_beta1", 0, 1, hi_open=True)
    number("adam_beta2", 0, 1, hi_open=True)
    number("adam_epsilon", 0, lo_open=True)
    number("max_grad_norm", 0)
    number("num_train_epochs", 0, lo_open=True)
    number("warmup_ratio", 0, 1)
    number("warmup_steps", 0)
    number("lora_alpha", 0, lo_open=True)
    number("lora_dropout", 0, 1, hi_open=True)
    for name in ("logging_steps", "save_steps"):
        number(name, 0, lo_open=True)
    number("eval_steps", 0, lo_open=True, optional=True)
    for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
        v = getattr(c, name)
        need(v is None or v < 1 or float(v).is_integer(), name, "must be a whole number of steps or a fraction < 1")
    if isinstance(c.eval_dataset, float):
        need(0 < c.eval_dataset < 1, "eval_dataset", "a number means a held-out fraction and must be in (0, 1)")
    need(c.label_pad_token_id == -100, "label_pad_token_id", "only -100 is supported")
    need(not c.push_to_hub, "push_to_hub", "preftune has no model hub access; save to output_dir and upload it "
         "yourself")
    need(bool(c.output_dir), "output_dir", "must be a non-empty path")
    need(bool(c.report_to), "report_to", "must name at least one sink ('none' for metrics.jsonl only)")

    # combinations
    if c.bf16 and c.fp16:
        errors.append(("bf16", "bf16=True and fp16=True: choose one mixed-precision mode"))
    if (c.dtype == "float16" and c.bf16) or (c.dtype == "bfloat16" and c.fp16):
        errors.append(("dtype", f"dtype={c.dtype!r} contradicts {'bf16' if c.bf16 else 'fp16'}=True"))
    if c.max_length is not None and c.max_prompt_length is not None and c.max_prompt_length >= c.max_length:
        errors.append(("max_prompt_length", f"max_prompt_length={c.max_prompt_length} must be < max_length="
                       f"{c.max_length} (the completion needs room)"))
    if c.sync_ref_model and c.precompute_ref_log_probs is True:
        errors.append(("sync_ref_model", "sync_ref_model=True with precompute_ref_log_probs=True: a reference "
                       "that moves during training cannot be precomputed; drop one"))
    if c.padding_free and c.batch_layout == "padded":
        errors.append(("padding_free", "padding_free=True with batch_layout='padded': use 'packed' or 'prefix'"))
    if c.recompute_mlp and not c.fused_layers:
        errors.append(("recompute_mlp", "recompute_mlp=True needs fused_layers=True (the MLP's lean backward "
                       "computes gate and up again)"))
    if c.recompute_mlp and c.gradient_checkpointing:
        errors.append(("recompute_mlp", "recompute_mlp=True with gradient_checkpointing=True: checkpointed layers "
                       "keep nothing for backward already, so gate and up would be computed a third time; drop one"))
    if c.gradient_checkpointing and c.batch_layout == "prefix_packed":
        errors.append(("batch_layout", "batch_layout='prefix_packed' with gradient_checkpointing=True: the recompute "
                       "in backward would not see the variable-length attention; use 'prefix'"))
    if c.optim_in_backward:
        why = "optim_in_backward=True updates each parameter during backward, "
        if c.max_grad_norm:
            errors.append(("max_grad_norm", f"max_grad_norm={c.max_grad_norm!r} with {why}before the global gradient "
                           "norm exists to clip by; set max_grad_norm=0 or optim_in_backward=False"))
        if c.gradient_accumulation_steps > 1:
            errors.append(("gradient_accumulation_steps", f"gradient_accumulation_steps={c.gradient_accumulation_steps}"
                           f" with {why}so gradients cannot accumulate over micro-batches; raise "
                           "per_device_train_batch_size instead, or set optim_in_backward=False"))
        if c.optim != "adamw_torch_fused":
            errors.append(("optim", f"optim={c.optim!r} with optim_in_backward=True: the in-backward update needs "
                           "'adamw_torch_fused' (it skips non-finite steps on the device)"))
        if c.fp16:
            errors.append(("fp16", f"fp16=True with {why}before the loss scaler has checked every gradient; "
                           "use bf16 or float32"))
    if c.lr_scheduler_type in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kw = c.lr_scheduler_kwargs or {}
        if "min_lr" not in kw and "min_lr_rate" not in kw:
            errors.append(("lr_scheduler_kwargs", f"lr_scheduler_kwargs={c.lr_scheduler_kwargs!r}: "
                           f"{c.lr_scheduler_type} needs min_lr or min_lr_rate, e.g. '{{\"min_lr_rate\": 0.1}}'"))
    if c.report_to != ["none"] and "none" in c.report_to:
        errors.append(("report_to", f"report_to={c.report_to!r}: 'none' cannot be combined with other sinks"))
    errors += _check_losses(c, already={f for f, _ in errors})
    return errors


def _check_losses(c: DPOConfig, already: set[str]) -> list[tuple[str, str]]:
    """loss_type names, loss_weights, each loss's own parameter ranges, reference-only options."""
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
    if registry is None:
        return errors
    for n in names:
        if n not in registry:
            errors.append(("loss_type", f"loss_type={n!r}: not a known loss; choose from {', '.join(registry)}"
                           f"{_did_you_mean(n, list(registry), '')}"))
    if errors:
        return errors
    for n in names:  # each loss's own parameter ranges (e.g. robust needs label_smoothing < 0.5)
        for key, param in getattr(registry[n], "params", {}).items():
            if getattr(c, key, None) is not None and key not in already:
                already.add(key)
                try:
                    param.check(key, getattr(c, key), f"loss_type={n!r}")
                except ValueError as e:
                    errors.append((key, str(e)))
    if not c.needs_reference:
        why = "reference_free=True" if c.reference_free else f"loss_type={c.loss_type!r} uses no reference model"
        for flag in ("sync_ref_model", "precompute_ref_log_probs"):
            if getattr(c, flag) is True:
                errors.append((flag, f"{flag}=True but {why}: nothing to {flag.split('_')[0]}; drop the flag"))
    return errors
