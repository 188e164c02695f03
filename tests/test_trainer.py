"""The training loop end to end on tiny random models (CPU, a few optimizer steps each).

Each test names the property of issue 3 it holds the trainer to: data formats and truncation,
prompt masking, gradient accumulation (eq. 6.13), precomputed vs live reference and its cache,
LoRA and TR-DPO references, reference-free simpo, every loss variant, the TRL-style API and
checkpoint rotation / exact resume.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from preftune import DPOConfig, DPOTrainer
from preftune.data.batching import collate
from preftune.data.demo import demo_dataset
from preftune.logps import logps_from_logits, model_logps
from preftune.testing import tiny_model, tiny_tokenizer

VOCAB = 300


# ------------------------------------------------------------------------------------------- helpers


def conversational_rows(n: int, split: str = "train") -> list[dict]:
    return demo_dataset(split, n=n)


def standard_rows(n: int) -> list[dict]:
    return [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"], "extra": i} for i, r in enumerate(demo_dataset("train", n=n))]


def implicit_rows(n: int) -> list[dict]:
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in demo_dataset("train", n=n)]


def config(tmp_path, name: str = "out", **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                per_device_eval_batch_size=4, logging_steps=1, save_strategy="no", max_length=160,
                max_prompt_length=96, learning_rate=1e-3, seed=0, report_to=["none"])
    base.update(kw)
    return DPOConfig(**base)


def make_trainer(tmp_path, rows=None, *, model=None, eval_rows=None, peft_config=None, callbacks=None,
                 name: str = "out", **kw) -> DPOTrainer:
    return DPOTrainer(model=model if model is not None else tiny_model(VOCAB), args=config(tmp_path, name, **kw),
                      train_dataset=rows if rows is not None else conversational_rows(8), eval_dataset=eval_rows,
                      processing_class=tiny_tokenizer(), peft_config=peft_config, callbacks=callbacks)


def train_rows(trainer) -> list[dict]:
    """Train lines of metrics.jsonl (eval lines carry eval_* keys instead of loss)."""
    lines = (Path(trainer.args.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------ data formats


@pytest.mark.parametrize("rows, fmt", [
    (standard_rows(6), "standard"),
    (conversational_rows(6), "conversational"),
    (implicit_rows(6), "conversational_implicit"),
    ([{"chosen": f"Q{i}: say yes. A: yes", "rejected": f"Q{i}: say yes. A: no!"} for i in range(6)],
     "standard_implicit"),
])
def test_each_format_trains(tmp_path, rows, fmt):
    trainer = make_trainer(tmp_path, rows)
    assert trainer.train_split.format == fmt
    out = trainer.train()
    assert math.isfinite(out.training_loss) and out.global_step == 2
    assert all(math.isfinite(r["loss"]) for r in train_rows(trainer))


def test_implicit_prompt_tokenizes_like_explicit(tmp_path):
    explicit = make_trainer(tmp_path, conversational_rows(6), name="a").train_split.features
    implicit = make_trainer(tmp_path, implicit_rows(6), name="b").train_split.features
    for e, i in zip(explicit, implicit, strict=True):
        assert (e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) == (i["prompt_ids"], i["chosen_ids"],
                                                                         i["rejected_ids"])


def test_truncation_drops_are_counted_and_never_nan(tmp_path, caplog):
    rows = standard_rows(8)
    rows[1]["prompt"] = rows[5]["prompt"] = "x" * 300  # longer than max_length on its own
    caplog.set_level(logging.WARNING, logger="preftune")
    trainer = make_trainer(tmp_path, rows, max_length=128, max_prompt_length=None, truncation_mode="keep_start")
    assert len(trainer.train_split) == 6
    assert dict(trainer.train_split.features.dropped) == {"prompt_too_long": 2}
    assert "dropped by truncation: prompt_too_long=2" in caplog.text
    assert all(len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) <= 128
               for f in trainer.train_split.features)
    for row in (trainer.train().metrics, *train_rows(trainer)):
        assert all(math.isfinite(v) for v in row.values())


def test_all_pairs_dropped_is_an_error_naming_the_limit(tmp_path):
    rows = standard_rows(4)
    for r in rows:
        r["prompt"] = "y" * 200
    with pytest.raises(ValueError, match="no usable preference pair.*max_length"):
        make_trainer(tmp_path, rows, max_length=32, max_prompt_length=None, truncation_mode="keep_start")


# ----------------------------------------------------------------------------------- prompt masking


def test_prompt_masking_twin_full_logits(tmp_path):
    """model_logps equals the full-logits sum over completion labels, which ignores every logit that
    predicts a prompt token; including the prompt in the sum would give another number."""
    trainer = make_trainer(tmp_path, standard_rows(4))
    model, tok = trainer.model, trainer.tokenizer
    batch = collate(list(trainer.train_split.features), layout="padded", pad_token_id=tok.pad_token_id)
    fast = model_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    labels = batch["labels"]
    slow, counts = logps_from_logits(logits, labels)
    torch.testing.assert_close(torch.cat([fast.chosen_logps, fast.rejected_logps]), slow, atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.cat([fast.chosen_lengths, fast.rejected_lengths]), counts)
    # positions t whose next token t+1 is not a completion token: perturbing them changes nothing
    predicts_other = torch.ones_like(labels, dtype=torch.bool)
    predicts_other[:, :-1] = labels[:, 1:] == -100
    noisy = logits + 50.0 * torch.randn_like(logits) * predicts_other[..., None]
    torch.testing.assert_close(logps_from_logits(noisy, labels)[0], slow, atol=0, rtol=0)
    # the prompt is really there: unmasking it in the labels changes the sum
    prompt = (labels == -100) & (batch["attention_mask"] == 1)
    prompt[:, 0] = False
    assert prompt.any()
    with_prompt = torch.where(prompt, batch["input_ids"], labels)
    assert (logps_from_logits(logits, with_prompt)[0] < slow - 1.0).all()


@pytest.mark.parametrize("layout", ["padded", "prefix"])
def test_prompt_masking_through_training(tmp_path, monkeypatch, layout):
    """Noise added to the final hidden states at every position that does not predict a completion
    token leaves the logged losses and trained weights bit-identical; the same noise on
    completion-predicting positions changes them (so the probe works)."""
    import preftune.trainer as trainer_mod

    seen = {}

    def recording_collate(*a, **k):
        seen["batch"] = batch = collate(*a, **k)
        return batch

    monkeypatch.setattr(trainer_mod, "collate", recording_collate)

    def run(name, where):
        # a live reference: the hook below must see the trainer's own batches in both forwards
        trainer = make_trainer(tmp_path, standard_rows(4), name=name, batch_layout=layout,
                               precompute_ref_log_probs=False)

        def hook(_module, _args, hidden):
            if where is None:
                return hidden
            r, t, h = hidden.shape
            on = torch.zeros(r * t, dtype=torch.bool)
            on[seen["batch"]["positions"]] = True
            mask = on if where == "completion" else ~on
            gen = torch.Generator().manual_seed(len(seen))
            noise = 30.0 * torch.randn(r * t, h, generator=gen) * mask[:, None]
            return hidden + noise.view(r, t, h)

        trainer.model.model.norm.register_forward_hook(hook)
        trainer.train()
        return [r["loss"] for r in train_rows(trainer)], weights(trainer)

    clean_loss, clean_w = run("clean", None)
    other_loss, other_w = run("other", "prompt")
    assert other_loss == clean_loss
    assert_same_weights(clean_w, other_w, atol=0)
    hit_loss, hit_w = run("hit", "completion")  # step 1: policy == reference (both hooked), loss ln 2
    assert abs(hit_loss[1] - clean_loss[1]) > 1e-4
    assert any(not torch.equal(hit_w[n], clean_w[n]) for n in clean_w)


# ----------------------------------------------------------------------------- gradient accumulation


def test_accumulation_1x4_equals_4x1(tmp_path):
    rows = conversational_rows(12)
    a = make_trainer(tmp_path, rows, name="a", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                     max_steps=3)
    b = make_trainer(tmp_path, rows, name="b", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_steps=3)
    a.train()
    b.train()
    ra, rb = train_rows(a), train_rows(b)
    assert [r["step"] for r in ra] == [1, 2, 3]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    assert ra[-1]["rewards/margins"] != 0.0  # the weights moved
    assert_same_weights(weights(a), weights(b), atol=1e-5)


# ------------------------------------------------------------------------------------ the reference


def test_precomputed_reference_equals_live_and_cache_is_keyed(tmp_path, caplog):
    rows = conversational_rows(8)
    caplog.set_level(logging.INFO, logger="preftune")
    cache = str(tmp_path / "refcache")
    live = make_trainer(tmp_path, rows, name="live", max_steps=3, precompute_ref_log_probs=False)
    live.train()
    assert live.reference.needs_forward
    pre = make_trainer(tmp_path, rows, name="pre", max_steps=3, precompute_ref_log_probs=True, cache_dir=cache)
    pre.train()
    assert pre.reference.needs_forward is False  # the reference model is gone, only the table stays
    for x, y in zip(train_rows(live), train_rows(pre), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-4, abs=1e-6)
    assert_same_weights(weights(live), weights(pre), atol=1e-5)
    assert "saved reference log-probs" in caplog.text and "reusing" not in caplog.text

    caplog.clear()
    again = make_trainer(tmp_path, rows, name="again", max_steps=1, precompute_ref_log_probs=True, cache_dir=cache)
    again.train()
    assert "reusing reference log-probs" in caplog.text
    assert torch.equal(again.reference.table, pre.reference.table)

    for changed in (dict(max_length=150), dict(rows=conversational_rows(7))):
        caplog.clear()
        other = make_trainer(tmp_path, changed.pop("rows", rows), name="changed", max_steps=1,
                             precompute_ref_log_probs=True, cache_dir=cache, **changed)
        other.train()
        assert "reusing" not in caplog.text and "saved reference log-probs" in caplog.text
    assert len(list((tmp_path / "refcache").glob("*.safetensors"))) == 3


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **kw)


def test_lora_reference_is_the_base_model(tmp_path):
    from preftune.reference import AdapterDisabledReference

    trainer = make_trainer(tmp_path, peft_config=_lora(), learning_rate=1e-2)
    trainer.train()
    assert isinstance(trainer.reference, AdapterDisabledReference)
    assert trainer.reference.model is trainer.accelerator.unwrap_model(trainer.model)  # no second copy
    batch = collate(list(trainer.train_split.features)[:4], layout="prefix",
                    pad_token_id=trainer.tokenizer.pad_token_id)
    ref = trainer.reference.logps(batch)
    base = tiny_model(VOCAB)  # the same seed: the untouched base weights
    base.eval()
    with torch.no_grad():
        want = model_logps(base, batch)
        policy = model_logps(trainer.model, batch)
    torch.testing.assert_close(ref.chosen_logps, want.chosen_logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ref.rejected_logps, want.rejected_logps, atol=1e-5, rtol=1e-6)
    assert (policy.chosen_logps - want.chosen_logps).abs().max() > 1e-3  # the adapters did train


@pytest.mark.parametrize("lora", [False, True])
def test_tr_dpo_sync_is_the_mixup_formula(tmp_path, lora):
    snaps, holder = [], {}

    class Snapshot(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" not in logs:  # the run's closing summary (train_loss, ...)
                return
            t = holder["t"]
            ref_model = t.reference.model
            pol = dict(t.accelerator.unwrap_model(t.model).named_parameters())
            ref = dict(ref_model.named_parameters())
            if lora:  # the "ref" adapter tracks the policy's "default" adapter
                pairs = {n: (ref[n.replace(".default.", ".ref.")], p) for n, p in pol.items() if ".default." in n}
            else:
                pairs = {n: (ref[n], p) for n, p in pol.items()}
            snaps.append({n: (r.detach().clone(), p.detach().clone()) for n, (r, p) in pairs.items()})

    t = holder["t"] = make_trainer(tmp_path, peft_config=_lora(init_lora_weights=False) if lora else None,
                                   callbacks=[Snapshot()], sync_ref_model=True, ref_model_sync_steps=1,
                                   ref_model_mixup_alpha=0.5, max_steps=2)
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert len(snaps) == 2
    for name, (ref1, pol1) in snaps[0].items():
        ref2, pol2 = snaps[1][name]
        assert not torch.equal(pol1, pol2)
        torch.testing.assert_close(ref1, 0.5 * pol1 + 0.5 * start[name], atol=1e-7, rtol=0)
        torch.testing.assert_close(ref2, 0.5 * pol2 + 0.5 * ref1, atol=1e-7, rtol=0)


def test_simpo_builds_no_reference(tmp_path, monkeypatch):
    import preftune.models
    import preftune.reference

    def forbidden(*a, **k):
        raise AssertionError("simpo must not build or run a reference")

    monkeypatch.setattr(preftune.reference, "make_reference", forbidden)
    monkeypatch.setattr(preftune.reference.sources, "forward_logps", forbidden)
    monkeypatch.setattr(preftune.models, "load_model", forbidden)
    trainer = make_trainer(tmp_path, eval_rows=conversational_rows(4, "eval"), loss_type="simpo", beta=2.0,
                           eval_strategy="steps", eval_steps=1)
    assert trainer.needs_reference is False
    out = trainer.train()
    assert trainer.reference is None
    assert math.isfinite(out.training_loss)
    assert math.isfinite(trainer.evaluate()["eval_loss"])


# -------------------------------------------------------------------------------------- loss zoo


@pytest.mark.parametrize("kw", [
    dict(f_divergence_type="js_divergence"),
    dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6),
    dict(loss_type="exo_pair"),
    dict(loss_type="nca_pair"),
    dict(loss_type="hinge"),
    dict(rpo_alpha=1.0),
    dict(loss_type="simpo", simpo_gamma=0.5, beta=2.0),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_every_variant_trains_with_finite_loss(tmp_path, kw):
    trainer = make_trainer(tmp_path, conversational_rows(4), **kw)
    trainer.train()
    rows = train_rows(trainer)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    if kw.get("rpo_alpha"):
        assert all(math.isfinite(r["nll_loss"]) for r in rows)


# ------------------------------------------------------------------------------- TRL-style API


def test_trl_style_api_runs_the_documents_example(tmp_path, caplog):
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoTokenizer

    from preftune.checkpoint import list_checkpoints

    caplog.set_level(logging.WARNING, logger="preftune")
    model, tokenizer = tiny_model(VOCAB), tiny_tokenizer()
    train_dataset = Dataset.from_list(standard_rows(8))
    eval_dataset = Dataset.from_list(standard_rows(4))
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), beta=0.1, learning_rate=5e-7, loss_type="sigmoid", max_length=160,
        max_prompt_length=96, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        gradient_checkpointing=True, bf16=True, num_train_epochs=1, warmup_ratio=0.1, logging_steps=1,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, report_to=["none"],
    )
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    assert "training in float32" in caplog.text  # bf16 on CPU falls back instead of crawling
    assert trainer.accelerator.mixed_precision == "no"
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= metrics.keys()
    assert [p.name for p in list_checkpoints(tmp_path / "dpo")] == ["checkpoint-1", "checkpoint-2"]
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2]  # eval_on_start is off, as in TRL
    trainer.save_model()

    loaded = PeftModel.from_pretrained(tiny_model(VOCAB), str(tmp_path / "dpo"))
    AutoTokenizer.from_pretrained(str(tmp_path / "dpo"))
    batch = collate(list(trainer.train_split.features)[:2], layout="padded", pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        want = model_logps(trainer.model, batch).chosen_logps
        got = model_logps(loaded, batch).chosen_logps
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_full_model_save_loads_with_auto_class(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    out = trainer.save_model()
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert_same_weights(weights(trainer), dict(loaded.named_parameters()), atol=0)


# ---------------------------------------------------------------------------------- checkpoints


class _Stop(Exception):
    pass


def test_save_total_limit_keeps_the_last_k(tmp_path):
    from preftune.checkpoint import MARKER, list_checkpoints

    trainer = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2)
    trainer.train()
    kept = list_checkpoints(tmp_path / "out")
    assert [p.name for p in kept] == ["checkpoint-3", "checkpoint-4"]
    assert all((p / MARKER).is_file() and (p / "optimizer.pt").is_file() for p in kept)
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_resume_latest_reaches_the_uninterrupted_weights(tmp_path):
    rows = conversational_rows(8)
    whole = make_trainer(tmp_path, rows, name="whole", max_steps=4)
    whole.train()

    class StopAtStep3(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3:
                raise _Stop

    first = make_trainer(tmp_path, rows, name="cut", max_steps=4, save_strategy="steps", save_steps=2, callbacks=[StopAtStep3()])
    with pytest.raises(_Stop):
        first.train()
    resumed = make_trainer(tmp_path, rows, name="cut", max_steps=4, save_strategy="steps", save_steps=2,
                           resume_from_checkpoint="latest")
    resumed.train()
    assert resumed.state.global_step == 4
    assert_same_weights(weights(whole), weights(resumed), atol=1e-6)
    assert [r["step"] for r in train_rows(resumed)] == [1, 2, 3, 4]
    for x, y in zip(train_rows(whole), train_rows(resumed), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)


def test_automatic_reference_precomputes_only_the_pairs_the_run_uses(tmp_path, caplog):
    """precompute_ref_log_probs=None: the reference pass covers exactly the planned pairs, with the
    policy itself before training (no reference model in memory), and trains like a live reference."""
    from preftune.data.pipeline import StepPlan

    rows = conversational_rows(16)
    caplog.set_level(logging.INFO, logger="preftune")
    auto = make_trainer(tmp_path, rows, name="auto", max_steps=2, per_device_train_batch_size=2)
    auto.train()
    assert auto.reference.needs_forward is False
    plan = StepPlan(16, 2, 1, 1, auto.args.seed)
    used = set(plan.permutation(0)[:4])
    computed = {i for i in range(auto.reference.table.shape[0]) if not torch.isnan(auto.reference.table[i]).any()}
    assert computed == used  # 4 of 16 pairs: never more forwards than a live reference
    assert "precomputing the 4 of 16 training pairs" in caplog.text
    live = make_trainer(tmp_path, rows, name="live", max_steps=2, per_device_train_batch_size=2,
                        precompute_ref_log_probs=False)
    live.train()
    for x, y in zip(train_rows(live), train_rows(auto), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert_same_weights(weights(live), weights(auto), atol=1e-5)
    # LoRA and TR-DPO keep a live reference
    lora = make_trainer(tmp_path, rows, name="lora", max_steps=1, peft_config=_lora())
    assert lora._source() != "cache"
    trdpo = make_trainer(tmp_path, rows, name="trdpo", max_steps=1, sync_ref_model=True)
    assert trdpo._source() != "cache"


def test_gpu_shape_defaults_resolve_and_rounded_rows_train_the_same(tmp_path):
    from types import SimpleNamespace

    from preftune.trainer import resolve_layout, resolve_shapes

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cfg = lambda **kw: SimpleNamespace(**{"pad_to_multiple_of": None, "cudnn_attention": None, **kw})  # noqa: E731
    assert resolve_shapes(cfg(), cpu) == (None, False)
    assert resolve_shapes(cfg(), gpu) == (64, True)
    assert resolve_shapes(cfg(pad_to_multiple_of=1), gpu) == (None, False)
    assert resolve_shapes(cfg(cudnn_attention=False), gpu) == (64, False)
    assert resolve_shapes(cfg(pad_to_multiple_of=32, cudnn_attention=True), cpu) == (32, True)
    assert resolve_layout("auto") == "prefix" and resolve_layout("padded") == "padded"

    rows = conversational_rows(8)
    a = make_trainer(tmp_path, rows, name="a", per_device_train_batch_size=4, max_steps=2)
    b = make_trainer(tmp_path, rows, name="b", per_device_train_batch_size=4, max_steps=2, pad_to_multiple_of=48)
    assert (a.pad_multiple, b.pad_multiple) == (None, 48)
    a.train()
    b.train()
    for x, y in zip(train_rows(a), train_rows(b), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    assert_same_weights(weights(a), weights(b), atol=1e-5)


def test_eval_set_without_eval_strategy_is_unused_and_said_so(tmp_path, caplog):
    """The Python API keeps TRL's meaning of eval_strategy='no' (no evaluation) and warns once."""
    caplog.set_level(logging.WARNING, logger="preftune")
    trainer = make_trainer(tmp_path, eval_rows=conversational_rows(4, "eval"), max_steps=2)
    trainer.train()
    lines = (Path(trainer.args.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert not any("eval_loss" in json.loads(x) for x in lines)
    assert caplog.text.count("it is not used during training") == 1
    caplog.clear()
    on_start = make_trainer(tmp_path, eval_rows=conversational_rows(4, "eval"), max_steps=1, name="start",
                            eval_on_start=True)
    on_start.train()
    rows = [json.loads(x) for x in (Path(on_start.args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0]  # before the first step only
    assert "not used during training" not in caplog.text


def test_ref_model_name_or_path_is_the_reference_of_a_lora_run(tmp_path):
    """A LoRA run with ref_model_name_or_path compares against that model, not the adapters-off policy."""
    from preftune.reference import AdapterDisabledReference, FrozenModelReference

    ref_dir = tmp_path / "ref"
    tiny_model(VOCAB, seed=7).save_pretrained(ref_dir)
    trainer = make_trainer(tmp_path, max_steps=1, peft_config=_lora(), ref_model_name_or_path=str(ref_dir))
    trainer.train()
    assert isinstance(trainer.reference, FrozenModelReference)
    want = tiny_model(VOCAB, seed=7).state_dict()
    got = trainer.reference.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    plain = make_trainer(tmp_path, max_steps=1, peft_config=_lora(), name="plain")
    plain.train()
    assert isinstance(plain.reference, AdapterDisabledReference)
    assert train_rows(trainer)[0]["rewards/margins"] != train_rows(plain)[0]["rewards/margins"]


def test_saved_models_carry_a_model_card_and_merge_lora_merges_at_the_end(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, max_steps=1, peft_config=_lora(), merge_lora=True, name="lora")
    trainer.train()
    out = trainer.save_model()
    card = (out / "README.md").read_text()
    assert "DPO" in card and "preftune" in card and "sigmoid" in card
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # no peft needed
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (out / "merged" / "README.md").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, policy(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
    assert any("lora_" in n for n, _ in policy.named_parameters())  # the trained model keeps its adapters
    with pytest.raises(ValueError, match="merge_lora=True but the run trains no LoRA adapters"):
        make_trainer(tmp_path, max_steps=1, merge_lora=True, name="full")


def test_the_constructor_takes_trls_positional_order():
    import inspect

    trl = pytest.importorskip("trl")
    ours = list(inspect.signature(DPOTrainer.__init__).parameters)
    theirs = list(inspect.signature(trl.DPOTrainer.__init__).parameters)
    assert ours[: len(theirs)] == theirs
