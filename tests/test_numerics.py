"""Non-finite loss or gradient: detected at its step, update skipped and counted, pair ids logged; a run of
bad steps stops with a checkpoint of the last good state; NaN weights are never saved."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_worker import tiny_trainer  # noqa: E402

from preftune import checkpoint as ckpt  # noqa: E402
from preftune import dpo, loop  # noqa: E402
from preftune import trainer as tr  # noqa: E402
from preftune.data.pipeline import StepPlan  # noqa: E402

SEED = 3


@pytest.fixture(autouse=True, params=["sync", "deferred"])
def check_mode(request, monkeypatch):
    """Every test twice: the finiteness read on the host each step, and read later while the fused
    AdamW skips the bad step on the device (what a GPU run does; forced here on the CPU's fused AdamW)."""
    monkeypatch.setattr(loop, "device_defers_checks", lambda device: request.param == "deferred")
    real = tr.DPOTrainer._defers_nonfinite_checks

    def check(self, optimizer):
        used = real(self, optimizer)
        assert used == (request.param == "deferred")
        return used

    monkeypatch.setattr(tr.DPOTrainer, "_defers_nonfinite_checks", check)
    return request.param


def poison(monkeypatch, bad_pairs, *, mode="loss"):
    """Make the policy's log-probs of `bad_pairs` non-finite: NaN in the forward ("loss"), or a finite
    forward whose gradient is NaN ("gradient": sqrt(0 * x) is 0 with derivative inf * 0)."""
    real = dpo.model_pair_logps
    bad = torch.tensor(sorted(bad_pairs), dtype=torch.long)

    def model_logps(model, batch, **kw):
        out = real(model, batch, **kw)
        hit = torch.isin(batch["pair_index"], bad).to(out.chosen_logps.device)
        chosen = out.chosen_logps.clone()
        if mode == "loss":
            chosen[hit] = float("nan")
        else:  # only the hit pairs go through sqrt, so only their gradient is NaN
            chosen[hit] = chosen[hit] + torch.sqrt(chosen[hit] * 0.0)
        return dataclasses.replace(out, chosen_logps=chosen)

    monkeypatch.setattr(dpo, "model_pair_logps", model_logps)


def record_weights(monkeypatch):
    """weights[k] = the policy's parameters before optimizer step k+1 (and after the last one)."""
    weights = []
    real = tr.DPOTrainer._optimizer_step

    def step(self, micro, plan, window):
        weights.append([p.detach().clone() for p in self.model.parameters()])
        return real(self, micro, plan, window)

    monkeypatch.setattr(tr.DPOTrainer, "_optimizer_step", step)
    return weights


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def steps_of(pair: int, n: int = 8, batch: int = 2) -> int:
    """1-based optimizer step at which `pair` is trained in epoch 0 (the slow obvious twin of StepPlan)."""
    perm = StepPlan(n, batch, 1, 1, SEED).permutation(0)
    return perm.index(pair) // batch + 1


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_one_bad_pair_skips_exactly_its_step(mode, tmp_path, monkeypatch, caplog):
    bad_pair = 5
    bad_step = steps_of(bad_pair)
    poison(monkeypatch, {bad_pair}, mode=mode)
    weights = record_weights(monkeypatch)
    trainer = tiny_trainer(tmp_path / "run", save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="preftune"):
        trainer.train()
    weights.append([p.detach().clone() for p in trainer.model.parameters()])
    for k in range(1, 5):  # weights[k] vs weights[k-1]: did step k change the model?
        assert same(weights[k], weights[k - 1]) == (k == bad_step), f"step {k}"
    assert trainer.train_state.nonfinite_steps == 1
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    perm = StepPlan(8, 2, 1, 1, SEED).permutation(0)
    step_pairs = perm[(bad_step - 1) * 2 : bad_step * 2]  # a NaN gradient blames every pair of its step
    want = f"[{bad_pair}]" if mode == "loss" else str(step_pairs)
    assert msgs == [f"non-finite {mode} at step {bad_step}: update skipped (pairs {want})"]
    assert bad_pair in step_pairs
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert [r.get("nonfinite_steps", 0) for r in rows] == [int(r["step"] >= bad_step) for r in rows]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_bad_steps_stop_with_a_checkpoint_of_the_last_good_state(tmp_path, monkeypatch):
    perm = StepPlan(8, 2, 1, 1, SEED).permutation(0)
    poison(monkeypatch, perm[4:])  # steps 1-2 are good, 3 and 4 are bad
    weights = record_weights(monkeypatch)
    trainer = tiny_trainer(tmp_path / "run", save_strategy="no", max_nonfinite_steps=2)
    with pytest.raises(tr.NonFiniteError, match="2 consecutive optimizer steps .* non-finite") as e:
        trainer.train()
    assert "max_nonfinite_steps" in str(e.value) and str(tmp_path / "run") in str(e.value)
    from tqdm import tqdm

    assert not [b for b in list(tqdm._instances) if b.desc == "dpo"], "the stopped run left its progress bar open"
    assert len(weights) == 4
    saved = ckpt.resolve_checkpoint(tmp_path / "run", "latest")
    assert saved.name == "checkpoint-4"
    from safetensors.torch import load_file

    sd = load_file(str(saved / "model" / "model.safetensors"))
    names = [n for n, _ in trainer.model.named_parameters()]
    for name, after_step_2 in zip(names, weights[2]):
        assert torch.equal(sd[name], after_step_2), name  # the state after the last good step


def test_consecutive_bad_steps_count_across_a_resume(tmp_path, monkeypatch):
    perm = StepPlan(8, 2, 1, 1, SEED).permutation(0)
    poison(monkeypatch, perm[4:])  # steps 1-2 are good, 3 and 4 are bad
    first = tiny_trainer(tmp_path / "run", max_steps=3, save_steps=3, max_nonfinite_steps=2)
    first.train()  # step 3 is skipped; the checkpoint at step 3 remembers one bad step in a row
    saved = ckpt.resolve_checkpoint(tmp_path / "run", "latest")
    assert saved.name == "checkpoint-3" and ckpt.TrainState.from_json(saved / "preftune_state.json").nonfinite_in_a_row == 1
    resumed = tiny_trainer(tmp_path / "run", max_steps=4, save_steps=3, max_nonfinite_steps=2)
    with pytest.raises(tr.NonFiniteError, match=r"2 consecutive optimizer steps .* \(last at step 4\)"):
        resumed.train(resume_from_checkpoint="latest")


def test_the_cli_reports_the_stop_without_a_traceback(tmp_path, monkeypatch, capsys):
    from _train_worker import make_model_dir, pair_rows, write_jsonl

    from preftune.cli import main

    poison(monkeypatch, set(range(8)))
    model = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    rc = main(["train", "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir",
               str(tmp_path / "out"), "--max_steps", "4", "--per_device_train_batch_size", "2",
               "--max_nonfinite_steps", "2", "--use_cpu", "true", "--report_to", "none"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "consecutive optimizer steps had a non-finite loss" in err and "Traceback" not in err
    assert ckpt.resolve_checkpoint(tmp_path / "out", "latest").name == "checkpoint-2"


def test_nan_weights_are_never_saved(tmp_path):
    trainer = tiny_trainer(tmp_path / "run", max_steps=2)
    trainer.train()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("nan")
    state = ckpt.TrainState(global_step=3, samples_seen=6)
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        ckpt.save_checkpoint(tmp_path / "run", trainer, state, trainer.accelerator)
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        trainer.save_model(tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert not list((tmp_path / "final").glob("*.safetensors"))
    assert ckpt.resolve_checkpoint(tmp_path / "run", "latest").name == "checkpoint-2"


def _metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_deferred_checks_train_the_same_and_read_the_host_only_at_boundaries(tmp_path, monkeypatch, check_mode):
    """Deferred, a step's finiteness reaches the host at the next logging step (here every 2 steps), not
    in the step, and at once while a run of bad steps may be under way; the same step is skipped."""
    perm = StepPlan(8, 2, 1, 1, SEED).permutation(0)
    poison(monkeypatch, {perm[2]})  # step 2 is bad
    seen = []  # (step booked, global step when the host booked it)
    real = tr.DPOTrainer._count_step

    def count(self, state, finite, step, *a):
        seen.append((step, state.global_step))
        return real(self, state, finite, step, *a)

    monkeypatch.setattr(tr.DPOTrainer, "_count_step", count)
    trainer = tiny_trainer(tmp_path / check_mode, save_strategy="no", logging_steps=2, max_nonfinite_steps=5)
    trainer.train()
    if check_mode == "deferred":
        # steps 1-2 read together at the step-2 log; step 2 was bad, so step 3 is read at once
        assert seen == [(1, 2), (2, 2), (3, 3), (4, 4)]
    else:
        assert seen == [(1, 0), (2, 1), (3, 2), (4, 3)]
    rows = _metrics(tmp_path / check_mode)
    assert trainer.train_state.nonfinite_steps == 1 and [r["nonfinite_steps"] for r in rows if "loss" in r] == [1, 1]


def test_deferred_and_sync_runs_are_bitwise_equal(tmp_path, monkeypatch, check_mode):
    if check_mode == "sync":
        pytest.skip("compares both modes itself")
    perm = StepPlan(8, 2, 1, 1, SEED).permutation(0)
    poison(monkeypatch, {perm[2], perm[5]})  # steps 2 and 3 are bad
    results = {}
    monkeypatch.setattr(tr.DPOTrainer, "_defers_nonfinite_checks",
                        lambda self, opt: self.args.output_dir.endswith("deferred"))
    for mode in ("sync", "deferred"):
        trainer = tiny_trainer(tmp_path / mode, save_strategy="no", logging_steps=3, max_nonfinite_steps=5)
        trainer.train()
        rows = [{k: v for k, v in r.items() if "per_second" not in k} for r in _metrics(tmp_path / mode)]
        results[mode] = (torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), rows,
                         trainer.optimizer.state_dict()["state"])
    assert torch.equal(results["sync"][0], results["deferred"][0])
    assert results["sync"][1] == results["deferred"][1]
    for a, b in zip(results["sync"][2].values(), results["deferred"][2].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_check_is_deferred_and_skips_the_bad_step(tmp_path, monkeypatch, check_mode):
    if check_mode == "sync":
        pytest.skip("a GPU run with the fused AdamW always defers")
    bad_step = steps_of(5)
    poison(monkeypatch, {5})
    weights = record_weights(monkeypatch)
    trainer = tiny_trainer(tmp_path / "run", save_strategy="no", use_cpu=False, bf16=False, logging_steps=4)
    trainer.train()
    weights.append([p.detach().clone() for p in trainer.model.parameters()])
    for k in range(1, 5):
        assert same(weights[k], weights[k - 1]) == (k == bad_step), f"step {k}"
    assert trainer.train_state.nonfinite_steps == 1
