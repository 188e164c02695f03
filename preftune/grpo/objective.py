"""GRPO's objective as pure tensor functions: group-relative advantages and the clipped policy loss.

Group Relative Policy Optimization samples G completions per prompt, scores them, and uses the group's
reward statistics as the baseline (no critic):

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)                    (scale_rewards="group")

The policy is updated with a token-level surrogate on the importance ratio w = pi_theta / pi_old:

    l_t = -min(w_t A, clip(w_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_k3(pi_theta || pi_ref)_t

and one of several aggregations of l_t into a scalar (the `loss_type`). Every loss type is one entry of
`LOSSES`: a per-token formula and an aggregation; `LOSS_TYPES` lists their names. The numerics follow
TRL 1.16's GRPOTrainer term for term (same operations in the same order, including its own clamps in
VESPO and its clamp(min=1) on token counts); nothing else is clamped or offset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["LOSS_TYPES", "LOSSES", "Advantages", "PolicyLoss", "LossType", "group_advantages", "policy_loss",
           "entropy_threshold", "nanstd"]

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # added to every std before dividing (TRL's constant)


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs; NaN where fewer than two values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    bessel = n / (n - 1)
    bessel = torch.where(n > 1, bessel, torch.full_like(bessel, float("nan")))
    std = torch.sqrt(var * bessel)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass
class Advantages:
    """Output of `group_advantages`; every field is (N,) and detached.

    advantages: what the loss multiplies (0 for a completion every reward function returned None for).
    rewards:    the weighted sum of the raw rewards (NaN-aware; NaN for an all-None completion), which is
                what TRL logs as `reward` whatever the aggregation.
    std:        the std the advantages were scaled by (group std for "group"/"none", the batch std for
                "batch" and for normalize_then_sum); NaN where undefined (one scorable completion).
    zero_std:   std is (close to) zero, TRL's `frac_reward_zero_std` numerator.
    """

    advantages: torch.Tensor
    rewards: torch.Tensor
    std: torch.Tensor
    zero_std: torch.Tensor


def group_advantages(rewards: torch.Tensor, num_generations: int, *, reward_weights=None,
                     scale_rewards: str | bool = "group",
                     multi_objective_aggregation: str = "sum_then_normalize") -> Advantages:
    """Group-relative advantages of N = groups x G completions (a group's G completions consecutive).

    rewards: (N,) or (N, F), one column per reward function, NaN where a function returned None.
    reward_weights: F weights (default all 1), rounded to float32 as TRL stores them.
    scale_rewards: "group" (True) divides by the group's std + 1e-4, "batch" by the whole batch's std
        + 1e-4, "none" (False) only centres; the std is Bessel-corrected and NaN-aware.
    multi_objective_aggregation:
        "sum_then_normalize": r_i = sum_k w_k r_ik (NaNs skipped), then centre on the group mean and scale.
        "normalize_then_sum" (GDPO): each function's rewards are first normalised within the group,
            (r_ik - mean_k) / (std_k + 1e-4), then weighted and summed, and the sum is normalised over the
            whole batch, (s_i - mean(s)) / (std(s) + 1e-4); `scale_rewards` plays no part (as in TRL).
    A completion whose every reward is NaN takes no part in the baselines and gets advantage 0; any
    other NaN advantage (a group with a single scorable completion under scaling) becomes 0 as well.
    Arithmetic is float32 (float64 input stays float64); the rewards must be gathered from every
    process first, the caller then keeps its own slice.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not valid; use one of {', '.join(SCALE_REWARDS)} "
                         "(or True = 'group', False = 'none')")
    if multi_objective_aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation={multi_objective_aggregation!r} is not valid; use one of "
                         f"{', '.join(AGGREGATIONS)}")
    rewards = torch.as_tensor(rewards)
    per_func = rewards.unsqueeze(1) if rewards.dim() == 1 else rewards
    if per_func.dim() != 2:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected (N,) or (N, num_reward_funcs)")
    per_func = per_func.to(torch.promote_types(per_func.dtype, torch.float32))
    n, n_funcs = per_func.shape
    G = int(num_generations)
    if G < 1 or n % G != 0:
        raise ValueError(f"num_generations={num_generations} must be >= 1 and divide the number of "
                         f"completions ({n}); each prompt's completions must be complete and consecutive")
    if reward_weights is None:
        weights = torch.ones(n_funcs, dtype=torch.float32)
    else:
        weights = torch.as_tensor(reward_weights, dtype=torch.float32).flatten()
        if weights.numel() != n_funcs:
            raise ValueError(f"reward_weights has {weights.numel()} entries but there are {n_funcs} reward "
                             "functions; give one weight per reward function")
    weights = weights.to(per_func.device).unsqueeze(0)  # (1, F)
    unscorable = torch.isnan(per_func).all(dim=1)  # (N,)

    if multi_objective_aggregation == "sum_then_normalize":
        summed = (per_func * weights).nansum(dim=1)
        summed[unscorable] = float("nan")
        mean = torch.nanmean(summed.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        if scale == "batch":
            std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
        elif G > 1:
            std = nanstd(summed.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std = torch.zeros_like(summed)
        advantages = summed - mean
        if scale != "none":
            advantages = advantages / (std + STD_EPS)
    else:
        grouped = per_func.view(-1, G, n_funcs)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        normalised = ((grouped - mean_k) / (std_k + STD_EPS)).view(-1, n_funcs)
        summed = (normalised * weights).nansum(dim=1)
        summed[unscorable] = float("nan")
        std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + STD_EPS)

    zero_std = torch.isclose(std, torch.zeros_like(std))
    advantages = torch.nan_to_num(advantages, nan=0.0)
    raw = (per_func * weights).nansum(dim=1)
    raw[unscorable] = float("nan")
    return Advantages(advantages=advantages.detach(), rewards=raw.detach(), std=std.detach(), zero_std=zero_std)


# --------------------------------------------------------------------------------------------------
# Policy loss: the terms every loss type sees
# --------------------------------------------------------------------------------------------------
@dataclass
class Terms:
    """Inputs of a loss type's per-token formula. Shapes: (B, T) per token; (B, 1) per sequence.

    ratio is exp(log_weight): (B, T) at importance_sampling_level "token", (B, 1) at "sequence"."""

    logps: torch.Tensor        # (B, T) current policy, with grad
    log_ratio: torch.Tensor    # (B, T) logps - old logps
    ratio: torch.Tensor        # (B, T) or (B, 1)
    advantages: torch.Tensor   # (B, 1) (or (B, T) for per-token advantages)
    mask: torch.Tensor         # (B, T) float {0, 1}
    options: dict


@dataclass
class Normalizer:
    """What the caller passes so that summed micro-batch losses give the optimizer step's loss."""

    num_items_in_batch: torch.Tensor   # completion tokens of the generation batch, all processes
    num_processes: int
    gradient_accumulation_steps: int
    steps_per_generation: int
    max_completion_length: int | None = None


@dataclass(frozen=True)
class LossType:
    """A loss type: per_token(terms) -> (B, T) or (B, 1) unmasked loss; aggregate(loss, mask, norm) ->
    (loss to backpropagate, policy loss to log); clip: which clip metrics it reports
    ("ppo", "cispo", "vespo" or "")."""

    per_token: Callable[[Terms], tuple[torch.Tensor, dict]]
    aggregate: Callable[[torch.Tensor, torch.Tensor, Normalizer], tuple[torch.Tensor, torch.Tensor]]
    clip: str = ""


def _clipped_surrogate(t: Terms):
    """PPO's pessimistic surrogate -min(w A, clip(w, 1-eps_low, 1+eps_high) A); with delta, w <= delta
    first (two-sided clip, INTELLECT-2)."""
    o = t.options
    clipped = torch.clamp(t.ratio, 1 - o["epsilon_low"], 1 + o["epsilon_high"])
    ratio = t.ratio if o["delta"] is None else torch.clamp(t.ratio, max=o["delta"])
    loss = -torch.min(ratio * t.advantages, clipped * t.advantages)
    return loss, {"ratio_for_metrics": ratio}


def _cispo(t: Terms):
    """CISPO (MiniMax-M1): -sg(min(w, eps_high)) A log pi_theta; the clipped weight carries no gradient."""
    weight = torch.clamp(t.ratio, max=t.options["epsilon_high"]).detach()
    return -weight * t.advantages * t.logps, {}


def _sapo(t: Terms):
    """SAPO: -(4 / tau) sigmoid(tau (w - 1)) A, tau = sapo_temperature_pos where A > 0, else _neg."""
    o = t.options
    tau = torch.where(t.advantages > 0, o["sapo_temperature_pos"], o["sapo_temperature_neg"])
    return -(torch.sigmoid(tau * (t.ratio - 1)) * 4 / tau) * t.advantages, {}


@torch.no_grad()
def _vespo_weights(t: Terms) -> torch.Tensor:
    """VESPO's gamma weight of the sequence ratio w = exp(sum_t clamp(log_ratio_t, -20, 20)):
    phi(w) = exp(lambda + k log w - lambda w) with log w clamped to [log 1e-8, 20], (k, lambda) the _pos
    pair where A >= 0 else the _neg pair, lambda >= 1e-4; non-finite phi -> 0. No gradient. (B, 1)."""
    o = t.options
    seq_log_ratio = (torch.clamp(t.log_ratio, -20.0, 20.0) * t.mask).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, math.log(1e-8), 20.0)
    nonneg = t.advantages >= 0
    k = torch.where(nonneg, o["vespo_k_pos"], o["vespo_k_neg"])
    lam = torch.where(nonneg, o["vespo_lambda_pos"], o["vespo_lambda_neg"]).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo(t: Terms):
    """VESPO: -phi(w) A log pi_theta with phi the detached gamma weight of the sequence ratio."""
    phi = _vespo_weights(t)
    return -phi * t.advantages * t.logps, {"phi": phi}


