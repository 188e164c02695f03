"""preftune.fused: the lean SwiGLU MLP backward against the eager module."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.fused import fuse_swiglu_mlps, unfuse_swiglu_mlps
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


def test_fused_mlp_matches_eager_values_and_gradients():
    torch.manual_seed(0)
    eager = tiny_model(intermediate_size=48)
    fused = copy.deepcopy(eager)
    assert fuse_swiglu_mlps(fused) == eager.config.num_hidden_layers
    ids = torch.randint(0, 300, (3, 17))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.equal(out_e, out_f)
    assert grads_e.keys() == grads_f.keys() and len(grads_e) == len(list(eager.parameters()))
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_f[name], rtol=1e-5, atol=1e-7), name
    # it keeps less for backward: the (tokens, intermediate) product and silu(gate) are not saved
    per_layer = 2 * 3 * 17 * 48 * 4
    assert _saved_bytes(eager, ids) - _saved_bytes(fused, ids) == eager.config.num_hidden_layers * per_layer
    assert unfuse_swiglu_mlps(fused) == eager.config.num_hidden_layers
    assert _saved_bytes(fused, ids) == _saved_bytes(eager, ids)


def test_fused_mlp_under_lora_matches_eager():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    eager = peft.get_peft_model(tiny_model(intermediate_size=48), cfg)
    fused = copy.deepcopy(eager)
    assert fuse_swiglu_mlps(fused) == 2
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
    fuse_swiglu_mlps(fused)
    ids = torch.randint(0, 300, (2, 9))
    out_e, grads_e = _loss_and_grads(eager, ids)
    out_f, grads_f = _loss_and_grads(fused, ids)
    assert torch.equal(out_e, out_f)
    for name in grads_e:
        assert grads_f[name].dtype == torch.bfloat16
        assert torch.allclose(grads_e[name].float(), grads_f[name].float(), rtol=2e-2, atol=1e-3), name
    with torch.no_grad():
        assert torch.equal(eager(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_other_mlps_are_left_alone():
    model = tiny_model(hidden_act="gelu")
    assert fuse_swiglu_mlps(model) == 0
