"""Tests for preftune.losses: every registered loss against a slow per-pair twin written with `math`,
numerics (bf16, extreme inputs), gradients, f-divergences, modifiers, errors and the config bridge."""

from __future__ import annotations

import dataclasses
import enum
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.losses import (
    LOSSES,
    describe_losses,
    divergence_delta,
    ld_dpo_logps,
    log_sum_sq_probs,
    loss_params,
    preference_loss,
    wpo_weights,
)

DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


# ------------------------------------------------------------------------------------------------
# The slow, obvious twins: one pair at a time, plain floats, the math module.
# ------------------------------------------------------------------------------------------------
def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def slow_s(x: float, kind: str, alpha: float) -> float:
    if kind == "reverse_kl" or (kind == "alpha_divergence" and alpha == 1.0):
        return x
    if kind == "forward_kl":
        return -math.exp(-x)
    if kind == "js_divergence":
        return math.log(2 * math.exp(x) / (1 + math.exp(x))) - math.log(2)  # log(2u/(1+u)) - const
    return math.exp((alpha - 1) * x) / (alpha - 1)


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def slow_pair(name, p, beta, prm):
    """p: dict of one pair's floats pc, pr, rc, rr, nc, nr, nll, delta."""
    c, r, d = p["pc"] - p["rc"], p["pr"] - p["rr"], p["delta"]
    eps = prm.get("label_smoothing", 0.0)
    if name == "sigmoid":
        return smoothed(beta * d, eps)
    if name == "hinge":
        return max(0.0, prm.get("hinge_delta", 1.0) - beta * d)
    if name == "ipo":
        return (c / p["nc"] - r / p["nr"] - 1 / (2 * beta)) ** 2
    if name == "robust":
        return (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
    if name == "exo_pair":
        e = eps or 1e-3
        q = sig(beta * d)
        return q * math.log(q / (1 - e)) + (1 - q) * math.log((1 - q) / e)
    if name == "nca_pair":
        return -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    if name == "bco_pair":
        return -logsig(beta * c) - logsig(-beta * r)
    if name == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return (1 - sig(beta * c)) + sig(beta * r)
    if name == "apo_down":
        return sig(beta * c) + (1 - sig(beta * d))
    if name == "discopop":
        z = beta * d
        m = sig(z / prm.get("discopop_tau", 0.05))
        return (1 - m) * -logsig(z) + m * math.exp(-z)
    if name == "sigmoid_norm":
        return -logsig(beta * (c / p["nc"] - r / p["nr"]))
    if name == "simpo":
        return smoothed(beta * p["pc"] / p["nc"] - beta * p["pr"] / p["nr"] - prm.get("simpo_gamma", 0.5), eps)
    if name == "sft":
        return p["nll"]
    raise KeyError(name)


def slow_loss(name, pc, pr, rc, rr, nc, nr, nll, beta=0.1, kind="reverse_kl", alpha=0.5, **prm):
    """Per-pair loop; aot / aot_pair sort the batch first, like the definition says."""
    if name in ("aot", "aot_pair"):
        if name == "aot":
            a, b = sorted(x - y for x, y in zip(pc, pr)), sorted(x - y for x, y in zip(rc, rr))
        else:
            a, b = sorted(x - y for x, y in zip(pc, rc)), sorted(x - y for x, y in zip(pr, rr))
        return [smoothed(beta * (x - y), prm.get("label_smoothing", 0.0)) for x, y in zip(a, b)]
    out = []
    for i in range(len(pc)):
        p = dict(pc=pc[i], pr=pr[i], rc=rc[i], rr=rr[i], nc=nc[i], nr=nr[i], nll=nll[i])
        p["delta"] = slow_s(p["pc"] - p["rc"], kind, alpha) - slow_s(p["pr"] - p["rr"], kind, alpha)
        out.append(slow_pair(name, p, beta, prm))
    return out


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def make_batch(B=6, seed=0, dtype=torch.float64, spread=5.0, base=-20.0, grad=False):
    """Log-probs around `base` with log-ratios of size ~spread; counts in [1, 30]; nll in [0.5, 3]."""
    g = torch.Generator().manual_seed(seed)
    u = lambda: torch.rand(B, generator=g, dtype=torch.float64)  # noqa: E731
    rc, rr = base + 5 * u(), base + 5 * u()
    pc, pr = rc + spread * (2 * u() - 1), rr + spread * (2 * u() - 1)
    nc, nr = torch.randint(1, 31, (B,), generator=g), torch.randint(1, 31, (B,), generator=g)
    nll = 0.5 + 2.5 * u()
    t = {k: v.to(dtype).requires_grad_(grad) for k, v in dict(pc=pc, pr=pr, rc=rc, rr=rr, nll=nll).items()}
    return dict(policy_chosen_logps=t["pc"], policy_rejected_logps=t["pr"], ref_chosen_logps=t["rc"],
                ref_rejected_logps=t["rr"], chosen_lengths=nc, rejected_lengths=nr, chosen_nll=t["nll"])


def floats(x):
    return [float(v) for v in x.detach().double()]


def run_slow(name, kw, **params):
    return slow_loss(name, floats(kw["policy_chosen_logps"]), floats(kw["policy_rejected_logps"]),
                     floats(kw["ref_chosen_logps"]), floats(kw["ref_rejected_logps"]),
                     floats(kw["chosen_lengths"]), floats(kw["rejected_lengths"]), floats(kw["chosen_nll"]),
                     **params)


# ------------------------------------------------------------------------------------------------
# The document's worked example (sec. 6.3)
# ------------------------------------------------------------------------------------------------
def test_worked_example_from_the_document():
    # Hand computation, beta = 0.1:
    #   r_w = 0.1 * (-15.3 - (-16.1)) = 0.1 * 0.8  =  0.08
    #   r_l = 0.1 * (-12.8 - (-12.5)) = 0.1 * -0.3 = -0.03
    #   sigma(0.08 - (-0.03)) = sigma(0.11) = 1 / (1 + e^-0.11) = 1 / 1.895834 = 0.52747
    #   loss = -log(0.52747) = 0.63968  ->  0.64
    t = lambda v: torch.tensor([v])  # noqa: E731
    out = preference_loss("sigmoid", policy_chosen_logps=t(-15.3), policy_rejected_logps=t(-12.8),
                          ref_chosen_logps=t(-16.1), ref_rejected_logps=t(-12.5), beta=0.1)
    assert round(out.chosen_rewards.item(), 2) == 0.08
    assert round(out.rejected_rewards.item(), 2) == -0.03
    assert round(out.loss.item(), 2) == 0.64
    assert out.loss.item() == pytest.approx(0.63968, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Every registered loss: formula, shapes, numerics, gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOSSES))
