"""DPOConfig: defaults, the reference document's examples, validation messages, YAML and CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from typing import ClassVar

import pytest
import yaml

import preftune.config as config_mod
from preftune.config import ConfigError, DPOConfig
from preftune.config_base import Checks, TrainConfig, config_dataclass, config_field

# The reference document's main example (its section "DPO in TRL"), kwargs verbatim.
DOC_EXAMPLE = dict(
    output_dir="./dpo_output", beta=0.1, learning_rate=5e-7, loss_type="sigmoid", max_length=2048,
    max_prompt_length=1024, per_device_train_batch_size=2, gradient_accumulation_steps=8,
    gradient_checkpointing=True, bf16=True, num_train_epochs=1, warmup_ratio=0.1, logging_steps=10,
    eval_strategy="steps", eval_steps=200, save_strategy="steps", save_steps=500,
)

# The document's variant examples (f-DPO, robust, TR-DPO, EXO, NCA, RPO, SimPO), incl. its stray spaces.
DOC_VARIANTS = [
    dict(f_divergence_type="js_divergence ", beta=0.1),
    dict(f_divergence_type=" alpha_divergence ", f_alpha_divergence_coef=0.5, beta=0.1),
    dict(loss_type="robust", label_smoothing=0.1, beta=0.1),
    dict(loss_type="sigmoid", sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=512, beta=0.1),
    dict(loss_type="exo_pair", beta=0.1),
    dict(loss_type="nca_pair", beta=0.01),
    dict(loss_type="sigmoid", rpo_alpha=1.0, beta=0.1),
    dict(loss_type="simpo", simpo_gamma=0.5, beta=2.5),
]

LOSS_NAMES = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo"]


def test_defaults_are_the_documented_values():
    c = DPOConfig()
    expected = dict(
        beta=0.1, loss_type="sigmoid", learning_rate=1e-6, max_length=1024, max_prompt_length=None,
        max_completion_length=None, truncation_mode="keep_end", logging_steps=10, label_smoothing=0.0,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, sync_ref_model=False,
        ref_model_mixup_alpha=0.6, ref_model_sync_steps=512, rpo_alpha=None, ld_alpha=None, discopop_tau=0.05,
        loss_weights=None, reference_free=False, use_weighting=False, precompute_ref_log_probs=None,
        disable_dropout=True, padding_free=False, label_pad_token_id=-100, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, gradient_accumulation_steps=1, num_train_epochs=3.0, max_steps=-1,
        lr_scheduler_type="linear", warmup_ratio=0.0, warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, eval_strategy="no", eval_steps=None,
        save_strategy="steps", save_steps=500, save_total_limit=None, seed=42, fp16=False, bf16=None,
        gradient_checkpointing=False, push_to_hub=False, report_to=["none"],
        # preftune's own
        model_name_or_path=None, dataset_name=None, batch_layout="auto", logps_chunk_size=None, pad_to_multiple_of=None, cudnn_attention=None,
        bad_rows="error", dtype="auto", max_nonfinite_steps=10, allow_pickle=False, trust_remote_code=False,
        simpo_gamma=0.5, use_peft=False,
    )
    assert {k: getattr(c, k) for k in expected} == expected


def test_document_example_constructs_and_keeps_values():
    c = DPOConfig(**DOC_EXAMPLE)
    for k, v in DOC_EXAMPLE.items():
        assert getattr(c, k) == v, k
    assert c.global_batch_size(1) == 16  # the document's comment: "Effective batch = 16"


@pytest.mark.parametrize("kwargs", DOC_VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_document_variants_construct(kwargs):
    c = DPOConfig(**kwargs)
    assert c.beta == kwargs["beta"]
    assert c.f_divergence_type in config_mod.F_DIVERGENCES


def test_doc_variant_values_survive():
    c = DPOConfig(f_divergence_type=" alpha_divergence ", f_alpha_divergence_coef=0.5)
    assert (c.f_divergence_type, c.f_alpha_divergence_coef) == ("alpha_divergence", 0.5)
    c = DPOConfig(sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=512)
    assert (c.sync_ref_model, c.ref_model_mixup_alpha, c.ref_model_sync_steps) == (True, 0.6, 512)


def test_global_batch_matches_table_6_1():
    # Table 6.1: B_global = 64 from B_micro = 2 on one GPU with K = 32, or on 8 GPUs with K = 4 (eq. 6.13).
    assert DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=32).global_batch_size(1) == 64
    c = DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert c.global_batch_size(8) == 2 * 8 * 4 == 64
    line = c.describe_batch(8)
    assert "64 pairs" in line and "2 per device" in line and "8 processes" in line and "4 accumulation" in line
    assert "128 sequences" in line  # eq. 6.14: two sequences per pair
    assert "1 process " in c.describe_batch(1)


INVALID = [
    (dict(beta=0), "beta", "0"),
    (dict(beta=-1.5), "beta", "-1.5"),
    (dict(beta=float("nan")), "beta", "nan"),
    (dict(label_smoothing=0.5), "label_smoothing", "0.5"),
    (dict(loss_type="robust", label_smoothing=0.6), "label_smoothing", "0.6"),
    (dict(label_smoothing=-0.1), "label_smoothing", "-0.1"),
    (dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha", "1.5"),
    (dict(f_alpha_divergence_coef=-0.5), "f_alpha_divergence_coef", "-0.5"),
    (dict(f_divergence_type="kl"), "f_divergence_type", "'kl'"),
    (dict(truncation_mode="keep_middle"), "truncation_mode", "'keep_middle'"),
    (dict(batch_layout="ragged"), "batch_layout", "'ragged'"),
    (dict(dtype="float8"), "dtype", "'float8'"),
    (dict(bad_rows="ignore"), "bad_rows", "'ignore'"),
    (dict(eval_strategy="sometimes"), "eval_strategy", "'sometimes'"),
    (dict(lr_scheduler_type="cosin"), "lr_scheduler_type", "'cosin'"),
    (dict(optim="adafactor"), "optim", "'adafactor'"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps", "0"),
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size", "0"),
    (dict(max_prompt_length=1024, max_length=1024), "max_prompt_length", "1024"),
    (dict(max_length=0), "max_length", "0"),
    (dict(max_steps=0), "max_steps", "0"),
    (dict(learning_rate=-1e-5), "learning_rate", "-1e-05"),
    (dict(warmup_ratio=1.5), "warmup_ratio", "1.5"),
    (dict(adam_beta2=1.0), "adam_beta2", "1.0"),
    (dict(logging_steps=2.5), "logging_steps", "2.5"),
    (dict(ld_alpha=2.0), "ld_alpha", "2.0"),
    (dict(rpo_alpha=-1.0), "rpo_alpha", "-1.0"),
    (dict(discopop_tau=0), "discopop_tau", "0"),
    (dict(lora_dropout=1.0), "lora_dropout", "1.0"),
    (dict(eval_dataset=1.5), "eval_dataset", "1.5"),
    (dict(label_pad_token_id=0), "label_pad_token_id", "0"),
    (dict(hub_model_id="a/b/c"), "hub_model_id", "a/b/c"),
    (dict(hub_strategy="checkpoint"), "hub_strategy", "checkpoint"),
    (dict(report_to="tensorbord"), "report_to", "'tensorbord'"),
    (dict(beta="abc"), "beta", "'abc'"),
    (dict(gradient_checkpointing="maybe"), "gradient_checkpointing", "'maybe'"),
    (dict(max_length=10.5), "max_length", "10.5"),
    (dict(model_init_kwargs="{not json"), "model_init_kwargs", "'{not json'"),
    (dict(model_init_kwargs=[1]), "model_init_kwargs", "[1]"),
    (dict(loss_type="sigmoid,ipo", loss_weights=[1.0]), "loss_weights", "[1.0]"),
    (dict(loss_weights=[0.0]), "loss_weights", "[0.0]"),
    (dict(loss_weights="x"), "loss_weights", "'x'"),
    (dict(bf16=True, fp16=True), "bf16", "fp16=True"),
    (dict(dtype="float16", bf16=True), "dtype", "'float16'"),
    (dict(sync_ref_model=True, precompute_ref_log_probs=True), "sync_ref_model", "precompute_ref_log_probs"),
    (dict(padding_free=True, batch_layout="padded"), "padding_free", "'padded'"),
    (dict(lr_scheduler_type="cosine_with_min_lr"), "lr_scheduler_kwargs", "min_lr_rate"),
    (dict(report_to=["none", "tensorboard"]), "report_to", "'none'"),
    (dict(recompute_mlp=True, fused_layers=False), "recompute_mlp", "fused_layers=True"),
    (dict(recompute_mlp=True, gradient_checkpointing=True), "recompute_mlp", "gradient_checkpointing=True"),
    (dict(optim_in_backward=True), "max_grad_norm", "1.0"),
]


@pytest.mark.parametrize("kwargs,field,shown", INVALID, ids=[f"{f}-{s}" for _, f, s in INVALID])
def test_invalid_value_names_field_and_value(kwargs, field, shown):
    with pytest.raises(ConfigError) as info:
        DPOConfig(**kwargs)
    assert field in [f for f, _ in info.value.errors]
    message = dict(info.value.errors)[field]
    assert field in message and shown in message, message
    assert message in str(info.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        DPOConfig(beta=-1, label_smoothing=0.9, truncation_mode="x")
    assert {f for f, _ in info.value.errors} == {"beta", "label_smoothing", "truncation_mode"}
    with pytest.raises(ConfigError) as info:  # a type error still reports the bad choices beside it
        DPOConfig(beta="abc", truncation_mode="x")
    assert {f for f, _ in info.value.errors} == {"beta", "truncation_mode"}


def test_choice_error_lists_allowed_values_and_suggests():
    with pytest.raises(ConfigError, match="did you mean 'cosine'") as info:
        DPOConfig(lr_scheduler_type="cosin")
    assert "constant_with_warmup" in str(info.value) and "cosine_with_min_lr" in str(info.value)


def test_strings_from_yaml_or_cli_are_coerced():
    c = DPOConfig(beta="0.25", learning_rate="5e-7", bf16="true", gradient_checkpointing="no", max_length="2048",
                  max_steps="-1", eval_dataset="0.05", loss_type=" sigmoid ",
                  rpo_alpha="none", model_init_kwargs='{"attn_implementation": "sdpa"}', save_steps="50.0",
                  lora_target_modules="q_proj, v_proj", resume_from_checkpoint=True)
    assert (c.beta, c.learning_rate, c.bf16, c.gradient_checkpointing) == (0.25, 5e-7, True, False)
    assert c.loss_type == "sigmoid"
    assert (c.max_length, c.max_steps, c.eval_dataset, c.rpo_alpha) == (2048, -1, 0.05, None)
    assert type(c.max_length) is int and type(c.save_steps) is int and c.save_steps == 50
    assert c.model_init_kwargs == {"attn_implementation": "sdpa"}
    assert c.lora_target_modules == ["q_proj", "v_proj"]
    assert c.resume_from_checkpoint == "last"
    assert DPOConfig(eval_dataset="test").eval_dataset == "test"
    assert DPOConfig(num_train_epochs=1).num_train_epochs == 1.0
    assert type(DPOConfig(num_train_epochs=1).num_train_epochs) is float


def test_enum_like_f_divergence_and_case_insensitive_choices():
    class Member:
        value = "js_divergence"

    assert DPOConfig(f_divergence_type=Member()).f_divergence_type == "js_divergence"
    assert DPOConfig(lr_scheduler_type="Cosine").lr_scheduler_type == "cosine"
    assert DPOConfig(f_divergence_type="alpha-divergence").f_divergence_type == "alpha_divergence"


def test_loss_type_forms():
    assert DPOConfig(loss_type="sigmoid").loss_types == ["sigmoid"]
    c = DPOConfig(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8, 0.2, 1.0")
    assert c.loss_type == ["sigmoid", "bco_pair", "sft"] and c.loss_weights == [0.8, 0.2, 1.0]
    assert DPOConfig(loss_type=["ipo"]).loss_type == "ipo"  # a one-item list reads as the name
    assert DPOConfig(loss_type=["sigmoid", "sft"]).resolved_loss_weights == [1.0, 1.0]


def test_unknown_loss_name_suggests():
    with pytest.raises(ConfigError, match="loss_type='sigmoidd'.*did you mean 'sigmoid'"):
        DPOConfig(loss_type="sigmoidd")
    with pytest.raises(ConfigError, match="'kto_pair'"):
        DPOConfig(loss_type="sigmoid,kto_pair", loss_weights=[1, 1])


def test_reference_free_loss_rejects_reference_options():
    assert DPOConfig(loss_type="simpo").needs_reference is False
    assert DPOConfig(loss_type="simpo,sigmoid").needs_reference is True
    assert DPOConfig(reference_free=True).needs_reference is False
    for flag in ("sync_ref_model", "precompute_ref_log_probs"):
        with pytest.raises(ConfigError, match=f"{flag}=True but loss_type='simpo' uses no reference"):
            DPOConfig(loss_type="simpo", **{flag: True})
        with pytest.raises(ConfigError, match="reference_free=True"):
            DPOConfig(reference_free=True, **{flag: True})


def test_real_loss_registry_accepts_every_documented_name():
    losses = pytest.importorskip("preftune.losses")
    for name in LOSS_NAMES:
        assert name in losses.LOSSES, name
        DPOConfig(loss_type=name, loss_weights=[1.0])
    with pytest.raises(ConfigError, match="did you mean 'hinge'"):
        DPOConfig(loss_type="hinje")
    assert DPOConfig(loss_type="simpo").needs_reference is False
    assert DPOConfig(loss_type="sigmoid").needs_reference is True


def test_unknown_keys_get_suggestions():
    with pytest.raises(ConfigError, match="unknown field 'bta'; did you mean 'beta'") as info:
        DPOConfig(bta=0.2)
    assert info.value.errors[0][0] == "bta"
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        DPOConfig.from_dict({"learning_rte": 1e-5})
    with pytest.raises(ConfigError, match="accelerate launch"):
        DPOConfig(deepspeed="ds.json")
    with pytest.raises(ConfigError, match="lists every field"):
        DPOConfig(zzzzzz=1)


def test_aliases_and_positional_output_dir():
    c = DPOConfig.from_dict({"model": "path/to/m", "dataset": "pairs.jsonl"})
    assert (c.model_name_or_path, c.dataset_name) == ("path/to/m", "pairs.jsonl")
    assert DPOConfig(model="m").model_name_or_path == "m"
    assert DPOConfig("out").output_dir == "out"
    with pytest.raises(ConfigError, match="same field"):
        DPOConfig(model="a", model_name_or_path="b")


def test_replace_revalidates():
    c = DPOConfig()
    assert dataclasses.replace(c, beta=0.2).beta == 0.2
    with pytest.raises(ConfigError, match="beta"):
        dataclasses.replace(c, beta=-0.2)


def test_demo_defaults_are_valid():
    d = DPOConfig.demo_defaults()
    c = DPOConfig(**d)
    assert c.output_dir == "runs/dpo-demo" and c.max_steps > 0 and c.eval_strategy == "steps"
    assert c.global_batch_size(1) == d["per_device_train_batch_size"] * d["gradient_accumulation_steps"]


def test_demo_tasks_are_checked_by_name():
    assert DPOConfig(demo_tasks=["concise"]).demo_tasks == ["concise"]
    for bad in (["poetry"], []):
        with pytest.raises(ConfigError, match="demo_tasks"):
            DPOConfig(demo_tasks=bad)


def test_eval_steps_default_to_logging_steps():
    assert DPOConfig(eval_strategy="steps", logging_steps=7).eval_steps == 7
    assert DPOConfig(eval_strategy="steps", eval_steps=3).eval_steps == 3


def test_step_helpers():
    c = DPOConfig(logging_steps=0.1, warmup_ratio=0.1)
    assert c.interval("logging_steps", 95) == 10  # ceil(9.5)
    assert c.num_warmup_steps(95) == 10
    assert DPOConfig(warmup_steps=7, warmup_ratio=0.5).num_warmup_steps(100) == 7  # steps win, as documented
    assert DPOConfig(warmup_steps=0.25).num_warmup_steps(100) == 25


def test_mixed_precision():
    assert DPOConfig().mixed_precision(bf16_supported=True) == "bf16"
    assert DPOConfig().mixed_precision(bf16_supported=False) == "no"  # CPU: bf16 is slow there
    assert DPOConfig(bf16=False).mixed_precision(bf16_supported=True) == "no"
    assert DPOConfig(bf16=True).mixed_precision(bf16_supported=False) == "bf16"
    assert DPOConfig(fp16=True).mixed_precision(bf16_supported=True) == "fp16"


# ---- YAML ------------------------------------------------------------------------------------------------
def _nondefault_config() -> DPOConfig:
    return DPOConfig(**{**DOC_EXAMPLE, "loss_type": ["sigmoid", "ipo"], "loss_weights": [0.8, 0.2],
                        "model_init_kwargs": {"attn_implementation": "sdpa", "revision": "main"},
                        "lora_target_modules": ["q_proj", "v_proj"], "eval_dataset": 0.05, "rpo_alpha": 1.0,
                        "report_to": ["tensorboard"], "model_name_or_path": "m", "bad_rows": "skip",
                        "logging_steps": 0.05, "data_seed": 7})


def test_yaml_round_trip(tmp_path):
    c = _nondefault_config()
    path = tmp_path / "sub" / "config.yaml"
    text = c.to_yaml(str(path))
    assert path.read_text() == text and not list(path.parent.glob("*.tmp*"))
    assert DPOConfig.from_yaml(str(path)) == c
    assert yaml.safe_load(text) == c.to_dict()
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()  # plain values only


def test_yaml_overrides_and_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.2\nlearning_rate: 5e-7\nmodel: tiny\nloss_type: sigmoid,ipo\nloss_weights: [1, 2]\n")
    c = DPOConfig.from_yaml(str(path), beta=0.3)
    assert c.beta == 0.3 and c.learning_rate == 5e-7  # PyYAML reads "5e-7" as a string; coerced
    assert c.model_name_or_path == "tiny" and c.loss_weights == [1.0, 2.0]
    assert DPOConfig.from_yaml(str(_write(tmp_path, "empty.yaml", ""))) == DPOConfig()


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_errors_name_file_and_line(tmp_path):
    p = _write(tmp_path, "bad.yaml", "beta: 0.1\n\nlabel_smoothing: 0.7\nlearnig_rate: 1e-6\n")
    with pytest.raises(ConfigError) as info:
        DPOConfig.from_yaml(str(p))
    msg = str(info.value)
    assert f"{p}:4: unknown field 'learnig_rate'; did you mean 'learning_rate'" in msg
    p = _write(tmp_path, "bad2.yaml", "beta: 0.1\nlabel_smoothing: 0.7\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: label_smoothing=0.7"):
        DPOConfig.from_yaml(str(p))
    p = _write(tmp_path, "broken.yaml", "beta: 0.1\nloss_type: [sigmoid\n")
    with pytest.raises(ConfigError, match=rf"{p}:3:\d+: not valid YAML"):
        DPOConfig.from_yaml(str(p))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        DPOConfig.from_yaml(str(_write(tmp_path, "list.yaml", "- 1\n- 2\n")))
    with pytest.raises(ConfigError, match="cannot read config file"):
        DPOConfig.from_yaml(str(tmp_path / "missing.yaml"))
    p = _write(tmp_path, "alias.yaml", "model: m\nbeta: -1\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: beta=-1.0"):
        DPOConfig.from_yaml(str(p))


# ---- command line ----------------------------------------------------------------------------------------
def _to_argv(d: dict) -> list[str]:
    """The obvious twin of the parser: every field as `--name text`."""
    argv = []
    for k, v in d.items():
        if v is None:
            text = "none"
        elif isinstance(v, bool):
            text = str(v).lower()
        elif isinstance(v, list):
            text = ",".join(str(x) for x in v)
        elif isinstance(v, dict):
            text = json.dumps(v)
        else:
            text = repr(v) if isinstance(v, float) else str(v)
        argv += [f"--{k}", text]
    return argv


def test_cli_round_trip_every_field():
    c = _nondefault_config()
    parsed, extras = DPOConfig.parse_cli(_to_argv(c.to_dict()))
    assert parsed == c and set(vars(extras)) == {"fields_set"} and extras.fields_set == set(c.to_dict())


def test_cli_flags_override_yaml_override_defaults(tmp_path):
    p = _write(tmp_path, "run.yaml", "beta: 0.2\nmax_steps: 30\nlearning_rate: 1e-5\n")
    c, _ = DPOConfig.parse_cli(["--config", str(p), "--beta", "0.3"],
                               defaults={"max_steps": 10, "logging_steps": 3, "learning_rate": 2e-6})
    assert (c.beta, c.max_steps, c.logging_steps, c.learning_rate) == (0.3, 30, 3, 1e-5)
    with pytest.raises(ConfigError, match=r"--beta: beta=-0.3"):
        DPOConfig.parse_cli(["--config", str(p), "--beta", "-0.3"])
    b = _write(tmp_path, "b.yaml", "beta: 0.2\nmax_steps: 0\n")
    with pytest.raises(ConfigError, match=rf"{b}:2: max_steps=0"):
        DPOConfig.parse_cli(["--config", str(b)])


def test_cli_bool_list_dict_and_alias_forms():
    c, _ = DPOConfig.parse_cli([
        "--gradient_checkpointing", "--bf16", "false", "--use_peft", "True",
        "--loss_type", "sigmoid,bco_pair", "--loss_type", "sft", "--loss_weights", "0.8", "0.2", "--loss_weights",
        "1.0", "--model_init_kwargs", '{"torch_dtype": "float32"}', "--model", "m", "--dataset", "d.jsonl",
        "--learning-rate", "3e-6", "--max_steps=-1", "--rpo_alpha", "none",
    ])
    assert c.gradient_checkpointing is True and c.bf16 is False and c.use_peft is True
    assert c.loss_type == ["sigmoid", "bco_pair", "sft"] and c.loss_weights == [0.8, 0.2, 1.0]
    assert c.model_init_kwargs == {"torch_dtype": "float32"}
    assert (c.model_name_or_path, c.dataset_name, c.learning_rate, c.max_steps) == ("m", "d.jsonl", 3e-6, -1)
    assert c.rpo_alpha is None


def test_cli_unknown_and_abbreviated_flags_rejected():
    with pytest.raises(ConfigError, match="unknown flag '--bta'; did you mean '--beta'"):
        DPOConfig.parse_cli(["--bta", "0.2"])
    with pytest.raises(ConfigError, match="unknown flag '--bet'"):
        DPOConfig.parse_cli(["--bet", "0.2"])
    with pytest.raises(ConfigError, match="every value needs its --flag"):
        DPOConfig.parse_cli(["stray"])
    with pytest.raises(ConfigError, match="gradient_checkpointing='maybe'"):
        DPOConfig.parse_cli(["--gradient_checkpointing", "maybe"])


def test_cli_caller_arguments_come_back_as_extras():
    parser = argparse.ArgumentParser(prog="preftune train")
    parser.add_argument("--num_eval_generations", type=int, default=4)
    c, extras = DPOConfig.parse_cli(["--beta", "0.5", "--num_eval_generations", "8"], parser=parser)
    assert c.beta == 0.5 and extras.num_eval_generations == 8
    assert DPOConfig.parse_cli([], parser=_fresh_parser_with_extra())[1].num_eval_generations == 4


def _fresh_parser_with_extra():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_eval_generations", type=int, default=4)
    return parser


def test_help_lists_every_field_with_help_and_default():
    text = DPOConfig.add_arguments(argparse.ArgumentParser(prog="preftune train", formatter_class=lambda prog:
                                   argparse.HelpFormatter(prog, width=10_000))).format_help()
    for f in dataclasses.fields(DPOConfig):
        assert f"--{f.name}" in text, f.name
        assert f.metadata["help"][:30] in text, f.name
    assert "--config FILE.yaml" in text and "--model" in text and "--dataset" in text
    assert "Peak AdamW learning rate. [default: 1e-06]" in text
    assert "[preftune]" in text and "{sigmoid" not in text  # loss names come from the registry, not a list here


def test_every_field_has_help_and_group():
    for f in dataclasses.fields(DPOConfig):
        assert len(f.metadata["help"]) > 10 and DPOConfig.FIELD_INFO[f.name]["group"] in DPOConfig.GROUP_TITLES, f.name


def test_defaults_json_safe_and_finite():
    d = DPOConfig().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert all(math.isfinite(v) for v in d.values() if isinstance(v, float))


# ---- agreement with the loss registry (skipped until preftune.losses exists) ----------------------------
def test_every_loss_parameter_is_a_config_field():
    losses = pytest.importorskip("preftune.losses")
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    params = {k: p for spec in losses.LOSSES.values() for k, p in spec.params.items()}
    assert set(params) | set(losses.GLOBAL_PARAMS) <= names
    c = DPOConfig()
    for key, p in params.items():  # same default as the loss itself, and inside the loss's own range
        assert getattr(c, key) == p.default, key
        p.check(key, getattr(c, key), "default")
    assert tuple(losses.F_DIVERGENCES) == config_mod.F_DIVERGENCES


def test_loss_params_bridge_reads_config_values():
    losses = pytest.importorskip("preftune.losses")
    c = DPOConfig(loss_type="robust", label_smoothing=0.1, beta=0.2, f_divergence_type="js_divergence")
    p = losses.loss_params(c)
    assert "name" not in p  # the caller passes config.loss_type as the name
    assert (p["beta"], p["label_smoothing"], p["f_divergence_type"]) == (0.2, 0.1, "js_divergence")


def test_registry_parameter_ranges_and_aliases():
    pytest.importorskip("preftune.losses")
    with pytest.raises(ConfigError) as info:
        DPOConfig(loss_type="hinge", hinge_delta=-1.0)
    assert [f for f, _ in info.value.errors] == ["hinge_delta"]
    assert "hinge_delta=-1.0" in str(info.value) and "loss_type='hinge'" in str(info.value)
    with pytest.raises(ConfigError) as info:  # checked whichever loss is chosen, naming the one that reads it
        DPOConfig(loss_type="sigmoid", hinge_delta=-1.0)
    assert "hinge_delta=-1.0" in str(info.value) and "read by loss_type='hinge'" in str(info.value)
    with pytest.raises(ConfigError) as info:  # one message per field, not one per check
        DPOConfig(loss_type="robust", label_smoothing=0.7)
    assert [f for f, _ in info.value.errors] == ["label_smoothing"]
    assert DPOConfig(loss_type="aot_unpaired").loss_type == "aot_unpaired"


def test_demo_defaults_apply_to_demo_runs_only(tmp_path):
    demo = DPOConfig.demo_defaults()
    c, _ = DPOConfig.parse_cli([], use_demo_defaults_when_empty=True)
    assert c == DPOConfig(**demo)
    c, _ = DPOConfig.parse_cli(["--max_steps", "20"], use_demo_defaults_when_empty=True)
    assert c.max_steps == 20 and c.learning_rate == demo["learning_rate"]
    c, _ = DPOConfig.parse_cli(["--dataset", "pairs.jsonl"], use_demo_defaults_when_empty=True)
    assert c.learning_rate == 1e-6 and c.output_dir == "trainer_output"
    c, _ = DPOConfig.parse_cli(["--config", str(_write(tmp_path, "c.yaml", "beta: 0.2\n"))],
                               use_demo_defaults_when_empty=True)
    assert c.learning_rate == 1e-6
    assert DPOConfig.parse_cli([])[0] == DPOConfig()


# ---- the base config: a subclass's own fields get YAML, flags, coercion, suggestions and checks ---------
@config_dataclass
class TinyConfig(TrainConfig):
    """A stand-in for a second algorithm's config: two fields of its own, one refused key, one rule."""

    REFUSED: ClassVar[dict[str, str]] = {**TrainConfig.REFUSED, "old_knob": "use temperature instead"}
    temperature: float = config_field(1.0, "Sampling temperature of the tiny algorithm.", group="loss")
    num_generations: int = config_field(4, "Samples per prompt, compared within their group.", group="batch",
                                        extra=True)

    def checks(self):
        k = Checks(self)
        k.number("temperature", 0, lo_open=True)
        k.need(self.num_generations >= 2, "num_generations", "must be >= 2 (a group needs two samples)")
        return super().checks() + k.errors