def _accumulated(loss: torch.Tensor, norm: Normalizer):
    return loss / norm.gradient_accumulation_steps, loss.detach()


def _sequence_mean(loss, mask, norm):
    """grpo, sapo: mean over sequences of each sequence's token mean (max(tokens, 1)), / accumulation."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return _accumulated(per_seq.mean(), norm)


def _local_token_mean(loss, mask, norm):
    """bnpo: sum over the micro-batch's tokens / max(its token count, 1), / accumulation."""
    return _accumulated((loss * mask).sum() / mask.sum().clamp(min=1.0), norm)


def _constant_length(loss, mask, norm):
    """dr_grpo: sum over tokens / (rows x max_completion_length), / accumulation."""
    return _accumulated((loss * mask).sum() / (loss.size(0) * norm.max_completion_length), norm)


def _global_token_mean(loss, mask, norm):
    """dapo, cispo, vespo: sum over tokens / the tokens of one accumulation window on one process,
    max(num_items_in_batch, 1) / num_processes * gradient_accumulation_steps / steps_per_generation."""
    n = norm.num_items_in_batch.clamp(min=1.0) / norm.num_processes
    n = n * norm.gradient_accumulation_steps / norm.steps_per_generation
    loss = (loss * mask).sum() / n
    return loss, loss.detach()


