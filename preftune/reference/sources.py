"""Where a reference's log-probs come from while training: one interface, its sources, and the choice.

- :class:`FrozenModelReference`: a separate frozen model (optionally mixed toward the policy, TR-DPO).
- :class:`AdapterDisabledReference`: the LoRA policy itself with its adapters switched off
  (reference = base model; no second copy in memory).
- :class:`RefAdapterReference`: TR-DPO with LoRA, a second adapter "ref" mixed toward the policy's.
- :class:`CachedReference`: a table of log-probs computed before training (``preftune.reference.cache``).

Every source returns a ``preftune.logps.ResponseLogps`` computed without autograd.
:func:`choose_source` decides which source a run uses; :func:`make_reference` builds the live ones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from preftune.models import disable_dropout
from preftune.reference.sync import EMAReferenceSync

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Eval mode and the forward without autograd
# --------------------------------------------------------------------------------------------


# Bumped by torch's global hook when a module in a listed model registers a submodule
# (``Module.__setattr__``, ``add_module``): a module list cached for a model is current while the count
# has not moved. Registrations into other modules do not count: transformers' decoders slice
# ``self.layers[:n]`` in every forward, a new ModuleList that registers every layer again, which
# counted would rebuild the list on every call. ``_listed``: id -> weak reference of every module of a
# listed model (a freed module's entry leaves with it, so a new module at its address does not count).
_structure_version = [0]
_listed: dict[int, weakref.ref] = {}


def _structure_changed(module: nn.Module, _name, _sub) -> None:
    ref = _listed.get(id(module))
    if ref is not None and ref() is module:
        _structure_version[0] += 1


def _forget(key: int, ref: weakref.ref) -> None:
    if _listed.get(key) is ref:
        del _listed[key]


torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)


def _module_list(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model``, listed once per structure version and kept in the model's
    ``__dict__`` (not a submodule, so no registration)."""
    cached = model.__dict__.get("_preftune_modules")
    if cached is None or cached[0] != _structure_version[0]:
        cached = (_structure_version[0], list(model.modules()))
        for m in cached[1]:
            key = id(m)
            if key not in _listed or _listed[key]() is not m:
                _listed[key] = weakref.ref(m, functools.partial(_forget, key))
        model.__dict__["_preftune_modules"] = cached
    return cached[1]


