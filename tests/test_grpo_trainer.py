"""GRPOTrainer on tiny random models: what it logs, that its update is the written-out GRPO update, that the
batch layouts agree, exact resume in the middle of a generation round, errors before any update, dynamic
sampling, and the options that change which log-probs are computed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preftune.testing import tiny_model, tiny_tokenizer

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: name a {WORDS[i % len(WORDS)]} thing", "kind": "flat" if i % 3 == 0 else "len"}
            for i in range(n)]


def length_reward(completions, **kwargs):
    """Varies within a group: the number of distinct characters of the completion."""
    return [len(set(c)) / 10.0 for c in completions]


def kind_reward(completions, kind, **kwargs):
    """All-equal (no signal) for the 'flat' prompts, varied for the others."""
    return [1.0 if k == "flat" else len(set(c)) / 10.0 for c, k in zip(completions, kind)]


def make_config(tmp_path, **kw):
    from preftune import GRPOConfig

    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, use_cpu=True, learning_rate=1e-2, report_to=[], logging_steps=1, seed=0,
                save_strategy="no", gradient_checkpointing=False, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def make_trainer(tmp_path, rows=None, reward=length_reward, model=None, rollout_func=None, sgd=None, **kw):
    """A GRPOTrainer on a tiny random Llama; sgd=lr: plain SGD (AdamW's normalized step turns float-rounding
    differences of near-zero gradients into differences of the learning rate's size)."""
    from preftune import GRPOTrainer

    model = model if model is not None else tiny_model(300, seed=0)
    optimizers = (torch.optim.SGD(model.parameters(), lr=sgd), None) if sgd else (None, None)
    return GRPOTrainer(model=model, reward_funcs=reward, args=make_config(tmp_path, **kw),
                       train_dataset=rows if rows is not None else prompt_rows(16), processing_class=tiny_tokenizer(),
                       rollout_func=rollout_func, optimizers=optimizers)


def fixed_rollout(lengths=(3, 5)):
    """A rollout_func giving each prompt the same made-up completions (ending at EOS), so runs can be compared."""
    def rollout(prompts, trainer):
        tok = trainer.tokenizer
        G = trainer.num_generations
        prompt_ids, completion_ids = [], []
        for p in prompts:
            ids = list(tok(p)["input_ids"])
            for g in range(G):
                n = lengths[g % len(lengths)] + (len(p) % 3)
                completion_ids.append([(ord(p[(j + g) % len(p)]) % 200) + 50 for j in range(n)] + [tok.eos_token_id])
                prompt_ids.append(ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": [[0.0] * len(c)
                                                                                          for c in completion_ids]}
    return rollout


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trains_and_logs_trls_metric_names(tmp_path):
    trainer = make_trainer(tmp_path)
    before = weights(trainer.model)
    trainer.train()
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "grad_norm", "reward", "reward_std", "rewards/length_reward/mean", "rewards/length_reward/std",
                "frac_reward_zero_std", "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "completions/mean_terminated_length", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "num_tokens", "completions_per_second"):
        assert key in rows[0], key
    assert "kl" not in rows[0]  # beta = 0: no reference, no KL
    assert trainer.reference is None
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[1]["num_tokens"] > rows[0]["num_tokens"] > 0
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _written_out_step(model, tokenizer, prompts_ids, completions, rewards, G, lr):
    """One on-policy GRPO step (loss_type dapo, beta 0, scale_rewards group) by hand: full logits per completion,
    advantages (r - group mean) / (group std + 1e-4), loss -sum_t A_i * ratio_t / (completion tokens), SGD."""
    import copy

    m = copy.deepcopy(model)
    m.train()
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    total_tokens = sum(len(c) for c in completions)
    loss = 0.0
    for i, (p, c) in enumerate(zip(prompts_ids, completions)):
        ids = torch.tensor([p + c])
        logits = m(input_ids=ids).logits[0, len(p) - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        ratio = torch.exp(lp - lp.detach())
        loss = loss - (adv[i].float() * ratio).sum() / total_tokens
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return m, float(loss.detach())


def test_one_step_is_the_written_out_grpo_update(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(300, seed=1)
    seen = {}

    def reward(prompts, completions, completion_ids, **kw):
        out = [float(len(set(c))) + 0.1 * i for i, c in enumerate(completion_ids)]
        seen["ids"], seen["rewards"], seen["prompts"] = [list(c) for c in completion_ids], out, list(prompts)
        return out

    from preftune import GRPOTrainer

    args = make_config(tmp_path, max_steps=1, per_device_train_batch_size=4, num_generations=2, max_grad_norm=0,
                       lr_scheduler_type="constant")
    rows = prompt_rows(2)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=rows, processing_class=tok,
                          rollout_func=fixed_rollout(), optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None))
    start = tiny_model(300, seed=1)
    trainer.train()
    prompts_ids = [list(tok(p)["input_ids"]) for p in seen["prompts"]]
    twin, twin_loss = _written_out_step(start, tok, prompts_ids, seen["ids"], seen["rewards"], 2, 0.5)
    logged = read_rows(tmp_path / "run")[0]["loss"]
    assert logged == pytest.approx(twin_loss, abs=1e-5)
    got = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_layouts_give_the_same_update_as_the_shared_prompt_layout(tmp_path, layout):
    runs = {}
    for name in ("prefix", layout):
        trainer = make_trainer(tmp_path / name, rollout_func=fixed_rollout(), batch_layout=name, max_steps=2,
                               gradient_accumulation_steps=2, per_device_train_batch_size=3, num_generations=3,
                               sgd=0.5, max_grad_norm=0)
        trainer.train()
        runs[name] = (weights(trainer.accelerator.unwrap_model(trainer.model)), read_rows(tmp_path / name / "run"))
    (w0, rows0), (w1, rows1) = runs["prefix"], runs[layout]
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=1e-5, msg=k)
    assert [r["loss"] for r in rows0] == pytest.approx([r["loss"] for r in rows1], abs=1e-5)
    # TRL's num_tokens: every completion's prompt + completion tokens, whatever the layout computes
    assert [r["num_tokens"] for r in rows0] == [r["num_tokens"] for r in rows1]