def test_formula_matches_slow_twin(name):
    kw = make_batch(B=7, seed=1)
    out = preference_loss(name, beta=0.1, **kw)
    torch.testing.assert_close(out.losses, torch.tensor(run_slow(name, kw, beta=0.1), dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)
    assert out.losses.dtype == torch.float64
    assert out.loss.item() == pytest.approx(sum(run_slow(name, kw, beta=0.1)) / 7, rel=1e-9)


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.params])
def test_formula_with_non_default_params(name):
    kw = make_batch(B=5, seed=2)
    own = {"label_smoothing": 0.2, "hinge_delta": 0.3, "simpo_gamma": 1.3, "discopop_tau": 0.4}
    own = {k: v for k, v in own.items() if k in LOSSES[name].params}
    out = preference_loss(name, beta=0.7, **kw, **own)
    torch.testing.assert_close(out.losses, torch.tensor(run_slow(name, kw, beta=0.7, **own), dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.uses_divergence])
def test_divergence_losses_match_slow_twin(name, kind):
    kw = make_batch(B=5, seed=3, spread=2.0)
    out = preference_loss(name, beta=0.5, f_divergence_type=kind, f_alpha_divergence_coef=0.3, **kw)
    want = run_slow(name, kw, beta=0.5, kind=kind, alpha=0.3)
    torch.testing.assert_close(out.losses, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_close_to_float64(name):
    kw64 = make_batch(B=6, seed=4)
    kw32 = {k: (v.float() if v.is_floating_point() else v) for k, v in kw64.items()}
    out32 = preference_loss(name, **kw32)
    assert out32.losses.dtype == torch.float32 and out32.losses.shape == (6,)
    torch.testing.assert_close(out32.losses.double(), preference_loss(name, **kw64).losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_values_and_grads_for_log_ratios_up_to_50(name, dtype, kind):
    B = 11
    ratios = torch.linspace(-50, 50, B)
    kw = make_batch(B=B, seed=5, dtype=dtype, grad=True)
    with torch.no_grad():  # chosen log-ratio spans [-50, 50], rejected the reverse
        kw["policy_chosen_logps"].copy_((kw["ref_chosen_logps"].float() + ratios).to(dtype))
        kw["policy_rejected_logps"].copy_((kw["ref_rejected_logps"].float() - ratios).to(dtype))
    out = preference_loss(name, f_divergence_type=kind, **kw)
    assert out.losses.shape == (B,) and out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [kw["policy_chosen_logps"].grad, kw["policy_rejected_logps"].grad]
    if LOSSES[name].needs_nll:
        grads = [kw["chosen_nll"].grad]
    for g_ in grads:
        assert g_ is not None and g_.dtype == dtype and torch.isfinite(g_.float()).all()
    assert kw["ref_chosen_logps"].grad is None and kw["ref_rejected_logps"].grad is None


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_inputs_stay_finite(name, kind):
    big = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0])
    kw = dict(policy_chosen_logps=(-big).requires_grad_(), policy_rejected_logps=big.clone().requires_grad_(),
              ref_chosen_logps=big.clone(), ref_rejected_logps=-big, chosen_lengths=torch.tensor([1, 5, 1, 9, 1]),
              rejected_lengths=torch.tensor([3, 1, 1, 2, 7]), chosen_nll=torch.full((5,), 1e4, requires_grad=True))
    leaves = [kw["policy_chosen_logps"], kw["policy_rejected_logps"], kw["chosen_nll"]]
    for alpha in (0.5, 1.0 + 1e-6, 3.0, -2.0):
        out = preference_loss(name, f_divergence_type=kind, f_alpha_divergence_coef=alpha, beta=2.0,
                              discopop_tau=0.05, **kw)
        assert torch.isfinite(out.losses).all(), (alpha, out.losses)
        grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        assert all(g_ is None or torch.isfinite(g_).all() for g_ in grads), (alpha, grads)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_reaches_policy_not_reference(name):
    kw = make_batch(B=4, seed=6, grad=True)
    preference_loss(name, **kw).loss.backward()
    assert kw["ref_chosen_logps"].grad is None and kw["ref_rejected_logps"].grad is None
    if LOSSES[name].needs_nll:
        assert kw["chosen_nll"].grad.abs().sum() > 0
    else:
        assert kw["policy_chosen_logps"].grad.abs().sum() > 0
        assert kw["policy_rejected_logps"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if not s.needs_reference])
