"""The training loop: DPO on accelerate.

One optimizer step = K micro-batches per process (gradient accumulation). The chosen and rejected
responses of a micro-batch go through the policy in one forward (`preftune.logps.model_logps`), the
reference log-probs come from `preftune.reference`, the loss from the registry in
`preftune.losses`. The loss of each micro-batch is the sum of its per-pair losses divided by the
number of pairs in the whole global batch (eq. 6.13: B_global = B_micro x N_procs x K_accum), so
that 1 x 4 and 4 x 1 give the same gradient.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch

from preftune import checkpoint as ckpt
from preftune import kernels
from preftune.config import DPOConfig
from preftune.data.batching import collate
from preftune.data.pipeline import StepPlan, prepare_one, prepare_splits, report_skips
from preftune.logps import _unwrap, attention_kernels, model_logps, use_triton_head
from preftune.losses import LOSSES, loss_params, preference_loss, resolve_loss_names
from preftune.memory import StepInBackward, init_adamw_state, tune_malloc
from preftune.metrics import MetricAccumulator, preference_metrics

logger = logging.getLogger("preftune")


def resolve_layout(layout: str, device: torch.device, *, padding_free: bool = False) -> str:
    """The batch layout to use: 'auto' picks the fastest exact one measured for the device.

    'prefix' on CPU and on a GPU alike (and it is padding-free): on an H200 with cuDNN attention and
    rounded row lengths its step took 0.17 s against padded's 0.20 s, in 0.78x the memory
    (docs/benchmarks.md). 'packed' measured 3x slower there (transformers' block-diagonal mask)."""
    return "prefix" if layout == "auto" else layout


def resolve_shapes(args, device: torch.device) -> tuple[int | None, bool]:
    """(pad_to_multiple_of, cudnn_attention) after their automatic values: on a GPU, rows rounded to
    64 tokens and cuDNN attention (a plan per shape, and few shapes); on CPU neither."""
    on_gpu = device.type == "cuda"
    multiple = args.pad_to_multiple_of if args.pad_to_multiple_of is not None else (64 if on_gpu else None)
    multiple = multiple if multiple and multiple > 1 else None
    cudnn = args.cudnn_attention if args.cudnn_attention is not None else (on_gpu and multiple is not None)
    return multiple, bool(cudnn)


def _attention_heads(config) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head dim) of a decoder config, or None where it does not say."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return None
    dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, dim


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


