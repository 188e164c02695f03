"""DPOTrainer: preference pairs on the shared loop (`preftune.loop.TrainLoop`).

The chosen and rejected responses of a micro-batch go through the policy in one forward
(`preftune.logps.model_logps`), the reference log-probs come from `preftune.reference` (a frozen model,
the policy with its adapters off, or a precomputed cache), the loss from the registry in
`preftune.losses` (`preftune.dpo.DPOObjective`). One sample of the loop is one pair.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from preftune.config import DPOConfig
from preftune.data.batching import VarlenPrefix, collate
from preftune.data.pipeline import (
    FROM_CONFIG,
    PreparedSplit,
    check_streams_precompute,
    check_train_dataset,
    named_splits,
    prepare_one,
    prepare_splits,
    report_skips,
)
from preftune.dpo import DPOObjective, evaluate_pairs
from preftune.loop import NonFiniteError, TrainLoop, resolve_layout, resolve_shapes
from preftune.policy import mark_head

logger = logging.getLogger("preftune")

__all__ = ["DPOTrainer", "NonFiniteError", "resolve_layout", "resolve_shapes"]


def _collate_pairs(features, indices: list[int], **kw) -> dict:
    """One training micro-batch on the host: the pairs at `indices`, collated (CPU tensors)."""
    return collate([features[i] for i in indices], **kw)


class DPOTrainer(TrainLoop):
    """Train a causal LM on preference pairs with DPO or one of its variants.

    The signature follows TRL's DPOTrainer: ``DPOTrainer(model, ref_model=None, args=DPOConfig(...),
    train_dataset=..., eval_dataset=..., processing_class=tokenizer, peft_config=LoraConfig(...))``.
    `model` may be a model object, a local path or hub id, or None (the config's
    `model_name_or_path`, else the embedded default SmolLM2-135M-Instruct).

    `train_dataset` is required (``FROM_CONFIG``: the config's dataset_name or the demo data, as
    `preftune.train()` and the command line read them): a `datasets.Dataset`, a `datasets.IterableDataset`
    (a stream; needs ``max_steps``; its first ``max_steps`` x global batch pairs are trained on in the
    stream's order), a list of dicts, or a file/directory path. `eval_dataset` takes the same, or a mapping of
    named eval sets (a dict, `DatasetDict` or `IterableDatasetDict`), each evaluated with the metric prefix
    ``eval_<name>_``. `self.train_dataset` and `self.eval_dataset` are the arguments as given.

    As the HF Trainer: ``callbacks`` are `transformers.TrainerCallback` objects, ``optimizers=(optimizer,
    lr_scheduler)`` replace preftune's AdamW and schedule (either may be None; a scheduler needs its
    optimizer), and ``compute_metrics(EvalPrediction) -> dict`` adds to each evaluation's metrics (``eval_``
    prefixed). preftune never builds full-vocabulary logits, so the `transformers.EvalPrediction` it gets
    holds, per eval pair, ``predictions``: a float32 numpy array (N, 4) of the policy's chosen and rejected
    log-probs and the loss's chosen and rejected implicit rewards (`preftune.dpo.PREDICTION_COLUMNS`), and
    ``label_ids``: zeros (N,) (the chosen response is column 0 of each pair, as TRL's labels say).
    ``data_collator`` must be None: preftune batches the tokenized pairs itself (`batch_layout`).
    """

    sample_name = "pairs"
    algorithm = "DPO"
    progress_desc = "dpo"

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        tokenizer=None,
    ):
        # the parameters in TRL 1.16's order, so positional calls written for TRL mean the same here
        if quantization_config is not None:
            raise ValueError(
                "quantization_config: preftune does not load or train quantized (bitsandbytes 4/8-bit) models; train "
                "LoRA adapters on the full-precision model instead (use_peft / peft_config)")
        if data_collator is not None:
            raise ValueError(
                "data_collator: preftune builds its batches itself from the tokenized pairs (chosen and rejected "
                "sharing one prompt, packed as batch_layout says, rows padded to pad_to_multiple_of); a collator of "
                "TRL's padded tensors has nothing to act on. Drop data_collator; set batch_layout / "
                "pad_to_multiple_of to change the batching")
        args = args if args is not None else DPOConfig()
        if train_dataset is not FROM_CONFIG:  # before the model is loaded
            check_train_dataset(train_dataset, args)
        if eval_dataset is not None:
            check_streams_precompute(eval_dataset, args)
        self.objective = DPOObjective.from_args(args)  # loss errors before the model is loaded
        self.loss_names, self.loss_kwargs = self.objective.loss_names, self.objective.loss_kwargs
        self.needs_reference = self.objective.needs_reference
        super().__init__(model, args, processing_class=processing_class if processing_class is not None else tokenizer,
                         peft_config=peft_config, callbacks=callbacks, optimizers=optimizers)
        self.compute_metrics = compute_metrics
        self.objective.router_aux_loss_coef = self._router_aux_loss_coef()
        with self.accelerator.main_process_first():
            self.train_split, self.eval_split = prepare_splits(args, self.tokenizer, train_dataset, eval_dataset,
                                                               num_processes=self.accelerator.num_processes)
        if self.accelerator.is_main_process:
            for split in [self.train_split] + [split for _, split in named_splits(self.eval_split)]:
                if msg := report_skips(split, args.output_dir):
                    logger.warning(msg)
        # the datasets as given, as Hugging Face's Trainer keeps them; from the config: the rows it named
        from_config = train_dataset is FROM_CONFIG
        self.train_dataset = self.train_split.source if from_config else train_dataset
        self.eval_dataset = (getattr(self.eval_split, "source", None) if from_config and eval_dataset is None
                             else eval_dataset)
        # a ref model given in code, else the config's ref_model_name_or_path (LoRA runs too), else the default
        self._ref_model_arg = ref_model if ref_model is not None else args.ref_model_name_or_path
        self.reference = None
        self._eval_reference_tables = {}  # eval split name -> its precomputed reference (`named_splits`)
        self._policy_moved = False  # train() has begun: the policy no longer holds its initial weights
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # --- the loop's hooks -------------------------------------------------------------------------
    def _num_train_samples(self) -> int:
        return len(self.train_split)

    def _has_eval(self) -> bool:
        return self.eval_split is not None

    def _train_in_order(self) -> bool:
        return self.train_split.streamed

    def _before_train(self) -> None:
        if self.reference is None:
            self.reference = self._build_reference()
        self._policy_moved = True  # from here on (a resumed checkpoint, the first step) the weights are not the initial ones

    def _sample_losses(self, indices: list[int]):
        return self._batch_losses(self._collate(self._features(self.train_split, indices)))

    def _host_collate(self):
        # a picklable function of the features alone (not of the trainer): data loader workers inherit or
        # receive it once, and build CPU tensors only
        return functools.partial(_collate_pairs, self.train_split.features, layout=self.layout,
                                 pad_token_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self.pad_multiple)

    def _batch_losses(self, host_batch: dict):
        dev = self.accelerator.device
        batch = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v.to(dev) if isinstance(v, VarlenPrefix)
                     else v) for k, v in host_batch.items()}
        per_pair, metrics = self._pair_losses(batch, self.reference)
        return per_pair, metrics, batch["num_tokens"], host_batch["pair_index"]  # ids stay on the host

    def _after_good_step(self, step: int, policy: torch.nn.Module) -> None:
        if self.reference is not None:
            self.reference.on_optimizer_step(step, policy)

    def _host_acts_after_good_steps(self) -> bool:
        return getattr(self.reference, "sync", None) is not None  # TR-DPO mixes after good steps only

    def _progress_fields(self, row: dict) -> dict:
        return {"loss": f"{row.get('loss', float('nan')):.4f}", "acc": f"{row.get('rewards/accuracies', float('nan')):.2f}",
                "pairs_s": f"{row['pairs_per_second']:.2f}"}

    # --- batches and losses -----------------------------------------------------------------------------
    def _collate(self, features):
        return collate(features, layout=self.layout, pad_token_id=self.tokenizer.pad_token_id,
                       pad_to_multiple_of=self.pad_multiple, device=self.accelerator.device)

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _features(self, split, indices):
        feats = split.features
        return [feats[i] for i in indices]

    def _pair_losses(self, batch: dict, reference, model=None):
        """Per-pair losses (B,) and metric tensors for one micro-batch."""
        return self.objective.pair_losses(model if model is not None else self.model, batch, reference)

    # --- evaluation --------------------------------------------------------------------------------------
    def _eval_metrics(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """Implicit-reward metrics on the eval pairs (and compute_metrics'), prefixed `eval_`; with several named
        eval sets (a dict given here or to the constructor) each set's prefixed ``eval_<name>_``, as Hugging Face's
        Trainer does. A name of the constructor's eval sets selects that set (prefix ``eval_``). The loop's
        `evaluate()` logs them and calls the callbacks."""
        with self._attention_kernels():
            metrics = {}
            for prefix, dataset in self._eval_sets(eval_dataset):
                for key, value in self._evaluate(dataset).items():
                    metrics[metric_key_prefix + prefix + key[len("eval"):] if key.startswith("eval_") else key] = value
            return metrics

    def _eval_sets(self, eval_dataset) -> list[tuple[str, object]]:
        """(key prefix after ``eval``, dataset or prepared split) of each eval set `evaluate` covers."""
        own = self.eval_split
        if eval_dataset is None:
            return [(name[len("eval"):], split) for name, split in named_splits(own)] or [("", None)]
        if isinstance(eval_dataset, str) and isinstance(own, dict) and eval_dataset in own:
            return [("", own[eval_dataset])]
        check_streams_precompute(eval_dataset, self.args)
        if isinstance(eval_dataset, Mapping):
            return [(f"_{name}", dataset) for name, dataset in eval_dataset.items()]
        return [("", eval_dataset)]

    def _evaluate(self, eval_dataset) -> dict:
        args = self.args
        split = self.eval_split
        if isinstance(eval_dataset, PreparedSplit):
            split = eval_dataset
        elif eval_dataset is not None:
            split = prepare_one(eval_dataset, self.tokenizer, args, name="eval")
        if split is None:
            raise ValueError("evaluate() needs an eval_dataset (argument, DPOTrainer(eval_dataset=...), or config)")
        reference = self._eval_reference(split)
        out = evaluate_pairs(self.objective, self.model, reference, split.features,
                             collate=lambda feats: self._to_device(self._collate(feats)),
                             batch_size=args.per_device_eval_batch_size, accelerator=self.accelerator,
                             predictions=self.compute_metrics is not None)
        if self.compute_metrics is None:
            return out
        from transformers import EvalPrediction

        metrics, values = out
        values = values.numpy()
        extra = self.compute_metrics(EvalPrediction(predictions=values, label_ids=np.zeros(len(values), np.int64)))
        for key, value in (extra or {}).items():
            metrics[key if key.startswith("eval_") else f"eval_{key}"] = value
        return metrics

    # --- the reference ------------------------------------------------------------------------------------
    @property
    def ref_model(self):
        """The separate reference model, as TRL's ``trainer.ref_model``: None when the reference is the policy
        with its adapters off, precomputed log-probs, or none (a reference-free loss); otherwise the frozen
        model (built on first use: loaded from its path, or a copy of the policy before training)."""
        if self._source() != "frozen_model":
            return None
        if getattr(self, "reference", None) is None:
            self.reference = self._build_reference()
        return getattr(self.reference, "model", None)

    def _router_aux_loss_coef(self) -> float:
        """The mixture-of-experts router loss's weight for this run (0.0 for a dense model): the config's
        ``router_aux_loss_coef``, else the model config's (`preftune.models.router_aux_loss_coef`)."""
        from preftune import models

        return models.router_aux_loss_coef(self.model, getattr(self.args, "router_aux_loss_coef", None))

    def _eval_reference(self, split):
        """The reference that evaluates ``split``. With precomputed log-probs: the run's own eval set reads its
        table; any other set gets a live reference of the initial weights (`_new_set_reference`)."""
        if self.reference is None:
            self.reference = self._build_reference()
        if self._source() != "cache":
            return self.reference
        table = next((self._eval_reference_tables.get(name) for name, own in named_splits(self.eval_split)
                      if own is split), None)  # one of the run's own eval sets, precomputed with the training set
        return table if table is not None else self._new_set_reference()

    def _new_set_reference(self):
        """A live reference for an eval set the precompute did not cover, from the initial weights: the given
        ref model, the policy with its adapters off, the policy itself before training, or after training
        the initial model reloaded from its path. A full model trained in this process with neither a ref
        model nor a path is refused: its initial weights are gone (the reference was precomputed so as not
        to keep them), and the trained policy as its own reference would read every reward as 0."""
        ref_model = self._ref_model_arg
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = self._load_reference(ref_model)
        elif ref_model is None and not self.is_peft and self._policy_moved:
            if not self.model_path:
                raise ValueError(
                    "evaluate(eval_dataset=...) after training: the reference log-probs were precomputed and the "
                    "initial weights were not kept (full fine-tuning of a model object with no path to reload it "
                    "from), so this new set's reference cannot be computed. Pass the set as DPOTrainer(eval_dataset="
                    "...), evaluate it before train(), pass ref_model=, or set precompute_ref_log_probs=False")
            ref_model = self._load_reference(self.model_path)
        return self._reference_for_precompute(ref_model)

    def _source(self) -> str:
        """Which reference source this run uses (`preftune.reference.choose_source`)."""
        from preftune.reference import choose_source, plain_data_parallel

        return choose_source(needs_reference=self.needs_reference, precompute=self.args.precompute_ref_log_probs,
                             is_peft=self.is_peft, ref_model=self._ref_model_arg,
                             sync_ref_model=bool(self.args.sync_ref_model),
                             plain_data_parallel=plain_data_parallel(self.accelerator))

    def _build_reference(self):
        """The reference source: None (reference-free), cache (precomputed), adapters off, or a frozen model."""
        from preftune.reference import EMAReferenceSync, sharded_parameters

        args = self.args
        kind = self._source()
        if kind == "none":
            return None
        sync = EMAReferenceSync(args.ref_model_mixup_alpha, args.ref_model_sync_steps) if args.sync_ref_model else None
        if sync is not None and sharded_parameters(self.accelerator):
            raise ValueError(
                "sync_ref_model=True (TR-DPO) is not supported with sharded parameters (FSDP or DeepSpeed ZeRO-3): "
                "the reference/policy mix needs whole parameters. Use DDP or ZeRO-2 (examples/accelerate/ddp.yaml, "
                "zero2.yaml), or drop sync_ref_model")
        if kind == "cache":
            # explicit True: the whole training set (reusable by later runs); automatic: the pairs this run uses
            subset = self._planned_samples() if args.precompute_ref_log_probs is None else None
            return self._precomputed_reference(self._ref_model_arg, train_indices=subset)
        return self._live_reference(sync)

    def _load_reference(self, src):
        """The reference model from a path or hub id, loaded like the policy (ref_model_init_kwargs first)."""
        from preftune import models

        args = self.args
        return models.load_model(models.resolve_model_path(src, cache_dir=args.cache_dir), dtype=args.dtype,
                                 bf16=args.bf16, fp16=args.fp16,
                                 model_init_kwargs=args.ref_model_init_kwargs or args.model_init_kwargs,
                                 trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)

    def _live_reference(self, sync=None):
        """A reference that runs a forward per batch: adapters off, the given model, or a frozen copy."""
        from preftune import models
        from preftune.reference import make_reference

        ref_model = self._ref_model_arg
        if ref_model is None and not self.is_peft:
            if not self.model_path:  # a model object built in code: copy it
                import copy

                ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            else:
                ref_model = self._load_reference(self.model_path)
        elif isinstance(ref_model, (str, os.PathLike)):
            ref_model = self._load_reference(ref_model)
        if ref_model is not None:
            models.disable_dropout(ref_model)
            ref_model = self._prepare_reference_model(ref_model)
        return make_reference(loss_needs_reference=True, policy=self.model, ref_model=ref_model, sync=sync)

    def _prepare_reference_model(self, ref_model):
        """Frozen and placed like the policy: sharded under FSDP / ZeRO-3, plain on the device otherwise."""
        from preftune.reference import prepare_reference_model

        mark_head(ref_model, self.args)
        return prepare_reference_model(ref_model, self.accelerator, micro_batch=self.args.per_device_train_batch_size,
                                       accumulation=self.args.gradient_accumulation_steps)

    def _reference_for_precompute(self, ref_model):
        """What computes the cached reference log-probs: the given ref model, or the policy as it is now."""
        from preftune.reference import AdapterDisabledReference, FrozenModelReference

        if ref_model is not None:
            return FrozenModelReference(self._prepare_reference_model(ref_model))
        if self.is_peft:
            return AdapterDisabledReference(self.model)
        return FrozenModelReference(self.model, freeze=False)

    def _precomputed_reference(self, ref_model, train_indices: list[int] | None = None):
        from preftune.reference import CachedReference, cached_precompute

        args = self.args
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = self._load_reference(ref_model)
        tables = {}
        splits = [("train", self.train_split)] + named_splits(self.eval_split)
        source = self._reference_for_precompute(ref_model)
        common = self._cache_key_parts(ref_model)  # weights and tokenizer hashed once for both splits
        for name, split in splits:
            features, key_parts = split.features, dict(common, data_fingerprint=split.features.fingerprint)
            if name == "train" and train_indices is not None:
                features = [split.features[i] for i in train_indices]
                key_parts["extra"] = {"pairs": hashlib.sha256(json.dumps(train_indices).encode()).hexdigest()}
                logger.info("reference log-probs: precomputing the %d of %d training pairs this run uses",
                            len(features), len(split))
            tables[name] = cached_precompute(
                source,
                features,
                cache_dir=Path(args.cache_dir or Path(args.output_dir) / "ref_cache"),
                key_parts=key_parts,
                batch_size=args.precompute_ref_batch_size or args.per_device_eval_batch_size,
                pad_token_id=self.tokenizer.pad_token_id,
                layout=self.layout,
                pad_to_multiple_of=self.pad_multiple,
                accelerator=self.accelerator,
                chunk_size=args.logps_chunk_size,
                **self.objective.reference_kwargs,
            )
        self._eval_reference_tables = {name: CachedReference(t) for name, t in tables.items() if name != "train"}
        del source, ref_model  # the reference model is freed: only the (N, 2) tables stay
        return CachedReference(tables["train"])

    def _cache_key_parts(self, ref_model) -> dict:
        """The reference cache key's parts that do not depend on the split (all but data_fingerprint)."""
        from preftune.reference import fingerprint_beside, model_fingerprint, tokenizer_fingerprint

        args = self.args
        model_for_key = ref_model if ref_model is not None else self.accelerator.unwrap_model(self.model)
        # one process, plain tensors: the weights are hashed beside the reference pass (cached_precompute
        # waits for it first only where a cached table could match); sharded weights hash in step
        plain = self.accelerator.num_processes == 1 and all(
            type(p) in (torch.Tensor, torch.nn.Parameter) for p in model_for_key.parameters())
        return dict(
            model_id=str(self.model_id),
            model_fingerprint=(fingerprint_beside if plain else model_fingerprint)(model_for_key),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length,
            truncation_mode=args.truncation_mode,
            chat_template=self.tokenizer.chat_template,
            ld_alpha=args.ld_alpha,
        )