def test_reference_free_losses_accept_none(name):
    kw = make_batch(B=4, seed=7)
    kw["ref_chosen_logps"] = kw["ref_rejected_logps"] = None
    out = preference_loss(name, **kw)
    assert out.losses.shape == (4,) and torch.isfinite(out.losses).all()


def test_simpo_rewards_are_length_normalized():
    kw = make_batch(B=4, seed=8)
    out = preference_loss("simpo", beta=2.5, **kw)
    torch.testing.assert_close(out.chosen_rewards, 2.5 * kw["policy_chosen_logps"] / kw["chosen_lengths"])
    torch.testing.assert_close(out.rejected_rewards, 2.5 * kw["policy_rejected_logps"] / kw["rejected_lengths"])
    assert not out.chosen_rewards.requires_grad


# ------------------------------------------------------------------------------------------------
# Special cases, hand values, the gradient of eq. 6.11, the swap property
# ------------------------------------------------------------------------------------------------
def test_robust_with_zero_eps_equals_sigmoid():
    kw = make_batch(B=8, seed=9)
    torch.testing.assert_close(preference_loss("robust", label_smoothing=0.0, **kw).losses,
                               preference_loss("sigmoid", **kw).losses)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_divergence_near_one_equals_reverse_kl(dtype):
    c, r = torch.linspace(-30, 30, 13, dtype=dtype), torch.linspace(20, -25, 13, dtype=dtype)
    want = c - r
    for alpha in (1.0, 1.0 + 1e-7, 1.0 - 1e-7):
        torch.testing.assert_close(divergence_delta(c, r, "alpha_divergence", alpha), want, rtol=1e-5, atol=1e-4)


def test_divergences_by_hand():
    c, r = torch.tensor([math.log(3.0)]), torch.tensor([0.0])
    # js: log sigmoid(log 3) - log sigmoid(0) = log(3/4) - log(1/2) = log(3/2)
    assert divergence_delta(c, r, "js_divergence").item() == pytest.approx(math.log(1.5), rel=1e-6)
    # forward KL, u_w = 2, u_l = 1: -1/2 - (-1) = 0.5
    c = torch.tensor([math.log(2.0)])
    assert divergence_delta(c, r, "forward_kl").item() == pytest.approx(0.5, rel=1e-6)
    # alpha = 0.5, u_w = 4: s(x) = -2 u^-1/2 -> -1 - (-2) = 1
    c = torch.tensor([math.log(4.0)])
    assert divergence_delta(c, r, "alpha_divergence", 0.5).item() == pytest.approx(1.0, rel=1e-6)
    # sigmoid loss on the forward-KL delta 0.5 at beta 1: log(1 + e^-0.5) = 0.474077
    z = torch.zeros(1)
    out = preference_loss("sigmoid", policy_chosen_logps=torch.tensor([math.log(2.0)]), policy_rejected_logps=z,
                          ref_chosen_logps=z, ref_rejected_logps=z, beta=1.0, f_divergence_type="forward_kl")
    assert out.loss.item() == pytest.approx(0.474077, abs=1e-6)


def test_sigmoid_gradient_is_eq_6_11():
    kw = make_batch(B=6, seed=10, grad=True)
    beta = 0.3
    preference_loss("sigmoid", beta=beta, **kw).losses.sum().backward()
    h = (kw["policy_chosen_logps"] - kw["ref_chosen_logps"] - kw["policy_rejected_logps"]
         + kw["ref_rejected_logps"]).detach()
    scale = beta * torch.sigmoid(-beta * h)
    torch.testing.assert_close(kw["policy_chosen_logps"].grad, -scale)
    torch.testing.assert_close(kw["policy_rejected_logps"].grad, scale)


finite = st.floats(-40.0, -0.1, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite, finite, st.integers(1, 50), st.integers(1, 50)),
                min_size=1, max_size=6),
       st.floats(0.01, 3.0), st.sampled_from(["sigmoid", "ipo", "bco_pair", "simpo", "hinge"]))
