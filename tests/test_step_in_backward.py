"""optim_in_backward: each parameter updated inside backward and its gradient freed equals a plain
optimizer step; gradients are freed as they are made; bad settings and non-finite steps are handled."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer import conversational_rows, make_trainer, train_rows, weights  # noqa: E402

from preftune import DPOConfig, memory  # noqa: E402
from preftune import trainer as tr  # noqa: E402
from preftune.testing import tiny_model  # noqa: E402


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.mark.parametrize("lora, bucket, tied", [(False, None, False), (False, 0, False), (True, None, False),
                                                (False, 0, True)],
                         ids=["full", "full-per-parameter", "lora", "tied-embeddings-per-parameter"])
def test_in_backward_equals_the_plain_step(tmp_path, monkeypatch, lora, bucket, tied):
    """Tied embeddings: the weight's update waits for the embedding's rows (they reach its gradient last)."""
    if bucket is not None:  # the default bucket holds all of a tiny model; 0 steps each parameter alone
        monkeypatch.setattr(memory.StepInBackward, "BUCKET_BYTES", bucket)
    rows = conversational_rows(8)
    kw = dict(max_steps=3, per_device_train_batch_size=2, max_grad_norm=0.0, weight_decay=0.1,
              peft_config=_lora() if lora else None)

    def model():  # a fresh one per trainer (None: make_trainer's untied tiny model)
        return tiny_model(300, tie_word_embeddings=True) if tied else None

    plain = make_trainer(tmp_path, rows, name="plain", model=model(), **kw)
    fused = make_trainer(tmp_path, rows, name="inbw", optim_in_backward=True, model=model(), **kw)
    plain.train()
    fused.train()
    wa, wb = weights(plain), weights(fused)
    assert wa.keys() == wb.keys()
    for name in wa:  # the same fused AdamW arithmetic per element: bit for bit
        assert torch.equal(wa[name], wb[name]), name
    first = weights(make_trainer(tmp_path, rows, name="init", model=model(), **kw))
    moved = sum(not torch.equal(first[n], wa[n]) for n in wa)
    assert moved > 0  # the steps changed the weights
    for x, y in zip(train_rows(plain), train_rows(fused), strict=True):
        assert x["loss"] == y["loss"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)  # summed in another order
    sa, sb = plain.optimizer.state_dict(), fused.optimizer.state_dict()  # checkpoints look the same
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)


@pytest.mark.parametrize("bucket", [0, 40_000])  # the tiny model: 151 kB in all
def test_gradients_are_freed_as_backward_makes_them(tmp_path, monkeypatch, bucket):
    """Gradients alive at an update are its bucket's (a parameter's alone with BUCKET_BYTES=0; under the
    bucket size plus one parameter else); every parameter is updated once a step; none is left after."""
    monkeypatch.setattr(memory.StepInBackward, "BUCKET_BYTES", bucket)
    live, flushed = [], []
    real = memory.StepInBackward._flush

    def flush(self):
        held = [q for q in trainer._clip_params if q.grad is not None]
        assert {id(q) for q in held} == {id(q) for q in self._bucket}
        live.append(sum(q.grad.numel() * q.grad.element_size() for q in held))
        flushed.extend(id(q) for q in held)
        return real(self)

    monkeypatch.setattr(memory.StepInBackward, "_flush", flush)
    trainer = make_trainer(tmp_path, conversational_rows(8), max_steps=2, max_grad_norm=0, optim_in_backward=True)
    trainer.train()
    params = trainer._clip_params
    biggest = max(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    assert sorted(flushed) == sorted(2 * [id(p) for p in params])  # each parameter once a step
    assert max(live) <= bucket + biggest and max(live) < total
    if bucket == 0:
        assert len([x for x in live if x]) == 2 * len(params)  # one parameter at a time
    assert all(p.grad is None for p in params)
    # the hooks are gone after train(): a later backward keeps its gradients
    model = trainer.accelerator.unwrap_model(trainer.model)
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    assert all(p.grad is not None for p in trainer._clip_params)


@pytest.mark.parametrize("kw, field", [
    (dict(), "max_grad_norm"),  # the default clips at 1.0
    (dict(max_grad_norm=0, gradient_accumulation_steps=2), "gradient_accumulation_steps"),
    (dict(max_grad_norm=0, optim="adamw_torch"), "optim"),
    (dict(max_grad_norm=0, fp16=True), "fp16"),
])
def test_settings_it_cannot_honour_are_refused_by_name(kw, field):
    with pytest.raises(ValueError, match=field) as e:
        DPOConfig(optim_in_backward=True, **kw)
    assert "optim_in_backward" in str(e.value)


def test_a_gradient_that_turns_non_finite_midway_is_counted(tmp_path, monkeypatch, caplog):
    """Backward reaches the later layers first: those are updated before a NaN appears in an earlier
    layer's gradient; it and everything after it are skipped, and the warning says how many were not."""
    rows = conversational_rows(8)
    monkeypatch.setattr(memory.StepInBackward, "BUCKET_BYTES", 0)
    kw = dict(max_steps=1, max_grad_norm=0, optim_in_backward=True, learning_rate=1e-2)
    before = weights(make_trainer(tmp_path, rows, name="init", **kw))
    trainer = make_trainer(tmp_path, rows, **kw)
    model = trainer.accelerator.unwrap_model(trainer.model)
    target = model.model.layers[0].mlp.down_proj.weight
    target.register_hook(lambda g: g * float("nan"))
    with caplog.at_level(logging.WARNING, logger="preftune"):
        trainer.train()
    after = weights(trainer)
    changed = [n for n in after if not torch.equal(before[n], after[n])]
    assert changed and "model.layers.0.mlp.down_proj.weight" not in changed
    assert "model.embed_tokens.weight" not in changed  # finished last in backward: skipped
    assert all(torch.isfinite(p).all() for p in after.values())
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith(
        f"non-finite gradient at step 1: update skipped; {len(changed)} of {len(after)} parameters were updated")
    assert trainer.train_state.nonfinite_steps == 1


