"""GRPOConfig: TRL 1.16's field names and defaults, TRL's validation rules, the generation layout, YAML, flags,
TrlParser, `preftune grpo` and docs/differences_from_trl.md."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import types

import pytest
import yaml
from test_config import _to_argv  # the parser's obvious twin, as DPOConfig's tests use it

from preftune.config_base import ConfigError, TrainConfig
from preftune.grpo.config import LOSS_TYPES, VLLM_ONLY_DEFAULTS, GRPOConfig

# TRL 1.16's GRPOConfig fields that TrainingArguments does not declare (test_trl_field_list_is_current checks it
# against an installed TRL), and TrainingArguments' fields whose default TRL's GRPOConfig changes.
TRL_GRPO_OWN_FIELDS = """
model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout cast_lm_head_to_fp32 num_generations
num_generations_eval max_completion_length ds3_gather_for_generation shuffle_dataset pad_to_multiple_of
generation_batch_size steps_per_generation temperature top_p top_k min_p generation_kwargs chat_template_kwargs
repetition_penalty cache_implementation use_vllm vllm_mode vllm_model_impl vllm_enable_sleep_mode
vllm_structured_outputs_regex vllm_server_base_url vllm_server_host vllm_server_port vllm_server_timeout
vllm_group_port vllm_gpu_memory_utilization vllm_max_model_length vllm_tensor_parallel_size beta num_iterations
epsilon delta epsilon_high sapo_temperature_neg sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg
vespo_lambda_neg importance_sampling_level reward_weights multi_objective_aggregation scale_rewards loss_type
mask_truncated_completions sync_ref_model ref_model_mixup_alpha ref_model_sync_steps top_entropy_quantile
entropy_coef use_adaptive_entropy entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target
max_tool_calling_iterations vllm_importance_sampling_correction vllm_importance_sampling_mode
vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min off_policy_mask_threshold
use_bias_correction_kl log_completions log_multimodal num_completions_to_print log_unique_prompts
log_completions_hub_repo use_transformers_continuous_batching transformers_continuous_batching_config
use_transformers_paged vllm_importance_sampling_cap
""".split()
TRL_GRPO_OVERRIDES = {"learning_rate": 1e-6, "gradient_checkpointing": True, "logging_steps": 10, "bf16": None,
                      "remove_unused_columns": False}

# How each of TRL's own GRPO fields is taken: honoured by the trainer, or one of the class's lists.
HONOURED = """
model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout num_generations num_generations_eval
max_completion_length shuffle_dataset pad_to_multiple_of generation_batch_size steps_per_generation temperature
top_p top_k min_p generation_kwargs chat_template_kwargs repetition_penalty use_vllm beta num_iterations epsilon delta epsilon_high sapo_temperature_neg sapo_temperature_pos
vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg importance_sampling_level reward_weights
multi_objective_aggregation scale_rewards loss_type mask_truncated_completions sync_ref_model ref_model_mixup_alpha
ref_model_sync_steps top_entropy_quantile entropy_coef use_adaptive_entropy entropy_coef_min entropy_coef_max
entropy_coef_delta entropy_target off_policy_mask_threshold use_bias_correction_kl
log_completions num_completions_to_print log_unique_prompts use_transformers_continuous_batching
transformers_continuous_batching_config learning_rate gradient_checkpointing logging_steps bf16
""".split()

# TRL defaults GRPOConfig does not take (field: (TRL's, preftune's)), each in the GRPO differences table.
DEFAULT_DIFFERENCES = {"gradient_checkpointing": (True, False), "pad_to_multiple_of": ("auto", None),
                       "dataloader_drop_last": (False, True)}


def _trl():
    return pytest.importorskip("trl")


def _trl_defaults() -> dict:
    trl = _trl()
    out = {}
    for f in dataclasses.fields(trl.GRPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = getattr(f.default, "value", f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _defaults(cls=GRPOConfig) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


# ---- TRL's field names and defaults --------------------------------------------------------------------------
def test_trl_field_list_is_current():
    import transformers

    trl = _trl()
    base = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    own = [f.name for f in dataclasses.fields(trl.GRPOConfig) if f.name not in base]
    assert own == TRL_GRPO_OWN_FIELDS and len(own) == 77, trl.__version__
    changed = {n: trl.GRPOConfig.__dataclass_fields__[n].default for n in TRL_GRPO_OVERRIDES}
    assert changed == TRL_GRPO_OVERRIDES


def test_every_trl_field_is_honoured_listed_or_refused_once():
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    kinds = {"honoured": set(HONOURED), "supported only": set(GRPOConfig.SUPPORTED_ONLY),
             "ignored": set(GRPOConfig.ACCEPTED_IGNORED), "refused": set(GRPOConfig.REFUSED),
             "renamed": set(GRPOConfig.RENAMED),
             # vLLM's own settings: any value but TRL's default needs use_vllm=True, which the trainer refuses
             "vllm only": set(VLLM_ONLY_DEFAULTS) - set(GRPOConfig.RENAMED)}
    for name in TRL_GRPO_OWN_FIELDS + list(TRL_GRPO_OVERRIDES):
        where = [k for k, members in kinds.items() if name in members]
        assert len(where) == 1, (name, where)
        assert (name in names) == (where != ["refused"]), name
    for name in HONOURED:
        assert name not in GRPOConfig.ACCEPTED_IGNORED and name not in GRPOConfig.VALIDATED_ONLY, name


def test_every_trl_field_name_is_accepted_by_the_installed_trl_list():
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    trl = _trl()
    for f in dataclasses.fields(trl.GRPOConfig):
        assert f.name in names or f.name in GRPOConfig.REFUSED, f.name
        if f.name not in names:  # refused by name, whatever its value; never "unknown"
            with pytest.raises(ConfigError) as e:
                GRPOConfig(**{f.name: "x"})
            assert "unknown field" not in str(e.value) and GRPOConfig.REFUSED[f.name] in str(e.value)


def test_defaults_are_trls_except_the_documented_differences():
    ours, theirs = _defaults(), _trl_defaults()
    differ = {n: (theirs[n], ours[n]) for n in theirs if n in ours and theirs[n] != ours[n]}
    differ.pop("output_dir")  # TrainingArguments' None means "trainer_output", preftune's default
    differ.pop("report_to")  # "none" and ["none"]: the same
    assert differ == DEFAULT_DIFFERENCES
    table = _differences_page().split("## GRPO deliberate differences")[1].split("\n## ")[0]
    for name in (*DEFAULT_DIFFERENCES, "bf16", "dtype", "reward_funcs", "generation_batch_size"):
        assert f"`{name}`" in table, name


def test_trl_default_values_are_accepted(caplog):
    """A program that sets every TRL field to TRL's default runs: each is taken (the refused ones at their unset
    values), except the documented dataloader_drop_last."""
    caplog.set_level(logging.WARNING, logger="preftune")
    values = {k: v for k, v in _trl_defaults().items() if k != "dataloader_drop_last"}
    c = GRPOConfig(**values)
    assert (c.gradient_checkpointing, c.loss_type, c.pad_to_multiple_of, c.scale_rewards) == (True, "dapo", None,
                                                                                            "group")
    assert (c.num_generations, c.max_completion_length, c.beta, c.epsilon_high, c.resolved_epsilon_high) == (
        8, 512, 0.0, None, 0.2)
    assert "changes nothing" not in caplog.text
    with pytest.raises(ConfigError, match=r"dataloader_drop_last=False: preftune supports only"):
        GRPOConfig(dataloader_drop_last=False)


def test_dpo_only_fields_are_not_grpo_fields():
    from preftune.config import DPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    for name in ("loss_weights", "label_smoothing", "ref_model_name_or_path", "precompute_ref_log_probs",
                 "max_length", "truncation_mode", "f_divergence_type", "rpo_alpha"):
        assert name in {f.name for f in dataclasses.fields(DPOConfig)} and name not in names, name
    with pytest.raises(ConfigError, match="unknown field 'label_smoothing'"):
        GRPOConfig(label_smoothing=0.1)
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= names


# ---- validation ----------------------------------------------------------------------------------------------
INVALID = [
    (dict(num_generations=1, per_device_train_batch_size=1), "num_generations", "at least 2 completions"),
    (dict(generation_batch_size=16, steps_per_generation=2), "generation_batch_size", "are both set"),
    (dict(per_device_train_batch_size=4, generation_batch_size=10), "generation_batch_size",
     "generation_batch_size=10 must be a multiple of the completions of one micro-step on all processes, "
     "per_device_train_batch_size=4 x 1 process = 4: set it to 8 or 12"),
    (dict(per_device_train_batch_size=4, generation_batch_size=12), "num_generations",
     "the generation batch of 12 completions (generation_batch_size=12) must hold whole groups of num_generations=8"),
    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=3), "num_generations",
     "steps_per_generation=3 (= gradient_accumulation_steps)"),
    (dict(eval_strategy="steps", per_device_eval_batch_size=6), "per_device_eval_batch_size",
     "must be a multiple of the generations per prompt in evaluation (num_generations=8)"),
    (dict(eval_strategy="steps", num_generations_eval=4, per_device_eval_batch_size=6), "per_device_eval_batch_size",
     "num_generations_eval=4"),
    (dict(loss_type="ppo"), "loss_type", "must be one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level", "must be one of token, sequence"),
    (dict(scale_rewards="std"), "scale_rewards", "must be one of group, batch, none"),
    (dict(multi_objective_aggregation="mean"), "multi_objective_aggregation", "sum_then_normalize"),
    (dict(temperature=0), "temperature", "temperature=0.0: must be a finite number > 0"),
    (dict(top_p=0), "top_p", "top_p=0.0: must be in (0, 1]"),
    (dict(top_k=-1), "top_k", "top_k=-1"),
    (dict(min_p=1.5), "min_p", "min_p=1.5"),
    (dict(beta=-0.1), "beta", "beta=-0.1"),
    (dict(epsilon_high=-1), "epsilon_high", "epsilon_high=-1.0"),
    (dict(delta=0), "delta", "delta=0.0"),
    (dict(num_iterations=0), "num_iterations", "num_iterations=0"),
    (dict(max_completion_length=0), "max_completion_length", "max_completion_length=0"),
    (dict(max_completion_length=None), "max_completion_length", "max_completion_length=None: must be an integer >= 1"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile", "top_entropy_quantile=1.5"),
    (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_max", "entropy_coef_min is its lower bound"),
    (dict(off_policy_mask_threshold=0), "off_policy_mask_threshold", "off_policy_mask_threshold=0.0"),
    (dict(ref_model_mixup_alpha=2), "ref_model_mixup_alpha", "ref_model_mixup_alpha=2.0"),
    (dict(sync_ref_model=True), "sync_ref_model", "sync_ref_model=True with beta=0.0"),
    (dict(reward_funcs=["a", "b"], reward_weights=[1.0]), "reward_weights", "needs 2 value(s)"),
    (dict(reward_weights=[float("nan")]), "reward_weights", "must be finite"),
    (dict(max_resample_rounds=0), "max_resample_rounds", "max_resample_rounds=0"),
    (dict(vllm_gpu_memory_utilization=0.5), "vllm_gpu_memory_utilization",
     "vllm_gpu_memory_utilization=0.5 applies to vLLM generation only: set use_vllm=True, or leave it at 0.3"),
    (dict(vllm_importance_sampling_mode="token_mask"), "vllm_importance_sampling_mode", "set use_vllm=True"),
    (dict(use_vllm=True, vllm_importance_sampling_clip_min=4.0), "vllm_importance_sampling_clip_min",
     "must be less than vllm_importance_sampling_clip_max=3.0"),
    (dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     "vllm_importance_sampling_mode", "set vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max"),
    (dict(use_vllm=True, loss_type="vespo"), "vllm_importance_sampling_mode", "'token_truncate' or 'token_mask'"),
    (dict(use_vllm=True, use_transformers_continuous_batching=True), "use_vllm", "choose one generation engine"),
    (dict(transformers_continuous_batching_config={"max_batch_tokens": 8}), "transformers_continuous_batching_config",
     "use_transformers_continuous_batching=False"),
    (dict(use_vllm=True, vllm_importance_sampling_cap=2.0, vllm_importance_sampling_clip_max=2.5),
     "vllm_importance_sampling_cap", "older name of the second"),
    (dict(vllm_mode="server"), "vllm_mode", "the server mode and its fields are not supported"),
    (dict(demo_tasks=["chess"]), "demo_tasks", "demo_tasks=['chess']"),
]


@pytest.mark.parametrize("kwargs,field,shown", INVALID, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_values_name_the_field_and_what_to_do(kwargs, field, shown):
    with pytest.raises(ConfigError) as info:
        GRPOConfig(**kwargs)
    assert any(f == field for f, _ in info.value.errors), info.value.errors
    assert shown in str(info.value)


def test_the_launchers_process_count_is_checked(monkeypatch):
    """TRL checks the generation batch for the processes of the run when the config is built."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    GRPOConfig(per_device_train_batch_size=4)  # 4 x 2 processes = one group of 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size=4 x 1 process x steps_per_generation=1"):
        GRPOConfig(per_device_train_batch_size=4)


