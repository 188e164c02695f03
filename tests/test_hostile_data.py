"""A corpus of hostile inputs through `preftune train`: each is a clear error naming file, line and field
(exit code 1, no traceback), or with `--bad_rows skip` a counted skip, a summary by reason, and
`<output_dir>/skipped_rows.jsonl`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_worker import cli_train, make_model_dir, pair_rows, tiny_trainer  # noqa: E402

GOOD = pair_rows(6)
USER = {"role": "user", "content": "hi"}


def conv(chosen, rejected, prompt=(USER,)):
    return {"prompt": list(prompt), "chosen": chosen, "rejected": rejected}


def ans(text):
    return [{"role": "assistant", "content": text}]


# name -> (line 2 of a .jsonl file (bytes), reason, words the message must contain); line 1 is valid
STANDARD = {
    "invalid_json": (b'{"prompt": "p", "chosen": ', "invalid_json", ["invalid JSON"]),
    "missing_field": (json.dumps({"prompt": "p", "chosen": "c"}).encode(), "missing_field", ["'rejected'"]),
    "null_field": (json.dumps({"prompt": "p", "chosen": None, "rejected": "r"}).encode(), "null_field", ["'chosen'", "null"]),
    "non_string": (json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"}).encode(), "non_string_content", ["'chosen'", "int"]),
    "empty_chosen": (json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}).encode(), "empty_response", ["'chosen'", "empty"]),
    "empty_rejected": (json.dumps({"prompt": "p", "chosen": "c", "rejected": ""}).encode(), "empty_response", ["'rejected'", "empty"]),
    "identical": (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode(), "identical_responses", ["identical"]),
    "not_utf8": (b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}', "not_utf8", ["UTF-8"]),
}  # fmt: skip
CONVERSATIONAL = {
    "unknown_role": (json.dumps(conv([{"role": "wizard", "content": "x"}], ans("r"))).encode(), "unknown_role", ["wizard", "chosen"]),
    "no_assistant": (json.dumps(conv([{"role": "user", "content": "x"}], ans("r"))).encode(), "no_assistant_turn", ["'chosen'", "assistant"]),
    "content_not_string": (json.dumps(conv([{"role": "assistant", "content": ["x"]}], ans("r"))).encode(), "non_string_content", ["content", "list"]),
}  # fmt: skip
GOOD_CONV = [conv(ans(f" yes {i}."), ans(f" no {i}!"), prompt=[{"role": "user", "content": f"q{i}?"}]) for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("hostile") / "model")


def train(model_dir, data, out, *extra) -> int:
    return cli_train(model_dir, data, out, "--save_strategy", "no", *extra, max_steps=1)


def write(path: Path, first: dict, bad: bytes, rest: list[dict]) -> Path:
    lines = [json.dumps(first).encode(), bad] + [json.dumps(r).encode() for r in rest]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("case", sorted(STANDARD) + sorted(CONVERSATIONAL))
def test_each_bad_row_is_a_clear_error_naming_file_line_and_field(case, model_dir, tmp_path, capsys):
    table, good = (STANDARD, GOOD) if case in STANDARD else (CONVERSATIONAL, GOOD_CONV)
    bad, _reason, words = table[case]
    data = write(tmp_path / f"{case}.jsonl", good[0], bad, good[1:])
    assert train(model_dir, data, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{data}:2" in err, err
    for w in words:
        assert w in err, (w, err)


def test_skip_mode_counts_every_bad_row_by_reason(model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    for table, good, name in ((STANDARD, GOOD, "std"), (CONVERSATIONAL, GOOD_CONV, "conv")):
        path = tmp_path / f"{name}.jsonl"
        lines = [json.dumps(r).encode() for r in good] + [bad for bad, _, _ in table.values()]
        path.write_bytes(b"\n".join(lines) + b"\n")
        with caplog.at_level(logging.WARNING):
            assert train(model_dir, path, out / name, "--bad_rows", "skip") == 0
        skipped = [json.loads(x) for x in (out / name / "skipped_rows.jsonl").read_text().splitlines()]
        assert sorted(s["reason"] for s in skipped) == sorted(reason for _, reason, _ in table.values())
        assert sorted(s["origin"] for s in skipped) == sorted(f"{path}:{i}" for i in range(7, 7 + len(table)))
        summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert summary, "the run must print a summary of skipped rows"
        for _, reason, _ in table.values():
            assert f"{reason}=" in summary[-1], summary[-1]
        assert f"skipped {len(table)} bad rows" in summary[-1]
        caplog.clear()


def test_empty_file_and_mixed_directory(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert train(model_dir, empty, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "empty" in err and "Traceback" not in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
    (mixed / "b.csv").write_text("prompt,chosen,rejected\np,c,r\n")
    assert train(model_dir, mixed, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "mixes formats" in err and "a.jsonl" in err and "b.csv" in err and "Traceback" not in err


def test_long_prompts_and_a_million_character_row(model_dir, tmp_path, caplog):
    """max_prompt_length truncates long prompts (keep_end keeps the part next to the reply); without it and
    with keep_start a prompt that leaves no room for the reply is dropped and counted as prompt_too_long."""
    rows = GOOD + [{"prompt": "x" * 1_000_000, "chosen": " a.", "rejected": " b."},
                   {"prompt": "y" * 300 + "END?", "chosen": " a.", "rejected": " b."}]  # fmt: skip
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train(model_dir, data, tmp_path / "out", "--max_length", "64", "--max_prompt_length", "32") == 0
    trainer = tiny_trainer(tmp_path / "a", rows, max_length=64, max_prompt_length=32)
    feats = trainer.train_split.features
    assert len(feats) == len(rows)
    assert all(len(f["prompt_ids"]) <= 32 and len(f["prompt_ids"]) + len(f["chosen_ids"]) <= 64 for f in feats)
    assert trainer.tokenizer.decode(feats[7]["prompt_ids"]).endswith("END?")
    with caplog.at_level(logging.WARNING):
        trainer = tiny_trainer(tmp_path / "b", rows, max_length=64, max_prompt_length=None,
                               truncation_mode="keep_start")
    assert len(trainer.train_split.features) == len(GOOD)
    assert any("dropped by truncation: prompt_too_long=2" in r.getMessage() for r in caplog.records)


def test_every_row_bad_in_skip_mode_is_a_clear_error(model_dir, tmp_path, capsys):
    data = tmp_path / "allbad.jsonl"
    data.write_bytes(b"\n".join(bad for bad, _, _ in STANDARD.values()) + b"\n")
    assert train(model_dir, data, tmp_path / "out", "--bad_rows", "skip") == 1
    err = capsys.readouterr().err
    assert "no usable preference pair" in err and "Traceback" not in err