def _plain_train(module: nn.Module) -> bool:
    """Whether ``module.train(False)`` only sets the flags: transformers' override also re-applies hub
    kernels when ``use_kernels`` is set."""
    from transformers import PreTrainedModel

    return type(module).train is PreTrainedModel.train and not getattr(module, "use_kernels", False)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (dropout off) and restore each one's own flag after.

    The flags are plain attributes, set directly on a module list made once per model structure:
    ``model.eval()`` recurses through ``Module.__setattr__``, ten times the host time on every reference
    batch (docs/benchmarks.md, "Host overhead of a step"). A module with its own ``train`` (other than
    transformers' without hub kernels) gets ``model.eval()`` as before.
    """
    modules = _module_list(model)
    states = [m.training for m in modules]
    if all(type(m).train is nn.Module.train or _plain_train(m) for m in modules):
        for m in modules:
            vars(m)["training"] = False
    else:
        model.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, states):  # skip Module.__setattr__'s lookups
            vars(module)["training"] = training


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _detached(out):
    """Copy an inference-mode ResponseLogps into ordinary tensors (they may meet autograd in the loss)."""
    from preftune.logps import ResponseLogps

    return ResponseLogps(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(out).items()})


def _grad_free(model: nn.Module):
    """``torch.inference_mode()``, but ``torch.no_grad()`` for sharded models (FSDP, DeepSpeed): their
    parameter gathers reuse buffers that inference mode would mark as inference tensors, which FSDP2
    then refuses ("Inference tensors do not track version counter")."""
    p = next(model.parameters(), None)
    sharded = (type(p).__name__ == "DTensor" or hasattr(p, "ds_id")
               or type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"))  # fmt: skip
    return torch.no_grad() if sharded else torch.inference_mode()


def forward_logps(model: nn.Module, batch: dict, *, ld_alpha: float | None = None, **logps_kwargs):
    """``model_logps(model, batch, **logps_kwargs)`` in eval mode, without autograd (:func:`_grad_free`).
    With ``ld_alpha`` (LD-DPO) the responses' length-desensitized sums stand in for the plain sums
    (``chosen_logps``/``rejected_logps``), so every reference source and the cache hold what the loss uses."""
    from preftune.logps import model_logps, model_pair_logps

    device = next(model.parameters()).device
    with eval_mode(model), _grad_free(model):
        if ld_alpha is None:
            out = model_logps(model, _to_device(batch, device), **logps_kwargs)
        else:
            out = model_pair_logps(model, _to_device(batch, device), ld_alpha=ld_alpha, **logps_kwargs)
            out = dataclasses.replace(out, chosen_logps=out.ld_chosen_logps, rejected_logps=out.ld_rejected_logps)
    return _detached(out)


def forward_token_logps(model: nn.Module, batch: dict, **logps_kwargs):
    """``model_token_logps(model, batch, **logps_kwargs)`` in eval mode without autograd: the per-token view
    (GRPO's reference and old-policy log-probs), as ordinary detached tensors."""
    from preftune.logps import TokenLogps, model_token_logps

    device = next(model.parameters()).device
    with eval_mode(model), _grad_free(model):
        out = model_token_logps(model, _to_device(batch, device), **logps_kwargs)
    return TokenLogps(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(out).items()})


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class Reference:
    """Interface: ``logps(batch) -> ResponseLogps`` without autograd, and a per-optimizer-step hook.

    ``logps_kwargs`` (e.g. ``chunk_size``) go to ``model_logps`` for the sources that run a forward.
    """

    needs_forward: bool = True

    def logps(self, batch: dict, **logps_kwargs):
        raise NotImplementedError

    def token_logps(self, batch: dict, **logps_kwargs):
        """Per-token log-probs (``preftune.logps.TokenLogps``) of the batch's completions, without autograd."""
        raise NotImplementedError(f"{type(self).__name__} holds no per-token log-probs")

    def on_optimizer_step(self, step: int, policy: nn.Module) -> None:
        """Called after optimizer step ``step`` (1-based); TR-DPO syncs here. No-op by default."""


class _ModelReference(Reference):
    """Any model, used as is (for precomputing from a model the caller still owns)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def logps(self, batch: dict, **logps_kwargs):
        return forward_logps(self.model, batch, **logps_kwargs)

    def token_logps(self, batch: dict, **logps_kwargs):
        return forward_token_logps(self.model, batch, **logps_kwargs)


class FrozenModelReference(_ModelReference):
    """A separate reference model: eval mode, no grads, dropout off; optional TR-DPO sync.

    freeze=False leaves the model's flags alone (the policy serving as its own reference before
    training, to precompute); the forward still runs in eval mode without autograd.
    """

    def __init__(self, ref_model: nn.Module, sync: EMAReferenceSync | None = None, *, freeze: bool = True):
        super().__init__(ref_model)
        if freeze:
            ref_model.eval()
            ref_model.requires_grad_(False)
            disable_dropout(ref_model)
        self.sync = sync

    def on_optimizer_step(self, step: int, policy: nn.Module) -> None:
        if self.sync is not None and self.sync.due(step):
            self.sync.mix_models_(self.model, policy)


def _adapter_switches(peft_model: nn.Module) -> list[nn.Module] | None:
    """The modules whose ``_disable_adapters`` flag turns their adapters off (peft's tuner layers and
    auxiliary wrappers such as modules_to_save), or None where only peft's ``disable_adapter()``
    does it right (prompt learning, adaption prompts)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older peft
        AuxiliaryTrainingWrapper = BaseTunerLayer
    configs = list(getattr(peft_model, "peft_config", {}).values())
    if not configs or any(c.is_prompt_learning or getattr(c, "is_adaption_prompt", False) for c in configs):
        return None
    for c in configs:
        if getattr(c, "bias", "none") != "none":
            logger.warning("the LoRA reference is the policy with its adapters off, but bias=%r trains the base "
                           "layers' biases: the reference is not the base model", c.bias)  # fmt: skip
    return [m for m in peft_model.modules()
            if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and hasattr(m, "_disable_adapters")]