def test_a_non_finite_loss_updates_nothing(tmp_path, monkeypatch):
    rows = conversational_rows(8)
    kw = dict(max_steps=2, max_grad_norm=0, optim_in_backward=True)
    before = weights(make_trainer(tmp_path, rows, name="init", **kw))
    real = tr.DPOTrainer._pair_losses

    def nan_losses(self, batch, reference):
        per_pair, metrics = real(self, batch, reference)
        return per_pair * float("nan"), metrics

    monkeypatch.setattr(tr.DPOTrainer, "_pair_losses", nan_losses)
    trainer = make_trainer(tmp_path, rows, **kw)
    trainer.train()
    after = weights(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert trainer.train_state.nonfinite_steps == 2
    state = trainer.optimizer.state_dict()["state"]
    assert all(float(s["step"]) == 0 for s in state.values())  # the skipped steps left the moments alone


def test_resume_reaches_the_uninterrupted_weights(tmp_path, monkeypatch):
    """The optimizer state the in-backward updates leave is the one a checkpoint saves and loads."""
    monkeypatch.setattr(memory.StepInBackward, "BUCKET_BYTES", 40_000)
    rows = conversational_rows(8)
    kw = dict(max_steps=4, max_grad_norm=0, optim_in_backward=True)
    whole = make_trainer(tmp_path, rows, name="whole", **kw)
    whole.train()

    class Stop(Exception):
        pass

    class StopAtStep3(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3:
                raise Stop

    first = make_trainer(tmp_path, rows, name="cut", save_strategy="steps", save_steps=2, callbacks=[StopAtStep3()],
                         **kw)
    with pytest.raises(Stop):
        first.train()
    resumed = make_trainer(tmp_path, rows, name="cut", save_strategy="steps", save_steps=2,
                           resume_from_checkpoint="latest", **kw)
    resumed.train()
    assert resumed.state.global_step == 4
    wa, wb = weights(whole), weights(resumed)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
