"""preftune.fused: the lean SwiGLU MLP and RMSNorm backward against the eager modules."""

from __future__ import annotations

import copy
import json

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
    assert counts == {"mlp": layers if "mlp" in kinds else 0, "rmsnorm": 2 * layers + 1 if "rmsnorm" in kinds else 0}
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
    assert fuse_layers(model, ("mlp",)) == {"mlp": 0, "rmsnorm": 0}


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