class AdapterDisabledReference(Reference):
    """The PEFT policy with adapters disabled: reference = base model, no second copy.

    For LoRA-style adapters the switch is each tuner layer's ``_disable_adapters`` flag, set for the
    forward and put back after: what peft's ``disable_adapter()`` does for a forward without autograd,
    without its per-call model-status walk over every module (and requires_grad toggling), the largest
    host cost of a LoRA step (docs/benchmarks.md, "Host overhead of a step"). The layers are listed
    once, and again when the model's set of adapters changes; other peft methods use
    ``disable_adapter()``.
    """

    def __init__(self, peft_model: nn.Module):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("AdapterDisabledReference needs a peft model (with disable_adapter()); "
                            "pass ref_model for a full-model policy")  # fmt: skip
        self.model = peft_model
        self._listed_for = tuple(getattr(peft_model, "peft_config", {}))
        self._switches = _adapter_switches(peft_model)

    @contextmanager
    def _adapters_off(self) -> Iterator[None]:
        if tuple(getattr(self.model, "peft_config", {})) != self._listed_for:  # adapters added or deleted since
            self._listed_for = tuple(getattr(self.model, "peft_config", {}))
            self._switches = _adapter_switches(self.model)
        if self._switches is None:
            with self.model.disable_adapter():
                yield
            return
        before = [m._disable_adapters for m in self._switches]
        was_disabled = getattr(self.model, "_adapters_disabled", False)
        for m in self._switches:
            m._disable_adapters = True
        self.model._adapters_disabled = True
        try:
            yield
        finally:
            for m, flag in zip(self._switches, before):
                m._disable_adapters = flag
            self.model._adapters_disabled = was_disabled

    def logps(self, batch: dict, **logps_kwargs):
        with self._adapters_off():
            return forward_logps(self.model, batch, **logps_kwargs)

    def token_logps(self, batch: dict, **logps_kwargs):
        with self._adapters_off():
            return forward_token_logps(self.model, batch, **logps_kwargs)


class RefAdapterReference(Reference):
    """TR-DPO with LoRA: the reference is base + a frozen second adapter "ref".

    The "ref" adapter starts as a copy of the policy's adapter (so at step 0 the reference equals
    the policy). Each sync lerps its LoRA tensors toward the policy adapter's:
    ``A_ref <- alpha*A + (1-alpha)*A_ref`` and likewise for B. That is the TR-DPO formula applied
    to the adapter's parameters; the weight delta ``B_ref @ A_ref`` is not exactly the lerp of the
    two deltas (the product is bilinear), only its factors are.
    """

    def __init__(self, peft_model: nn.Module, sync: EMAReferenceSync, adapter_name: str = "ref"):
        import copy

        self.model, self.sync, self.name = peft_model, sync, adapter_name
        self.policy_name = peft_model.active_adapter
        if adapter_name in peft_model.peft_config:
            raise ValueError(f"the policy already has an adapter named {adapter_name!r}")
        grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
        config = copy.deepcopy(peft_model.peft_config[self.policy_name])
        peft_model.add_adapter(adapter_name, config)
        params = dict(peft_model.named_parameters())
        self.ref_params, self.policy_params = [], []
        for name, p in params.items():
            if f".{self.policy_name}." in name:
                ref_name = name.replace(f".{self.policy_name}.", f".{adapter_name}.")
                self.policy_params.append(p)
                self.ref_params.append(params[ref_name])
        if not self.ref_params:
            raise ValueError(
                f"no parameters of adapter {self.policy_name!r} found to copy into {adapter_name!r}"
            )
        with torch.no_grad():
            torch._foreach_copy_([r.data for r in self.ref_params], [p.data for p in self.policy_params])
        for name, p in params.items():
            p.requires_grad_(grads.get(name, False))  # the new adapter stays frozen
        peft_model.set_adapter(self.policy_name)
        self._restore_grads(grads)

    def _restore_grads(self, grads: dict) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(grads.get(name, False))

    @contextmanager
    def _ref_active(self) -> Iterator[None]:
        # set_adapter also flips requires_grad flags, so they are saved and restored exactly
        grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.set_adapter(self.name, inference_mode=True)
        try:
            yield
        finally:
            self.model.set_adapter(self.policy_name)
            self._restore_grads(grads)

    def logps(self, batch: dict, **logps_kwargs):
        with self._ref_active():
            return forward_logps(self.model, batch, **logps_kwargs)

    def token_logps(self, batch: dict, **logps_kwargs):
        with self._ref_active():
            return forward_token_logps(self.model, batch, **logps_kwargs)

    def on_optimizer_step(self, step: int, policy: nn.Module) -> None:
        if self.sync.due(step):
            self.sync.mix_(self.ref_params, self.policy_params)


