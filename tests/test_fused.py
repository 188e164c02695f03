"""preftune.fused: the lean SwiGLU MLP and RMSNorm backward against the eager modules."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import subprocess
import sys
import weakref

import pytest
import torch

from preftune.fused import fuse_layers, unfuse_layers
from preftune.testing import tiny_model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False).logits
    loss = (out.float().log_softmax(-1)[..., 0] * torch.linspace(-1, 1, ids.shape[1])).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).logits.sum()
    return sum(total)


@pytest.mark.parametrize("kinds", [("mlp",), ("rmsnorm",), ("mlp", "rmsnorm")])
def test_fused_layers_match_eager_values_and_gradients(kinds):
    torch.manual_seed(0)
    eager = tiny_model(intermediate_size=48)
    fused = copy.deepcopy(eager)
    layers = eager.config.num_hidden_layers
    counts = fuse_layers(fused, kinds)
    assert counts == {"mlp": layers if "mlp" in kinds else 0, "rmsnorm": 2 * layers + 1 if "rmsnorm" in kinds else 0,
                      "lora": 0, "rope": 0}
    ids = torch.randint(0, 300, (3, 17))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.allclose(out_e, out_f, rtol=1e-6, atol=1e-6)
    if kinds == ("mlp",):
        assert torch.equal(out_e, out_f)  # the same ops on the same inputs
    assert grads_e.keys() == grads_f.keys() and len(grads_e) == len(list(eager.parameters()))
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_f[name], rtol=1e-5, atol=1e-6), name
    # it keeps less for backward: the MLP's (tokens, intermediate) product and silu(gate), and at
    # least the norm's normalized copy of x
    saved = _saved_bytes(eager, ids) - _saved_bytes(fused, ids)
    mlp, norm = 2 * 3 * 17 * 48 * 4, 3 * 17 * eager.config.hidden_size * 4
    if kinds == ("mlp",):
        assert saved == layers * mlp
    else:
        assert saved >= ("mlp" in kinds) * layers * mlp + (2 * layers + 1) * norm
    assert unfuse_layers(fused) == sum(counts.values())
    assert _saved_bytes(fused, ids) == _saved_bytes(eager, ids)


def test_fused_mlp_under_lora_matches_eager():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    eager = peft.get_peft_model(tiny_model(intermediate_size=48), cfg)
    fused = copy.deepcopy(eager)
    assert fuse_layers(fused, ("mlp",))["mlp"] == 2
    ids = torch.randint(0, 300, (2, 9))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.equal(out_e, out_f) and grads_e.keys() == grads_f.keys() and grads_e
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_f[name], rtol=1e-5, atol=1e-7), name
    assert _saved_bytes(fused, ids) < _saved_bytes(eager, ids)


def test_fused_mlp_in_bfloat16_and_without_grad():
    torch.manual_seed(2)
    eager = tiny_model(intermediate_size=48).to(torch.bfloat16)
    fused = copy.deepcopy(eager)
    fuse_layers(fused)
    ids = torch.randint(0, 300, (2, 9))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.allclose(out_e.float(), out_f.float(), rtol=1e-2, atol=1e-2)
    for name in grads_e:
        assert grads_f[name].dtype == torch.bfloat16
        assert torch.allclose(grads_e[name].float(), grads_f[name].float(), rtol=2e-2, atol=1e-3), name
    with torch.no_grad():
        assert torch.equal(eager(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_other_mlps_are_left_alone():
    model = tiny_model(hidden_act="gelu")
    assert fuse_layers(model, ("mlp",)) == {"mlp": 0, "rmsnorm": 0, "lora": 0, "rope": 0}


def test_trainer_fuses_by_default_and_trains_the_same(tmp_path):
    from _train_worker import tiny_trainer

    runs = {}
    for fused in (True, False):
        trainer = tiny_trainer(tmp_path / str(fused), fused_layers=fused, save_strategy="no", max_steps=3)
        mlp = trainer.model.model.layers[0].mlp
        assert ("forward" in vars(mlp)) is fused
        trainer.train()
        runs[fused] = (torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
                       [json.loads(line)["loss"] for line in (tmp_path / str(fused) / "metrics.jsonl").open()])
    # Adam's first steps are ~lr * sign(g): rounding-level gradient differences in entries with
    # |g| near eps show up at ~1e-3 of an update (lr 1e-2 here); a wrong gradient would be ~1e-2.
    assert torch.allclose(runs[True][0], runs[False][0], rtol=0, atol=1e-4)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-6)


def _saved_storage_bytes(model, ids):
    """Bytes of the distinct storages autograd keeps for backward (a tensor saved twice counts once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).logits.sum()
    return sum(storages.values())


