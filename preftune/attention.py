"""Attention of the ``prefix_packed`` layout: variable-length causal sequences instead of a mask.

A ``prefix_packed`` batch (``preftune.data.batching``) is one row of prompts end to end, each
followed by its responses (``prompt + chosen + rejected`` for a pair, ``prompt + completion 0 + ... +
completion G-1`` for a GRPO group), with a `VarlenPrefix` that cuts it into sequences: ``prompt +
response 0`` attending causally to itself, and each later response attending to its prompt's keys
and then its own, causally aligned at the end. On a GPU that is one call of flash attention's
variable-length kernel (``torch.nn.attention.varlen.varlen_attn``): no padding, no (T, T) mask, no
attention over the blocks a mask would hide, and no per-shape plan (cuDNN's masked attention builds
one for every new row length). ``per_sequence`` is the slow, obvious twin (one SDPA call per
sequence with an explicit mask): it runs on CPU, in float32 and wherever the kernel is missing, and
the tests hold the two to each other and to the masked ``prefix`` layout.

``model_logps`` runs a model's forward with it by switching ``config._attn_implementation`` to
`NAME` (registered with transformers' ``AttentionInterface``) for that forward and passing the
`VarlenPrefix` as the keyword `KWARG`, which transformers hands to every attention call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "preftune_varlen_prefix"
KWARG = "preftune_varlen"


@functools.cache
def _flash_varlen():
    """(torch's varlen_attn, its parameter names), or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_usable(q: torch.Tensor) -> bool:
    """Whether ``varlen_prefix_attention`` runs flash's kernel for these queries (CUDA, half precision)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None


def varlen_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, scale: float | None = None):
    """q (N, Hq, D), k and v (N, Hkv, D): the row's queries, keys and values in row order. Returns
    (N, Hq, D). Flash's kernel gets each sequence's keys gathered by ``meta.k_index``."""
    if not flash_usable(q):
        return per_sequence(q, k, v, meta, scale)
    fn, params = _flash_varlen()
    k, v = k.index_select(0, meta.k_index), v.index_select(0, meta.k_index)
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}  # (-1, 0): causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # torch 2.11's kernel takes no grouped K/V heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return fn(q.contiguous(), k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, scale=scale, **kw)


def per_sequence(q, k, v, meta, scale: float | None = None) -> torch.Tensor:
    """``varlen_prefix_attention`` as one SDPA call per sequence with an explicit mask, on views of the row
    (no gathered copy of the prompt's keys kept for backward): ``prompt + response 0`` causal over itself;
    each later response over its prompt's whole span up to its own end, the other responses' keys masked
    out, its prompt keys visible and its own causal."""
    outs = []
    for (a, b, k0), keep in zip(_spans(meta), _masks(meta, q.device)):
        outs.append(_sdpa(q[a:b], k[k0:b], v[k0:b], keep, scale))
    return torch.cat(outs)


def _spans(meta) -> list[tuple[int, int, int]]:
    """Per query sequence, (start, end, key start) in row offsets: the keys a view ``k[key start:end]``
    holds. A sequence whose keys are its queries starts its prompt's span (key start = its start); a later
    one's key start is that span's start (its prompt)."""
    cu_q, cu_k, out, k0 = meta.cu_q_host, meta.cu_k_host, [], 0
    for i in range(len(cu_q) - 1):
        a, b = cu_q[i], cu_q[i + 1]
        if cu_k[i + 1] - cu_k[i] == b - a:
            k0 = a
        out.append((a, b, k0))
    return out


def _masks(meta, device) -> list[torch.Tensor]:
    """Per sequence, ``per_sequence``'s mask over its view of the keys, made once per batch (every layer
    uses the same)."""
    key = ("per_sequence_masks", str(device))
    if key not in meta.scratch:
        masks, cu_k = [], meta.cu_k_host
        for i, (a, b, k0) in enumerate(_spans(meta)):
            n = b - a
            keep = torch.zeros(n, b - k0, dtype=torch.bool, device=device)
            keep[:, : cu_k[i + 1] - cu_k[i] - n] = True  # the prompt's keys (none for the first sequence)
            keep[:, a - k0 :] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            masks.append(keep)
        meta.scratch[key] = masks
    return meta.scratch[key]


def _sdpa(q, k, v, keep, scale):
    """(L, H, D) views -> (Lq, Hq, D). 4-D inputs: SDPA's CPU kernel takes them with a mask (3-D ones
    fall back to the math path, which keeps the (heads, Lq, Lk) weights for backward)."""
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _transformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query (1, Hq, N, D), key/value (1, Hkv, N, D) after
    the rotary embedding; returns ((1, N, Hq, D), None)."""
    meta = kwargs.get(KWARG)
    _calls[0] += meta is not None
    if meta is None:  # a forward without a prefix_packed batch under the switch: plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # fmt: skip
    if dropout:
        raise ValueError(f"batch_layout='prefix_packed' runs attention without dropout, and this model has "
                         f"attention dropout {dropout} in training; set config.attention_dropout = 0 or use "
                         "batch_layout='prefix'")  # fmt: skip
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or (window is not None and window < meta.max_k):
        raise NotImplementedError("batch_layout='prefix_packed' does not apply attention soft-capping or a sliding "
                                  "window shorter than the sequences; use batch_layout='prefix'")  # fmt: skip
    if query.shape[0] != 1:
        raise ValueError(f"a prefix_packed batch is one row, got {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return varlen_prefix_attention(q, k, v, meta, scaling)[None], None


_calls = [0]  # attention calls that took a VarlenPrefix: prefix_packed_forward checks every layer made one


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _transformers_attention)


def _checkpointing(model) -> bool:
    """Whether gradient checkpointing is on. transformers' property walks every module (more with LoRA's
    modules; docs/benchmarks.md, host overhead) and model_logps asks on every forward: a decoder's
    layer list is read instead where it carries the flag transformers sets on each layer."""
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "gradient_checkpointing"):
        return any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2 (the old name warns)
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def prefix_packed_forward(model):
    """Context for one forward of the transformers model ``model`` over a ``prefix_packed`` batch:
    its attention runs ``varlen_prefix_attention``. Refuses gradient checkpointing, whose recompute
    in backward would run outside this context with the model's own attention."""
    if _checkpointing(model):
        raise ValueError("batch_layout='prefix_packed' does not work with gradient checkpointing (the recompute "
                         "in backward would not see the variable-length attention); use batch_layout='prefix'")
    _register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    calls = _calls[0]
    try:
        yield
    finally:
        config._attn_implementation = before
    layers = getattr(config, "num_hidden_layers", None)
    made = _calls[0] - calls
    if made == 0 or (layers is not None and made != layers):
        raise NotImplementedError(
            f"batch_layout='prefix_packed': {made} of this model's {layers if layers is not None else '?'} layers ran "
            "their attention through transformers' attention interface, which the variable-length attention "
            "needs (the others would attend across the packed prompts); use batch_layout='prefix'")
