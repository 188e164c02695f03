"""TR-DPO's reference sync: every ``sync_steps`` optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``.

The mix acts on tensors (:meth:`EMAReferenceSync.mix_`, the LoRA "ref" adapter's factors) or on two
models matched parameter by parameter (:meth:`EMAReferenceSync.mix_models_`, a separate reference model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def _canonical(name: str) -> str:
    """Parameter name without wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``)."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


@dataclass
class EMAReferenceSync:
    """TR-DPO: every ``sync_steps`` optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``.

    alpha: ``ref_model_mixup_alpha`` in (0, 1]: how much of the current policy to mix in.
    sync_steps: ``ref_model_sync_steps`` >= 1.
    """

    alpha: float = 0.6
    sync_steps: int = 512

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha={self.alpha} must be in (0, 1]")
        if self.sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps={self.sync_steps} must be >= 1")

    def due(self, step: int) -> bool:
        """True after optimizer steps sync_steps, 2*sync_steps, ... (steps count from 1)."""
        return step > 0 and step % self.sync_steps == 0

    @torch.no_grad()
    def mix_(self, ref: Sequence[torch.Tensor], policy: Sequence[torch.Tensor]) -> None:
        """In place: ``ref[i] <- ref[i] + alpha * (policy[i] - ref[i])`` (= alpha*policy + (1-alpha)*ref)."""
        ref = [r.data for r in ref]
        pol = [p.detach().to(device=r.device, dtype=r.dtype) for p, r in zip(policy, ref)]
        torch._foreach_lerp_(ref, pol, self.alpha)

    def mix_models_(self, ref_model: nn.Module, policy: nn.Module) -> None:
        """Mix a separate reference model toward the policy, parameter by parameter (matched by name)."""
        ref_params = {_canonical(n): p for n, p in ref_model.named_parameters()}
        pol_params = {_canonical(n): p for n, p in policy.named_parameters()}
        if ref_params.keys() != pol_params.keys():
            diff = sorted(ref_params.keys() ^ pol_params.keys())
            raise ValueError(
                f"TR-DPO sync: reference and policy parameters differ ({diff[:3]} ...); the reference must be "
                "a copy of the policy's architecture (with LoRA, let preftune build the 'ref' adapter)"
            )
        for name, r in ref_params.items():
            if r.shape != pol_params[name].shape:
                raise ValueError(f"TR-DPO sync: {name} has shape {tuple(r.shape)} in the reference, "
                                 f"{tuple(pol_params[name].shape)} in the policy")  # fmt: skip
        names = sorted(ref_params)
        self.mix_([ref_params[n] for n in names], [pol_params[n] for n in names])
