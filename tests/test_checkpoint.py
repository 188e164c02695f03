"""Atomic checkpoints, rotation after completion, what a checkpoint holds, RNG restore, safe loading."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_worker import tiny_trainer  # noqa: E402

from preftune import checkpoint as ckpt  # noqa: E402
from preftune.config import ConfigError, DPOConfig  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run saving every 2 steps, keeping 1 checkpoint."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = tiny_trainer(out, save_total_limit=1)
    trainer.train()
    return trainer, out


def test_checkpoint_contents_and_rotation(trained):
    _, out = trained
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    assert not (out / "checkpoint-2").exists()
    c = out / "checkpoint-4"
    for name in ("COMPLETE", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json", "config.yaml",
                 "versions.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (c / name).is_file(), name
    assert not list((c / "model").glob("*.bin")), "weights must be safetensors"
    state = json.loads((c / "preftune_state.json").read_text())
    assert state["global_step"] == 4 and state["samples_seen"] == 8
    assert json.loads((c / "trainer_state.json").read_text())["global_step"] == 4  # transformers' TrainerState
    versions = json.loads((c / "versions.json").read_text())
    assert {"python", "torch", "transformers", "accelerate", "preftune"} <= versions.keys()
    assert versions["torch"] == torch.__version__
    config = DPOConfig.from_yaml(str(c / "config.yaml"))  # the resolved config reloads as it was
    assert config.max_steps == 4 and config.save_total_limit == 1 and config.seed == 3


def _card_tags(folder: Path) -> list[str]:
    from huggingface_hub import ModelCard

    return list(ModelCard.load(folder / "README.md").data.tags or [])


def test_saved_models_carry_preftune_and_the_algorithm_as_tags(trained, tmp_path):
    """As TRL's trainers tag theirs (model.add_model_tags): the checkpoint's model and save_model's folder."""
    trainer, out = trained
    assert {"preftune", "dpo"} <= set(_card_tags(out / "checkpoint-4" / "model"))
    final = trainer.save_model(tmp_path / "final")
    assert {"preftune", "dpo"} <= set(_card_tags(final))
    assert {"preftune", "dpo"} <= set(trainer.accelerator.unwrap_model(trainer.model).model_tags)


def test_adapter_model_card_carries_the_tags(tmp_path):
    """A LoRA adapter's README.md is peft's own card, with the base model's tags in it."""
    from peft import LoraConfig

    from preftune.models import apply_peft
    from preftune.testing import tiny_model, tiny_tokenizer

    adapter = apply_peft(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ckpt.save_pretrained_atomic(adapter, tiny_tokenizer(), tmp_path / "adapter", tags=["preftune", "dpo"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert {"preftune", "dpo", "lora"} <= set(_card_tags(tmp_path / "adapter"))


def test_partial_checkpoints_are_never_latest(trained, tmp_path):
    _, src = trained
    out = tmp_path / "run"
    shutil.copytree(src / "checkpoint-4", out / "checkpoint-4")
    shutil.copytree(src / "checkpoint-4", out / "checkpoint-8")  # newer, but its marker is missing
    (out / "checkpoint-8" / "COMPLETE").unlink()
    shutil.copytree(src / "checkpoint-4", out / ".tmp-checkpoint-12-999")  # a temp dir, marker included
    (out / "checkpoint-junk").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    for spec in ("latest", "last", True):
        assert ckpt.resolve_checkpoint(out, spec).name == "checkpoint-4"
    with pytest.raises(ckpt.CheckpointError, match="no COMPLETE marker"):
        ckpt.resolve_checkpoint(out, str(out / "checkpoint-8"))
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty", "latest")


def test_rotation_deletes_old_checkpoints_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "run"
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):
        path = Path(path)
        if path.name.startswith("checkpoint-"):
            newest = out / f"checkpoint-{int(path.name.split('-')[1]) + 1}"
            deleted.append((path.name, (newest / "COMPLETE").is_file()))
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    tiny_trainer(out, max_steps=3, save_steps=1, save_total_limit=1).train()
    assert deleted == [("checkpoint-1", True), ("checkpoint-2", True)]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]


def test_rng_state_loads_with_weights_only_and_restores_exactly(tmp_path):
    random.seed(11)
    torch.manual_seed(12)
    torch.save(ckpt._rng_state(), tmp_path / "rng_state.pt")
    want = ([random.random() for _ in range(3)], torch.rand(3))
    random.seed(0)
    torch.manual_seed(0)
    state = torch.load(tmp_path / "rng_state.pt", weights_only=True)  # no arbitrary unpickling
    ckpt._set_rng_state(ckpt._load_rng_state(tmp_path / "rng_state.pt"))
    assert [random.random() for _ in range(3)] == want[0]
    assert torch.equal(torch.rand(3), want[1])
    assert isinstance(state["torch"], torch.Tensor)


def test_a_pickle_payload_in_rng_state_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"python": Evil(), "torch": torch.get_rng_state()}, tmp_path / "rng_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="rng_state.pt"):
        ckpt._load_rng_state(tmp_path / "rng_state.pt")


