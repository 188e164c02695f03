"""preftune.grpo.objective against slow twins written out from the math (per-token loops in float64), and,
where TRL is installed, against TRL's own GRPOTrainer._compute_loss run on the same tensors."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from preftune.grpo.objective import LOSS_TYPES, group_advantages, policy_loss

TOL = dict(rtol=1e-6, atol=1e-6)
NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Slow twins
# --------------------------------------------------------------------------------------------------
def twin_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of a list (the textbook definition)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def twin_loss(lp, old, adv, mask, *, loss_type, epsilon=0.2, epsilon_high=None, delta=None, level="token",
              beta=0.0, ref=None, bias=True, L=None, tpos=1.0, tneg=1.05, vespo=(2.0, 3.0, 3.0, 2.0),
              ent=None, quantile=1.0, ent_coef=0.0, opsm=None, threshold=None, n_items=None, P=1, A=1, S=None):
    """The GRPO step loss token by token: a Python double loop over (row, token) of 0-dim tensors."""
    B, T = lp.shape
    eh = epsilon if epsilon_high is None else epsilon_high
    old = lp.detach() if old is None else old
    S = A if S is None else S
    valid = [[bool(mask[b, t] > 0) for t in range(T)] for b in range(B)]
    count = [sum(row) for row in valid]
    if quantile < 1.0 and threshold is None:
        vals = [float(ent[b, t]) for b in range(B) for t in range(T) if valid[b][t]]
        threshold = twin_quantile(vals, 1 - quantile) if vals else None
    k_pos, l_pos, k_neg, l_neg = vespo
    row_sums, total, kept_entropy, kept_tokens = [], 0.0, 0.0, 0
    for b in range(B):
        a = float(adv[b])
        seq_w = None
        if level == "sequence":
            s = sum((lp[b, t] - old[b, t] for t in range(T) if valid[b][t]), torch.zeros((), dtype=lp.dtype))
            seq_w = torch.exp(s / max(count[b], 1))
        drift = sum(float(old[b, t] - lp[b, t].detach()) for t in range(T) if valid[b][t]) / max(count[b], 1)
        vs = sum(min(max(float(lp[b, t].detach() - old[b, t]), -20.0), 20.0) for t in range(T) if valid[b][t])
        log_w = min(max(vs, math.log(1e-8)), 20.0)
        k, lam = (k_pos, l_pos) if a >= 0 else (k_neg, l_neg)
        try:
            phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        except OverflowError:
            phi = 0.0
        row = torch.zeros((), dtype=lp.dtype)
        for t in range(T):
            if not valid[b][t]:
                continue
            w = seq_w if seq_w is not None else torch.exp(lp[b, t] - old[b, t])
            if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
                lo_hi = torch.clamp(w, 1 - epsilon, 1 + eh)
                w1 = w if delta is None else torch.clamp(w, max=delta)
                term = -torch.minimum(w1 * a, lo_hi * a)
            elif loss_type == "cispo":
                term = -min(float(w.detach()), eh) * a * lp[b, t]
            elif loss_type == "sapo":
                tau = tpos if a > 0 else tneg
                term = -(4.0 / tau) * torch.sigmoid(tau * (w - 1)) * a
            elif loss_type == "vespo":
                term = -phi * a * lp[b, t]
            if opsm is not None and a < 0 and drift > opsm:
                term = term * 0
            high_entropy = quantile >= 1.0 or (threshold is not None and float(ent[b, t]) >= threshold)
            if not high_entropy:
                term = term * 0
            if beta != 0.0:
                d = ref[b, t] - lp[b, t]
                kl = torch.exp(d) - d - 1
                term = term + beta * (kl * w if bias else kl)
            row = row + term
            if ent_coef and high_entropy:
                kept_entropy, kept_tokens = kept_entropy + ent[b, t], kept_tokens + 1
        row_sums.append(row)
        total = total + row
    N = sum(count)
    if loss_type in ("grpo", "sapo"):
        loss = sum(r / max(c, 1) for r, c in zip(row_sums, count)) / B / A
    elif loss_type == "bnpo":
        loss = total / max(N, 1) / A
    elif loss_type == "dr_grpo":
        loss = total / (B * L) / A
    elif loss_type == "luspo":
        loss = sum(row_sums) / B / A
    else:
        items = N if n_items is None else n_items
        loss = total / (max(items, 1) / P * A / S)
    if ent_coef:
        loss = loss - ent_coef * kept_entropy / max(kept_tokens, 1) / A
    return loss


def twin_std(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return NAN
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def twin_mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else NAN


def twin_advantages(rewards: list[list[float]], G: int, weights=None, scale="group", gdpo=False) -> list[float]:
    """Group-relative advantages written out per group and per reward function."""
    F = len(rewards[0])
    w = weights or [1.0] * F
    unscorable = [all(math.isnan(x) for x in r) for r in rewards]
    groups = [list(range(i, i + G)) for i in range(0, len(rewards), G)]
    if not gdpo:
        s = [NAN if u else sum(wk * x for wk, x in zip(w, r) if not math.isnan(x))
             for r, u in zip(rewards, unscorable)]
        adv = [0.0] * len(s)
        for g in groups:
            m = twin_mean([s[i] for i in g])
            sd = twin_std([s[i] for i in g]) if scale != "batch" else twin_std(s)
            for i in g:
                adv[i] = s[i] - m if scale == "none" else (s[i] - m) / (sd + 1e-4)
    else:
        s = []
        norm = [[NAN] * F for _ in rewards]
        for g in groups:
            for k in range(F):
                col = [rewards[i][k] for i in g]
                m, sd = twin_mean(col), twin_std(col)
                for i in g:
                    norm[i][k] = (rewards[i][k] - m) / (sd + 1e-4)
        s = [NAN if u else sum(wk * x for wk, x in zip(w, r) if not math.isnan(x)) for r, u in zip(norm, unscorable)]
        m, sd = twin_mean(s), twin_std(s)
        adv = [(x - m) / (sd + 1e-4) for x in s]
    return [0.0 if math.isnan(a) else a for a in adv]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
def make_batch(B=4, T=6, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = lp.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0] = abs(adv[0]) + 0.1
    adv[1] = -abs(adv[1]) - 0.1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[-1] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    # float32-representable entropies, so the float32 quantile and the float64 twin agree on ties
    ent = (torch.rand(B, T, generator=g) * 4).double()
    return lp, old, ref, adv, mask, ent


def check(lp, got, want):
    (g_got,) = torch.autograd.grad(got, lp, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, lp, retain_graph=True)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(g_got, g_want, **TOL)


OPTIONS = {
    "plain": {},
    "on_policy": {"on_policy": True},
    "clip_higher": {"epsilon": 0.1, "epsilon_high": 0.28},
    "two_sided": {"delta": 1.1, "epsilon": 0.05},
    "sequence": {"level": "sequence"},
    "kl": {"beta": 0.04},
    "kl_no_bias": {"beta": 0.04, "bias": False},
    "kl_sequence": {"beta": 0.04, "level": "sequence"},
    "entropy_mask": {"quantile": 0.4},
    "entropy_bonus": {"ent_coef": 0.01, "quantile": 0.5},
    "opsm": {"opsm": 0.05},
    "far_off_policy": {"spread": 8.0, "epsilon_high": 5.0},
    "sapo_vespo_knobs": {"tpos": 0.5, "tneg": 2.0, "vespo": (1.5, 0.5, 4.0, 1.25)},
}


def call_ours(lp, old, ref, adv, mask, ent, loss_type, o, **norm):
    return policy_loss(
        lp, old, adv, mask, loss_type=loss_type, epsilon=o.get("epsilon", 0.2), epsilon_high=o.get("epsilon_high"),
        delta=o.get("delta"), importance_sampling_level=o.get("level", "token"), beta=o.get("beta", 0.0),
        ref_per_token_logps=ref, use_bias_correction_kl=o.get("bias", True), max_completion_length=lp.shape[1] + 2,
        sapo_temperature_pos=o.get("tpos", 1.0), sapo_temperature_neg=o.get("tneg", 1.05),
        vespo_k_pos=o.get("vespo", (2.0, 3.0, 3.0, 2.0))[0], vespo_lambda_pos=o.get("vespo", (2.0, 3.0, 3.0, 2.0))[1],
        vespo_k_neg=o.get("vespo", (2.0, 3.0, 3.0, 2.0))[2], vespo_lambda_neg=o.get("vespo", (2.0, 3.0, 3.0, 2.0))[3],
        entropies=ent, top_entropy_quantile=o.get("quantile", 1.0), entropy_coef=o.get("ent_coef", 0.0),
        off_policy_mask_threshold=o.get("opsm"), **norm)


def call_twin(lp, old, ref, adv, mask, ent, loss_type, o, **norm):
    kw = {k: v for k, v in o.items() if k not in ("on_policy", "spread")}
    return twin_loss(lp, old, adv, mask, loss_type=loss_type, ref=ref, ent=ent, L=lp.shape[1] + 2, **kw, **norm)


# --------------------------------------------------------------------------------------------------
# Loss: every loss type x the main options, value and gradient
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_twin(loss_type, option):
    o = OPTIONS[option]
    lp, old, ref, adv, mask, ent = make_batch(seed=list(OPTIONS).index(option), spread=o.get("spread", 0.3))
    if o.get("on_policy"):
        old = None
    got = call_ours(lp, old, ref, adv, mask, ent, loss_type, o)
    want = call_twin(lp, old, ref, adv, mask, ent, loss_type, o)
    check(lp, got.loss, want)
    assert got.per_token_loss.shape == lp.shape


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_normalizer_arguments_match_twin(loss_type):
    lp, old, ref, adv, mask, ent = make_batch(seed=3)
    norm = dict(num_items_in_batch=37, num_processes=2, gradient_accumulation_steps=3, steps_per_generation=6)
    got = call_ours(lp, old, ref, adv, mask, ent, loss_type, {"ent_coef": 0.02}, **norm)
    want = call_twin(lp, old, ref, adv, mask, ent, loss_type, {"ent_coef": 0.02}, n_items=37, P=2, A=3, S=6)
    check(lp, got.loss, want)


def test_loss_types_differ():
    """Each registry entry computes something of its own."""
    lp, old, ref, adv, mask, ent = make_batch(seed=5)
    norm = dict(num_items_in_batch=50, num_processes=2, gradient_accumulation_steps=2)  # else bnpo == dapo
    values = {lt: call_ours(lp, old, ref, adv, mask, ent, lt, {}, **norm).loss.item() for lt in LOSS_TYPES}
    assert len(set(values.values())) == len(LOSS_TYPES), values


# --------------------------------------------------------------------------------------------------
# Extremes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batch_is_zero_with_zero_gradient(loss_type):
    lp, old, ref, adv, mask, ent = make_batch()
    mask = torch.zeros_like(mask)
    out = call_ours(lp, old, ref, adv, mask, ent, loss_type, {"beta": 0.1, "quantile": 0.5, "ent_coef": 0.1})
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.item() == 0.0 and torch.all(grad == 0)
    assert out.kl.item() == 0.0 and out.num_tokens.item() == 0
    if out.clip_ratio_low_min is not None:
        assert math.isnan(out.clip_ratio_low_min.item()) and math.isnan(out.clip_ratio_high_max.item())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_row_takes_no_part(loss_type):
    lp, old, ref, adv, mask, ent = make_batch(B=5)
    mask[2] = 0
    out = call_ours(lp, old, ref, adv, mask, ent, loss_type, {"beta": 0.04})
    (grad,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
    assert torch.all(grad[2] == 0)
    check(lp, out.loss, call_twin(lp, old, ref, adv, mask, ent, loss_type, {"beta": 0.04}))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_huge_log_ratios(loss_type):
    """Log-ratios of +-60 (ratio e^60 or e^-60) stay finite where the formula is, with the twin's values."""
    lp, old, ref, adv, mask, ent = make_batch(seed=11)
    old = old.clone()
    old[0, 0] = lp[0, 0].detach() - 60.0
    old[1, 0] = lp[1, 0].detach() + 60.0
    old[2, :] = lp[2].detach() + 30.0
    o = {"epsilon_high": 0.28}
    out = call_ours(lp, old, ref, adv, mask, ent, loss_type, o)
    assert torch.isfinite(out.loss)
    check(lp, out.loss, call_twin(lp, old, ref, adv, mask, ent, loss_type, o))