def _lora_pair(dtype=torch.float32, **cfg_kw):
    peft = pytest.importorskip("peft")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
              lora_dropout=0.0, init_lora_weights=False)
    kw.update(cfg_kw)
    eager = peft.get_peft_model(tiny_model(intermediate_size=48).to(dtype), peft.LoraConfig(**kw))
    lean = copy.deepcopy(eager)
    return eager, lean


def test_lean_lora_linear_matches_peft_in_float32():
    torch.manual_seed(3)
    eager, lean = _lora_pair()
    assert fuse_layers(lean, ("lora",)) == {"mlp": 0, "rmsnorm": 0, "lora": 10, "rope": 0}
    ids = torch.randint(0, 300, (2, 9))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_l, grads_l = _loss_and_grads(lean, ids)
    assert torch.allclose(out_e, out_l, rtol=1e-5, atol=1e-6) and grads_e.keys() == grads_l.keys() and grads_e
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_l[name], rtol=1e-4, atol=1e-6), name
    # with adapters disabled (the reference) the lean forward is peft's: the base model exactly
    with torch.no_grad(), eager.disable_adapter(), lean.disable_adapter():
        assert torch.equal(eager(input_ids=ids).logits, lean(input_ids=ids).logits)
    assert unfuse_layers(lean) == 10


def test_lean_lora_linear_under_bfloat16_autocast_keeps_no_adapter_copies():
    """bfloat16 base, float32 adapters (peft's default upcast), autocast: peft keeps a bfloat16 copy of
    each adapted layer's input for backward; the lean forward keeps the input itself (once where
    layers share it), and is as close to the float32 model as peft is."""
    torch.manual_seed(4)
    eager, lean = _lora_pair(torch.bfloat16)
    assert {p.dtype for n, p in eager.named_parameters() if "lora_" in n} == {torch.float32}
    truth = copy.deepcopy(eager).float()
    fuse_layers(lean, ("lora",))
    ids = torch.randint(0, 300, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads_e, grads_l = _loss_and_grads(eager, ids)[1], _loss_and_grads(lean, ids)[1]
        saved_e, saved_l = _saved_storage_bytes(eager, ids), _saved_storage_bytes(lean, ids)
    grads_t = _loss_and_grads(truth, ids)[1]
    assert grads_e.keys() == grads_l.keys() == grads_t.keys() and grads_e

    def rel_errors(grads):
        return torch.stack([(grads[n].float() - grads_t[n]).norm() / grads_t[n].norm() for n in grads_t])

    # roundings fall in other places (one per addmm instead of after the product, the scaling and the
    # sum), so parameter by parameter either side may be closer; over the model they are as close
    err_l, err_e = rel_errors(grads_l), rel_errors(grads_e)
    assert err_l.mean() <= 1.25 * err_e.mean() + 1e-3 and err_l.max() <= 1.25 * err_e.max() + 1e-3
    # peft keeps a bfloat16 copy of each adapted layer's input; lean keeps the input itself, once for
    # layers that share it: q and v share one (hidden,), gate and up another, down its own (2 layers,
    # 2 x 9 tokens, 2 bytes)
    assert saved_e - saved_l == 2 * (2 * 9) * 2 * (2 * 32)


@pytest.mark.parametrize("case", ["dora", "dropout", "two_adapters", "adapter_names"])
def test_lean_lora_linear_falls_back_to_peft(case):
    torch.manual_seed(5)
    eager, lean = _lora_pair(use_dora=case == "dora", lora_dropout=0.5 if case == "dropout" else 0.0)
    if case == "two_adapters":
        from peft import LoraConfig

        eager.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        eager.base_model.set_adapter(["default", "other"])
        lean = copy.deepcopy(eager)
    fuse_layers(lean, ("lora",))
    ids = torch.randint(0, 300, (2, 9))
    kwargs = {"adapter_names": ["default", "default"]} if case == "adapter_names" else {}
    eager.eval(), lean.eval()  # dropout off, so the two agree (training with dropout takes the lean path)
    with torch.no_grad():
        assert torch.allclose(eager(input_ids=ids, **kwargs).logits, lean(input_ids=ids, **kwargs).logits,
                              rtol=1e-5, atol=1e-6)


def test_lean_lora_linear_with_adapters_off_is_the_base_layer(monkeypatch):
    from peft.tuners.lora.layer import Linear

    torch.manual_seed(6)
    eager, lean = _lora_pair()
    fuse_layers(lean, ("lora",))
    ids = torch.randint(0, 300, (2, 9))
    peft_calls = []
    real = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: peft_calls.append(1) or real(self, *a, **k))
    with torch.no_grad(), eager.disable_adapter(), lean.disable_adapter():
        want, got = eager(input_ids=ids).logits, lean(input_ids=ids).logits
        assert len(peft_calls) == 10  # eager's ten adapted layers; the lean ones call the base layer
    assert torch.equal(got, want)
    with torch.no_grad():
        assert not torch.allclose(lean(input_ids=ids).logits, want)  # the adapters are not zero


