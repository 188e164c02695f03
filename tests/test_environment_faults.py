"""Environment faults: unwritable output directory, a disk that fills up mid-save, a missing model, a
tokenizer without a chat template or without a pad token. Each is a clear message saying what to do, and
the previous checkpoint stays usable."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_worker import cli_train, make_model_dir, pair_rows, tiny_trainer, write_jsonl  # noqa: E402

from preftune import checkpoint as ckpt  # noqa: E402
from preftune.testing import tiny_model, tiny_tokenizer  # noqa: E402

CONV = [{"prompt": [{"role": "user", "content": f"q{i}?"}], "chosen": [{"role": "assistant", "content": f" yes {i}."}],
         "rejected": [{"role": "assistant", "content": f" no {i}!"}]} for i in range(8)]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("envfaults") / "model")



def test_output_dir_under_a_regular_file_fails_before_training(model_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    steps = []
    from preftune import trainer as tr

    real = tr.DPOTrainer._optimizer_step
    monkeypatch.setattr(tr.DPOTrainer, "_optimizer_step", lambda self, *a: steps.append(1) or real(self, *a))
    assert cli_train(model_dir, data, blocker / "out") == 1
    err = capsys.readouterr().err
    assert f"output_dir {blocker / 'out'} is not writable" in err and "--output_dir" in err
    assert "Traceback" not in err and not steps


def test_full_disk_at_the_probe_is_reported(tmp_path, monkeypatch):
    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*--output_dir"):
        ckpt.check_writable(tmp_path / "out")


def test_disk_full_mid_save_keeps_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **kw):  # the disk fills up while the optimizer state of checkpoint-4 is written
        if str(f).endswith("optimizer.pt") and ".tmp-checkpoint-4-" in str(f):
            Path(f).write_bytes(b"\0" * 10)  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    trainer = tiny_trainer(out, max_steps=4, save_steps=2, save_total_limit=1)
    with pytest.raises(ckpt.CheckpointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "checkpoint-4" in msg and "No space left on device" in msg and "previous checkpoint is untouched" in msg
    assert "resume_from_checkpoint latest" in msg
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".tmp-checkpoint-*")), "the partial checkpoint must be cleaned up"
    monkeypatch.setattr(torch, "save", real_save)  # space freed: resume from the surviving checkpoint
    resumed = tiny_trainer(out, max_steps=4, save_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint="latest")
    assert resumed.state.global_step == 4
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "preftune_state.json").read_text())
    assert state["global_step"] == 4 and state["samples_seen"] == 8


def test_disk_full_while_saving_the_final_model(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path / "run", max_steps=1, save_strategy="no")
    trainer.train()
    real_replace = ckpt.os.replace

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(ckpt.CheckpointError, match="could not save the model .*No space left"):
        trainer.save_model(tmp_path / "final")
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not list((tmp_path / "final").glob(".tmp-*"))


def test_missing_model_path(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    missing = tmp_path / "no" / "such_model"
    assert cli_train(missing, data, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"model path '{missing}' does not exist" in err and "config.json" in err and "Traceback" not in err


def test_tokenizer_without_chat_template_for_conversational_data(tmp_path, capsys):
    with pytest.raises(ValueError, match="chat template") as e:
        tiny_trainer(tmp_path / "run", CONV, tokenizer=tiny_tokenizer(chat_template=False))
    assert "chat_template" in str(e.value)  # says what to set
    model = tmp_path / "model"
    tiny_model(300).save_pretrained(model)
    tiny_tokenizer(chat_template=False).save_pretrained(model)
    data = write_jsonl(tmp_path / "conv.jsonl", CONV)
    assert cli_train(model, data, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "chat template" in err and "Traceback" not in err


def test_tokenizer_without_pad_token_uses_eos_and_without_eos_is_an_error(tmp_path):
    tok = tiny_tokenizer(pad_token=None)
    assert tok.pad_token is None
    trainer = tiny_trainer(tmp_path / "run", tokenizer=tok, max_steps=1, save_strategy="no")
    assert trainer.tokenizer.pad_token == trainer.tokenizer.eos_token == "<|im_end|>"
    trainer.train()
    bare = tiny_tokenizer(pad_token=None)
    bare.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token.*add_special_tokens"):
        tiny_trainer(tmp_path / "run2", tokenizer=bare)
