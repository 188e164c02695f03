"""Where reference log-probs come from: one interface, four sources, one choice.

- ``sources``: the :class:`Reference` interface and its sources: :class:`FrozenModelReference` (a
  separate frozen model), :class:`AdapterDisabledReference` (the LoRA policy with its adapters off:
  reference = base model, no second copy), :class:`RefAdapterReference` (TR-DPO's "ref" adapter),
  :class:`CachedReference` (a precomputed table); :func:`eval_mode` and :func:`forward_logps`, the
  forward without autograd they share; :func:`choose_source`, which of them a run uses, and
  :func:`make_reference`, which builds the live ones.
- ``sync``: TR-DPO (:class:`EMAReferenceSync`): the reference tracks the policy every ``sync_steps``
  optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``.
- ``placement``: a frozen reference model placed like the policy (FSDP, DeepSpeed ZeRO-3, DDP).
- ``cache``: the log-probs computed once before training (:func:`precompute_reference_logps`), kept on
  disk under a key that hashes everything that changes the numbers (:func:`reference_cache_key`).

Every source returns a ``preftune.logps.ResponseLogps`` computed without autograd. A reference is
needed only by losses that use it.
"""

from preftune.reference.cache import (
    CACHE_FORMAT,
    cached_precompute,
    default_reference_cache_path,
    fingerprint_beside,
    load_reference_cache,
    merge_shard_tables,
    model_fingerprint,
    precompute_reference_logps,
    reference_cache_key,
    save_reference_cache,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from preftune.reference.placement import (
    plain_data_parallel,
    prepare_reference_model,
    reference_deepspeed_config,
    sharded_parameters,
)
from preftune.reference.sources import (
    SOURCES,
    AdapterDisabledReference,
    CachedReference,
    FrozenModelReference,
    RefAdapterReference,
    Reference,
    choose_source,
    eval_mode,
    forward_logps,
    forward_token_logps,
    make_reference,
)
from preftune.reference.sync import EMAReferenceSync

__all__ = [
    "CACHE_FORMAT",
    "SOURCES",
    "AdapterDisabledReference",
    "CachedReference",
    "EMAReferenceSync",
    "FrozenModelReference",
    "RefAdapterReference",
    "Reference",
    "cached_precompute",
    "choose_source",
    "default_reference_cache_path",
    "eval_mode",
    "fingerprint_beside",
    "forward_logps",
    "forward_token_logps",
    "load_reference_cache",
    "make_reference",
    "merge_shard_tables",
    "model_fingerprint",
    "plain_data_parallel",
    "precompute_reference_logps",
    "prepare_reference_model",
    "reference_cache_key",
    "reference_deepspeed_config",
    "save_reference_cache",
    "sharded_parameters",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]