def test_vespo_weight_clamps_each_token_log_ratio():
    """Token log-ratios -25 and +24 count as -20 and +20: the sequence ratio is 1, so phi = e^(lam - lam) = 1
    and the loss is -A * sum(logps) / tokens (without the per-token clamp phi would be e^(3 - 2 - 3/e))."""
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() + torch.tensor([[25.0, -24.0]], dtype=torch.float64)
    adv = torch.tensor([0.5], dtype=torch.float64)
    out = policy_loss(lp, old, adv, torch.ones(1, 2), loss_type="vespo")
    assert out.vespo_phi.item() == 1.0
    check(lp, out.loss, -0.5 * lp.sum() / 2)


def test_clip_metrics_by_hand():
    """Token ratios e^0.5, e^-0.5, 1 with advantages +1 / -1: which tokens count as clipped."""
    lp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = policy_loss(lp, old, adv, mask, loss_type="dapo", epsilon=0.2)
    # row 0 (A > 0): e^0.5 > 1.2 high-clipped; row 1 (A < 0): e^-0.5 < 0.8 low-clipped
    assert out.clip_ratio_high.item() == pytest.approx(1 / 5)
    assert out.clip_ratio_low.item() == pytest.approx(1 / 5)
    assert out.clip_ratio_region.item() == pytest.approx(2 / 5)
    assert out.clip_ratio_low_min.item() == 0.0 and out.clip_ratio_high_max.item() == pytest.approx(1 / 3)
    assert out.kl is None
    seq = policy_loss(lp, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    assert seq.clip_ratio_region.item() == 0.0  # sequence ratios e^0 and e^0 per row: nothing clipped


def test_kl_metric_is_masked_mean():
    lp, old, ref, adv, mask, ent = make_batch(seed=2)
    out = policy_loss(lp, None, adv, mask, beta=0.1, ref_per_token_logps=ref)
    d = (ref - lp).detach()
    kl = torch.exp(d) - d - 1
    assert out.kl.item() == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-12)