def test_scale_rewards_and_epsilon_high_as_trl_reads_them():
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards="false").scale_rewards == "none"
    assert GRPOConfig(scale_rewards="Batch").scale_rewards == "batch"
    assert GRPOConfig(epsilon=0.1).resolved_epsilon_high == 0.1
    assert GRPOConfig(epsilon=0.2, epsilon_high=0.28).resolved_epsilon_high == 0.28
    assert GRPOConfig().eval_num_generations == 8 and GRPOConfig(num_generations_eval=2).eval_num_generations == 2


def test_trls_older_names_move_to_the_new_ones():
    c = GRPOConfig(use_transformers_paged=True)
    assert c.use_transformers_continuous_batching is True
    c = GRPOConfig(use_vllm=True, vllm_importance_sampling_cap=2.0)
    assert c.vllm_importance_sampling_clip_max == 2.0
    assert GRPOConfig(use_vllm=True, vllm_importance_sampling_cap=2.0,
                      vllm_importance_sampling_clip_max=2.0).vllm_importance_sampling_clip_max == 2.0


def test_vllm_fields_are_taken_with_use_vllm():
    other = {"vllm_model_impl": "transformers", "vllm_enable_sleep_mode": True, "vllm_structured_outputs_regex": "a+",
             "vllm_gpu_memory_utilization": 0.5, "vllm_max_model_length": 512, "vllm_tensor_parallel_size": 2,
             "vllm_importance_sampling_correction": False, "vllm_importance_sampling_mode": "token_mask",
             "vllm_importance_sampling_clip_max": 2.0, "vllm_importance_sampling_clip_min": 0.5,
             "vllm_importance_sampling_cap": 2.0}
    assert set(other) == set(VLLM_ONLY_DEFAULTS)
    c = GRPOConfig(use_vllm=True, **other)
    assert all(getattr(c, k) == v for k, v in other.items())
    for name, value in other.items():
        with pytest.raises(ConfigError, match=rf"{name}=.* applies to vLLM generation only"):
            GRPOConfig(**{name: value, **({"vllm_importance_sampling_clip_max": value}
                                          if name == "vllm_importance_sampling_cap" else {})})