def test_subclass_fields_construct_coerce_and_keep_the_base():
    c = TinyConfig(temperature="0.7", num_generations="8", learning_rate="1e-5", model="m")
    assert (c.temperature, c.num_generations, c.learning_rate, c.model_name_or_path) == (0.7, 8, 1e-5, "m")
    assert type(c.num_generations) is int and not hasattr(c, "beta")  # no DPO field leaks into the base
    assert dataclasses.replace(c, temperature=0.5).temperature == 0.5


def test_subclass_unknown_and_refused_keys():
    with pytest.raises(ConfigError, match="unknown field 'temperatur'; did you mean 'temperature'"):
        TinyConfig(temperatur=0.5)
    with pytest.raises(ConfigError, match="'old_knob' is not a TinyConfig field: use temperature instead"):
        TinyConfig(old_knob=3)
    with pytest.raises(ConfigError, match="accelerate launch"):  # the base's refusals hold for it too
        TinyConfig(deepspeed="ds.json")
    with pytest.raises(ConfigError, match="unknown field 'beta'"):  # a DPO field is not a TinyConfig field
        TinyConfig(beta=0.1)


def test_subclass_validation_runs_its_rules_and_the_base_rules():
    with pytest.raises(ConfigError) as info:
        TinyConfig(temperature=0, num_generations=1, learning_rate=-1)
    assert {f for f, _ in info.value.errors} == {"temperature", "num_generations", "learning_rate"}
    assert "num_generations=1: must be >= 2" in str(info.value) and "temperature=0.0" in str(info.value)
    with pytest.raises(ConfigError, match="num_generations='many': expected an integer"):
        TinyConfig(num_generations="many")


