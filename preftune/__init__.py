"""preftune: Direct Preference Optimization and its family of losses, fast and lean.

Public API::

    from preftune import DPOConfig, DPOTrainer, preference_loss, LOSSES
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# Transparent huge pages for PyTorch's large CPU tensors (>= 2 MB): a training step frees and
# re-allocates hundreds of MB of activations and gradients, and on 4 KB pages the kernel zeroes
# them one fault at a time (a fresh (49152, 576) float32 gradient: 32 ms on 4 KB pages, 7-15 ms
# on huge pages, on the 2-core benchmark machine). PyTorch reads this variable at its first such
# allocation, so it takes effect when preftune is imported before the model is loaded. Set
# THP_MEM_ALLOC_ENABLE=0 to opt out; it changes no value, only page size.
if sys.platform.startswith("linux"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Imported on first use so that `import preftune` stays cheap (torch and transformers load lazily).
_LAZY = {
    "DPOConfig": "preftune.config",
    "DPOTrainer": "preftune.trainer",
    "train": "preftune.run",
    "preference_loss": "preftune.losses",
    "LOSSES": "preftune.losses",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
