"""Completion-token log-probs (eq 6.3, 6.7, 6.8): completion-only, chunked output head.

``model_token_logps`` runs the decoder once over a batch from ``preftune.data.batching.collate``
(pairs) or ``collate_groups`` (GRPO groups), gathers the K hidden states whose next token is a
completion token (``batch["positions"]``) and applies the output head to them ``chunk_size`` rows
at a time (logits upcast to float32 before the log-softmax; the decoder is reached through the
outer model, see ``_final_hidden``, so PEFT, DDP and autocast wrappers apply). It returns the K
per-token log-probs (``TokenLogps``, optionally with each token's entropy and log sum_v p_v^2);
``model_logps`` is their sum per response, ``model_pair_logps`` adds LD-DPO's weighted sums and
WPO's weights. Neither the forward nor the backward holds a (tokens, vocab) tensor: the head is a
custom autograd function that keeps only its inputs and recomputes one chunk's logits at a time in
backward.
Prompt and padding positions never reach the head, so they get no gradient (section 6.5.6).

``logps_from_logits`` is the plain twin over full logits; the tests hold the fast path to it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preftune import attention, fused, kernels
from preftune.data.batching import IGNORE_INDEX
from preftune.losses import ld_dpo_logps, wpo_weights


@dataclass
class ResponseLogps:
    """Per-pair results of ``model_logps`` / ``model_pair_logps``; all (B,), float32 except the long
    lengths. The last three are set only when ``model_pair_logps`` is asked for them."""

    chosen_logps: torch.Tensor  # summed (or mean, with average=True) log pi(y_w | x), eq 6.7
    rejected_logps: torch.Tensor  # same for y_l, eq 6.8
    chosen_lengths: torch.Tensor  # completion tokens of y_w
    rejected_lengths: torch.Tensor  # completion tokens of y_l
    chosen_nll: torch.Tensor  # -sum log pi(y_w | x) / |y_w|: mean per-token NLL (rpo)
    ld_chosen_logps: torch.Tensor | None = None  # LD-DPO's weighted log pi(y_w | x) (ld_alpha), differentiable
    ld_rejected_logps: torch.Tensor | None = None  # same for y_l
    wpo_weights: torch.Tensor | None = None  # WPO's pair weights (use_weighting), detached
    aux_loss: torch.Tensor | None = None  # () the MoE router's load-balancing loss of the forward, differentiable


@dataclass
class TokenLogps:
    """Per-token values of the K completion tokens of a batch, flat in the batch's order (``collate``'s or
    ``collate_groups``' ``positions``/``targets``), from ``model_token_logps``.

    ``segments[k]`` is the response token k belongs to: for pairs chosen of pair i -> i, rejected -> B + i
    (R = 2B responses), for GRPO groups the completions in order (R = ``batch["num_responses"]``). A
    response's tokens appear in sequence order (not always next to each other's responses: the prefix
    layouts interleave a pair's chosen and rejected pair by pair). ``lengths`` (R,) counts each
    response's tokens (0 for an empty completion). ``logps`` carries gradients; ``entropies``
    (-sum_v p_v log p_v) and ``log_sum_sq_probs`` (log sum_v p_v^2) are detached, None unless asked for. ``aux_loss``: the
    forward's mixture-of-experts load-balancing loss as the model computes it (``model_token_logps``'
    ``router_aux_loss``), with its graph; None unless asked for.
    """

    logps: torch.Tensor  # (K,) float32, log p(token), differentiable
    segments: torch.Tensor  # (K,) long, the response of each token
    lengths: torch.Tensor  # (R,) long, completion tokens per response
    entropies: torch.Tensor | None = None  # (K,) float32, detached
    log_sum_sq_probs: torch.Tensor | None = None  # (K,) float32, detached
    aux_loss: torch.Tensor | None = None  # () the MoE router's load-balancing loss (router_aux_loss=True)

    def sums(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) float32 per-response sums of ``values`` (K,) (default: ``logps``)."""
        values = self.logps if values is None else values
        return torch.zeros(self.lengths.numel(), dtype=values.dtype, device=values.device).index_add(
            0, self.segments, values)

    def ranks(self) -> torch.Tensor:
        """(K,) long: each token's 0-based index inside its response."""
        order = torch.argsort(self.segments, stable=True)  # response by response, each in sequence order
        starts = self.lengths.cumsum(0) - self.lengths  # (R,) where each response begins in that order
        rank = torch.empty_like(self.segments)
        rank[order] = torch.arange(order.numel(), device=order.device) - starts[self.segments[order]]
        return rank

    def padded(self, values: torch.Tensor | None = None, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, T_max) per-response rows of ``values`` (K,) (default: ``logps``; gradients flow) left-aligned
        and ``fill`` after each response's end, with the (R, T_max) bool mask of real tokens."""
        values = self.logps if values is None else values
        R = self.lengths.numel()
        T = int(self.lengths.max()) if R else 0
        index = (self.segments, self.ranks())
        out = values.new_full((R, T), fill).index_put(index, values)
        mask = torch.zeros((R, T), dtype=torch.bool, device=values.device).index_put_(
            index, torch.ones_like(self.segments, dtype=torch.bool))
        return out, mask


