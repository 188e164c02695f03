"""DPO's side of a step: one micro-batch of pairs through the policy (and reference) to per-pair
losses and metrics, and the implicit-reward evaluation of a model over tokenized pairs.

Both the trainer and `preftune eval` use these; neither needs a trainer object.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from preftune.logps import model_pair_logps
from preftune.losses import LOSSES, loss_params, preference_loss, resolve_loss_names
from preftune.metrics import MetricAccumulator, preference_metrics

# what `evaluate_pairs(..., predictions=True)` gives per pair, column by column: the policy's log-probs of the
# chosen and rejected responses (summed over their tokens, as the loss uses them), and the loss's implicit
# rewards of each (for DPO beta * (policy - reference) log-probs)
PREDICTION_COLUMNS = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards")


@dataclass
class DPOObjective:
    """The run's loss: registered names (a list means a weighted combination), their parameters, and the
    log-prob options the forwards need: LD-DPO's ``ld_alpha`` (policy and reference sums alike) and WPO's
    ``use_weighting`` (per-pair weights from the policy's own tokens).

    ``router_aux_loss_coef``: the weight of a mixture-of-experts policy's router load-balancing loss (0 =
    off; the trainer sets it from the model, ``preftune.models.router_aux_loss_coef``). Like TRL, whose loss
    of a micro-batch is mean(pair losses) + coef * aux, every pair's loss carries its micro-batch's
    ``coef * aux``: the loop sums a micro-batch's pair losses and divides by the global batch, so the step's
    loss and gradient are those of TRL's mean over the micro-batches."""

    loss_names: list[str]
    loss_kwargs: dict
    needs_reference: bool
    chunk_size: int | None = None
    rpo: bool = False
    ld_alpha: float | None = None
    wpo: bool = False
    router_aux_loss_coef: float = 0.0

    @classmethod
    def from_args(cls, args) -> DPOObjective:
        names = resolve_loss_names(args.loss_type)
        needs = any(LOSSES[n].needs_reference for n in names) and not args.reference_free
        return cls(names, loss_params(args), needs, args.logps_chunk_size, bool(args.rpo_alpha),
                   args.ld_alpha, bool(args.use_weighting))

    @property
    def reference_kwargs(self) -> dict:
        """What a reference's ``logps`` (and the precompute) must be called with to match the policy's sums."""
        return {"ld_alpha": self.ld_alpha} if self.ld_alpha is not None else {}

    def pair_losses(self, model, batch: dict, reference, predictions: list | None = None) -> tuple[torch.Tensor, dict]:
        """Per-pair losses (B,) and metric tensors for one micro-batch. ``predictions``: a list that gets the
        batch's per-pair (B, 4) values (`PREDICTION_COLUMNS`), detached."""
        ref_c = ref_r = None
        if reference is not None:  # first: a live reference's forward then runs beside no policy activations
            ref = reference.logps(batch, **self.reference_kwargs)
            ref_c, ref_r = ref.chosen_logps, ref.rejected_logps
        pol = model_pair_logps(model, batch, chunk_size=self.chunk_size, ld_alpha=self.ld_alpha, wpo=self.wpo,
                               router_aux_loss=self.router_aux_loss_coef != 0)
        chosen, rejected = pol.chosen_logps, pol.rejected_logps
        if self.ld_alpha is not None:  # the loss and the logged log-probs both use LD-DPO's sums
            chosen, rejected = pol.ld_chosen_logps, pol.ld_rejected_logps
        out = preference_loss(
            self.loss_names if len(self.loss_names) > 1 else self.loss_names[0],
            policy_chosen_logps=chosen,
            policy_rejected_logps=rejected,
            ref_chosen_logps=ref_c,
            ref_rejected_logps=ref_r,
            chosen_lengths=pol.chosen_lengths,
            rejected_lengths=pol.rejected_lengths,
            chosen_nll=pol.chosen_nll,
            weights=pol.wpo_weights,
            **self.loss_kwargs,
        )
        metrics = preference_metrics(out, chosen, rejected,
                                     chosen_nll=pol.chosen_nll if self.rpo else None)
        if predictions is not None:
            predictions.append(torch.stack([chosen, rejected, out.chosen_rewards, out.rejected_rewards], dim=1)
                               .detach().float())
        losses = out.pair_losses
        if pol.aux_loss is not None:  # the micro-batch's router loss on each of its pairs (see the class)
            losses = losses + self.router_aux_loss_coef * pol.aux_loss.to(losses.dtype)
            metrics["aux_loss"] = pol.aux_loss.detach().float()
        return losses, metrics


def evaluate_pairs(objective: DPOObjective, model, reference, features, *, collate: Callable[[list], dict],
                   batch_size: int, accelerator=None, predictions: bool = False):
    """Implicit-reward metrics over tokenized pairs (means, prefixed `eval_`), in eval mode, without gradients.

    ``predictions=True``: returns (metrics, values), values a float32 CPU tensor (N, 4) with a row per pair in
    the order of `features` (`PREDICTION_COLUMNS`), gathered from every process.

    With an accelerator, every process takes a strided shard and runs the same number of forwards (DDP buffer
    syncs, FSDP/ZeRO-3 gathers are collectives): a process whose shard is shorter runs a filler batch that
    counts for 0 pairs. Without one, everything runs here, on the device `collate` puts batches on."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    accum = MetricAccumulator()
    kept: list | None = [] if predictions else None
    n = len(features)
    indices = list(range(rank, n, world))
    rounds = math.ceil(math.ceil(n / world) / batch_size)
    with torch.no_grad():
        for j in range(rounds):
            chunk = indices[j * batch_size : (j + 1) * batch_size]
            batch = collate([features[i] for i in (chunk or [0])])
            with autocast():
                per_pair, metrics = objective.pair_losses(model, batch, reference, predictions=kept)
            if kept is not None:
                kept[-1] = kept[-1][: len(chunk)].cpu()  # a filler batch keeps nothing
            row = {"loss": per_pair.mean(), **metrics}
            if not chunk:
                row = {k: torch.zeros_like(v) for k, v in row.items()}
            accum.add(row, len(chunk))
    if was_training:
        model.train()
    if world > 1:
        accum.reduce(lambda t: accelerator.reduce(t, reduction="sum"))
    out = {f"eval_{k}": v for k, v in accum.compute().items()}
    if kept is None:
        return out
    mine = torch.cat(kept) if kept else torch.zeros(0, len(PREDICTION_COLUMNS))
    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object([(rank, mine)])  # every process's rows: process r holds pairs r, r + world, ...
        values = torch.zeros(n, len(PREDICTION_COLUMNS))
        for r, rows in shards:
            values[r::world] = rows
        return out, values
    return out, mine
