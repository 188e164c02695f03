"""`preftune merge`: a LoRA run's adapters merged into a plain model whose logits equal the adapter model's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _train_worker import make_model_dir, write_jsonl
from safetensors import safe_open

from preftune import cli
from preftune.data.demo import demo_dataset
from preftune.merge import merge_run
from preftune.testing import tiny_tokenizer


def _train(root, name: str, *extra: str):
    out = root / name
    argv = ["train", "--model", str(root / "model"), "--dataset", str(root / "train.jsonl"), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--max_length", "128", "--learning_rate", "1e-2",
            "--save_strategy", "no", "--report_to", "none", "--cache_dir", str(root / "cache"), "--output_dir",
            str(out), *extra]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny model saved to disk, and two 2-step runs on it: LoRA and full fine-tuning."""
    root = tmp_path_factory.mktemp("merge")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", demo_dataset("train", n=4))
    return root, _train(root, "lora", "--use_peft", "--lora_r", "4"), _train(root, "full")


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_loads_without_peft_and_matches_the_adapters(runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, lora, _ = runs
    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", str(lora), "--out", str(merged_dir)]) == 0
    assert str(merged_dir.resolve()) in capsys.readouterr().out

    files = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files and not any(".bin" in f for f in files)
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM" and not isinstance(merged, PeftModel)
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "model"), str(lora))
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(adapted, ids)
    assert (want - _logits(base, ids)).abs().max() > 1e-3  # the adapters change the model: the check can fail
    torch.testing.assert_close(_logits(merged, ids), want, atol=2e-5, rtol=1e-5)

    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok("hello").input_ids == tiny_tokenizer()("hello").input_ids

    card = (merged_dir / "README.md").read_text()
    head = yaml.safe_load(card.split("---\n")[1])
    assert head["library_name"] == "transformers" and "lora" not in head["tags"] and "dpo" in head["tags"]
    assert "merged into the base weights" in card and str(root / "model") in card and "`merged_dtype`" in card
    assert "Final training metrics" in card


def test_merge_in_bfloat16_and_a_base_named_by_hand(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    root, lora, _ = runs
    out = merge_run(lora, tmp_path / "bf16", base_model=str(root / "model"), dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(FileExistsError, match="not an empty folder"):
        merge_run(lora, out)
    merge_run(lora, out, overwrite=True)  # what a merge at the end of every save does
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not list(tmp_path.glob(".tmp-*"))


def test_refusals_say_what_the_folder_holds(runs, tmp_path, capsys):
    root, lora, full = runs
    assert cli.main(["merge", str(full), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "holds a full model, not LoRA adapters" in err and "nothing to merge" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["merge", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 1
    assert "has no LoRA adapters" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"")
    assert cli.main(["merge", str(pickled), "--out", str(tmp_path / "c")]) == 1
    assert "safetensors only" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert cli.main(["merge", str(lora), "--out", str(tmp_path / "taken")]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_run_without_a_base_model_asks_for_one(runs, tmp_path):
    _, lora, _ = runs
    bare = tmp_path / "bare"
    bare.mkdir()
    adapter = json.loads((lora / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": None}))
    (bare / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="--base_model"):
        merge_run(bare, tmp_path / "out")