def logps_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False):
    """Plain full-logits log-probs, eq 6.3 with the prompt/padding mask of eq 6.7/6.8.

    logits (N, T, V) any float dtype; labels (N, T) unshifted, -100 = not a completion token.
    Position t predicts labels[t + 1]. Returns (logps (N,) float32 sums (means with
    average=True), counts (N,) long).
    """
    labels = labels[:, 1:]  # (N, T-1)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask  # (N, T-1)
    logps, counts = token.sum(-1), mask.sum(-1)
    return (logps / counts.clamp(min=1) if average else logps), counts


def _head_matmul(h, weight, bias):
    """(n, H) -> (n, V) head outputs in the inputs' common dtype (bf16 in bf16 training, float32
    accumulate), exactly like ``lm_head``."""
    dt = torch.promote_types(h.dtype, weight.dtype)
    return F.linear(h.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


def _head_logits(h, weight, bias, scale, softcap):
    """(n, H) -> (n, V) logits upcast to float32, then the config's scaling and soft-capping:
    ``lm_head`` followed by ``.float()``; everything after the matmul is float32."""
    return _transform_(_head_matmul(h, weight, bias).float(), scale, softcap)


def _transform_(z: torch.Tensor, scale, softcap) -> torch.Tensor:
    """z * scale, then softcap * tanh(. / softcap), in z's own memory (no second (n, V) buffer)."""
    if scale is not None:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _logsumexp_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch.logsumexp(z, dim=1), sum(exp(z - max))) with torch's steps (max, subtract, exp, sum, log,
    add back) done in z's own memory, which is left holding exp(z - max): no (n, V) temporary, whose
    first touch cost more than the subtraction (docs/benchmarks.md, the 2-core CPU's changes)."""
    m = z.amax(1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0)  # as torch: rows of -inf give -inf, not nan
    total = z.sub_(m).exp_().sum(1)
    return total.log().add_(m[:, 0]), total


def _softmax_stats(e: torch.Tensor, total: torch.Tensor, entropies: bool, sum_sq: bool):
    """Per-row entropy -sum_v p_v log p_v and log sum_v p_v^2 of p = e / total, from e = exp(z - max)
    (n, V) float32 and total = e.sum(1) as ``_logsumexp_`` leaves them; (n,) float32 each, or None where
    not asked. log sum p^2 = log sum e^2 - 2 log total (a dot product, no (n, V) temporary; e <= 1 with
    max 1, so the sum is >= 1); entropy = log total - sum e log e / total (one (n, V) temporary)."""
    log_total = total.log()
    ent = log_total - torch.special.xlogy(e, e).sum(1) / total if entropies else None
    lss = torch.linalg.vecdot(e, e).log().sub_(2 * log_total) if sum_sq else None
    return ent, lss


class _ChunkedTokenLogps(torch.autograd.Function):
    """token_logps[k] = log softmax(head(h[k]))[targets[k]], chunk by chunk; (K,) float32.

    Saves h (K, H), W (V, H), bias, targets and the per-token log-sum-exp (K,). Backward
    recomputes each chunk's logits and uses d logp / d z = onehot(target) - exp(z - lse), then
    chains through soft-capping (d cap*tanh(u/cap) / du = 1 - tanh^2) and scaling, so it holds
    one (chunk, V) at a time and makes one pass over it (no second log-sum-exp).
    When all K tokens are one chunk, with no soft-capping and ``keep`` (autograd records), forward
    keeps that chunk's softmax for backward instead: the (K, V) buffer is alive at the start of
    backward either way (recomputed there otherwise), so the peak is the same and backward skips the
    (K, H) x (H, V) matmul (measured: docs/benchmarks.md, the 2-core CPU's changes). A second
    backward through the same graph (retain_graph) recomputes: the first one consumed the buffer.
    Under CUDA autocast, backward runs with forward's autocast state (custom_fwd/custom_bwd).
    With ``triton`` (CUDA tensors, ``preftune.kernels.usable``) each chunk's logits stay in the
    matmul's dtype: one kernel reads them once for the log-softmax at the targets (forward), one
    writes d logits over them (backward), and the weight gradient accumulates in float32 inside the
    matmul where torch has that (``_add_weight_grad``); same float32 math, no float32 (chunk, V) copy.
    ``stats`` = (entropies, sum_sq): also return each token's entropy and log sum_v p_v^2 ((K,) float32
    or None, not differentiable; ``_softmax_stats``), from the same chunk of logits in forward (on the
    Triton path from a float32 copy of it: one more (chunk, V) float32 pass, only when asked). Returns
    token_logps alone without stats, else (token_logps, entropies, log_sum_sq).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias, targets, chunk_size, scale, softcap, keep=False, triton=False, tied=None,
                stats=(False, False)):
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        ent, lss = (torch.empty(n, dtype=torch.float32, device=h.device) if on else None for on in stats)
        keep = keep and not triton and n <= chunk_size and softcap is None and any(ctx.needs_input_grad[:3])
        kept = ()
        for s in range(0, n, chunk_size):
            if triton:  # logits in the matmul's dtype, read once by the kernel
                zc = _head_matmul(h[s : s + chunk_size], weight, bias)
                out[s : s + chunk_size], lse[s : s + chunk_size] = kernels.head_logps_forward(
                    zc, targets[s : s + chunk_size], scale, softcap)
                if any(stats):
                    e = _transform_(zc.float(), scale, softcap)
                    _, total = _logsumexp_(e)
                    _store_stats(ent, lss, s, _softmax_stats(e, total, *stats))
                continue
            z = _head_logits(h[s : s + chunk_size], weight, bias, scale, softcap)  # (c, V)
            out[s : s + chunk_size] = z.gather(1, targets[s : s + chunk_size, None])[:, 0]
            lse[s : s + chunk_size], total = _logsumexp_(z)  # z now holds exp(z - max)
            out[s : s + chunk_size] -= lse[s : s + chunk_size]
            if any(stats):
                _store_stats(ent, lss, s, _softmax_stats(z, total, *stats))
            if keep:
                kept = (z.div_(total[:, None]),)  # the softmax
        ctx.save_for_backward(h, weight, bias, targets, lse, *kept)
        ctx.chunk_size, ctx.scale, ctx.softcap, ctx.kept_fresh = chunk_size, scale, softcap, bool(kept)
        ctx.triton, ctx.tied = triton, tied
        if not any(stats):
            return out
        ctx.mark_non_differentiable(*(t for t in (ent, lss) if t is not None))
        return out, ent, lss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, *_stats):  # grad_out (K,) float32; the stats take no gradient
        h, weight, bias, targets, lse, *kept = ctx.saved_tensors
        kept, ctx.kept_fresh = (kept[0] if kept and ctx.kept_fresh else None), False
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dt = torch.promote_types(h.dtype, weight.dtype)
        w = weight.to(dt)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # the first chunk's product allocates it (no zero-fill pass over (V, H))
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for s in range(0, h.shape[0], ctx.chunk_size):
            hc, tc = h[s : s + ctx.chunk_size].to(dt), targets[s : s + ctx.chunk_size, None]  # (c, H), (c, 1)
            if ctx.triton:  # d logits over the recomputed logits, in the matmul's dtype
                dz = kernels.head_logps_backward_(_head_matmul(hc, w, bias), tc[:, 0], lse[s : s + ctx.chunk_size],
                                                  grad_out[s : s + ctx.chunk_size], ctx.scale, ctx.softcap)
                if need_b:
                    grad_b += dz.sum(0, dtype=torch.float32)
            else:
                if kept is not None:  # one chunk, softmax from forward
                    dz, dcap = kept.neg_(), None
                else:
                    z = _head_logits(hc, w, bias, ctx.scale, ctx.softcap)  # (c, V) float32
                    dcap = 1 - (z / ctx.softcap) ** 2 if ctx.softcap is not None else None
                    dz = z.sub_(lse[s : s + ctx.chunk_size, None]).exp_().neg_()  # -softmax, in place
                dz.scatter_add_(1, tc, torch.ones_like(tc, dtype=dz.dtype))  # onehot - softmax
                dz.mul_(grad_out[s : s + ctx.chunk_size, None] * (ctx.scale if ctx.scale is not None else 1.0))
                if dcap is not None:
                    dz.mul_(dcap)
                if need_b:
                    grad_b += dz.sum(0)
                dz = dz.to(dt)
            if need_h:
                grad_h[s : s + ctx.chunk_size] = (dz @ w).to(h.dtype)
            if need_w:
                grad_w = _add_weight_grad(grad_w, dz, hc)
        if need_w and grad_w is None:  # no completion token at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        if ctx.tied is not None:  # the input embedding's rows go into this buffer (_TiedEmbedding)
            ctx.tied.grad = grad_w
        return (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None,
                None, None)


def _store_stats(ent, lss, s, chunk_stats) -> None:
    """Write one chunk's (entropies, log_sum_sq) from row ``s`` into the (K,) outputs that exist."""
    for dst, src in zip((ent, lss), chunk_stats):
        if dst is not None:
            dst[s : s + src.shape[0]] = src


class _TiedSlot:
    """The head's gradient of a weight the input embedding shares, handed from the head's backward to
    the embedding's (which autograd runs later: the embedding's output feeds the head)."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class _TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` for a weight the output head also uses.

    Autograd would give the weight two (V, H) gradients, the head's and a zero-filled one of the
    embedding's rows, and add them at the end of backward: a third (V, H) buffer alive with the
    first, at the step's last moment (108 MiB for SmolLM2-135M in float32). Here the embedding's
    backward adds its rows into the head's gradient (``slot.grad``) in place and returns none of its
    own, so the weight's gradient reaches its AccumulateGrad (and DDP's or optim_in_backward's hooks
    there) once, complete, before any hook sees it. Rows at ``padding_idx`` get nothing, as in
    ``F.embedding``. Without the head's gradient (it did not ask for the weight's) the dense one is
    returned as usual. The sum is the same, in another order: equal to float rounding.
    """

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, slot):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.slot, ctx.shape = padding_idx, slot, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        idx, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((idx == ctx.padding_idx)[:, None], 0)
        target, ctx.slot.grad = ctx.slot.grad, None
        if target is None:
            return None, torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device).index_put_(
                (idx,), rows, accumulate=True), None, None
        target.index_put_((idx,), rows.to(target.dtype), accumulate=True)  # deterministic on CUDA too
        return None, None, None, None


