"""Where reference log-probs come from: one interface, four sources.

- :class:`FrozenModelReference` — a separate frozen copy of the model.
- :class:`AdapterDisabledReference` — the LoRA policy itself with its adapters switched off
  (reference = base model; no second copy in memory).
- :class:`CachedReference` — a table of log-probs computed once before training
  (:func:`precompute_reference_logps`), kept on disk under a key that hashes everything that
  changes the numbers (:func:`reference_cache_key`); a mismatch recomputes, never reuses.
- TR-DPO (:class:`EMAReferenceSync`): the reference tracks the policy every ``sync_steps``
  optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``, either for a separate reference
  model or, with LoRA, for a second adapter named "ref" (:class:`RefAdapterReference`).

Every source returns a ``preftune.logps.ResponseLogps`` computed without autograd. A reference
is needed only by losses that use it; :func:`make_reference` returns None for the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from preftune.models import cache_root, disable_dropout

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"


# --------------------------------------------------------------------------------------------
# Helpers
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
    8.2 ms -> 0.8 ms per call on the 2-core CPU for a 24-layer model with LoRA on 7 projections (2001
    modules; ``model.eval()`` recurses through ``Module.__setattr__``), which the live LoRA reference
    and every reference batch call. A module with its own ``train`` (other than transformers' without
    hub kernels) gets ``model.eval()`` as before.
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


def forward_logps(model: nn.Module, batch: dict, **logps_kwargs):
    """``model_logps(model, batch, **logps_kwargs)`` in eval mode, without autograd (:func:`_grad_free`)."""
    from preftune.logps import model_logps

    device = next(model.parameters()).device
    with eval_mode(model), _grad_free(model):
        out = model_logps(model, _to_device(batch, device), **logps_kwargs)
    return _detached(out)


def _canonical(name: str) -> str:
    """Parameter name without wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``)."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


# --------------------------------------------------------------------------------------------
# TR-DPO sync
# --------------------------------------------------------------------------------------------


@dataclass
class EMAReferenceSync:
    """TR-DPO: every ``sync_steps`` optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``.

    alpha: ``ref_model_mixup_alpha`` in (0, 1]: how much of the current policy to mix in.
    sync_steps: ``ref_model_sync_steps`` >= 1.
    """

    alpha: float = 0.6
    sync_steps: int = 512

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha={self.alpha} must be in (0, 1]")
        if self.sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps={self.sync_steps} must be >= 1")

    def due(self, step: int) -> bool:
        """True after optimizer steps sync_steps, 2*sync_steps, ... (steps count from 1)."""
        return step > 0 and step % self.sync_steps == 0

    @torch.no_grad()
    def mix_(self, ref: Sequence[torch.Tensor], policy: Sequence[torch.Tensor]) -> None:
        """In place: ``ref[i] <- ref[i] + alpha * (policy[i] - ref[i])`` (= alpha*policy + (1-alpha)*ref)."""
        ref = [r.data for r in ref]
        pol = [p.detach().to(device=r.device, dtype=r.dtype) for p, r in zip(policy, ref)]
        torch._foreach_lerp_(ref, pol, self.alpha)

    def mix_models_(self, ref_model: nn.Module, policy: nn.Module) -> None:
        """Mix a separate reference model toward the policy, parameter by parameter (matched by name)."""
        ref_params = {_canonical(n): p for n, p in ref_model.named_parameters()}
        pol_params = {_canonical(n): p for n, p in policy.named_parameters()}
        if ref_params.keys() != pol_params.keys():
            diff = sorted(ref_params.keys() ^ pol_params.keys())
            raise ValueError(
                f"TR-DPO sync: reference and policy parameters differ ({diff[:3]} ...); the reference must be "
                "a copy of the policy's architecture (with LoRA, let preftune build the 'ref' adapter)"
            )
        for name, r in ref_params.items():
            if r.shape != pol_params[name].shape:
                raise ValueError(f"TR-DPO sync: {name} has shape {tuple(r.shape)} in the reference, "
                                 f"{tuple(pol_params[name].shape)} in the policy")  # fmt: skip
        names = sorted(ref_params)
        self.mix_([ref_params[n] for n in names], [pol_params[n] for n in names])


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

    def on_optimizer_step(self, step: int, policy: nn.Module) -> None:
        """Called after optimizer step ``step`` (1-based); TR-DPO syncs here. No-op by default."""


