"""Tests for preftune.metrics: batch metrics on a hand example and the micro-batch accumulator."""

from __future__ import annotations

import pytest
import torch

from preftune.losses import preference_loss
from preftune.metrics import MetricAccumulator, preference_metrics


def _batch(B, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda: -30 * torch.rand(B, generator=g)  # noqa: E731
    return dict(policy_chosen_logps=r().requires_grad_(), policy_rejected_logps=r().requires_grad_(),
                ref_chosen_logps=r(), ref_rejected_logps=r()), 0.5 + torch.rand(B, generator=g)


def test_hand_example():
    # pair 1 is the document's example: rewards 0.08 / -0.03 (correct order, margin 0.11)
    # pair 2: chosen reward 0.1 * (-10 - (-9)) = -0.1, rejected 0.1 * (-20 - (-21)) = 0.1 -> wrong order
    pc, pr = torch.tensor([-15.3, -10.0], requires_grad=True), torch.tensor([-12.8, -20.0], requires_grad=True)
    rc, rr = torch.tensor([-16.1, -9.0]), torch.tensor([-12.5, -21.0])
    nll = torch.tensor([1.0, 2.0])
    out = preference_loss("sigmoid", policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                          ref_rejected_logps=rr, beta=0.1)
    m = preference_metrics(out, pc, pr, chosen_nll=nll)
    want = {
        "rewards/chosen": (0.08 - 0.1) / 2,                # -0.01
        "rewards/rejected": (-0.03 + 0.1) / 2,             # 0.035
        "rewards/accuracies": 0.5,                          # 1 of 2 pairs
        "rewards/margins": (0.11 + -0.2) / 2,               # -0.045
        "logps/chosen": (-15.3 - 10.0) / 2,
        "logps/rejected": (-12.8 - 20.0) / 2,
        "nll_loss": 1.5,
    }
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k].dim() == 0 and not m[k].requires_grad
        assert m[k].item() == pytest.approx(v, abs=1e-5), k
    assert "nll_loss" not in preference_metrics(out, pc, pr)
    assert set(preference_metrics(out, pc, pr, prefix="eval_")) == {f"eval_{k}" for k in want if k != "nll_loss"}


def test_accumulator_over_uneven_micro_batches_equals_full_batch():
    kw, nll = _batch(10, seed=0)
    full = preference_metrics(preference_loss("sigmoid", **kw), kw["policy_chosen_logps"],
                              kw["policy_rejected_logps"], chosen_nll=nll)
    acc = MetricAccumulator()
    start = 0
    for size in (3, 1, 6):  # uneven micro-batches
        part = {k: v[start:start + size] for k, v in kw.items()}
        out = preference_loss("sigmoid", **part)
        acc.add(preference_metrics(out, part["policy_chosen_logps"], part["policy_rejected_logps"],
                                   chosen_nll=nll[start:start + size]), count=size)
        start += size
    got = acc.compute()
    assert set(got) == set(full)
    for k, v in full.items():
        assert isinstance(got[k], float)
        assert got[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    acc.reset()
    assert acc.compute() == {}


def test_reduce_sums_totals_across_processes():
    # Two "processes" with different batches: reduce_fn adds the other process's packed totals.
    kw, _ = _batch(7, seed=1)
    a, b = MetricAccumulator(), MetricAccumulator()
    for acc, sl in ((a, slice(0, 2)), (b, slice(2, 7))):
        part = {k: v[sl] for k, v in kw.items()}
        acc.add(preference_metrics(preference_loss("sigmoid", **part), part["policy_chosen_logps"],
                                   part["policy_rejected_logps"]), count=sl.stop - sl.start)
    packed = {}

    def capture(t):
        packed["a"] = t
        return t

    a.reduce(capture)
    b.reduce(lambda t: t + packed["a"])
    full = preference_metrics(preference_loss("sigmoid", **kw), kw["policy_chosen_logps"],
                              kw["policy_rejected_logps"])
    got = b.compute()
    for k, v in full.items():
        assert got[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k


def test_keys_missing_from_some_batches_average_over_their_own_count():
    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor(1.0), "nll_loss": torch.tensor(4.0)}, count=2)
    acc.add({"loss": torch.tensor(4.0)}, count=1)
    assert acc.compute() == {"loss": pytest.approx(2.0), "nll_loss": pytest.approx(4.0)}
