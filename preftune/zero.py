"""DeepSpeed ZeRO under preftune's loop: what the loop does differently when accelerate runs DeepSpeed.

DeepSpeed's engine owns the optimizer step: ``engine.step()`` clips the gradient norm to the config's
``gradient_clipping``, updates, and zeroes the gradients, and ZeRO-1/2 skip an update whose gradient
norm is not finite. So under DeepSpeed the loop
- fills the DeepSpeed config's batch, accumulation and clipping entries from preftune's own settings
  (``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_grad_norm``) and refuses a
  config that sets them otherwise (:func:`configure`);
- runs each micro-batch's backward through the engine with the accumulation boundary set to the last
  micro-batch of the step, and without DeepSpeed's own division by the accumulation steps: preftune's
  loss is already divided by the global batch (:func:`backward`);
- takes the step through ``engine.step()`` instead of its own clipping and ``optimizer.step()``, and
  logs DeepSpeed's gradient norm (before clipping, as torch's ``clip_grad_norm_`` returns it)
  (:func:`step`). A step DeepSpeed skipped for a non-finite gradient is counted by the loop's guard as
  any skipped step; where DeepSpeed applies such an update (ZeRO-3 outside fp16) the run stops at once;
- checkpoints the optimizer state in DeepSpeed's own per-process format (``engine.save_checkpoint``)
  inside preftune's checkpoint folder, beside the whole model as Hugging Face files
  (:func:`save_engine_state`, :func:`load_engine_state`).

preftune's learning-rate schedule stays preftune's: it sets the learning rate of the torch AdamW that
DeepSpeed's ZeRO optimizer wraps and steps.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch

ENGINE_DIR = "deepspeed"  # in a checkpoint folder: DeepSpeed's own files (optimizer partitions per process)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def warn_if_ignored(accelerator) -> None:
    """accelerate takes its DeepSpeed path only off-CPU: say so when a DeepSpeed launch trains without it."""
    import logging
    import os

    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched and not is_deepspeed(accelerator) and getattr(accelerator, "is_main_process", True):
        logging.getLogger("preftune").warning(
            "accelerate was launched with DeepSpeed, but accelerate runs DeepSpeed only on GPUs: these %d CPU "
            "process(es) train with %s instead (docs/distributed.md)", accelerator.num_processes,
            accelerator.distributed_type.value)


def zero_stage(accelerator) -> int:
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


@contextlib.contextmanager
def model_loading(accelerator):
    """Where the policy is loaded. Under ZeRO-3 transformers builds every model inside
    ``deepspeed.zero.Init`` (partitioned as it loads) as soon as accelerate has registered the DeepSpeed
    config, whatever ``zero3_init_flag`` says; with ``zero3_init_flag`` false this loads the model whole on
    every process instead, to be partitioned by ``accelerator.prepare`` (so the precomputed reference pass
    can run on it first)."""
    plugin = accelerator.state.deepspeed_plugin if is_deepspeed(accelerator) else None
    if plugin is None or zero_stage(accelerator) != 3 or plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _number(value):
    return float(value) if isinstance(value, (int, float, str)) and str(value) != "auto" else value


def configure(accelerator, args) -> None:
    """Fill the DeepSpeed config from preftune's settings before ``accelerator.prepare`` (in place: the
    config is accelerate's). A number in the config that disagrees with preftune's setting is refused."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(
                f"the DeepSpeed config has a {section!r} section; preftune makes its own AdamW and schedule from "
                "learning_rate, weight_decay, adam_*, lr_scheduler_type and warmup_*: remove that section")
    clip = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else 0.0
    want = {"train_micro_batch_size_per_gpu": ("per_device_train_batch_size", int(args.per_device_train_batch_size)),
            "gradient_accumulation_steps": ("gradient_accumulation_steps", int(args.gradient_accumulation_steps)),
            "gradient_clipping": ("max_grad_norm", clip)}
    # what the config said before preftune filled it in (the plugin is shared by every trainer of a process)
    given = vars(accelerator.state.deepspeed_plugin).setdefault("_preftune_given", {k: cfg.get(k, "auto") for k in want})
    for key, (field, value) in want.items():
        have = given[key]
        if have != "auto" and _number(have) != float(value):
            raise ValueError(
                f"the DeepSpeed config sets {key}={have} but {field}={value}: set {key} to {value} (or 'auto') in the "
                "DeepSpeed config or accelerate config file (gradient_accumulation_steps / gradient_clipping in "
                f"examples/accelerate/zero*.yaml), or set {field} to match")
        cfg[key] = value
    cfg["train_batch_size"] = (int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps)
                               * accelerator.num_processes)
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and accelerator.state.deepspeed_plugin.is_zero3_init_enabled() and getattr(
            args, "precompute_ref_log_probs", None):
        raise ValueError(
            "precompute_ref_log_probs=True under ZeRO-3 with zero3_init_flag=true: the policy is loaded already "
            "partitioned, and the reference pass runs before DeepSpeed can gather its parameters; set "
            "zero3_init_flag: false in the accelerate config (the model then loads whole on every process), or set "
            "precompute_ref_log_probs=False")
    if int(zero.get("stage", 0)) == 3:
        key = "stage3_gather_16bit_weights_on_model_save"
        if zero.get(key) is False:
            raise ValueError(f"the DeepSpeed config sets zero_optimization.{key}=false, but preftune saves the whole "
                             "model as Hugging Face files: set it true (zero3_save_16bit_model: true in an accelerate "
                             "config file)")
        zero[key] = True
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", None):
            raise ValueError(f"the DeepSpeed config sets zero_optimization.{key}.device={device!r}: offloading has "
                             "not run with preftune; set it to 'none' (offload_*_device: none in "
                             "examples/accelerate/zero*.yaml)")


