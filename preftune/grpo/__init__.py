"""Group Relative Policy Optimization: rollouts, rewards, group advantages, the clipped policy loss and the
trainer on preftune's shared loop.

    from preftune.grpo import GRPOConfig, GRPOTrainer, group_advantages, policy_loss
"""

import importlib

from preftune.grpo.objective import LOSS_TYPES, group_advantages, policy_loss

_LAZY = {"GRPOConfig": "preftune.grpo.config", "GRPOTrainer": "preftune.grpo.trainer"}

__all__ = ["GRPOConfig", "GRPOTrainer", "group_advantages", "policy_loss", "LOSS_TYPES"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'preftune.grpo' has no attribute {name!r}")
