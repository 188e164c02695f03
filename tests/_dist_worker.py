"""Run by tests/test_distributed.py under torchrun (or plain python): train runs from a JSON spec.

    python tests/_dist_worker.py SPEC.json

SPEC: {"model": dir, "fsdp_on_cpu": bool (optional), "deepspeed_on_cpu": bool (optional), "jobs": [{"config": {DPOConfig fields},
"resume": path or null, "out": json path, "expect_error": text or absent, "model": dir (optional, the
spec's otherwise), "predictions": bool (optional: a compute_metrics records the last evaluation's
EvalPrediction.predictions into "out")}]}.
Each job trains with the DPOTrainer API, saves the final model, and (main process) writes the process
count, the engine and the evaluation results to "out". Launching this file under several processes
is exactly what a user does; nothing here knows how many processes there are.

"fsdp_on_cpu": accelerate runs FSDP only on accelerators: with CPU processes it ignores the FSDP
plugin (ACCELERATE_USE_FSDP, FSDP_* variables) and trains with plain DDP over gloo. This flag makes
accelerate take its FSDP path anyway, the one `accelerate launch --config_file fsdp.yaml` takes on
GPUs (fully_shard, DTensor parameters, full state dicts): see :func:`force_fsdp_on_cpu`.

"deepspeed_on_cpu": the same for DeepSpeed (ACCELERATE_USE_DEEPSPEED and the ACCELERATE_DEEPSPEED_*
variables that `accelerate launch --config_file zero2.yaml` sets): accelerate ignores them for CPU
processes; DeepSpeed itself has a CPU accelerator (DS_ACCELERATOR=cpu) that communicates over gloo.
See :func:`force_deepspeed_on_cpu`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def force_fsdp_on_cpu() -> None:
    """Make accelerate's state report FSDP for CPU processes that were given an FSDP plugin.

    accelerate (1.x) switches to FSDP only for accelerator process groups (MULTI_GPU, ...): for
    MULTI_CPU it keeps DDP and drops the plugin. PyTorch's fully_shard itself runs on CPU over gloo,
    so the state is set as accelerate sets it on GPUs, in both its shared-state dicts."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def force_deepspeed_on_cpu() -> None:
    """Make accelerate's state report DeepSpeed for CPU processes that were given a DeepSpeed plugin.

    accelerate (1.x) takes its DeepSpeed path only when it is not told `cpu=True` (preftune's Accelerator
    on a CPU) and, without `cpu`, finds no process group on a machine without accelerators. With `cpu`
    it starts the gloo group as for any multi-CPU run; this sets the state as accelerate sets it for
    DeepSpeed on GPUs (the active plugin, DeepSpeed's own mixed precision), in both shared-state dicts.
    `accelerator.prepare` then calls `deepspeed.initialize`, which takes over the gloo group."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, deepspeed_plugin=None, **kwargs):
        original(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and deepspeed_plugin is not None:
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            self.distributed_type = DistributedType.DEEPSPEED
            self._mixed_precision = "no"  # DeepSpeed's config carries it
            PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED

    AcceleratorState.__init__ = __init__


def _engine(trainer) -> dict:
    """What the run really was: the engine, and under FSDP whether every trainable parameter is a
    DTensor sharded over all processes and is exactly what the optimizer updates."""
    acc = trainer.accelerator
    out = {"num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type).split(".")[-1]}
    if out["distributed_type"] == "FSDP":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        for module in trainer.model.modules():  # a forward without backward (the last evaluation) leaves
            if isinstance(module, FSDPModule):  # units kept whole after forward ([norm, lm_head]) gathered
                module.reshard()
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        optimized = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        out["sharded"] = bool(trainable) and all(
            isinstance(p, DTensor) and p.device_mesh.size() == acc.num_processes and p.placements == (Shard(0),)
            for p in trainable
        )
        out["optimizer_holds_sharded_params"] = {id(p) for p in optimized} == {id(p) for p in trainable}
    if out["distributed_type"] == "DEEPSPEED":
        from preftune import zero

        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        out["zero_stage"] = zero.zero_stage(acc)
        out["engine"] = type(trainer.model).__name__
        out["zero_optimizer"] = type(trainer.optimizer.optimizer).__name__
        # ZeRO-3: every parameter is managed (ds_id); those above its persistence threshold (accelerate's
        # 10 x hidden size: the tiny model's base Linear weights, not LoRA's 4 x 32) are empty placeholders
        # outside a gather, with this process's partition in ds_tensor
        if out["zero_stage"] == 3:  # parameters an evaluation forward left gathered (ZeRO-3 reuses them) let go
            trainer.model.empty_partition_cache()
        params = list(trainer.model.parameters())
        big = [p for p in params if getattr(p, "ds_numel", 0) > 512]
        out["partitioned"] = all(hasattr(p, "ds_id") for p in params) and bool(big) and all(
            p.numel() == 0 and 0 < p.ds_tensor.numel() < p.ds_numel for p in big)
    return out


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("fsdp_on_cpu"):
        force_fsdp_on_cpu()
    if spec.get("deepspeed_on_cpu"):
        force_deepspeed_on_cpu()
    from preftune.config import DPOConfig
    from preftune.data.pipeline import FROM_CONFIG
    from preftune.trainer import DPOTrainer

    for job in spec["jobs"]:
        trainer = DPOTrainer(model=job.get("model", spec["model"]), args=DPOConfig(**job["config"]),
                             train_dataset=FROM_CONFIG)
        seen = []
        if job.get("predictions"):
            trainer.compute_metrics = lambda pred, seen=seen: seen.append(pred.predictions.tolist()) or {}
        if job.get("expect_error"):  # the job must fail with a ValueError naming this text
            try:
                trainer.train()
            except ValueError as e:
                assert job["expect_error"] in str(e), str(e)
                print(f"expected error: {e}")
                continue
            raise AssertionError(f"expected a ValueError with {job['expect_error']!r}")
        trainer.train(resume_from_checkpoint=job.get("resume"))
        engine = _engine(trainer)
        trainer.save_model()
        if trainer.accelerator.is_main_process:
            Path(job["out"]).write_text(json.dumps({
                **engine,
                "initial_eval": getattr(trainer, "initial_eval", None),
                "final_eval": getattr(trainer, "final_eval", None),
                "predictions": seen[-1] if seen else None,
            }))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
