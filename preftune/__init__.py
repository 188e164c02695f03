"""preftune: Direct Preference Optimization and its family of losses, fast and lean.

Public API::

    from preftune import DPOConfig, DPOTrainer, preference_loss, LOSSES
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use so that `import preftune` stays cheap (torch and transformers load lazily).
_LAZY = {
    "DPOConfig": "preftune.config",
    "DPOTrainer": "preftune.trainer",
    "train": "preftune.trainer",
    "preference_loss": "preftune.losses",
    "LOSSES": "preftune.losses",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
