"""GRPO over two CPU processes (torchrun, gloo) against one process with accumulation: the same global batch
of completions, the same sampling seeds per completion, so the same completions, rewards, group statistics and
update. The one-process run is the slow obvious twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import FSDP_ENV, _run  # the launcher and FSDP set-up DPO's multi-process tests use

WORKER = Path(__file__).with_name("_grpo_dist_worker.py")


def _spec(tmp_path: Path, name: str, model_dir: Path, **config) -> dict:
    base = dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=5, learning_rate=1e-2, logging_steps=1, use_cpu=True, report_to="none",
                seed=0, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, beta=0.05)
    base.update(config)
    return {"model": str(model_dir), "config": base, "out": str(tmp_path / f"{name}.pt"), "rows": 12}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_processes_equal_one_process_with_accumulation(tmp_path, loss_type):
    from _train_worker import make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    two = _spec(tmp_path, "two", model_dir, loss_type=loss_type)
    one = _spec(tmp_path, "one", model_dir, loss_type=loss_type, gradient_accumulation_steps=2)
    for spec, procs in ((two, 2), (one, 1)):
        path = tmp_path / f"{Path(spec['out']).stem}.json"
        path.write_text(json.dumps(spec))
        _run([str(WORKER), str(path)], procs)
    w2, w1 = torch.load(two["out"]), torch.load(one["out"])
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl", "entropy",
                "num_tokens"):
        assert [r[key] for r in rows2] == pytest.approx([r[key] for r in rows1], abs=1e-5), key


def test_fsdp2_two_processes_equal_one_process_with_accumulation(tmp_path):
    """FSDP2 (accelerate's FSDP path forced on CPU, as DPO's tests do): generation from the sharded policy, a
    sharded frozen reference (beta > 0), the update; the same completions and weights as one plain process."""
    from _train_worker import make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    two = {**_spec(tmp_path, "two", model_dir, max_steps=2), "fsdp_on_cpu": True}
    one = _spec(tmp_path, "one", model_dir, max_steps=2, gradient_accumulation_steps=2)
    for spec, procs, env in ((two, 2, FSDP_ENV), (one, 1, None)):
        path = tmp_path / f"{Path(spec['out']).stem}.json"
        path.write_text(json.dumps(spec))
        _run([str(WORKER), str(path)], procs, env)
    assert "FSDP" in json.loads(Path(two["out"] + ".json").read_text())["distributed_type"]
    w2, w1 = torch.load(two["out"]), torch.load(one["out"])
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "reward", "kl"):
        assert [r[key] for r in rows2] == pytest.approx([r[key] for r in rows1], abs=1e-5), key