def _sequence_sum_mean(loss, mask, norm):
    """luspo: mean over sequences of each sequence's token sum (longer sequences weigh more), / accumulation."""
    return _accumulated((loss * mask).sum(-1).mean(), norm)


LOSSES: dict[str, LossType] = {
    "grpo": LossType(_clipped_surrogate, _sequence_mean, "ppo"),
    "bnpo": LossType(_clipped_surrogate, _local_token_mean, "ppo"),
    "dr_grpo": LossType(_clipped_surrogate, _constant_length, "ppo"),
    "dapo": LossType(_clipped_surrogate, _global_token_mean, "ppo"),
    "cispo": LossType(_cispo, _global_token_mean, "cispo"),
    "sapo": LossType(_sapo, _sequence_mean, ""),
    "luspo": LossType(_clipped_surrogate, _sequence_sum_mean, "ppo"),
    "vespo": LossType(_vespo, _global_token_mean, "vespo"),
}
LOSS_TYPES = tuple(LOSSES)


# --------------------------------------------------------------------------------------------------
# Policy loss: the entry point
# --------------------------------------------------------------------------------------------------
@dataclass
class PolicyLoss:
    """Output of `policy_loss`. `loss` carries the gradient; every metric is a detached 0-dim tensor
    (None when it does not apply) computed over this call's tokens.

    per_token_loss: (B, T) the loss per token before masking and aggregation (KL term included).
    policy_loss: the aggregated loss before the entropy bonus, as TRL logs it (for dapo/cispo/vespo
        after the normaliser, for the others before the division by gradient_accumulation_steps).
    kl: masked token mean of the (bias-corrected) k3 KL; entropy: masked token mean of `entropies`.
    clip_ratio_low / _high / _region: fraction of tokens (rows at sequence level) with w < 1 - eps_low
        and A < 0 / w > 1 + eps_high and A > 0 / either (ppo-style losses only); clip_ratio_low_min /
        clip_ratio_high_max: min / max over sequences of the per-sequence fraction (NaN if no sequence
        has a token). cispo_clip_ratio: fraction with w > eps_high and A > 0. vespo_phi: mean gamma weight.
    totals: for each mean metric, tensor([sum, count]): sum these over processes and divide (count
        clamped to 1) to get TRL's all-process value.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    clip_ratio_low: torch.Tensor | None = None
    clip_ratio_high: torch.Tensor | None = None
    clip_ratio_region: torch.Tensor | None = None
    clip_ratio_low_min: torch.Tensor | None = None
    clip_ratio_high_max: torch.Tensor | None = None
    cispo_clip_ratio: torch.Tensor | None = None
    vespo_phi: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    totals: dict[str, torch.Tensor] = field(default_factory=dict)


def entropy_threshold(token_entropies: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor | None:
    """The entropy a token needs to stay in the policy term: the (1 - top_entropy_quantile) quantile
    (linear interpolation, float32) of the completion tokens' entropies, 1-D, gathered from every process
    when there are several; None when there are none (then no token keeps its policy term)."""
    flat = token_entropies.detach().reshape(-1).float()
    if flat.numel() == 0:
        return None
    return torch.quantile(flat, 1 - top_entropy_quantile)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, per_sequence: bool):
    """(sum, count): over rows for per-sequence values (B, 1), over mask tokens otherwise."""
    if per_sequence:
        return x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
    return (x * mask).sum(), mask.sum().to(x.dtype)


def _nan_extreme(values: torch.Tensor, largest: bool) -> torch.Tensor:
    keep = values[~torch.isnan(values)]
    if keep.numel() == 0:
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return keep.max() if largest else keep.min()


def policy_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
                advantages: torch.Tensor, completion_mask: torch.Tensor, *, loss_type: str = "dapo",
                epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
                importance_sampling_level: str = "token", beta: float = 0.0,
                ref_per_token_logps: torch.Tensor | None = None, use_bias_correction_kl: bool = True,
                max_completion_length: int | None = None,
                sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                entropies: torch.Tensor | None = None, top_entropy_quantile: float = 1.0,
                entropy_threshold_value: torch.Tensor | float | None = None, entropy_coef: float = 0.0,
                off_policy_mask_threshold: float | None = None,
                sampling_per_token_logps: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, num_processes: int = 1,
                gradient_accumulation_steps: int = 1,
                steps_per_generation: int | None = None) -> PolicyLoss:
    """GRPO's policy loss for one micro-batch of B completions padded to T tokens (TRL 1.16's loss).

    per_token_logps: (B, T) log pi_theta of each completion token, with grad.
    old_per_token_logps: (B, T) log pi_old from the generation-time policy, or None when on-policy
        (then the detached current log-probs: ratio 1 with the gradient of w).
    advantages: (B,) (or (B, T)); completion_mask: (B, T) {0, 1}, TRL's `mask`: the completion's tokens,
        already zeroed for truncated completions under mask_truncated_completions and for tool-output
        tokens. The entropy mask is NOT folded into it: it is computed here from `entropies` (see below).

    Per token, with w = exp(logps - old) ("token") or exp(masked mean of it over the sequence) per row
    ("sequence", GSPO), the loss type's formula (see LOSSES) gives l_t; then, in this order:
    off_policy_mask_threshold: l_t = 0 in a sequence with A < 0 whose mean (sampling - logps) over its
        tokens exceeds the threshold (DeepSeek-V3.2; `sampling_per_token_logps` defaults to old);
    top_entropy_quantile < 1: l_t = 0 unless entropies_t >= the threshold (`entropy_threshold`, of this
        call's tokens unless `entropy_threshold_value` gives the all-process one);
    beta != 0: l_t += beta * (exp(ref - logps) - (ref - logps) - 1), times w when use_bias_correction_kl;
    then the loss type's aggregation, and with entropy_coef != 0 the bonus
        loss -= entropy_coef * sum(entropies * mask') / max(sum(mask'), 1) / gradient_accumulation_steps
        with mask' = mask x the entropy mask (`entropies` must then carry the gradient wanted).

    Normalisers: the step loss is the sum of the micro-batch losses (gradients accumulated), averaged
    over processes (the gradient all-reduce of data parallelism). To reproduce TRL the caller passes:
      grpo, sapo, luspo: gradient_accumulation_steps = A (the current window's number of micro-batches)
        -> each micro-batch mean (of sequence means / of sequence sums) divided by A;
      bnpo: A -> the micro-batch's token mean / A (local by design: not the global token mean);
      dr_grpo: A and max_completion_length L -> token sum / (B x L) / A;
      dapo, cispo, vespo: num_items_in_batch = completion tokens (mask sum) of the whole generation batch
        over all processes, num_processes = P, A, steps_per_generation = S (default A) -> token sum /
        (max(num_items_in_batch, 1) / P x A / S);
      entropy bonus (every type): A.
    In evaluation pass A = S = 1 (TRL does not accumulate there). With the defaults (num_items_in_batch
    None = this call's tokens, P = A = S = 1) the call is the whole global batch. Metrics are this call's;
    `totals` gives the sums and counts to add over processes.

    Not reproduced: TRL's vLLM importance-sampling correction (vllm_importance_sampling_*: the ratio it
    multiplies into the loss and adds to VESPO's log-weight), the MoE router auxiliary loss, and the
    adaptive entropy controller (the caller passes the coefficient of the step). Metrics at T = 1 with
    token-level ratios average over the mask's tokens, where TRL averages over all rows.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} is unknown; use "
                         f"{' or '.join(IMPORTANCE_LEVELS)}")
    if per_token_logps.dim() != 2 or completion_mask.shape != per_token_logps.shape:
        raise ValueError(f"per_token_logps {tuple(per_token_logps.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be (B, T)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' divides by max_completion_length; pass it (the generation limit)")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError(f"beta={beta} needs ref_per_token_logps (the reference model's log-probs); "
                         "pass them or set beta=0")
    if (top_entropy_quantile < 1.0 or entropy_coef != 0.0) and entropies is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the per-token entropies; "
                         "pass entropies=(B, T)")
    logps = per_token_logps
    mask = completion_mask.to(logps.dtype)
    old = logps.detach() if old_per_token_logps is None else old_per_token_logps
    adv = advantages.to(logps.device)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    if adv.shape[0] != logps.shape[0] or adv.shape[1] not in (1, logps.shape[1]):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected ({logps.shape[0]},) or "
                         f"{tuple(logps.shape)} to match per_token_logps")
    if min(num_processes, gradient_accumulation_steps, steps_per_generation or 1) < 1:
        raise ValueError(f"num_processes={num_processes}, gradient_accumulation_steps="
                         f"{gradient_accumulation_steps} and steps_per_generation={steps_per_generation} "
                         "must be >= 1")
    spec = LOSSES[loss_type]
    eps_high = epsilon if epsilon_high is None else epsilon_high
    per_sequence = importance_sampling_level == "sequence"

    log_ratio = logps - old
    if per_sequence:
        log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_weight = log_ratio
    ratio = torch.exp(log_weight)

    kl = None
    if beta != 0.0:
        d = ref_per_token_logps - logps
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * ratio

    options = dict(epsilon_low=epsilon, epsilon_high=eps_high, delta=delta,
                   sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                   vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                   vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    terms = Terms(logps=logps, log_ratio=log_ratio, ratio=ratio, advantages=adv, mask=mask, options=options)
    loss_t, extras = spec.per_token(terms)

    if off_policy_mask_threshold is not None:
        sampling = old if sampling_per_token_logps is None else sampling_per_token_logps
        drift = torch.nan_to_num(sampling - logps.detach(), nan=0.0)
        mean_drift = (drift * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        keep = (adv >= 0) | (mean_drift <= off_policy_mask_threshold)
        loss_t = loss_t * keep.to(mask.dtype)

    entropy_mask = None
    if top_entropy_quantile < 1.0:
        if entropy_threshold_value is None:
            threshold = entropy_threshold(entropies[mask.bool()], top_entropy_quantile)
        else:
            threshold = torch.as_tensor(entropy_threshold_value, device=logps.device)
        if threshold is None:
            entropy_mask = torch.zeros_like(mask, dtype=torch.bool)
        else:
            entropy_mask = (entropies * completion_mask.float() >= threshold) & mask.bool()
        loss_t = loss_t * entropy_mask

    if kl is not None:
        loss_t = loss_t + beta * kl

    n_items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch,
                                                                            device=logps.device)
    norm = Normalizer(num_items_in_batch=n_items, num_processes=num_processes,
                      gradient_accumulation_steps=gradient_accumulation_steps,
                      steps_per_generation=gradient_accumulation_steps if steps_per_generation is None
                      else steps_per_generation, max_completion_length=max_completion_length)
    loss, logged = spec.aggregate(loss_t, mask, norm)

    if entropy_coef != 0.0:
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        bonus = (entropies * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0) / gradient_accumulation_steps
        loss = loss - entropy_coef * bonus

    out = PolicyLoss(loss=loss, per_token_loss=loss_t.expand_as(logps).detach(), policy_loss=logged,
                     num_tokens=mask.sum().detach())
    totals = {}

    def mean_metric(name, x, per_seq):
        s, c = _masked_mean(x.detach().to(logps.dtype), mask, per_seq)
        totals[name] = torch.stack([s, c])
        return s / c.clamp(min=1.0)

    if kl is not None:
        out.kl = mean_metric("kl", kl, False)
    if entropies is not None:
        out.entropy = mean_metric("entropy", entropies, False)
    out.is_ratio = mean_metric("is_ratio", ratio, per_sequence)
    if spec.clip == "ppo":
        r = extras["ratio_for_metrics"]
        low = ((r < 1 - epsilon) & (adv < 0)).to(logps.dtype)
        high = ((r > 1 + eps_high) & (adv > 0)).to(logps.dtype)
        region = ((low + high) > 0).to(logps.dtype)
        seq_level = low.shape[1] == 1 and per_sequence
        out.clip_ratio_low = mean_metric("clip_ratio_low", low, seq_level)
        out.clip_ratio_high = mean_metric("clip_ratio_high", high, seq_level)
        out.clip_ratio_region = mean_metric("clip_ratio_region", region, seq_level)
        if seq_level:
            low_seq, high_seq = low.squeeze(1), high.squeeze(1)
        else:
            low_seq = (low * mask).sum(-1) / mask.sum(-1)
            high_seq = (high * mask).sum(-1) / mask.sum(-1)
        out.clip_ratio_low_min = _nan_extreme(low_seq, largest=False)
        out.clip_ratio_high_max = _nan_extreme(high_seq, largest=True)
    elif spec.clip == "cispo":
        clipped = ((ratio > eps_high) & (adv > 0)).to(logps.dtype)
        out.cispo_clip_ratio = mean_metric("cispo_clip_ratio", clipped, clipped.shape[1] == 1 and per_sequence)
    elif spec.clip == "vespo":
        out.vespo_phi = mean_metric("vespo_phi", extras["phi"], extras["phi"].shape[1] == 1)
    out.totals = totals
    return out