def test_trl_warnings_for_combinations_that_train_differently_from_their_paper(caplog):
    caplog.set_level(logging.WARNING, logger="preftune")
    GRPOConfig()
    assert caplog.text == ""
    GRPOConfig(loss_type="luspo")
    assert "LUSPO's paper uses 'sequence'" in caplog.text
    GRPOConfig(importance_sampling_level="sequence")
    assert "GSPO's setup is loss_type='grpo'" in caplog.text


GRPO_REFUSED = ("vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
                "vllm_group_port", "max_tool_calling_iterations", "log_completions_hub_repo")


@pytest.mark.parametrize("name", GRPO_REFUSED)
def test_refused_fields_say_what_to_do_and_pass_unset(name, tmp_path):
    value = {"vllm_server_port": 9000, "vllm_group_port": 1, "vllm_server_timeout": 10.0,
             "max_tool_calling_iterations": 3}.get(name, "somewhere")
    with pytest.raises(ConfigError, match=rf"'{name}' is not a GRPOConfig field: "):
        GRPOConfig(**{name: value})
    p = tmp_path / "trl.yaml"
    p.write_text(f"beta: 0.1\n{name}: {json.dumps(value)}\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: '{name}' is not a GRPOConfig field"):
        GRPOConfig.from_yaml(str(p))
    with pytest.raises(ConfigError, match=rf"'--{name}': '{name}' is not a GRPOConfig field"):
        GRPOConfig.parse_cli([f"--{name}", str(value)])
    unset = GRPOConfig.REFUSED_UNSET.get(name)
    assert GRPOConfig(**{name: unset}) == GRPOConfig()