def _zero3_head(head) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """(plain, weight, bias) for a Linear head whose parameters DeepSpeed ZeRO-3 partitions. A frozen head
    (LoRA): a whole copy of its weight gathered for this forward, then the plain chunked path. A head that
    trains: the module path (``_module_token_logps``), where ZeRO-3 gathers the weight inside each call and
    reduces its gradient."""
    params = [p for p in (head.weight, head.bias) if p is not None]
    if any(p.requires_grad for p in params):
        return False, None, None
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        weight = head.weight.detach().clone()
        bias = None if head.bias is None else head.bias.detach().clone()
    return True, weight, bias


def _tied_embedding(base, head) -> torch.nn.Module | None:
    """The input embedding module whose weight is ``head``'s, where ``_TiedEmbedding`` can stand in for
    its forward: a plain ``nn.Embedding`` (no max_norm, frequency scaling or sparse gradient, no
    forward patched by someone else, e.g. accelerate's offload hooks) of a plain tensor weight that
    trains. None otherwise: untied, frozen, or sharded (FSDP's DTensor, DeepSpeed ZeRO-3), where the
    gradient's path belongs to the sharding."""
    get = getattr(base, "get_input_embeddings", None)
    embed = get() if get is not None else None
    if type(embed) is not torch.nn.Embedding or "forward" in vars(embed):
        return None
    w = embed.weight
    if (w is not getattr(head, "weight", None) or not w.requires_grad or type(w.data) is not torch.Tensor
            or hasattr(w, "ds_id") or embed.max_norm is not None or embed.scale_grad_by_freq or embed.sparse):
        return None
    return embed


