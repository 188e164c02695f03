"""dataloader_num_workers: micro-batches collated ahead in worker processes give the run of 0 workers.

The slow obvious twin of the worker path is the in-loop path (``dataloader_num_workers=0``: each
micro-batch collated when it is due): the same losses, weights and RNG state bit for bit, also across
epochs, with persistent workers, and after a resume from a checkpoint in the middle of an epoch.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_worker import tiny_trainer  # noqa: E402

from preftune import loop  # noqa: E402
from preftune.config import ConfigError, DPOConfig  # noqa: E402
from preftune.data.batching import VarlenPrefix, collate  # noqa: E402
from preftune.data.loader import MicroBatchLoader, StepBatchSampler  # noqa: E402
from preftune.data.pipeline import StepPlan  # noqa: E402

TIMING = ("pairs_per_second", "tokens_per_second")
# 12 pairs, 2 x 2 per step: 3 steps per epoch; 7 steps end in the middle of the third epoch
RUN = dict(max_steps=7, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_strategy="no")


def rows_of(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]


def train(out: Path, **kw):
    from _train_worker import pair_rows

    trainer = tiny_trainer(out, pair_rows(12), **{**RUN, **kw})
    trainer.train()
    return trainer


def assert_same_run(a, b) -> None:
    assert rows_of(Path(a.args.output_dir)) == rows_of(Path(b.args.output_dir))
    for x, y in zip(weights(a), weights(b), strict=True):
        assert torch.equal(x, y)


def test_sampler_yields_each_process_its_own_micro_batches_in_step_order():
    plan = StepPlan(num_samples=40, micro_batch=2, num_processes=2, accumulation=3, seed=5)  # 3 steps per epoch
    for rank in (0, 1):
        sampler = StepBatchSampler(plan, rank)
        sampler.set_range(epoch=1, start=1, stop=3)
        perm = plan.permutation(1)
        # the slow twin: global step s of the epoch is perm[12s : 12s+12]; micro-batch k of process r is
        # its slice [(2k + r) * 2, (2k + r + 1) * 2)
        want = [perm[12 * s + (2 * k + rank) * 2: 12 * s + (2 * k + rank + 1) * 2] for s in (1, 2) for k in range(3)]
        assert list(sampler) == want and len(sampler) == 6
    ranks = [StepBatchSampler(plan, r) for r in (0, 1)]
    for s in ranks:
        s.set_range(0, 0, 3)
    both = [i for a, b in zip(*ranks) for i in a + b]
    assert sorted(both) == sorted(plan.permutation(0)[:36])  # the processes split every step, no overlap


@pytest.mark.parametrize("layout", ["prefix", "prefix_packed"])
def test_host_collate_is_the_in_loop_collate_on_the_host(tmp_path, layout):
    trainer = tiny_trainer(tmp_path / "run", batch_layout=layout)
    feats = trainer.train_split.features
    host = trainer._host_collate()([3, 0, 5])
    here = collate([feats[i] for i in (3, 0, 5)], layout=layout, pad_token_id=trainer.tokenizer.pad_token_id)
    assert host.keys() == here.keys()
    for k, v in here.items():
        if torch.is_tensor(v):
            assert torch.equal(host[k], v) and host[k].device.type == "cpu", k
        elif isinstance(v, VarlenPrefix):
            assert all(torch.equal(getattr(host[k], f), getattr(v, f)) for f in ("cu_q", "cu_k", "k_index"))
        else:
            assert host[k] == v, k


@pytest.mark.parametrize("extra", [
    dict(batch_layout="prefix_packed"),
    dict(dataloader_persistent_workers=True, dataloader_prefetch_factor=1),
])
def test_two_workers_give_the_run_of_none_bit_for_bit(tmp_path, extra, monkeypatch):
    made = []
    real = loop.MicroBatchLoader

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(loop, "MicroBatchLoader", spy)
    plain = train(tmp_path / "plain", dataloader_num_workers=0,  # the worker-only fields refused here
                  **{k: v for k, v in extra.items() if not k.startswith("dataloader_")})
    rng_plain = torch.get_rng_state()
    assert not made  # 0 workers: no DataLoader at all
    ahead = train(tmp_path / "ahead", **extra, dataloader_num_workers=2)
    assert torch.equal(torch.get_rng_state(), rng_plain)  # the loader drew nothing from the global RNG
    assert len(made) == 1 and made[0].loader.num_workers == 2
    assert made[0].loader.persistent_workers == bool(extra.get("dataloader_persistent_workers"))
    assert_same_run(plain, ahead)
    assert [r["step"] for r in rows_of(tmp_path / "ahead")] == list(range(1, 8))
    assert not multiprocessing.active_children()  # the run shut its workers down


def test_workers_feed_what_the_loop_plans(tmp_path, monkeypatch):
    """The host batches the loop trains on are those of the micro-batches StepPlan gives it, step by step."""
    seen = []
    real = loop.TrainLoop._optimizer_step

    def record(self, micro, plan, metrics, host=None):
        assert host is not None and len(host) == len(micro)
        seen.append(([h["pair_index"].tolist() for h in host], micro))
        return real(self, micro, plan, metrics, host=host)

    monkeypatch.setattr(loop.TrainLoop, "_optimizer_step", record)
    train(tmp_path / "run", dataloader_num_workers=2)
    assert len(seen) == 7
    for got, micro in seen:
        assert got == micro


def test_resume_mid_epoch_with_workers_matches_the_uninterrupted_run(tmp_path):
    first = train(tmp_path / "resumed", dataloader_num_workers=2, max_steps=4, save_strategy="steps", save_steps=4,
                  lr_scheduler_type="constant")
    assert first.state.global_step == 4  # step 4 of 7: the middle of the second epoch
    del first
    from _train_worker import pair_rows

    resumed = tiny_trainer(tmp_path / "resumed", pair_rows(12), **{**RUN, "dataloader_num_workers": 2,
                                                                   "lr_scheduler_type": "constant"})
    resumed.train(resume_from_checkpoint="latest")
    twin = train(tmp_path / "twin", dataloader_num_workers=0, lr_scheduler_type="constant")
    assert_same_run(twin, resumed)
    assert not multiprocessing.active_children()


def test_workers_shut_down_when_training_raises(tmp_path, monkeypatch):
    closed = []
    real_close = MicroBatchLoader.close

    def close(self):
        real_close(self)
        closed.append(True)

    monkeypatch.setattr(MicroBatchLoader, "close", close)

    def nan_losses(self, host_batch):
        losses, metrics, tokens, ids = real(self, host_batch)
        return losses * float("nan"), metrics, tokens, ids

    from preftune.trainer import DPOTrainer

    real = DPOTrainer._batch_losses
    monkeypatch.setattr(DPOTrainer, "_batch_losses", nan_losses)
    with pytest.raises(loop.NonFiniteError):
        train(tmp_path / "run", dataloader_num_workers=2, max_nonfinite_steps=2)
    assert closed == [True]
    assert not multiprocessing.active_children()


def test_loader_fields_are_checked_by_name():
    with pytest.raises(ConfigError, match="dataloader_prefetch_factor=2: applies to data loader worker processes"):
        DPOConfig(dataloader_prefetch_factor=2)
    with pytest.raises(ConfigError, match="dataloader_persistent_workers=True: .*dataloader_num_workers > 0"):
        DPOConfig(dataloader_persistent_workers=True)
    with pytest.raises(ConfigError, match="dataloader_prefetch_factor=0: must be None or an integer >= 1"):
        DPOConfig(dataloader_prefetch_factor=0, dataloader_num_workers=1)
    c = DPOConfig(dataloader_num_workers=2, dataloader_prefetch_factor=3, dataloader_persistent_workers=True)
    assert (c.dataloader_pin_memory, c.dataloader_prefetch_factor) == (True, 3)