@pytest.mark.parametrize("name", sorted(set(GRPOConfig.SUPPORTED_ONLY) - set(TrainConfig.SUPPORTED_ONLY)
                                        | {"label_smoothing_factor", "include_for_metrics"}))
def test_supported_only_fields_refuse_other_values_saying_what_to_do(name):
    accepted, instead = GRPOConfig.SUPPORTED_ONLY[name]
    assert name in GRPOConfig.VALIDATED_ONLY
    for value in accepted:
        GRPOConfig(**{name: value})
    other = {"cast_lm_head_to_fp32": True, "ds3_gather_for_generation": False, "cache_implementation": "static",
             "vllm_mode": "server", "label_smoothing_factor": 0.1, "include_for_metrics": ["loss"]}[name]
    with pytest.raises(ConfigError) as e:
        GRPOConfig(**{name: other})
    assert f"{name}=" in str(e.value) and instead in str(e.value)


@pytest.mark.parametrize("name,value", [("log_multimodal", False), ("remove_unused_columns", True),
                                        ("average_tokens_across_devices", False)])
def test_accepted_ignored_fields_warn_with_their_reason(name, value, caplog):
    caplog.set_level(logging.WARNING, logger="preftune")
    GRPOConfig(**{name: value})
    assert f"{name}={value!r} is accepted for compatibility and changes nothing: " \
           f"{GRPOConfig.ACCEPTED_IGNORED[name]}" in caplog.text


