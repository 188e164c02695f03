"""TrainConfig: the training fields every preftune algorithm shares, and the machinery that makes one
typed dataclass drive the Python API, the YAML file and the command line.

An algorithm's config subclasses TrainConfig, adds its own fields with ``config_field`` and is decorated
with ``@config_dataclass`` (a dataclass whose constructor maps aliases and refuses unknown keys by name).
Everything below works for the subclass's fields unchanged: coercion of strings from YAML or flags,
``--<field>`` flags grouped under their titles, unknown keys with a did-you-mean, and validation: the
subclass extends ``checks()`` (range and combination rules, each error naming field, value and rule).

Field names, meanings and defaults follow the TrainingArguments names that training scripts already use.
Fields that exist only in preftune say ``[preftune]`` in their help text. Every value is coerced and
checked when the config is built (``__post_init__``); errors name the field, the bad value and what is
allowed, plus the YAML file and line or the command-line flag it came from. Precedence, lowest first:
dataclass defaults < ``defaults`` (e.g. ``demo_defaults()``) < YAML < flags.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import functools
import inspect
import json
import logging
import math
import os
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional, Union, get_args, get_origin, get_type_hints

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# report_to's names: transformers' integrations (INTEGRATION_TO_CALLBACK; tests/test_tracking.py checks the
# list against the installed transformers), "all" and "none"
REPORT_TO = ("none", "all", "azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
             "mlflow", "neptune", "swanlab", "tensorboard", "trackio", "wandb")


logger = logging.getLogger("preftune")


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


def config_field(default: Any = None, doc: str = "", *, group: str, choices: Any = None, factory: Any = None,
                 extra: bool = False) -> Any:
    """A config field: its default (or ``factory``), its help text, its --help group and allowed values.
    ``extra`` marks a field that exists only in preftune ("[preftune]" in its help). ``@config_dataclass``
    moves group and choices to the class's ``FIELD_INFO``, leaving only ``help`` in the field's metadata."""
    meta = {"help": ("[preftune] " if extra else "") + doc, _EXTRAS: {"group": group, "choices": choices}}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


_f = config_field
_EXTRAS = "preftune"


def config_dataclass(cls: type) -> type:
    """``@dataclass`` for a TrainConfig subclass, whose constructor first maps aliases (``model`` ->
    ``model_name_or_path``) and refuses unknown keys, all at once, each with a suggestion.

    It also keeps the class usable by transformers' ``HfArgumentParser`` (and TRL's ``TrlParser``), which
    passes every key of a field's metadata to ``argparse.add_argument`` and makes a flag of every field with
    ``init=True``: the metadata keeps only ``help`` (group and choices go to ``cls.FIELD_INFO``), and the
    fields named in ``TRL_SCRIPT_FIELDS`` read as ``init=False`` on the class (not on an instance, so
    ``dataclasses.replace`` and ``asdict`` see every field)."""
    with _real_fields():
        cls = dataclass(cls)
    info = dict(getattr(cls, "FIELD_INFO", {}))  # the base's, then this class's own fields
    for f in cls.__dataclass_fields__.values():
        if _EXTRAS in f.metadata:
            info[f.name] = dict(f.metadata[_EXTRAS])
            f.metadata = types.MappingProxyType({"help": f.metadata["help"]})
    cls.FIELD_INFO = info
    cls.__dataclass_fields__ = _ParserView(cls.__dataclass_fields__, cls.TRL_SCRIPT_FIELDS)
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        generated(self, *args, **_rename(type(self), kwargs))

    __init__.__signature__ = inspect.signature(generated)  # type: ignore[attr-defined]
    __init__._checks_keys = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return cls


_BUILDING = [0]  # > 0 while @config_dataclass builds a class: a base's fields read as they are


@contextlib.contextmanager
def _real_fields():
    _BUILDING[0] += 1
    try:
        yield
    finally:
        _BUILDING[0] -= 1


class _ParserView:
    """A config class's ``__dataclass_fields__``. Read on an instance (``dataclasses.fields(config)``,
    ``replace``, ``asdict``): the fields. Read on the class: the same, except that each field in ``hidden``
    is a copy with ``init=False``, which ``HfArgumentParser`` skips. Those are fields that TRL's
    ``ScriptArguments`` / ``ModelConfig`` also declare: under ``TrlParser((ScriptArguments, DPOConfig,
    ModelConfig))`` they are those classes' flags (a second ``--model_name_or_path`` would be an argparse
    conflict), and the script passes them on to the trainer itself."""

    def __init__(self, real: dict, hidden: tuple[str, ...]):
        self.real = real
        self.for_parser = dict(real)
        for name in hidden:
            if name in real:
                f = copy.copy(real[name])
                f.init = False
                self.for_parser[name] = f

    def __get__(self, instance: Any, owner: type) -> dict:
        return self.real if instance is not None or _BUILDING[0] else self.for_parser


class Checks:
    """Collects (field, message) errors for ``TrainConfig.checks``; each message names field, value, rule."""

    def __init__(self, config: Any):
        self.config = config
        self.errors: list[tuple[str, str]] = []

    def add(self, name: str, message: str) -> None:
        self.errors.append((name, message))

    def need(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            self.add(name, f"{name}={getattr(self.config, name)!r}: {rule}")

    def number(self, name: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
               hi_open: bool = False, optional: bool = False, why: str = "") -> None:
        """A finite number in the interval; ``optional`` lets None through; ``why`` is appended in brackets."""
        v = getattr(self.config, name)
        if v is None and optional:
            return
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if hi == math.inf:
            rule = f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            rule = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        self.need(ok, name, rule + (f" ({why})" if why else ""))


@config_dataclass
class TrainConfig:
    """The training fields every algorithm shares. Subclass it (see the module docstring) for one."""

    # Keys other tools accept that preftune deliberately does not: where that setting lives instead. Set to
    # anything but an unset value (None, False, empty, or TRL's default in REFUSED_UNSET; older resolved config
    # files hold them so) they are refused with this text.
    # A subclass adds its own with ``REFUSED = {**TrainConfig.REFUSED, ...}``.
    REFUSED: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("deepspeed", "fsdp", "fsdp_config", "local_rank", "ddp_backend"),
                        "multi-device settings come from `accelerate launch` / `accelerate config`, not from the "
                        "config"),
        **dict.fromkeys(("accelerator_config", "parallelism_config"),
                        "multi-device settings come from `accelerate launch` / `accelerate config`, not from the "
                        "config"),
        "tools": "tool-calling chat templates are not supported",
    }
    REFUSED_UNSET: ClassVar[dict[str, Any]] = {"local_rank": -1}
    # Fields accepted so that configs written for TRL / TrainingArguments load, which change nothing in preftune:
    # each says why. Set to anything but its default, a warning says so when the config is built. A subclass
    # adds its own like REFUSED. Every other field is read by the code that trains (tests/test_config.py scans
    # for it) or is one whose only accepted values are what preftune does (VALIDATED_ONLY; others are refused).
    ACCEPTED_IGNORED: ClassVar[dict[str, str]] = {
        "dataset_num_proc": "the data is tokenized in batched calls, which a fast tokenizer spreads over every "
                            "core itself",
        "remove_unused_columns": "preftune passes only the columns a training format names to the model, "
                                 "whatever this says",
        **dict.fromkeys(("do_train", "do_predict"),
                        "transformers' Trainer does not read it either: it is there for scripts to read"),
        "do_eval": "transformers' Trainer does not read it either (evaluation follows eval_strategy)",
        "label_names": "preference pairs have no label columns: the chosen and rejected completions are the "
                       "targets",
        "eval_accumulation_steps": "evaluation keeps per-pair numbers only, never logits, so there are no "
                                   "output tensors to move to the CPU in chunks",
        "average_tokens_across_devices": "the loss is a mean over the pairs of the whole global batch (every "
                                         "process's), whatever the number of devices",
        "use_cache": "training and evaluation forwards never keep a key/value cache",
        "log_on_each_node": "preftune logs from the main process of the whole run only",
        "length_column_name": "read only with train_sampling_strategy='group_by_length', which preftune "
                              "does not do",
        **dict.fromkeys(("use_liger_kernel", "liger_kernel_config"),
                        "preftune's own fused layers and Triton kernels (fused_layers, triton_kernels) do the "
                        "work of Liger's; Liger is not used"),
        "dataloader_in_order": "micro-batches always reach the loop in the step plan's order",
        "hub_always_push": "every upload finishes before training goes on, so no checkpoint's push is ever "
                           "skipped for one still in progress: every save is pushed, whatever this says",
    }
    # Fields other tools have whose only accepted values are what preftune does: (those values, what to do
    # instead). Any other value is refused by name when the config is built. A subclass adds its own.
    SUPPORTED_ONLY: ClassVar[dict[str, tuple[tuple, str]]] = {
        "optim_args": ((None,), "set adam_beta1, adam_beta2, adam_epsilon and weight_decay"),
        "optim_target_modules": ((None,), "preftune's optimizers (optim) update every trainable parameter"),
        "label_smoothing_factor": ((0.0,), "for DPO's smoothing of preference labels use label_smoothing"),
        **dict.fromkeys(("bf16_full_eval", "fp16_full_eval"), (
            (False,), "evaluation runs in the training precision (bf16 / fp16 autocast); dtype='bfloat16' "
            "or 'float16' holds the weights in that precision for both")),
        "torch_compile": ((False,), "the model is not compiled: preftune's log-prob head, fused layers and "
                          "Triton kernels (fused_layers, triton_kernels) are its fast path"),
        **dict.fromkeys(("torch_compile_backend", "torch_compile_mode"), (
            (None,), "the model is not compiled (torch_compile is not supported)")),
        "neftune_noise_alpha": ((None,), "NEFTune embedding noise is not implemented"),
        "torch_empty_cache_steps": ((None,), "the CUDA cache is never emptied during training; against "
                                    "fragmentation set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"),
        "auto_find_batch_size": ((False,), "set per_device_train_batch_size yourself (and "
                                 "gradient_accumulation_steps for the same global batch)"),
        "logging_nan_inf_filter": ((True,), "a step with a non-finite loss is always skipped, counted in "
                                   "nonfinite_steps and left out of the logged loss"),
        "include_num_input_tokens_seen": (("no",), "every logged row has tokens_per_second"),
        "log_level": (("passive",), "set the level yourself: logging.getLogger('preftune').setLevel(...)"),
        "log_level_replica": (("warning",), "set the level yourself: logging.getLogger('preftune').setLevel(...)"),
        "prediction_loss_only": ((False,), "evaluation returns the loss with the reward metrics"),
        "eval_do_concat_batches": ((True,), "evaluation numbers are always gathered over the whole eval set"),
        "eval_use_gather_object": ((False,), "evaluation gathers tensors only"),
        "include_for_metrics": (([],), "evaluation metrics are computed from the per-pair log-ratios"),
        "batch_eval_metrics": ((False,), "evaluation metrics are computed once over the whole eval set"),
        "save_only_model": ((False,), "checkpoints always hold the optimizer, schedule and random state so that "
                            "a run resumes exactly; for the model alone use trainer.save_model() (the trained "
                            "model is also saved to output_dir at the end)"),
        "save_on_each_node": ((False,), "checkpoints are written by the main process only; on several nodes "
                              "put output_dir on a shared file system"),
        "enable_jit_checkpoint": ((False,), "checkpoints follow save_strategy; a killed run resumes from the "
                                  "last one (resume_from_checkpoint='last')"),
        "ignore_data_skip": ((False,), "a resumed run always continues with the next batch of its plan (reaching "
                             "it costs nothing: the plan is indexed, not replayed)"),
        "full_determinism": ((False,), "call transformers.enable_full_determinism(seed) before building the "
                             "trainer"),
        "dataloader_drop_last": ((True,), "training always leaves out an epoch's last incomplete global batch "
                                 "(a different tail each epoch, as each epoch is reshuffled); evaluation uses "
                                 "every pair"),
        "dataloader_multiprocessing_context": ((None,), "data loader workers (dataloader_num_workers) start "
                                               "with fork where the platform has it, else torch's default"),
        "train_sampling_strategy": (("random",), "each epoch is a fresh random permutation of the training "
                                    "samples"),
        "debug": (("", []), "no debug options are implemented; for overflow hunting see max_nonfinite_steps "
                  "(the samples of a non-finite step are logged)"),
        "skip_memory_metrics": ((True,), "torch.cuda.max_memory_allocated() after train() gives the peak"),
        "hub_strategy": (("end", "every_save"), "checkpoints themselves (optimizer and random state) are not "
                         "uploaded; resume from output_dir's checkpoint-* folders"),
    }
    VALIDATED_ONLY: ClassVar[tuple[str, ...]] = tuple(SUPPORTED_ONLY)
    # Newer names of another field (newer -> older): set and the older one unset, the value goes there; set to
    # a different value than the older one, refused. The code reads the older one.
    SYNONYMS: ClassVar[dict[str, str]] = {"activation_checkpointing": "gradient_checkpointing",
                                          "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}
    # Fields TRL's ScriptArguments / ModelConfig also declare; hidden from HfArgumentParser (see _ParserView).
    TRL_SCRIPT_FIELDS: ClassVar[tuple[str, ...]] = (
        "model_name_or_path", "dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
        "dataset_name", "dataset_config")
    FIELD_INFO: ClassVar[dict[str, dict]] = {}  # name -> {"group", "choices"}, made by @config_dataclass
    ALIASES: ClassVar[dict[str, str]] = {"model": "model_name_or_path", "dataset": "dataset_name"}
    GROUP_TITLES: ClassVar[dict[str, str]] = {
        "run": "run and model", "lora": "LoRA adapters", "data": "data", "batch": "batching and memory",
        "loss": "loss", "reference": "reference model", "optim": "optimizer and schedule",
        "log": "logging, evaluation and checkpoints"}
    CLI_DESCRIPTION: ClassVar[str] = "Train. Every field below is also a key of the --config YAML file."
    CLI_PROG: ClassVar[str] = "preftune train"  # the command that takes this config's flags and --config files

    # ---- run and model -------------------------------------------------------------------------------
    output_dir: str = _f("trainer_output", "Directory for checkpoints, metrics.jsonl, config.yaml and the report.",
                         group="run")
    run_name: Optional[str] = _f(None, "Name of the run in the trackers that name runs (wandb, trackio, mlflow, "
                                 "comet_ml, swanlab); None = the tracker's own choice.", group="run")
    model_name_or_path: Optional[str] = _f(
        None, "Local path or cached hub id of the policy model (alias --model). None = the embedded "
        "SmolLM2-135M-Instruct.", group="run", extra=True)
    cache_dir: Optional[str] = _f(None, "Where converted models and reference log-prob caches live "
                                  "(None = ~/.cache/preftune).", group="run", extra=True)
    dtype: str = _f("auto", "Weight dtype: auto = float32 on CPU, bfloat16 on a GPU that supports it.",
                    group="run", choices=("auto", "float32", "bfloat16", "float16"), extra=True)
    trust_remote_code: bool = _f(False, "Allow model code from the model directory to run.", group="run",
                                 extra=True)
    chat_template: Optional[str] = _f(None, "A Jinja chat template (or a file holding one) that replaces the "
                                      "tokenizer's.", group="run", extra=True)
    model_init_kwargs: Optional[Union[dict, str]] = _f(None, "Keyword arguments (JSON on the command line) for "
                                           "from_pretrained of the policy.", group="run")
    disable_dropout: bool = _f(True, "Turn dropout off in policy and reference (the log-ratios then compare "
                               "like with like).", group="run")
    use_peft: bool = _f(False, "Train LoRA adapters instead of all weights.", group="lora", extra=True)
    lora_r: int = _f(16, "LoRA rank.", group="lora", extra=True)
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).", group="lora", extra=True)
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch.", group="lora", extra=True)
    lora_target_modules: Optional[list[str]] = _f(None, "Module names to adapt; None or 'all-linear' = every "
                                                  "linear layer but the output head.", group="lora", extra=True)
    merge_lora: bool = _f(False, "With LoRA: after the final save, merge the adapters into the base model and save "
                          "it in <output_dir>/merged (safetensors, tokenizer, model card; loads without peft).",
                          group="lora", extra=True)

    # ---- data loading --------------------------------------------------------------------------------
    dataset_name: Optional[str] = _f(None, "Training data: a .jsonl/.json/.parquet/.csv file, a directory, or a "
                                     "cached hub dataset (alias --dataset). None = the bundled demo tasks.",
                                     group="data", extra=True)
    dataset_config: Optional[str] = _f(None, "Configuration (subset) name of dataset_name, as in "
                                       "datasets.load_dataset(dataset_name, dataset_config): for a hub dataset, or a "
                                       "dataset folder whose README.md lists `configs:`; also for an eval_dataset "
                                       "that is a hub name. Refused for a local file.", group="data", extra=True)
    dataset_split: str = _f("train", "Split of dataset_name used for training.", group="data", extra=True)
    eval_dataset: Optional[Union[float, str]] = _f(
        None, "Evaluation data: a file, a split name of dataset_name, or a fraction in (0, 1) held out from "
        "training. None = the demo's eval set, or no evaluation for other data.", group="data", extra=True)
    bad_rows: str = _f("error", "Malformed rows: 'error' stops at the first with its row number; 'skip' drops "
                       "and counts them.", group="data", choices=("error", "skip"), extra=True)
    allow_pickle: bool = _f(False, "Allow loading pickled data files (they can run code).", group="data",
                            extra=True)
    dataset_num_proc: Optional[int] = _f(None, "Accepted for compatibility and ignored: the data is tokenized in "
                                         "batched calls, which a fast tokenizer spreads over every core itself.",
                                         group="data")
    remove_unused_columns: bool = _f(True, "Accepted for compatibility and ignored: preftune keeps only the "
                                     "columns it needs.", group="data")

    # ---- batching and memory -------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "Preference pairs per device per forward (2x sequences).",
                                          group="batch")
    per_device_eval_batch_size: int = _f(8, "Pairs per device per evaluation forward.", group="batch")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", group="batch")
    pad_to_multiple_of: Optional[int] = _f(None, "Round every batch's row length up to a multiple of this. None = "
                                           "64 on a GPU (a bounded set of shapes for kernels that plan per shape), "
                                           "none on CPU (padding is compute there).", group="batch")
    cudnn_attention: Optional[bool] = _f(None, "Let SDPA use cuDNN's attention kernel on a GPU. cuDNN builds an "
                                         "execution plan per new shape (0.5-1 s each, measured on an H200), so "
                                         "None = on when row lengths are rounded (pad_to_multiple_of > 1), else "
                                         "off (flash or memory-efficient attention).", group="batch", extra=True)
    sdpa_grouped_kv: Optional[bool] = _f(
        None, "Pass grouped key/value heads to SDPA as they are (enable_gqa) instead of repeating them to every "
        "query head: no repeated K/V copies kept for backward, same values. transformers reads this only from "
        "the environment, so preftune sets TRANSFORMERS_SDPA_FORCE_GQA during training and evaluation and "
        "restores it after. None = on CPU, and on a GPU where cuDNN attention takes them with a mask (a "
        "TRANSFORMERS_SDPA_FORCE_GQA you set stands); True = always (on a GPU without that, SDPA's math "
        "kernel); False = transformers' own rule (repeated when there is a mask).", group="batch", extra=True)
    logps_chunk_size: Optional[int] = _f(None, "Completion tokens per chunk of the output head (memory vs speed). "
                                         "None = 1024, halved until a chunk's float32 logits fit 512 MiB "
                                         "(512 for a 152k vocabulary).", group="batch", extra=True)
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
    tied_embedding_grad: bool = _f(True, "Where the input embedding shares its weight with the output head (tied "
                                   "embeddings, e.g. SmolLM2, Qwen2-0.5B), its backward adds its rows into the "
                                   "head's gradient of that weight instead of making a zero-filled (vocab, hidden) "
                                   "gradient of its own for autograd to add (same values, one such buffer less at "
                                   "backward's peak). False = autograd's own path.", group="batch", extra=True)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.", group="batch")
    gradient_checkpointing_kwargs: Optional[Union[dict, str]] = _f(None, "Keyword arguments (JSON) for "
                                                       "gradient_checkpointing_enable.", group="batch")
    bf16: Optional[bool] = _f(None, "bfloat16 mixed precision. None = on for a GPU that supports it, off on "
                              "CPU (where bfloat16 is very slow).", group="batch")
    fp16: bool = _f(False, "float16 mixed precision with loss scaling.", group="batch")
    dataloader_num_workers: int = _f(0, "Worker processes that collate the coming training micro-batches ahead "
                                     "(a torch DataLoader; same batches in the same order). 0 = each micro-batch "
                                     "is collated in the training process when it is due.", group="batch")
    dataloader_prefetch_factor: Optional[int] = _f(None, "Micro-batches each data loader worker collates ahead. "
                                                   "None = torch's default, 2; needs dataloader_num_workers > 0.",
                                                   group="batch")
    dataloader_pin_memory: bool = _f(True, "Collated micro-batches go to page-locked host memory (faster, "
                                     "asynchronous copies to a GPU). Applies with dataloader_num_workers > 0 on a "
                                     "GPU; with 0 workers batches are built on the device directly.", group="batch")
    dataloader_persistent_workers: bool = _f(False, "Keep the data loader's worker processes from one epoch to "
                                             "the next instead of starting them again; needs "
                                             "dataloader_num_workers > 0.", group="batch")
    use_cpu: bool = _f(False, "Train on CPU even when a GPU is present.", group="batch")
    max_nonfinite_steps: int = _f(10, "Stop after this many consecutive steps with a non-finite loss or "
                                  "gradient (each is skipped).", group="loss", extra=True)

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
    lr_scheduler_kwargs: Optional[Union[dict, str]] = _f(None, "Extra schedule arguments (JSON), e.g. "
                                             '{"min_lr_rate": 0.1} for cosine_with_min_lr.', group="optim")
    warmup_ratio: float = _f(0.0, "Fraction of total steps of linear warmup.", group="optim")
    warmup_steps: float = _f(0, "Warmup steps (a value in (0, 1) is a fraction); overrides "
                                         "warmup_ratio when > 0.", group="optim")
    seed: int = _f(42, "Random seed for initialisation, dropout and shuffling.", group="optim")
    data_seed: Optional[int] = _f(None, "Separate seed for data shuffling; None = seed.", group="optim")

    # ---- logging, evaluation, checkpoints ------------------------------------------------------------
    logging_steps: float = _f(10, "Log every N optimizer steps (a value in (0, 1) is a fraction "
                                          "of the total).", group="log")
    logging_first_step: bool = _f(False, "Also log the first step.", group="log")
    report_to: list[str] = _f(None, "Experiment trackers besides metrics.jsonl, through transformers' integration "
                              "callbacks as TrainingArguments takes them: a name, a list, all (the installed ones) "
                              "or none ([] or None = none).", group="log", choices=REPORT_TO,
                              factory=lambda: ["none"])
    disable_tqdm: Optional[bool] = _f(None, "Hide the progress bar (None = shown on the main process).",
                                      group="log")
    eval_strategy: str = _f("no", "When to evaluate: no, steps (every eval_steps) or epoch.", group="log",
                            choices=("no", "steps", "epoch"))
    eval_steps: Optional[float] = _f(None, "Evaluate every N steps (None = logging_steps).",
                                                 group="log")
    eval_on_start: bool = _f(False, "Evaluate once before the first step.", group="log")
    save_strategy: str = _f("steps", "When to checkpoint: no, steps (every save_steps) or epoch.", group="log",
                            choices=("no", "steps", "epoch"))
    save_steps: float = _f(500, "Checkpoint every N steps (a value in (0, 1) is a fraction).",
                                       group="log")
    save_total_limit: Optional[int] = _f(None, "Keep only the newest N checkpoints (None = all).", group="log")
    resume_from_checkpoint: Optional[str] = _f(None, "Checkpoint directory to resume from, or 'last' for the "
                                               "newest in output_dir.", group="log")
    push_to_hub: bool = _f(False, "Upload the saved model folder to the Hugging Face Hub (hub_model_id) with "
                           "huggingface_hub when the model is saved; needs a token (hub_token, `hf auth login` or "
                           "HF_TOKEN).", group="log")
    hub_model_id: Optional[str] = _f(None, "Hub repository to push to, 'namespace/name' (None = the output_dir's "
                                     "name under the token's user).", group="log")
    hub_token: Optional[str] = _f(None, "Hub token with write access (None = huggingface_hub's stored token or "
                                  "HF_TOKEN).", group="log")
    hub_private_repo: Optional[bool] = _f(None, "Create the hub repository private (None = the hub's default for "
                                          "the namespace); no effect on an existing repository.", group="log")
    hub_strategy: str = _f("every_save", "When to push: end (when the final model is saved) or every_save (also "
                           "the model of each checkpoint, as it is saved).", group="log")
    hub_revision: Optional[str] = _f(None, "Branch of the hub repository to push to (None = main).", group="log")
    hub_always_push: bool = _f(False, "Accepted: uploads finish before training goes on, so every save is "
                               "pushed whatever this says.", group="log")

    # ---- TrainingArguments fields: honoured, accepted and ignored (ACCEPTED_IGNORED, a warning when set) or
    # accepting only what preftune does (SUPPORTED_ONLY); each help says which -----------------------------
    logging_strategy: str = _f("steps", "When to log training metrics: steps (every logging_steps), epoch (at "
                               "each epoch's end) or no (only the last step's row).", group="log",
                               choices=("no", "steps", "epoch"))
    eval_delay: float = _f(0, "Steps (eval_strategy='steps') or epochs ('epoch') to wait before the first "
                           "periodic evaluation.", group="log")
    activation_checkpointing: Optional[bool] = _f(None, "The newer name of gradient_checkpointing (None = "
                                                  "gradient_checkpointing decides).", group="batch")
    activation_checkpointing_kwargs: Optional[Union[dict, str]] = _f(None, "The newer name of gradient_checkpointing_kwargs.",
                                                         group="batch")
    tf32: Optional[bool] = _f(None, "TensorFloat-32 matmuls and convolutions on a CUDA GPU (None = torch's "
                              "setting; changes nothing on CPU).", group="batch")
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP's find_unused_parameters (None = accelerate's "
                                                    "default).", group="batch")
    ddp_bucket_cap_mb: Optional[int] = _f(None, "DDP's gradient bucket size in MiB (None = torch's default).",
                                          group="batch")
    ddp_broadcast_buffers: Optional[bool] = _f(None, "DDP's broadcast_buffers (None = torch's default).",
                                               group="batch")
    ddp_static_graph: Optional[bool] = _f(None, "DDP's static_graph (None = torch's default).", group="batch")
    ddp_timeout: int = _f(1800, "Seconds a collective may wait before the process group gives up.",
                          group="batch")
    do_train: bool = _f(False, "Accepted and ignored, as transformers' Trainer ignores it: for scripts to read.",
                        group="run")
    do_eval: bool = _f(False, "Accepted and ignored, as transformers' Trainer ignores it: evaluation follows "
                       "eval_strategy.", group="run")
    do_predict: bool = _f(False, "Accepted and ignored, as transformers' Trainer ignores it: for scripts to "
                          "read.", group="run")
    label_names: Optional[list[str]] = _f(None, "Accepted and ignored: preference pairs have no label columns.",
                                          group="data")
    length_column_name: str = _f("length", "Accepted and ignored: read only with "
                                 "train_sampling_strategy='group_by_length'.", group="data")
    train_sampling_strategy: str = _f("random", "Only 'random': each epoch is a fresh permutation.", group="data")
    eval_accumulation_steps: Optional[int] = _f(None, "Accepted and ignored: evaluation keeps no logits.",
                                                group="log")
    average_tokens_across_devices: bool = _f(True, "Accepted and ignored: the loss is a mean over the global "
                                             "batch's pairs on any number of devices.", group="batch")
    use_cache: bool = _f(False, "Accepted and ignored: forwards keep no key/value cache.", group="batch")
    log_on_each_node: bool = _f(True, "Accepted and ignored: the run's main process logs.", group="log")
    project: str = _f("huggingface", "Trackio's project (report_to=trackio).", group="log")
    trackio_space_id: Optional[str] = _f(None, "Trackio's Space to log to (report_to=trackio).", group="log")
    trackio_bucket_id: Optional[str] = _f(None, "Trackio's bucket (report_to=trackio).", group="log")
    trackio_static_space_id: Optional[str] = _f(None, "Trackio's static Space (report_to=trackio).", group="log")
    use_liger_kernel: bool = _f(False, "Accepted and ignored: fused_layers and triton_kernels do that work.",
                                group="batch")
    liger_kernel_config: Optional[Union[dict, str]] = _f(None, "Accepted and ignored, like use_liger_kernel.", group="batch")
    dataloader_in_order: bool = _f(True, "Accepted and ignored: micro-batches always arrive in plan order.",
                                   group="batch")
    dataloader_drop_last: bool = _f(True, "Only true: training leaves out an epoch's last incomplete global "
                                    "batch (evaluation uses every pair).", group="batch")
    dataloader_multiprocessing_context: Optional[str] = _f(None, "Only None: loader workers start with fork "
                                                           "where available.", group="batch")
    optim_args: Optional[str] = _f(None, "Only None: set adam_beta1/2, adam_epsilon, weight_decay.", group="optim")
    optim_target_modules: Optional[list[str]] = _f(None, "Only None: every trainable parameter is optimized.",
                                                   group="optim")
    label_smoothing_factor: float = _f(0.0, "Only 0: DPO's label smoothing is label_smoothing.", group="loss")
    bf16_full_eval: bool = _f(False, "Only false: evaluation runs in the training precision.", group="batch")
    fp16_full_eval: bool = _f(False, "Only false: evaluation runs in the training precision.", group="batch")
    torch_compile: bool = _f(False, "Only false: the model is not compiled.", group="batch")
    torch_compile_backend: Optional[str] = _f(None, "Only None: the model is not compiled.", group="batch")
    torch_compile_mode: Optional[str] = _f(None, "Only None: the model is not compiled.", group="batch")
    neftune_noise_alpha: Optional[float] = _f(None, "Only None: NEFTune is not implemented.", group="batch")
    torch_empty_cache_steps: Optional[int] = _f(None, "Only None: the CUDA cache is not emptied during "
                                                "training.", group="batch")
    auto_find_batch_size: bool = _f(False, "Only false: choose per_device_train_batch_size.", group="batch")
    logging_nan_inf_filter: bool = _f(True, "Only true: non-finite steps are skipped and left out of the "
                                      "logged loss.", group="log")
    include_num_input_tokens_seen: str = _f("no", "Only 'no' (or false): rows log tokens_per_second.",
                                            group="log")
    log_level: str = _f("passive", "Only 'passive': set logging.getLogger('preftune')'s level yourself.",
                        group="log")
    log_level_replica: str = _f("warning", "Only 'warning': set logging.getLogger('preftune')'s level yourself.",
                                group="log")
    prediction_loss_only: bool = _f(False, "Only false: evaluation returns the loss and the reward metrics.",
                                    group="log")
    eval_do_concat_batches: bool = _f(True, "Only true: evaluation covers the whole eval set at once.", group="log")
    eval_use_gather_object: bool = _f(False, "Only false: evaluation gathers tensors only.", group="log")
    include_for_metrics: list[str] = _f(None, "Only []: metrics come from the per-pair log-ratios.", group="log",
                                        factory=list)
    batch_eval_metrics: bool = _f(False, "Only false: metrics are computed over the whole eval set.", group="log")
    save_only_model: bool = _f(False, "Only false: checkpoints hold what an exact resume needs; "
                               "trainer.save_model() saves the model alone.", group="log")
    save_on_each_node: bool = _f(False, "Only false: the main process writes checkpoints.", group="log")
    enable_jit_checkpoint: bool = _f(False, "Only false: checkpoints follow save_strategy.", group="log")
    ignore_data_skip: bool = _f(False, "Only false: a resumed run continues with the next batch of its plan.",
                                group="log")
    restore_callback_states_from_checkpoint: bool = _f(False, "On resume, give the callbacks that keep a state "
                                                       "(EarlyStoppingCallback's patience count) the checkpoint's.",
                                                       group="log")
    full_determinism: bool = _f(False, "Only false: call transformers.enable_full_determinism(seed) yourself.",
                                group="optim")
    debug: Union[str, list[str]] = _f(None, "Only empty: no debug options are implemented.", group="log",
                                      factory=str)  # a factory: HfArgumentParser then keeps the default
    skip_memory_metrics: bool = _f(True, "Only true: read torch.cuda.max_memory_allocated() yourself.",
                                   group="log")

    # ---- best model (kept last) ---------------------------------------------------------------------------
    load_best_model_at_end: bool = _f(False, "Load the best checkpoint (by metric_for_best_model) into the model "
                                      "at the end of training; needs eval_strategy = save_strategy.", group="log")
    metric_for_best_model: Optional[str] = _f(None, "Eval metric that ranks checkpoints (eval_ prefix optional); "
                                              "None = 'loss' when load_best_model_at_end.", group="log")
    greater_is_better: Optional[bool] = _f(None, "Whether a larger metric_for_best_model is better; None = not "
                                           "when the metric's name ends in 'loss'.", group="log")

    # ---- derived values ------------------------------------------------------------------------------
    def global_batch_size(self, num_processes: int = 1) -> int:
        """Samples per optimizer step, eq. (6.13): B_global = B_micro x N_GPUs x K_accum."""
        return self.per_device_train_batch_size * int(num_processes) * self.gradient_accumulation_steps

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
        """Overrides for a run on the bundled demo data (``parse_cli(use_demo_defaults_when_empty=True)``)."""
        return {}

    # ---- construction and checks ---------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce every field to its type, then check ranges and combinations; raise ConfigError listing all."""
        if not getattr(type(self).__init__, "_checks_keys", False):
            raise TypeError(f"{type(self).__name__} must be decorated with @config_dataclass, not @dataclass "
                            "(its constructor then maps aliases and refuses unknown keys by name)")
        errors: list[tuple[str, str]] = []  # type errors: these stop the range/combination checks
        choice_errors: list[tuple[str, str]] = []
        self._before_coercion()
        hints = _type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name])
            except _Bad as e:
                errors.append((f.name, f"{f.name}={value!r}: expected {e}"))
                continue
            choices = type(self).FIELD_INFO[f.name]["choices"]
            if choices:
                value = _check_choices(f.name, value, choices, choice_errors)
            setattr(self, f.name, value)
        if not errors:
            self._after_coercion()
            errors += choice_errors + self.checks()
        else:
            errors += choice_errors
        if errors:
            raise ConfigError(errors)
        self._warn_ignored()

    def _warn_ignored(self) -> None:
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(self)}
        for name, why in type(self).ACCEPTED_IGNORED.items():
            value = getattr(self, name)
            if value != defaults[name]:
                logger.warning("%s=%r is accepted for compatibility and changes nothing: %s", name, value, why)

    def _before_coercion(self) -> None:
        """Spellings other tooling passes that the types do not read; a subclass extends it."""
        if isinstance(self.resume_from_checkpoint, bool):
            self.resume_from_checkpoint = "last" if self.resume_from_checkpoint else None
        if self.report_to is None:
            self.report_to = ["none"]  # TrainingArguments: None and [] both mean no integrations
        if self.output_dir is None:
            self.output_dir = "trainer_output"  # TrainingArguments' own default for None
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of.strip().lower() == "auto":
            self.pad_to_multiple_of = None  # TRL's spelling of "the automatic choice", which None is here
        if isinstance(self.include_num_input_tokens_seen, bool):  # TrainingArguments: True = 'all', False = 'no'
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        for name in ("logging_strategy", "eval_strategy", "save_strategy"):  # an IntervalStrategy member
            if hasattr(getattr(self, name), "value"):
                setattr(self, name, getattr(self, name).value)

    def _after_coercion(self) -> None:
        """Defaults that depend on other fields, on coerced values; a subclass extends it."""
        if not self.report_to:
            self.report_to = ["none"]
        for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
            value = getattr(self, name)  # whole step counts stay integers, as TrainingArguments keeps them
            if isinstance(value, float) and value >= 1 and value.is_integer():
                setattr(self, name, int(value))
        for new, old in type(self).SYNONYMS.items():
            if getattr(self, new) is not None and getattr(self, old) in (None, False):
                setattr(self, old, getattr(self, new))  # the newer name, when the older one is unset
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def checks(self) -> list[tuple[str, str]]:
        """Range and combination checks on the coerced fields: (field, message) pairs. A subclass returns
        ``super().checks()`` plus its own."""
        c, k = self, Checks(self)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "lora_r", "max_nonfinite_steps"):
            k.need(getattr(c, name) >= 1, name, "must be an integer >= 1")
        for name in ("pad_to_multiple_of", "logps_chunk_size", "dataset_num_proc", "save_total_limit"):
            k.need(getattr(c, name) is None or getattr(c, name) >= 1, name, "must be None or an integer >= 1")
        k.need(c.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
        k.need(c.dataloader_prefetch_factor is None or c.dataloader_prefetch_factor >= 1, "dataloader_prefetch_factor",
               "must be None or an integer >= 1")
        for name in ("dataloader_prefetch_factor", "dataloader_persistent_workers"):
            k.need(not getattr(c, name) or c.dataloader_num_workers > 0, name,
                   "applies to data loader worker processes only: set dataloader_num_workers > 0, or unset it")
        k.need(c.max_steps == -1 or c.max_steps >= 1, "max_steps", "must be -1 (use num_train_epochs) or >= 1")
        k.number("learning_rate", 0)
        k.number("weight_decay", 0)
        k.number("adam_beta1", 0, 1, hi_open=True)
        k.number("adam_beta2", 0, 1, hi_open=True)
        k.number("adam_epsilon", 0, lo_open=True)
        k.number("max_grad_norm", 0)
        k.number("num_train_epochs", 0, lo_open=True)
        k.number("warmup_ratio", 0, 1)
        k.number("warmup_steps", 0)
        k.number("lora_alpha", 0, lo_open=True)
        k.number("lora_dropout", 0, 1, hi_open=True)
        for name in ("logging_steps", "save_steps"):
            k.number(name, 0, lo_open=True)
        k.number("eval_steps", 0, lo_open=True, optional=True)
        for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
            v = getattr(c, name)
            k.need(v is None or v < 1 or float(v).is_integer(), name,
                   "must be a whole number of steps or a fraction < 1")
        if isinstance(c.eval_dataset, float):
            k.need(0 < c.eval_dataset < 1, "eval_dataset", "a number means a held-out fraction and must be in (0, 1)")
        k.need(c.hub_model_id is None or (bool(c.hub_model_id.strip()) and c.hub_model_id.count("/") <= 1),
               "hub_model_id", "must be 'name' or 'namespace/name'")
        k.need(bool(c.output_dir), "output_dir", "must be a non-empty path")
        k.number("eval_delay", 0)
        k.need(c.ddp_timeout >= 1, "ddp_timeout", "must be an integer >= 1 (seconds)")
        k.need(c.ddp_bucket_cap_mb is None or c.ddp_bucket_cap_mb >= 1, "ddp_bucket_cap_mb",
               "must be None or an integer >= 1")
        for new, old in type(self).SYNONYMS.items():
            if getattr(c, new) is not None and getattr(c, new) != getattr(c, old):
                k.add(new, f"{new}={getattr(c, new)!r} contradicts {old}={getattr(c, old)!r}: they are one setting "
                      "under two names; keep one")
        for name, (accepted, instead) in type(self).SUPPORTED_ONLY.items():
            if getattr(c, name) not in accepted:
                k.add(name, f"{name}={getattr(c, name)!r}: preftune supports only "
                      f"{' or '.join(repr(v) for v in accepted)} here; {instead}")
        if c.report_to != ["none"] and "none" in c.report_to:
            k.add("report_to", f"report_to={c.report_to!r}: 'none' cannot be combined with other sinks")
        self._check_precision_and_memory(k)
        if c.load_best_model_at_end:  # as TrainingArguments: the best evaluation must have its checkpoint
            if c.eval_strategy != c.save_strategy:
                k.add("load_best_model_at_end", f"load_best_model_at_end=True needs the save and eval strategies to "
                      f"match, but eval_strategy={c.eval_strategy!r} and save_strategy={c.save_strategy!r}")
            elif c.eval_strategy == "steps" and c.eval_steps and (c.save_steps < 1) == (c.eval_steps < 1) and \
                    round(c.save_steps * 1_000_000) % round(c.eval_steps * 1_000_000):
                k.add("load_best_model_at_end", f"load_best_model_at_end=True needs save_steps ({c.save_steps}) to be "
                      f"a round multiple of eval_steps ({c.eval_steps})")
            elif c.eval_strategy == "steps" and c.eval_steps and (c.save_steps < 1) != (c.eval_steps < 1):
                k.add("load_best_model_at_end", f"load_best_model_at_end=True needs save_steps ({c.save_steps}) to be a "
                      f"multiple of eval_steps ({c.eval_steps}), which mixing a fraction and a step count cannot "
                      "guarantee; give both the same way")
        return k.errors

    def _check_precision_and_memory(self, k: Checks) -> None:
        c = self
        if c.bf16 and c.fp16:
            k.add("bf16", "bf16=True and fp16=True: choose one mixed-precision mode")
        if (c.dtype == "float16" and c.bf16) or (c.dtype == "bfloat16" and c.fp16):
            k.add("dtype", f"dtype={c.dtype!r} contradicts {'bf16' if c.bf16 else 'fp16'}=True")
        if c.recompute_mlp and not c.fused_layers:
            k.add("recompute_mlp", "recompute_mlp=True needs fused_layers=True (the MLP's lean backward computes "
                  "gate and up again)")
        if c.recompute_mlp and c.gradient_checkpointing:
            k.add("recompute_mlp", "recompute_mlp=True with gradient_checkpointing=True: checkpointed layers keep "
                  "nothing for backward already, so gate and up would be computed a third time; drop one")
        if c.optim_in_backward:
            why = "optim_in_backward=True updates each parameter during backward, "
            if c.max_grad_norm:
                k.add("max_grad_norm", f"max_grad_norm={c.max_grad_norm!r} with {why}before the global gradient "
                      "norm exists to clip by; set max_grad_norm=0 or optim_in_backward=False")
            if c.gradient_accumulation_steps > 1:
                k.add("gradient_accumulation_steps", f"gradient_accumulation_steps={c.gradient_accumulation_steps}"
                      f" with {why}so gradients cannot accumulate over micro-batches; raise "
                      "per_device_train_batch_size instead, or set optim_in_backward=False")
            if c.optim != "adamw_torch_fused":
                k.add("optim", f"optim={c.optim!r} with optim_in_backward=True: the in-backward update needs "
                      "'adamw_torch_fused' (it skips non-finite steps on the device)")
            if c.fp16:
                k.add("fp16", f"fp16=True with {why}before the loss scaler has checked every gradient; "
                      "use bf16 or float32")
        if c.lr_scheduler_type in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            kw = c.lr_scheduler_kwargs or {}
            if "min_lr" not in kw and "min_lr_rate" not in kw:
                k.add("lr_scheduler_kwargs", f"lr_scheduler_kwargs={c.lr_scheduler_kwargs!r}: "
                      f"{c.lr_scheduler_type} needs min_lr or min_lr_rate, e.g. '{{\"min_lr_rate\": 0.1}}'")

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain YAML/JSON-safe values: a torch.dtype inside a mapping (model_init_kwargs=
        {"dtype": torch.float16}) is written as its name ("float16"), which loads back as the same dtype."""
        return {k: _plain(v) for k, v in asdict(self).items()}

    def to_json_string(self) -> str:
        """The config as JSON (what transformers' TensorBoardCallback logs as the run's ``args``)."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """`to_dict` with every value that is not a bool, int, float or str as its text (TensorBoard's hparams
        take no others), as TrainingArguments.to_sanitized_dict gives them to the trackers."""
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in self.to_dict().items()}

    def to_yaml(self, path: Optional[str] = None) -> str:
        """The resolved config as YAML; written to ``path`` (atomically) when given. Returns the text."""
        import yaml

        text = f"# preftune resolved config: `{self.CLI_PROG} --config` this file to rerun.\n" + yaml.safe_dump(
            self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, origins: Optional[dict[str, str]] = None):
        """Build from a mapping; aliases (model, dataset) are accepted, unknown keys get a suggestion."""
        try:
            return cls(**_rename(cls, dict(d)))
        except ConfigError as e:
            raise e.with_origins(_alias_origins(cls, origins or {})) from None

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any):
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
        hints = _type_hints(cls)
        info = cls.FIELD_INFO
        for f in sorted(fields(cls), key=lambda f: list(cls.GROUP_TITLES).index(info[f.name]["group"])):
            group = info[f.name]["group"]
            if group not in groups:
                groups[group] = parser.add_argument_group(cls.GROUP_TITLES[group])
            flags = [f"--{f.name}"] + [f"--{a}" for a, n in cls.ALIASES.items() if n == f.name]
            default = f.default if f.default is not MISSING else f.default_factory()
            choices = info[f.name]["choices"]
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
                  defaults: Optional[dict[str, Any]] = None, prog: Optional[str] = None,
                  use_demo_defaults_when_empty: bool = False) -> tuple[Any, argparse.Namespace]:
        """Parse flags into a config. ``parser`` may carry the caller's own arguments: their values come back
        as the second element (a Namespace). Unknown flags raise ConfigError with a suggestion.
        Precedence: field defaults < ``defaults`` < the --config YAML < flags. With
        ``use_demo_defaults_when_empty``, a run on the bundled demo data (no --config, no --dataset_name)
        starts from ``demo_defaults()`` under ``defaults``, so `preftune train --max_steps 20` is a short demo."""
        import sys

        parser = parser if parser is not None else argparse.ArgumentParser(prog=prog or cls.CLI_PROG,
                                                                           description=cls.CLI_DESCRIPTION)
        parser.allow_abbrev = False  # "--bet" must not silently mean "--beta"
        cls.add_arguments(parser)
        argv = list(sys.argv[1:] if argv is None else argv)
        known = {s for a in parser._actions for s in a.option_strings}
        argv = [_underscore(t, known) for t in argv]
        ns, rest = parser.parse_known_args(argv)
        unknown = [t for t in rest if t.startswith("-")]
        if rest:
            errs = [(t, _unknown_flag(cls, t, known)) for t in unknown]
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
        extras.fields_set = frozenset(merged)  # what defaults, the YAML or a flag named (the rest: field defaults)
        return cls.from_dict(merged, origins=origins), extras


# ---- helpers: keys ---------------------------------------------------------------------------------------
def _did_you_mean(name: str, candidates: list[str], fallback: str = "; `preftune train --help` lists every field") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else fallback


def _help_hint(cls: type) -> str:
    return f"; `{cls.CLI_PROG} --help` lists every field"  # type: ignore[attr-defined]


def _unknown_flag(cls: type, token: str, known: set[str]) -> str:
    """Why ``token`` is refused: a field other tools have (with what to use instead), or a suggestion."""
    name = token.lstrip("-").partition("=")[0].replace("-", "_")
    if name in cls.REFUSED:  # type: ignore[attr-defined]
        return f"{token!r}: {name!r} is not a {cls.__name__} field: {cls.REFUSED[name]}"  # type: ignore[attr-defined]
    return f"unknown flag {token!r}{_did_you_mean(token, sorted(known), _help_hint(cls))}"


def _rename(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map ``cls``'s aliases to field names and reject unknown keys (all at once, each with a suggestion)."""
    names, errors = [f.name for f in fields(cls)], []
    aliases = cls.ALIASES  # type: ignore[attr-defined]
    for alias, name in aliases.items():
        if alias in kwargs:
            if name in kwargs:
                errors.append((alias, f"both {alias!r} and {name!r} given; they are the same field, keep one"))
            else:
                kwargs[name] = kwargs.pop(alias)
    for key in list(kwargs):
        if key in cls.REFUSED:  # type: ignore[attr-defined]
            value = kwargs[key]
            if value is None or value is False or (isinstance(value, (str, list, dict)) and not value) or (
                    value == cls.REFUSED_UNSET.get(key, None)):  # type: ignore[attr-defined]  # unset
                del kwargs[key]
                continue
            errors.append((key, f"{key!r} is not a {cls.__name__} field: {cls.REFUSED[key]}"))  # type: ignore[attr-defined]
        elif key not in names and key not in aliases:
            errors.append((key, f"unknown field {key!r}{_did_you_mean(str(key), names + list(aliases), _help_hint(cls))}"))
    if errors:
        raise ConfigError(errors)
    return kwargs


def _alias_origins(cls: type, origins: dict[str, str]) -> dict[str, str]:
    aliases = cls.ALIASES  # type: ignore[attr-defined]
    return {**origins, **{n: origins[a] for a, n in aliases.items() if a in origins and n not in origins}}


def _underscore(token: str, known: set[str]) -> str:
    """--learning-rate -> --learning_rate (also inside --flag=value) when that is a known flag."""
    if not token.startswith("--"):
        return token
    flag, eq, value = token.partition("=")
    fixed = "--" + flag[2:].replace("-", "_")
    return fixed + eq + value if fixed in known else token


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


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _union_args(tp: Any) -> Optional[tuple]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else None


def _kind(tp: Any) -> str:
    args = _union_args(tp)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        if any(get_origin(a) is list for a in rest):
            return "list"
        if dict in rest:
            return "dict"
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
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                value = value[0] if value[0].strip().lower() in ("none", "null") else value  # "--flag none"
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
        if set(args) == {dict, str}:  # a mapping, or its JSON text ("str" is for HfArgumentParser's flags)
            return _coerce(value, dict)
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
        # "a,b" and ["a,b", "c"] (repeated command-line flags) both split on commas, except inside brackets:
        # "length(target_len=20, unit='words')" stays one item
        value = [p for v in value for p in (_split_top_level(v) if isinstance(v, str) else [v])
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


def _split_top_level(text: str) -> list[str]:
    """text split at the commas that are not inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _plain(value: Any) -> Any:
    """``value`` with every torch.dtype in it replaced by its name (torch.float16 -> "float16")."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return str(value).removeprefix("torch.")
    return value


def _show(value: Any) -> str:
    return "None" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _check_choices(name: str, value: Any, choices: tuple, errors: list) -> Any:
    items = value if isinstance(value, list) else [value]
    items = [v.strip().lower().replace("-", "_") for v in items]
    for v in items:
        if v not in choices:
            errors.append((name, f"{name}={v!r}: must be one of {', '.join(choices)}{_did_you_mean(v, list(choices), '')}"))
    return items if isinstance(value, list) else items[0]
