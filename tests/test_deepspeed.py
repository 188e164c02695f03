"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes, each run against its one-process twin.

accelerate runs DeepSpeed only off-CPU; DeepSpeed itself has a CPU accelerator over gloo. The tests set
what `accelerate launch --config_file examples/accelerate/zero2.yaml` (or zero3.yaml) sets in the
environment, start 2 processes with torchrun, and force accelerate's DeepSpeed path on CPU as the FSDP
tests force FSDP (tests/_dist_worker.py `force_deepspeed_on_cpu`). Per stage, one launch runs:
full fine-tuning with the precomputed reference (a checkpoint at step 2), the same with a live
reference model, LoRA (reference = adapters off), and exact resumes of both checkpoints. The twins
(tests/test_distributed.py's arithmetic): 1 process x batch 2 x accumulation 2, the same global batch.

Tolerance: DeepSpeed's ZeRO optimizers keep fp32 master weights in flat buffers, average gradients
over the processes in partitioned reductions, and compute the clipping norm over the partitions: sums in another order than one process's, so the weights agree to float32 rounding
(1e-5 after 3 steps of AdamW at lr 1e-3, as the DDP tests), not bit for bit; logged metrics to 1e-4
relative (DeepSpeed's gradient norm is its own sum of squares over partitions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")

from test_distributed import _assert_rows_close, _assert_weights_close, _launch, _rows, _weights  # noqa: E402

# what `accelerate launch --config_file examples/accelerate/zero{2,3}.yaml` puts in the environment
# (test_env_matches_the_example_configs checks it against the files), with gradient_accumulation_steps 2:
# the 2-process runs take 1 pair per micro-batch x 2 micro-batches, so DeepSpeed's accumulation
# boundary is exercised (global batch 4, as the one-process twin's 2 x 2)
DS_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
          "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
          "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "DS_ACCELERATOR": "cpu"}
ZERO3_ENV = {"ACCELERATE_DEEPSPEED_ZERO3_INIT": "false", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}
LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
TRDPO = dict(precompute_ref_log_probs=False, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
ADAPTER = "adapter_model.safetensors"


def _config_base(out: Path, data: Path, cache: Path, **kw) -> dict:
    base = dict(output_dir=str(out), cache_dir=str(cache), dataset_name=str(data), eval_dataset=0.25, max_length=96,
                max_prompt_length=48, max_steps=3, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1,
                logging_steps=1, save_steps=2, eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=2,
                per_device_train_batch_size=2, precompute_ref_log_probs=True, use_cpu=True, report_to="none", seed=0,
                max_grad_norm=1.0)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from _train_worker import make_model_dir, pair_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("ds")
    model_dir = make_model_dir(tmp / "model")
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows(20))
    one = {name: tmp / name for name in ("one", "one_lora", "one_trdpo")}
    _launch({"model": str(model_dir), "jobs": [  # the one-process twins, accumulation 2
        {"config": _config_base(one["one"], data, tmp / "cache1", gradient_accumulation_steps=2),
         "out": str(tmp / "one.json")},
        {"config": _config_base(one["one_lora"], data, tmp / "cache1", gradient_accumulation_steps=2,
                           precompute_ref_log_probs=False, **LORA), "out": str(tmp / "one_lora.json")},
        {"config": _config_base(one["one_trdpo"], data, tmp / "cache1", gradient_accumulation_steps=2, **TRDPO),
         "out": str(tmp / "one_trdpo.json")},
    ]}, tmp / "spec1.json", procs=1)
    return dict(tmp=tmp, model_dir=model_dir, data=data, **one,
                info={n: json.loads((tmp / f"{n}.json").read_text()) for n in ("one", "one_lora")})


def _stage_runs(base, stage: int) -> dict:
    def _config(out, data, cache, **kw):  # 2 processes x 1 pair x accumulation 2
        return _config_base(out, data, cache, per_device_train_batch_size=1, gradient_accumulation_steps=2, **kw)

    tmp, data = base["tmp"], base["data"]
    names = ("full", "live", "lora", "resumed", "lora_resumed")
    out = {name: tmp / f"z{stage}_{name}" for name in (*names, "trdpo")}
    cache = tmp / f"cache_z{stage}"
    env = dict(DS_ENV, ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage), **(ZERO3_ENV if stage == 3 else {}))
    log = _launch({"model": str(base["model_dir"]), "deepspeed_on_cpu": True, "jobs": [
        {"config": _config(out["full"], data, cache), "out": str(tmp / f"z{stage}_full.json")},
        {"config": _config(out["live"], data, cache, precompute_ref_log_probs=False),
         "out": str(tmp / f"z{stage}_live.json")},
        {"config": _config(out["lora"], data, cache, precompute_ref_log_probs=False, **LORA),
         "out": str(tmp / f"z{stage}_lora.json")},
        {"config": _config(out["resumed"], data, cache), "resume": str(out["full"] / "checkpoint-2"),
         "out": str(tmp / f"z{stage}_resumed.json")},
        {"config": _config(out["lora_resumed"], data, cache, precompute_ref_log_probs=False, **LORA),
         "resume": str(out["lora"] / "checkpoint-2"), "out": str(tmp / f"z{stage}_lora_resumed.json")},
        {"config": _config(out["trdpo"], data, cache, **TRDPO), "out": str(tmp / f"z{stage}_trdpo.json"),
         **({"expect_error": "sync_ref_model=True (TR-DPO) is not supported with sharded parameters"}
            if stage == 3 else {})},
    ]}, tmp / f"spec_z{stage}.json", procs=2, env=env)
    info = {name: json.loads((tmp / f"z{stage}_{name}.json").read_text()) for name in names}
    return dict(out, info=info, log=log, stage=stage)


@pytest.fixture(scope="module")
def zero2(base):
    return _stage_runs(base, 2)


@pytest.fixture(scope="module")
def zero3(base):
    return _stage_runs(base, 3)


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def runs(request):
    return request.getfixturevalue(f"zero{request.param}")


def test_runs_are_deepspeed_engines_on_two_processes(runs):
    for name, info in runs["info"].items():
        assert info["distributed_type"] == "DEEPSPEED" and info["num_processes"] == 2, name
        assert info["zero_stage"] == runs["stage"] and info["engine"] == "DeepSpeedEngine", name
        zero_opt = "DeepSpeedZeroOptimizer_Stage3" if runs["stage"] == 3 else "DeepSpeedZeroOptimizer"
        assert info["zero_optimizer"] == zero_opt, name
        assert info["partitioned"] == (runs["stage"] == 3), name  # ZeRO-3 parameters are split over processes


def test_full_fine_tuning_matches_one_process_with_accumulation(base, runs):
    w0 = _weights(base["model_dir"])
    for name in ("full", "live"):  # precomputed reference, and a live reference model placed by DeepSpeed
        _assert_weights_close(_weights(runs[name]), _weights(base["one"]), atol=1e-5, start=w0)
        rows = _rows(runs[name])
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
        _assert_rows_close(rows, _rows(base["one"]), rel=1e-4)
    for k, v in base["info"]["one"]["final_eval"].items():  # eval batches of 2, uneven shards (5 pairs)
        assert runs["info"]["full"]["final_eval"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_lora_matches_one_process_with_accumulation(base, runs):
    assert not (runs["lora"] / "model.safetensors").exists()  # the adapter alone is saved
    a, a1 = _weights(runs["lora"], ADAPTER), _weights(base["one_lora"], ADAPTER)
    assert a1 and all("lora_" in k for k in a1)
    zero = {k: torch.zeros_like(v) for k, v in a1.items() if "lora_B" in k}  # lora_B starts at 0
    _assert_weights_close({k: a[k] for k in zero}, {k: a1[k] for k in zero}, atol=1e-5, start=zero)
    _assert_weights_close(a, a1, atol=1e-5)
    _assert_rows_close(_rows(runs["lora"]), _rows(base["one_lora"]), rel=1e-4)


def test_checkpoint_holds_deepspeed_state_and_resumes_exactly(runs):
    ckpt = runs["full"] / "checkpoint-2"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "model" / "model.safetensors").is_file()
    assert not (ckpt / "optimizer.pt").exists()  # the optimizer state is DeepSpeed's, one partition per process
    optim = sorted(p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt"))
    assert len(optim) == 2, optim
    assert not list(runs["full"].parent.glob(f"z{runs['stage']}_*/.tmp*"))  # nothing left half-written
    for full, resumed, name in (("full", "resumed", "model.safetensors"), ("lora", "lora_resumed", ADAPTER)):
        _assert_weights_close(_weights(runs[resumed], name), _weights(runs[full], name), atol=1e-7)
        step3 = [r for r in _rows(runs[full]) if r["step"] == 3 and "loss" in r]
        assert len(step3) == 1
        _assert_rows_close([r for r in _rows(runs[resumed]) if r["step"] == 3 and "loss" in r], step3, rel=1e-6)


def test_env_matches_the_example_configs():
    """The environment the tests set is what the example accelerate configs ask for."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    for stage in (2, 3):
        cfg = yaml.safe_load((root / f"zero{stage}.yaml").read_text())
        ds = cfg["deepspeed_config"]
        assert cfg["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == stage
        assert float(ds["gradient_clipping"]) == float(DS_ENV["ACCELERATE_GRADIENT_CLIPPING"])
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        if stage == 3:
            assert ds["zero3_init_flag"] is False and ds["zero3_save_16bit_model"] is True


def test_tr_dpo_under_zero2_matches_one_process_and_is_refused_under_zero3(base, zero2, zero3):
    """TR-DPO mixes the policy into the reference every step: ZeRO-2 keeps whole parameters on every
    process (the reference is a frozen stage-0 engine), ZeRO-3 does not."""
    _assert_weights_close(_weights(zero2["trdpo"]), _weights(base["one_trdpo"]), atol=1e-5,
                          start=_weights(base["model_dir"]))
    _assert_rows_close(_rows(zero2["trdpo"]), _rows(base["one_trdpo"]), rel=1e-4)
    assert zero3["log"].count("expected error: sync_ref_model=True (TR-DPO) is not supported") == 2  # each rank


# --- in-process pieces: the config preftune fills, and what it refuses ---------------------------------


def _accelerator(config: dict, processes: int = 2, zero3_init: bool = False):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=config, is_zero3_init_enabled=lambda: zero3_init)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def _args(**kw):
    from preftune.config import DPOConfig

    return DPOConfig(**{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_grad_norm": 0.5, **kw})


def test_configure_fills_deepspeed_config_from_preftune_settings():
    from preftune import zero

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4, "gradient_clipping": "auto",
           "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    acc = _accelerator(cfg, processes=8)
    zero.configure(acc, _args())
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2, 4)
    assert cfg["gradient_clipping"] == 0.5 and cfg["train_batch_size"] == 64
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    zero.configure(acc, _args())  # a second trainer in the same process: checked against the given config
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 but gradient_accumulation_steps=2"):
        zero.configure(acc, _args(gradient_accumulation_steps=2))
    cfg = {"gradient_clipping": 0.0}
    zero.configure(_accelerator(cfg), _args(max_grad_norm=0))  # 0 = no clipping on both sides
    assert cfg["gradient_clipping"] == 0.0


@pytest.mark.parametrize("config, args, message", [
    ({"gradient_accumulation_steps": 1}, {}, "sets gradient_accumulation_steps=1 but gradient_accumulation_steps=4"),
    ({"gradient_clipping": 1.0}, {}, "sets gradient_clipping=1.0 but max_grad_norm=0.5"),
    ({"train_micro_batch_size_per_gpu": 8}, {}, "train_micro_batch_size_per_gpu=8 but per_device_train_batch_size=2"),
    ({"optimizer": {"type": "AdamW"}}, {}, "has a 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, "has a 'scheduler' section"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, {},
     "offload_optimizer.device='cpu': offloading has not run"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}, {},
     "stage3_gather_16bit_weights_on_model_save=false"),
])  # fmt: skip
def test_configure_refuses_what_preftune_does_otherwise(config, args, message):
    from preftune import zero

    with pytest.raises(ValueError, match=re.escape(message)):
        zero.configure(_accelerator(config), _args(**args))


def test_configure_refuses_precompute_with_zero3_init():
    from preftune import zero

    with pytest.raises(ValueError, match="precompute_ref_log_probs=True under ZeRO-3 with zero3_init_flag=true"):
        zero.configure(_accelerator({"zero_optimization": {"stage": 3}}, zero3_init=True),
                       _args(precompute_ref_log_probs=True))
    zero.configure(_accelerator({"zero_optimization": {"stage": 3}}, zero3_init=True),
                   _args(precompute_ref_log_probs=False))


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from preftune import zero

    ds, plain = tmp_path / "ds", tmp_path / "plain"
    (ds / "deepspeed").mkdir(parents=True)
    plain.mkdir()
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert zero.check_resume(ds, _accelerator({})) is True
    assert zero.check_resume(plain, ddp) is False
    with pytest.raises(ValueError, match="was written under DeepSpeed .* resume it under DeepSpeed"):
        zero.check_resume(ds, ddp)
    with pytest.raises(ValueError, match="was not written under DeepSpeed"):
        zero.check_resume(plain, _accelerator({}))


@pytest.mark.parametrize("stage, fp16, bf16, stops", [(2, False, False, False), (3, False, False, True),
                                                      (3, True, False, False), (3, False, True, True)])
def test_a_non_finite_update_deepspeed_applied_stops_the_run(stage, fp16, bf16, stops):
    """ZeRO-1/2 skip an update whose gradient norm is not finite (the loop then books a skipped step);
    ZeRO-3 skips only under fp16, so an applied non-finite update stops the run before anything saves it."""
    from types import SimpleNamespace

    from preftune import zero

    steps = []
    engine = SimpleNamespace(step=lambda: steps.append(1), get_global_grad_norm=lambda: float("nan"),
                             fp16_enabled=lambda: fp16, bfloat16_enabled=lambda: bf16,
                             zero_optimization_stage=lambda: stage, optimizer=SimpleNamespace())
    if stops:
        with pytest.raises(zero.NonFiniteUpdateError, match="step 7: the gradient was not finite and DeepSpeed applied"):
            zero.step(engine, 7)
    else:
        assert torch.isnan(zero.step(engine, 7))
    assert steps == [1]
    engine.get_global_grad_norm = lambda: 2.5
    assert float(zero.step(engine, 8)) == 2.5


def test_a_deepspeed_launch_that_accelerate_runs_without_deepspeed_says_so(monkeypatch, caplog):
    """On CPU processes accelerate drops the DeepSpeed settings and trains with DDP: a warning says so."""
    import logging
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from preftune import zero

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        zero.warn_if_ignored(ddp)
        assert not caplog.records
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        zero.warn_if_ignored(_accelerator({}))
        assert not caplog.records
        zero.warn_if_ignored(ddp)
    assert "accelerate runs DeepSpeed only on GPUs: these 2 CPU process(es) train with MULTI_CPU" in caplog.text
