"""`preftune` commands run in-process through `preftune.cli.main` on a tiny model saved to disk."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from preftune import cli
from preftune.data.demo import demo_dataset
from preftune.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model + tokenizer, small train/eval JSONL files and a YAML config using them."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model(300).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for split, n in (("train", 8), ("eval", 4)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in demo_dataset(split, n=n):
                f.write(json.dumps(row) + "\n")
    config = dict(model_name_or_path=str(root / "model"), dataset_name=str(root / "train.jsonl"),
                  eval_dataset=str(root / "eval.jsonl"), beta=0.1, max_steps=1, per_device_train_batch_size=2,
                  per_device_eval_batch_size=4, max_length=160, max_prompt_length=96, save_strategy="no",
                  logging_steps=1, learning_rate=1e-3, report_to=["none"], cache_dir=str(root / "cache"),
                  eval_strategy="steps", eval_steps=1)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_flags_override_yaml(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(workdir / "run.yaml"), "--beta", "0.2", "--output_dir", str(out)])
    assert rc == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["beta"] == 0.2  # the flag wins over the file's 0.1
    assert resolved["max_length"] == 160  # the file wins over the default
    assert (out / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("eval_loss" in r for r in rows)
    out_text = capsys.readouterr().out
    assert "trained model:" in out_text and "reward accuracy" in out_text


def test_precompute_ref_then_reuse(workdir, tmp_path, capsys, caplog):
    argv = ["precompute-ref", "--config", str(workdir / "run.yaml"), "--output_dir", str(tmp_path / "pre")]
    assert cli.main(argv) == 0
    assert "reference log-probs cached for 8 train pairs and 4 eval pairs" in capsys.readouterr().out
    caplog.set_level(logging.INFO, logger="preftune")
    assert cli.main(argv) == 0
    assert "reusing reference log-probs" in caplog.text


def test_losses_lists_every_loss(capsys):
    from preftune.losses import LOSSES

    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in LOSSES)


def test_data_demo_writes_jsonl(tmp_path, capsys):
    assert cli.main(["data", "demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for split in ("train", "eval"):
        path = tmp_path / "demo" / f"{split}.jsonl"
        assert str(path) in out
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert rows == demo_dataset(split)


def test_train_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--beta", "--loss_type", "--per_device_train_batch_size", "--precompute_ref_log_probs",
                 "--config"):
        assert flag in out
    assert "KL-to-reference" in out  # the field's help text


def test_unknown_flag_is_an_error_with_a_suggestion(capsys):
    assert cli.main(["train", "--bogus_flag", "1"]) == 1
    err = capsys.readouterr().err
    assert "--bogus_flag" in err and "error" in err
    assert cli.main(["train", "--bet", "0.2"]) == 1
    assert "--beta" in capsys.readouterr().err


def test_bad_value_names_the_field(workdir, capsys):
    assert cli.main(["train", "--config", str(workdir / "run.yaml"), "--beta", "-1"]) == 1
    assert "beta" in capsys.readouterr().err


def test_unknown_command_and_usage(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "preftune <command>" in capsys.readouterr().out


def test_what_trl_users_type_trains(workdir, tmp_path):
    """`--max_length 128` alone (no prompt limit of its own, as in TRL), LoRA on `all-linear` and
    `--report_to none`, typed as TRL's documentation spells them, train and reach the saved adapter."""
    out = tmp_path / "trl"
    argv = ["train", "--model", str(workdir / "model"), "--dataset", str(workdir / "train.jsonl"),
            "--max_length", "128", "--use_peft", "--lora_target_modules", "all-linear", "--report_to", "none",
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
            "--cache_dir", str(workdir / "cache"), "--output_dir", str(out)]
    assert cli.main(argv) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["max_length"], resolved["max_prompt_length"], resolved["report_to"]) == (128, None, ["none"])
    adapter = json.loads(next(out.rglob("adapter_config.json")).read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # peft saves the resolved names
    assert adapted == {"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}


def test_trl_fields_preftune_refuses_name_the_alternative(capsys):
    assert cli.main(["train", "--padding_value", "0"]) == 1
    err = capsys.readouterr().err
    assert "'padding_value' is not a DPOConfig field" in err and "tokenizer.pad_token" in err
    assert cli.main(["train", "--generate_during_eval", "true"]) == 1
    assert "preftune eval" in capsys.readouterr().err


def _eval_steps(out) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "eval_loss" in r]


def test_eval_dataset_on_the_command_line_is_evaluated_at_the_end(workdir, tmp_path):
    """--eval_dataset without --eval_strategy: evaluated after the last step; --eval_strategy no: never."""
    base = ["train", "--model_name_or_path", str(workdir / "model"), "--dataset_name", str(workdir / "train.jsonl"),
            "--eval_dataset", str(workdir / "eval.jsonl"), "--max_steps", "2", "--max_length", "160",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
            "--cache_dir", str(workdir / "cache")]
    assert cli.main([*base, "--output_dir", str(tmp_path / "end")]) == 0
    assert _eval_steps(tmp_path / "end") == [2]
    assert cli.main([*base, "--output_dir", str(tmp_path / "no"), "--eval_strategy", "no"]) == 0
    assert _eval_steps(tmp_path / "no") == []
    assert cli.main([*base, "--output_dir", str(tmp_path / "start"), "--eval_on_start", "true",
                     "--eval_strategy", "steps", "--eval_steps", "1"]) == 0
    assert _eval_steps(tmp_path / "start") == [0, 1, 2]


def test_disable_tqdm_hides_the_progress_bar(workdir, tmp_path, capsys):
    argv = ["train", "--config", str(workdir / "run.yaml"), "--output_dir", str(tmp_path / "bar")]
    assert cli.main(argv) == 0
    assert "dpo: 100%" in capsys.readouterr().err
    assert cli.main([*argv[:-1], str(tmp_path / "nobar"), "--disable_tqdm", "true"]) == 0
    assert "dpo:" not in capsys.readouterr().err
