"""The DPO loss family: one pure function per loss, a registry, f-divergences and loss combination.

Every loss works on per-pair tensors of shape (B,): summed log-probs of the chosen (w) and rejected (l)
completions under the policy (pc, pr) and the reference (rc, rr), and the completion token counts
(nc, nr) for the losses that normalize by length. Notation used in the docstrings:

    c = pc - rc,  r = pr - rr                 log-ratios of chosen / rejected         (eq. 6.9, 6.10)
    delta = s(c) - s(r)                       s = the f-divergence transform (s(x) = x for reverse KL)
    z = beta * delta                          the DPO logit (PairTerms.z); h = c - r  (eq. 6.1)
    eps = label_smoothing

The exponential f-divergences make z overflow long before c and r do (forward KL at beta 0.1: c = -17,
r = 36.8 gives z = -2.4e6, c = -100 gives -2.7e42). `divergence_delta` and the losses built on it are
exact, value and gradient, wherever z and the loss are representable, and finite beyond (see
`_divergence_loss`).

A loss is registered with `@register(name, ...)`, which records what it needs (a reference model,
lengths, the whole batch, the chosen NLL) and its hyper-parameters with their defaults and ranges, so the
trainer, the config validation and `python -m preftune.losses` read one list. `preference_loss` is the
entry point; everything is computed in float32 whatever the input dtype (float64 inputs stay float64).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES", "GLOBAL_PARAMS", "F_DIVERGENCES", "LossSpec", "LossOutput", "Param", "PairTerms",
    "register", "preference_loss", "loss_params", "describe_losses", "divergence_delta", "divergence_z",
    "canonical_divergence", "resolve_loss_names", "config_params", "param_readers", "ld_dpo_logps", "wpo_weights",
    "log_sum_sq_probs",
]

DIRECT_EXP = 40.0  # e^(a r) * expm1(a (c - r)) is evaluated as written while both |exponents| <= this
FAR = 2.0 ** 64    # a |z| where every registered divergence loss is affine in |z| to the last bit


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A float hyper-parameter: default and the allowed interval (open or closed at each end).

    This is its only declaration: DPOConfig makes one field of it (``config_params``), whose default is
    ``default``, whose --help is ``doc`` (``help`` when empty; ``extra`` marks it "[preftune]") and whose
    range check is this interval; ``loss_params`` passes it to the loss."""

    default: float | None
    help: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    doc: str = ""
    extra: bool = False

    def range_text(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"{lo}{self.low:g}, {self.high:g}{hi}"

    def check(self, name: str, value, where: str) -> float | None:
        if value is None and self.default is None:
            return None
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name}={value!r} is not a number; expected one in {self.range_text()}") from None
        too_low = v < self.low or (self.low_open and v == self.low)
        too_high = v > self.high or (self.high_open and v == self.high)
        if math.isnan(v) or too_low or too_high:
            raise ValueError(f"{where}: {name}={value!r} is out of range; it must lie in {self.range_text()} "
                             f"({self.help})")
        return v


