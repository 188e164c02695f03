"""Where a training run's bytes come from: glibc malloc settings on CPU, optimizer state up front.

``tune_malloc``, called where a CPU training run starts (``TrainLoop.__init__``), on Linux with glibc:
a process-wide malloc setting, one of the effects listed in docs/internals.md ("Process-wide effects";
``PREFTUNE_MALLOC_TUNING=0`` leaves malloc alone). A step allocates and frees hundreds of activation
and gradient tensors of 2-120 MB; glibc's default adapts its mmap threshold and trims the heap top, so
with huge pages for tensors of 2 MB and up (``THP_MEM_ALLOC_ENABLE``, set by ``import preftune``) they
kept going back to the kernel and faulting in again, zeroed, at their next allocation. With the
threshold fixed at 256 MiB and the heap top given back only past 2 GiB free, every tensor below 256 MiB
is reused from the heap; larger ones are still mapped on demand and returned when freed. Values do not
change, only where the bytes come from (the measurements: docs/benchmarks.md, "glibc malloc").

``init_adamw_state``: torch's AdamW creates its two moment buffers at the first ``step()``, after
the first backward freed its activations, so the persistent buffers land in the holes those left
and the second step's activations need fresh memory around them. Created before the first
forward, they sit below every transient allocation (a lower peak RSS: docs/benchmarks.md, "AdamW state
before the first forward"). The state is the one ``step()`` would create, so the run is the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 2**20  # below it, freed tensors are reused from the heap
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: give the heap top back only past 2 GiB free there

_done: bool | None = None


def tune_malloc() -> bool:
    """Apply the settings once per process; returns whether they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("PREFTUNE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("malloc tuning %s", "applied" if ok else "refused")
    _done = ok
    return ok


def init_adamw_state(optimizer) -> int:
    """Create ``torch.optim.AdamW``'s per-parameter state (step, exp_avg, exp_avg_sq and, with amsgrad,
    max_exp_avg_sq) now, as its first ``step()`` would; returns how many parameters got it. Other
    optimizers and parameters that already have state are left alone."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if type(opt) is not torch.optim.AdamW:
        return 0
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    n = 0
    for group in opt.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if not p.requires_grad or opt.state.get(p):
                continue
            state = opt.state[p]
            # as torch's Adam._init_group: a device scalar (float32) when fused or capturable, else a CPU one
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=scalar))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            n += 1
    return n


class StepInBackward:
    """The optimizer's update made inside backward, a few parameters at a time as soon as autograd has
    finished their gradients, and those gradients freed right after (``optim_in_backward=True``).

    A plain step holds every gradient until backward ends: a second copy of the trainable weights,
    which sets the step's peak where the gradients outweigh the activations (large models, small
    batches). Here at most one bucket of finished gradients (``BUCKET_BYTES``, plus the parameter that
    crossed it) and those backward is still producing are alive. Each update is the one
    ``optimizer.step()`` would make (the same torch AdamW, its state, groups and learning rate, on the
    bucket's parameters), so the run equals a plain run without clipping, bit for bit.

    What it cannot do, and the config refuses: clip by the global norm (an update made before the
    last gradient exists cannot be scaled by it), accumulate over micro-batches, or scale fp16 loss.
    Non-finite values: the loss and the running sum of squared gradients set ``found_inf``, which the
    fused AdamW reads on the device (no host sync) and then leaves the parameters and their state
    alone. A non-finite loss skips every update; a gradient that turns non-finite partway through
    backward skips its bucket and those after it, and ``updated()`` counts the parameters already
    stepped. Buckets, not single parameters: one ``step()`` per parameter cost several times the whole
    plain step (docs/benchmarks.md, optim_in_backward).
    """

    BUCKET_BYTES = 64 * 2**20

    def __init__(self, optimizer, params):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self._group = {p: i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        missing = [p for p in params if p not in self._group]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameters are not in the optimizer")
        self.n_params = len(params)
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._bucket: list[torch.Tensor] = []
        self._bytes = 0
        self.sq = self.skipped = None

    def begin(self, loss: torch.Tensor) -> None:
        """Before ``loss.backward()``. The running sum of squares starts at ``0 * loss``: 0, or NaN for a
        non-finite loss, which then skips every update of the step."""
        self.sq = loss.detach().float() * 0
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.sq.device)
        self._bucket, self._bytes = [], 0  # nothing left over from a backward that raised

    def finish(self) -> None:
        """After ``loss.backward()``: the last bucket."""
        self._flush()

    def grad_norm(self) -> torch.Tensor:
        """The step's global L2 gradient norm (what clipping would have measured; NaN after a bad loss)."""
        return self.sq.sqrt()

    def updated(self) -> torch.Tensor:
        """How many parameters this step updated (a device tensor)."""
        return self.n_params - self.skipped

    def _ready(self, p: torch.Tensor) -> None:
        if self.sq is None:
            raise RuntimeError("StepInBackward.begin(loss) must run before backward")
        self._bucket.append(p)
        self._bytes += p.grad.numel() * p.grad.element_size()
        if self._bytes >= self.BUCKET_BYTES:
            self._flush()

    def _flush(self) -> None:
        bucket, self._bucket, self._bytes = self._bucket, [], 0
        if not bucket:
            return
        opt = self.optimizer
        grads = [p.grad for p in bucket]
        with torch.autocast(self.sq.device.type, enabled=False):
            self.sq += _total_norm(grads).square()
            bad = ~torch.isfinite(self.sq)
            opt.found_inf = bad.to(torch.float32)  # the fused AdamW leaves the bucket alone when it is 1
            groups = opt.param_groups
            opt.param_groups = [{**g, "params": [p for p in bucket if self._group[p] == i]} for i, g in enumerate(groups)]
            try:
                opt.step()
            finally:
                opt.param_groups = groups
            self.skipped += bad * len(bucket)
        for p in bucket:
            p.grad = None

    def remove(self) -> None:
        """Take the hooks off the parameters; later backwards keep their gradients again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        vars(self.optimizer).pop("found_inf", None)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, in float32 (what gradient clipping measures)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(tensors, foreach=True).float()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]))
