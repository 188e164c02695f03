"""Group Relative Policy Optimization: rollouts, rewards, group advantages and the clipped policy loss."""
