"""Session set-up shared by every test module."""

import os

import torch

if not torch.cuda.is_available():
    # Triton's kernels (preftune.kernels) run in its interpreter on CPU tensors in tests/test_kernels.py;
    # Triton reads this when it is first imported. Nothing else runs them on CPU (see kernels.usable).
    os.environ.setdefault("TRITON_INTERPRET", "1")