def test_swapping_chosen_and_rejected(rows, beta, name):
    pc, pr, rc, rr, nc, nr = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    kw = dict(chosen_lengths=nc, rejected_lengths=nr, beta=beta)
    a = preference_loss(name, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                        ref_rejected_logps=rr, **kw)
    b = preference_loss(name, policy_chosen_logps=pr, policy_rejected_logps=pc, ref_chosen_logps=rr,
                        ref_rejected_logps=rc, chosen_lengths=nr, rejected_lengths=nc, beta=beta)
    torch.testing.assert_close(b.chosen_rewards, a.rejected_rewards)
    torch.testing.assert_close(b.rejected_rewards, a.chosen_rewards)
    torch.testing.assert_close(b.chosen_rewards - b.rejected_rewards, -(a.chosen_rewards - a.rejected_rewards))
    if name == "sigmoid":  # -log sigmoid(-z) = -log sigmoid(z) + z
        h = (pc - rc) - (pr - rr)
        torch.testing.assert_close(b.losses, a.losses + beta * h, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Modifiers: combinations, rpo, per-pair weights, reference_free
# ------------------------------------------------------------------------------------------------
def test_combination_is_weighted_sum_of_means():
    kw = make_batch(B=5, seed=11)
    combo = preference_loss(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **kw)
    parts = [preference_loss(n, **kw) for n in ("sigmoid", "bco_pair", "sft")]
    torch.testing.assert_close(combo.losses, 0.8 * parts[0].losses + 0.2 * parts[1].losses + parts[2].losses)
    assert combo.loss.item() == pytest.approx(sum(w * p.loss.item() for w, p in zip([0.8, 0.2, 1.0], parts)))
    torch.testing.assert_close(combo.chosen_rewards, parts[0].chosen_rewards)
    assert set(combo.components) == {"sigmoid", "bco_pair", "sft"}
    same = preference_loss("sigmoid,bco_pair", **kw)  # comma-separated, default weights 1
    torch.testing.assert_close(same.losses, parts[0].losses + parts[1].losses)


def test_rpo_adds_alpha_times_mean_nll():
    kw = make_batch(B=5, seed=12)
    base = preference_loss("sigmoid", **kw)
    rpo = preference_loss("sigmoid", rpo_alpha=0.7, **kw)
    assert rpo.loss.item() == pytest.approx(base.loss.item() + 0.7 * kw["chosen_nll"].mean().item())
    torch.testing.assert_close(rpo.losses, base.losses)
    torch.testing.assert_close(rpo.pair_losses, base.losses + 0.7 * kw["chosen_nll"])


def test_pair_weights_multiply_losses():
    kw = make_batch(B=4, seed=13)
    w = torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=torch.float64)
    torch.testing.assert_close(preference_loss("ipo", weights=w, **kw).losses, w * preference_loss("ipo", **kw).losses)


def test_reference_free_uses_zero_reference():
    kw = make_batch(B=4, seed=14)
    got = preference_loss("sigmoid", reference_free=True, **kw)
    zero = torch.zeros(4, dtype=torch.float64)
    want = preference_loss("sigmoid", **{**kw, "ref_chosen_logps": zero, "ref_rejected_logps": zero})
    torch.testing.assert_close(got.losses, want.losses)
    kw["ref_chosen_logps"] = kw["ref_rejected_logps"] = None
    torch.testing.assert_close(preference_loss("sigmoid", reference_free=True, **kw).losses, want.losses)


def test_aot_unpaired_alias():
    kw = make_batch(B=6, seed=15)
    torch.testing.assert_close(preference_loss("aot_unpaired", **kw).losses, preference_loss("aot_pair", **kw).losses)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError, match=r"'dpo_typo' is unknown; valid choices: sigmoid, hinge"):
        preference_loss("dpo_typo", **make_batch(B=2))


def test_unknown_param_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss parameter\(s\) \['gamma'\]; valid: .*simpo_gamma"):
        preference_loss("simpo", gamma=0.5, **make_batch(B=2))