@contextlib.contextmanager
def _tied_lookup(embed: torch.nn.Module | None, slot: _TiedSlot | None):
    """Inside: ``embed``'s forward is the ``_TiedEmbedding`` one, sharing ``slot`` with the head (both
    None: nothing changes)."""
    if slot is None:
        yield
        return
    embed.forward = lambda ids: _TiedEmbedding.apply(ids, embed.weight, embed.padding_idx, slot)
    try:
        yield
    finally:
        del embed.forward


@functools.cache
def _mixed_mm(device: torch.device) -> bool:
    """Whether torch's matmuls take bfloat16/float16 inputs with a float32 output and accumulator
    (``out_dtype``, CUDA in recent torch) on ``device``."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        c = torch.ones(2, 2, dtype=torch.float32, device=device)
        with torch.autocast("cuda", enabled=False):
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool(c[0, 0].item() == 3.0)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_weight_grad(grad_w, dz, hc):
    """grad_w + dz^T hc in float32, grad_w None for the first chunk. Low-precision inputs accumulate
    inside the matmul into float32 where torch can (``_mixed_mm``): no (V, H) product and no add pass."""
    if dz.dtype in (torch.bfloat16, torch.float16) and hc.dtype == dz.dtype and _mixed_mm(dz.device):
        if grad_w is None:
            return torch.mm(dz.T, hc, out_dtype=torch.float32)
        return torch.addmm(grad_w, dz.T, hc, out_dtype=torch.float32, out=grad_w)
    if grad_w is None:
        return (dz.T @ hc).float()
    if dz.dtype == hc.dtype == torch.float32:
        return grad_w.addmm_(dz.T, hc)  # in place: no (V, H) temporary per chunk
    grad_w += dz.T @ hc  # the low-precision product is upcast inside the add: no (V, H) float32 copy
    return grad_w


def _module_token_logps(head, h, targets, chunk_size, scale, softcap, stats=(False, False)):
    """Fallback when the head is not a plain Linear (e.g. LoRA-wrapped): call the module on
    chunks, each under activation checkpointing so only one chunk's (c, V) is alive. Returns
    (token_logps (K,), entropies (K,) or None, log_sum_sq (K,) or None); the last two detached."""
    from torch.utils.checkpoint import checkpoint

    def chunk(hc, tc):
        z = head(hc).float()
        z = z * scale if scale is not None else z
        z = softcap * torch.tanh(z / softcap) if softcap is not None else z
        with torch.no_grad():
            e = z.detach().clone() if any(stats) else None
            chunk_stats = _softmax_stats(e, _logsumexp_(e)[1], *stats) if any(stats) else (None, None)
        return z.gather(1, tc[:, None])[:, 0] - torch.logsumexp(z, dim=1), *chunk_stats

    outs = [
        checkpoint(chunk, h[s : s + chunk_size], targets[s : s + chunk_size], use_reentrant=False)
        if torch.is_grad_enabled()
        else chunk(h[s : s + chunk_size], targets[s : s + chunk_size])
        for s in range(0, h.shape[0], chunk_size)
    ]

    def joined(i):
        return torch.cat([o[i] for o in outs]) if outs else h.new_zeros(0, dtype=torch.float32)

    return joined(0), *(joined(i) if on else None for i, on in enumerate(stats, 1))


def head_token_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None,
    positions: torch.Tensor,
    targets: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float | None = None,
    logit_softcap: float | None = None,
    head_module: torch.nn.Module | None = None,
    triton: bool = False,
    tied: _TiedSlot | None = None,
    entropies: bool = False,
    sum_sq_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Completion-only per-token log-probs (eq 6.3), without (tokens, V) logits.

    hidden (R, T, H) or (R*T, H) final hidden states (after the last norm);
    lm_head_weight (V, H) (and lm_head_bias (V,)); positions, targets (K,) from ``collate``.
    logits = (h W^T + b) * logit_scale, then logit_softcap * tanh(. / softcap), all float32.
    ``head_module`` instead of the weight calls that module (for wrapped heads).
    ``triton``: the log-softmax runs as ``preftune.kernels`` head kernels where they apply (CUDA).
    ``tied``: the slot a ``_TiedEmbedding`` of the same weight reads the head's weight gradient from.
    Returns (token_logps (K,) float32 with gradients, entropies (K,) float32 or None,
    log sum_v p_v^2 (K,) float32 or None); the last two are computed only when asked, and detached.
    """
    if chunk_size < 1:
        raise ValueError(f"head_token_logps: chunk_size must be >= 1, got {chunk_size}.")
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (K, H)
    stats = (bool(entropies), bool(sum_sq_probs))
    if head_module is not None:
        return _module_token_logps(head_module, h, targets, chunk_size, logit_scale, logit_softcap, stats)
    triton = triton and kernels.usable(h, lm_head_weight, *(() if lm_head_bias is None else (lm_head_bias,)))
    out = _ChunkedTokenLogps.apply(
        h, lm_head_weight, lm_head_bias, targets, chunk_size, logit_scale, logit_softcap, torch.is_grad_enabled(),
        triton, tied, stats,
    )
    return out if any(stats) else (out, None, None)


def sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None,
    positions: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    **head_kwargs,
):
    """Completion-only summed log-probs per segment (eq 6.3): ``head_token_logps`` (same arguments,
    ``head_kwargs`` its keywords) summed over ``segments`` (K,). Returns (logps (S,) float32,
    counts (S,) long) with S = num_segments."""
    token, _, _ = head_token_logps(hidden, lm_head_weight, positions, targets, **head_kwargs)  # (K,)
    logps = torch.zeros(num_segments, dtype=torch.float32, device=token.device).index_add(0, segments, token)
    counts = torch.bincount(segments, minlength=num_segments)
    return logps, counts


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/accelerate (``.module``) and PEFT (``get_base_model``)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


# Config fields that change the final logits in some architectures but are not folded into the
# chunked head below; a model that sets one is refused instead of silently getting other numbers.
_UNSUPPORTED_LOGIT_FIELDS = ("lm_head_multiplier", "output_multiplier", "softcap")


def _logit_transform(config) -> tuple[float | None, float | None]:
    """(scale, softcap) that the config applies to the final logits.

    Honors ``logit_scale`` (logits * s), ``logits_scaling`` (logits / s) and
    ``final_logit_softcapping`` (c * tanh(logits / c)); refuses the fields above.
    """
    scale = getattr(config, "logit_scale", None)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        scale = (scale if scale is not None else 1.0) / config.logits_scaling
    for name in _UNSUPPORTED_LOGIT_FIELDS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"model_logps: config.{name}={getattr(config, name)!r} rescales the final logits, which the "
                "chunked completion-only head does not reproduce; this architecture is not supported yet."
            )
    return scale, getattr(config, "final_logit_softcapping", None)


def _compute_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype the attention's query has: autocast's where it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def _attention_mask_for(mask, attn_impl: str, dtype: torch.dtype):
    """The prefix layout's (R, 1, T, T) bool mask in the form the attention kernel takes."""
    if mask is None or mask.dim() != 4:
        return mask
    if attn_impl == "sdpa":
        # SDPA turns a bool mask into an additive one in every layer (two kernels) and the attention's
        # backward keeps each copy (measured: docs/benchmarks.md, "three changes to attention"). Made
        # here once per forward, every layer reads the same one. The fill is SDPA's
        # own: -inf on CPU; on a GPU the finite -65504 it gives cuDNN (which mishandles -inf; exp of
        # it is 0 as well, since every row attends at least to itself).
        fill = float("-inf") if mask.device.type == "cpu" else -65504.0
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, fill)
    if attn_impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"model_logps: the prefix layout needs a 4D attention mask, which attn_implementation={attn_impl!r} "
        "does not take; load the model with attn_implementation='sdpa' (or 'eager') or use layout='packed'."
    )


# transformers' SDPA integration (``use_gqa_in_sdpa``) reads this on every call, and only this: its
# attention function takes no per-call argument for it. "1" passes grouped key/value heads to SDPA with
# enable_gqa instead of repeating them to every query head first; "0" (its default) leaves the choice to
# transformers, which repeats them whenever there is a mask.
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def _grouped_kv(on: bool, *, keep_user_value: bool = False):
    """Inside: ``TRANSFORMERS_SDPA_FORCE_GQA`` is "1" (``on``: SDPA gets grouped key/value heads as they
    are, enable_gqa: no (R, heads, T, D) copies of K and V per layer kept for backward and no sum over the
    copies in backward; same math) or "0" (transformers' own rule); after, it is as it was. With
    ``keep_user_value`` a value already in the environment is left alone."""
    before = os.environ.get(_FORCE_GQA)
    if keep_user_value and before is not None:
        yield
        return
    os.environ[_FORCE_GQA] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_FORCE_GQA, None)
        else:
            os.environ[_FORCE_GQA] = before


@functools.cache
def _cudnn_takes_grouped_kv(device_index: int, heads: tuple[int, int, int], dtype: torch.dtype) -> bool:
    """Whether SDPA's cuDNN backend, as this torch and cuDNN build select it, takes grouped K/V heads
    together with an additive mask (else SDPA would fall to the math kernel): asked of torch itself."""
    hq, hkv, dim = heads
    try:
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

        new = functools.partial(torch.zeros, dtype=dtype, device=torch.device("cuda", device_index))
        q, kv, mask = new(1, hq, 64, dim), new(1, hkv, 64, dim), new(1, 1, 64, 64)
        return bool(can_use_cudnn_attention(SDPAParams(q, kv, kv, mask, 0.0, False, True), False))
    except Exception:  # noqa: BLE001 - an older torch without the probe or its enable_gqa argument
        return False


