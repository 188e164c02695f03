"""Tests for preftune.reference: the four sources and their choice, TR-DPO sync, precompute and the disk cache."""

from __future__ import annotations

import copy
import gc
import itertools
import logging
import random
import types

import pytest
import torch

from preftune import reference as refmod
from preftune.models import apply_peft, lora_config_from_args
from preftune.reference import (
    SOURCES,
    AdapterDisabledReference,
    CachedReference,
    EMAReferenceSync,
    FrozenModelReference,
    RefAdapterReference,
    cached_precompute,
    choose_source,
    forward_logps,
    load_reference_cache,
    make_reference,
    model_fingerprint,
    plain_data_parallel,
    precompute_reference_logps,
    reference_cache_key,
    save_reference_cache,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from preftune.reference import cache as cache_mod
from preftune.reference import sources as sources_mod
from preftune.testing import tiny_model, tiny_tokenizer

collate = pytest.importorskip("preftune.data.batching").collate
logps_mod = pytest.importorskip("preftune.logps")


def make_features(n=7, seed=0, vocab=300):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(4, vocab) for _ in range(k)]  # noqa: E731
    return [
        {"prompt_ids": ids(rng.randint(1, 6)), "chosen_ids": ids(rng.randint(1, 5)),
         "rejected_ids": ids(rng.randint(1, 5)), "index": i}
        for i in range(n)
    ]  # fmt: skip