def test_subclass_yaml_and_cli(tmp_path):
    p = _write(tmp_path, "tiny.yaml", "temperature: 0.9\nnum_generations: 6\nlearnig_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=rf"{p}:3: unknown field 'learnig_rate'; did you mean 'learning_rate'"):
        TinyConfig.from_yaml(str(p))
    p = _write(tmp_path, "tiny2.yaml", "temperature: 0.9\nnum_generations: 1\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: num_generations=1"):
        TinyConfig.from_yaml(str(p))
    c, _ = TinyConfig.parse_cli(["--config", str(_write(tmp_path, "ok.yaml", "temperature: 0.9\n")),
                                 "--num-generations", "6", "--max_steps", "3"])
    assert (c.temperature, c.num_generations, c.max_steps) == (0.9, 6, 3)
    c.to_yaml(str(tmp_path / "round.yaml"))
    assert TinyConfig.from_yaml(str(tmp_path / "round.yaml")) == c
    assert TinyConfig.parse_cli(_to_argv(c.to_dict()))[0] == c  # every field, the subclass's included
    with pytest.raises(ConfigError, match="unknown flag '--temperatre'; did you mean '--temperature'"):
        TinyConfig.parse_cli(["--temperatre", "0.5"])
    with pytest.raises(ConfigError, match=r"--temperature: temperature=-1.0"):
        TinyConfig.parse_cli(["--temperature", "-1"])
    with pytest.raises(ConfigError, match="'old_knob' is not a TinyConfig field: use temperature"):
        TinyConfig.parse_cli(["--old_knob", "3"])
    text = TinyConfig.add_arguments(argparse.ArgumentParser(formatter_class=lambda prog:
                                    argparse.HelpFormatter(prog, width=10_000))).format_help()
    assert "--temperature" in text and "Sampling temperature of the tiny algorithm. [default: 1.0]" in text
    assert "[preftune] Samples per prompt" in text and "--beta" not in text


def test_subclass_needs_the_checking_decorator():
    @dataclasses.dataclass
    class Plain(TrainConfig):
        knob: int = 1

    with pytest.raises(TypeError, match="@config_dataclass"):
        Plain()


# ---- what TRL users type ---------------------------------------------------------------------------------
def test_max_length_alone_is_enough():
    """TRL has no prompt limit of its own: max_length alone configures truncation (no 512-token default)."""
    c = DPOConfig(max_length=128)
    assert (c.max_length, c.max_prompt_length) == (128, None)
    assert DPOConfig.parse_cli(["--max_length", "128"])[0] == c
    with pytest.raises(ConfigError, match="max_prompt_length=128 must be < max_length=128"):  # when set, checked
        DPOConfig.parse_cli(["--max_length", "128", "--max_prompt_length", "128"])


def test_report_to_spellings_of_training_arguments():
    for value in ([], None, "none", ["none"], "", ()):
        assert DPOConfig(report_to=value).report_to == ["none"], value
    assert DPOConfig(report_to="all").report_to == ["all"]
    assert DPOConfig(report_to=["tensorboard"]).report_to == ["tensorboard"]
    assert DPOConfig(report_to="tensorboard,all").report_to == ["tensorboard", "all"]
    for argv, want in ((["--report_to", "none"], ["none"]), (["--report_to", "all"], ["all"]),
                       (["--report_to", ""], ["none"]), (["--report_to", "tensorboard"], ["tensorboard"])):
        assert DPOConfig.parse_cli(argv)[0].report_to == want, argv


def test_lora_target_modules_all_linear_from_the_command_line_and_python():
    from preftune.models import lora_config_from_args

    for c in (DPOConfig.parse_cli(["--use_peft", "--lora_target_modules", "all-linear"])[0],
              DPOConfig(use_peft=True, lora_target_modules="all-linear"), DPOConfig(use_peft=True)):
        lora = lora_config_from_args(c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules)
        assert lora.target_modules == "all-linear", c.lora_target_modules  # a string, as peft reads it
    c = DPOConfig.parse_cli(["--lora_target_modules", "q_proj,v_proj"])[0]
    assert set(lora_config_from_args(target_modules=c.lora_target_modules).target_modules) == {"q_proj", "v_proj"}


REFUSED_TRL = ("generate_during_eval", "model_adapter_name", "ref_adapter_name", "force_use_ref_model",
               "padding_value")


@pytest.mark.parametrize("name", REFUSED_TRL)
def test_fields_trl_does_not_have_are_refused_by_name_with_the_alternative(name, tmp_path):
    value = {"generate_during_eval": True, "force_use_ref_model": True, "padding_value": 0}.get(name, "ref")
    assert name not in {f.name for f in dataclasses.fields(DPOConfig)}
    with pytest.raises(ConfigError) as info:
        DPOConfig(**{name: value})
    message = str(info.value)
    assert f"'{name}' is not a DPOConfig field: " in message
    instead = {"generate_during_eval": "preftune eval", "model_adapter_name": "ref_model_name_or_path",
               "ref_adapter_name": "ref_model_name_or_path", "force_use_ref_model": "ref_model_name_or_path",
               "padding_value": "tokenizer.pad_token"}[name]
    assert instead in message
    p = _write(tmp_path, "trl.yaml", f"beta: 0.1\n{name}: {json.dumps(value)}\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: '{name}' is not a DPOConfig field"):
        DPOConfig.from_yaml(str(p))
    with pytest.raises(ConfigError, match=rf"'--{name}': '{name}' is not a DPOConfig field: .*{instead}"):
        DPOConfig.parse_cli([f"--{name}", str(value)])
    assert DPOConfig(**{name: None}) == DPOConfig()  # unset, as an older resolved config.yaml holds it


def test_no_message_tells_users_to_set_a_refused_field():
    import pathlib

    import preftune

    root = pathlib.Path(preftune.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "config.py":
            continue
        text = path.read_text(encoding="utf-8")
        for name in REFUSED_TRL:
            assert name not in text, f"{path} mentions {name}"


def test_loss_parameter_fields_come_from_the_registry():
    """Each loss hyper-parameter's field is made from its one declaration: default, help, range, marker."""
    losses = pytest.importorskip("preftune.losses")
    by_name = {f.name: f for f in dataclasses.fields(DPOConfig)}
    for key, p in losses.config_params().items():
        f = by_name[key]
        assert f.default == p.default and DPOConfig.FIELD_INFO[f.name]["group"] == "loss", key
        assert f.metadata["help"] == ("[preftune] " if p.extra else "") + (p.doc or p.help), key
    assert by_name["label_smoothing"].metadata["help"] == "Assumed rate of flipped labels, in [0, 0.5) (cDPO / robust)."
    assert by_name["hinge_delta"].metadata["help"].startswith("[preftune] Margin delta")
    assert losses.config_params()["label_smoothing"].range_text() == "[0, 0.5)"  # the range every reader allows


def test_a_new_loss_parameter_is_one_declaration(monkeypatch):
    """A loss registered with a new parameter gives a config field with its default and range check."""
    import importlib.util
    import sys

    losses = pytest.importorskip("preftune.losses")
    monkeypatch.setitem(losses.LOSSES, "toy", losses.LossSpec(
        "toy", lambda t, *, beta, toy_margin: t.delta, params={"toy_margin": losses.Param(
            2.0, "margin of the toy loss", 0.0, 5.0, doc="Margin of the toy loss.")}))
    # a private copy of preftune.config built now, with the toy loss registered (the real module stays as it is)
    spec = importlib.util.spec_from_file_location("config_with_toy", config_mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "config_with_toy", fresh)
    spec.loader.exec_module(fresh)
    c = fresh.DPOConfig(loss_type="toy", toy_margin="3")
    assert c.toy_margin == 3.0 and fresh.DPOConfig().toy_margin == 2.0
    assert losses.loss_params(c)["toy_margin"] == 3.0
    with pytest.raises(ConfigError, match=r"toy_margin=9.0: must be in \[0, 5\] \(margin of the toy loss; "
                       r"read by loss_type='toy'\)"):
        fresh.DPOConfig(loss_type="toy", toy_margin=9)
    assert fresh.DPOConfig.parse_cli(["--loss_type", "toy", "--toy_margin", "1"])[0].toy_margin == 1.0
    assert "toy_margin" not in {f.name for f in dataclasses.fields(DPOConfig)}


# ---- every accepted field is read ---------------------------------------------------------------------------
def _package_sources(skip=("config.py", "config_base.py", "model_card.py")) -> str:
    import pathlib

    import preftune

    root = pathlib.Path(preftune.__file__).parent
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.py")) if p.name not in skip)


def _reads(name: str, text: str) -> bool:
    """An attribute read (`args.name`), a getattr / dict key ("name"), or a keyword of the same name."""
    import re

    return re.search(rf"\.{name}\b|[\"']{name}[\"']", text) is not None


@pytest.mark.parametrize("cls_path", [
    "preftune.config_base.TrainConfig", "preftune.config.DPOConfig", "preftune.grpo.config.GRPOConfig"])
def test_every_field_is_read_outside_the_config_or_listed_as_ignored(cls_path):
    """A field the training code never reads would look right and do nothing. Each field must be read by the
    package outside the config modules (directly, through the loss registry's readers, or inside a config
    method the package calls), or be on the class's documented ACCEPTED_IGNORED list (which warns when set)
    or VALIDATED_ONLY list (every accepted value is what preftune does); an older name (SYNONYMS, RENAMED) counts
    when the name the config moves its value to is read."""
    import importlib
    import inspect
    import re
    from dataclasses import fields

    from preftune.losses import config_params

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    text = _package_sources()
    called = set(re.findall(r"\bargs\.(\w+)\(|\bconfig\.(\w+)\(|\bcfg\.(\w+)\(", text))
    methods = {m for group in called for m in group if m and callable(getattr(cls, m, None))}
    via_methods = "\n".join(inspect.getsource(getattr(cls, m)) for m in methods)
    loss_fields = set(config_params()) if issubclass(cls, DPOConfig) else set()
    def read(name):
        return _reads(name, text) or _reads(name, via_methods) or name in loss_fields

    unread = [f.name for f in fields(cls)
              if not (read(f.name) or f.name in cls.ACCEPTED_IGNORED or f.name in cls.VALIDATED_ONLY
                      or (f.name in cls.SYNONYMS and read(cls.SYNONYMS[f.name]))
                      or (f.name in getattr(cls, "RENAMED", {}) and read(cls.RENAMED[f.name])))]
    assert unread == [], f"{cls.__name__} fields nothing reads: {unread}; wire them, or list them in ACCEPTED_IGNORED"
    for listed in (*cls.ACCEPTED_IGNORED, *cls.VALIDATED_ONLY):
        assert listed in {f.name for f in fields(cls)}, listed


def test_the_scan_catches_an_unread_field():
    """The scan's own probe: a made-up field name is not found in the package."""
    assert not _reads("zz_never_read_field", _package_sources())
    assert _reads("max_grad_norm", _package_sources())


def test_accepted_but_ignored_fields_warn_when_set(caplog):
    caplog.set_level(logging.WARNING, logger="preftune")
    DPOConfig(output_dir="x")
    assert "changes nothing" not in caplog.text
    DPOConfig(output_dir="x", use_liger_loss=True, dataset_num_proc=4)
    assert "use_liger_loss=True is accepted for compatibility and changes nothing" in caplog.text
    assert "dataset_num_proc=4 is accepted" in caplog.text


# ---- TRL 1.16's DPOConfig field names, TrlParser, the differences page --------------------------------------
# dataclasses.fields(trl.DPOConfig) of TRL 1.16.0 with transformers 5.25 (test_trl_field_list_is_current checks
# it against an installed TRL).
TRL_DPO_CONFIG_FIELDS = """
output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type
lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon
optim_target_modules gradient_accumulation_steps average_tokens_across_devices max_grad_norm
label_smoothing_factor bf16 fp16 bf16_full_eval fp16_full_eval tf32 activation_checkpointing
activation_checkpointing_kwargs gradient_checkpointing gradient_checkpointing_kwargs torch_compile
torch_compile_backend torch_compile_mode use_liger_kernel liger_kernel_config use_cache neftune_noise_alpha
torch_empty_cache_steps auto_find_batch_size logging_strategy logging_steps logging_first_step log_on_each_node
logging_nan_inf_filter include_num_input_tokens_seen log_level log_level_replica disable_tqdm report_to run_name
project trackio_space_id trackio_bucket_id trackio_static_space_id eval_strategy eval_steps eval_delay
per_device_eval_batch_size prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object
eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model save_strategy save_steps
save_on_each_node save_total_limit enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id
hub_strategy hub_always_push hub_revision load_best_model_at_end metric_for_best_model greater_is_better
ignore_data_skip restore_callback_states_from_checkpoint full_determinism seed data_seed use_cpu
accelerator_config parallelism_config dataloader_drop_last dataloader_num_workers dataloader_pin_memory
dataloader_persistent_workers dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order
remove_unused_columns label_names train_sampling_strategy length_column_name ddp_find_unused_parameters
ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout fsdp fsdp_config deepspeed
debug skip_memory_metrics do_train do_eval do_predict resume_from_checkpoint local_rank model_init_kwargs
trust_remote_code router_aux_loss_coef disable_dropout dataset_num_proc max_length truncation_mode padding_free
pad_to_multiple_of precompute_ref_log_probs precompute_ref_batch_size loss_type loss_weights ld_alpha
f_divergence_type f_alpha_divergence_coef label_smoothing beta use_weighting discopop_tau activation_offloading
sync_ref_model ref_model_mixup_alpha ref_model_sync_steps pad_token
""".split()


def test_every_trl_field_name_is_a_field_or_refused_by_name():
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    assert len(TRL_DPO_CONFIG_FIELDS) == 139
    missing = [n for n in TRL_DPO_CONFIG_FIELDS if n not in names and n not in DPOConfig.REFUSED]
    assert missing == []
    for n in TRL_DPO_CONFIG_FIELDS:  # none of them is an unknown field, whatever its value
        if n not in names:
            with pytest.raises(ConfigError) as e:
                DPOConfig(**{n: "x"})
            assert "unknown field" not in str(e.value) and DPOConfig.REFUSED[n] in str(e.value)


def test_trl_field_list_is_current():
    trl = pytest.importorskip("trl")
    assert [f.name for f in dataclasses.fields(trl.DPOConfig)] == TRL_DPO_CONFIG_FIELDS, trl.__version__


def _trl_defaults() -> dict:
    trl = pytest.importorskip("trl")
    out = {}
    for f in dataclasses.fields(trl.DPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# TRL defaults preftune does not take, each a documented difference (docs/differences_from_trl.md)
TRL_DEFAULTS_REFUSED = {"dataloader_drop_last": False}


def test_trl_default_values_are_accepted(caplog):
    """A program that sets TRL fields to TRL's own defaults runs: each is taken (the value of an enum written as
    its string), except the documented differences, refused by name."""
    caplog.set_level(logging.WARNING, logger="preftune")
    values = {k: getattr(v, "value", v) for k, v in _trl_defaults().items() if k not in TRL_DEFAULTS_REFUSED}
    c = DPOConfig(**values)
    assert c.gradient_checkpointing is True and c.loss_type == "sigmoid" and c.pad_to_multiple_of is None
    assert c.truncation_mode == "keep_start" and c.precompute_ref_log_probs is False
    assert "changes nothing" not in caplog.text  # every accepted-and-ignored field at its default
    for name, value in TRL_DEFAULTS_REFUSED.items():
        with pytest.raises(ConfigError, match=rf"{name}={value!r}: preftune supports only"):
            DPOConfig(**{name: value})


def _other_value(name: str):
    """A value of the field's type other than its default."""
    from typing import get_type_hints

    default = getattr(DPOConfig(), name)
    hint = str(get_type_hints(DPOConfig)[name])
    if "bool" in hint:
        return not default
    if "list" in hint:
        return ["loss"]
    if "dict" in hint:
        return {"x": True}
    if "int" in hint or "float" in hint:
        return (default or 0) + 1
    return "x" + str(default)


@pytest.mark.parametrize("name", sorted(DPOConfig.SUPPORTED_ONLY))
def test_supported_only_fields_refuse_other_values_saying_what_to_do(name):
    accepted, instead = DPOConfig.SUPPORTED_ONLY[name]
    assert name in DPOConfig.VALIDATED_ONLY
    for value in accepted:
        DPOConfig(**{name: value})
    with pytest.raises(ConfigError) as e:
        DPOConfig(**{name: _other_value(name)})
    assert f"{name}=" in str(e.value) and instead in str(e.value)


@pytest.mark.parametrize("name", sorted(set(DPOConfig.ACCEPTED_IGNORED) - {"dataset_num_proc"}))
def test_accepted_ignored_fields_warn_with_their_reason(name, caplog):
    caplog.set_level(logging.WARNING, logger="preftune")
    value = _other_value(name)
    DPOConfig(**{name: value})
    assert f"{name}={value!r} is accepted for compatibility and changes nothing: {DPOConfig.ACCEPTED_IGNORED[name]}" \
        in caplog.text


def test_include_num_input_tokens_seen_takes_trl_booleans():
    assert DPOConfig(include_num_input_tokens_seen=False).include_num_input_tokens_seen == "no"
    with pytest.raises(ConfigError, match="include_num_input_tokens_seen='all'"):
        DPOConfig(include_num_input_tokens_seen=True)


def test_activation_checkpointing_is_gradient_checkpointings_newer_name():
    c = DPOConfig(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    assert c.gradient_checkpointing is True and c.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert DPOConfig(activation_checkpointing=True, gradient_checkpointing=True).gradient_checkpointing is True
    with pytest.raises(ConfigError, match="activation_checkpointing=False contradicts gradient_checkpointing=True"):
        DPOConfig(activation_checkpointing=False, gradient_checkpointing=True)
    assert DPOConfig.from_yaml is not None and DPOConfig().gradient_checkpointing is False


def test_whole_step_counts_stay_integers():
    c = DPOConfig(logging_steps=5.0, save_steps="20", eval_steps=3.0, warmup_steps=0.5)
    assert (type(c.logging_steps), type(c.save_steps), type(c.eval_steps)) == (int, int, int)
    assert c.warmup_steps == 0.5


def test_model_init_kwargs_dtype_is_written_as_text_and_loads_back(tmp_path):
    import torch

    c = DPOConfig(output_dir=str(tmp_path), model_init_kwargs={"dtype": torch.float16, "revision": "main"})
    assert c.model_init_kwargs["dtype"] is torch.float16  # kept as given for loading
    text = c.to_yaml(str(tmp_path / "config.yaml"))
    assert "dtype: float16" in text
    back = DPOConfig.from_yaml(str(tmp_path / "config.yaml"))
    assert back.model_init_kwargs == {"dtype": "float16", "revision": "main"}
    from preftune.models import _parse_dtype

    assert _parse_dtype(back.model_init_kwargs["dtype"], "x") is torch.float16
    assert json.loads(json.dumps(c.to_dict()))["model_init_kwargs"]["dtype"] == "float16"


def test_fields_trl_scripts_declare_elsewhere_are_hidden_from_hf_parsers_only():
    """On the class, init=False (HfArgumentParser makes no flag of them); on an instance, ordinary fields, so
    dataclasses.replace carries them."""
    hidden = set(DPOConfig.TRL_SCRIPT_FIELDS)
    on_class = {f.name: f.init for f in dataclasses.fields(DPOConfig)}
    assert {n for n, init in on_class.items() if not init} == hidden
    c = DPOConfig(model_name_or_path="m", dataset_name="d.jsonl", use_peft=True, lora_r=4)
    assert all(f.init for f in dataclasses.fields(c))
    r = dataclasses.replace(c, beta=0.3)
    assert (r.model_name_or_path, r.dataset_name, r.use_peft, r.lora_r, r.beta) == ("m", "d.jsonl", True, 4, 0.3)
    assert all("group" not in f.metadata and set(f.metadata) == {"help"} for f in dataclasses.fields(DPOConfig))


def test_trl_parser_with_flags_and_a_yaml_file(tmp_path):
    """TRL's scripts: TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config()."""
    trl = pytest.importorskip("trl")
    parser = trl.TrlParser((trl.ScriptArguments, DPOConfig, trl.ModelConfig))
    script, args, model = parser.parse_args_and_config([
        "--dataset_name", "data.jsonl", "--model_name_or_path", "my-model", "--output_dir", str(tmp_path / "o"),
        "--beta", "0.2", "--loss_type", "sigmoid", "sft", "--logging_steps", "5", "--bf16", "false",
        "--gradient_checkpointing", "--eval_strategy", "steps", "--use_peft", "--lora_r", "8",
        "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'])
    assert isinstance(args, DPOConfig)
    assert (args.beta, args.loss_type, args.logging_steps, args.bf16, args.gradient_checkpointing) == (
        0.2, ["sigmoid", "sft"], 5, False, True)
    assert args.eval_strategy == "steps" and args.eval_steps == 5 and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (script.dataset_name, model.model_name_or_path, model.use_peft, model.lora_r) == (
        "data.jsonl", "my-model", True, 8)
    assert args.model_name_or_path is None and args.use_peft is False  # the script passes them on itself

    path = tmp_path / "recipe.yaml"
    path.write_text("model_name_or_path: my-model\ndataset_name: data.jsonl\noutput_dir: %s\nbeta: 0.3\n"
                    "learning_rate: 5.0e-7\nmax_length: 256\nlr_scheduler_type: cosine_with_min_lr\n"
                    "lr_scheduler_kwargs: {min_lr_rate: 0.1}\nreport_to: none\nlogging_strategy: epoch\n"
                    "model_init_kwargs: {dtype: bfloat16}\n" % (tmp_path / "o2"))
    script, args, model = parser.parse_args_and_config(["--config", str(path), "--beta", "0.4"])
    assert (args.output_dir, args.beta, args.learning_rate, args.max_length) == (str(tmp_path / "o2"), 0.4, 5e-7, 256)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and args.report_to == ["none"]
    assert args.logging_strategy == "epoch" and args.model_init_kwargs == {"dtype": "bfloat16"}
    assert (script.dataset_name, model.model_name_or_path) == ("data.jsonl", "my-model")
    with pytest.raises(ConfigError, match="torch_compile=True"):
        parser.parse_args_and_config(["--output_dir", "o", "--torch_compile"])


def test_preftune_cli_still_takes_the_fields_hidden_from_hf_parsers():
    c, _ = DPOConfig.parse_cli(["--model", "m", "--dataset_name", "d.jsonl", "--use_peft", "true",
                                "--lora_r", "4", "--dtype", "float32", "--logging_strategy", "no"])
    assert (c.model_name_or_path, c.dataset_name, c.use_peft, c.lora_r, c.dtype) == ("m", "d.jsonl", True, 4, "float32")
    assert c.logging_strategy == "no"


# ---- docs/differences_from_trl.md agrees with the class attributes ------------------------------------------
def _doc_lists(cls=DPOConfig) -> dict[str, list[str]]:
    """The three lists of docs/differences_from_trl.md, as the class attributes give them."""
    return {
        "Accepted and ignored": [f"- `{n}`: {why}" for n, why in cls.ACCEPTED_IGNORED.items()],
        "Accepted with preftune's behaviour only": [
            f"- `{n}`: only {' or '.join(f'`{v!r}`' for v in ok)}; {why}" for n, (ok, why) in cls.SUPPORTED_ONLY.items()],
        "Refused by name": [f"- `{n}`: {why}" for n, why in cls.REFUSED.items()],
    }


def test_differences_page_lists_what_the_code_does():
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / "docs" / "differences_from_trl.md").read_text(encoding="utf-8")
    sections = {}
    for part in text.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        sections[title.strip()] = [line for line in body.splitlines() if line.startswith("- `")]
    for title, lines in _doc_lists().items():
        assert sections.get(title) == lines, f"docs/differences_from_trl.md '{title}' differs from DPOConfig"
    table = sections and text.split("## Deliberate differences")[1].split("\n## ")[0]
    for name in (*DPOConfig.TRL_SCRIPT_FIELDS, *TRL_DEFAULTS_REFUSED, "precompute_ref_log_probs",
                 "gradient_checkpointing", "truncation_mode", "max_prompt_length", "padding_free", "bf16"):
        assert f"`{name}`" in table, name
