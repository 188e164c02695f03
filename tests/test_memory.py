"""preftune.memory: AdamW state created up front equals the lazily created one; malloc settings."""

from __future__ import annotations

import pytest
import torch

from preftune import memory
from preftune.testing import tiny_model


def _steps(opt_kwargs, eager: bool, steps: int = 3):
    model = tiny_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **opt_kwargs)
    if eager:
        assert memory.init_adamw_state(opt) == len(list(model.parameters()))
        assert memory.init_adamw_state(opt) == 0  # parameters with state are left alone
    ids = torch.tensor([[3, 7, 9, 11, 2], [5, 5, 8, 1, 0]])
    for k in range(steps):
        model(input_ids=ids + k, use_cache=False).logits.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.mark.parametrize("opt_kwargs", [dict(fused=True), dict(foreach=True), dict(foreach=False, amsgrad=True)],
                         ids=["fused", "foreach", "amsgrad"])
def test_adamw_state_up_front_takes_the_same_steps(opt_kwargs):
    lazy_model, lazy = _steps(opt_kwargs, eager=False)
    eager_model, eager = _steps(opt_kwargs, eager=True)
    for a, b in zip(lazy_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    sa, sb = lazy.state_dict()["state"], eager.state_dict()["state"]  # checkpoints look the same
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert (sa[i][k].dtype, sa[i][k].device, sa[i][k].shape) == (sb[i][k].dtype, sb[i][k].device, sb[i][k].shape)
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_adamw_state_up_front_leaves_other_optimizers_and_frozen_parameters():
    model = tiny_model()
    assert memory.init_adamw_state(torch.optim.SGD(model.parameters(), lr=0.1)) == 0
    assert memory.init_adamw_state(torch.optim.Adam(model.parameters())) == 0  # not AdamW: its own init
    model.lm_head.weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters())
    assert memory.init_adamw_state(opt) == len(list(model.parameters())) - 1
    assert model.lm_head.weight not in opt.state


def test_malloc_tuning_once_and_opt_out(monkeypatch):
    import sys

    monkeypatch.setattr(memory, "_done", None)
    monkeypatch.setenv("PREFTUNE_MALLOC_TUNING", "0")
    assert memory.tune_malloc() is False
    monkeypatch.setattr(memory, "_done", None)
    monkeypatch.delenv("PREFTUNE_MALLOC_TUNING")
    applied = memory.tune_malloc()
    assert applied is sys.platform.startswith("linux")  # glibc here; musl and macOS have no mallopt
    assert memory.tune_malloc() is applied  # once per process
