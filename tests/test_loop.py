"""TrainLoop's cadence fields (logging_strategy, eval_delay) and the accelerator settings the config names
(tf32, ddp_*): the decision unit by unit, then through a short run on a tiny random model."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from preftune import DPOConfig, DPOTrainer
from preftune.data.demo import demo_dataset
from preftune.loop import TrainLoop, accelerator_handlers, set_tf32
from preftune.testing import tiny_model, tiny_tokenizer


def _due(step: int, *, total: int = 8, per_epoch: int = 4, has_eval: bool = True, **kw) -> tuple[bool, bool, bool]:
    """TrainLoop._due after optimizer step ``step`` of a run of ``total`` steps, ``per_epoch`` steps an epoch
    (one sample a step)."""
    args = DPOConfig(**kw)
    loop = SimpleNamespace(args=args, _has_eval=lambda: has_eval)
    run = SimpleNamespace(state=SimpleNamespace(global_step=step, samples_seen=step), total_steps=total,
                          epoch_samples=per_epoch, log_every=args.interval("logging_steps", total), eval_every=args.interval("eval_steps", total),
                          save_every=args.interval("save_steps", total))
    return TrainLoop._due(loop, run)


def test_logging_strategy_steps_epoch_no():
    logged = {s: [t for t in range(1, 9) if _due(t, logging_strategy=s, logging_steps=3)[0]]
              for s in ("steps", "epoch", "no")}
    assert logged == {"steps": [3, 6, 8], "epoch": [4, 8], "no": [8]}  # the last step's row always
    assert [t for t in range(1, 9) if _due(t, logging_strategy="no", logging_first_step=True)[0]] == [1, 8]


def test_eval_delay_in_steps_and_in_epochs():
    steps = [t for t in range(1, 9) if _due(t, eval_strategy="steps", eval_steps=1, eval_delay=3)[1]]
    assert steps == [3, 4, 5, 6, 7]  # the last step's evaluation is the one at the end of training
    epochs = [t for t in range(1, 13) if _due(t, total=12, eval_strategy="epoch", eval_delay=2)[1]]
    assert epochs == [8]  # epoch 1 (step 4) is before the delay, epoch 3 (step 12) is the last step
    assert [t for t in range(1, 9) if _due(t, eval_strategy="epoch")[1]] == [4]


def _run(tmp_path, **kw) -> list[dict]:
    args = DPOConfig(output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=2,
                     per_device_eval_batch_size=4, save_strategy="no", max_length=160, max_prompt_length=96,
                     learning_rate=1e-3, seed=0, report_to=["none"], **kw)
    trainer = DPOTrainer(model=tiny_model(), args=args, train_dataset=demo_dataset("train", n=8),
                         eval_dataset=demo_dataset("eval", n=4), processing_class=tiny_tokenizer())
    trainer.train()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_logging_strategy_epoch_and_eval_delay_through_training(tmp_path):
    rows = _run(tmp_path, logging_strategy="epoch", logging_steps=1, eval_strategy="steps", eval_steps=1,
                eval_delay=6)
    assert [r["step"] for r in rows if "loss" in r] == [4, 8]  # 4 steps an epoch, 2 epochs
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 7, 8]  # 8: the evaluation at the end


def test_model_init_kwargs_dtype_loads_the_model_and_is_written_as_text(tmp_path):
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    args = DPOConfig(output_dir=str(tmp_path / "half"), model_init_kwargs={"dtype": torch.float16},
                     report_to=["none"])
    half = DPOTrainer(model=str(path), args=args, train_dataset=demo_dataset("train", n=4),
                      processing_class=tiny_tokenizer())
    assert next(half.model.parameters()).dtype == torch.float16

    args = DPOConfig(output_dir=str(tmp_path / "run"), model_init_kwargs={"dtype": torch.float32}, max_steps=1,
                     per_device_train_batch_size=2, save_strategy="no", max_length=160, report_to=["none"])
    DPOTrainer(model=str(path), args=args, train_dataset=demo_dataset("train", n=4),
               processing_class=tiny_tokenizer()).train()
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "model_init_kwargs:\n  dtype: float32\n" in text
    assert DPOConfig.from_yaml(str(tmp_path / "run" / "config.yaml")).model_init_kwargs == {"dtype": "float32"}


def test_ddp_fields_reach_accelerate():
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = accelerator_handlers(DPOConfig())
    assert [type(h) for h in handlers] == [InitProcessGroupKwargs]
    assert handlers[0].timeout.total_seconds() == 1800
    handlers = accelerator_handlers(DPOConfig(ddp_find_unused_parameters=True, ddp_bucket_cap_mb=50,
                                              ddp_static_graph=True, ddp_timeout=60))
    ddp = next(h for h in handlers if isinstance(h, DistributedDataParallelKwargs))
    assert (ddp.find_unused_parameters, ddp.bucket_cap_mb, ddp.static_graph, ddp.broadcast_buffers) == (
        True, 50, True, True)  # broadcast_buffers unset: torch's default
    assert handlers[0].timeout.total_seconds() == 60


def test_tf32_sets_torch_on_a_gpu_only(caplog):
    caplog.set_level(logging.WARNING, logger="preftune")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        set_tf32(True, on_gpu=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and "tf32=True changes nothing on CPU" in caplog.text
        set_tf32(True, on_gpu=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(None, on_gpu=True)  # None: torch's setting stays
        assert torch.backends.cuda.matmul.allow_tf32
        set_tf32(False, on_gpu=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("strategy", ["steps", "epoch", "no"])
def test_logging_strategy_is_checked(strategy):
    assert DPOConfig(logging_strategy=strategy.upper()).logging_strategy == strategy
    with pytest.raises(Exception, match="logging_strategy='sometimes'"):
        DPOConfig(logging_strategy="sometimes")