def test_resume_in_the_middle_of_a_generation_round_is_exact(tmp_path):
    kw = dict(max_steps=4, steps_per_generation=2, gradient_accumulation_steps=1, save_strategy="steps",
              save_steps=1)
    full = make_trainer(tmp_path / "a", **kw)
    full.train()
    final = weights(full.accelerator.unwrap_model(full.model))
    logged = read_rows(tmp_path / "a" / "run")
    # a run that stopped after step 3, in the middle of the second round: resume it
    resumed_dir = tmp_path / "b" / "run"
    shutil.copytree(tmp_path / "a" / "run", resumed_dir)
    for step in (4,):
        shutil.rmtree(resumed_dir / f"checkpoint-{step}")
    resumed = make_trainer(tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    got = weights(resumed.accelerator.unwrap_model(resumed.model))
    for k in final:
        torch.testing.assert_close(got[k], final[k], rtol=0, atol=1e-6, msg=k)
    again = read_rows(resumed_dir)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(logged[3]["loss"], abs=1e-6)
    assert again[3]["reward"] == pytest.approx(logged[3]["reward"], abs=1e-6)


def test_a_failing_reward_stops_before_any_update(tmp_path):
    from preftune.grpo.rewards import RewardError

    def broken(completions, **kw):
        raise KeyError("solution")

    trainer = make_trainer(tmp_path, reward=broken)
    before = weights(trainer.model)
    with pytest.raises(RewardError, match="broken") as info:
        trainer.train()
    assert "Q" in str(info.value)  # names the prompt it was scoring
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_dynamic_sampling_replaces_groups_without_signal(tmp_path):
    trainer = make_trainer(tmp_path, reward=kind_reward, dynamic_sampling=True, max_resample_rounds=5,
                           rollout_func=None, max_steps=1, per_device_train_batch_size=6, num_generations=2)
    trainer.train()
    row = read_rows(tmp_path / "run")[0]
    assert row["dynamic_sampling/resample_rounds"] >= 1
    assert row["frac_reward_zero_std"] > 0  # the first draw had flat groups
    kinds = [trainer.train_prompts.rows[rec["row"]]["kind"] for mb in trainer._round.micro for rec in mb]
    assert "flat" not in kinds  # every flat group was replaced by a group with signal


def test_without_dynamic_sampling_flat_groups_train_with_zero_advantage(tmp_path):
    trainer = make_trainer(tmp_path, reward=kind_reward, max_steps=1, per_device_train_batch_size=6)
    trainer.train()
    recs = [rec for mb in trainer._round.micro for rec in mb]
    flat = [rec for rec in recs if trainer.train_prompts.rows[rec["row"]]["kind"] == "flat"]
    assert flat and all(rec["advantage"] == 0.0 for rec in flat)


def test_a_group_of_empty_completions_still_trains(tmp_path):
    def rollout(prompts, trainer):
        eos = trainer.tokenizer.eos_token_id
        n = len(prompts) * trainer.num_generations
        return {"prompt_ids": [list(trainer.tokenizer(p)["input_ids"]) for p in prompts for _ in range(2)],
                "completion_ids": [[eos]] * n, "logprobs": [[0.0]] * n}

    trainer = make_trainer(tmp_path, rollout_func=rollout, max_steps=2)
    trainer.train()
    rows = read_rows(tmp_path / "run")
    assert all(r["loss"] == 0.0 for r in rows)  # every reward equal: advantage 0, nothing to learn, no NaN
    assert rows[0]["completions/mean_length"] == 1.0


def test_old_log_probs_only_when_the_round_outlives_the_step(tmp_path):
    on = make_trainer(tmp_path / "a", max_steps=1)
    on.train()
    assert all("old_logps" not in rec for mb in on._round.micro for rec in mb)
    off = make_trainer(tmp_path / "b", max_steps=2, num_iterations=2)
    off.train()
    recs = [rec for mb in off._round.micro for rec in mb]
    assert all(rec["old_logps"].numel() == len(rec["completion_ids"]) for rec in recs)
    rows = read_rows(tmp_path / "b" / "run")
    assert rows[1]["clip_ratio/region_mean"] >= 0.0


def test_beta_builds_a_reference_and_logs_kl(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1, max_steps=2)
    trainer.train()
    assert trainer.reference is not None
    rows = read_rows(tmp_path / "run")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert rows[1]["kl"] > 0.0


def test_lora_reference_is_the_policy_with_adapters_off(tmp_path):
    from preftune.reference import AdapterDisabledReference

    trainer = make_trainer(tmp_path, beta=0.1, use_peft=True, lora_r=4, lora_alpha=8, max_steps=1)
    assert isinstance(trainer.reference, AdapterDisabledReference)
    trainer.train()
    assert "kl" in read_rows(tmp_path / "run")[0]


@pytest.mark.parametrize("name", ["tools", "environment_factory", "quantization_config"])
def test_refused_constructor_arguments_say_what_to_do(tmp_path, name):
    from preftune import GRPOTrainer

    with pytest.raises(ValueError, match=name):
        GRPOTrainer(model=tiny_model(300), reward_funcs=length_reward, args=make_config(tmp_path),
                    train_dataset=prompt_rows(8), processing_class=tiny_tokenizer(), **{name: object()})


def test_a_prompt_less_row_is_named(tmp_path):
    with pytest.raises(ValueError, match="row 1 has no 'prompt'"):
        make_trainer(tmp_path, rows=[{"prompt": "a"}, {"question": "b"}])


def test_evaluate_logs_reward_metrics(tmp_path):
    from preftune import GRPOTrainer

    trainer = GRPOTrainer(model=tiny_model(300), reward_funcs=length_reward, args=make_config(tmp_path),
                          train_dataset=prompt_rows(8), eval_dataset=prompt_rows(3), processing_class=tiny_tokenizer())
    metrics = trainer.evaluate()
    for key in ("eval_reward", "eval_reward_std", "eval_rewards/length_reward/mean", "eval_loss",
                "eval_completions/mean_length"):
        assert key in metrics, key


def test_log_completions_writes_the_table(tmp_path):
    trainer = make_trainer(tmp_path, log_completions=True, max_steps=1)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"prompt", "completion", "rewards", "advantage"} <= set(lines[0])


def test_transformers_continuous_batching_generates_the_groups(tmp_path):
    trainer = make_trainer(tmp_path, use_transformers_continuous_batching=True, max_steps=1,
                           transformers_continuous_batching_config={"num_blocks": 16, "max_batch_tokens": 256})
    trainer.train()
    recs = [rec for mb in trainer._round.micro for rec in mb]
    assert len(recs) == 4 and all(1 <= len(r["completion_ids"]) <= 6 for r in recs)
    assert all(r["truncated"] == (r["completion_ids"][-1] not in trainer.eos_token_ids) for r in recs)
    assert "reward" in read_rows(tmp_path / "run")[0]


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    import preftune.grpo.objective as objective

    real, calls = objective.policy_loss, []

    def once_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(objective, "policy_loss", once_nan)
    trainer = make_trainer(tmp_path, max_steps=2)
    before = weights(trainer.model)
    with caplog.at_level("WARNING", logger="preftune"):
        trainer.train()
    assert any("non-finite loss at step 1" in r.getMessage() for r in caplog.records)
    rows = read_rows(tmp_path / "run")
    assert rows[-1]["nonfinite_steps"] == 1
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 2 trained
