"""Placing a frozen reference model like the policy: sharded under FSDP or ZeRO-3, plain on the device otherwise."""

from __future__ import annotations

from torch import nn

from preftune.models import disable_dropout


def reference_deepspeed_config(train_config: dict, *, micro_batch: int, accumulation: int, world_size: int,
                               mixed_precision: str) -> dict:  # fmt: skip
    """The DeepSpeed config for a frozen reference engine, from the policy's config (not modified).

    ZeRO-3 stays ZeRO-3 (the reference is sharded like the policy); any other stage becomes stage 0
    (a frozen model has no gradients or optimizer state to shard). The optimizer and scheduler are
    dropped, "auto" batch sizes become numbers and "auto" ZeRO knobs are left to DeepSpeed.
    """
    import copy

    cfg = copy.deepcopy(train_config)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    zero = dict(cfg.get("zero_optimization") or {})
    if int(zero.get("stage", 0)) != 3:
        zero = {"stage": 0}
    zero = {k: v for k, v in zero.items() if v != "auto"}
    zero.pop("offload_optimizer", None)
    cfg["zero_optimization"] = zero
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch * accumulation * world_size
    for name in ("bf16", "fp16"):
        cfg[name] = {"enabled": mixed_precision == name}
    if cfg.get("gradient_clipping") == "auto":
        cfg.pop("gradient_clipping")
    return cfg


def prepare_reference_model(model: nn.Module, accelerator, *, micro_batch: int = 1, accumulation: int = 1) -> nn.Module:
    """Freeze a reference model (eval mode, no grads, dropout off) and place it like the policy.

    Under FSDP2 it is sharded with ``fully_shard`` by the same plugin settings as the policy, under
    FSDP1 wrapped in FSDP, under DeepSpeed ZeRO-3 wrapped in an inference engine whose parameters
    are partitioned (:func:`reference_deepspeed_config`); under DDP or one process it is moved to
    the device, unwrapped (nothing to synchronize). No optimizer ever sees it.
    """
    from accelerate.utils import DistributedType

    model.eval()
    model.requires_grad_(False)
    disable_dropout(model)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        import deepspeed

        cfg = reference_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, micro_batch=micro_batch,
                                         accumulation=accumulation, world_size=accelerator.num_processes,
                                         mixed_precision=str(accelerator.mixed_precision))  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    if kind == DistributedType.FSDP:
        return accelerator.prepare_model(model).eval()  # FSDP1 shards only outside evaluation_mode
    return accelerator.prepare_model(model, evaluation_mode=True).eval()


def sharded_parameters(accelerator) -> bool:
    """True when parameters are split across processes (FSDP, DeepSpeed ZeRO-3): an elementwise mix of
    two models' parameters then works only if both are sharded identically."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}
        return int(zero.get("stage", 0)) == 3
    return False


def plain_data_parallel(accelerator) -> bool:
    """True for one process, DDP or multi-CPU (accelerate's NO, MULTI_GPU, MULTI_CPU): where the
    automatic ``precompute_ref_log_probs`` precomputes (see ``choose_source``). False under FSDP,
    DeepSpeed (any stage) and other backends."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                            DistributedType.MULTI_CPU)  # fmt: skip
