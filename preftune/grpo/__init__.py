"""GRPO: Group Relative Policy Optimization on preftune's training core."""
