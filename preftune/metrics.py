"""Training and evaluation metrics of a preference batch, kept on device until a logging step.

`preference_metrics` turns a LossOutput into 0-dim detached tensors (no `.item()`, so no device sync per
micro-batch); `MetricAccumulator` averages them over micro-batches weighted by their number of pairs and,
once per logging step, sums across processes with the trainer's reduce function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from preftune.losses import LossOutput

__all__ = ["preference_metrics", "MetricAccumulator"]


def preference_metrics(out: LossOutput, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       chosen_nll: torch.Tensor | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Batch means, as 0-dim detached float32 tensors, keyed `{prefix}rewards/chosen`, `rewards/rejected`,
    `rewards/accuracies` (fraction of pairs with chosen reward > rejected reward), `rewards/margins`
    (chosen - rejected reward), `logps/chosen`, `logps/rejected` (summed completion log-probs, (B,) in)
    and `nll_loss` (mean of chosen_nll (B,), only when given)."""
    chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }
    if chosen_nll is not None:
        metrics["nll_loss"] = chosen_nll.detach().float().mean()
    return {f"{prefix}{k}": v for k, v in metrics.items()}


class MetricAccumulator:
    """Pair-weighted means of metric dicts over micro-batches (gradient accumulation, evaluation).

    add(metrics, count) adds value * count and count per key (a key may be missing from some batches);
    reduce(reduce_fn) sums the totals across processes in one collective call; compute() returns the
    means as Python floats (the only device sync). Every process must add the same set of keys before
    reduce. Usage::

        acc = MetricAccumulator()
        for micro in batches: acc.add(preference_metrics(out, ...), count=B)
        acc.reduce(accelerator.reduce)      # its default reduction is "sum"
        logs = acc.compute(); acc.reset()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor | float], count: int | torch.Tensor) -> None:
        """metrics: name -> 0-dim tensor (or float), the mean over `count` pairs."""
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().to(torch.float32)
            n = torch.as_tensor(count, device=value.device, dtype=torch.float32)
            if key in self._sums:
                self._sums[key] = self._sums[key] + value.to(self._sums[key].device) * n
                self._counts[key] = self._counts[key] + n
            else:
                self._sums[key], self._counts[key] = value * n, n

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the totals with their sums over processes. reduce_fn(tensor (2K,)) must return the
        element-wise sum across processes (accelerate's `Accelerator.reduce` does by default)."""
        keys = sorted(self._sums)
        if not keys:
            return
        packed = torch.stack([self._sums[k] for k in keys] + [self._counts[k] for k in keys])
        total = reduce_fn(packed)
        for i, key in enumerate(keys):
            self._sums[key], self._counts[key] = total[i], total[len(keys) + i]

    def compute(self) -> dict[str, float]:
        """name -> sum(value * count) / sum(count) as floats (NaN where no pairs were counted)."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        sums = torch.stack([self._sums[k] for k in keys]).cpu()
        counts = torch.stack([self._counts[k] for k in keys]).cpu()
        means = sums / counts
        return {k: float(m) for k, m in zip(keys, means.tolist())}
