"""push_to_hub: the saved folder uploaded through huggingface_hub (HfApi.create_repo / upload_folder recorded
in place of the hub, which these tests never reach); no token is an error before anything loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml

from preftune import DPOConfig, DPOTrainer, cli
from preftune.config_base import ConfigError
from preftune.data.demo import demo_dataset
from preftune.hub import HubUploadError
from preftune.testing import tiny_model, tiny_tokenizer

VOCAB = 300


@pytest.fixture
def no_stored_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no token file: huggingface_hub.get_token() finds nothing."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert huggingface_hub.get_token() is None


@pytest.fixture
def hub(monkeypatch, no_stored_token):
    """HfApi.create_repo / upload_folder replaced by recorders: what each call got, the token included, and
    the files of the uploaded folder at upload time (minus the ignore patterns' top-level names)."""
    calls = {"create_repo": [], "upload_folder": [], "fail": False, "fail_create": False}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        if calls["fail_create"]:
            raise PermissionError("403 forbidden")
        calls["create_repo"].append(dict(token=self.token, repo_id=repo_id, private=private, exist_ok=exist_ok, **kw))
        name = repo_id if "/" in repo_id else f"me/{repo_id}"  # the hub puts a bare name under the token's user
        return SimpleNamespace(repo_id=name)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, ignore_patterns=None, **kw):
        if calls["fail"]:
            raise OSError("connection refused")
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["upload_folder"].append(dict(token=self.token, repo_id=repo_id, folder_path=folder,
                                           commit_message=commit_message, revision=revision,
                                           ignore_patterns=ignore_patterns, files=files, **kw))
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def config(tmp_path, **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                save_strategy="no", max_length=160, max_prompt_length=96, learning_rate=1e-3, seed=0,
                report_to=["none"])
    return DPOConfig(**{**base, **kw})


def make_trainer(tmp_path, **kw) -> DPOTrainer:
    return DPOTrainer(model=tiny_model(VOCAB), args=config(tmp_path, **kw), train_dataset=demo_dataset("train", n=8),
                      processing_class=tiny_tokenizer())


def test_hub_fields_carry_transformers_names_and_defaults():
    c = DPOConfig(output_dir="x")
    assert (c.push_to_hub, c.hub_model_id, c.hub_token, c.hub_private_repo, c.hub_strategy, c.hub_revision,
            c.hub_always_push) == (False, None, None, None, "every_save", None, False)
    transformers = pytest.importorskip("transformers")
    import dataclasses

    hf = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    for name in ("push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_strategy", "hub_revision",
                 "hub_always_push"):
        assert getattr(c, name) == hf[name], name


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_checkpoint_strategies_are_refused_by_name(strategy):
    with pytest.raises(ConfigError) as e:
        DPOConfig(output_dir="x", push_to_hub=True, hub_strategy=strategy)
    assert f"hub_strategy={strategy!r}" in str(e.value) and "'end' or 'every_save'" in str(e.value)


def test_no_token_is_an_error_before_the_model_loads(tmp_path, no_stored_token, monkeypatch):
    import preftune.loop

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the token was checked")

    monkeypatch.setattr(preftune.loop, "load_policy", no_loading)
    with pytest.raises(ConfigError) as e:
        DPOTrainer(model=None, args=config(tmp_path, push_to_hub=True, hub_model_id="me/x"),
                   train_dataset=demo_dataset("train", n=8))
    text = str(e.value)
    assert "hub_token" in text and "hf auth login" in text and "HF_TOKEN" in text
    assert not (tmp_path / "out").exists()  # nothing was written either


def test_train_and_save_upload_the_folder_with_its_card(tmp_path, hub):
    t = make_trainer(tmp_path, push_to_hub=True, hub_model_id="me/x", hub_token="hf_secret", hub_private_repo=True,
                     hub_revision="dev", hub_strategy="end", save_strategy="steps", save_steps=1)
    t.train()
    assert hub["upload_folder"] == []  # hub_strategy='end': the checkpoints stay local
    out = t.save_model()
    assert hub["create_repo"] == [dict(token="hf_secret", repo_id="me/x", private=True, exist_ok=True)]
    (up,) = hub["upload_folder"]
    assert up["token"] == "hf_secret" and up["repo_id"] == "me/x" and up["revision"] == "dev"
    assert up["folder_path"] == out == Path(tmp_path / "out") and up["commit_message"] == "Model save"
    assert "README.md" in up["files"] and "model.safetensors" in up["files"] and "config.json" in up["files"]
    assert "checkpoint-*" in up["ignore_patterns"] and (out / "checkpoint-2").is_dir()
    assert "DPO" in (out / "README.md").read_text()


