"""preftune.model_card: the README.md of a saved model folder, its YAML header and its body."""

from __future__ import annotations

import json

import yaml

from preftune import __version__
from preftune.model_card import (
    EMBEDDED_BASE,
    last_metrics,
    loss_params,
    render_model_card,
    run_card_inputs,
    write_model_card,
)


def header_and_body(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def card(**kw) -> str:
    args = dict(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", datasets=["trl-lib/ultrafeedback_binarized"],
                algorithm="DPO", loss="sigmoid", params={"beta": 0.1, "learning_rate": 5e-7},
                train_metrics={"step": 10, "loss": 0.5123}, eval_metrics={"step": 10, "eval_loss": 0.6},
                command_or_config="preftune train --beta 0.1", version="9.9.9")
    return render_model_card(**{**args, **kw})


def test_header_holds_hub_names_and_tags():
    head, body = header_and_body(card())
    assert head == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                    "tags": ["preftune", "dpo", "sigmoid"], "datasets": ["trl-lib/ultrafeedback_binarized"]}
    assert "9.9.9" in body and "`beta` | 0.1 |" in body and "`learning_rate` | 5e-07 |" in body
    assert "`loss` | 0.5123 |" in body and "`eval_loss` | 0.6 |" in body
    assert "```bash\npreftune train --beta 0.1\n```" in body


def test_local_paths_stay_out_of_the_header(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    head, body = header_and_body(card(base_model=str(tmp_path), datasets=[str(tmp_path / "train.jsonl")],
                                      loss=["sigmoid", "sft"], library_name="peft"))
    assert "base_model" not in head and "datasets" not in head
    assert head["library_name"] == "peft" and head["tags"] == ["preftune", "dpo", "sigmoid", "sft", "lora"]
    assert f"`{tmp_path}`" in body and str(tmp_path / "train.jsonl") in body and "LoRA adapters" in body


def test_a_config_is_a_yaml_block_and_missing_metrics_no_section():
    text = card(command_or_config="beta: 0.1\nloss_type: ipo\n", train_metrics=None, eval_metrics={})
    _, body = header_and_body(text)
    assert "```yaml\nbeta: 0.1\nloss_type: ipo\n```" in body
    assert "training metrics" not in body and "evaluation metrics" not in body


def test_write_picks_library_from_the_folder(tmp_path):
    inputs = dict(base_model=None, datasets=[], algorithm="DPO", loss="ipo", params={}, train_metrics=None,
                  eval_metrics=None, command_or_config="", version="1")
    path = write_model_card(tmp_path / "full", **inputs)
    assert path.name == "README.md" and header_and_body(path.read_text())[0]["library_name"] == "transformers"
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    head, body = header_and_body(write_model_card(tmp_path / "lora", **inputs).read_text())
    assert head["library_name"] == "peft" and "a model given in code" in body
    assert not list(tmp_path.glob("*/.README*"))  # no temporary file left


def test_last_metrics_splits_train_and_eval_rows(tmp_path):
    rows = [{"step": 1, "loss": 0.7}, {"step": 1, "eval_loss": 0.69}, {"step": 2, "loss": 0.6},
            {"step": 2, "eval_loss": 0.65, "eval_rewards/accuracies": 0.75}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # a torn last line
    assert last_metrics(path) == (rows[2], rows[3])
    assert last_metrics(tmp_path / "absent.jsonl") == (None, None)


def test_loss_params_name_what_the_loss_reads():
    from preftune.config import DPOConfig

    plain = loss_params(DPOConfig(output_dir="x").to_dict())
    assert plain == {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl"}
    simpo = loss_params(DPOConfig(output_dir="x", loss_type="simpo", beta=2.0, simpo_gamma=1.0).to_dict())
    assert simpo == {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "label_smoothing": 0.0}  # no divergence
    fdpo = loss_params(DPOConfig(output_dir="x", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                                 rpo_alpha=1.0, sync_ref_model=True).to_dict())
    assert fdpo["f_alpha_divergence_coef"] == 0.3 and fdpo["rpo_alpha"] == 1.0
    assert fdpo["sync_ref_model"] is True and fdpo["ref_model_sync_steps"] == 512


def test_run_card_inputs_from_a_config(tmp_path):
    from preftune.config import DPOConfig

    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 0.5}\n{"step": 4, "eval_loss": 0.4}\n')
    config = DPOConfig(output_dir="x", dataset_name="trl-lib/ultrafeedback_binarized", eval_dataset="test",
                       max_steps=4, use_peft=True).to_dict()
    inputs = run_card_inputs(config, metrics_path=tmp_path / "metrics.jsonl")
    assert inputs["base_model"] == EMBEDDED_BASE  # model_name_or_path unset: the embedded SmolLM2
    assert inputs["datasets"] == ["trl-lib/ultrafeedback_binarized"]  # "test" is a split, not a dataset
    assert inputs["train_metrics"] == {"step": 4, "loss": 0.5} and inputs["eval_metrics"]["eval_loss"] == 0.4
    assert inputs["params"]["max_steps"] == 4 and inputs["params"]["lora_r"] == 16
    assert inputs["version"] == __version__ and "num_train_epochs" not in inputs["params"]  # max_steps rules
    assert yaml.safe_load(inputs["command_or_config"]) == {  # the fields set, which rerun it with the defaults
        "output_dir": "x", "use_peft": True, "dataset_name": "trl-lib/ultrafeedback_binarized",
        "eval_dataset": "test", "max_steps": 4}
    assert DPOConfig(**yaml.safe_load(inputs["command_or_config"])).to_dict() == config
    head, _ = header_and_body(render_model_card(**inputs))
    assert head["base_model"] == EMBEDDED_BASE and head["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    other = run_card_inputs(config, algorithm="GRPO", defaults={**config, "max_steps": -1})
    assert other["algorithm"] == "GRPO" and yaml.safe_load(other["command_or_config"]) == {"output_dir": "x",
                                                                                          "max_steps": 4}
    demo = run_card_inputs(DPOConfig(output_dir="x").to_dict())
    assert demo["datasets"] == ["preftune's bundled demo preference data"] and "max_steps" not in demo["params"]
    assert "lora_r" not in demo["params"] and demo["params"]["num_train_epochs"] == 3.0