class _ModelReference(Reference):
    """Any model, used as is (for precomputing from a model the caller still owns)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def logps(self, batch: dict, **logps_kwargs):
        return forward_logps(self.model, batch, **logps_kwargs)


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
    without its per-call model-status walk over every module (and requires_grad toggling), which took
    26 ms of host time per call for a 24-layer model with LoRA on 7 projections on the CPU (the
    reference forward runs every step). The layers are listed once, and again when the model's set of
    adapters changes; other peft methods use ``disable_adapter()``.
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

    def on_optimizer_step(self, step: int, policy: nn.Module) -> None:
        if self.sync.due(step):
            self.sync.mix_(self.ref_params, self.policy_params)


class CachedReference(Reference):
    """Precomputed reference log-probs: a (N, 2) float32 table [chosen, rejected] indexed by the
    batch's ``pair_index``. Lengths come from the batch itself (token counts per response).

    lengths: optional (N, 2) long table of the token counts the logps were computed on; when given,
    each batch's counts must match (a cache of differently truncated data is refused).
    """

    needs_forward = False

    def __init__(self, table: torch.Tensor, lengths: torch.Tensor | None = None):
        if table.ndim != 2 or table.shape[1] != 2:
            raise ValueError(f"reference table must have shape (N, 2), got {tuple(table.shape)}")
        self.table = table.float().cpu()
        self.lengths = None if lengths is None else lengths.long().cpu()

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
        if self.lengths is not None and not torch.equal(
            self.lengths[index], torch.stack([counts[:b], counts[b:]], 1)
        ):
            raise ValueError(
                "completion lengths differ from those the cached reference was computed on; recompute it"
            )
        device = batch["segments"].device
        return ResponseLogps(
            chosen_logps=rows[:, 0].to(device), rejected_logps=rows[:, 1].to(device),
            chosen_lengths=counts[:b].to(device), rejected_lengths=counts[b:].to(device),
            chosen_nll=torch.full((b,), float("nan"), device=device),  # unknown without a forward
        )  # fmt: skip


def make_reference(*, loss_needs_reference: bool, policy: nn.Module, ref_model: nn.Module | None = None,
                   precomputed: torch.Tensor | None = None,
                   sync: EMAReferenceSync | None = None) -> Reference | None:  # fmt: skip
    """Pick the reference source.

    None when the loss is reference-free (nothing is built); a precomputed table -> CachedReference;
    a PEFT policy without ref_model -> adapters disabled (or the "ref" adapter under TR-DPO);
    otherwise the frozen ``ref_model`` (the trainer loads it from the policy's path when not given).
    """
    if not loss_needs_reference:
        return None
    is_peft = hasattr(policy, "disable_adapter") and hasattr(policy, "peft_config")
    if precomputed is not None:
        if sync is not None:
            raise ValueError("sync_ref_model (TR-DPO) needs a live reference; drop precompute_ref_log_probs")
        return CachedReference(precomputed)
    if ref_model is None:
        if not is_peft:
            raise ValueError(
                "this loss needs a reference: pass ref_model (or use LoRA, whose base model serves)"
            )
        return RefAdapterReference(policy, sync) if sync is not None else AdapterDisabledReference(policy)
    return FrozenModelReference(ref_model, sync=sync)


def reference_deepspeed_config(train_config: dict, *, micro_batch: int, accumulation: int, world_size: int,
                               mixed_precision: str) -> dict:  # fmt: skip
    """The DeepSpeed config for a frozen reference engine, from the policy's config (not modified).

    ZeRO-3 stays ZeRO-3 (the reference is sharded like the policy); any other stage becomes stage 0
    (a frozen model has no gradients or optimizer state to shard). The optimizer and scheduler are
    dropped, "auto" batch sizes become numbers and "auto" ZeRO knobs are left to DeepSpeed.
    """
    import copy

    cfg = copy.deepcopy(train_config)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    zero = dict(cfg.get("zero_optimization") or {})
    if int(zero.get("stage", 0)) != 3:
        zero = {"stage": 0}
    zero = {k: v for k, v in zero.items() if v != "auto"}
    zero.pop("offload_optimizer", None)
    cfg["zero_optimization"] = zero
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch * accumulation * world_size
    for name in ("bf16", "fp16"):
        cfg[name] = {"enabled": mixed_precision == name}
    if cfg.get("gradient_clipping") == "auto":
        cfg.pop("gradient_clipping")
    return cfg


def prepare_reference_model(model: nn.Module, accelerator, *, micro_batch: int = 1, accumulation: int = 1) -> nn.Module:
    """Freeze a reference model (eval mode, no grads, dropout off) and place it like the policy.

    Under FSDP2 it is sharded with ``fully_shard`` by the same plugin settings as the policy, under
    FSDP1 wrapped in FSDP, under DeepSpeed ZeRO-3 wrapped in an inference engine whose parameters
    are partitioned (:func:`reference_deepspeed_config`); under DDP or one process it is moved to
    the device, unwrapped (nothing to synchronize). No optimizer ever sees it.
    """
    from accelerate.utils import DistributedType

    model.eval()
    model.requires_grad_(False)
    disable_dropout(model)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        import deepspeed

        cfg = reference_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, micro_batch=micro_batch,
                                         accumulation=accumulation, world_size=accelerator.num_processes,
                                         mixed_precision=str(accelerator.mixed_precision))  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    if kind == DistributedType.FSDP:
        return accelerator.prepare_model(model).eval()  # FSDP1 shards only outside evaluation_mode
    return accelerator.prepare_model(model, evaluation_mode=True).eval()


def sharded_parameters(accelerator) -> bool:
    """True when parameters are split across processes (FSDP, DeepSpeed ZeRO-3): an elementwise mix of
    two models' parameters then works only if both are sharded identically."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}
        return int(zero.get("stage", 0)) == 3
    return False


# --------------------------------------------------------------------------------------------
# Precompute and the disk cache
# --------------------------------------------------------------------------------------------


def precompute_reference_logps(ref_model_or_reference: nn.Module | Reference, features: Sequence[dict], *,
                               batch_size: int, pad_token_id: int, layout: str = "padded",
                               progress: bool = True, rank: int = 0, world_size: int = 1,
                               pad_to_multiple_of: int | None = None, device: torch.device | None = None,
                               **logps_kwargs) -> torch.Tensor:  # fmt: skip
    """One inference pass over tokenized pairs -> (N, 2) float32 table [chosen, rejected].

    Row ``features[i]["index"]`` holds pair i; N = max index + 1 (rows of absent indices are NaN).
    Pairs are batched longest-first so batches carry little padding; the order does not change
    any value. Afterwards the reference model can be freed. logps_kwargs go to ``model_logps``.

    rank/world_size: compute only batches j with ``j % world_size == rank`` (the other rows stay
    NaN). The batches are cut from the one global longest-first order, so every batch holds the
    same pairs as in a single-process pass and gives the same numbers. Every rank runs the same
    number of forwards (a rank one batch short repeats its first one and discards it), as sharded
    models (FSDP, ZeRO-3) need: each forward is a collective there.
    """
    from tqdm.auto import tqdm

    from preftune.data.batching import collate

    ref = ref_model_or_reference
    ref = ref if isinstance(ref, Reference) else _ModelReference(ref)
    if not ref.needs_forward:
        raise TypeError("precompute_reference_logps needs a model or a live reference, not a cached one")
    indices = [int(f["index"]) for f in features]
    if len(set(indices)) != len(indices):
        raise ValueError(
            "tokenized pairs have duplicate 'index' fields; the reference table needs unique rows"
        )
    table = torch.full((max(indices, default=-1) + 1, 2), float("nan"))
    order = sorted(range(len(features)), key=lambda i: -sum(len(features[i][k]) for k in
                                                             ("prompt_ids", "chosen_ids", "rejected_ids")))  # fmt: skip
    starts = list(range(0, len(order), batch_size))
    mine = starts[rank::world_size]
    rounds = -(-len(starts) // world_size)  # the same for every rank
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pair ids, (n, 2) log-probs) per batch
    with tqdm(total=len(order), desc="reference log-probs", disable=not progress) as bar:
        for j in range(rounds):
            pad = j >= len(mine)  # a filler forward, to keep collectives in step
            start = mine[j] if not pad else starts[0]
            chunk = [features[i] for i in order[start : start + batch_size]]
            batch = collate(chunk, layout=layout, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                            device=device)
            out = ref.logps(batch, **logps_kwargs)
            if pad:
                continue
            # kept where they were computed and copied once at the end: no host sync per batch, so
            # the next batch is collated while the accelerator still runs this one
            done.append((batch["pair_index"], torch.stack([out.chosen_logps, out.rejected_logps], 1).float()))
            bar.update(len(chunk) * world_size)
    if done:
        table[torch.cat([i for i, _ in done])] = torch.cat([r for _, r in done]).cpu()  # pair ids are on the host
    return table


def merge_shard_tables(table: torch.Tensor, reduce_sum) -> torch.Tensor:
    """Combine per-rank (N, 2) tables that are NaN outside each rank's rows into the full table.

    reduce_sum(t) must return the element-wise sum of t over ranks (``accelerator.reduce``). Each row
    is computed by exactly one rank, so its sum is that rank's value plus zeros: exact. Rows no rank
    computed (or whose value is NaN) stay NaN.
    """
    have = (~torch.isnan(table)).to(torch.float32)
    total = reduce_sum(torch.cat([table.nan_to_num(0.0), have], 1))  # (N, 4): one collective
    merged, count = total[:, :2].cpu(), total[:, 2:].cpu()
    return torch.where(count > 0, merged, torch.full_like(merged, float("nan")))


def _sha256_file_meta(path: Path) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir())
            if p.suffix in {".safetensors", ".bin", ".gguf", ".pt", ".json"}]  # fmt: skip