@pytest.mark.parametrize("name, bad, match", [
    ("robust", {"label_smoothing": 0.5}, r"label_smoothing=0.5 is out of range; it must lie in \[0, 0.5\)"),
    ("sigmoid", {"label_smoothing": -0.1}, r"label_smoothing=-0.1 is out of range"),
    ("sigmoid", {"beta": 0.0}, r"beta=0.0 is out of range; it must lie in \(0, inf\]"),
    ("discopop", {"discopop_tau": 0.0}, r"discopop_tau=0.0 is out of range"),
    ("sigmoid", {"rpo_alpha": -1.0}, r"rpo_alpha=-1.0 is out of range"),
    ("ipo", {"f_divergence_type": "kl_forward_typo"}, r"valid choices: reverse_kl, forward_kl"),
    ("sigmoid", {"loss_weights": [1.0, 2.0]}, r"loss_weights has 2 entries for 1 losses"),
])
def test_out_of_range_params(name, bad, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(name, **make_batch(B=2), **bad)


def test_missing_reference_says_what_to_do():
    kw = make_batch(B=2)
    kw["ref_chosen_logps"] = None
    with pytest.raises(ValueError, match=r"needs ref_chosen_logps and ref_rejected_logps.*reference_free=True.*simpo"):
        preference_loss("sigmoid", **kw)


def test_missing_lengths_and_nll():
    kw = make_batch(B=2)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        preference_loss("ipo", **{**kw, "chosen_lengths": None})
    with pytest.raises(ValueError, match="rpo_alpha needs chosen_nll"):
        preference_loss("sigmoid", rpo_alpha=1.0, **{**kw, "chosen_nll": None})
    with pytest.raises(ValueError, match=r"loss \['sft'\] needs chosen_nll"):
        preference_loss(["sigmoid", "sft"], **{**kw, "chosen_nll": None})


def test_shape_mismatch_names_the_argument():
    kw = make_batch(B=3)
    kw["ref_rejected_logps"] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(4,\); expected \(3,\)"):
        preference_loss("sigmoid", **kw)


# ------------------------------------------------------------------------------------------------
# Config bridge, divergence spellings, description
# ------------------------------------------------------------------------------------------------
class FDiv(enum.Enum):  # the shape of the older enum-typed f_divergence_type field
    ALPHA_DIVERGENCE = "alpha_divergence"


@pytest.mark.parametrize("spelling, want", [
    ("reverse_kl", "reverse_kl"), ("JS_DIVERGENCE", "js_divergence"), ("alpha-divergence", "alpha_divergence"),
    (FDiv.ALPHA_DIVERGENCE, "alpha_divergence"), ("FDivergenceType.JS_DIVERGENCE", "js_divergence"),
    ("forward_kl", "forward_kl"),
])
def test_divergence_spellings(spelling, want):
    assert loss_params(SimpleNamespace(f_divergence_type=spelling))["f_divergence_type"] == want


def test_loss_params_defaults_and_round_trip():
    p = loss_params(object())
    assert "name" not in p and p["beta"] == 0.1 and p["label_smoothing"] == 0.0
    assert p["simpo_gamma"] == 0.5 and p["discopop_tau"] == 0.05 and p["hinge_delta"] == 1.0
    assert p["rpo_alpha"] is None and p["loss_weights"] is None and p["f_alpha_divergence_coef"] == 0.5

    @dataclasses.dataclass
    class Cfg:  # DPOConfig field names; ld_alpha / use_weighting act on log-probs, not here
        beta: float = 0.3
        loss_type: list = dataclasses.field(default_factory=lambda: ["sigmoid", "sft"])
        loss_weights: list = dataclasses.field(default_factory=lambda: [1.0, 0.5])
        label_smoothing: float = 0.1
        rpo_alpha: float | None = None
        reference_free: bool | None = None
        ld_alpha: float | None = 0.5
        use_weighting: bool = True

    p = loss_params(Cfg())
    assert p["loss_weights"] == [1.0, 0.5] and p["reference_free"] is False
    kw = make_batch(B=3, seed=16)
    out = preference_loss(Cfg().loss_type, **p, **kw)
    want = preference_loss(["sigmoid", "sft"], beta=0.3, label_smoothing=0.1, loss_weights=[1.0, 0.5], **kw)
    torch.testing.assert_close(out.losses, want.losses)
    with pytest.raises(ValueError, match="valid choices"):
        loss_params(SimpleNamespace(loss_type="kto"))


def test_describe_lists_every_loss_and_parameter():
    text = describe_losses()
    for name, spec in LOSSES.items():
        assert f"\n{name} " in text
        for k, prm in spec.params.items():
            assert f"{k} = {prm.default!r}" in text
    assert "f_divergence_type" in text and "rpo_alpha" in text


def test_module_main_prints_description():
    res = subprocess.run([sys.executable, "-m", "preftune.losses"], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == describe_losses().strip()


# ------------------------------------------------------------------------------------------------
# Log-prob level modifiers: LD-DPO and WPO
# ------------------------------------------------------------------------------------------------
def _padded(lengths, T, seed, left=False):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(len(lengths), T, generator=g, dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n:] = True
        else:
            mask[i, 1:1 + n] = True  # one prompt token, then the completion
    logps = logps.masked_fill(~mask, float("-inf"))  # garbage off the mask must not leak in
    return logps, mask


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_logps_matches_loop(alpha):
    lc, lr = [4, 2, 6], [3, 5, 6]
    cl, cm = _padded(lc, 8, 0)
    rl, rm = _padded(lr, 9, 1, left=True)
    pc, pr = ld_dpo_logps(cl, rl, cm, rm, alpha)
    for i in range(3):
        lp = min(lc[i], lr[i])
        for got, logps, mask in ((pc[i], cl[i], cm[i]), (pr[i], rl[i], rm[i])):
            toks = [float(x) for x, m in zip(logps, mask) if m]
            want = sum(toks[:lp]) + alpha * sum(toks[lp:])
            assert float(got) == pytest.approx(want, rel=1e-12)
    if alpha == 1.0:
        torch.testing.assert_close(pc, cl.masked_fill(~cm, 0).sum(-1))
    cl.requires_grad_()
    ld_dpo_logps(cl, rl, cm, rm, alpha)[0].sum().backward()
    lp0 = min(lc[0], lr[0])  # row 0: tokens 1..4 are the completion; the first lp0 weigh 1, the rest alpha
    assert cl.grad[0].tolist() == [0.0] + [1.0] * lp0 + [alpha] * (lc[0] - lp0) + [0.0] * (7 - lc[0])
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_dpo_logps(cl, rl, cm, rm, 1.5)


def test_log_sum_sq_probs_and_wpo_weights_match_loop():
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 11
    logits_c, logits_r = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    tgt_c, tgt_r = torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)
    mask_c = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    mask_r = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    probs = torch.softmax(logits_c.double(), -1)
    torch.testing.assert_close(log_sum_sq_probs(logits_c).double(), probs.pow(2).sum(-1).log(), rtol=1e-5, atol=1e-5)

    lp_c = torch.log_softmax(logits_c, -1).gather(-1, tgt_c[..., None])[..., 0]
    lp_r = torch.log_softmax(logits_r, -1).gather(-1, tgt_r[..., None])[..., 0]
    w = wpo_weights(lp_c, lp_r, log_sum_sq_probs(logits_c), log_sum_sq_probs(logits_r), mask_c, mask_r)
    assert w.shape == (B,) and not w.requires_grad

    def mean_adjusted(logits, tgt, mask, i):  # mean over completion tokens of log(p_y / sum_v p_v^2)
        vals = []
        for t in range(T):
            if mask[i, t]:
                p = torch.softmax(logits[i, t].double(), -1).tolist()
                vals.append(math.log(p[tgt[i, t]] / sum(q * q for q in p)))
        return sum(vals) / len(vals)

    for i in range(B):
        want = math.exp(mean_adjusted(logits_c, tgt_c, mask_c, i) + mean_adjusted(logits_r, tgt_r, mask_r, i))
        assert float(w[i]) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# f-divergences at extreme log-ratios: exact where representable, finite beyond
# ------------------------------------------------------------------------------------------------
def test_forward_kl_past_exponent_40_worked_example():
    # Hand computation, beta = 0.1, forward KL s(x) = -e^-x, c = -17, r = 36.8 (a(c - r) = 53.8):
    #   delta = -e^17 + e^-36.8 = -24154952.7535753 + 1.04e-16 = -24154952.7535753
    #   z = 0.1 * delta = -2415495.27535753
    #   loss = -log sigmoid(z) = -z + log1p(e^z) = 2415495.27535753   (the old clamp at 40 gave about 2.5)
    #   dloss/dc = -sigmoid(-z) * 0.1 * e^17 = -2415495.27535753
    #   dloss/dr = +sigmoid(-z) * 0.1 * e^-36.8 = 1.0422e-17            (the old clamp gave dloss/dc = 0)
    c = torch.tensor([-17.0], requires_grad=True)
    r = torch.tensor([36.8], requires_grad=True)
    zero = torch.zeros(1)
    out = preference_loss("sigmoid", policy_chosen_logps=c, policy_rejected_logps=r, ref_chosen_logps=zero,
                          ref_rejected_logps=zero, beta=0.1, f_divergence_type="forward_kl")
    r32 = float(r.detach())  # 36.8 rounded to float32
    z = 0.1 * (-math.exp(17.0) + math.exp(-r32))
    assert z == pytest.approx(-2415495.27535753, rel=1e-12)
    want = -z + math.log1p(math.exp(z))
    assert out.losses.item() == pytest.approx(want, rel=1e-7) and out.losses.item() == pytest.approx(2.415e6, rel=1e-3)
    grad_c, grad_r = torch.autograd.grad(out.losses.sum(), [c, r])
    assert grad_c.item() == pytest.approx(-0.1 * math.exp(17.0), rel=1e-7)
    assert grad_r.item() == pytest.approx(0.1 * math.exp(-r32), rel=1e-6) and grad_r.item() > 0


def _exp_or_inf(x: float) -> float:
    return math.exp(x) if x < 709.78 else math.inf


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x))) if math.isfinite(x) else max(x, 0.0)