class DPOTrainer:
    """Train a causal LM on preference pairs with DPO or one of its variants.

    The signature follows TRL's DPOTrainer: ``DPOTrainer(model, ref_model=None, args=DPOConfig(...),
    train_dataset=..., eval_dataset=..., processing_class=tokenizer, peft_config=LoraConfig(...))``.
    `model` may be a model object, a local path or hub id, or None (the config's
    `model_name_or_path`, else the embedded default SmolLM2-135M-Instruct). Datasets may be
    `datasets.Dataset`/`DatasetDict` objects, lists of dicts, or file/directory paths.
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: DPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        tokenizer=None,
        callbacks=None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from preftune import models

        self.args = args = args if args is not None else DPOConfig()
        on_gpu = torch.cuda.is_available() and not args.use_cpu
        mixed = args.mixed_precision(bf16_supported=on_gpu and torch.cuda.is_bf16_supported())
        if mixed != "no" and not (on_gpu and (mixed == "fp16" or torch.cuda.is_bf16_supported())):
            logger.warning("%s=True but this %s has no fast %s kernels; training in float32 instead. Drop --%s to "
                           "silence this.", mixed, "GPU" if on_gpu else "CPU", mixed, mixed)  # fmt: skip
            mixed = "no"
        self.accelerator = Accelerator(cpu=not on_gpu, mixed_precision=mixed)
        if self.accelerator.device.type == "cpu":
            tune_malloc()
        elif args.triton_kernels:  # Triton's one-time set-up, beside loading the model and tokenizing
            kernels.warm_up_async(self.accelerator.device)
        set_seed(int(args.seed))
        self.layout = resolve_layout(args.batch_layout, self.accelerator.device, padding_free=args.padding_free)
        self.pad_multiple, self.cudnn_attention = resolve_shapes(args, self.accelerator.device)
        self.callbacks = list(callbacks or [])
        self.loss_names = resolve_loss_names(args.loss_type)
        self.loss_kwargs = loss_params(args)
        self.needs_reference = any(LOSSES[n].needs_reference for n in self.loss_names) and not args.reference_free

        # --- model and tokenizer -------------------------------------------------------------
        model_id = model if isinstance(model, (str, os.PathLike)) or model is None else None
        if model_id is None and model is None:
            model_id = args.model_name_or_path
        self.model_id = str(model_id) if model_id is not None else getattr(getattr(model, "config", None), "_name_or_path", None)
        if model is None or isinstance(model, (str, os.PathLike)):
            path = models.resolve_model_path(model_id, cache_dir=args.cache_dir)
            self.model_path = str(path)
            model = models.load_model(
                path,
                dtype=args.dtype,
                bf16=args.bf16,
                fp16=args.fp16,
                model_init_kwargs=args.model_init_kwargs,
                trust_remote_code=args.trust_remote_code,
                allow_pickle=args.allow_pickle,
            )
        else:
            self.model_path = getattr(model.config, "_name_or_path", None) or None
        tokenizer = processing_class if processing_class is not None else tokenizer
        if tokenizer is None:
            if not self.model_path:
                raise ValueError("processing_class (the tokenizer) is required when the model has no path to load it from")
            tokenizer = models.load_tokenizer(self.model_path, trust_remote_code=args.trust_remote_code)
        elif tokenizer.pad_token_id is None:
            tokenizer = models.ensure_pad_token(tokenizer)
        if args.chat_template:
            tokenizer.chat_template = args.chat_template
        self.tokenizer = self.processing_class = tokenizer
        if args.disable_dropout:
            models.disable_dropout(model)
        if peft_config is None and args.use_peft:
            peft_config = models.lora_config_from_args(
                args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules
            )
        if peft_config is not None:
            model = models.apply_peft(model, peft_config, gradient_checkpointing=args.gradient_checkpointing)
        if args.gradient_checkpointing:
            models.set_activation_checkpointing(model, True, args.gradient_checkpointing_kwargs or {"use_reentrant": False})
            if hasattr(model, "config"):
                model.config.use_cache = False
        if args.fused_layers:
            from preftune.fused import fuse_layers

            counts = fuse_layers(model, triton=args.triton_kernels, recompute_mlp=args.recompute_mlp)
            logger.info("lean backward in %s", counts)
            if args.recompute_mlp and not counts.get("mlp_recompute"):
                logger.warning("recompute_mlp=True, but none of the %d SwiGLU MLPs has three plain projections "
                               "(LoRA-adapted ones keep theirs): nothing is recomputed", counts["mlp"])
        use_triton_head(model, args.triton_kernels)
        if args.triton_kernels and self.accelerator.device.type == "cuda":
            self._warm_up_kernels(model)
        self.is_peft = peft_config is not None or hasattr(model, "peft_config")
        self.model = model

        # --- data ---------------------------------------------------------------------------
        with self.accelerator.main_process_first():
            self.train_split, self.eval_split = prepare_splits(args, tokenizer, train_dataset, eval_dataset)
        if self.accelerator.is_main_process:
            for split in (self.train_split, self.eval_split):
                if split is not None and (msg := report_skips(split, args.output_dir)):
                    logger.warning(msg)

        # --- reference ----------------------------------------------------------------------
        self._ref_model_arg = ref_model
        self.reference = None
        self._in_backward: StepInBackward | None = None  # optim_in_backward's hooks, during train()
        self._eval_reference_table = None

    def _warm_up_kernels(self, model) -> None:
        """Compile (or load from Triton's cache) the kernel variants this model's widths run, in the
        background while the data is tokenized (``kernels.warm_up_async``)."""
        base = _unwrap(model)
        config = getattr(base, "config", None)
        get_head = getattr(base, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None  # marked by use_triton_head just before
        param = next(base.parameters(), None)
        kernels.warm_up_async(
            self.accelerator.device,
            param.dtype if param is not None else torch.bfloat16,
            norm_width=getattr(config, "hidden_size", None),
            mlp_width=getattr(config, "intermediate_size", None),
            vocab=head.weight.shape[0] if hasattr(head, "weight") else None,
            heads=_attention_heads(config),
        )

    # ------------------------------------------------------------------------------------------
    def _build_reference(self):
        """The reference source: None (reference-free), cache (precomputed), adapters off, or a frozen model."""
        from preftune.reference import EMAReferenceSync, sharded_parameters

        args = self.args
        if not self.needs_reference:
            return None
        sync = EMAReferenceSync(args.ref_model_mixup_alpha, args.ref_model_sync_steps) if args.sync_ref_model else None
        if sync is not None and sharded_parameters(self.accelerator):
            raise ValueError(
                "sync_ref_model=True (TR-DPO) is not supported with sharded parameters (FSDP or DeepSpeed ZeRO-3): "
                "the reference/policy mix needs whole parameters. Use DDP or ZeRO-2 (examples/accelerate/ddp.yaml, "
                "zero2.yaml), or drop sync_ref_model"
            )
        if self._precompute():
            # explicit True: the whole training set (reusable by later runs); automatic: the pairs this run uses
            subset = self._planned_pairs() if args.precompute_ref_log_probs is None else None
            return self._precomputed_reference(self._ref_model_arg, train_indices=subset)
        return self._live_reference(sync)

    def _live_reference(self, sync=None):
        """A reference that runs a forward per batch: adapters off, the given model, or a frozen copy."""
        from preftune import models
        from preftune.reference import make_reference

        args, ref_model = self.args, self._ref_model_arg
        if ref_model is None and not self.is_peft:
            src = args.ref_model_name_or_path or self.model_path
            if not src:  # a model object built in code: copy it
                import copy

                ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            else:
                ref_model = models.load_model(
                    src, dtype=args.dtype, bf16=args.bf16, fp16=args.fp16,
                    model_init_kwargs=args.ref_model_init_kwargs or args.model_init_kwargs,
                    trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                )
        elif isinstance(ref_model, (str, os.PathLike)):
            ref_model = models.load_model(ref_model, dtype=args.dtype, bf16=args.bf16, fp16=args.fp16,
                                          trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
        if ref_model is not None:
            models.disable_dropout(ref_model)
            ref_model = self._prepare_reference_model(ref_model)
        return make_reference(loss_needs_reference=True, policy=self.model, ref_model=ref_model, sync=sync)

    def _prepare_reference_model(self, ref_model):
        """Frozen and placed like the policy: sharded under FSDP / ZeRO-3, plain on the device otherwise."""
        from preftune.reference import prepare_reference_model

        use_triton_head(ref_model, self.args.triton_kernels)
        return prepare_reference_model(ref_model, self.accelerator, micro_batch=self.args.per_device_train_batch_size,
                                       accumulation=self.args.gradient_accumulation_steps)

    def _precompute(self) -> bool:
        """Whether the reference log-probs are precomputed (see DPOConfig.precompute_ref_log_probs)."""
        from accelerate.utils import DistributedType

        setting = self.args.precompute_ref_log_probs
        if setting is not None:
            return bool(setting)
        simple = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                       DistributedType.MULTI_CPU)
        return simple and not self.is_peft and not self.args.sync_ref_model

    def _plan(self) -> tuple[StepPlan, int]:
        """The data plan of this run and its number of optimizer steps."""
        args, acc = self.args, self.accelerator
        plan = StepPlan(len(self.train_split), args.per_device_train_batch_size, acc.num_processes,
                        args.gradient_accumulation_steps, int(args.data_seed if args.data_seed is not None else args.seed))
        return plan, (plan.total_steps(args.num_train_epochs, args.max_steps) if plan.steps_per_epoch else 0)

    def _planned_pairs(self) -> list[int] | None:
        """Indices of the training pairs this run will use (all of them when it covers whole epochs)."""
        plan, total = self._plan()
        if plan.steps_per_epoch == 0 or total >= plan.steps_per_epoch:
            return None  # every pair (or an error later, at train())
        used = plan.permutation(0)[: total * plan.global_batch]
        return sorted(used)

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
            from preftune import models

            ref_model = models.load_model(ref_model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        tables = {}
        splits = [("train", self.train_split)] + ([("eval", self.eval_split)] if self.eval_split is not None else [])
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
            )
        self._eval_reference_table = CachedReference(tables["eval"]) if "eval" in tables else None
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
        )

    # ------------------------------------------------------------------------------------------
    def _collate(self, features):
        return collate(features, layout=self.layout, pad_token_id=self.tokenizer.pad_token_id,
                       pad_to_multiple_of=self.pad_multiple, device=self.accelerator.device)

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _pair_losses(self, batch: dict, reference, model=None):
        """Per-pair losses (B,) and metric tensors for one micro-batch."""
        model = model if model is not None else self.model
        ref_c = ref_r = None
        if reference is not None:  # first: a live reference's forward then runs beside no policy activations
            ref = reference.logps(batch)
            ref_c, ref_r = ref.chosen_logps, ref.rejected_logps
        pol = model_logps(model, batch, chunk_size=self.args.logps_chunk_size)
        out = preference_loss(
            self.loss_names if len(self.loss_names) > 1 else self.loss_names[0],
            policy_chosen_logps=pol.chosen_logps,
            policy_rejected_logps=pol.rejected_logps,
            ref_chosen_logps=ref_c,
            ref_rejected_logps=ref_r,
            chosen_lengths=pol.chosen_lengths,
            rejected_lengths=pol.rejected_lengths,
            chosen_nll=pol.chosen_nll,
            **self.loss_kwargs,
        )
        per_pair = out.pair_losses
        metrics = preference_metrics(
            out, pol.chosen_logps, pol.rejected_logps,
            chosen_nll=pol.chosen_nll if self.args.rpo_alpha else None,
        )
        return per_pair, metrics

    def _features(self, split, indices):
        feats = split.features
        return [feats[i] for i in indices]

    # ------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None):
        """Run the training loop; returns the last logged train metrics."""
        # the progress bar and trackers are closed however the run ends (a NonFiniteError too), so a
        # failed run flushes its trackers and leaves no bar to be printed at interpreter exit
        with self._attention_kernels(), contextlib.ExitStack() as self._closing:
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint):
        from tqdm.auto import tqdm
        from transformers import get_scheduler

        from preftune.tracking import make_trackers

        args, acc = self.args, self.accelerator
        out_dir = Path(args.output_dir)
        if acc.is_main_process:
            ckpt.check_writable(out_dir)  # creates it; a clear error when it cannot be written
            args.to_yaml(out_dir / "config.yaml")
        plan, total_steps = self._plan()
        if plan.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {plan.num_pairs} pairs, fewer than one global batch of {plan.global_batch} "
                f"(per_device_train_batch_size x processes x gradient_accumulation_steps); lower them or add data"
            )
        if self.reference is None:
            self.reference = self._build_reference()
        warmup = args.num_warmup_steps(total_steps)
        log_every, eval_every, save_every = (args.interval(n, total_steps) for n in ("logging_steps", "eval_steps", "save_steps"))
        self._save_every = save_every
        logger.info(
            "%d training pairs; %s; %d optimizer steps (%d per epoch); warm-up %d steps",
            plan.num_pairs, args.describe_batch(acc.num_processes), total_steps, plan.steps_per_epoch, warmup,
        )
        optimizer = self._make_optimizer()
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or None,
        )
        self.model, optimizer = acc.prepare(self.model, optimizer)
        self.optimizer, self.scheduler = optimizer, scheduler
        # once, not per step: unwrapping and listing the parameters each walk every module (with LoRA
        # on a 24-layer model, 2000 modules: ~16 ms of host time per step on the CPU)
        policy = acc.unwrap_model(self.model)
        self._clip_params = [p for p in self.model.parameters() if p.requires_grad]
        state = ckpt.TrainState()
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        if resume:
            path = ckpt.resolve_checkpoint(out_dir, resume)
            state = ckpt.load_checkpoint(path, self, acc)
            logger.info("resumed from %s at step %d", path, state.global_step)
        else:
            init_adamw_state(optimizer)
        self._in_backward = self._step_in_backward(optimizer)
        metrics_path = out_dir / "metrics.jsonl"
        if acc.is_main_process:
            ckpt.truncate_metrics(metrics_path, state.global_step, lines=state.metrics_lines if resume else 0)
        trackers = make_trackers(args.report_to, out_dir, args.to_dict(), args.run_name) if acc.is_main_process else None
        if trackers is not None:
            self._closing.callback(trackers.close)

        if state.global_step == 0 and self.eval_split is not None and args.eval_strategy != "no":
            self.initial_eval = self.evaluate()
            self._log(metrics_path, trackers, {"step": 0, "epoch": 0.0, **self.initial_eval})
        bar = self._closing.enter_context(tqdm(total=total_steps, initial=state.global_step,
                                               disable=not acc.is_main_process, desc="dpo", dynamic_ncols=True))
        window = MetricAccumulator()
        t_window, pairs_window, tokens_window, self._paused = time.perf_counter(), 0, 0, 0.0
        if acc.is_main_process:  # the window saved with the checkpoint holds every process's sums
            pairs_window, tokens_window = ckpt.restore_window(window, state.log_window, acc.device)
        last_logged: dict = {}
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        defer = self._defers_nonfinite_checks(inner)
        # deferred: the host reads the steps' finiteness at most this many steps late, and at every
        # boundary (log, eval, save, the end); once a run of bad steps has begun, every step
        settle_every = max(1, min(log_every or 1, args.max_nonfinite_steps))
        pending: list = []
        self.model.train()
        while state.global_step < total_steps:
            epoch = state.pairs_seen // (plan.steps_per_epoch * plan.global_batch)
            step_in_epoch = (state.pairs_seen // plan.global_batch) % plan.steps_per_epoch
            perm = plan.permutation(epoch)
            micro = plan.micro_batches(perm, step_in_epoch, acc.process_index)
            step_loss, step_pairs, step_tokens, pair_losses = self._optimizer_step(micro, plan, window)
            stepped = self._in_backward is not None  # each parameter was updated inside backward
            grad_norm = self._in_backward.grad_norm() if stepped else self._clip()
            updated = self._in_backward.updated() if stepped else None
            finite_t = torch.isfinite(torch.stack([step_loss.float(), grad_norm.float().to(step_loss.device)])).all()
            if defer:  # the fused AdamW skips a non-finite step on the device; the host learns of it later
                if not stepped:
                    inner.found_inf = (~finite_t).to(torch.float32)
                    optimizer.step()
                pending.append((state.global_step + 1, finite_t, step_loss, grad_norm, pair_losses, updated))
            else:
                finite = bool(finite_t)
                if finite and not stepped:
                    optimizer.step()
                self._count_step(state, window, finite, state.global_step + 1, step_loss, grad_norm, pair_losses,
                                 updated)
            with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            if not stepped:
                optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.pairs_seen += plan.global_batch
            if not defer and finite and self.reference is not None:
                self.reference.on_optimizer_step(state.global_step, policy)
            pairs_window += step_pairs
            tokens_window += step_tokens
            bar.update(1)
            log_due = state.global_step % max(1, log_every) == 0 or state.global_step == total_steps \
                or (args.logging_first_step and state.global_step == 1)
            eval_due = self.eval_split is not None and state.global_step != total_steps and (
                (args.eval_strategy == "steps" and bool(eval_every) and state.global_step % eval_every == 0)
                or (args.eval_strategy == "epoch" and state.pairs_seen % (plan.steps_per_epoch * plan.global_batch) == 0))
            save_due = self._should_save(state, plan)
            if pending and (len(pending) >= settle_every or state.nonfinite_in_a_row or log_due or eval_due or save_due):
                # one host sync for the steps since the last one, in their order
                for (step, _, loss_t, norm_t, losses, updated), ok in zip(
                        pending, torch.stack([p[1] for p in pending]).tolist()):
                    self._count_step(state, window, ok, step, loss_t, norm_t, losses, updated)
                pending.clear()
            if state.nonfinite_in_a_row >= args.max_nonfinite_steps:
                state.log_window = self._window_snapshot(window, pairs_window, tokens_window)
                self._save(state, final=False)
                raise NonFiniteError(
                    f"{state.nonfinite_in_a_row} consecutive optimizer steps had a non-finite loss or gradient "
                    f"(last at step {state.global_step}); stopped. The last good state is saved in {out_dir}. "
                    "Lower learning_rate or beta, check the data, or raise max_nonfinite_steps."
                )
            epoch_f = state.pairs_seen / (plan.steps_per_epoch * plan.global_batch)
            if log_due:
                elapsed = time.perf_counter() - t_window - self._paused
                row = {"step": state.global_step, "epoch": round(epoch_f, 4), **_reduced(window, acc),
                       "learning_rate": scheduler.get_last_lr()[0],
                       "pairs_per_second": pairs_window * acc.num_processes / max(elapsed, 1e-9),
                       "tokens_per_second": tokens_window * acc.num_processes / max(elapsed, 1e-9)}
                if state.nonfinite_steps:
                    row["nonfinite_steps"] = state.nonfinite_steps
                self._log(metrics_path, trackers, row)
                last_logged = row
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                                pairs_s=f"{row['pairs_per_second']:.2f}")
                window = MetricAccumulator()
                t_window, pairs_window, tokens_window, self._paused = time.perf_counter(), 0, 0, 0.0
            if eval_due:
                self._log(metrics_path, trackers, {"step": state.global_step, "epoch": round(epoch_f, 4), **self._timed_eval()})
            if save_due:
                t_save = time.perf_counter()
                state.log_window = self._window_snapshot(window, pairs_window, tokens_window)
                self._save(state)
                self._paused += time.perf_counter() - t_save
        bar.close()
        vars(inner).pop("found_inf", None)  # later steps of this optimizer are not skipped
        if self.eval_split is not None and args.eval_strategy != "no":
            self.final_eval = self.evaluate()
            self._log(metrics_path, trackers, {"step": state.global_step, "epoch": round(state.pairs_seen / (plan.steps_per_epoch * plan.global_batch), 4), **self.final_eval})
        if trackers is not None:
            trackers.close()
        self.state = state
        return last_logged

    DEFER_ON_CPU = False  # tests: the deferred check with the CPU's fused AdamW (no gain on a CPU)

    def _defers_nonfinite_checks(self, optimizer) -> bool:
        """Whether a non-finite step is skipped on the device without a host sync in the step: a GPU,
        one process or DDP, a fused torch AdamW (it takes ``found_inf`` and then leaves parameters,
        moments and step count alone), no loss scaler (fp16 sets ``found_inf`` itself), and no TR-DPO
        reference sync (that acts on the host after good steps only)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
            g.get("fused") for g in optimizer.param_groups)
        return (
            (acc.device.type == "cuda" or self.DEFER_ON_CPU)
            and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
            and fused
            and getattr(acc, "scaler", None) is None
            and getattr(self.reference, "sync", None) is None
        )

    def _count_step(self, state, window: MetricAccumulator, finite: bool, step: int, step_loss, grad_norm,
                    pair_losses, updated=None) -> None:  # fmt: skip
        """Book one optimizer step: its loss and grad norm into the window, or a skipped update counted
        and logged with the pairs to blame. ``updated``: with optim_in_backward, how many parameters
        backward had already stepped before a gradient turned non-finite (they keep their update)."""
        if finite:
            state.nonfinite_in_a_row = 0
            window.add({"loss": step_loss.detach(), "grad_norm": grad_norm.detach()}, 1)
            return
        state.nonfinite_in_a_row += 1
        state.nonfinite_steps += 1
        bad_pairs = [i for losses, index in pair_losses for i in index[~torch.isfinite(losses).cpu()].tolist()]
        if not bad_pairs:  # a finite loss with a non-finite gradient: every pair of the step is suspect
            bad_pairs = [i for _, index in pair_losses for i in index.tolist()]
        n = int(updated) if updated is not None else 0
        partial = f"; {n} of {len(self._clip_params)} parameters were updated inside backward before it" if n else ""
        logger.warning("non-finite %s at step %d: update skipped%s (pairs %s)",
                       "gradient" if torch.isfinite(step_loss).item() else "loss", step, partial, bad_pairs)

    def _timed_eval(self) -> dict:
        """evaluate(), with its time left out of the training throughput."""
        t = time.perf_counter()
        out = self.evaluate()
        self._paused += time.perf_counter() - t
        return out

    def _optimizer_step(self, micro: list[list[int]], plan: StepPlan, window: MetricAccumulator):
        """Forward and backward over this process's K micro-batches; returns (loss, pairs, tokens, per-pair
        losses). The per-pair losses, (losses, pair ids) per micro-batch, stay on the device: they are read
        only when the step turns out non-finite, so the step has no host sync of its own."""
        acc = self.accelerator
        scale = 1.0 / plan.global_batch * acc.num_processes  # DDP averages gradients over processes
        total = torch.zeros((), device=acc.device)
        n_pairs = n_tokens = 0
        pair_losses = []
        for k, indices in enumerate(micro):
            host = self._collate(self._features(self.train_split, indices))
            batch = self._to_device(host)
            sync = k == len(micro) - 1
            ctx = acc.no_sync(self.model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                per_pair, metrics = self._pair_losses(batch, self.reference)
                loss = per_pair.sum() * scale
                if self._in_backward is not None:
                    self._in_backward.begin(loss)
                acc.backward(loss)
                if self._in_backward is not None:
                    self._in_backward.finish()
            pair_losses.append((per_pair.detach(), host["pair_index"]))  # ids still on the host
            total += loss.detach()
            b = len(indices)
            window.add(metrics, b)
            n_pairs += b
            n_tokens += int(batch["num_tokens"])
        total = acc.reduce(total, reduction="sum") / acc.num_processes if acc.num_processes > 1 else total
        return total, n_pairs, n_tokens, pair_losses

    def _step_in_backward(self, optimizer) -> StepInBackward | None:
        """``optim_in_backward``: hooks that update each parameter as backward completes its gradient
        (taken off when the run ends). The config has refused clipping, accumulation and fp16; what only
        the run knows is checked here."""
        if not self.args.optim_in_backward:
            return None
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.num_processes > 1 or acc.distributed_type != DistributedType.NO:
            raise ValueError(
                f"optim_in_backward=True on {acc.num_processes} processes ({acc.distributed_type.value}): gradients "
                "are reduced across processes after backward, so each process would update with its own gradients; "
                "set optim_in_backward=False for distributed runs")
        inner = getattr(optimizer, "optimizer", optimizer)
        if not all(g.get("fused") for g in inner.param_groups):
            raise ValueError(
                f"optim_in_backward=True on device {acc.device.type!r}: torch has no fused AdamW there, and the "
                "in-backward update needs one; set optim_in_backward=False")
        hooks = StepInBackward(optimizer, self._clip_params)

        def remove():
            hooks.remove()
            self._in_backward = None

        self._closing.callback(remove)
        return hooks

    def _clip(self) -> torch.Tensor:
        params = self._clip_params  # listed once per run in _train
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        if self.accelerator.num_processes > 1 or self.accelerator.distributed_type != "NO":
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
            return torch.as_tensor(norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def _make_optimizer(self):
        args = self.args
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        # One fused kernel per step (CPU and CUDA): the per-parameter loop measured 590 ms of a 4.2 s
        # step for the 135M model on this 2-core CPU. Plain "adamw_torch" keeps the multi-tensor path.
        if args.optim == "adamw_torch_fused" and self.accelerator.device.type in ("cpu", "cuda"):
            kw["fused"] = True
        else:
            kw["foreach"] = True
        return torch.optim.AdamW([g for g in groups if g["params"]], **kw)

    def _should_save(self, state, plan) -> bool:
        args = self.args
        if args.save_strategy == "steps":
            return bool(self._save_every) and state.global_step % self._save_every == 0
        if args.save_strategy == "epoch":
            return state.pairs_seen % (plan.steps_per_epoch * plan.global_batch) == 0
        return False

    def _window_snapshot(self, window: MetricAccumulator, pairs: int, tokens: int) -> dict:
        """The not-yet-logged window summed over processes (a collective), for the checkpoint."""
        snap = MetricAccumulator()
        snap._sums, snap._counts = dict(window._sums), dict(window._counts)
        if self.accelerator.num_processes > 1:
            snap.reduce(lambda t: self.accelerator.reduce(t, reduction="sum"))
        return ckpt.window_state(snap, pairs, tokens)

    def _full_state_dict(self) -> dict | None:
        """The gathered state dict under FSDP / DeepSpeed (a collective: every rank calls it), else None."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return self.accelerator.get_state_dict(self.model)
        return None

    def _save(self, state, final: bool = False):
        self.accelerator.wait_for_everyone()
        full = self._full_state_dict()
        optimizer_state = ckpt.gather_optimizer_state(self, self.accelerator)  # a collective under FSDP
        rng_states = ckpt.gather_rng_states(self.accelerator)  # a collective with several processes
        if self.accelerator.is_main_process:
            ckpt.save_checkpoint(Path(self.args.output_dir), self, state, self.accelerator, state_dict=full,
                                 optimizer_state=optimizer_state, rng_states=rng_states)
        self.accelerator.wait_for_everyone()

    def _log(self, path: Path, trackers, row: dict):
        if not self.accelerator.is_main_process:
            return
        clean = {k: (float(v) if isinstance(v, (float, int)) and not isinstance(v, bool) else v) for k, v in row.items()}
        clean["step"] = int(row["step"])
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if trackers is not None:
            trackers.log({k: v for k, v in clean.items() if k not in ("step",) and isinstance(v, (int, float))}, clean["step"])
        for cb in self.callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(clean)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict:
        """Implicit-reward metrics on the eval pairs, prefixed `eval_`."""
        with self._attention_kernels():
            return self._evaluate(eval_dataset)

    def _attention_kernels(self):
        """``logps.attention_kernels`` for this run: its device, cuDNN choice, the model's heads and the
        dtype attention computes in."""
        base = _unwrap(self.model)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        if dtype is None:
            dtype = next(base.parameters()).dtype
        return attention_kernels(self.accelerator.device, self.cudnn_attention,
                                 _attention_heads(getattr(base, "config", None)), dtype)

    def _evaluate(self, eval_dataset) -> dict:
        args, acc = self.args, self.accelerator
        split = self.eval_split
        if eval_dataset is not None:
            split = prepare_one(eval_dataset, self.tokenizer, args, name="eval")
        if split is None:
            raise ValueError("evaluate() needs an eval_dataset (argument, DPOTrainer(eval_dataset=...), or config)")
        if self.reference is None:
            self.reference = self._build_reference()
        reference = self.reference
        if self._eval_reference_table is not None and split is self.eval_split:
            reference = self._eval_reference_table
        elif self._precompute() and args.precompute_ref_log_probs is None and reference is not None:
            reference = self._live_reference()  # automatic precompute covered the run's own eval set only
        elif self._precompute() and reference is not None:
            raise ValueError(
                "evaluate(eval_dataset=...) with precompute_ref_log_probs=True: the reference log-probs are cached per "
                "dataset; pass the eval set to DPOTrainer(eval_dataset=...) instead"
            )
        was_training = self.model.training
        self.model.eval()
        accum = MetricAccumulator()
        n = len(split)
        bs = args.per_device_eval_batch_size
        indices = list(range(acc.process_index, n, acc.num_processes))
        # every rank runs the same number of forwards (DDP buffer syncs, FSDP/ZeRO-3 gathers are
        # collectives): a rank whose shard is shorter runs a filler batch that counts for 0 pairs
        rounds = math.ceil(math.ceil(n / acc.num_processes) / bs)
        for j in range(rounds):
            chunk = indices[j * bs : (j + 1) * bs]
            batch = self._to_device(self._collate(self._features(split, chunk or [0])))
            with acc.autocast():
                per_pair, metrics = self._pair_losses(batch, reference)
            row = {"loss": per_pair.mean(), **metrics}
            if not chunk:
                row = {k: torch.zeros_like(v) for k, v in row.items()}
            accum.add(row, len(chunk))
        if was_training:
            self.model.train()
        return {f"eval_{k}": v for k, v in _reduced(accum, acc).items()}

    def save_model(self, output_dir: str | os.PathLike | None = None):
        """Save the model (or adapter) and tokenizer in Hugging Face format, atomically."""
        out = Path(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        full = self._full_state_dict()
        if self.accelerator.is_main_process:
            ckpt.save_pretrained_atomic(self.accelerator.unwrap_model(self.model), self.tokenizer, out, state_dict=full)
        self.accelerator.wait_for_everyone()
        return out


def _reduced(accum: MetricAccumulator, acc) -> dict:
    """Means over every process's micro-batches (one collective), as floats."""
    if acc.num_processes > 1:
        accum.reduce(lambda t: acc.reduce(t, reduction="sum"))
    return accum.compute()


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


def _demo_generation_eval(trainer: DPOTrainer):
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
    from preftune.evaluate_cli import generation_eval

    rows = demo_dataset("eval", n=n)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return generation_eval(policy, reference, trainer.tokenizer, rows, verify_fn=verify, max_new_tokens=40)


def train(config: DPOConfig | None = None, **overrides) -> DPOTrainer:
    """Train from a config (the CLI's entry point): train, save the final model, report."""
    config = config if config is not None else DPOConfig(**overrides)
    trainer = DPOTrainer(args=config)
    trainer.train()
    out = trainer.save_model()
    if trainer.accelerator.is_main_process:
        before, after = getattr(trainer, "initial_eval", None), getattr(trainer, "final_eval", None)
        text = summary_table(before, after, len(trainer.eval_split)) if after else (
            "no evaluation ran (set eval_strategy and an eval_dataset for a before/after table)")
        eval_table, samples = _demo_generation_eval(trainer)
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
    return trainer
