"""Kill a real `preftune train` subprocess with SIGKILL and resume it: same weights, metrics, data order.

Every run trains a tiny random Llama (saved to tmp_path as safetensors) on CPU with one thread and a
fixed seed, so an interrupted-and-resumed run must match the uninterrupted one bitwise. The runs use
TR-DPO (the reference is mixed toward the policy every 2 steps: its state must survive a restart),
a logging window of 2 steps that straddles the checkpoints every 3 steps, evaluation every 4 steps and
`save_total_limit 1`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_worker import make_model_dir, pair_rows, write_jsonl  # noqa: E402

from preftune import checkpoint as ckpt  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_train_worker.py"
ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"pairs_per_second", "tokens_per_second"}
MAX_STEPS = 9


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_inputs")
    return {
        "model": make_model_dir(d / "model"),
        "train": write_jsonl(d / "train.jsonl", pair_rows(20)),
        "eval": write_jsonl(d / "eval.jsonl", pair_rows(4, seed=9)),
    }


def flags(inputs, out: Path, resume: bool) -> list[str]:
    f = [
        "--model_name_or_path", str(inputs["model"]), "--dataset", str(inputs["train"]),
        "--eval_dataset", str(inputs["eval"]), "--output_dir", str(out), "--max_steps", str(MAX_STEPS),
        "--per_device_train_batch_size", "2", "--save_steps", "3", "--save_total_limit", "1",
        "--logging_steps", "2", "--eval_strategy", "steps", "--eval_steps", "4",
        "--sync_ref_model", "true", "--ref_model_sync_steps", "2", "--ref_model_mixup_alpha", "0.5",
        "--use_cpu", "true", "--learning_rate", "1e-2", "--report_to", "none", "--seed", "3",
    ]  # fmt: skip
    return f + (["--resume_from_checkpoint", "latest"] if resume else [])


def run_worker(inputs, out: Path, *, resume: bool, kill_at: str | None = None, sleep: float = 0.0,
               stdout=None):  # fmt: skip
    """Run the worker to its end (or death); with `stdout` (a file), start it and return the Popen."""
    env = {**os.environ, "PREFTUNE_ORDER_FILE": str(out.parent / f"{out.name}.order.jsonl"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}  # fmt: skip
    env.pop("PREFTUNE_KILL_AT", None)
    if kill_at:
        env["PREFTUNE_KILL_AT"] = kill_at
    if sleep:
        env["PREFTUNE_STEP_SLEEP"] = str(sleep)
    cmd = [sys.executable, str(WORKER), *flags(inputs, out, resume)]
    if stdout is not None:
        return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def metrics_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def data_order(out: Path) -> dict[int, list]:
    """Step -> pair indices of the last attempt at that step (a killed attempt is redone on resume)."""
    order = {}
    for line in (out.parent / f"{out.name}.order.jsonl").read_text().splitlines():
        rec = json.loads(line)
        order[rec["step"]] = rec["pairs"]
    return order


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"weight {k} differs after resume"
    assert metrics_rows(out) == metrics_rows(ref)
    assert data_order(out) == data_order(ref)


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_ref") / "run"
    r = run_worker(inputs, out, resume=False)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [row["step"] for row in metrics_rows(out) if "loss" in row]
    assert steps == [2, 4, 6, 8, 9]
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{MAX_STEPS}"]
    return out


def kill_from_outside(inputs, out: Path) -> None:
    """Start a slowed-down run, wait for its first checkpoint, then SIGKILL it wherever it is."""
    log = open(out.parent / "outside.log", "w")
    proc = run_worker(inputs, out, resume=False, sleep=0.25, stdout=log)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not ckpt.list_checkpoints(out) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_killed_at_many_points_then_resumed_matches_uninterrupted(inputs, uninterrupted, tmp_path):
    out = tmp_path / "run"
    # 1. from outside, at an arbitrary moment after the first checkpoint (usually mid-step 4 or 5)
    kill_from_outside(inputs, out)
    last = ckpt.resolve_checkpoint(out, "latest")
    done = int(last.name.split("-")[1])
    assert done in (3, 6, 9)
    nxt = min(done + 3, MAX_STEPS)

    # 2. inside the write of the next checkpoint: every file in the temporary directory, no marker
    r = run_worker(inputs, out, resume=True, kill_at=f"save:{nxt}")
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert list(out.glob(f".tmp-checkpoint-{nxt}-*")), "the kill should leave a partial checkpoint behind"
    assert ckpt.resolve_checkpoint(out, "latest") == last, "a partial checkpoint must never be the latest"
    assert max(row["step"] for row in metrics_rows(out)) == nxt  # rows the resume must drop again

    # 3. the checkpoint renamed into place, killed before rotation deletes the older one
    r = run_worker(inputs, out, resume=True, kill_at=f"rotate:{nxt}")
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert [p.name for p in ckpt.list_checkpoints(out)] == [last.name, f"checkpoint-{nxt}"]

    # 4. after the last checkpoint and the final evaluation row, before the final model is saved
    r = run_worker(inputs, out, resume=True, kill_at=f"evallog:{MAX_STEPS}")
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert ckpt.resolve_checkpoint(out, "last").name == f"checkpoint-{MAX_STEPS}"
    if nxt < MAX_STEPS:
        assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{MAX_STEPS}"]
        assert not list(out.glob(".tmp-checkpoint-*")), "rotation should clear stale partial checkpoints"

    # 5. resume from the final checkpoint: nothing left to train, the final evaluation is not doubled
    r = run_worker(inputs, out, resume=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(out, uninterrupted)