def _sig(x: float) -> float:
    return math.exp(-_softplus(-x))


def twin_z(c: float, r: float, kind: str, a: float, beta: float):
    """z = beta (s(c) - s(r)) and dz/dc, dz/dr in float64, written out; +-inf past float64."""
    if kind == "reverse_kl":
        return beta * (c - r), beta, -beta
    if kind == "js_divergence":
        return beta * (_softplus(-r) - _softplus(-c)), beta * _sig(-c), -beta * _sig(-r)
    # s(x) = e^(a x) / a: with m = max(a c, a r), e^(a c) - e^(a r) = e^m (e^(a c - m) - e^(a r - m))
    h = a * (c - r)
    m = max(a * c, a * r)
    g = -math.expm1(-h) if h >= 0 else math.expm1(h)
    z = 0.0 if g == 0 else beta / a * _exp_or_inf(m) * g
    return z, beta * _exp_or_inf(a * c), -beta * _exp_or_inf(a * r)


def twin_loss(name: str, z: float, prm: dict):
    """(loss, dloss/dz, terms of dloss/dz) in float64 for a finite z, written out from each loss's
    definition; the terms give the rounding a float computation of dloss/dz cannot avoid."""
    eps = prm.get("label_smoothing", 0.0)
    if name == "sigmoid":
        terms = [-(1 - eps) * _sig(-z), eps * _sig(z)]
        return (1 - eps) * _softplus(-z) + eps * _softplus(z), sum(terms), terms
    if name == "hinge":
        hd = prm.get("hinge_delta", 1.0)
        return max(0.0, hd - z), (-1.0 if hd - z > 0 else 0.0), [1.0]
    if name == "robust":
        terms = [-(1 - eps) * _sig(-z) / (1 - 2 * eps), -eps * _sig(z) / (1 - 2 * eps)]
        return ((1 - eps) * _softplus(-z) - eps * _softplus(z)) / (1 - 2 * eps), sum(terms), terms
    if name == "discopop":
        tau = prm["discopop_tau"]
        m, dm = _sig(z / tau), _sig(z / tau) * _sig(-z / tau) / tau
        weighted = _exp_or_inf(-_softplus(-z / tau) - z)  # m e^-z
        terms = [-dm * _softplus(-z), -(1 - m) * _sig(-z), weighted * _sig(-z / tau) / tau, -weighted]
        return (1 - m) * _softplus(-z) + weighted, sum(terms), terms
    raise KeyError(name)


SWEEP_CASES = [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.2}), ("hinge", {}),
               ("robust", {"label_smoothing": 0.2}), ("discopop", {"discopop_tau": 0.05}),
               ("discopop", {"discopop_tau": 2.0})]
