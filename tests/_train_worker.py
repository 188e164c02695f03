"""A `preftune train` subprocess for the kill-and-resume tests, plus the tiny fixtures they share.

Run as ``python tests/_train_worker.py <train flags...>``. Environment hooks (all optional):

- ``PREFTUNE_KILL_AT=<where>:<step>`` sends SIGKILL to this very process at a chosen point:
  ``step`` after the backward of optimizer step <step> (before the update), ``log`` / ``evallog``
  right after a train / eval metrics row of step <step> was appended, ``save`` inside the checkpoint write of step <step>
  (every file is in the temporary directory but the COMPLETE marker is not), ``rotate`` after the
  checkpoint of step <step> was renamed into place but before old ones are rotated out.
- ``PREFTUNE_ORDER_FILE=<path>``: appends one JSON line ``{"step", "pairs"}`` per optimizer step
  (the pair indices it trains on), so the tests can compare data order across restarts.
- ``PREFTUNE_STEP_SLEEP=<seconds>``: sleep after each optimizer step (for kills from outside).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama and its byte-level tokenizer saved as safetensors under `path`."""
    from preftune.testing import tiny_model, tiny_tokenizer

    path = Path(path)
    tiny_model(300, seed=seed).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """n distinct, valid standard-format preference rows (short, so steps are fast)."""
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea"]
    rows = []
    for i in range(n):
        w = rng.sample(words, 3)
        rows.append({"prompt": f"Q{i}: say {w[0]}?", "chosen": f" {w[0]} {w[1]}.", "rejected": f" {w[2]} no {i}."})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli_train(model_dir, data, out, *extra, max_steps: int = 2) -> int:
    """`preftune train` in-process on a tiny model: 2 pairs per step, CPU, no trackers."""
    from preftune.cli import main as cli_main

    return cli_main(["train", "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
                     "--max_steps", str(max_steps), "--per_device_train_batch_size", "2", "--use_cpu", "true",
                     "--report_to", "none", *extra])  # fmt: skip


def tiny_trainer(output_dir: Path, rows: list | None = None, *, model=None, tokenizer=None, **config):
    """An in-process DPOTrainer on a tiny random Llama (CPU, fixed seed) for fast tests."""
    from preftune.config import DPOConfig
    from preftune.testing import tiny_model, tiny_tokenizer
    from preftune.trainer import DPOTrainer

    kw = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, save_steps=2,
              logging_steps=1, use_cpu=True, learning_rate=1e-2, report_to=["none"], seed=3)
    kw.update(config)
    return DPOTrainer(model=model if model is not None else tiny_model(300),
                      args=DPOConfig(**kw), train_dataset=rows if rows is not None else pair_rows(8),
                      processing_class=tokenizer if tokenizer is not None else tiny_tokenizer())


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_hooks() -> None:
    """Patch preftune in this process according to the environment (see the module docstring)."""
    from preftune import checkpoint as ckpt
    from preftune import trainer as tr

    kill = os.environ.get("PREFTUNE_KILL_AT")
    where, at = (kill.split(":")[0], int(kill.split(":")[1])) if kill else (None, -1)
    order_file = os.environ.get("PREFTUNE_ORDER_FILE")
    sleep = float(os.environ.get("PREFTUNE_STEP_SLEEP", "0") or 0)
    counter = {"step": 0}

    orig_load = ckpt.load_checkpoint

    def load_checkpoint(path, trainer, accelerator):
        state = orig_load(path, trainer, accelerator)
        counter["step"] = state.global_step
        return state

    ckpt.load_checkpoint = load_checkpoint

    orig_step = tr.DPOTrainer._optimizer_step

    def _optimizer_step(self, micro, plan, window, **kw):
        counter["step"] += 1
        if order_file:
            with open(order_file, "a") as f:
                f.write(json.dumps({"step": counter["step"], "pairs": micro}) + "\n")
        out = orig_step(self, micro, plan, window, **kw)
        if where == "step" and counter["step"] == at:
            _die()
        if sleep:
            time.sleep(sleep)
        return out

    tr.DPOTrainer._optimizer_step = _optimizer_step

    orig_log = tr.DPOTrainer._log

    def _log(self, run, row):
        orig_log(self, run, row)
        is_eval = any(k.startswith("eval_") for k in row)
        if int(row["step"]) == at and (where == "log" and not is_eval or where == "evallog" and is_eval):
            _die()

    tr.DPOTrainer._log = _log

    orig_fsync_tree = ckpt._fsync_tree

    def _fsync_tree(path):
        orig_fsync_tree(path)
        if where == "save" and Path(path).name.startswith(f".tmp-checkpoint-{at}-"):
            _die()

    ckpt._fsync_tree = _fsync_tree

    orig_rotate = ckpt._rotate

    def _rotate(output_dir, limit, keep, **kw):
        if where == "rotate" and Path(keep).name == f"checkpoint-{at}":
            _die()
        return orig_rotate(output_dir, limit, keep, **kw)

    ckpt._rotate = _rotate


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    install_hooks()
    from preftune.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