@dataclass(frozen=True)
class PairTerms:
    """What a loss function sees: float32 (B,) tensors; the reference ones are detached (zeros if unused)."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    nc: torch.Tensor | None      # completion token counts as float32, >= 1
    nr: torch.Tensor | None
    z: torch.Tensor | None       # beta * (s(c) - s(r)) under the chosen f-divergence (see divergence_z)
    chosen_nll: torch.Tensor | None
    log_abs_z: torch.Tensor | None = None  # float64 log|z|, differentiable where z != 0
    z_over: torch.Tensor | None = None     # bool: |z| is past the largest finite value (z is then +-max)

    @property
    def c(self) -> torch.Tensor:
        return self.pc - self.rc

    @property
    def r(self) -> torch.Tensor:
        return self.pr - self.rr


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_reference: bool = True
    needs_lengths: bool = False
    batch_level: bool = False        # the value at index i depends on other pairs (aot sorts the batch)
    needs_nll: bool = False          # needs chosen_nll (B,)
    uses_divergence: bool = False    # built on delta, so f_divergence_type changes it
    params: dict[str, Param] = field(default_factory=dict)
    rewards: Callable[[PairTerms, float], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def defaults(self) -> dict[str, float | None]:
        return {k: p.default for k, p in self.params.items()}

    @property
    def doc(self) -> str:
        first_paragraph = (self.fn.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(line.strip() for line in first_paragraph.splitlines())


LOSSES: dict[str, LossSpec] = {}

# Names other tools use for the same loss (TRL 1.x renamed aot_pair to aot_unpaired).
LOSS_ALIASES = {"aot_unpaired": "aot_pair"}

# Parameters shared by every loss (beta and the modifiers); per-loss ones live in LossSpec.params.
GLOBAL_PARAMS: dict[str, Param] = {
    "beta": Param(0.1, "KL strength / inverse temperature", 0.0, math.inf, low_open=True,
                  doc="Strength of the KL-to-reference penalty; higher stays closer to the reference (for ipo it "
                  "is tau, for simpo the reward scale)."),
    "f_alpha_divergence_coef": Param(0.5, "alpha of the alpha-divergence; 1 is reverse KL",
                                     doc="alpha of alpha_divergence, in [0, 1] (0 = forward KL, 1 = reverse KL)."),
    "rpo_alpha": Param(None, "weight of the chosen NLL term (RPO); None = off", 0.0,
                       doc="Weight of the chosen-response NLL term (RPO); None = off."),
}
OTHER_KWARGS = ("f_divergence_type", "loss_weights", "reference_free", "weights", "chosen_nll")


def register(name: str, *, needs_reference: bool = True, needs_lengths: bool = False,
             batch_level: bool = False, needs_nll: bool = False, uses_divergence: bool = False,
             params: dict[str, Param] | None = None, rewards=None):
    """Decorator: add `fn(t: PairTerms, *, beta, **its params) -> (B,)` to LOSSES under `name`."""

    def deco(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({fn.__module__}.{fn.__name__})")
        LOSSES[name] = LossSpec(name, fn, needs_reference, needs_lengths, batch_level, needs_nll,
                                uses_divergence, dict(params or {}), rewards)
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# f-divergences: delta = s(c) - s(r)
# --------------------------------------------------------------------------------------------------
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_DIVERGENCE_ALIASES = {"js": "js_divergence", "jsd": "js_divergence", "alpha": "alpha_divergence",
                       "reverse": "reverse_kl", "forward": "forward_kl", "kl": "reverse_kl"}


def canonical_divergence(kind) -> str:
    """Canonical f-divergence name from the spellings configs use: "reverse_kl", "JS_DIVERGENCE",
    "alpha-divergence", an enum member with `.value` (the older enum-typed config field) or its
    str() form "FDivergenceType.ALPHA_DIVERGENCE"."""
    raw = kind.value if hasattr(kind, "value") else kind
    key = str(raw).strip().lower().replace("-", "_").replace(" ", "_").rsplit(".", 1)[-1]
    key = _DIVERGENCE_ALIASES.get(key, key)
    if key not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type={kind!r} is unknown; valid choices: {', '.join(F_DIVERGENCES)}")
    return key


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0 (-inf at 0), value and gradient accurate at both ends (Maechler 2012)."""
    near = x > -math.log(2.0)
    x_near = torch.where(near, x, torch.full_like(x, -1.0))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log_abs_z(c: torch.Tensor, r: torch.Tensor, kind: str, a: float, beta: float) -> torch.Tensor:
    """log|z| in float64 for float64 c, r, never overflowing, differentiable (exactly) where z != 0.

    Exponential forms (a = alpha - 1 != 0), with m = max(a c, a r) and h = a (c - r):
    |z| = beta |e^(a c) - e^(a r)| / |a| = e^(m + log beta - log|a|) (1 - e^-|h|),
    so log|z| = m + log beta - log|a| + log1mexp(-|h|).
    """
    if kind == "js_divergence" or a == 0.0:
        d = F.logsigmoid(c) - F.logsigmoid(r) if kind == "js_divergence" else c - r
        return math.log(beta) + torch.log(torch.where(d == 0, torch.ones_like(d), d).abs())
    h = a * (c - r)
    up = h >= 0
    m = torch.where(up, a * c, a * r)
    neg_abs_h = torch.where(up, -h, h)
    tail = _log1mexp(torch.where(neg_abs_h == 0, torch.full_like(h, -1.0), neg_abs_h))
    return m + (math.log(beta) - math.log(abs(a))) + torch.where(h == 0, torch.full_like(h, -math.inf), tail)


class _ExpDivergenceZ(torch.autograd.Function):
    """(z, over) with z = beta (e^(a c) - e^(a r)) / a (a != 0) for (B,) c, r; see divergence_z for the value,
    +-max where it overflows (over). The gradient is beta e^(a c) and -beta e^(a r) from float64
    exponentials, exact where representable (autograd through expm1 would form e^h as expm1(h) + 1 and
    lose it to rounding for h << 0), and saturated at the dtype's largest finite value beyond."""

    @staticmethod
    def forward(ctx, c, r, a: float, beta: float):
        ctx.save_for_backward(c, r)
        ctx.a, ctx.beta = a, beta
        ar, h = a * r, a * (c - r)
        head = torch.exp(torch.clamp(ar, -DIRECT_EXP, DIRECT_EXP))
        tail = torch.expm1(torch.clamp(h, -DIRECT_EXP, DIRECT_EXP))
        direct = beta * (head * tail / a)
        direct_ok = (ar.abs() <= DIRECT_EXP) & (h.abs() <= DIRECT_EXP) & torch.isfinite(direct)
        log_abs = _log_abs_z(c.double(), r.double(), "alpha_divergence", a, beta)
        top = math.log(torch.finfo(torch.float64).max) - 1.0  # past it, z is only needed as "over"
        shifted = torch.sign(h.double()) * math.copysign(1.0, a) * torch.exp(log_abs.clamp_max(top))
        z = torch.where(direct_ok, direct, shifted.to(c.dtype))
        over = ~torch.isfinite(z)
        ctx.mark_non_differentiable(over)
        big = torch.finfo(c.dtype).max
        return z.clamp(-big, big), over

    @staticmethod
    def backward(ctx, grad, _):
        c, r = ctx.saved_tensors
        g = grad.double()
        log_g = torch.log(g.abs()) + math.log(ctx.beta)  # -inf where grad is 0: exp gives 0, not 0 * inf
        top = torch.finfo(c.dtype).max
        grad_c = (torch.sign(g) * torch.exp(log_g + ctx.a * c.double())).clamp(-top, top)
        grad_r = (-torch.sign(g) * torch.exp(log_g + ctx.a * r.double())).clamp(-top, top)
        return grad_c.to(c.dtype), grad_r.to(r.dtype), None, None