def test_trainer_lora_run_is_the_same_with_lean_layers(tmp_path):
    from _train_worker import tiny_trainer

    losses = {}
    for fused in (True, False):
        trainer = tiny_trainer(tmp_path / str(fused), fused_layers=fused, save_strategy="no", max_steps=3,
                               model=_lora_pair(target_modules=["q_proj", "down_proj"])[0])
        assert ("forward" in vars(trainer.model.base_model.model.model.layers[0].self_attn.q_proj)) is fused
        trainer.train()
        losses[fused] = [json.loads(line)["loss"] for line in (tmp_path / str(fused) / "metrics.jsonl").open()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_fusing_a_model_without_lora_does_not_import_peft():
    """peft's import took 0.3 s of a trainer's construction; a model has LoRA layers only if it is imported."""
    code = ("import sys; from preftune.fused import fuse_layers; from preftune.testing import tiny_model; "
            "fuse_layers(tiny_model()); assert 'peft' not in sys.modules, 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _saved_product_tensors(model, ids, width: int) -> list:
    """The tensors of distinct storages with (tokens, width) values that autograd keeps for backward."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if t.dim() and t.shape[-1] == width and t.numel() >= ids.numel() * width and s.data_ptr() not in params:
            storages[s.data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).logits.sum()
    return list(storages.values())


def _saved_product_storages(model, ids, width: int) -> int:
    """How many distinct storages of (tokens, width) values autograd keeps for backward: with width the
    MLP's intermediate size, the MLP's activations (gate, up, silu(gate), the product, copies)."""
    return len(_saved_product_tensors(model, ids, width))


@pytest.mark.parametrize("kinds", [("mlp",), ("mlp", "lora")])
def test_fused_mlp_with_a_lora_down_proj_keeps_only_gate_and_up(kinds):
    """A LoRA down_proj reads the product with its A too: the fused MLP computes base + scaling * B(A(prod))
    in one autograd node and rebuilds the product in backward for A's gradient, as for the base weight's."""
    torch.manual_seed(7)
    eager, fused = _lora_pair(target_modules=["gate_proj", "up_proj", "down_proj"])
    assert fuse_layers(fused, kinds)["mlp"] == 2
    ids = torch.randint(0, 300, (2, 9))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.allclose(out_e, out_f, rtol=1e-5, atol=1e-6)
    assert grads_e.keys() == grads_f.keys() and any("down_proj.lora_A" in n for n in grads_e)
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_f[name], rtol=1e-4, atol=1e-6), name
    layers = eager.config.num_hidden_layers
    assert _saved_product_storages(fused, ids, 48) == 2 * layers  # gate and up
    assert _saved_product_storages(eager, ids, 48) >= 4 * layers  # + silu(gate), the product (+ peft's copies)


def test_fused_mlp_with_a_lora_down_proj_under_bfloat16_autocast():
    """bfloat16 base, float32 adapters, autocast (a GPU job's set-up): as close to the float32 model
    as peft's own forward is, with the same one-matmul adapter as the lean LoRA linear."""
    torch.manual_seed(8)
    eager, fused = _lora_pair(torch.bfloat16, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    truth = copy.deepcopy(eager).float()
    fuse_layers(fused)
    ids = torch.randint(0, 300, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads_e, grads_f = _loss_and_grads(eager, ids)[1], _loss_and_grads(fused, ids)[1]
        assert _saved_product_storages(fused, ids, 48) == 2 * eager.config.num_hidden_layers
    grads_t = _loss_and_grads(truth, ids)[1]
    assert grads_e.keys() == grads_f.keys() == grads_t.keys() and grads_e
    assert {grads_f[n].dtype for n in grads_f} == {torch.float32}  # the adapters' own dtype

    def rel_errors(grads):
        return torch.stack([(grads[n].float() - grads_t[n]).norm() / grads_t[n].norm() for n in grads_t])

    err_f, err_e = rel_errors(grads_f), rel_errors(grads_e)
    assert err_f.mean() <= 1.25 * err_e.mean() + 1e-3 and err_f.max() <= 1.25 * err_e.max() + 1e-3


def test_fused_mlp_with_lora_dropout_keeps_a_mask_not_a_dropped_copy():
    """With the down_proj's LoRA dropout on in training, A reads the dropped product: the fused MLP draws
    it as the eager module does (same seed, same values and gradients) and keeps gate, up and the
    dropout's one-byte mask, not the dropped copy and its noise. With the adapters off the down_proj
    is its base layer."""
    torch.manual_seed(9)
    eager, fused = _lora_pair(target_modules=["down_proj"], lora_dropout=0.5)
    fuse_layers(fused)
    ids = torch.randint(0, 300, (2, 9))
    layers = eager.config.num_hidden_layers
    torch.manual_seed(10)
    out_e, grads_e = _loss_and_grads(eager, ids)
    torch.manual_seed(10)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.allclose(out_e, out_f, rtol=1e-5, atol=1e-6) and grads_e.keys() == grads_f.keys()
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_f[name], rtol=1e-4, atol=1e-6), name
    torch.manual_seed(11)
    kept = {t.dtype for t in _saved_product_tensors(fused, ids, 48)}
    assert _saved_product_storages(fused, ids, 48) == 3 * layers and kept == {torch.float32, torch.bool}
    eager.eval(), fused.eval()  # dropout off: gate and up only, equal to eager
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.allclose(out_e, out_f, rtol=1e-5, atol=1e-6)
    assert _saved_product_storages(fused, ids, 48) == 2 * layers
    with eager.disable_adapter(), fused.disable_adapter():  # grad on, nothing trainable in the layers
        out_e, out_f = eager(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.equal(out_e, out_f) and not torch.allclose(out_e, eager(input_ids=ids).logits)


def test_lean_lora_linear_with_dropout_matches_peft_and_keeps_a_mask():
    """LoRA dropout on in training (q, v, gate, up, down): the same random draws and values as peft's
    forward, every gradient equal, and per adapted layer a one-byte mask kept instead of peft's dropped
    copy and the dropout's float noise."""
    torch.manual_seed(12)
    eager, lean = _lora_pair(lora_dropout=0.3)
    fuse_layers(lean)
    ids = torch.randint(0, 300, (2, 9))
    torch.manual_seed(13)
    out_e, grads_e = _loss_and_grads(eager, ids)
    torch.manual_seed(13)
    out_l, grads_l = _loss_and_grads(lean, ids)
    assert torch.allclose(out_e, out_l, rtol=1e-5, atol=1e-6) and grads_e.keys() == grads_l.keys() and grads_e
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_l[name], rtol=1e-4, atol=1e-6), name
    torch.manual_seed(14)
    saved_e = _saved_storage_bytes(eager, ids)
    torch.manual_seed(14)
    saved_l = _saved_storage_bytes(lean, ids)
    # per layer peft keeps, for each of q, v, gate, up (input width 32) and down (48), at least the
    # float32 dropped copy that A reads (4 bytes an element); lean keeps a 1-byte mask in its place
    tokens, layers = ids.numel(), eager.config.num_hidden_layers
    assert saved_e - saved_l >= layers * tokens * (4 * 32 + 48) * (4 - 1)


def test_lean_lora_linear_in_bfloat16_without_autocast_keeps_no_float32_copies():
    """A bfloat16 model with peft's float32 adapters and no autocast: the adapter's math runs in
    float32 (as peft's does), but x is kept in bfloat16 and cast again in backward, where peft (and
    eager autograd) keep a float32 copy of x per adapted layer."""
    torch.manual_seed(11)
    eager, lean = _lora_pair(torch.bfloat16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    fuse_layers(lean, ("lora",))
    ids = torch.randint(0, 300, (2, 9))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_l, grads_l = _loss_and_grads(lean, ids)
    assert torch.allclose(out_e.float(), out_l.float(), rtol=1e-2, atol=1e-2)
    assert grads_e.keys() == grads_l.keys() and grads_e
    for name in grads_e:
        assert grads_l[name].dtype == grads_e[name].dtype == torch.float32
        assert torch.allclose(grads_e[name], grads_l[name], rtol=2e-2, atol=1e-3), name

    def float32_activations(model):
        kept = set()

        def pack(t):
            if t.dtype == torch.float32 and t.dim() and t.shape[-1] == 32 and t.numel() >= ids.numel() * 32:
                kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False)
        return len(kept)

    # eager keeps one float32 copy of x per adapted layer (2 layers x 4) besides the norms' float32 work
    assert float32_activations(eager) - float32_activations(lean) == 2 * 4


@pytest.mark.parametrize("lora", [False, True])
def test_norm_outputs_are_made_again_in_backward_not_kept(lora, monkeypatch):
    """Through model_logps (autograd on), a fused RMSNorm's output read by the projections is not kept
    for backward: every one is freed when the forward returns, each is made again once in backward
    (shared by q, k and v, or gate and up), and the gradients are bit for bit those of keeping them."""
    import gc

    from preftune import fused
    from preftune.data.batching import collate
    from preftune.logps import model_logps

    torch.manual_seed(12)
    model = _lora_pair(target_modules=["q_proj", "v_proj", "down_proj"])[0] if lora else tiny_model(intermediate_size=48)
    fuse_layers(model)
    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 40], "rejected_ids": [10, 11], "index": 0},
             {"prompt_ids": [20, 21], "chosen_ids": [30], "rejected_ids": [31, 32, 33], "index": 1}]
    batch = collate(feats, layout="prefix", pad_token_id=0)
    entries, made = [], []
    real_init, real_recomputed = fused._NormOutput.__init__, fused._NormOutput.recomputed

    def init(self, *a):
        real_init(self, *a)
        entries.append(weakref.ref(self))

    def recomputed(self):
        if self.value is None:
            made.append(id(self))
        return real_recomputed(self)

    monkeypatch.setattr(fused._NormOutput, "__init__", init)
    monkeypatch.setattr(fused._NormOutput, "recomputed", recomputed)
    held = []  # per norm backward: how many outputs made again are still held
    real_backward = fused._RMSNorm.backward

    def backward(ctx, grad):
        gc.collect()
        held.append(sum(1 for e in entries if e() is not None and e().value is not None))
        return real_backward(ctx, grad)

    monkeypatch.setattr(fused._RMSNorm, "backward", staticmethod(backward))

    def run():
        model.zero_grad(set_to_none=True)
        out = model_logps(model, batch)
        gc.collect()
        alive = [e for e in entries if e() is not None and e().ref() is not None]
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        return alive, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    alive, grads = run()
    layers = model.config.num_hidden_layers
    assert len(entries) == 2 * layers + 1 and not alive  # + the final norm, whose output nothing keeps
    # with LoRA on q, v and down_proj only, the frozen gate/up read the second norm's output without keeping it
    kept_outputs = layers if lora else 2 * layers
    assert len(made) == kept_outputs and len(set(made)) == kept_outputs
    made.clear()
    # each lives only until the ops that read it have run their backward (by its norm's backward at the latest)
    assert len(held) >= 2 * layers - 1 and max(held) == 0  # (with LoRA the first norm needs no backward)
    entries.clear()
    monkeypatch.setattr(fused, "recompute_norm_outputs", contextlib.nullcontext)
    kept_alive, kept = run()
    assert not entries and grads.keys() == kept.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], kept[name]), name


