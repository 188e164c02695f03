"""Group Relative Policy Optimization: group-relative advantages and the policy loss."""

from preftune.grpo.objective import LOSS_TYPES, group_advantages, policy_loss

__all__ = ["group_advantages", "policy_loss", "LOSS_TYPES"]