def attention_kernels(device: torch.device, cudnn: bool = False, heads: tuple[int, int, int] | None = None,
                      dtype: torch.dtype = torch.bfloat16, *, grouped_kv: bool | None = None):
    """Context for the forwards (and so the backwards) of a run. On a GPU without ``cudnn``, SDPA may
    use flash, memory-efficient or math attention but not cuDNN's: cuDNN builds an execution plan,
    costly (docs/benchmarks.md), for every new (batch, length) shape, and a DPO run meets a new length
    in most batches.

    grouped_kv (the config's ``sdpa_grouped_kv``): whether grouped K/V heads go to SDPA as they are
    (``_grouped_kv``; transformers reads that from the process's environment only, so it is set inside
    this context and restored after: docs/internals.md, "Process-wide effects"). None = automatic: on
    CPU, and on a GPU with ``cudnn`` where cuDNN takes them for the model's ``heads`` = (query heads,
    K/V heads, head dim) in ``dtype`` (the other GPU kernels do not take them with a mask, so there they
    stay repeated); a ``TRANSFORMERS_SDPA_FORCE_GQA`` the user set stands. True / False: on / off
    whatever the device (True on a GPU whose kernels do not take them: SDPA's math kernel)."""
    device = torch.device(device)
    if grouped_kv is not None:
        choice = _grouped_kv(bool(grouped_kv))
    elif device.type == "cpu":
        choice = _grouped_kv(True, keep_user_value=True)
    elif device.type == "cuda" and cudnn:
        grouped = heads is not None and heads[1] < heads[0] and torch.backends.cuda.cudnn_sdp_enabled()
        if grouped:
            index = device.index if device.index is not None else torch.cuda.current_device()
            grouped = _cudnn_takes_grouped_kv(index, tuple(heads), dtype)
        choice = _grouped_kv(True, keep_user_value=True) if grouped else contextlib.nullcontext()
    else:
        choice = contextlib.nullcontext()
    if device.type != "cuda" or cudnn:
        return choice
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return _entered(choice, sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))