def test_a_norm_input_changed_in_place_is_refused_at_recompute():
    from preftune.fused import _NormOutput

    x, w = torch.randn(3, 8), torch.ones(8)
    y = x * 1.0
    entry = _NormOutput(y, x, w, 1e-6, False)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        entry.recomputed()


@pytest.mark.parametrize("dtype", ["float32", "bf16-autocast"])
def test_recompute_mlp_matches_eager_and_keeps_only_its_input(dtype):
    """recompute_mlp: values bit for bit the fused MLP's, gradients equal to rounding (float32: to the bit
    for the weights the recompute does not touch), and per layer two (tokens, intermediate) tensors less
    kept for backward than the fused MLP."""
    torch.manual_seed(0)
    eager = tiny_model(intermediate_size=48)
    lean, recompute = copy.deepcopy(eager), copy.deepcopy(eager)
    fuse_layers(lean, ("mlp",))
    counts = fuse_layers(recompute, ("mlp",), recompute_mlp=True)
    layers = eager.config.num_hidden_layers
    assert counts["mlp_recompute"] == layers
    ids = torch.randint(0, 300, (3, 17))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype != "float32" else contextlib.nullcontext()
    with ctx:
        out_e, grads_e = _loss_and_grads(eager, ids)
        out_l, grads_l = _loss_and_grads(lean, ids)
        out_r, grads_r = _loss_and_grads(recompute, ids)
    assert torch.equal(out_l, out_r)
    assert torch.allclose(out_e.float(), out_r.float(), rtol=1e-2 if dtype != "float32" else 1e-6, atol=1e-5)
    assert grads_l.keys() == grads_r.keys() == grads_e.keys()
    for name in grads_e:
        tol = dict(rtol=2e-2, atol=1e-3) if dtype != "float32" else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads_r[name], grads_l[name], **tol, msg=name)
        torch.testing.assert_close(grads_r[name], grads_e[name], **tol, msg=name)
    if dtype == "float32":
        for name in grads_l:
            if "down_proj" in name:  # made from the same gate and up: the same bits
                assert torch.equal(grads_r[name], grads_l[name]), name
    def activation_bytes(model):  # saved tensors of the tokens (weights and their casts left out)
        total = []

        def pack(t):
            if tuple(t.shape[:2]) == (3, 17) or t.shape[0] == 3 * 17:
                total.append(t.numel() * t.element_size())
            return t

        with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False).logits.sum()
        return sum(total)

    elt, hidden, tokens = (2 if dtype != "float32" else 4), eager.config.hidden_size, 3 * 17
    # the fused MLP's projections keep their input (each its own bf16 cast under autocast; one float32
    # tensor, packed twice, without) and it keeps gate and up; this one keeps its float32 input once
    assert activation_bytes(lean) - activation_bytes(recompute) == layers * tokens * (
        2 * 48 * elt + 2 * hidden * elt - hidden * 4)