def test_errors_name_the_field():
    lp, old, ref, adv, mask, ent = make_batch()
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        policy_loss(lp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(lp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        policy_loss(lp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="entropies"):
        policy_loss(lp, old, adv, mask, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(lp, old, adv, mask, importance_sampling_level="group")
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="reward_weights"):
        group_advantages(torch.zeros(4, 2), 2, reward_weights=[1.0])
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)


# --------------------------------------------------------------------------------------------------
# Micro-batches and processes: the documented normalizer arguments make the pieces sum to the whole
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", [lt for lt in LOSS_TYPES if lt != "bnpo"])
def test_micro_batches_and_processes_sum_to_one_call(loss_type):
    """8 completions on 2 processes x 2 micro-batches of 2: the mean over processes (the gradient
    all-reduce) of each process's summed micro-batch losses equals one call on all 8."""
    B, P, A = 8, 2, 2
    lp, old, ref, adv, mask, ent = make_batch(B=B, T=5, seed=7)
    o = {"beta": 0.04, "quantile": 0.5}
    whole = call_ours(lp, old, ref, adv, mask, ent, loss_type, o)
    threshold = torch.quantile(ent[mask.bool()].float(), 0.5)  # the all-process threshold the caller gathers
    n_items = int(mask.sum())
    step = 0
    for p in range(P):
        for a in range(A):
            rows = slice((p * A + a) * 2, (p * A + a) * 2 + 2)
            part = policy_loss(
                lp[rows], old[rows], adv[rows], mask[rows], loss_type=loss_type, beta=0.04, ref_per_token_logps=ref[rows],
                max_completion_length=7, entropies=ent[rows], top_entropy_quantile=0.5,
                entropy_threshold_value=threshold, num_items_in_batch=n_items, num_processes=P,
                gradient_accumulation_steps=A)
            step = step + part.loss / P
    check(lp, step, whole.loss)


def test_bnpo_normalizes_by_the_micro_batch():
    lp, old, ref, adv, mask, ent = make_batch(B=4, seed=8)
    parts = [policy_loss(lp[r], old[r], adv[r], mask[r], loss_type="bnpo", gradient_accumulation_steps=2).loss
             for r in (slice(0, 2), slice(2, 4))]
    want = [twin_loss(lp[r], old[r], adv[r], mask[r], loss_type="bnpo", A=2) for r in (slice(0, 2), slice(2, 4))]
    check(lp, parts[0] + parts[1], want[0] + want[1])


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------
def _adv_cases():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, 2, generator=g, dtype=torch.float64).tolist()
    r[1][0] = NAN                    # one function returned None
    r[4] = [NAN, NAN]                # every function returned None: advantage 0
    r[6], r[7], r[8] = [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]  # a group with zero std
    r[10] = [NAN, NAN]               # group of 3 with one unscorable completion
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("gdpo", [False, True])
@pytest.mark.parametrize("weights", [None, [0.5, 2.0]])
def test_group_advantages_match_twin(scale, gdpo, weights):
    r = _adv_cases()
    out = group_advantages(torch.tensor(r, dtype=torch.float64), 3, reward_weights=weights, scale_rewards=scale,
                           multi_objective_aggregation="normalize_then_sum" if gdpo else "sum_then_normalize")
    mapped = {True: "group", False: "none"}.get(scale, scale)
    want = twin_advantages(r, 3, weights, mapped, gdpo)
    torch.testing.assert_close(out.advantages, torch.tensor(want, dtype=torch.float64), **TOL)
    assert out.advantages[4] == 0.0
    raw = [NAN if all(math.isnan(x) for x in row) else sum(w * x for w, x in zip(weights or [1, 1], row)
                                                           if not math.isnan(x)) for row in r]
    torch.testing.assert_close(out.rewards, torch.tensor(raw, dtype=torch.float64), equal_nan=True, **TOL)
    if not gdpo and mapped != "batch":
        assert out.zero_std[6:9].all() and not out.zero_std[:6].any()


