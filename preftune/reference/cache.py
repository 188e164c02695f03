"""Reference log-probs computed once before training, and kept on disk.

:func:`precompute_reference_logps` runs one inference pass over the tokenized pairs into an (N, 2)
table; :func:`cached_precompute` keeps it under a key that hashes everything that changes the numbers
(:func:`reference_cache_key`: the weights' and tokenizer's fingerprints, the data, the truncation):
a mismatch recomputes, never reuses. ``CachedReference`` serves the table during training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from preftune.models import cache_root
from preftune.reference.sources import Reference, _ModelReference

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"


# --------------------------------------------------------------------------------------------
# The pass
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


# --------------------------------------------------------------------------------------------
# Fingerprints: what the cache key hashes
# --------------------------------------------------------------------------------------------


def _hash_done(h, host: torch.Tensor, event) -> None:
    if event is not None:
        event.synchronize()
    h.update(host.numpy())


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


def weights_fingerprint(model: nn.Module, *, chunk_bytes: int = 64 << 20) -> str:
    """128-bit xxh3 over every state-dict tensor's name, dtype, shape and bytes: any changed weight
    changes it. A tensor that shares its storage with an earlier one (tied embeddings) is named,
    not hashed twice. It runs at every run's start, hence xxh3 rather than sha256, and accelerator
    tensors reach the hash through two pinned host buffers of ``chunk_bytes``, one filling while the
    other is hashed (docs/benchmarks.md, the H200 per-phase timing's "weights fingerprint"); the
    bytes and so the digest are the same either way."""
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


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizers) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((body + special).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------


def reference_cache_key(*, model_id: str, model_fingerprint: str, tokenizer_fingerprint: str,
                        data_fingerprint: str, max_length: int | None, max_prompt_length: int | None,
                        max_completion_length: int | None, truncation_mode: str, chat_template: str | None,
                        extra: dict | None = None, ld_alpha: float | None = None) -> str:  # fmt: skip
    """sha256 over everything that changes the reference numbers (plus the cache format version).
    ld_alpha (LD-DPO: the table holds the weighted sums) enters the key only when set, so a table of
    plain sums keeps its key."""
    fields = dict(format=CACHE_FORMAT, model_id=model_id, model_fingerprint=model_fingerprint,
                  tokenizer_fingerprint=tokenizer_fingerprint, data_fingerprint=data_fingerprint,
                  max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length, truncation_mode=truncation_mode,
                  chat_template=chat_template, extra=extra or {})  # fmt: skip
    if ld_alpha is not None:
        fields["ld_alpha"] = float(ld_alpha)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _resolved(parts: dict) -> dict:
    return {k: v.result() if isinstance(v, Future) else v for k, v in parts.items()}


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def default_reference_cache_path(key: str) -> Path:
    """``<cache_root()>/reference/<key[:32]>.safetensors``."""
    return cache_root() / "reference" / f"{key[:32]}.safetensors"


def _holds_tables(folder: Path) -> bool:
    """Whether ``folder`` holds any cached table (a ``.safetensors`` file)."""
    try:
        return any(name.endswith(".safetensors") for name in os.listdir(folder))
    except OSError:  # missing (nothing cached yet) or unreadable (then no reuse either)
        return False


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