def test_recompute_mlp_leaves_lora_projections_to_the_fused_path():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(intermediate_size=48),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj"], lora_dropout=0.0))
    counts = fuse_layers(model, ("mlp",), recompute_mlp=True)
    assert counts["mlp"] == model.config.num_hidden_layers and counts["mlp_recompute"] == 0
    assert unfuse_layers(model) == counts["mlp"]
    assert not any(hasattr(m, "_preftune_recompute_mlp") for m in model.modules())


def test_recompute_mlp_checks_its_projections_at_each_forward():
    """An adapter wrapped around a projection after fusing: the MLP takes the fused path with it."""
    peft = pytest.importorskip("peft")
    base = tiny_model(intermediate_size=48)
    fuse_layers(base, ("mlp",), recompute_mlp=True)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    ids = torch.randint(0, 300, (2, 9))
    with model.disable_adapter():
        plain = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, plain)  # the adapters count


def test_trainer_with_recompute_mlp_trains_the_same(tmp_path, caplog):
    from _train_worker import tiny_trainer

    runs = {}
    for recompute in (True, False):
        trainer = tiny_trainer(tmp_path / str(recompute), recompute_mlp=recompute, save_strategy="no", max_steps=3)
        assert trainer.model.model.layers[0].mlp._preftune_recompute_mlp is recompute
        trainer.train()
        runs[recompute] = (torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
                           [json.loads(line)["loss"] for line in (tmp_path / str(recompute) / "metrics.jsonl").open()])
    assert torch.equal(runs[True][0], runs[False][0])  # float32: gate and up made again are the same bits
    assert runs[True][1] == runs[False][1]
    with caplog.at_level(logging.WARNING, logger="preftune"):
        tiny_trainer(tmp_path / "lora", recompute_mlp=True, use_peft=True, lora_dropout=0.0,
                     lora_target_modules=["q_proj", "gate_proj"])
    assert any("nothing is recomputed" in r.getMessage() for r in caplog.records)