def test_every_save_pushes_each_checkpoints_model(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    t = make_trainer(tmp_path, push_to_hub=True, save_strategy="steps", save_steps=1)
    t.train()
    assert [c["repo_id"] for c in hub["create_repo"]] == ["out"]  # None = the output_dir's name
    assert [u["commit_message"] for u in hub["upload_folder"]] == ["Training in progress, step 1",
                                                                   "Training in progress, step 2"]
    for step, up in zip((1, 2), hub["upload_folder"]):
        assert up["token"] == "hf_env" and up["repo_id"] == "me/out"
        assert up["folder_path"] == tmp_path / "out" / f"checkpoint-{step}" / "model"
        assert "model.safetensors" in up["files"] and "optimizer.pt" not in up["files"]


def test_user_called_push_to_hub_with_push_to_hub_false(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    t = make_trainer(tmp_path)
    t.train()
    info = t.push_to_hub(commit_message="my commit", private=False, revision="v1")
    assert info.commit_url == "https://hub/me/out/commit/1"
    assert hub["create_repo"] == [dict(token="hf_env", repo_id="out", private=False, exist_ok=True)]
    (up,) = hub["upload_folder"]
    assert up["commit_message"] == "my commit" and up["revision"] == "v1" and up["repo_id"] == "me/out"
    assert "README.md" in up["files"] and "model.safetensors" in up["files"]  # push_to_hub saved first
    with pytest.raises(TypeError, match="model card"):
        t.push_to_hub(license="mit")


def test_user_called_push_without_any_token_names_the_field(tmp_path, hub):
    t = make_trainer(tmp_path)
    with pytest.raises(ConfigError, match="hub_token"):
        t.push_to_hub()
    assert hub["upload_folder"] == []


def test_a_failed_upload_keeps_the_saved_model_and_says_so(tmp_path, hub):
    t = make_trainer(tmp_path, push_to_hub=True, hub_model_id="me/x", hub_token="t", hub_strategy="end")
    t.train()
    hub["fail"] = True
    with pytest.raises(HubUploadError) as e:
        t.save_model()
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert str(out) in str(e.value) and "connection refused" in str(e.value) and "push_to_hub()" in str(e.value)


def test_a_failed_repository_creation_names_the_saved_folder(tmp_path, hub):
    t = make_trainer(tmp_path, push_to_hub=True, hub_model_id="me/x", hub_token="t", hub_strategy="end")
    t.train()
    hub["fail_create"] = True
    with pytest.raises(HubUploadError) as e:
        t.save_model()
    assert e.value.folder == tmp_path / "out" and (tmp_path / "out" / "model.safetensors").is_file()
    assert "403 forbidden" in str(e.value) and "hub_model_id" in str(e.value) and str(tmp_path / "out") in str(e.value)


def test_a_failed_checkpoint_push_is_logged_and_training_goes_on(tmp_path, hub, caplog):
    t = make_trainer(tmp_path, push_to_hub=True, hub_model_id="me/x", hub_token="t", save_strategy="steps",
                     save_steps=1)
    hub["fail"] = True
    t.train()
    assert t.state.global_step == 2 and (tmp_path / "out" / "checkpoint-2").is_dir()
    assert caplog.text.count("connection refused") == 2 and "training goes on" in caplog.text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubcli")
    tiny_model(VOCAB).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for row in demo_dataset("train", n=8):
            f.write(json.dumps(row) + "\n")
    config = dict(model_name_or_path=str(root / "model"), dataset_name=str(root / "train.jsonl"), max_steps=1,
                  per_device_train_batch_size=2, max_length=160, max_prompt_length=96, save_strategy="no",
                  logging_steps=1, report_to=["none"], cache_dir=str(root / "cache"))
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_cli_spelling_pushes_at_the_end(workdir, tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(workdir / "run.yaml"), "--output_dir", str(out),
                   "--push_to_hub", "true", "--hub_model_id", "me/x"])
    assert rc == 0
    (up,) = hub["upload_folder"]
    assert up["repo_id"] == "me/x" and up["folder_path"] == out and "README.md" in up["files"]
    assert yaml.safe_load((out / "config.yaml").read_text())["push_to_hub"] is True


def test_cli_without_a_token_fails_before_training(workdir, tmp_path, no_stored_token, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(workdir / "run.yaml"), "--output_dir", str(out),
                   "--push_to_hub", "true", "--hub_model_id", "me/x"])
    assert rc == 1
    assert "hub_token" in capsys.readouterr().err and not (out / "metrics.jsonl").exists()


def test_cli_upload_failure_reports_the_run_and_the_error(workdir, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    hub["fail"] = True
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(workdir / "run.yaml"), "--output_dir", str(out),
                   "--push_to_hub", "true", "--hub_model_id", "me/x"])
    captured = capsys.readouterr()
    assert rc == 1 and (out / "model.safetensors").is_file()
    assert "trained model:" in captured.out and "connection refused" in captured.err
