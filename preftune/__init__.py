"""preftune: Direct Preference Optimization and its family of losses, and Group Relative Policy
Optimization (GRPO) and its variants, fast and lean.

Public API::

    from preftune import DPOConfig, DPOTrainer, preference_loss, LOSSES
    from preftune import GRPOConfig, GRPOTrainer
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# A process-wide effect of `import preftune` (docs/internals.md, "Process-wide effects", lists them all
# with their opt-outs): transparent huge pages for PyTorch's large CPU tensors (>= 2 MB), which a
# training step frees and re-allocates by the hundred MB, so the kernel faults in 2 MB pages instead of
# 4 KB ones (docs/benchmarks.md). PyTorch reads the variable once, at its first CPU allocation, so it is
# set here, before the model is loaded. THP_MEM_ALLOC_ENABLE=0 opts out; it changes no value.
if sys.platform.startswith("linux"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Imported on first use so that `import preftune` stays cheap (torch and transformers load lazily).
_LAZY = {
    "DPOConfig": "preftune.config",
    "DPOTrainer": "preftune.trainer",
    "train": "preftune.run",
    "preference_loss": "preftune.losses",
    "LOSSES": "preftune.losses",
    "GRPOConfig": "preftune.grpo.config",
    "GRPOTrainer": "preftune.grpo.trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