def model_fingerprint(model_or_path: nn.Module | str | os.PathLike, revision: str | None = None) -> str:
    """Identity of a checkpoint: for a local directory the weight/config files' names, sizes and
    mtimes (cheap; changes whenever the weights are rewritten); for a hub id, ``id@revision``; for
    a model in memory, :func:`weights_fingerprint` (exact)."""
    if isinstance(model_or_path, nn.Module):
        return "weights:" + weights_fingerprint(model_or_path)
    path = Path(model_or_path)
    if path.is_dir():
        meta = json.dumps(_sha256_file_meta(path.resolve()) + [str(path.resolve())])
        return "dir:" + hashlib.sha256(meta.encode()).hexdigest()
    return f"hub:{model_or_path}@{revision or 'main'}"


def weights_fingerprint(model: nn.Module, *, chunk_bytes: int = 64 << 20) -> str:
    """128-bit xxh3 over every state-dict tensor's name, dtype, shape and bytes: any changed weight
    changes it. A tensor that shares its storage with an earlier one (tied embeddings) is named,
    not hashed twice. xxh3 runs at ~20 GB/s here against sha256's ~1.7: sha256 took ~2 s of each
    run's start for a 0.5B bfloat16 model (benchmarks/vs_trl.py on an H200). Accelerator tensors
    reach the hash through two pinned host buffers of ``chunk_bytes``, one filling while the other is
    hashed (the plain ``.cpu()`` of each tensor took ~0.5 s of the same start); the bytes and so the
    digest are the same either way."""
    import xxhash

    h = xxhash.xxh3_128()
    seen: dict[tuple, str] = {}
    staging: list[torch.Tensor] = []
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        plain = type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta"
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if plain else None
        if key is not None and key in seen:
            h.update(f"=:{seen[key]}".encode())
            continue
        if key is not None:
            seen[key] = name
        if plain and t.device.type != "cpu" and t.numel():
            _hash_staged(h, t, staging, chunk_bytes)
        else:
            t = t.detach().cpu().contiguous()
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _hash_staged(h, t: torch.Tensor, staging: list, chunk_bytes: int) -> None:
    """h.update(bytes of t) for an accelerator tensor: chunk i+1 is copied to the host (asynchronously,
    into a pinned buffer) while chunk i is hashed."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if not staging:
        pin = t.device.type == "cuda"
        staging.extend(torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2))
    starts = list(range(0, flat.numel(), chunk_bytes))
    pending = None  # (host view, event) of the chunk copied but not hashed yet
    for i, start in enumerate(starts):
        part = flat[start : start + chunk_bytes]
        host = staging[i % 2][: part.numel()]
        host.copy_(part, non_blocking=True)
        event = torch.Event(t.device) if t.device.type == "cuda" else None
        if event is not None:
            event.record()
        if pending is not None:
            _hash_done(h, *pending)
        pending = (host, event)
    _hash_done(h, *pending)


def _hash_done(h, host: torch.Tensor, event) -> None:
    if event is not None:
        event.synchronize()
    h.update(host.numpy())


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizers) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((body + special).encode()).hexdigest()


def reference_cache_key(*, model_id: str, model_fingerprint: str, tokenizer_fingerprint: str,
                        data_fingerprint: str, max_length: int | None, max_prompt_length: int | None,
                        max_completion_length: int | None, truncation_mode: str, chat_template: str | None,
                        extra: dict | None = None) -> str:  # fmt: skip
    """sha256 over everything that changes the reference numbers (plus the cache format version)."""
    fields = dict(format=CACHE_FORMAT, model_id=model_id, model_fingerprint=model_fingerprint,
                  tokenizer_fingerprint=tokenizer_fingerprint, data_fingerprint=data_fingerprint,
                  max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length, truncation_mode=truncation_mode,
                  chat_template=chat_template, extra=extra or {})  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _resolved(parts: dict) -> dict:
    return {k: v.result() if isinstance(v, Future) else v for k, v in parts.items()}


def _holds_tables(folder: Path) -> bool:
    """Whether ``folder`` holds any cached table (a ``.safetensors`` file)."""
    try:
        return any(name.endswith(".safetensors") for name in os.listdir(folder))
    except OSError:  # missing (nothing cached yet) or unreadable (then no reuse either)
        return False


def fingerprint_beside(model: nn.Module) -> Future:
    """``model_fingerprint(model)`` in a background thread, its device copies on a stream of their own
    (so they overlap the reference pass's kernels instead of queueing behind them). The weights must
    not change until the result is taken; ``cached_precompute`` takes it before it returns."""
    from concurrent.futures import ThreadPoolExecutor

    p = next(model.parameters(), None)
    stream = None
    if p is not None and p.device.type == "cuda":
        stream = torch.cuda.Stream(p.device)
        stream.wait_stream(torch.cuda.current_stream(p.device))  # weights written by work queued so far

    def run() -> str:
        if stream is None:
            return model_fingerprint(model)
        torch.cuda.set_device(p.device)
        with torch.cuda.stream(stream):
            return model_fingerprint(model)

    pool = ThreadPoolExecutor(1, thread_name_prefix="preftune-fingerprint")
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)


def default_reference_cache_path(key: str) -> Path:
    """``<cache_root()>/reference/<key[:32]>.safetensors``."""
    return cache_root() / "reference" / f"{key[:32]}.safetensors"


def _checksum(table: torch.Tensor) -> str:
    return hashlib.sha256(table.contiguous().numpy().tobytes()).hexdigest()


def save_reference_cache(path: str | os.PathLike, table: torch.Tensor, key: str) -> Path:
    """Write the table as safetensors with metadata {key, checksum, format}, atomically:
    temp file in the same directory, fsync, ``os.replace``. Readers never see a partial file."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.detach().float().cpu().contiguous()
    data = save({"logps": table}, metadata={"key": key, "checksum": _checksum(table), "format": CACHE_FORMAT})
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_reference_cache(path: str | os.PathLike, key: str) -> torch.Tensor | None:
    """The cached (N, 2) table if ``path`` holds one for ``key``; else None (never a wrong table).

    Missing file -> None. Another key or format -> None, logged ("recomputing"). Unreadable file
    or checksum mismatch -> None with a warning.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("logps")
    except Exception as e:  # a truncated or corrupted file: safetensors raises various types
        logger.warning("reference cache %s is unreadable (%s); recomputing", path, e)
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        logger.info("reference cache %s was computed for other settings (key differs); recomputing", path)
        return None
    if (
        table.dtype != torch.float32
        or table.ndim != 2
        or table.shape[1] != 2
        or _checksum(table) != meta.get("checksum")
    ):
        logger.warning("reference cache %s fails its checksum (corrupted?); recomputing", path)
        return None
    return table


def cached_precompute(ref_model_or_reference: nn.Module | Reference, features: Sequence[dict], *,
                      path: str | os.PathLike | None = None, key: str | None = None,
                      cache_dir: str | os.PathLike | None = None, key_parts: dict | None = None,
                      batch_size: int, pad_token_id: int, layout: str = "padded", progress: bool = True,
                      accelerator=None, pad_to_multiple_of: int | None = None,
                      **logps_kwargs) -> torch.Tensor:  # fmt: skip
    """Load the reference table from disk when it is valid for the key, else compute and save it.

    The key is ``key`` or ``reference_cache_key(**key_parts)``; the file is ``path`` or
    ``<cache_dir>/<key[:32]>.safetensors`` (default :func:`default_reference_cache_path`). With an
    accelerate ``accelerator`` over several processes, every rank decides together (a cache any rank
    cannot read is recomputed by all), each rank computes its share of the batches, one collective
    merges the shares, and the main process alone writes the one file. A key part may be a
    ``Future`` (``fingerprint_beside``): where the folder holds no table at all, it is waited for only
    after the pass, to name the file.
    """
    def file_for(k: str) -> Path:
        return Path(cache_dir) / f"{k[:32]}.safetensors" if cache_dir else default_reference_cache_path(k)

    if key is None:
        if key_parts is None:
            raise ValueError("cached_precompute needs key or key_parts")
        if path is not None or not any(isinstance(v, Future) for v in key_parts.values()) \
                or _holds_tables(file_for("").parent):
            key = reference_cache_key(**_resolved(key_parts))
        # else: no file there can match any key, so a part still being computed (the weights' hash,
        # beside this pass) is waited for only to name the file written at the end
    if path is None and key is not None:
        path = file_for(key)
    needed = max((int(f["index"]) for f in features), default=-1) + 1
    world = accelerator.num_processes if accelerator is not None else 1
    table = load_reference_cache(path, key) if key is not None else None
    valid = table is not None and table.shape[0] >= needed
    if world > 1:  # all ranks or none reuse the file (another node may not see it)
        flag = torch.tensor([float(valid)], device=accelerator.device)
        valid = bool(accelerator.reduce(flag, reduction="sum").item() == world)
    if valid:
        logger.info("reusing reference log-probs from %s", path)
        return table
    rank = accelerator.process_index if accelerator is not None else 0
    table = precompute_reference_logps(ref_model_or_reference, features, batch_size=batch_size,
                                       pad_token_id=pad_token_id, layout=layout, rank=rank, world_size=world,
                                       pad_to_multiple_of=pad_to_multiple_of,
                                       device=accelerator.device if accelerator is not None else None,
                                       progress=progress and (accelerator is None or accelerator.is_main_process),
                                       **{k: v for k, v in logps_kwargs.items() if v is not None})  # fmt: skip
    if world > 1:
        table = merge_shard_tables(table.to(accelerator.device), lambda t: accelerator.reduce(t, reduction="sum"))
    if key is None:
        key = reference_cache_key(**_resolved(key_parts))
        path = file_for(key)
    if accelerator is None or accelerator.is_main_process:
        save_reference_cache(path, table, key)
        logger.info("saved reference log-probs to %s", path)
    if world > 1:
        accelerator.wait_for_everyone()
    return table