SWEEP_KINDS = [("forward_kl", 0.5, -1.0), ("alpha_divergence", 0.5, -0.5), ("alpha_divergence", 3.0, 2.0),
               ("alpha_divergence", -1.0, -2.0), ("reverse_kl", 0.5, 0.0), ("js_divergence", 0.5, 0.0)]
SWEEP_H = [0.0, 1e-3, 0.7, 5.0, 20.0, 39.0, 41.0, 60.0, 80.0, 85.0, 88.0, 89.0, 90.0, 91.5, 92.5, 95.0, 100.0,
           300.0, 700.0, 705.0, 712.0, 1000.0]


def _sweep_inputs(a: float, dtype):
    """c, r in dtype with a(c - r) = +-h for h in SWEEP_H and a r in {-50, 0, 30}; log-ratios +-h for a = 0."""
    cs, rs = [], []
    for ar in (-50.0, 0.0, 30.0):
        for h in SWEEP_H:
            for sign in (1.0, -1.0):
                if a == 0.0:
                    cs.append(ar + sign * h / 2)
                    rs.append(ar - sign * h / 2)
                else:
                    rs.append(ar / a)
                    cs.append(ar / a + sign * h / a)
    return torch.tensor(cs, dtype=dtype), torch.tensor(rs, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,alpha,a", SWEEP_KINDS)
@pytest.mark.parametrize("name,prm", SWEEP_CASES)
def test_divergence_losses_exact_where_representable_and_finite_beyond(name, prm, kind, alpha, a, dtype):
    """Against the float64 twin over |a(c - r)| from 0 to 1000, both signs: value and both gradients agree
    wherever the exact ones are representable in dtype (to float rounding, the tolerance scaled by the
    condition |z L'(z)|); beyond, everything is finite and the gradient is nonzero with the twin's sign."""
    beta = 0.1
    c, r = _sweep_inputs(a, dtype)
    c.requires_grad_(True)
    r.requires_grad_(True)
    zero = torch.zeros_like(c)
    out = preference_loss(name, policy_chosen_logps=c, policy_rejected_logps=r, ref_chosen_logps=zero,
                          ref_rejected_logps=zero, beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=alpha,
                          **prm)
    grad_c, grad_r = torch.autograd.grad(out.losses.sum(), [c, r])
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    top, rtol = torch.finfo(dtype).max, (2e-6 if dtype == torch.float32 else 1e-12)
    tiny = 1e-37 if dtype == torch.float32 else 1e-300
    checked_exact = checked_beyond = 0
    for i, (ci, ri) in enumerate(zip(floats(c), floats(r))):
        z, dz_dc, dz_dr = twin_z(ci, ri, kind, a, beta)
        z_clipped = max(-1e300, min(1e300, z))
        loss, dloss, terms = twin_loss(name, z_clipped, prm)
        want = [loss, dloss * dz_dc if dloss else 0.0, dloss * dz_dr if dloss else 0.0]
        got = [out.losses[i].item(), grad_c[i].item(), grad_r[i].item()]
        if all(math.isfinite(w) and abs(w) <= top for w in want) and abs(z) <= 1e300:
            value_cond = 1.0 + abs(z * dloss) / max(abs(loss), tiny)
            grad_cond = 1.0 + abs(z) + sum(abs(x) for x in terms) / max(abs(dloss), tiny)
            for g_, w, cond in zip(got, want, (value_cond, grad_cond, grad_cond)):
                assert g_ == pytest.approx(w, rel=rtol * cond, abs=tiny), (i, ci, ri, z, got, want)
            checked_exact += 1
        else:  # a gradient the twin finds nonzero (finite or past float64) is nonzero with its sign
            for g_, w in zip(got[1:], want[1:]):
                if w != 0 and not math.isnan(w):
                    assert g_ != 0 and math.copysign(1.0, g_) == math.copysign(1.0, w), (i, ci, ri, z, got, want)
            if abs(want[0]) > top:
                assert abs(got[0]) >= top * (1 - 1e-6) and math.copysign(1.0, got[0]) == math.copysign(1.0, want[0])
            checked_beyond += 1
    assert checked_exact > 0
    if kind not in ("reverse_kl", "js_divergence"):
        assert checked_beyond > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,alpha,a", SWEEP_KINDS)
def test_divergence_delta_exact_where_representable(kind, alpha, a, dtype):
    c, r = _sweep_inputs(a, dtype)
    c.requires_grad_(True)
    r.requires_grad_(True)
    delta = divergence_delta(c, r, kind, alpha)
    grad_c, grad_r = torch.autograd.grad(delta.sum(), [c, r])
    assert torch.isfinite(delta).all() and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    top, rtol = torch.finfo(dtype).max, (1e-6 if dtype == torch.float32 else 1e-12)
    tiny = 1e-37 if dtype == torch.float32 else 1e-300
    for i, (ci, ri) in enumerate(zip(floats(c), floats(r))):
        want = twin_z(ci, ri, kind, a, 1.0)
        got = (delta[i].item(), grad_c[i].item(), grad_r[i].item())
        # js is log sigmoid(c) - log sigmoid(r): exact to the rounding of its two terms
        terms = _softplus(-ci) + _softplus(-ri) if kind == "js_divergence" else 0.0
        for g_, w in zip(got, want):
            if abs(w) <= top:
                assert g_ == pytest.approx(w, rel=rtol, abs=tiny + rtol * terms), (i, ci, ri, got, want)
            else:  # past the largest finite value: +-max, gradient finite and nonzero with the sign
                assert math.isfinite(g_) and g_ != 0 and math.copysign(1.0, g_) == math.copysign(1.0, w)


def _previous_delta(c, r, kind, alpha):
    """delta as the previous implementation computed it: exponents clamped at +-40, |delta| at 1e30."""
    if kind == "js_divergence":
        return torch.nn.functional.logsigmoid(c) - torch.nn.functional.logsigmoid(r)
    a = -1.0 if kind == "forward_kl" else alpha - 1.0
    if kind == "reverse_kl" or a == 0.0:
        return c - r
    head = torch.exp(torch.clamp(a * r, -40.0, 40.0))
    tail = torch.expm1(torch.clamp(a * (c - r), -40.0, 40.0))
    return torch.clamp(head * tail / a, -1e30, 1e30)


def _previous_loss(name, z, prm):
    logsig = torch.nn.functional.logsigmoid
    eps = prm.get("label_smoothing", 0.0)
    if name == "sigmoid":
        return -(1.0 - eps) * logsig(z) - eps * logsig(-z)
    if name == "hinge":
        return torch.relu(1.0 - z)
    if name == "robust":
        return (-(1.0 - eps) * logsig(z) + eps * logsig(-z)) / (1.0 - 2.0 * eps)
    if name == "discopop":
        m = torch.sigmoid(z / prm["discopop_tau"])
        return (1.0 - m) * -logsig(z) + m * torch.exp(torch.clamp(-z, max=40.0))
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,alpha,a", SWEEP_KINDS)
@pytest.mark.parametrize("name,prm", SWEEP_CASES)
def test_ordinary_values_unchanged_bit_for_bit(name, prm, kind, alpha, a, dtype):
    """Where the previous clamps were inactive (|a r|, |a(c - r)| <= 40, |delta| <= 1e30, discopop's -z <= 40) the values are the
    same bits as before. (The gradients are not: they now come from float64 exponentials, which the sweep
    above checks against the twin; the previous ones lost e^(a (c - r)) to rounding for a (c - r) << 0.)"""
    g = torch.Generator().manual_seed(11)
    r = (torch.rand(4000, generator=g, dtype=torch.float64) * 80 - 40).to(dtype)
    c = (r.double() + torch.rand(4000, generator=g, dtype=torch.float64) * 80 - 40).to(dtype)
    if a != 0.0:  # keep a r and a (c - r) inside [-40, 40]
        r, c = r / max(1.0, abs(a)), r / max(1.0, abs(a)) + (c - r) / max(1.0, abs(a))
    keep = _previous_delta(c, r, kind, alpha).abs() < 1e30
    if name == "discopop":  # and its own clamp, exp(min(-z, 40)), inactive
        keep &= -0.1 * _previous_delta(c, r, kind, alpha) <= 40.0
    c, r = c[keep], r[keep]
    assert len(c) > 1000
    beta = 0.1
    zero = torch.zeros_like(c)
    delta = _previous_delta(c, r, kind, alpha)
    got = preference_loss(name, policy_chosen_logps=c, policy_rejected_logps=r, ref_chosen_logps=zero,
                          ref_rejected_logps=zero, beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=alpha,
                          **prm).losses
    assert torch.equal(got, _previous_loss(name, beta * delta, prm))
    assert torch.equal(divergence_delta(c, r, kind, alpha), delta)


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.uses_divergence])
@pytest.mark.parametrize("kind", ["forward_kl", "alpha_divergence"])
def test_gradient_nonzero_far_past_float32(name, kind):
    """|a(c - r)| up to 1e4: losses and gradients finite; where the loss grows without bound (every
    divergence loss as z -> -inf except the saturating exo_pair and apo_down) the gradient still pushes
    the chosen log-ratio up and the rejected one down."""
    h = torch.tensor([100.0, 300.0, 1000.0, 1e4])
    c = (-h).requires_grad_(True)
    r = torch.zeros_like(h).requires_grad_(True)
    zero = torch.zeros_like(c)
    out = preference_loss(name, policy_chosen_logps=c, policy_rejected_logps=r, ref_chosen_logps=zero,
                          ref_rejected_logps=zero, beta=0.1, f_divergence_type=kind, f_alpha_divergence_coef=0.5,
                          discopop_tau=2.0)
    grad_c, grad_r = torch.autograd.grad(out.losses.sum(), [c, r])
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    if name not in ("exo_pair", "apo_down"):
        assert (grad_c < 0).all() and (grad_r > 0).all(), (grad_c, grad_r)
        assert (out.losses[1:] >= out.losses[:-1]).all()  # monotone in c - r


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.uses_divergence])
def test_a_nan_log_prob_gives_a_nan_loss_not_a_finite_one(name, kind):
    """The overflow handling must not turn a NaN input into a finite loss: the trainer's non-finite guard
    names the pair only if its loss is NaN. The other pairs are untouched."""
    c = torch.tensor([float("nan"), -1.0], requires_grad=True)
    zeros = torch.zeros(2)
    out = preference_loss(name, policy_chosen_logps=c, policy_rejected_logps=torch.full((2,), -2.0),
                          ref_chosen_logps=zeros, ref_rejected_logps=zeros, beta=0.1, f_divergence_type=kind)
    assert torch.isnan(out.losses[0]) and torch.isfinite(out.losses[1])
    out.losses[1].backward()
    assert torch.isfinite(c.grad[1])