@contextlib.contextmanager
def _entered(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def _final_hidden(model, base, inputs: dict, *, aux_tokens: torch.Tensor | None = None):
    """((R, T, H) hidden states after the decoder's final norm, the router's aux loss or None).

    The call goes through the outer ``model`` (so DDP hooks, accelerate's autocast and PEFT
    all apply) with ``logits_to_keep`` = no position, and a forward hook on the decoder catches
    its output; models without ``logits_to_keep`` get their decoder called directly.
    A mixture-of-experts model (its config declares ``output_router_logits``) is told whether to
    compute its load-balancing loss: with ``aux_tokens`` ((R, T), 1 = a real token) it does, and
    returns it as ``aux_loss``. The outer model computes that loss over the tokens of the attention
    mask it is given, so it gets ``aux_tokens`` while a pre-hook hands the decoder the layout's own
    mask (a 4D one, or None for the packed layouts); without ``aux_tokens`` it is told not to, so
    a config with ``output_router_logits=True`` costs no router pass and never meets a 4D mask.
    """
    decoder = base.get_decoder()
    want_aux = aux_tokens is not None
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        if want_aux:
            raise ValueError(f"router_aux_loss_coef: {type(base).__name__}'s forward takes no logits_to_keep, so "
                             "preftune cannot read its router's aux loss; set router_aux_loss_coef=0.0")
        return decoder(**inputs).last_hidden_state, None
    caught = []
    hooks = [decoder.register_forward_hook(lambda _m, _a, out: caught.append(out[0]))]
    outer = dict(inputs, **_router_kwargs(base, want_aux))
    if want_aux:
        outer["attention_mask"] = aux_tokens
        mask = inputs["attention_mask"]
        hooks.append(decoder.register_forward_pre_hook(
            lambda _m, args, kwargs: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True))
    try:
        out = model(**outer, logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        for handle in hooks:
            handle.remove()
    aux = getattr(out, "aux_loss", None) if want_aux else None
    if want_aux and not torch.is_tensor(aux):
        raise ValueError(f"router_aux_loss_coef: {type(base).__name__} returned no router aux loss with "
                         "output_router_logits=True; set router_aux_loss_coef=0.0")
    return caught[-1], aux


def is_moe(model) -> bool:
    """Whether ``model`` (a transformers model, optionally wrapped) is a mixture of experts that can return
    its router's load-balancing loss: its (text) config declares ``output_router_logits``."""
    return hasattr(_text_config(_unwrap(model)), "output_router_logits")


def _text_config(base):
    config = getattr(base, "config", None)
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _router_kwargs(base, aux: bool) -> dict:
    """``output_router_logits=aux`` for a mixture-of-experts model, nothing for another."""
    return {"output_router_logits": aux} if hasattr(_text_config(base), "output_router_logits") else {}


def _real_tokens(mask: torch.Tensor | None, input_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(R, T) long, 1 at the batch's real tokens (not padding), from its layout's attention mask: the padded
    layout's 2D mask itself; the packed layouts (no mask, one row) hold their ``num_tokens`` real tokens first;
    in the prefix layout's (R, 1, T, T) bool mask a real token sees its row's first token (a prompt token)
    and a padding one sees only itself."""
    if mask is None:
        R, T = input_ids.shape
        return (torch.arange(R * T, device=input_ids.device) < num_tokens).long().view(R, T)
    if mask.dim() == 2:
        return mask.long()
    return mask[:, 0, :, 0].long()


def auto_chunk_size(vocab_size: int) -> int:
    """Completion tokens per chunk of the output head when none is configured: 1024, halved until one
    chunk's float32 logits take at most 512 MiB (1024 up to a 131072 vocabulary, 512 for Qwen2's 151936).
    The head's peak is a few chunk-sized temporaries at the start of backward, on top of every saved
    activation, so this bounds it whatever the vocabulary. The Triton head keeps its logits in the
    matmul's dtype, so its chunks take half that in bf16; the rows stay the same (the trade measured:
    docs/benchmarks.md, "Head chunk")."""
    chunk = 1024
    while chunk > 64 and chunk * vocab_size * 4 > 512 * 2**20:
        chunk //= 2
    return chunk


TRITON_HEAD = "_preftune_triton_head"  # attribute on the output head module: run it with the Triton kernels
# attribute on the output head module; False: an input embedding tied to it takes autograd's own path
TIED_EMBEDDING_GRAD = "_preftune_tied_embedding_grad"


def _mark_head(model: torch.nn.Module, attr: str, on: bool) -> bool:
    get = getattr(_unwrap(model), "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return False
    setattr(head, attr, bool(on))
    return True


def use_triton_head(model: torch.nn.Module, on: bool = True) -> bool:
    """Mark ``model``'s output head for ``model_logps``' Triton kernels (where they apply: CUDA tensors,
    Triton installed). Returns whether the model has a head to mark."""
    return _mark_head(model, TRITON_HEAD, on)


def use_tied_embedding_grad(model: torch.nn.Module, on: bool = True) -> bool:
    """How ``model_logps`` makes the gradient of an input embedding that shares its weight with
    ``model``'s output head (the config's ``tied_embedding_grad``). On, as for a model never marked:
    the embedding's backward adds its rows into the head's gradient of the shared weight
    (``_TiedEmbedding``; where ``_tied_embedding`` says it applies). Off: the embedding gets a
    zero-filled (V, H) gradient of its own, which autograd adds into the head's at the end of backward.
    Same values. Returns whether the model has a head to mark."""
    return _mark_head(model, TIED_EMBEDDING_GRAD, on)


def _with_temperature(scale: float | None, softcap: float | None, temperature: float | None):
    """(scale, softcap) whose logits are the config's logits divided by ``temperature``.

    The temperature divides the logits the model returns, after its own scaling and soft-capping (as
    sampling with a temperature does in transformers' generation and TRL's GRPO does on the model's
    logits). It folds into the pair exactly: cap * tanh(s z / cap) / T = (cap / T) * tanh((s / T) z /
    (cap / T)), so the chunked head and its Triton kernels take it as they are."""
    if temperature is None:
        return scale, softcap
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0 < temperature < float("inf")):
        raise ValueError(f"model_token_logps: temperature must be a finite number > 0 (or None), got "
                         f"{temperature!r}.")
    if temperature == 1:
        return scale, softcap
    return (1.0 if scale is None else scale) / temperature, None if softcap is None else softcap / temperature


def model_token_logps(model, batch: dict, *, chunk_size: int | None = None, temperature: float | None = None,
                      entropies: bool = False, sum_sq_probs: bool = False, router_aux_loss: bool = False) -> TokenLogps:
    """Per-token log-probs of the completion tokens of a collated batch (any layout) under ``model``.

    model: a transformers causal LM, optionally PEFT- and/or DDP-wrapped. chunk_size None =
    ``auto_chunk_size`` of the head's vocabulary. temperature: the logits are divided by it after the
    config's scaling and soft-capping (``_with_temperature``); None or 1 leaves them. entropies /
    sum_sq_probs: also each token's entropy -sum_v p_v log p_v and log sum_v p_v^2 under those logits
    (detached). router_aux_loss: a mixture-of-experts model also returns its router's load-balancing
    loss over the batch's real tokens (``_final_hidden``; the prefix layouts hold each prompt once, the
    padded layout once per response, so the value depends on the layout); a dense model ignores it. Returns a
    ``TokenLogps`` of the K completion tokens in the batch's order, float32 whatever the model's dtype,
    with R = ``batch["num_responses"]`` responses (a ``collate_groups`` batch) or 2 *
    ``batch["num_pairs"]`` (a ``collate`` batch).
    """
    base = _unwrap(model)
    head = base.get_output_embeddings()
    device = head.weight.device if hasattr(head, "weight") else next(base.parameters()).device
    scale, softcap = _with_temperature(*_logit_transform(base.config), temperature)
    mask = batch["attention_mask"]
    aux_tokens = None
    if router_aux_loss and is_moe(base):
        aux_tokens = _real_tokens(None if mask is None else mask.to(device), batch["input_ids"].to(device),
                                  batch["num_tokens"])
    if mask is not None:
        mask = _attention_mask_for(mask.to(device), base.config._attn_implementation, _compute_dtype(base, device))
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask,
        "position_ids": batch["position_ids"].to(device),
        "use_cache": False,
    }
    forward = contextlib.nullcontext()
    if batch.get("varlen") is not None:  # prefix_packed: variable-length attention, no mask
        inputs[attention.KWARG] = batch["varlen"].to(device)
        forward = attention.prefix_packed_forward(base)
    # with autograd: the fused norms' outputs are made again in backward instead of kept
    recompute = fused.recompute_norm_outputs() if torch.is_grad_enabled() else contextlib.nullcontext()
    # a model marked for the Triton kernels (use_triton_head) takes the rotary one where fuse_layers patched it;
    # not under gradient checkpointing, whose recompute in backward runs outside this context and must
    # save the same tensors as the forward did
    fast = getattr(head, TRITON_HEAD, False) and not attention._checkpointing(base)
    rope = fused.fast_rope() if fast else contextlib.nullcontext()
    # a plain Linear head, also when FSDP2 has swapped its class (FSDPLinear keeps Linear.forward);
    # calling a sharded head module chunk by chunk would free the final norm's gathered weight
    plain = isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
    tie = plain and getattr(head, TIED_EMBEDDING_GRAD, True) and torch.is_grad_enabled()  # use_tied_embedding_grad
    embed = _tied_embedding(base, head) if tie else None
    tied = _TiedSlot() if embed is not None else None
    with forward, recompute, rope, _tied_lookup(embed, tied):
        hidden, aux = _final_hidden(model, base, inputs, aux_tokens=aux_tokens)  # (R, T, H), () or None
    # read after the forward: FSDP2 leaves the unsharded weight on a head kept whole after forward
    head_weight, head_bias = (head.weight, head.bias) if plain else (None, None)
    if plain and hasattr(head.weight, "ds_id"):  # partitioned by DeepSpeed ZeRO-3: whole only in its forward
        plain, head_weight, head_bias = _zero3_head(head)
    triton = plain and getattr(head, TRITON_HEAD, False)  # head_token_logps checks the tensors (kernels.usable)
    if chunk_size is None:
        weight = getattr(head, "weight", None)
        chunk_size = auto_chunk_size(base.config.vocab_size if weight is None else getattr(weight, "ds_shape", weight.shape)[0])
    token, ent, lss = head_token_logps(
        hidden,
        head_weight,
        batch["positions"].to(device),
        batch["targets"].to(device),
        lm_head_bias=head_bias,
        chunk_size=chunk_size,
        logit_scale=scale,
        logit_softcap=softcap,
        head_module=None if plain else head,
        triton=triton,
        tied=tied,
        entropies=entropies,
        sum_sq_probs=sum_sq_probs,
    )  # (K,) each
    segments = batch["segments"].to(device)
    R = batch["num_responses"] if "num_responses" in batch else 2 * batch["num_pairs"]
    lengths = torch.bincount(segments, minlength=R)  # (R,)
    return TokenLogps(token, segments, lengths, ent, lss, aux)


def model_pair_logps(model, batch: dict, *, chunk_size: int | None = None, average: bool = False,
                     ld_alpha: float | None = None, wpo: bool = False, router_aux_loss: bool = False) -> ResponseLogps:
    """``model_logps`` plus, in the same forward, LD-DPO's and WPO's per-pair terms where asked.

    ld_alpha (LD-DPO, in [0, 1]): ``ld_chosen_logps``/``ld_rejected_logps`` = ``losses.ld_dpo_logps`` of
    the per-token log-probs: the first min(|y_w|, |y_l|) completion tokens of each response weigh 1, the
    rest ld_alpha (divided by the response's length with ``average``, like ``chosen_logps``); they
    take gradients. A loss uses them for the policy and the reference alike. wpo (WPO, ``use_weighting``):
    ``wpo_weights`` = ``losses.wpo_weights`` of the per-token log-probs and log sum_v p_v^2 of this
    model: exp(mean_t [log p_t - log sum_v p_v^2] over y_w + the same over y_l), not capped at 1,
    detached; the policy's are the loss's ``weights``. Neither changes the other fields. router_aux_loss:
    ``aux_loss`` = a mixture-of-experts model's router loss of this forward (``model_token_logps``).
    """
    tokens = model_token_logps(model, batch, chunk_size=chunk_size, sum_sq_probs=wpo, router_aux_loss=router_aux_loss)
    B = batch["num_pairs"]
    logps, counts = tokens.sums(), tokens.lengths  # (2B,)
    mean = logps / counts.clamp(min=1)
    out = mean if average else logps
    result = ResponseLogps(
        chosen_logps=out[:B],
        rejected_logps=out[B:],
        chosen_lengths=counts[:B],
        rejected_lengths=counts[B:],
        chosen_nll=-mean[:B],
        aux_loss=tokens.aux_loss,
    )
    if ld_alpha is None and not wpo:
        return result
    values, mask = tokens.padded()  # (2B, T_max)
    if ld_alpha is not None:
        ld_c, ld_r = ld_dpo_logps(values[:B], values[B:], mask[:B], mask[B:], ld_alpha)
        if average:
            ld_c, ld_r = ld_c / counts[:B].clamp(min=1), ld_r / counts[B:].clamp(min=1)
        result.ld_chosen_logps, result.ld_rejected_logps = ld_c, ld_r
    if wpo:
        norm, _ = tokens.padded(tokens.log_sum_sq_probs)
        result.wpo_weights = wpo_weights(values[:B], values[B:], norm[:B], norm[B:], mask[:B], mask[B:])
    return result


def model_logps(model, batch: dict, *, chunk_size: int | None = None, average: bool = False) -> ResponseLogps:
    """Per-response log-probs of a collated batch (any layout) under ``model``: the sums of
    ``model_token_logps`` per response, chosen (pair i -> response i) and rejected (B + i) apart.

    model: a transformers causal LM, optionally PEFT- and/or DDP-wrapped. chunk_size None =
    ``auto_chunk_size`` of the head's vocabulary. Returns
    ``ResponseLogps`` with (B,) float32 sums (means per token with ``average=True``, section
    6.5.5) and long lengths, whatever the model's dtype.
    """
    return model_pair_logps(model, batch, chunk_size=chunk_size, average=average)