def slow_logps(model, features):
    """Slow obvious twin: one pair at a time, full logits, padded labels."""
    out = []
    with torch.no_grad():
        for f in features:
            b = collate([f], layout="padded", pad_token_id=0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lp, _ = logps_mod.logps_from_logits(logits, b["labels"])
            out.append(lp)
    return torch.stack(out)  # (N, 2) [chosen, rejected]


def lora_policy(base, seed=1):
    """A LoRA policy whose B matrices are non-zero, so it differs from the base model."""
    torch.manual_seed(seed)
    cfg = lora_config_from_args(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj,up_proj")
    cfg.init_lora_weights = False
    return apply_peft(copy.deepcopy(base), cfg)


def as_table(out):
    return torch.stack([out.chosen_logps, out.rejected_logps], 1)


# --------------------------------------------------------------------------------------------
# live sources
# --------------------------------------------------------------------------------------------


def test_frozen_reference_matches_slow_twin():
    model = tiny_model(attention_dropout=0.3)
    feats = make_features()
    expected = slow_logps(copy.deepcopy(model).eval(), feats)
    ref = FrozenModelReference(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.attention_dropout == 0.0
    out = ref.logps(collate(feats, layout="padded", pad_token_id=0))
    torch.testing.assert_close(as_table(out), expected, atol=1e-5, rtol=1e-5)
    assert not out.chosen_logps.is_inference() and not out.chosen_logps.requires_grad
    lengths = torch.tensor([[len(f["chosen_ids"]), len(f["rejected_ids"])] for f in feats])
    assert torch.equal(torch.stack([out.chosen_lengths, out.rejected_lengths], 1), lengths)
    model.train()  # a stray .train() on the reference must not switch dropout back on
    torch.testing.assert_close(as_table(ref.logps(collate(feats, layout="packed", pad_token_id=0))), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_adapter_disabled_reference_equals_base():
    base = tiny_model()
    feats = make_features()
    batch = collate(feats, layout="padded", pad_token_id=0)
    expected = slow_logps(base, feats)
    policy = lora_policy(base)
    policy.train()
    policy_before = as_table(forward_logps(policy, batch))
    assert (policy_before - expected).abs().max() > 1e-3  # LoRA changes the policy
    out = AdapterDisabledReference(policy).logps(batch)
    torch.testing.assert_close(as_table(out), expected, atol=1e-5, rtol=1e-5)
    assert policy.training  # mode restored
    torch.testing.assert_close(as_table(forward_logps(policy, batch)), policy_before)  # adapters back on
    with pytest.raises(TypeError, match="peft"):
        AdapterDisabledReference(base)


def test_adapter_disabled_reference_matches_peft_disable_adapter():
    """The flag switch equals peft's own disable_adapter() for LoRA plus a modules_to_save head, leaves
    every flag, requires_grad and the PeftModel's own flag as they were (also a layer the user had
    switched off), and prompt-learning methods keep peft's context."""
    from peft import LoraConfig, get_peft_model

    from preftune.reference.sources import _adapter_switches

    base = tiny_model()
    torch.manual_seed(2)
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                            modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        policy.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # saved head != base head
    batch = collate(make_features(), layout="prefix", pad_token_id=0)
    with policy.disable_adapter():
        want = as_table(forward_logps(policy, batch))
    torch.testing.assert_close(want, as_table(forward_logps(base, batch)), atol=1e-5, rtol=1e-5)
    ref = AdapterDisabledReference(policy)
    assert len(ref._switches) == 5  # 2 layers x (q_proj, up_proj) + the modules_to_save wrapper
    off = ref._switches[0]
    off._disable_adapters = True  # a layer the user switched off stays off
    flags = [m._disable_adapters for m in ref._switches]
    grads = {n: p.requires_grad for n, p in policy.named_parameters()}
    policy_before = as_table(forward_logps(policy, batch))
    assert (policy_before - want).abs().max() > 1e-3
    torch.testing.assert_close(as_table(ref.logps(batch)), want, atol=0, rtol=0)
    assert [m._disable_adapters for m in ref._switches] == flags and not policy._adapters_disabled
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == grads
    torch.testing.assert_close(as_table(forward_logps(policy, batch)), policy_before, atol=0, rtol=0)

    policy.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    ref.logps(batch)
    assert len(ref._switches) == 7 and all(not m._disable_adapters for m in ref._switches[1:])  # re-listed

    class PromptTuned(torch.nn.Module):
        peft_config = {"default": types.SimpleNamespace(is_prompt_learning=True)}

    assert _adapter_switches(PromptTuned()) is None


# --------------------------------------------------------------------------------------------
# TR-DPO
# --------------------------------------------------------------------------------------------


def test_ema_sync_full_model_formula():
    ref_model, policy = tiny_model(seed=0), tiny_model(seed=1)
    before = {n: p.detach().double().clone() for n, p in ref_model.named_parameters()}
    ref = FrozenModelReference(ref_model, sync=EMAReferenceSync(alpha=0.6, sync_steps=2))
    ref.on_optimizer_step(1, policy)  # not due
    assert all(torch.equal(p.double(), before[n]) for n, p in ref_model.named_parameters())
    ref.on_optimizer_step(2, policy)
    pol = dict(policy.named_parameters())
    for n, p in ref_model.named_parameters():
        expected = 0.6 * pol[n].detach().double() + 0.4 * before[n]
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-7, rtol=0)
    assert not any(p.requires_grad for p in ref_model.parameters())
    with pytest.raises(ValueError, match="shape"):
        FrozenModelReference(tiny_model(), sync=EMAReferenceSync(0.5, 1)).on_optimizer_step(
            1, tiny_model(intermediate_size=48)
        )
    with pytest.raises(ValueError, match="mixup_alpha"):
        EMAReferenceSync(alpha=0.0)
    with pytest.raises(ValueError, match="sync_steps"):
        EMAReferenceSync(alpha=0.5, sync_steps=0)


def test_ema_sync_lora_adapter():
    base = tiny_model()
    feats = make_features(5)
    batch = collate(feats, layout="padded", pad_token_id=0)
    policy = lora_policy(base)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    ref = RefAdapterReference(policy, EMAReferenceSync(alpha=0.25, sync_steps=1))
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert policy.active_adapter == "default"
    # the ref adapter starts as a copy of the policy adapter: equal log-probs
    torch.testing.assert_close(as_table(ref.logps(batch)), as_table(forward_logps(policy, batch)))
    start = [r.detach().double().clone() for r in ref.ref_params]

    # one training step on the policy: gradients reach its adapter only, after a reference forward
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    ref_out = ref.logps(batch)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    out = logps_mod.model_logps(policy, batch)
    (out.chosen_logps - ref_out.chosen_logps).sum().backward()
    opt.step()
    assert all(torch.equal(r.double(), s) for r, s in zip(ref.ref_params, start))  # ref frozen
    torch.testing.assert_close(as_table(ref.logps(batch)), as_table(ref_out))  # ... and so are its log-probs
    assert not torch.allclose(as_table(forward_logps(policy, batch)), as_table(ref_out), atol=1e-4)
    ref.on_optimizer_step(1, policy)
    for r, p, s in zip(ref.ref_params, ref.policy_params, start):
        torch.testing.assert_close(
            r.detach().double(), 0.25 * p.detach().double() + 0.75 * s, atol=1e-7, rtol=0
        )
        assert not r.requires_grad and p.requires_grad
    # alpha = 1 makes the reference equal the policy again
    ref.sync = EMAReferenceSync(alpha=1.0, sync_steps=1)
    ref.on_optimizer_step(2, policy)
    torch.testing.assert_close(as_table(ref.logps(batch)), as_table(forward_logps(policy, batch)))
    assert not torch.allclose(as_table(ref.logps(batch)), slow_logps(base, feats), atol=1e-3)


# --------------------------------------------------------------------------------------------
# precompute and the cached source
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_precomputed_equals_live(layout):
    model = tiny_model()
    feats = make_features(9)
    random.Random(3).shuffle(feats)  # indices out of order
    table = precompute_reference_logps(
        model, feats, batch_size=4, pad_token_id=0, layout=layout, progress=False
    )
    assert table.shape == (9, 2) and table.dtype == torch.float32
    expected = slow_logps(model, sorted(feats, key=lambda f: f["index"]))
    torch.testing.assert_close(table, expected, atol=1e-5, rtol=1e-5)
    batch = collate(feats[:4], layout=layout, pad_token_id=0)
    live, cached = FrozenModelReference(model).logps(batch), CachedReference(table).logps(batch)
    torch.testing.assert_close(as_table(cached), as_table(live), atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.chosen_lengths, live.chosen_lengths)
    assert torch.equal(cached.rejected_lengths, live.rejected_lengths)
    assert not CachedReference(table).needs_forward


def test_cached_reference_errors():
    feats = make_features(3)
    batch = collate(feats, layout="padded", pad_token_id=0)
    with pytest.raises(IndexError, match="another dataset"):
        CachedReference(torch.zeros(2, 2)).logps(batch)
    table = torch.zeros(3, 2)
    table[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"pairs \[1\]"):
        CachedReference(table).logps(batch)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        CachedReference(torch.zeros(3))


# --------------------------------------------------------------------------------------------
# the disk cache
# --------------------------------------------------------------------------------------------

KEY_ARGS = dict(model_id="m", model_fingerprint="w", tokenizer_fingerprint="t", data_fingerprint="d",
                max_length=64, max_prompt_length=32, max_completion_length=None, truncation_mode="keep_end",
                chat_template="tmpl")  # fmt: skip


def test_cache_key_covers_every_field():
    key = reference_cache_key(**KEY_ARGS)
    assert key == reference_cache_key(**KEY_ARGS) and len(key) == 64
    changed = {"model_id": "m2", "model_fingerprint": "w2", "tokenizer_fingerprint": "t2",
               "data_fingerprint": "d2", "max_length": 65, "max_prompt_length": 31, "max_completion_length": 8,
               "truncation_mode": "keep_start", "chat_template": None}  # fmt: skip
    keys = {reference_cache_key(**{**KEY_ARGS, k: v}) for k, v in changed.items()}
    keys.add(reference_cache_key(**KEY_ARGS, extra={"layout": "packed"}))
    assert len(keys) == len(changed) + 1 and key not in keys


def test_fingerprints(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    fp = model_fingerprint(tmp_path / "m")
    assert fp == model_fingerprint(tmp_path / "m")
    w = weights_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    model.save_pretrained(tmp_path / "m")
    assert model_fingerprint(tmp_path / "m") != fp and weights_fingerprint(model) != w
    assert model_fingerprint("org/name", "v1") == "hub:org/name@v1"
    tied = tiny_model(tie_word_embeddings=True)  # lm_head and the embedding share one storage: hashed once
    copy = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert weights_fingerprint(tied) == weights_fingerprint(copy) != weights_fingerprint(tiny_model())
    with torch.no_grad():
        copy.lm_head.weight[3, 1] += 1e-3
    assert weights_fingerprint(copy) != weights_fingerprint(tied)
    assert tokenizer_fingerprint(tiny_tokenizer()) == tokenizer_fingerprint(tiny_tokenizer())
    assert tokenizer_fingerprint(tiny_tokenizer()) != tokenizer_fingerprint(tiny_tokenizer(bos=True))


@pytest.mark.parametrize("numel", [1, 250, 256, 1000])
def test_staged_hash_is_the_plain_hash(numel):
    """Accelerator tensors are hashed chunk by chunk through host buffers: same digest as all at once."""
    import xxhash

    from preftune.reference.cache import _hash_staged

    t = torch.randn(numel).to(torch.bfloat16)
    plain, staged, staging = xxhash.xxh3_128(), xxhash.xxh3_128(), []
    plain.update(t.view(torch.uint8).numpy())
    _hash_staged(staged, t, staging, chunk_bytes=128)
    _hash_staged(staged, t, staging, chunk_bytes=128)  # the buffers are reused across tensors
    plain.update(t.view(torch.uint8).numpy())
    assert staged.hexdigest() == plain.hexdigest() and len(staging) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_weights_fingerprint_on_gpu_equals_cpu():
    model = tiny_model(tie_word_embeddings=True)
    on_cpu = weights_fingerprint(model)
    assert weights_fingerprint(model.cuda(), chunk_bytes=4096) == weights_fingerprint(model) == on_cpu
    with torch.no_grad():  # queued on the main stream just before: the side stream must see it
        model.lm_head.weight.add_(1.0)
    moved = refmod.fingerprint_beside(model).result(timeout=60)
    assert moved != on_cpu and moved == "weights:" + weights_fingerprint(model.cpu())


def test_cache_roundtrip_reuse_and_key_change(tmp_path, caplog, monkeypatch):
    model = tiny_model()
    feats = make_features(5)
    path, key = tmp_path / "ref.safetensors", reference_cache_key(**KEY_ARGS)
    calls = []
    real = cache_mod.precompute_reference_logps
    monkeypatch.setattr(
        cache_mod, "precompute_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    kw = dict(batch_size=2, pad_token_id=0, progress=False)
    first = cached_precompute(model, feats, path=path, key=key, **kw)
    assert calls == [1] and path.is_file()
    with caplog.at_level(logging.INFO, logger="preftune.reference"):
        again = cached_precompute(model, feats, path=path, key=key, **kw)
    assert calls == [1] and torch.equal(first, again)
    assert f"reusing reference log-probs from {path}" in caplog.text
    caplog.clear()
    other = reference_cache_key(**{**KEY_ARGS, "max_length": 128})
    with caplog.at_level(logging.INFO, logger="preftune.reference"):
        assert load_reference_cache(path, other) is None
        cached_precompute(model, feats, path=path, key=other, **kw)
    assert "recomputing" in caplog.text and calls == [1, 1]
    assert load_reference_cache(path, key) is None and torch.equal(load_reference_cache(path, other), first)


@pytest.mark.parametrize("damage", ["flip_data", "flip_header", "truncate"])
def test_corrupt_cache_is_never_used(tmp_path, caplog, damage):
    path, key = tmp_path / "ref.safetensors", "k"
    table = torch.randn(6, 2)
    save_reference_cache(path, table, key)
    assert torch.equal(load_reference_cache(path, key), table)
    data = bytearray(path.read_bytes())
    if damage == "flip_data":
        data[-5] ^= 0xFF
    elif damage == "flip_header":
        data[10] ^= 0xFF
    else:
        data = data[: len(data) - 7]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="preftune.reference"):
        assert load_reference_cache(path, key) is None
    assert "recomputing" in caplog.text
    model, feats = tiny_model(), make_features(4)
    fresh = cached_precompute(model, feats, path=path, key=key, batch_size=4, pad_token_id=0, progress=False)
    assert torch.equal(load_reference_cache(path, key), fresh)


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "ref.safetensors"

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_reference_cache(path, torch.ones(3, 2), "k")
    assert not path.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    # a stray temp file (a save killed mid-write) beside the cache is never read
    (tmp_path / ".tmp-ref.safetensors-abc").write_bytes(b"partial")
    assert load_reference_cache(path, "k") is None
    save_reference_cache(path, torch.ones(3, 2), "k")
    assert torch.equal(load_reference_cache(path, "k"), torch.ones(3, 2))


# --------------------------------------------------------------------------------------------
# choose_source and make_reference
# --------------------------------------------------------------------------------------------

# needs_reference, precompute, is_peft, ref_model given, sync_ref_model, plain_data_parallel -> source
CHOICES = [
    (False, None, False, False, False, True, "none"),
    (False, True, True, True, True, False, "none"),  # nothing else matters (not even precompute + sync)
    (True, None, False, False, False, True, "cache"),  # automatic: full model, plain processes
    (True, None, False, True, False, True, "cache"),  # a given ref_model is precomputed too
    (True, None, False, False, False, False, "frozen_model"),  # FSDP / DeepSpeed: live, a loaded copy
    (True, None, False, True, False, False, "frozen_model"),
    (True, None, True, False, False, True, "adapters_off"),  # LoRA keeps its live reference
    (True, None, True, True, False, True, "frozen_model"),
    (True, None, True, False, True, True, "ref_adapter"),
    (True, None, False, False, True, True, "frozen_model"),  # TR-DPO: never cached automatically
    (True, None, True, True, True, True, "frozen_model"),
    (True, True, True, False, False, False, "cache"),  # explicit: whatever the policy and placement
    (True, True, False, True, False, False, "cache"),
    (True, False, False, False, False, True, "frozen_model"),
    (True, False, False, True, False, True, "frozen_model"),
    (True, False, True, False, False, True, "adapters_off"),
    (True, False, True, False, True, True, "ref_adapter"),
    (True, False, False, True, True, True, "frozen_model"),
]


@pytest.mark.parametrize("needs, precompute, is_peft, given, sync, plain, want", CHOICES)
def test_choose_source_table(needs, precompute, is_peft, given, sync, plain, want):
    assert choose_source(needs_reference=needs, precompute=precompute, is_peft=is_peft,
                         ref_model="some/path" if given else None, sync_ref_model=sync,
                         plain_data_parallel=plain) == want  # fmt: skip


def test_choose_source_refuses_a_cached_tr_dpo_reference_and_stays_in_its_set():
    with pytest.raises(ValueError, match="sync_ref_model.*live reference.*precompute_ref_log_probs=False"):
        choose_source(needs_reference=True, precompute=True, is_peft=False, ref_model=None, sync_ref_model=True)
    for needs, precompute, is_peft, given, sync, plain in itertools.product(
        (False, True), (None, False, True), (False, True), (False, True), (False, True), (False, True)
    ):
        if needs and precompute and sync:
            continue
        got = choose_source(needs_reference=needs, precompute=precompute, is_peft=is_peft,
                            ref_model=object() if given else None, sync_ref_model=sync, plain_data_parallel=plain)
        assert got in SOURCES
        assert (got == "none") == (not needs)
        assert got != "cache" or not sync  # a TR-DPO reference moves: never a table
        assert got not in ("adapters_off", "ref_adapter") or (is_peft and not given)
        assert got != "ref_adapter" or sync
        if needs and precompute is not None:  # an explicit setting is obeyed
            assert (got == "cache") == precompute


def test_plain_data_parallel():
    from accelerate.utils import DistributedType

    plain = {DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU}
    for kind in (*plain, DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
        assert plain_data_parallel(types.SimpleNamespace(distributed_type=kind)) == (kind in plain)


# ---- the trainer's reference: trainer.ref_model and evaluate(eval_dataset=...) on a new set ----------------


def _trainer(tmp_path, name, **kw):
    from tests.test_trainer import conversational_rows, make_trainer

    return make_trainer(tmp_path, conversational_rows(8), name=name, **kw)


def test_trainer_ref_model_as_trl_names_it(tmp_path):
    """None where the reference is precomputed, the adapters-off policy or absent; else the frozen model."""
    from peft import LoraConfig

    from preftune.testing import tiny_model

    assert _trainer(tmp_path, "auto").ref_model is None  # automatic precompute
    assert _trainer(tmp_path, "lora", peft_config=LoraConfig(r=2, target_modules=["q_proj"])).ref_model is None
    assert _trainer(tmp_path, "free", loss_type="simpo").ref_model is None
    live = _trainer(tmp_path, "live", precompute_ref_log_probs=False)
    ref, policy = live.ref_model, live.accelerator.unwrap_model(live.model)
    assert ref is not None and ref is not policy and not any(p.requires_grad for p in ref.parameters())
    for (n, a), (_, b) in zip(ref.named_parameters(), policy.named_parameters()):
        assert torch.equal(a, b), n
    from preftune import DPOTrainer
    from preftune.testing import tiny_tokenizer
    from tests.test_trainer import config, conversational_rows

    given = tiny_model(seed=5)
    t = DPOTrainer(tiny_model(), ref_model=given, args=config(tmp_path, "given", precompute_ref_log_probs=False),
                   train_dataset=conversational_rows(8), processing_class=tiny_tokenizer())
    assert t.ref_model is given


def _eval_rows():
    from tests.test_trainer import conversational_rows

    return conversational_rows(6, split="eval")


def test_evaluate_new_set_after_training_reloads_the_initial_weights(tmp_path):
    """Precomputed reference, a model with a path: the new set's reference is the reloaded initial model,
    the same numbers as a live reference run (and not the trained policy's 0 rewards)."""
    from preftune.testing import tiny_model, tiny_tokenizer

    path = tmp_path / "start"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    metrics = {}
    for name, precompute in (("cached", None), ("live", False)):
        t = _trainer(tmp_path, name, model=str(path), precompute_ref_log_probs=precompute, max_steps=3)
        t.train()
        metrics[name] = t.evaluate(eval_dataset=_eval_rows())
    assert abs(metrics["cached"]["eval_rewards/margins"]) > 1e-4
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_loss"):
        assert metrics["cached"][key] == pytest.approx(metrics["live"][key], rel=1e-4, abs=1e-6), key


def test_evaluate_new_set_before_training_and_refused_after(tmp_path):
    """A model object with no path and a precomputed reference: before training the policy is the reference;
    after training its initial weights are gone, so a new set is refused (as TRL does), never scored against
    the trained policy."""
    t = _trainer(tmp_path, "nopath", precompute_ref_log_probs=True, eval_rows=_eval_rows())
    before = t.evaluate(eval_dataset=_eval_rows())
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    t.train()
    with pytest.raises(ValueError, match="after training.*initial weights were not kept"):
        t.evaluate(eval_dataset=_eval_rows())
    assert "eval_loss" in t.evaluate()  # the run's own eval set reads its table


def test_evaluate_new_set_after_training_with_adapters_off(tmp_path):
    from peft import LoraConfig

    t = _trainer(tmp_path, "lora", precompute_ref_log_probs=True, peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
                 max_steps=3)
    t.train()
    live = t.evaluate(eval_dataset=_eval_rows())
    assert abs(live["eval_rewards/margins"]) > 0


def test_make_reference_dispatch():
    base = tiny_model()
    assert make_reference(loss_needs_reference=False, policy=base) is None
    assert isinstance(make_reference(loss_needs_reference=True, policy=base, ref_model=tiny_model()),
                      FrozenModelReference)  # fmt: skip
    peft = lora_policy(base)
    assert isinstance(make_reference(loss_needs_reference=True, policy=peft), AdapterDisabledReference)
    synced = make_reference(loss_needs_reference=True, policy=peft, sync=EMAReferenceSync(0.5, 4))
    assert isinstance(synced, RefAdapterReference) and "ref" in peft.peft_config
    assert isinstance(make_reference(loss_needs_reference=True, policy=peft, ref_model=tiny_model()),
                      FrozenModelReference)  # fmt: skip
    with pytest.raises(ValueError, match="pass ref_model"):
        make_reference(loss_needs_reference=True, policy=base)


def test_unfrozen_source_and_key_parts(tmp_path, caplog):
    policy = tiny_model()
    policy.train()
    feats = make_features(4)
    src = FrozenModelReference(policy, freeze=False)  # the policy as its own reference, left trainable
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    parts = dict(KEY_ARGS, model_fingerprint=model_fingerprint(policy))
    assert parts["model_fingerprint"].startswith("weights:")
    table = cached_precompute(src, feats, cache_dir=tmp_path / "rc", key_parts=parts, batch_size=3,
                              pad_token_id=0, progress=False, chunk_size=2)  # fmt: skip
    assert policy.training
    torch.testing.assert_close(table, slow_logps(policy.eval(), feats), atol=1e-5, rtol=1e-5)
    path = tmp_path / "rc" / f"{reference_cache_key(**parts)[:32]}.safetensors"
    with caplog.at_level(logging.INFO, logger="preftune.reference"):
        again = cached_precompute(src, feats, cache_dir=tmp_path / "rc", key_parts=parts, batch_size=3,
                                  pad_token_id=0, progress=False)  # fmt: skip
    assert torch.equal(again, table) and f"reusing reference log-probs from {path}" in caplog.text


def test_eval_mode_follows_the_model_structure_and_respects_train_overrides():
    model = tiny_model(vocab_size=40)
    model.train()
    model.model.layers[1].mlp.eval()  # a module's own flag is put back as it was
    with refmod.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not model.model.layers[1].mlp.training and model.model.layers[0].mlp.training
    listed = sources_mod._module_list(model)
    with torch.no_grad():  # the decoder's forward slices its layers into a new ModuleList: not a change
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert sources_mod._module_list(model) is listed
    model.model.extra = torch.nn.Dropout(0.5)  # a new submodule after the list was made
    assert sources_mod._module_list(model) is not listed
    other = tiny_model(vocab_size=40)  # a freed model's modules leave the registry (their addresses get reused)
    sources_mod._module_list(other)
    ids = {id(m) for m in other.modules()}
    assert ids <= sources_mod._listed.keys()
    del other
    gc.collect()
    assert not ids & sources_mod._listed.keys()
    with refmod.eval_mode(model):
        assert not model.model.extra.training
    assert model.model.extra.training
    calls = []

    class Custom(torch.nn.Linear):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model.model.custom = Custom(2, 2)
    with refmod.eval_mode(model):  # a train() of its own: model.eval() runs it
        assert not model.model.custom.training
    assert calls == [False] and model.model.custom.training


def test_weights_hashed_beside_the_pass_where_no_table_could_match(tmp_path):
    """A Future key part (fingerprint_beside) is waited for after the pass when the folder holds no
    table, before it when one could match; the file and the reuse are those of the plain key."""
    from concurrent.futures import Future

    policy = tiny_model()
    feats = make_features(4)
    forwards = []
    policy.register_forward_hook(lambda *a: forwards.append(1))

    class Watched(Future):
        asked_after = None

        def result(self, timeout=None):
            if self.asked_after is None:
                self.asked_after = len(forwards)
            return super().result(timeout)

    def parts():
        fut = Watched()
        fut.set_result(model_fingerprint(policy))
        return fut, dict(KEY_ARGS, model_fingerprint=fut)

    kw = dict(cache_dir=tmp_path / "rc", batch_size=2, pad_token_id=0, progress=False)
    fut, deferred = parts()
    table = cached_precompute(policy, feats, key_parts=deferred, **kw)
    assert fut.asked_after == len(forwards) == 2  # after both batches
    plain = dict(KEY_ARGS, model_fingerprint=model_fingerprint(policy))
    assert (tmp_path / "rc" / f"{reference_cache_key(**plain)[:32]}.safetensors").exists()
    fut, deferred = parts()
    again = cached_precompute(policy, feats, key_parts=deferred, **kw)  # a table is there: key first, reused
    assert fut.asked_after == 2 and len(forwards) == 2 and torch.equal(again, table)


def test_fingerprint_beside_equals_the_plain_hash():
    model = tiny_model()
    assert refmod.fingerprint_beside(model).result(timeout=60) == model_fingerprint(model)