def test_resume_in_process_restores_weights_optimizer_and_position(trained, tmp_path):
    trainer, out = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-4")
    resumed = tiny_trainer(run, max_steps=4, save_total_limit=1, seed=99)  # other init seed: weights must load
    resumed.train(resume_from_checkpoint="latest")
    assert resumed.state.global_step == 4 and resumed.train_state.samples_seen == 8
    for (name, p), q in zip(trainer.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_truncate_metrics_by_step_and_by_line_count(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_loss": 1}, {"step": 2, "loss": 1}, {"step": 2, "eval_loss": 1}, {"step": 3, "loss": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # a torn last line
    ckpt.truncate_metrics(path, 3)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows
    ckpt.truncate_metrics(path, 2, lines=2)  # the eval row at step 2 came after the checkpoint
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:2]
    ckpt.truncate_metrics(path, 0, lines=0)
    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------- security
def test_yaml_config_refuses_python_tags(tmp_path):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("max_steps: 3\nrun_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as e:
        DPOConfig.from_yaml(str(cfg))
    assert "evil.yaml" in str(e.value)


def test_models_load_safetensors_only_and_no_remote_code_by_default(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from preftune import models
    from preftune.testing import tiny_model

    assert DPOConfig().trust_remote_code is False and DPOConfig().allow_pickle is False
    pickled = tmp_path / "pickled"
    model = tiny_model(300)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        models.load_model(pickled)
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model(pickled, allow_pickle=True)  # an explicit opt-in loads it
    assert seen["trust_remote_code"] is False
    safe = tmp_path / "safe"
    tiny_model(300).save_pretrained(safe)
    models.load_model(safe)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


@pytest.mark.parametrize("use_peft", [False, True])
def test_tr_dpo_reference_state_is_saved_and_restored(tmp_path, use_peft):
    """The TR-DPO reference (a frozen copy, or the LoRA 'ref' adapter) drifts from the start: a resume
    must restore it, not rebuild it from the initial weights."""
    kw = dict(max_steps=2, save_steps=2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
              use_peft=use_peft, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    first = tiny_trainer(tmp_path / "run", **kw)
    first.train()
    sd = ckpt._reference_state(first.reference)
    assert sd and (tmp_path / "run" / "checkpoint-2" / "reference.safetensors").is_file()
    second = tiny_trainer(tmp_path / "run", **kw)
    second.reference = second._build_reference()
    fresh = {k: v.clone() for k, v in ckpt._reference_state(second.reference).items()}
    assert any(not torch.equal(fresh[k], sd[k]) for k in sd), "the synced reference should differ from a new one"
    second.train(resume_from_checkpoint="latest")
    for k, v in ckpt._reference_state(second.reference).items():
        assert torch.equal(v, sd[k]), k