class _Widen(torch.autograd.Function):
    """x -> float64 copy; the gradient returns in x's dtype, overflow saturated at its largest finite value."""

    @staticmethod
    def forward(ctx, x):
        ctx.dtype = x.dtype
        return x.to(torch.float64, copy=True)

    @staticmethod
    def backward(ctx, grad):
        top = torch.finfo(ctx.dtype).max
        return grad.clamp(-top, top).to(ctx.dtype)


def divergence_z(c: torch.Tensor, r: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5,
                 beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = beta * (s(c) - s(r)) for (B,) log-ratios c, r; also float64 log|z| and the mask where |z|
    overflows c's dtype. See `divergence_delta` for s.

    z is exact (value and gradient) wherever it is representable. The exponential forms are evaluated as
    beta * e^(a r) * expm1(a (c - r)) / a while both exponents are within +-DIRECT_EXP (bit for bit the
    values this function always gave there), elsewhere as sign * exp(log|z|) in float64 rounded once;
    their gradient is beta e^(a c), -beta e^(a r) in float64. Past the largest finite value z is +-max,
    its gradient exact where representable and +-max where not (finite, nonzero, the way z grows).
    (reverse_kl and js_divergence overflow only at |beta (c - r)| > max; there the gradient is that of
    +-log|z|.)
    """
    kind = canonical_divergence(kind)
    a = {"reverse_kl": 0.0, "js_divergence": 0.0, "forward_kl": -1.0}.get(kind, float(alpha) - 1.0)
    log_abs = _log_abs_z(_Widen.apply(c), _Widen.apply(r), kind, a, beta)
    if a != 0.0:
        z, over = _ExpDivergenceZ.apply(c, r, a, beta)
        return z, log_abs, over
    z = beta * (F.logsigmoid(c) - F.logsigmoid(r)) if kind == "js_divergence" else beta * (c - r)
    over = ~torch.isfinite(z)
    with torch.no_grad():
        sign = torch.sign(c - r).to(c.dtype)  # s is increasing, so z has the sign of c - r
    # the gradient of +-log|z| past the top; an infinite c - r (a log-prob of -inf) gets +-max with none
    slope = torch.where(torch.isfinite(log_abs), log_abs - log_abs.detach(), torch.zeros_like(log_abs))
    at_top = sign * (torch.finfo(c.dtype).max + slope.to(c.dtype))
    return torch.where(over & ~torch.isnan(z), at_top, z), log_abs, over  # NaN stays NaN (sign(NaN) is 0)


def divergence_delta(c: torch.Tensor, r: torch.Tensor, kind: str = "reverse_kl",
                     alpha: float = 0.5) -> torch.Tensor:
    """delta = s(c) - s(r) for (B,) log-ratios c, r (f-DPO, Wang et al. 2023).

    reverse_kl        s(x) = x
    forward_kl        s(x) = -exp(-x)                       (= alpha_divergence at alpha = 0)
    js_divergence     s(x) = log sigmoid(x)                 (= log(2u / (1 + u)) - log 2, u = e^x)
    alpha_divergence  s(x) = exp((alpha - 1) x) / (alpha - 1);  alpha = 1 is reverse KL

    The exponential forms use s(c) - s(r) = e^(a r) * expm1(a (c - r)) / a with a = alpha - 1, which
    tends to c - r as a -> 0 without cancellation. Exact (value and gradient) wherever delta is
    representable in c's dtype; beyond, +-the largest finite value with a finite, nonzero gradient of the
    right sign (`divergence_z` at beta = 1).
    """
    return divergence_z(c, r, kind, alpha, 1.0)[0]


# --------------------------------------------------------------------------------------------------
# The losses. Each returns unreduced (B,) float32 losses.
# --------------------------------------------------------------------------------------------------
def _smoothed_logsigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): DPO's cross-entropy with soft label 1 - eps."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _eps(help_: str, high_open: bool = False) -> Param:
    return Param(0.0, help_, 0.0, 0.5, high_open=high_open)


SMOOTHING = Param(0.0, "eps, the probability that a preference label is flipped (conservative DPO)", 0.0, 0.5,
                  doc="Assumed rate of flipped labels, in [0, 0.5) (cDPO / robust).")


@register("sigmoid", uses_divergence=True, params={"label_smoothing": SMOOTHING})
def sigmoid_loss(t: PairTerms, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Standard DPO: -log sigmoid(beta * delta), eq. 6.1; with eps > 0 the conservative (cDPO) form
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return _smoothed_logsigmoid(t.z, label_smoothing)


@register("hinge", uses_divergence=True,
          params={"hinge_delta": Param(1.0, "margin at which the hinge loss reaches zero", 0.0, extra=True,
                                       doc="Margin delta at which the hinge (SLiC) loss reaches zero.")})
def hinge_loss(t: PairTerms, *, beta: float, hinge_delta: float) -> torch.Tensor:
    """SLiC-HF hinge: max(0, hinge_delta - beta * delta)."""
    return torch.relu(hinge_delta - t.z)


@register("ipo", needs_lengths=True)
def ipo_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """IPO on length-normalized log-ratios: (c / nc - r / nr - 1 / (2 beta))^2."""
    return (t.c / t.nc - t.r / t.nr - 1.0 / (2.0 * beta)) ** 2


@register("robust", uses_divergence=True,
          params={"label_smoothing": _eps("label noise rate eps of robust DPO, < 0.5", high_open=True)})
def robust_loss(t: PairTerms, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: [-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)] / (1 - 2 eps), 0 <= eps < 0.5."""
    eps, z = label_smoothing, t.z
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register("exo_pair", uses_divergence=True,
          params={"label_smoothing": _eps("EXO's eps (0 means 1e-3)", high_open=True)})
def exo_pair_loss(t: PairTerms, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (pairwise): KL(q || (1 - eps, eps)) = q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps),
    q = sigmoid(beta * delta); eps = 1e-3 when label_smoothing is 0. Logs via logsigmoid."""
    eps = label_smoothing if label_smoothing > 0 else 1e-3
    z = t.z
    log_q, log_1mq = F.logsigmoid(z), F.logsigmoid(-z)
    q = torch.sigmoid(z)
    return q * (log_q - math.log1p(-eps)) + (1.0 - q) * (log_1mq - math.log(eps))


@register("nca_pair")
def nca_pair_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """NCA (pairwise): -log sigmoid(beta c) - 0.5 log sigmoid(-beta c) - 0.5 log sigmoid(-beta r)."""
    bc, br = beta * t.c, beta * t.r
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br)


@register("bco_pair")
def bco_pair_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """BCO (pairwise): -log sigmoid(beta c) - log sigmoid(-beta r)."""
    return -F.logsigmoid(beta * t.c) - F.logsigmoid(-beta * t.r)


@register("sppo_hard")
def sppo_hard_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """SPPO with hard labels: (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2."""
    half = 1.0 / (2.0 * beta)
    return (t.c - half) ** 2 + (t.r + half) ** 2


@register("aot", batch_level=True, params={"label_smoothing": SMOOTHING})
def aot_loss(t: PairTerms, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT (paired): smoothed sigmoid loss on beta * (sort(pc - pr) - sort(rc - rr)) over the batch."""
    diff = torch.sort(t.pc - t.pr, dim=0).values - torch.sort(t.rc - t.rr, dim=0).values
    return _smoothed_logsigmoid(beta * diff, label_smoothing)


@register("aot_pair", batch_level=True, params={"label_smoothing": SMOOTHING})
def aot_pair_loss(t: PairTerms, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT (unpaired): smoothed sigmoid loss on beta * (sort(c) - sort(r)) over the batch."""
    diff = torch.sort(t.c, dim=0).values - torch.sort(t.r, dim=0).values
    return _smoothed_logsigmoid(beta * diff, label_smoothing)


@register("apo_zero")
def apo_zero_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """APO-zero: (1 - sigmoid(beta c)) + sigmoid(beta r): raise chosen, lower rejected likelihood."""
    return (1.0 - torch.sigmoid(beta * t.c)) + torch.sigmoid(beta * t.r)


@register("apo_down", uses_divergence=True)
def apo_down_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """APO-down: sigmoid(beta c) + (1 - sigmoid(beta * delta)): lower both, rejected more."""
    return torch.sigmoid(beta * t.c) + (1.0 - torch.sigmoid(t.z))


@register("discopop", uses_divergence=True,
          params={"discopop_tau": Param(0.05, "temperature of the log-ratio modulation", 0.0, low_open=True,
                                        doc="Temperature of the discopop loss.")})
def discopop_loss(t: PairTerms, *, beta: float, discopop_tau: float) -> torch.Tensor:
    """DiscoPOP / LRML: z = beta delta, m = sigmoid(z / tau): (1 - m)(-log sigmoid z) + m exp(-z)
    (m exp(-z) as written while -z <= DIRECT_EXP, beyond as exp(log sigmoid(z / tau) - z), which does not
    overflow while the product does not)."""
    z = t.z
    m = torch.sigmoid(z / discopop_tau)
    far = -z > DIRECT_EXP
    weighted_exp = torch.where(far, torch.exp(torch.where(far, F.logsigmoid(z / discopop_tau) - z, 0.0)),
                               m * torch.exp(torch.clamp(-z, max=DIRECT_EXP)))
    return (1.0 - m) * -F.logsigmoid(z) + weighted_exp


@register("sigmoid_norm", needs_lengths=True)
def sigmoid_norm_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """Length-normalized DPO (sec. 6.5.5): -log sigmoid(beta (c / nc - r / nr))."""
    return -F.logsigmoid(beta * (t.c / t.nc - t.r / t.nr))


def _simpo_rewards(t: PairTerms, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * t.pc / t.nc, beta * t.pr / t.nr


@register("simpo", needs_reference=False, needs_lengths=True, rewards=_simpo_rewards,
          params={"simpo_gamma": Param(0.5, "target reward margin gamma", 0.0, extra=True,
                                       doc="Target reward margin gamma of the simpo loss."),
                  "label_smoothing": SMOOTHING})
def simpo_loss(t: PairTerms, *, beta: float, simpo_gamma: float, label_smoothing: float) -> torch.Tensor:
    """SimPO (reference-free): -log sigmoid(beta pc / nc - beta pr / nr - gamma), eps-smoothed;
    rewards are beta * pc / nc and beta * pr / nr."""
    return _smoothed_logsigmoid(beta * t.pc / t.nc - beta * t.pr / t.nr - simpo_gamma, label_smoothing)


@register("sft", needs_reference=False, needs_nll=True)
def sft_loss(t: PairTerms, *, beta: float) -> torch.Tensor:
    """NLL of the chosen response (mean per token): the SFT term, for combinations such as MPO."""
    return t.chosen_nll


def _divergence_loss(fn, t: PairTerms, beta: float, own: dict) -> torch.Tensor:
    """fn's (B,) losses on z = beta * delta, exact (value and gradient) wherever z and the loss are
    representable; finite, monotone in z and with a nonzero gradient of the right sign beyond.

    Where |z| overflows or the loss does, the loss is read off its asymptote: at |z| >= FAR every
    registered divergence loss is affine in |z| (k |z| + b; the exponentially small terms are below the
    last bit), so two far points give k, and the loss is k |z| = sign(k) exp(log|k| + log|z|) in float64,
    or b where k = 0 (a saturating side). Where that overflows too (the true loss is past the largest
    finite value) the loss is +-max with the gradient k dz (saturated at +-max where it overflows: see
    divergence_z). The points are evaluated with no gradient first, so no overflowing branch can put a
    NaN into the backward pass. A mean over several losses at +-max overflows; each one is finite.
    """
    dtype = t.z.dtype
    with torch.no_grad():
        bad = t.z_over | ~torch.isfinite(fn(t, beta=beta, **own))
        sgn = torch.sign(t.z)
        far1 = fn(dataclasses.replace(t, z=sgn * FAR), beta=beta, **own)
        far2 = fn(dataclasses.replace(t, z=sgn * (2.0 * FAR)), beta=beta, **own)
        flat = (far1 == far2) & torch.isfinite(far1)
        slope = (far2 - far1) / FAR
        sloped = torch.isfinite(slope) & (slope != 0)
        runs_to = torch.sign(torch.where(torch.isfinite(slope), slope, far1))
        # the asymptote's slope in z; a loss growing faster than |z| (discopop, tau > 1) gets the largest
        big_slope = runs_to * torch.finfo(dtype).max
        dloss_dz = sgn * torch.where(sloped, slope, torch.where(torch.isfinite(slope), runs_to, big_slope))
        slope = torch.where(sloped, slope, torch.ones_like(slope)).double()
        log_along = torch.log(slope.abs()) + torch.where(bad, t.log_abs_z, torch.zeros_like(t.log_abs_z))
        fits = sloped & torch.isfinite(torch.exp(log_along).to(dtype))
    zero = torch.zeros_like(t.z)
    near = fn(dataclasses.replace(t, z=torch.where(bad, zero, t.z)), beta=beta, **own)
    flat_value = fn(dataclasses.replace(t, z=torch.where(bad & flat, sgn * FAR, zero)), beta=beta, **own)
    log_abs_z = torch.where(bad, t.log_abs_z, torch.zeros_like(t.log_abs_z))
    log_along = torch.where(fits, torch.log(slope.abs()) + log_abs_z, torch.zeros_like(log_abs_z))
    along = (torch.sign(slope) * torch.exp(log_along)).to(dtype)
    at_top = runs_to * torch.finfo(dtype).max + dloss_dz * (t.z - t.z.detach())
    beyond = torch.where(flat, flat_value, torch.where(fits, along, at_top))
    # a NaN log-prob stays NaN (loss and gradient), so the trainer's non-finite guard sees it and names the pair
    return torch.where(torch.isnan(t.z), t.z, torch.where(bad, beyond, near))


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    """losses (B,): weighted sum of the per-pair losses (times `weights` when given), differentiable;
    chosen_rewards / rejected_rewards (B,): detached implicit rewards; loss: scalar
    sum_k weight_k * mean(losses_k) + rpo_alpha * mean(chosen_nll); pair_losses (B,): losses plus the rpo
    term, so loss == pair_losses.mean() (a trainer that scales by a global pair count sums pair_losses);
    components: name -> unweighted (B,) losses of each loss in the combination."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    loss: torch.Tensor
    pair_losses: torch.Tensor
    components: dict[str, torch.Tensor]


def resolve_loss_names(name) -> list[str]:
    """Registered names from a name, a comma-separated string or a list; aliases resolved; ValueError
    listing the valid choices for an unknown one."""
    names = [n.strip() for n in name.split(",")] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError(f"loss_type is empty; valid choices: {', '.join(LOSSES)}")
    out = []
    for n in names:
        n = LOSS_ALIASES.get(n, n)
        if n not in LOSSES:
            raise ValueError(f"loss_type {n!r} is unknown; valid choices: {', '.join(LOSSES)}")
        out.append(n)
    return out


def _as_float(x: torch.Tensor | None, arg: str, shape, *, detach: bool = False) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor of shape (B,), got {type(x).__name__}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{arg} has shape {tuple(x.shape)}; expected {tuple(shape)} like policy_chosen_logps")
    return _at_least_f32(x.detach() if detach else x)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for float64 input: never compute in half precision."""
    return x.double() if x.dtype == torch.float64 else x.float()


def preference_loss(name, *, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                    beta: float = 0.1, **params) -> LossOutput:
    """Compute the loss `name` (a registered name, a comma-separated string or a list of names).

    Inputs are (B,) tensors of summed completion log-probs (any float dtype; computed in float32, or
    float64 for float64 inputs) and completion token counts. Reference log-probs are detached; they may
    be None for reference-free losses or with reference_free=True (zero reference log-ratios).
    Keyword hyper-parameters: beta, f_divergence_type, f_alpha_divergence_coef, rpo_alpha (needs
    chosen_nll (B,)), loss_weights (one per name, default 1), weights ((B,) per-pair weights, e.g.
    wpo_weights; detached; they do not scale the rpo term), reference_free, and every per-loss parameter
    listed by describe_losses(). Parameters that no chosen loss uses are ignored. Rewards of a
    combination are those of its first loss.
    """
    names = resolve_loss_names(name)
    specs = [LOSSES[n] for n in names]
    known = set(GLOBAL_PARAMS) | set(OTHER_KWARGS) | {p for s in LOSSES.values() for p in s.params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown loss parameter(s) {unknown}; valid: {', '.join(sorted(known | {'beta'}))}")
    beta = GLOBAL_PARAMS["beta"].check("beta", beta, "preference_loss")
    rpo_alpha = GLOBAL_PARAMS["rpo_alpha"].check("rpo_alpha", params.get("rpo_alpha"), "preference_loss")
    alpha = GLOBAL_PARAMS["f_alpha_divergence_coef"].check(
        "f_alpha_divergence_coef", params.get("f_alpha_divergence_coef", 0.5), "preference_loss")
    kind = canonical_divergence(params.get("f_divergence_type", "reverse_kl"))
    weights_k = params.get("loss_weights")
    weights_k = [1.0] * len(names) if weights_k is None else [float(w) for w in weights_k]
    if len(weights_k) != len(names):
        raise ValueError(f"loss_weights has {len(weights_k)} entries for {len(names)} losses {names}; "
                         "give one weight per loss_type entry")
    terms = _pair_terms(specs, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        chosen_lengths, rejected_lengths, params, kind, alpha, beta)
    if terms.chosen_nll is None and rpo_alpha is not None:
        raise ValueError("rpo_alpha needs chosen_nll=(B,), the mean per-token NLL of the chosen response "
                         "(ResponseLogps.chosen_nll); pass it or unset rpo_alpha")
    pair_w = _as_float(params.get("weights"), "weights", terms.pc.shape, detach=True)

    components, total = {}, torch.zeros_like(terms.pc)
    for spec, w in zip(specs, weights_k):
        own = {k: p.check(k, params.get(k, p.default), f"loss {spec.name!r}") for k, p in spec.params.items()}
        if spec.uses_divergence:
            components[spec.name] = _divergence_loss(spec.fn, terms, beta, own)
        else:
            components[spec.name] = spec.fn(terms, beta=beta, **own)
        total = total + w * components[spec.name]
    if pair_w is not None:
        total = total * pair_w
    pair_losses = total if rpo_alpha is None else total + rpo_alpha * terms.chosen_nll
    with torch.no_grad():
        if specs[0].rewards is not None:
            chosen_r, rejected_r = specs[0].rewards(terms, beta)
        else:
            chosen_r, rejected_r = beta * terms.c, beta * terms.r
    return LossOutput(total, chosen_r.detach(), rejected_r.detach(), pair_losses.mean(), pair_losses, components)


def _pair_terms(specs, pc, pr, rc, rr, n_c, n_r, params, kind, alpha, beta) -> PairTerms:
    """Validate the (B,) inputs against what the losses need and build their float32 PairTerms."""
    pc = _as_float(pc, "policy_chosen_logps", None)
    if pc is None or pc.dim() != 1:
        raise ValueError("policy_chosen_logps must be a (B,) tensor of summed log-probs")
    shape = pc.shape
    pr = _as_float(pr, "policy_rejected_logps", shape)
    rc = _as_float(rc, "ref_chosen_logps", shape, detach=True)
    rr = _as_float(rr, "ref_rejected_logps", shape, detach=True)
    nll = _as_float(params.get("chosen_nll"), "chosen_nll", shape)
    needs_ref = any(s.needs_reference for s in specs)
    if params.get("reference_free", False) or (rc is None and rr is None and not needs_ref):
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pc)
    elif rc is None or rr is None:
        free = [n for n, s in LOSSES.items() if not s.needs_reference]
        raise ValueError(f"loss {[s.name for s in specs]} needs ref_chosen_logps and ref_rejected_logps (B,); "
                         f"pass both, set reference_free=True, or use a reference-free loss: {', '.join(free)}")
    nc = nr = None
    if any(s.needs_lengths for s in specs):
        if n_c is None or n_r is None:
            needing = [s.name for s in specs if s.needs_lengths]
            raise ValueError(f"loss {needing} normalizes by length: pass chosen_lengths and rejected_lengths "
                             "(B,) completion token counts")
        nc = _as_float(n_c, "chosen_lengths", shape, detach=True).clamp_min(1.0)
        nr = _as_float(n_r, "rejected_lengths", shape, detach=True).clamp_min(1.0)
    if nll is None and any(s.needs_nll for s in specs):
        raise ValueError(f"loss {[s.name for s in specs if s.needs_nll]} needs chosen_nll=(B,), the mean "
                         "per-token NLL of the chosen response (ResponseLogps.chosen_nll)")
    if not any(s.uses_divergence for s in specs):
        return PairTerms(pc, pr, rc, rr, nc, nr, None, nll)
    z, log_abs_z, over = divergence_z(pc - rc, pr - rr, kind, alpha, beta)
    return PairTerms(pc, pr, rc, rr, nc, nr, z, nll, log_abs_z, over)


# --------------------------------------------------------------------------------------------------
# Config bridge and description
# --------------------------------------------------------------------------------------------------
def config_params() -> dict[str, Param]:
    """Every loss hyper-parameter once, as DPOConfig declares a field for each: GLOBAL_PARAMS, then each
    loss's own in registration order. A name several losses declare (label_smoothing) keeps the first
    declaration's default, help and doc, and the interval all of them allow, so a config value is valid for
    whichever loss reads it; their defaults must agree."""
    out: dict[str, Param] = dict(GLOBAL_PARAMS)
    for spec in LOSSES.values():
        for key, p in spec.params.items():
            if key not in out:
                out[key] = p
                continue
            first = out[key]
            if p.default != first.default:
                raise ValueError(f"loss {spec.name!r} declares {key}={p.default!r} by default where another loss "
                                 f"declares {first.default!r}; one config field cannot have both")
            low_open = p.low_open if p.low > first.low else first.low_open or (p.low == first.low and p.low_open)
            high_open = p.high_open if p.high < first.high else first.high_open or (p.high == first.high and p.high_open)
            out[key] = replace(first, low=max(first.low, p.low), high=min(first.high, p.high),
                               low_open=low_open, high_open=high_open)
    return out


def param_readers(key: str) -> list[str]:
    """The registered losses that read hyper-parameter ``key`` (all of them for beta and the modifiers)."""
    return list(LOSSES) if key in GLOBAL_PARAMS else [n for n, s in LOSSES.items() if key in s.params]


def loss_params(config) -> dict:
    """Loss hyper-parameters out of any object with DPOConfig field names, as kwargs for
    `preference_loss(config.loss_type, **loss_params(config), policy_chosen_logps=..., ...)`.
    Missing attributes (and None, except rpo_alpha / loss_weights whose None means off / all 1) get the
    defaults; loss_type is validated (but not returned). `ld_alpha` and `use_weighting` act on log-probs,
    not here: see `ld_dpo_logps` and `wpo_weights`."""
    defaults = {"f_divergence_type": "reverse_kl", "reference_free": False, "loss_weights": None,
                **{k: p.default for k, p in config_params().items()}}
    resolve_loss_names(getattr(config, "loss_type", None) or "sigmoid")  # fail early, naming the choices
    out = {}
    for key in defaults:
        value = getattr(config, key, None)
        out[key] = defaults[key] if value is None else value
    out["f_divergence_type"] = canonical_divergence(out["f_divergence_type"])
    out["reference_free"] = bool(out["reference_free"])
    if out["loss_weights"] is not None:
        out["loss_weights"] = [float(w) for w in out["loss_weights"]]
    return out


def describe_losses() -> str:
    """Every registered loss with what it needs and its parameters and defaults (`preftune losses`)."""
    lines = ["Losses (loss_type); every loss takes beta (default 0.1, > 0).", ""]
    for spec in LOSSES.values():
        flags = ["reference" if spec.needs_reference else "reference-free"]
        flags += [f for f, on in (("lengths", spec.needs_lengths), ("batch-level", spec.batch_level),
                                  ("chosen_nll", spec.needs_nll), ("f-divergence", spec.uses_divergence)) if on]
        lines.append(f"{spec.name:<13} [{', '.join(flags)}]")
        lines.append(f"    {spec.doc}")
        for k, p in spec.params.items():
            lines.append(f"    {k} = {p.default!r}  in {p.range_text()}: {p.help}")
    lines += ["", "Modifiers (any loss):"]
    for k, p in GLOBAL_PARAMS.items():
        lines.append(f"    {k} = {p.default!r}: {p.help}")
    lines += [f"    f_divergence_type = 'reverse_kl': one of {', '.join(F_DIVERGENCES)} (losses marked f-divergence)",
              "    loss_type may be a list with loss_weights (default 1 each); reference_free = False",
              "    use_weighting (WPO): wpo_weights(...) -> weights=;  ld_alpha (LD-DPO): ld_dpo_logps(...)",
              f"Aliases: {', '.join(f'{a} -> {b}' for a, b in LOSS_ALIASES.items())}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Log-prob level modifiers: LD-DPO and WPO
# --------------------------------------------------------------------------------------------------
def ld_dpo_logps(chosen_token_logps: torch.Tensor, rejected_token_logps: torch.Tensor,
                 chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
                 ld_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO summed log-probs from padded per-token log-probs (B, Tc) / (B, Tr) and masks of the same
    shapes (True / 1 on completion tokens, anywhere in the row; ``preftune.logps.TokenLogps.padded``
    gives them, chosen rows [:B], rejected [B:]). With l_p = min(|y_w|, |y_l|) the
    "public" length, the k-th completion token (k = 1, 2, ...) has weight 1 if k <= l_p else ld_alpha:
    log pi_ld(y) = sum_{k <= l_p} log p_k + ld_alpha * sum_{k > l_p} log p_k. Returns (pc, pr), (B,)
    float32 (float64 for float64 input), differentiable; ld_alpha = 1 gives the plain sums."""
    if not 0.0 <= float(ld_alpha) <= 1.0:
        raise ValueError(f"ld_alpha={ld_alpha!r} is out of range; it must lie in [0, 1]")
    mc, mr = chosen_mask.bool(), rejected_mask.bool()
    public = torch.minimum(mc.sum(-1), mr.sum(-1)).unsqueeze(-1)  # (B, 1)

    def weighted(logps, mask):
        rank = mask.long().cumsum(-1)  # 1-based index of each completion token, (B, T)
        x = _at_least_f32(logps)
        x = torch.where(rank <= public, x, float(ld_alpha) * x)
        return torch.where(mask, x, 0.0).sum(-1)

    return weighted(chosen_token_logps, mc), weighted(rejected_token_logps, mr)


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 over the last (vocab) dim, p = softmax(logits): logsumexp(2 z) - 2 logsumexp(z).
    (..., V) -> (...), float32. WPO's per-token normalizer; apply per chunk of the output head."""
    z = logits.float()
    return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)


@torch.no_grad()
def wpo_weights(chosen_token_logps: torch.Tensor, rejected_token_logps: torch.Tensor,
                chosen_log_sum_sq: torch.Tensor, rejected_log_sum_sq: torch.Tensor,
                chosen_mask: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """WPO per-pair weights (eq. 2 of the WPO paper, the `use_weighting` option), detached, (B,).

    Per response y, with per-token log-probs log p_t and normalizers log sum_v p_v^2 (log_sum_sq_probs),
    both padded (B, T) with a completion mask (``preftune.logps.TokenLogps.padded`` of ``logps`` and of
    ``log_sum_sq_probs``): a(y) = mean_t [log p_t - log sum_v p_v(t)^2]; the pair weight is
    exp(a(y_w) + a(y_l)), not capped at 1 (as TRL; a(y) <= log V). Pass it as
    preference_loss(..., weights=w)."""

    def length_mean(logps, norm, mask):
        mask = mask.bool()
        adj = torch.where(mask, logps.float() - norm.float(), 0.0)
        return adj.sum(-1) / mask.sum(-1).clamp_min(1)

    a = length_mean(chosen_token_logps, chosen_log_sum_sq, chosen_mask)
    b = length_mean(rejected_token_logps, rejected_log_sum_sq, rejected_mask)
    return torch.exp(a + b)


if __name__ == "__main__":
    print(describe_losses())