def test_loss_types_are_the_objectives():
    objective = pytest.importorskip("preftune.grpo.objective")
    assert tuple(objective.LOSS_TYPES) == LOSS_TYPES


# ---- the generation layout: TRL's derivation, and TRL itself as the twin --------------------------------------
LAYOUTS = [  # (per_device_train_batch_size, gradient_accumulation_steps, num_generations, gen batch, steps, procs)
    (8, 1, 8, None, None, 1), (4, 2, 8, None, None, 1), (4, 1, 8, None, None, 2), (2, 1, 4, 16, None, 1),
    (4, 3, 8, None, 4, 1), (8, 2, 4, None, None, 1), (2, 4, 2, 8, None, 2), (3, 1, 2, None, 2, 1),
]


@pytest.mark.parametrize("bs,gas,g,gen,steps,procs", LAYOUTS)
def test_generation_layout_follows_trls_rules(bs, gas, g, gen, steps, procs, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(procs))
    c = GRPOConfig(per_device_train_batch_size=bs, gradient_accumulation_steps=gas, num_generations=g,
                   generation_batch_size=gen, steps_per_generation=steps)
    got = c.generation_layout(procs)
    if gen is None and steps is None:
        want = (bs * procs * gas, gas)
    elif gen is not None:
        want = (gen, gen // (bs * procs))
    else:
        want = (bs * procs * steps, steps)
    assert got == want and got[0] % g == 0 and c.generation_batch(procs) == got
    assert c.generation_batch_size == gen and c.steps_per_generation == steps  # kept as given, for config.yaml
    assert "prompts x" in c.describe_batch(procs)


def test_generation_layout_errors_name_the_numbers(monkeypatch):
    c = GRPOConfig(per_device_train_batch_size=4, generation_batch_size=16, num_generations=8)
    assert c.generation_layout(1) == (16, 4) and c.generation_layout(2) == (16, 2)
    with pytest.raises(ConfigError, match=r"generation_batch_size=16 must be a multiple .*=4 x 3 processes = 12: "
                       r"set it to 12 or 24"):
        c.generation_layout(3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    c = GRPOConfig(per_device_train_batch_size=8, num_generations=16)
    assert c.generation_layout(2) == (16, 1)
    with pytest.raises(ConfigError, match=r"the generation batch of 24 completions \(per_device_train_batch_size=8 x "
                       r"3 processes x steps_per_generation=1 \(= gradient_accumulation_steps\)\) must hold whole "
                       r"groups of num_generations=16"):
        c.generation_layout(3)


@pytest.mark.parametrize("bs,gas,g,gen,steps", [(8, 1, 8, None, None), (4, 2, 8, None, None), (2, 1, 4, 16, None),
                                                 (4, 3, 8, None, 4), (3, 1, 2, None, 2), (4, 1, 8, 10, None),
                                                 (4, 1, 8, 12, None), (4, 3, 8, None, None), (4, 1, 8, 8, 2)])
def test_generation_layout_equals_trls_own(bs, gas, g, gen, steps, tmp_path):
    """TRL's GRPOConfig derives the same two numbers on one process, and refuses the same layouts."""
    trl = _trl()
    kw = dict(per_device_train_batch_size=bs, gradient_accumulation_steps=gas, num_generations=g,
              generation_batch_size=gen, steps_per_generation=steps)
    try:
        theirs = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kw)
    except ValueError:
        with pytest.raises(ConfigError):
            GRPOConfig(**kw)
        return
    assert GRPOConfig(**kw).generation_layout(1) == (theirs.generation_batch_size, theirs.steps_per_generation)


# ---- YAML, flags, TrlParser ------------------------------------------------------------------------------------
def _nondefault() -> GRPOConfig:
    return GRPOConfig(
        output_dir="o", num_generations=4, per_device_train_batch_size=4, steps_per_generation=2,
        max_completion_length=64, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
        generation_kwargs={"suppress_tokens": [1, 2]}, chat_template_kwargs={"enable_thinking": False},
        beta=0.04, num_iterations=2, epsilon=0.2, epsilon_high=0.28, delta=1.5, importance_sampling_level="sequence",
        loss_type="grpo", reward_funcs=["accuracy_reward", "mymod:fn"], reward_weights=[1.0, 0.5],
        multi_objective_aggregation="normalize_then_sum", scale_rewards="batch", mask_truncated_completions=True,
        sync_ref_model=True, ref_model_sync_steps=4, top_entropy_quantile=0.2, entropy_coef=0.01,
        use_adaptive_entropy=True, off_policy_mask_threshold=0.5, log_completions=True, num_completions_to_print=3,
        dynamic_sampling=True, max_resample_rounds=2, demo_tasks=["concise"], logging_steps=0.05, learning_rate=3e-6)


def test_yaml_round_trip(tmp_path):
    c = _nondefault()
    path = tmp_path / "config.yaml"
    text = c.to_yaml(str(path))
    assert text.startswith("# preftune resolved config: `preftune grpo --config` this file to rerun.")
    assert GRPOConfig.from_yaml(str(path)) == c
    assert yaml.safe_load(text) == c.to_dict() and json.loads(json.dumps(c.to_dict())) == c.to_dict()
    assert GRPOConfig.from_yaml(str(path), beta=0.1).beta == 0.1


def test_cli_round_trip_every_field():
    c = _nondefault()
    parsed, extras = GRPOConfig.parse_cli(_to_argv(c.to_dict()))
    assert parsed == c and extras.fields_set == set(c.to_dict())


def test_cli_reward_flag_is_repeatable():
    c, _ = GRPOConfig.parse_cli(["--reward", "accuracy_reward", "--reward", "mymod:fn", "--reward_funcs", "x.py:f"])
    assert c.reward_funcs == ["accuracy_reward", "mymod:fn", "x.py:f"]
    assert GRPOConfig.from_dict({"reward": ["a"]}).reward_funcs == ["a"]
    # a reward's arguments keep their commas: the flag, a YAML list, a comma-separated string
    spec = "soft_overlong_punishment(max_completion_len=512, soft_punish_cache=128)"
    assert GRPOConfig.parse_cli(["--reward", "accuracy", "--reward", spec])[0].reward_funcs == ["accuracy", spec]
    assert GRPOConfig.from_dict({"reward_funcs": ["accuracy", spec]}).reward_funcs == ["accuracy", spec]
    assert GRPOConfig(reward_funcs=f"accuracy,{spec}").reward_funcs == ["accuracy", spec]
    assert GRPOConfig.parse_cli(["--scale_rewards", "false", "--loss_type", "DR_GRPO"])[0].scale_rewards == "none"


def test_help_lists_every_field_in_a_group():
    import argparse

    text = GRPOConfig.add_arguments(argparse.ArgumentParser(prog="preftune grpo", formatter_class=lambda prog:
                                    argparse.HelpFormatter(prog, width=10_000))).format_help()
    for f in dataclasses.fields(GRPOConfig):
        assert f"--{f.name}" in text and f.metadata["help"][:30] in text, f.name
        assert len(f.metadata["help"]) > 10 and GRPOConfig.FIELD_INFO[f.name]["group"] in GRPOConfig.GROUP_TITLES
    assert "--reward " in text and "generation engines" in text and "rewards and advantages" in text


def test_trl_parser_with_flags_and_a_yaml_file(tmp_path):
    """TRL's GRPO scripts: TrlParser((ScriptArguments, GRPOConfig, ModelConfig)).parse_args_and_config()."""
    trl = _trl()
    parser = trl.TrlParser((trl.ScriptArguments, GRPOConfig, trl.ModelConfig))
    script, args, model = parser.parse_args_and_config([
        "--dataset_name", "prompts.jsonl", "--model_name_or_path", "my-model", "--output_dir", str(tmp_path / "o"),
        "--num_generations", "4", "--per_device_train_batch_size", "4", "--beta", "0.04", "--loss_type", "dr_grpo",
        "--scale_rewards", "false", "--epsilon_high", "0.28", "--gradient_checkpointing", "--use_peft",
        "--generation_kwargs", '{"top_k": 5}', "--reward_weights", "1.0", "0.5"])
    assert isinstance(args, GRPOConfig)
    assert (args.num_generations, args.beta, args.loss_type, args.scale_rewards, args.resolved_epsilon_high) == (
        4, 0.04, "dr_grpo", "none", 0.28)
    assert args.gradient_checkpointing is True and args.generation_kwargs == {"top_k": 5}
    assert args.reward_weights == [1.0, 0.5]
    assert (script.dataset_name, model.model_name_or_path, model.use_peft) == ("prompts.jsonl", "my-model", True)
    assert args.model_name_or_path is None  # the script passes it on itself

    path = tmp_path / "recipe.yaml"
    path.write_text("output_dir: %s\nnum_generations: 2\nper_device_train_batch_size: 4\nloss_type: dapo\n"
                    "epsilon_high: 0.28\nmask_truncated_completions: true\nmax_completion_length: 128\n"
                    "use_vllm: false\nvllm_mode: colocate\n" % (tmp_path / "o2"))
    _, args, _ = parser.parse_args_and_config(["--config", str(path), "--temperature", "0.9"])
    assert (args.num_generations, args.max_completion_length, args.temperature) == (2, 128, 0.9)
    assert args.mask_truncated_completions is True
    with pytest.raises(ConfigError, match="vllm_mode='server'"):
        parser.parse_args_and_config(["--output_dir", "o", "--vllm_mode", "server"])


# ---- `preftune grpo` -------------------------------------------------------------------------------------------
@pytest.fixture
def fake_run(monkeypatch):
    """preftune.grpo.run stand-in that records the config `preftune grpo` trains with."""
    seen = []
    module = types.ModuleType("preftune.grpo.run")
    module.train = seen.append
    monkeypatch.setitem(sys.modules, "preftune.grpo.run", module)
    return seen


def test_preftune_grpo_parses_its_flags(fake_run):
    from preftune.cli import USAGE, main

    assert main(["grpo", "--dataset", "p.jsonl", "--reward", "a", "--reward", "b", "--num_generations", "4",
                 "--per_device_train_batch_size", "4"]) == 0
    (c,) = fake_run
    assert isinstance(c, GRPOConfig) and c.reward_funcs == ["a", "b"] and c.dataset_name == "p.jsonl"
    assert c.learning_rate == 1e-6  # TRL's default: no demo defaults with a dataset
    assert "grpo" in USAGE


def test_preftune_grpo_without_arguments_is_the_demo(fake_run):
    from preftune.cli import main

    assert main(["grpo"]) == 0 and main(["grpo", "--max_steps", "5"]) == 0
    demo = GRPOConfig.demo_defaults()
    assert fake_run[0] == GRPOConfig(**demo)
    assert fake_run[1].max_steps == 5 and fake_run[1].reward_funcs == demo["reward_funcs"]
    c = fake_run[0]
    assert c.reward_funcs and c.dataset_name is None and c.max_completion_length <= 48
    assert c.num_generations == 8 and c.demo_generation_prompts > 0 and c.generation_layout(1)[0] % 8 == 0


def test_preftune_grpo_errors_name_the_flag(fake_run, capsys):
    from preftune.cli import main

    assert main(["grpo", "--vllm_server_host", "h"]) == 1
    err = capsys.readouterr().err
    assert "'--vllm_server_host': 'vllm_server_host' is not a GRPOConfig field: vLLM's server mode" in err
    assert main(["grpo", "--num_generations", "1"]) == 1
    assert "--num_generations: num_generations=1" in capsys.readouterr().err
    assert fake_run == []


# ---- docs/differences_from_trl.md agrees with the class attributes ----------------------------------------------
def _differences_page() -> str:
    return (pathlib.Path(__file__).parents[1] / "docs" / "differences_from_trl.md").read_text(encoding="utf-8")


def test_differences_page_lists_what_the_code_does():
    """The GRPO lists are GRPOConfig's entries that are not TrainConfig's (those are in the DPO lists)."""
    G, T = GRPOConfig, TrainConfig
    want = {
        "GRPO accepted and ignored": [f"- `{n}`: {why}" for n, why in G.ACCEPTED_IGNORED.items()
                                      if T.ACCEPTED_IGNORED.get(n) != why],
        "GRPO accepted with preftune's behaviour only": [
            f"- `{n}`: only {' or '.join(f'`{v!r}`' for v in ok)}; {why}" for n, (ok, why) in G.SUPPORTED_ONLY.items()
            if T.SUPPORTED_ONLY.get(n) != (ok, why)],
        "GRPO refused by name": [f"- `{n}`: {why}" for n, why in G.REFUSED.items() if T.REFUSED.get(n) != why],
    }
    sections = {}
    for part in _differences_page().split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        sections[title.strip()] = [line for line in body.splitlines() if line.startswith("- `")]
    for title, lines in want.items():
        assert lines and sections.get(title) == lines, f"docs/differences_from_trl.md '{title}' differs from GRPOConfig"


def test_preftune_grpo_help_and_unknown_fields_name_the_command(capsys):
    from preftune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: preftune grpo" in out
    for flag in ("--num_generations", "--reward REWARD_FUNCS", "--loss_type", "--scale_rewards", "--config"):
        assert flag.split()[0] in out, flag
    with pytest.raises(ConfigError, match="unknown field 'zzz'; `preftune grpo --help` lists every field"):
        GRPOConfig(zzz=1)