def backward(engine, loss: torch.Tensor, *, boundary: bool) -> None:
    """One micro-batch's backward through the engine; ``boundary``: the step's last micro-batch."""
    engine.set_gradient_accumulation_boundary(is_boundary=boundary)
    engine.backward(loss, scale_wrt_gas=False)


class NonFiniteUpdateError(RuntimeError):
    """DeepSpeed applied an update whose gradient was not finite (ZeRO-3 outside fp16)."""


def skips_nonfinite(engine) -> bool:
    """Whether DeepSpeed skips an update whose gradient norm is not finite: ZeRO-1/2 do (in bf16 unless
    the config's bf16.check_grad_overflow is false), ZeRO-3 only under fp16's loss scaling."""
    if engine.fp16_enabled():
        return True
    if engine.zero_optimization_stage() == 3:
        return False
    return not engine.bfloat16_enabled() or bool(getattr(engine.optimizer, "check_grad_overflow", True))


def step(engine, step_number: int) -> torch.Tensor:
    """DeepSpeed's step (clip, update or skip a non-finite one, zero the gradients); returns the gradient
    norm before clipping (NaN where DeepSpeed computed none). Where DeepSpeed applied a non-finite update
    the weights are lost: the run stops here, before anything saves them."""
    engine.step()
    raw = engine.get_global_grad_norm()
    if raw is not None and not math.isfinite(float(raw)) and not skips_nonfinite(engine):
        raise NonFiniteUpdateError(
            f"step {step_number}: the gradient was not finite and DeepSpeed applied the update (ZeRO-3 skips such "
            "steps only under fp16), so the weights are no longer finite; stopped without saving. Resume from the "
            "last checkpoint with a lower learning_rate or beta, or check the data")
    return torch.as_tensor(float("nan") if raw is None else float(raw), dtype=torch.float32)


def save_engine_state(engine, output_dir: Path, step: int) -> Path:
    """Every process writes its part of DeepSpeed's checkpoint (a collective); returns the folder,
    moved into preftune's checkpoint by the main process."""
    staging = Path(output_dir) / f".tmp-deepspeed-{step}"
    engine.save_checkpoint(str(staging), tag=ENGINE_DIR, save_latest=False)
    return staging


def move_engine_state(staging: Path, checkpoint_tmp: Path) -> None:
    """Main process: DeepSpeed's files into the checkpoint being written."""
    shutil.move(str(Path(staging) / ENGINE_DIR), str(Path(checkpoint_tmp) / ENGINE_DIR))
    shutil.rmtree(staging, ignore_errors=True)


def check_resume(path: Path, accelerator) -> bool:
    """Whether the checkpoint at ``path`` holds DeepSpeed's state; refuses a checkpoint written under
    another engine than this run's (its optimizer state would not fit)."""
    has_engine = (Path(path) / ENGINE_DIR).is_dir()
    if has_engine and not is_deepspeed(accelerator):
        raise ValueError(
            f"checkpoint {path} was written under DeepSpeed (its optimizer state is DeepSpeed's, split per process in "
            f"{ENGINE_DIR}/): resume it under DeepSpeed with the same ZeRO stage and number of processes, or start "
            f"from its model ({Path(path) / 'model'}) as a new run")
    if not has_engine and is_deepspeed(accelerator):
        raise ValueError(
            f"checkpoint {path} was not written under DeepSpeed: resume it with the engine that wrote it (DDP, FSDP "
            f"or one process), or start from its model ({Path(path) / 'model'}) as a new run")
    return has_engine


def load_engine_state(engine, path: Path) -> None:
    """Every process loads the model and its optimizer partition from DeepSpeed's files in ``path``."""
    load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_DIR, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"checkpoint {path}: DeepSpeed found nothing to load in {Path(path) / ENGINE_DIR}")


__all__ = ["ENGINE_DIR", "NonFiniteUpdateError", "is_deepspeed", "zero_stage", "model_loading", "configure", "backward",
           "skips_nonfinite", "step", "save_engine_state",
           "move_engine_state", "check_resume", "load_engine_state"]
