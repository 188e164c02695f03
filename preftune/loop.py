"""The training loop every preftune algorithm runs on, on accelerate.

One optimizer step = K micro-batches per process (gradient accumulation). The loss of each
micro-batch is the sum of its per-sample losses divided by the number of samples in the whole global
batch (B_global = B_micro x N_procs x K_accum), so that 1 x 4 and 4 x 1 give the same gradient. The
loop owns devices and processes, the optimizer and schedule, clipping, the non-finite guard,
optimizer-in-backward, the cadence of logging, evaluation and saving, checkpoints and exact resume,
and the progress bar. An algorithm (``preftune.trainer.DPOTrainer``) subclasses `TrainLoop`
and supplies its data, its per-sample losses and metrics, and its evaluation:

- ``_num_train_samples()``: how many samples one epoch holds;
- ``_sample_losses(indices)``: (per-sample losses (B,), metric tensors, tokens, sample ids) of one
  micro-batch, with the graph for backward;
- ``_host_collate()``: a function from a micro-batch's sample indices to its host batch (CPU tensors,
  no model), and ``_batch_losses(host_batch)``: what ``_sample_losses`` returns, from such a batch. With
  ``dataloader_num_workers > 0`` the loop collates the coming micro-batches ahead in worker processes
  with the first (`preftune.data.loader`) and trains on them with the second; with 0 it calls
  ``_sample_losses`` (by default the two in turn);
- ``_before_train()``, ``_after_good_step(step, policy)``, ``_host_acts_after_good_steps()``,
  ``_train_in_order()``;
- ``_eval_metrics(eval_dataset, metric_key_prefix)`` and ``_progress_fields(row)``.

The loop keeps the HF Trainer's contract around it (`preftune.callbacks`): ``trainer.state`` is a
`transformers.TrainerState` (its log history holds every logged row), ``callbacks`` are
`transformers.TrainerCallback` objects called through transformers' `CallbackHandler` at the HF Trainer's
points, and the `TrainerControl` flags they set are obeyed. ``report_to``'s trackers are transformers'
integration callbacks among them (`preftune.tracking`). preftune's own `TrainState`
(``trainer.train_state``) stays what exact resume reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune import checkpoint as ckpt
from preftune import hub, kernels, zero
from preftune.callbacks import (
    history_row,
    legacy_log_history,
    make_callback_handler,
    note_callback_states,
    update_best_metric,
)
from preftune.data.loader import MicroBatchLoader
from preftune.data.pipeline import StepPlan
from preftune.logps import _unwrap, attention_kernels
from preftune.memory import StepInBackward, init_adamw_state, tune_malloc
from preftune.metrics import MetricAccumulator
from preftune.policy import attention_heads, load_policy
from preftune.tracking import integration_callbacks

logger = logging.getLogger("preftune")


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


def resolve_layout(layout: str) -> str:
    """The batch layout to use: 'auto' picks 'prefix', the fastest exact layout measured on CPU and GPU
    alike, and padding-free (docs/benchmarks.md)."""
    return "prefix" if layout == "auto" else layout


def resolve_shapes(args, device: torch.device) -> tuple[int | None, bool]:
    """(pad_to_multiple_of, cudnn_attention) after their automatic values: on a GPU, rows rounded to
    64 tokens and cuDNN attention (a plan per shape, and few shapes); on CPU neither."""
    on_gpu = device.type == "cuda"
    multiple = args.pad_to_multiple_of if args.pad_to_multiple_of is not None else (64 if on_gpu else None)
    multiple = multiple if multiple and multiple > 1 else None
    cudnn = args.cudnn_attention if args.cudnn_attention is not None else (on_gpu and multiple is not None)
    return multiple, bool(cudnn)


def make_accelerator(args):
    """accelerate's Accelerator for this run: the GPU unless `use_cpu`, and mixed precision only where the
    device has fast kernels for it (a warning says when bf16/fp16 falls back to float32)."""
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available() and not args.use_cpu
    mixed = args.mixed_precision(bf16_supported=on_gpu and torch.cuda.is_bf16_supported())
    if mixed != "no" and not (on_gpu and (mixed == "fp16" or torch.cuda.is_bf16_supported())):
        logger.warning("%s=True but this %s has no fast %s kernels; training in float32 instead. Drop --%s to "
                       "silence this.", mixed, "GPU" if on_gpu else "CPU", mixed, mixed)  # fmt: skip
        mixed = "no"
    set_tf32(args.tf32, on_gpu)
    acc = Accelerator(cpu=not on_gpu, mixed_precision=mixed, kwargs_handlers=accelerator_handlers(args))
    zero.warn_if_ignored(acc)
    return acc


def set_tf32(tf32: bool | None, on_gpu: bool) -> None:
    """``tf32``: TensorFloat-32 for CUDA matmuls and cuDNN convolutions (a process-wide torch setting, as
    transformers' TrainingArguments sets it); None leaves torch's setting alone."""
    if tf32 is None:
        return
    if not on_gpu:
        if tf32:
            logger.warning("tf32=True changes nothing on CPU (TensorFloat-32 is a CUDA GPU format)")
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def accelerator_handlers(args) -> list:
    """accelerate's handlers for the ddp_* fields: DDP's own arguments (those set, else torch's defaults) and
    the process group's timeout (ddp_timeout seconds)."""
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    ddp = {"find_unused_parameters": args.ddp_find_unused_parameters, "bucket_cap_mb": args.ddp_bucket_cap_mb,
           "broadcast_buffers": args.ddp_broadcast_buffers, "static_graph": args.ddp_static_graph}
    ddp = {k: v for k, v in ddp.items() if v is not None}
    handlers: list = [InitProcessGroupKwargs(timeout=timedelta(seconds=int(args.ddp_timeout)))]
    return handlers + ([DistributedDataParallelKwargs(**ddp)] if ddp else [])


def device_defers_checks(device: torch.device) -> bool:
    """Whether deferring the non-finite check pays off on this device: on a GPU it saves a host sync per
    step; on a CPU there is nothing to overlap (tests monkeypatch this to run the deferred path on CPU)."""
    return device.type == "cuda"


def reduced(accum: MetricAccumulator, acc) -> dict:
    """Means over every process's micro-batches (one collective), as floats."""
    if acc.num_processes > 1:
        accum.reduce(lambda t: acc.reduce(t, reduction="sum"))
    return accum.compute()


@dataclass
class _Window:
    """What the next log row covers: metric sums, samples and tokens, and the time since the last row
    (less the time spent evaluating and saving)."""

    metrics: MetricAccumulator = field(default_factory=MetricAccumulator)
    samples: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0


@dataclass
class _Run:
    """One call of train(): its plan, optimizer, schedule, cadences and where it logs."""

    plan: StepPlan
    total_steps: int
    optimizer: object
    scheduler: object
    state: ckpt.TrainState
    metrics_path: Path
    log_every: int
    eval_every: int
    save_every: int
    defer: bool
    settle_every: int
    policy: torch.nn.Module
    loader: MicroBatchLoader | None = None  # dataloader_num_workers > 0: micro-batches collated ahead
    pending: list = field(default_factory=list)
    last_logged: dict = field(default_factory=dict)
    epoch_open: bool = False  # on_epoch_begin called, on_epoch_end not yet
    start_time: float = field(default_factory=time.perf_counter)
    start_step: int = 0
    loss_sum: float = 0.0  # over the finite steps this call logged: train_loss = loss_sum / loss_steps
    loss_steps: float = 0.0

    @property
    def epoch_samples(self) -> int:
        return self.plan.steps_per_epoch * self.plan.global_batch

    @property
    def inner(self):
        """The torch optimizer (accelerate's wrapper holds it)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)


class TrainLoop:
    """The algorithm-independent half of a trainer: model set-up, the loop, checkpoints, logging."""

    sample_name = "samples"  # what one unit of the global batch is called in logs and messages
    algorithm = "training"  # the algorithm's name in model cards and tags
    progress_desc = "train"
    _deepspeed = False  # set in _start: accelerate runs DeepSpeed, whose engine clips and steps

    def __init__(self, model, args, *, processing_class=None, peft_config=None, callbacks=None,
                 optimizers=(None, None)):
        from accelerate.utils import set_seed
        from transformers import TrainerControl, TrainerState

        self.args = args
        # push_to_hub: the token is found (or its absence reported) before anything loads or trains
        self._hub_token = hub.resolve_token(args.hub_token) if args.push_to_hub else None
        self.hub_model_id: str | None = None  # the hub repository's full id, once created (init_hf_repo)
        self.accelerator = make_accelerator(args)
        self.optimizer, self.lr_scheduler = self._check_optimizers(optimizers)
        self.scheduler = self.lr_scheduler
        self.state = TrainerState(is_local_process_zero=self.accelerator.is_local_main_process,
                                  is_world_process_zero=self.accelerator.is_main_process)
        self.control = TrainerControl()
        self.train_state = ckpt.TrainState()  # preftune's own: what exact resume needs
        # report_to's integration callbacks first, then the user's, as the HF Trainer orders them; a tracker
        # whose package is missing is refused here, before the model is loaded
        self.callback_handler = make_callback_handler([*integration_callbacks(args), *(callbacks or [])], None, None)
        self._run: _Run | None = None
        if self.accelerator.device.type == "cpu":
            tune_malloc()  # a process-wide malloc setting, made where a CPU training run starts
        elif args.triton_kernels:  # Triton's one-time set-up, beside loading the model and tokenizing
            kernels.warm_up_async(self.accelerator.device)
        set_seed(int(args.seed))
        self.layout = resolve_layout(args.batch_layout)
        self.pad_multiple, self.cudnn_attention = resolve_shapes(args, self.accelerator.device)
        self._model_given = model is not None and not isinstance(model, (str, os.PathLike))
        with zero.model_loading(self.accelerator):  # ZeRO-3: whole, or partitioned as zero3_init_flag says
            policy = load_policy(model, args, processing_class=processing_class, peft_config=peft_config,
                                 device=self.accelerator.device)
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.processing_class = self.tokenizer
        self.callback_handler.model, self.callback_handler.processing_class = self.model, self.tokenizer
        self.model_id, self.model_path, self.is_peft = policy.model_id, policy.model_path, policy.is_peft
        if args.merge_lora and not self.is_peft:
            raise ValueError("merge_lora=True but the run trains no LoRA adapters (set use_peft or pass peft_config=): "
                             "the saved model is already a full model")
        self._in_backward: StepInBackward | None = None  # optim_in_backward's hooks, during train()
        self.eval_at_end = False  # evaluate after the last step even with eval_strategy='no'
        self._warned_eval = False
        self._window: _Window | None = None

    # --- what an algorithm supplies ---------------------------------------------------------------
    def _num_train_samples(self) -> int:
        raise NotImplementedError

    def _sample_losses(self, indices: list[int]):
        """(losses (B,), metrics {name: 0-dim tensor}, tokens, sample ids (B,) on the host) of one micro-batch."""
        return self._batch_losses(self._host_collate()(indices))

    def _host_collate(self):
        """A function: sample indices of one training micro-batch -> its host batch (a dict of CPU tensors and
        plain values). It runs in data loader worker processes, so it must not touch the model or a GPU."""
        raise NotImplementedError(
            f"{type(self).__name__} collates no batches outside the training loop; set dataloader_num_workers=0")

    def _batch_losses(self, host_batch: dict):
        """What `_sample_losses` returns, from a batch made by `_host_collate`'s function."""
        raise NotImplementedError

    def _eval_metrics(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """The evaluation's metrics, prefixed `metric_key_prefix` (logging and callbacks are the loop's)."""
        raise NotImplementedError

    def _has_eval(self) -> bool:
        return False

    def _train_in_order(self) -> bool:
        """True when the training samples are taken in their own order, never shuffled (a streamed dataset)."""
        return False

    def _before_train(self) -> None:
        """Called once train() knows its plan, before the optimizer exists."""

    def _after_good_step(self, step: int, policy: torch.nn.Module) -> None:
        """Called after each optimizer step whose update was applied (host-side work such as a reference sync)."""

    def _host_acts_after_good_steps(self) -> bool:
        """True when `_after_good_step` does real work: the step's finiteness is then read every step."""
        return False

    def _progress_fields(self, row: dict) -> dict:
        return {"loss": f"{row.get('loss', float('nan')):.4f}"}

    def _loss_scale(self, plan: StepPlan) -> float:
        """What a micro-batch's summed per-sample losses are multiplied by before backward: 1 / (global batch) x
        processes (DDP averages gradients over processes), so a step's gradient is that of the global batch's mean
        loss. An algorithm whose losses come already normalized (GRPO's token-level aggregations) returns 1."""
        return 1.0 / plan.global_batch * self.accelerator.num_processes

    def _log_fields(self) -> dict:
        """Values added to every logged training row (GRPO: the tokens seen so far)."""
        return {}

    def _algorithm_state(self) -> dict | None:
        """This process's algorithm state a checkpoint must hold for exact resume (picklable, tensors on the CPU),
        or None. GRPO: the generation batch being trained on."""
        return None

    def _load_algorithm_state(self, state: dict) -> None:
        """Restore what `_algorithm_state` returned (this process's own)."""

    # --- plan ---------------------------------------------------------------------------------------
    def _plan(self) -> tuple[StepPlan, int]:
        """The data plan of this run and its number of optimizer steps."""
        args, acc = self.args, self.accelerator
        plan = StepPlan(self._num_train_samples(), args.per_device_train_batch_size, acc.num_processes,
                        args.gradient_accumulation_steps, int(args.data_seed if args.data_seed is not None else args.seed),
                        shuffle=not self._train_in_order())
        return plan, (plan.total_steps(args.num_train_epochs, args.max_steps) if plan.steps_per_epoch else 0)

    def _planned_samples(self) -> list[int] | None:
        """Indices of the training samples this run will use (None: all of them, whole epochs)."""
        plan, total = self._plan()
        if plan.steps_per_epoch == 0 or total >= plan.steps_per_epoch:
            return None  # every sample (or an error later, at train())
        return sorted(plan.permutation(0)[: total * plan.global_batch])

    # --- train ----------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the training loop; returns a `transformers.trainer_utils.TrainOutput` (global_step, training_loss:
        the mean loss of this call's steps, metrics: train_runtime, train_samples_per_second,
        train_steps_per_second, total_flos, train_loss, epoch), as the HF Trainer does. ``ignore_keys_for_eval``
        is accepted for its signature (preftune's evaluation gathers no model outputs to ignore)."""
        if kwargs:
            raise TypeError(f"train() got unexpected arguments {sorted(kwargs)}; it takes resume_from_checkpoint")
        if trial is not None:
            raise ValueError("train(trial=...): preftune has no hyperparameter search; run one training per setting")
        # the progress bar is closed however the run ends (a NonFiniteError too), so a failed run leaves no
        # bar to be printed at interpreter exit (the trackers' callbacks flush at each on_log)
        try:
            with self._attention_kernels(), contextlib.ExitStack() as self._closing:
                self._run = run = self._start(resume_from_checkpoint)
                self._begin_state(run)
                self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
                self._initial_eval(run)
                bar = self._progress_bar(run)
                window = self._open_window(run)
                self.model.train()
                while run.state.global_step < run.total_steps and not self.control.should_training_stop:
                    window = self._train_step(run, window)
                    bar.update(1)
                    if run.last_logged.get("step") == run.state.global_step:
                        bar.set_postfix(**self._progress_fields(run.last_logged))
                bar.close()
                return self._finish(run)
        finally:
            self._run = None

    def _start(self, resume_from_checkpoint) -> _Run:
        from transformers import get_scheduler

        args, acc = self.args, self.accelerator
        out_dir = Path(args.output_dir)
        if acc.is_main_process:
            ckpt.check_writable(out_dir)  # creates it; a clear error when it cannot be written
            args.to_yaml(out_dir / "config.yaml")
        plan, total_steps = self._plan()
        if plan.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {plan.num_samples} {self.sample_name}, fewer than one global batch of "
                f"{plan.global_batch} (per_device_train_batch_size x processes x gradient_accumulation_steps); "
                "lower them or add data")
        self._warn_unused_eval()
        self._deepspeed = zero.is_deepspeed(acc)  # DeepSpeed's engine clips and steps (preftune/zero.py)
        if self._deepspeed:
            zero.configure(acc, args)
        self._before_train()
        warmup = args.num_warmup_steps(total_steps)
        log_every, eval_every, save_every = (args.interval(n, total_steps) for n in ("logging_steps", "eval_steps", "save_steps"))
        logger.info("%d training %s; %s; %d optimizer steps (%d per epoch); warm-up %d steps", plan.num_samples,
                    self.sample_name, args.describe_batch(acc.num_processes), total_steps, plan.steps_per_epoch, warmup)
        given_optimizer, given_scheduler = self._given_optimizers
        if given_optimizer is not None:
            self._check_given_optimizer(given_optimizer)
        optimizer = given_optimizer if given_optimizer is not None else self._make_optimizer()
        scheduler = given_scheduler if given_scheduler is not None else get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or None)
        self.model, optimizer = acc.prepare(self.model, optimizer)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.lr_scheduler = scheduler
        handler = self.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = self.model, optimizer, scheduler
        # once, not per step: unwrapping and listing the parameters each walk every module
        self._clip_params = [p for p in self.model.parameters() if p.requires_grad]
        state = self._resume_or_init(resume_from_checkpoint, optimizer, out_dir)
        self._in_backward = self._step_in_backward(optimizer)
        metrics_path = out_dir / "metrics.jsonl"
        if acc.is_main_process:
            ckpt.truncate_metrics(metrics_path, state.global_step, lines=state.metrics_lines if state.global_step else 0)
        inner = getattr(optimizer, "optimizer", optimizer)
        return _Run(plan=plan, total_steps=total_steps, optimizer=optimizer, scheduler=scheduler, state=state,
                    loader=self._micro_batch_loader(plan),
                    metrics_path=metrics_path, log_every=log_every, eval_every=eval_every,
                    save_every=save_every, defer=self._defers_nonfinite_checks(inner),
                    # deferred: the host reads the steps' finiteness at most this many steps late, and at every
                    # boundary (log, eval, save, the end); once a run of bad steps has begun, every step
                    settle_every=max(1, min(log_every or 1, args.max_nonfinite_steps)),
                    policy=acc.unwrap_model(self.model))

    def _resume_or_init(self, resume_from_checkpoint, optimizer, out_dir: Path) -> ckpt.TrainState:
        from transformers import TrainerState

        resume = resume_from_checkpoint if resume_from_checkpoint is not None else self.args.resume_from_checkpoint
        acc = self.accelerator
        self.state = TrainerState(is_local_process_zero=acc.is_local_main_process,
                                  is_world_process_zero=acc.is_main_process)
        if not resume:
            init_adamw_state(optimizer)
            return ckpt.TrainState()
        path = ckpt.resolve_checkpoint(out_dir, resume)
        state = ckpt.load_checkpoint(path, self, self.accelerator)
        _, saved = ckpt.read_states(path)
        if saved is not None:
            self.state = TrainerState(**saved)
            if self.args.restore_callback_states_from_checkpoint:
                from transformers import Trainer

                Trainer._load_callback_state(self)  # transformers' own: ExportableState callbacks and control
        else:  # a checkpoint from before preftune kept the HF state: its log history is in metrics.jsonl
            self.state.global_step = state.global_step
            self.state.log_history = legacy_log_history(out_dir / "metrics.jsonl", state.metrics_lines)
        self.state.is_local_process_zero, self.state.is_world_process_zero = (acc.is_local_main_process,
                                                                              acc.is_main_process)
        logger.info("resumed from %s at step %d", path, state.global_step)
        return state

    def _begin_state(self, run: _Run) -> None:
        """The HF TrainerState's view of this run, as the HF Trainer fills it at the start of train()."""
        args, st = self.args, self.state
        st.global_step, st.epoch = run.state.global_step, self._epoch(run)
        st.max_steps, st.num_train_epochs = run.total_steps, math.ceil(run.total_steps / run.plan.steps_per_epoch)
        st.logging_steps, st.save_steps = run.log_every, run.save_every
        st.eval_steps = run.eval_every
        st.train_batch_size = args.per_device_train_batch_size
        run.start_step = run.state.global_step
        self.train_state = run.state

    def _micro_batch_loader(self, plan: StepPlan) -> MicroBatchLoader | None:
        """``dataloader_num_workers > 0``: this process's micro-batches collated ahead in that many worker
        processes (shut down however the run ends); 0: None, the loop collates each micro-batch itself."""
        args = self.args
        if args.dataloader_num_workers <= 0:
            return None
        loader = MicroBatchLoader(
            plan, self.accelerator.process_index, self._host_collate(), num_workers=args.dataloader_num_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            pin_memory=bool(args.dataloader_pin_memory) and self.accelerator.device.type == "cuda",
            persistent_workers=bool(args.dataloader_persistent_workers), seed=plan.seed)
        self._closing.callback(loader.close)
        return loader

    def _initial_eval(self, run: _Run) -> None:
        """``eval_on_start``: one evaluation before the first step (not again on resume)."""
        if run.state.global_step == 0 and self._has_eval() and self.args.eval_on_start:
            self.initial_eval = self.evaluate()

    def _eval_enabled(self) -> bool:
        """Whether the run evaluates during and at the end of training: an eval set and an eval_strategy,
        or ``eval_at_end`` (the command line's `--eval_dataset` without `--eval_strategy`)."""
        return self._has_eval() and (self.args.eval_strategy != "no" or self.eval_at_end)

    def _warn_unused_eval(self) -> None:
        if self._has_eval() and not self._eval_enabled() and not self.args.eval_on_start and not self._warned_eval:
            self._warned_eval = True
            logger.warning("an eval dataset was given but eval_strategy='no' and eval_on_start=False: it is not "
                           "used during training; set eval_strategy='steps' or 'epoch' (or call evaluate())")

    def _progress_bar(self, run: _Run):
        from tqdm.auto import tqdm

        return self._closing.enter_context(tqdm(total=run.total_steps, initial=run.state.global_step,
                                                disable=not self.accelerator.is_main_process
                                                or bool(self.args.disable_tqdm),
                                                desc=self.progress_desc, dynamic_ncols=True))

    def _open_window(self, run: _Run | None = None) -> _Window:
        window = _Window()
        if run is not None and self.accelerator.is_main_process:  # the saved window holds every process's sums
            window.samples, window.tokens = ckpt.restore_window(window.metrics, run.state.log_window,
                                                                self.accelerator.device)
        self._window = window
        return window

    def _train_step(self, run: _Run, window: _Window) -> _Window:
        """One optimizer step and the logging, evaluation and saving due after it; returns the window to go on with."""
        state, plan, acc, handler = run.state, run.plan, self.accelerator, self.callback_handler
        if not run.epoch_open:
            run.epoch_open = True
            self.control = handler.on_epoch_begin(self.args, self.state, self.control)
        self.control = handler.on_step_begin(self.args, self.state, self.control)
        epoch = state.samples_seen // run.epoch_samples
        step_in_epoch = (state.samples_seen // plan.global_batch) % plan.steps_per_epoch
        micro = plan.micro_batches(plan.permutation(epoch), step_in_epoch, acc.process_index)
        if run.loader is None:
            out = self._optimizer_step(micro, plan, window.metrics)
        else:  # the same micro-batches, collated ahead by the loader's workers
            host = run.loader.batches(epoch, step_in_epoch, run.total_steps - state.global_step)
            out = self._optimizer_step(micro, plan, window.metrics, host=host)
        step_loss, step_samples, step_tokens, sample_losses = out
        finite = self._apply_update(run, step_loss, sample_losses)
        state.global_step += 1
        state.samples_seen += plan.global_batch
        if finite:
            self._after_good_step(state.global_step, run.policy)
        window.samples += step_samples
        window.tokens += step_tokens
        self.state.global_step, self.state.epoch = state.global_step, self._epoch(run)
        self.control = handler.on_step_end(self.args, self.state, self.control)
        log_due, eval_due, save_due = self._due(run)
        control = self.control
        epoch_end = state.samples_seen % run.epoch_samples == 0 or state.global_step >= run.total_steps
        # a callback's flags add to the run's cadence; a stop logs the steps not yet logged
        log_due = log_due or control.should_log or control.should_training_stop
        eval_due = eval_due or self._callback_wants_eval()
        save_due = save_due or control.should_save
        if run.pending and (len(run.pending) >= run.settle_every or state.nonfinite_in_a_row or log_due or eval_due
                            or save_due):
            self._settle(run, window)
        if state.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            self._stop_nonfinite(run, window)
        window = self._log_eval_save(run, window, log_due, eval_due, save_due)
        if self.control.should_training_stop and run.last_logged.get("step") != state.global_step:
            window = self._log_eval_save(run, window, True, False, False)  # stopped by on_evaluate / on_save
        if self.control.should_epoch_stop and not epoch_end and not self.control.should_training_stop:
            raise ValueError(
                f"a callback set control.should_epoch_stop at step {state.global_step}, in the middle of an epoch: "
                "preftune's step plan fixes every step's pairs in advance (for exact resume), so it cannot cut an "
                "epoch short; set control.should_training_stop to end the run, or max_steps")
        if epoch_end or self.control.should_training_stop:
            run.epoch_open = False
            self.control = handler.on_epoch_end(self.args, self.state, self.control)
            c = self.control
            if c.should_log or c.should_evaluate or c.should_save:
                if run.pending:
                    self._settle(run, window)
                window = self._log_eval_save(run, window, c.should_log, self._callback_wants_eval(), c.should_save)
        return window

    def _callback_wants_eval(self) -> bool:
        if self.control.should_evaluate and not self._has_eval():
            raise ValueError("a callback set control.should_evaluate but this trainer has no eval_dataset; pass "
                             "eval_dataset=... to the trainer, or do not set the flag")
        return self.control.should_evaluate

    def _log_eval_save(self, run: _Run, window: _Window, log_due: bool, eval_due: bool, save_due: bool) -> _Window:
        """The logging, evaluation and saving due after a step (in the HF Trainer's order)."""
        state = run.state
        if log_due and run.last_logged.get("step") != state.global_step:
            self._log_window(run, window)
            window = self._open_window()
        if eval_due:
            update_best_metric(self.args, self.state, self._timed_eval())
        if save_due:
            t_save = time.perf_counter()
            state.log_window = self._window_snapshot(window)
            note_callback_states(self.state, self.callback_handler, self.control)
            self._save(state)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            window.paused += time.perf_counter() - t_save
        return window

    def _apply_update(self, run: _Run, step_loss, sample_losses) -> bool:
        """Clip, step (or skip a non-finite step), advance the schedule. Returns whether the host knows the step
        was good now (False when deferred: the fused AdamW skipped it on the device if it was not)."""
        state = run.state
        stepped = self._in_backward is not None  # each parameter was updated inside backward
        if self._deepspeed:  # DeepSpeed clips, updates (ZeRO-1/2 skip a non-finite step) and zeroes gradients
            self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
            grad_norm, updated, stepped = zero.step(self.model, state.global_step + 1), None, True
        else:
            grad_norm = self._in_backward.grad_norm() if stepped else self._clip()
            updated = self._in_backward.updated() if stepped else None
            self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        finite_t = torch.isfinite(torch.stack([step_loss.float(), grad_norm.float().to(step_loss.device)])).all()
        step = state.global_step + 1
        if run.defer:  # the fused AdamW skips a non-finite step on the device; the host learns of it later
            if not stepped:
                run.inner.found_inf = (~finite_t).to(torch.float32)
                run.optimizer.step()
            run.pending.append((step, finite_t, step_loss, grad_norm, sample_losses, updated))
            finite = False
        else:
            finite = bool(finite_t)
            if finite and not stepped:
                run.optimizer.step()
            self._count_step(state, finite, step, step_loss, grad_norm, sample_losses, updated)
            self._window_add_step(finite, step_loss, grad_norm)
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)
        with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            run.scheduler.step()
        if not stepped:
            run.optimizer.zero_grad(set_to_none=True)
        return finite

    def _window_add_step(self, finite: bool, step_loss, grad_norm) -> None:
        if finite:
            self._window.metrics.add({"loss": step_loss.detach(), "grad_norm": grad_norm.detach()}, 1)

    def _due(self, run: _Run) -> tuple[bool, bool, bool]:
        """(log, eval, save) due after the step just taken."""
        args, state = self.args, run.state
        last = state.global_step == run.total_steps
        epoch_end = state.samples_seen % run.epoch_samples == 0
        periodic = {"steps": state.global_step % max(1, run.log_every) == 0, "epoch": epoch_end, "no": False}
        log_due = periodic[args.logging_strategy] or last or (args.logging_first_step and state.global_step == 1)
        # eval_delay: steps (eval_strategy='steps') or epochs ('epoch') before the first periodic evaluation
        eval_due = self._has_eval() and not last and (
            (args.eval_strategy == "steps" and bool(run.eval_every) and state.global_step % run.eval_every == 0
             and state.global_step >= args.eval_delay)
            or (args.eval_strategy == "epoch" and epoch_end and state.samples_seen / run.epoch_samples >= args.eval_delay))
        if args.save_strategy == "steps":
            save_due = bool(run.save_every) and state.global_step % run.save_every == 0
        else:
            save_due = args.save_strategy == "epoch" and epoch_end
        return log_due, eval_due, save_due

    def _settle(self, run: _Run, window: _Window) -> None:
        """One host sync for the deferred steps since the last one, booked in their order."""
        oks = torch.stack([p[1] for p in run.pending]).tolist()
        for (step, _, loss_t, norm_t, losses, updated), ok in zip(run.pending, oks):
            self._count_step(run.state, ok, step, loss_t, norm_t, losses, updated)
            self._window_add_step(ok, loss_t, norm_t)
        run.pending.clear()

    def _stop_nonfinite(self, run: _Run, window: _Window) -> None:
        state = run.state
        state.log_window = self._window_snapshot(window)
        self._save(state, final=False)
        raise NonFiniteError(
            f"{state.nonfinite_in_a_row} consecutive optimizer steps had a non-finite loss or gradient "
            f"(last at step {state.global_step}); stopped. The last good state is saved in {self.args.output_dir}. "
            "Lower learning_rate or beta, check the data, or raise max_nonfinite_steps.")

    def _epoch(self, run: _Run) -> float:
        return round(run.state.samples_seen / run.epoch_samples, 4)

    def _log_window(self, run: _Run, window: _Window) -> None:
        acc = self.accelerator
        elapsed = max(time.perf_counter() - window.start - window.paused, 1e-9)
        row = {"step": run.state.global_step, "epoch": self._epoch(run), **reduced(window.metrics, acc),
               "learning_rate": run.scheduler.get_last_lr()[0],
               f"{self.sample_name}_per_second": window.samples * acc.num_processes / elapsed,
               "tokens_per_second": window.tokens * acc.num_processes / elapsed, **self._log_fields()}
        if run.state.nonfinite_steps:
            row["nonfinite_steps"] = run.state.nonfinite_steps
        if "loss" in row and "loss" in window.metrics._counts:  # for train()'s training_loss
            steps = float(window.metrics._counts["loss"]) / acc.num_processes
            run.loss_sum += row["loss"] * steps
            run.loss_steps += steps
        self._log(run, row)
        run.last_logged = row

    def _finish(self, run: _Run):
        from transformers.trainer_utils import TrainOutput

        vars(run.inner).pop("found_inf", None)  # later steps of this optimizer are not skipped
        if self._eval_enabled():
            self.final_eval = self.evaluate()
            if update_best_metric(self.args, self.state, self.final_eval):
                ckpt._note_best_checkpoint(self.state, Path(self.args.output_dir), run.state.global_step)
        self.train_state = run.state
        runtime = time.perf_counter() - run.start_time
        steps = run.state.global_step - run.start_step
        train_loss = run.loss_sum / run.loss_steps if run.loss_steps else float("nan")
        metrics = {"train_runtime": round(runtime, 4),
                   "train_samples_per_second": round(steps * run.plan.global_batch / runtime, 3),
                   "train_steps_per_second": round(steps / runtime, 3),
                   "total_flos": float(self.state.total_flos), "train_loss": train_loss}
        self.log(metrics, write=False)  # the run's summary: log history and callbacks, not metrics.jsonl
        metrics["epoch"] = self.state.epoch
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info("loading the best model from %s (%s=%s)", self.state.best_model_checkpoint,
                        self.args.metric_for_best_model, self.state.best_metric)
            self.accelerator.wait_for_everyone()
            ckpt.load_model_weights(Path(self.state.best_model_checkpoint), self, self.accelerator)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # --- one optimizer step --------------------------------------------------------------------------
    def _optimizer_step(self, micro: list[list[int]], plan: StepPlan, metrics: MetricAccumulator,
                        host: list[dict] | None = None):
        """Forward and backward over this process's K micro-batches; returns (loss, samples, tokens, per-sample
        losses). ``host``: the micro-batches already collated (by the data loader's workers), else each is
        collated here. The per-sample losses, (losses, sample ids) per micro-batch, stay on the device: they are
        read only when the step turns out non-finite, so the step has no host sync of its own."""
        acc = self.accelerator
        scale = self._loss_scale(plan)
        total = torch.zeros((), device=acc.device)
        n_samples = n_tokens = 0
        sample_losses = []
        for k, indices in enumerate(micro):
            self._micro_index = k  # which micro-batch of the step this is (GRPO finds its generation batch by it)
            sync = k == len(micro) - 1
            no_sync = not sync and acc.num_processes > 1 and not self._deepspeed
            ctx = acc.no_sync(self.model) if no_sync else contextlib.nullcontext()
            with ctx, acc.autocast():
                if host is None:
                    losses, batch_metrics, tokens, ids = self._sample_losses(indices)
                else:
                    losses, batch_metrics, tokens, ids = self._batch_losses(host[k])
                loss = losses.sum() * scale
                if self._in_backward is not None:
                    self._in_backward.begin(loss)
                if self._deepspeed:  # its boundary is the step's last micro-batch; no division by it
                    zero.backward(self.model, loss, boundary=sync)
                else:
                    acc.backward(loss)
                if self._in_backward is not None:
                    self._in_backward.finish()
            sample_losses.append((losses.detach(), ids))
            total += loss.detach()
            metrics.add(batch_metrics, len(indices))
            n_samples += len(indices)
            n_tokens += int(tokens)
        total = acc.reduce(total, reduction="sum") / acc.num_processes if acc.num_processes > 1 else total
        return total, n_samples, n_tokens, sample_losses

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
        params = self._clip_params  # listed once per run in _start
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
        # one fused kernel per step on CPU and CUDA (docs/benchmarks.md); plain "adamw_torch" keeps foreach
        if args.optim == "adamw_torch_fused" and self.accelerator.device.type in ("cpu", "cuda"):
            kw["fused"] = True
        else:
            kw["foreach"] = True
        return torch.optim.AdamW([g for g in groups if g["params"]], **kw)

    def _defers_nonfinite_checks(self, optimizer) -> bool:
        """Whether a non-finite step is skipped on the device without a host sync in the step: a device where
        that pays (`device_defers_checks`), one process or DDP, a fused torch AdamW (it takes ``found_inf`` and
        then leaves parameters, moments and step count alone), no loss scaler (fp16 sets ``found_inf`` itself),
        and no host work after good steps (a TR-DPO reference sync)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
            g.get("fused") for g in optimizer.param_groups)
        return (
            device_defers_checks(acc.device)
            and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
            and fused
            and getattr(acc, "scaler", None) is None
            and not self._host_acts_after_good_steps()
        )

    def _count_step(self, state, finite: bool, step: int, step_loss, grad_norm, sample_losses, updated=None) -> None:
        """Book one optimizer step's finiteness; a skipped update is counted and logged with the samples to blame.
        ``updated``: with optim_in_backward, how many parameters backward had already stepped before a gradient
        turned non-finite (they keep their update)."""
        if finite:
            state.nonfinite_in_a_row = 0
            return
        state.nonfinite_in_a_row += 1
        state.nonfinite_steps += 1
        bad = [i for losses, index in sample_losses for i in index[~torch.isfinite(losses).cpu()].tolist()]
        if not bad:  # a finite loss with a non-finite gradient: every sample of the step is suspect
            bad = [i for _, index in sample_losses for i in index.tolist()]
        n = int(updated) if updated is not None else 0
        partial = f"; {n} of {len(self._clip_params)} parameters were updated inside backward before it" if n else ""
        logger.warning("non-finite %s at step %d: update skipped%s (%s %s)",
                       "gradient" if torch.isfinite(step_loss).item() else "loss", step, partial, self.sample_name, bad)

    # --- the HF Trainer's public surface ---------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Evaluate (the algorithm's metrics, ``metric_key_prefix``-prefixed), log the metrics (log history,
        callbacks' on_log, metrics.jsonl during training) and call the callbacks' on_evaluate, as the HF
        Trainer does. ``ignore_keys`` is accepted for the HF signature (preftune's evaluation builds no model
        outputs to ignore)."""
        metrics = self._eval_metrics(eval_dataset, metric_key_prefix)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def log(self, logs: dict, start_time=None, *, write: bool = True) -> None:
        """Log `logs` as the HF Trainer does: with ``epoch``, into ``state.log_history`` (plus ``step``) and to
        the callbacks' on_log (``report_to``'s trackers among them); during training also into metrics.jsonl
        (``write``)."""
        row = {"step": self.state.global_step, **({"epoch": self.state.epoch} if self.state.epoch is not None else {}),
               **logs}
        self._log(self._run if write else None, row)

    def add_callback(self, callback) -> None:
        """Add a `transformers.TrainerCallback` (an instance, or a class to instantiate)."""
        from preftune.callbacks import _check_callback

        _check_callback(callback)
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback (an instance, or the first of a class) and return it; None when absent."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        """Remove a callback (an instance, or the first of a class)."""
        self.callback_handler.remove_callback(callback)

    def is_world_process_zero(self) -> bool:
        return self.accelerator.is_main_process

    def is_local_process_zero(self) -> bool:
        return self.accelerator.is_local_main_process

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print `metrics` formatted, on the main process (transformers' `Trainer.log_metrics`)."""
        from transformers.trainer_pt_utils import log_metrics

        log_metrics(self, split, metrics)

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Write ``<split>_results.json`` (and update ``all_results.json``) in output_dir (transformers'
        `Trainer.save_metrics`)."""
        from transformers.trainer_pt_utils import save_metrics

        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        save_metrics(self, split, metrics, combined)

    def save_state(self) -> None:
        """Write ``trainer.state`` to ``output_dir/trainer_state.json`` (transformers' `Trainer.save_state`)."""
        from transformers.trainer_pt_utils import save_state

        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        save_state(self)

    def _check_optimizers(self, optimizers):
        """``optimizers=(optimizer, scheduler)`` as the HF Trainer takes them: an optimizer given is used instead of
        preftune's AdamW (its scheduler is then made from the config unless given too)."""
        from accelerate.utils import DistributedType

        if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
            raise TypeError(f"optimizers must be a pair (optimizer, lr_scheduler), either may be None; got {optimizers!r}")
        optimizer, scheduler = optimizers
        if scheduler is not None and optimizer is None:
            raise ValueError("optimizers=(None, scheduler): a scheduler steps the optimizer it was built on, and "
                             "preftune builds its own optimizer; pass the optimizer too, or only an optimizer")
        if optimizer is not None and self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("optimizers=(optimizer, ...) is not allowed with FSDP: the optimizer must be built on "
                             "the sharded parameters; drop it (preftune builds AdamW from the config)")
        if optimizer is not None and self.args.optim_in_backward:
            raise ValueError("optimizers=(optimizer, ...) with optim_in_backward=True: the in-backward update is "
                             "preftune's own fused AdamW; set optim_in_backward=False")
        self._given_optimizers = (optimizer, scheduler)
        return optimizer, scheduler

    def _check_given_optimizer(self, optimizer) -> None:
        """The optimizer passed in must hold this model's parameters (loading may have wrapped the model, as
        LoRA does: an optimizer built before that would update nothing the model uses)."""
        own = {id(p) for p in self.model.parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if not held or any(id(p) not in own for p in held):
            raise ValueError(
                "optimizers=(optimizer, ...): the optimizer holds parameters that are not this trainer's model's "
                f"({sum(id(p) not in own for p in held)} of {len(held)}). Build it on the model object you pass, "
                "after any peft wrapping (with peft_config=..., preftune wraps the model itself: apply get_peft_model "
                "first and pass the wrapped model instead)")
        if not any(p.requires_grad for p in held):
            raise ValueError("optimizers=(optimizer, ...): none of the optimizer's parameters is trainable")

    def _timed_eval(self) -> dict:
        """evaluate(), with its time left out of the training throughput."""
        t = time.perf_counter()
        out = self.evaluate()
        if self._window is not None:
            self._window.paused += time.perf_counter() - t
        return out

    # --- saving and logging ----------------------------------------------------------------------------
    def _window_snapshot(self, window: _Window) -> dict:
        """The not-yet-logged window summed over processes (a collective), for the checkpoint."""
        snap = MetricAccumulator()
        snap._sums, snap._counts = dict(window.metrics._sums), dict(window.metrics._counts)
        if self.accelerator.num_processes > 1:
            snap.reduce(lambda t: self.accelerator.reduce(t, reduction="sum"))
        return ckpt.window_state(snap, window.samples, window.tokens)

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
        engine_state = (zero.save_engine_state(self.model, Path(self.args.output_dir), state.global_step)
                        if getattr(self, "_deepspeed", False) else None)  # every process writes its partition
        algorithm_state = self._algorithm_state()
        if algorithm_state is not None and self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            algorithm_state = gather_object([algorithm_state])  # a collective: every process's, in rank order
        elif algorithm_state is not None:
            algorithm_state = [algorithm_state]
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            folder = ckpt.save_checkpoint(Path(self.args.output_dir), self, state, self.accelerator, state_dict=full,
                                          optimizer_state=optimizer_state, rng_states=rng_states,
                                          engine_state=engine_state, algorithm_state=algorithm_state)
            if self.args.push_to_hub and self.args.hub_strategy == "every_save":
                self._push_from_checkpoint(folder, state.global_step)
        self.accelerator.wait_for_everyone()

    def _push_from_checkpoint(self, folder: Path, step: int) -> None:
        """hub_strategy='every_save': the model of a checkpoint just saved (its ``model/`` folder, weights and
        tokenizer) uploaded to the hub repository's root, as the HF Trainer does. A failure is logged and training
        goes on: the final save pushes again."""
        message = (f"Training in progress, epoch {int(self.state.epoch or 0)}" if self.args.save_strategy == "epoch"
                   else f"Training in progress, step {step}")
        try:
            self.init_hf_repo()
            hub.upload(self._hub_token, self.hub_model_id, Path(folder) / "model", commit_message=message,
                       revision=self.args.hub_revision)
        except hub.HubUploadError as e:
            logger.error("%s; training goes on", e)

    def _log(self, run: _Run | None, row: dict):
        """One logged row ({"step", "epoch", ...}): metrics.jsonl (main process, during a run), the HF log history
        and the callbacks' on_log, trackers included (every process, as the HF Trainer)."""
        clean = {k: (float(v) if isinstance(v, (float, int)) and not isinstance(v, bool) else v) for k, v in row.items()}
        clean["step"] = int(row["step"])
        if run is not None and self.accelerator.is_main_process:
            with open(run.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean) + "\n")
        self.state.log_history.append(history_row(clean))
        logs = {k: v for k, v in clean.items() if k != "step"}
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def _attention_kernels(self):
        """``logps.attention_kernels`` for this run: its device, cuDNN choice, the model's heads and the
        dtype attention computes in."""
        base = _unwrap(self.model)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        if dtype is None:
            dtype = next(base.parameters()).dtype
        return attention_kernels(self.accelerator.device, self.cudnn_attention,
                                 attention_heads(getattr(base, "config", None)), dtype,
                                 grouped_kv=self.args.sdpa_grouped_kv)

    def save_model(self, output_dir: str | os.PathLike | None = None, _internal_call: bool = False):
        """Save the model (or adapter) and tokenizer in Hugging Face format, atomically, with its model card.
        With push_to_hub, the saved folder is then uploaded to the hub (as the HF Trainer's save_model does); a
        failed upload raises `preftune.hub.HubUploadError` after the save, which stays on disk."""
        out = Path(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        full = self._full_state_dict()
        if self.accelerator.is_main_process:
            ckpt.save_pretrained_atomic(self.accelerator.unwrap_model(self.model), self.tokenizer, out, state_dict=full,
                                        tags=ckpt.model_tags(self))
            self._write_model_card(out)
            if self.args.merge_lora:
                self._save_merged(out, sharded=full is not None)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self._push_folder(out, commit_message="Model save", token=self._hub_token, revision=self.args.hub_revision)
        return out

    def init_hf_repo(self, token: str | None = None, private: bool | None = None, *, _folder: Path | None = None) -> None:
        """Create the hub repository (hub_model_id, else the output_dir's name under the token's user) if it does
        not exist, on the main process; sets ``self.hub_model_id`` to its full id."""
        if not self.accelerator.is_main_process or self.hub_model_id is not None:
            return
        token = hub.resolve_token(token or self.args.hub_token or self._hub_token)
        private = private if private is not None else self.args.hub_private_repo
        name = hub.repo_name(self.args.hub_model_id, self.args.output_dir)
        self.hub_model_id = hub.create_repo(token, name, private, folder=_folder)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the model to output_dir and upload that folder to the hub repository (hub_model_id), as the HF
        Trainer's push_to_hub: checkpoints (checkpoint-*), the reference log-prob cache and names starting with
        "_" stay behind. Works with push_to_hub=False too. token: else hub_token, else huggingface_hub's stored
        token or HF_TOKEN; revision: else hub_revision; private: else hub_private_repo (only when the repository is
        created). Returns huggingface_hub's CommitInfo (a Future when blocking=False) on the main process, None on
        the others. Keyword arguments of the HF Trainer's model card (language, license, tags, ...) are refused:
        preftune writes its own card."""
        if kwargs:
            raise TypeError(f"push_to_hub() got {sorted(kwargs)}: preftune writes its own model card (README.md) from "
                            "the run; edit it in output_dir and push again to change it")
        if self.accelerator.is_main_process:
            token = hub.resolve_token(token or self.args.hub_token or self._hub_token)
        self.save_model(_internal_call=True)
        revision = revision if revision is not None else self.args.hub_revision
        return self._push_folder(Path(self.args.output_dir), commit_message=commit_message or "End of training",
                                 token=token, revision=revision, private=private, blocking=blocking)

    def _push_folder(self, folder: Path, *, commit_message: str, token, revision, private=None, blocking=True):
        """Upload a saved folder on the main process (HubUploadError on failure: the folder stays saved)."""
        if not self.accelerator.is_main_process:
            return None
        token = hub.resolve_token(token or self.args.hub_token or self._hub_token)
        self.init_hf_repo(token=token, private=private, _folder=folder)
        logger.info("pushing %s to the hub repository %s", folder, self.hub_model_id)
        return hub.upload(token, self.hub_model_id, folder, commit_message=commit_message, revision=revision,
                          ignore_patterns=hub.IGNORE_PATTERNS, blocking=blocking)

    def _save_merged(self, out: Path, *, sharded: bool) -> None:
        """``merge_lora``: the adapters folded into the base weights, saved in <out>/merged (loads without peft).
        In memory from a copy (the trained model keeps its adapters); a sharded run merges the saved adapter
        folder onto its base model instead (``preftune merge``)."""
        if sharded:
            from preftune.merge import merge_run

            merge_run(out, out / "merged", overwrite=True)
            return
        import copy

        with warnings.catch_warnings():  # peft reads transformers' deprecated alias: not the user's to fix
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            merged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
        ckpt.save_pretrained_atomic(merged, self.tokenizer, out / "merged")
        self._write_model_card(out / "merged")

    def _write_model_card(self, out: Path) -> None:
        """README.md beside the saved weights: base model, data, algorithm and loss, final metrics, version."""
        from preftune.model_card import run_card_inputs, write_model_card

        base = self.model_id or ("a model object passed to the trainer" if self._model_given else None)
        write_model_card(out, **run_card_inputs(self.args.to_dict(), metrics_path=Path(self.args.output_dir) / "metrics.jsonl",
                                                base_model=base, algorithm=self.algorithm,
                                                defaults=type(self.args)().to_dict()))


__all__ = ["TrainLoop", "NonFiniteError", "make_accelerator", "resolve_layout", "resolve_shapes",
           "device_defers_checks", "reduced"]
