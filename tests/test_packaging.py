"""What ships around the code: the version, LICENSE, CHANGELOG, and gguf as an extra with a clear message."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import preftune
from preftune import cli, models

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_flag_prints_the_package_version(capsys):
    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"preftune {preftune.__version__}"
    assert preftune.__version__ == pyproject()["project"]["version"]
    assert "--version" in cli.USAGE


def test_license_is_the_one_pyproject_names():
    assert pyproject()["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) == 202  # the full text, not a pointer to it


def test_changelog_has_an_entry_for_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog") and "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(preftune.__version__)}\] - \d{{4}}-\d\d-\d\d$", text, re.M)


def test_gguf_is_an_extra_that_make_installs():
    project = pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.startswith("gguf")]
    assert project["optional-dependencies"]["gguf"] == ["gguf>=0.10"]
    assert "gguf" in _make_extras()


def _make_extras() -> set[str]:
    """The extras `make setup` installs (the `pip install -e ".[...]"` line of its .installed target)."""
    text = (ROOT / "Makefile").read_text()
    setup = text[text.index("$(VENV)/.installed:"):].split("\n\n")[0]
    found = re.findall(r'-e "\.\[([a-z0-9_,-]+)\]"', setup)
    assert len(found) == 1, found
    return set(found[0].split(","))


def test_deepspeed_is_an_extra_that_make_installs():
    """tests/test_deepspeed.py skips without it: `make test` (CI) installs it so the ZeRO tests run."""
    project = pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.startswith("deepspeed")]
    assert project["optional-dependencies"]["deepspeed"] == ["deepspeed>=0.19"]
    assert {"dev", "report", "gguf", "deepspeed"} <= _make_extras()


@pytest.fixture
def no_gguf(monkeypatch):
    """The gguf package not installed: its import fails as it would."""
    monkeypatch.setitem(sys.modules, "gguf", None)


MESSAGE = "pip install 'preftune[gguf]'"


def test_a_gguf_file_without_the_package_says_what_to_install(no_gguf, tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match=re.escape(MESSAGE)) as e:
        models.resolve_model_path(fake, cache_dir=tmp_path / "cache")
    assert str(fake) in str(e.value)
    assert not list((tmp_path / "cache" / "models").glob("m-*/config.json"))  # nothing half-converted left


def test_the_embedded_model_without_the_package_says_what_to_install(no_gguf, monkeypatch, tmp_path):
    fake = tmp_path / models.EMBEDDED_GGUF
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf_file", lambda: fake)
    with pytest.raises(ImportError, match=re.escape(MESSAGE)):
        models.embedded_model_path(tmp_path / "embedded")


def test_the_command_line_prints_it_as_an_error(no_gguf, tmp_path, capsys):
    from preftune.data.demo import demo_dataset

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_dataset("train", n=4)))
    argv = ["train", "--model", str(fake), "--dataset", str(tmp_path / "train.jsonl"), "--max_steps", "1",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "preftune train: error:" in err and MESSAGE in err


def test_a_safetensors_model_trains_without_the_package(no_gguf, tmp_path):
    """`pip install -e .` without the extra: a user's safetensors model loads and trains."""
    from preftune.data.demo import demo_dataset
    from preftune.testing import tiny_model, tiny_tokenizer

    tiny_model(300).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_dataset("train", n=4)))
    argv = ["train", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl"), "--max_steps",
            "1", "--per_device_train_batch_size", "2", "--max_length", "128", "--save_strategy", "no",
            "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and sys.modules["gguf"] is None