def test_group_advantages_single_column_float32():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, NAN, 2.0], dtype=torch.float32)
    out = group_advantages(r, 2)
    assert out.advantages.dtype == torch.float32
    want = twin_advantages([[x] for x in r.tolist()], 2)
    torch.testing.assert_close(out.advantages, torch.tensor(want, dtype=torch.float32), **TOL)
    assert out.advantages[2:].eq(0).all()  # zero std, then a group with one scorable completion
    all_none = group_advantages(torch.full((4, 2), NAN), 2)
    assert all_none.advantages.eq(0).all()


# --------------------------------------------------------------------------------------------------
# TRL's own code on the same tensors (its loss method run on a stand-in object; no trainer is built)
# --------------------------------------------------------------------------------------------------
def _trl():
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
        from trl.trainer.utils import nanstd
    except Exception as e:  # noqa: BLE001 - any import failure means "no TRL here"
        pytest.skip(f"trl is not importable: {e}")
    return GRPOTrainer, nanstd


def trl_compute_loss(lp, old, ref, adv, mask, ent, loss_type, o, A=1, P=1, S=None, n_items=None):
    GRPOTrainer, _ = _trl()
    if not hasattr(GRPOTrainer, "_compute_loss"):
        pytest.skip("this TRL has no GRPOTrainer._compute_loss")
    B, T = lp.shape
    methods = {name: GRPOTrainer.__dict__[name] for name in ("get_high_entropy_mask", "get_off_policy_mask",
                                                               "get_gamma_weights")}
    self = type("StandIn", (), methods)()
    identity = types.SimpleNamespace(
        num_processes=P, gather=lambda x: x, reduce=lambda x, reduction: x,
        pad_across_processes=lambda x, dim, pad_index: x, sync_gradients=True)
    k_pos, l_pos, k_neg, l_neg = o.get("vespo", (2.0, 3.0, 3.0, 2.0))
    self.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None), aux_loss_enabled=False,
        top_entropy_quantile=o.get("quantile", 1.0), off_policy_mask_threshold=o.get("opsm"),
        importance_sampling_level=o.get("level", "token"), beta=o.get("beta", 0.0), loss_type=loss_type,
        epsilon_low=o.get("epsilon", 0.2), epsilon_high=o.get("epsilon_high") or o.get("epsilon", 0.2),
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=A, accelerator=identity, max_completion_length=T + 2,
        _entropy_bonus_enabled=o.get("ent_coef", 0.0) != 0.0, use_adaptive_entropy=False,
        entropy_coef=o.get("ent_coef", 0.0), _metrics=defaultdict(lambda: defaultdict(list)),
        args=types.SimpleNamespace(
            use_bias_correction_kl=o.get("bias", True), delta=o.get("delta"), steps_per_generation=S or A,
            sapo_temperature_pos=o.get("tpos", 1.0), sapo_temperature_neg=o.get("tneg", 1.05),
            vespo_k_pos=k_pos, vespo_lambda_pos=l_pos, vespo_k_neg=k_neg, vespo_lambda_neg=l_neg))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": torch.tensor(n_items if n_items is not None
                                                                     else int(mask.sum()))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if o.get("beta", 0.0):
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(self, None, inputs)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("option", [k for k in OPTIONS if k != "sapo_vespo_knobs"] + ["sapo_vespo_knobs"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_trl(loss_type, option):
    _trl()
    o = OPTIONS[option]
    lp, old, ref, adv, mask, ent = make_batch(seed=100 + list(OPTIONS).index(option), spread=o.get("spread", 0.3))
    if o.get("on_policy"):
        old = None
    norm = dict(A=2, P=2, S=4, n_items=int(mask.sum()) * 3)
    trl_loss, metrics = trl_compute_loss(lp, old, ref, adv, mask, ent, loss_type, o, **norm)
    ours = call_ours(lp, old, ref, adv, mask, ent, loss_type, o, num_items_in_batch=norm["n_items"],
                     num_processes=2, gradient_accumulation_steps=2, steps_per_generation=4)
    strict = dict(rtol=1e-12, atol=1e-12)
    check(lp, ours.loss, trl_loss)
    torch.testing.assert_close(ours.loss, trl_loss, **strict)
    pairs = {"kl": ours.kl, "entropy": ours.entropy, "clip_ratio/low_mean": ours.clip_ratio_low,
             "clip_ratio/high_mean": ours.clip_ratio_high, "clip_ratio/region_mean": ours.clip_ratio_region,
             "clip_ratio/low_min": ours.clip_ratio_low_min, "clip_ratio/high_max": ours.clip_ratio_high_max,
             "cispo_clip_ratio": ours.cispo_clip_ratio, "vespo/phi_seq_mean": ours.vespo_phi,
             "policy_loss": ours.policy_loss}
    for name, value in metrics.items():
        if name in pairs:
            assert value == pytest.approx(float(pairs[name]), rel=1e-6, abs=1e-7, nan_ok=True), name  # TRL: float32
    # the same metrics exist on both sides (TRL logs policy_loss only with the entropy bonus)
    ours_present = {name for name, value in pairs.items() if value is not None} - {"policy_loss"}
    assert ours_present == set(metrics) & set(pairs) - {"policy_loss"}


def test_nanstd_matches_trl():
    _, trl_nanstd = _trl()
    from preftune.grpo.objective import nanstd
    x = torch.tensor([[1.0, NAN, 3.0], [NAN, NAN, 2.0], [4.0, 5.0, 9.0]])
    for dim in (None, 0, 1):
        torch.testing.assert_close(nanstd(x, dim=dim), trl_nanstd(x, dim=dim), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("option", ["plain", "sequence", "kl", "entropy_bonus", "opsm", "two_sided"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_float32_is_trls_to_the_bit(loss_type, option):
    """In float32 (training's dtype) the loss is TRL's bit for bit; the gradient may differ in the last bit
    where autograd sums the KL and policy paths in another order."""
    _trl()
    o = OPTIONS[option]
    lp, old, ref, adv, mask, ent = make_batch(seed=31)
    lp = lp.detach().float().requires_grad_(True)
    old, ref, adv, ent = old.float(), ref.float(), adv.float(), ent.float()
    trl_loss, _ = trl_compute_loss(lp, old, ref, adv, mask, ent, loss_type, o, A=2, P=2, S=4, n_items=77)
    ours = call_ours(lp, old, ref, adv, mask, ent, loss_type, o, num_items_in_batch=77, num_processes=2,
                     gradient_accumulation_steps=2, steps_per_generation=4)
    assert torch.equal(ours.loss, trl_loss)
    (g_ours,) = torch.autograd.grad(ours.loss, lp, retain_graph=True)
    (g_trl,) = torch.autograd.grad(trl_loss, lp)
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-6, atol=1e-8)