class CachedReference(Reference):
    """Precomputed reference log-probs: a (N, 2) float32 table [chosen, rejected] indexed by the
    batch's ``pair_index``. Lengths come from the batch itself (token counts per response); the
    cache's key holds every setting that changes them (``preftune.reference.cache.reference_cache_key``).
    """

    needs_forward = False

    def __init__(self, table: torch.Tensor):
        if table.ndim != 2 or table.shape[1] != 2:
            raise ValueError(f"reference table must have shape (N, 2), got {tuple(table.shape)}")
        self.table = table.float().cpu()

    def logps(self, batch: dict, **logps_kwargs):
        from preftune.logps import ResponseLogps

        index = batch["pair_index"].cpu().long()
        b, n = int(batch["num_pairs"]), self.table.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise IndexError(f"pair_index {index.tolist()} outside the cached reference table of {n} rows: "
                             "the cache belongs to another dataset; delete it or recompute")  # fmt: skip
        rows = self.table[index]  # (B, 2)
        if torch.isnan(rows).any():
            missing = index[torch.isnan(rows).any(1)].tolist()
            raise ValueError(
                f"pairs {missing} have no precomputed reference log-probs (dropped when precomputing?)"
            )
        counts = torch.bincount(batch["segments"].cpu(), minlength=2 * b)  # (2B,)
        device = batch["segments"].device
        return ResponseLogps(
            chosen_logps=rows[:, 0].to(device), rejected_logps=rows[:, 1].to(device),
            chosen_lengths=counts[:b].to(device), rejected_lengths=counts[b:].to(device),
            chosen_nll=torch.full((b,), float("nan"), device=device),  # unknown without a forward
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Choosing the source
# --------------------------------------------------------------------------------------------

SOURCES = ("none", "cache", "frozen_model", "adapters_off", "ref_adapter")


def choose_source(*, needs_reference: bool, precompute: bool | None, is_peft: bool, ref_model: object | None,
                  sync_ref_model: bool, plain_data_parallel: bool = True) -> str:  # fmt: skip
    """Which reference source a run uses: one of :data:`SOURCES`.

    needs_reference: whether any of the run's losses uses a reference (and ``reference_free`` is off).
    precompute: ``precompute_ref_log_probs``: True, False, or None (automatic: precompute where the
        policy is a full model under one process or plain data parallel, without TR-DPO).
    is_peft: whether the policy is a PEFT model (its base model can serve as the reference).
    ref_model: the reference the caller was given (a model or a path), or None.
    sync_ref_model: TR-DPO (the reference moves toward the policy during training).
    plain_data_parallel: one process, DDP or multi-CPU (accelerate's NO, MULTI_GPU, MULTI_CPU);
        False under FSDP, DeepSpeed and other backends (see ``placement.plain_data_parallel``).

    In order: no reference needed -> "none"; precomputed -> "cache" (refused with TR-DPO, whose
    reference must be live); a given ``ref_model`` -> "frozen_model"; a PEFT policy -> "ref_adapter"
    under TR-DPO, else "adapters_off"; otherwise "frozen_model", a copy of the policy that the caller
    loads. What computes a "cache" is the same choice without precompute or TR-DPO (where that gives
    "frozen_model" without a ``ref_model``, the policy itself serves, as it is before training).
    """
    if not needs_reference:
        return "none"
    if precompute and sync_ref_model:
        raise ValueError("sync_ref_model=True (TR-DPO) needs a live reference, which moves during training; "
                         "set precompute_ref_log_probs=False or drop sync_ref_model")  # fmt: skip
    if precompute is None:
        precompute = plain_data_parallel and not is_peft and not sync_ref_model
    if precompute:
        return "cache"
    if ref_model is not None:
        return "frozen_model"
    if is_peft:
        return "ref_adapter" if sync_ref_model else "adapters_off"
    return "frozen_model"


def make_reference(*, loss_needs_reference: bool, policy: nn.Module, ref_model: nn.Module | None = None,
                   sync: EMAReferenceSync | None = None) -> Reference | None:  # fmt: skip
    """The live reference :func:`choose_source` picks (never a cache), or None for a reference-free loss.

    A PEFT policy without ``ref_model`` -> its adapters off (or the "ref" adapter under TR-DPO, ``sync``);
    otherwise the frozen ``ref_model`` (the trainer loads it from the policy's path when not given).
    """
    is_peft = hasattr(policy, "disable_adapter") and hasattr(policy, "peft_config")
    kind = choose_source(needs_reference=loss_needs_reference, precompute=False, is_peft=is_peft,
                         ref_model=ref_model, sync_ref_model=sync is not None)  # fmt: skip
    if kind == "none":
        return None
    if kind == "adapters_off":
        return AdapterDisabledReference(policy)
    if kind == "ref_adapter":
        return RefAdapterReference(policy, sync)
    if ref_model is None:
        raise ValueError("this loss needs a reference: pass ref_model (or use LoRA, whose base model serves)")
    return FrozenModelReference(ref_model, sync=sync)
