"""G completions per prompt for GRPO: prefill each prompt once, decode every row in one batch.

``generate_groups`` runs the prompts of a call as one left-padded batch (attention mask and position
ids), repeats each prompt's KV cache ``num_generations`` times, and decodes all prompts x G rows
together with the cache, one token per step. Rows that emitted an end-of-sequence token are dropped
from the batch (the cache, the mask and the inputs keep only the unfinished rows) so they stop costing.
``model.generate(num_return_sequences=G)`` instead runs every prompt's forward G times.

Randomness is per row. Row ``r`` draws one uniform number per step from a counter-based hash of
``(seeds[r], step)`` and takes the token where that number falls in the cumulative distribution of
its processed probabilities (inverse-CDF sampling). Its tokens therefore depend on its own seed, prompt
and tokens only, not on which other rows share the batch: splitting prompts over processes, or dropping
finished rows, draws the same tokens. The same scheme is why sampled tokens differ from
``model.generate(do_sample=True)`` under ``torch.manual_seed``: ``generate`` draws with
``torch.multinomial`` from one global generator shared by the whole batch, so its tokens depend on the
batch. The distribution is the same (softmax of the processed logits; tested), the draws are not.
Greedy decoding (``do_sample=False``) takes the argmax and gives ``generate``'s tokens.

Logits go through transformers' own processors in ``generate``'s order: repetition penalty (over the
row's prompt and completion so far, never over padding), then temperature, top-k, top-p, min-p and
the other warpers named in ``GENERATION_KWARGS``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

# generation_kwargs keys this rollout honours; anything else is refused by name.
GENERATION_KWARGS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample", "max_new_tokens",
    "typical_p", "epsilon_cutoff", "eta_cutoff",
)

_M32 = 0xFFFFFFFF


@dataclass
class Rollout:
    """``completion_ids[i * G + j]``: prompt i's j-th completion, up to and including its first EOS.

    ``truncated[r]``: no EOS within ``max_new_tokens``. ``timings``: prefill_s, decode_s (seconds).
    """

    completion_ids: list[list[int]]
    truncated: list[bool]
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Per-row counter-based uniforms


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow: split x into 16-bit halves."""
    hi, lo = x >> 16, x & 0xFFFF
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xor-shift-multiply); x int64 in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_tensor(seeds, device=None) -> torch.Tensor:
    """(R, 2) int64: each seed's low and high 32 bits (any Python int; taken modulo 2**64)."""
    vals = [int(s) % (1 << 64) for s in seeds]
    return torch.tensor([[v & _M32, v >> 32] for v in vals], dtype=torch.long, device=device).reshape(-1, 2)


def row_uniforms(seed_words: torch.Tensor, step: int) -> torch.Tensor:
    """(R,) float64 in [0, 1): a function of (seed, step) only, 53 random bits each."""
    lo, hi = seed_words[:, 0], seed_words[:, 1]
    key = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    h = _mix32(key ^ _mix32(torch.full_like(lo, (step * 0x85EBCA6B + 0x27D4EB2F) & _M32)))
    h2 = _mix32(h ^ 0x165667B1)
    return (h.double() * 2.0**21 + (h2 >> 11).double()) * 2.0**-53


def sample_rows(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: (R, V) probabilities (need not sum to 1), (R,) uniforms -> (R,) token ids.

    A token of probability 0 is never drawn: the first index whose cumulative sum exceeds u * total.
    """
    cdf = probs.double().cumsum(-1)  # (R, V)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (R, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# --------------------------------------------------------------------------------------------------
# Logits processing


def _processors(*, temperature, top_p, top_k, min_p, repetition_penalty, do_sample, typical_p=None,
                epsilon_cutoff=None, eta_cutoff=None, device=None):
    """transformers' processors in generate's order: (penalty list, warper list)."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    penalty = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        penalty.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    warpers = LogitsProcessorList()
    if do_sample:
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            warpers.append(TopKLogitsWarper(int(top_k)))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(top_p)))
        if min_p is not None:
            warpers.append(MinPLogitsWarper(float(min_p)))
        if typical_p is not None and typical_p < 1.0:
            warpers.append(TypicalLogitsWarper(float(typical_p)))
        if epsilon_cutoff is not None and 0.0 < epsilon_cutoff < 1.0:
            warpers.append(EpsilonLogitsWarper(float(epsilon_cutoff)))
        if eta_cutoff is not None and 0.0 < eta_cutoff < 1.0:
            warpers.append(EtaLogitsWarper(float(eta_cutoff), device=device))
    return penalty, warpers


def next_tokens(logits, history, seed_words, step, penalty, warpers, do_sample) -> torch.Tensor:
    """One step's tokens for (R, V) logits; history (R, L) the tokens the repetition penalty sees."""
    scores = logits.float()
    if len(penalty):
        scores = penalty(history, scores)
    if not do_sample:
        return scores.argmax(-1)
    scores = warpers(history, scores)
    return sample_rows(torch.softmax(scores, dim=-1), row_uniforms(seed_words, step))


# --------------------------------------------------------------------------------------------------
# The rollout


def _check_args(prompts, num_generations, max_new_tokens, eos_token_ids, seeds, temperature):
    if not prompts:
        raise ValueError("generate_groups: prompts is empty; pass at least one list of token ids")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate_groups: prompts[{i}] is empty; every prompt needs at least one token")
    if num_generations < 1:
        raise ValueError(f"generate_groups: num_generations={num_generations}; it must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"generate_groups: max_new_tokens={max_new_tokens}; it must be at least 1")
    if not eos_token_ids:
        raise ValueError("generate_groups: eos_token_ids is empty; pass the tokenizer's end-of-sequence id(s)")
    if seeds is not None and len(seeds) != len(prompts) * num_generations:
        raise ValueError(f"generate_groups: {len(seeds)} seeds for {len(prompts)} prompts x {num_generations} "
                         f"generations; pass one seed per completion ({len(prompts) * num_generations})")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"generate_groups: temperature={temperature}; it must be > 0 "
                         "(for greedy decoding pass do_sample=False)")


def _module_modes(model) -> list[tuple[torch.nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _cache_kwarg(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes it on
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def merged_lora(model):
    """While generating, each LoRA linear of ``model`` (peft's ``lora.Linear`` with plain adapters active) runs as
    one matmul with a merged copy of its weight, W + sum of the active adapters' scale * B @ A, instead of the
    base matmul plus the adapter's two small ones and an add per layer per token: decoding a LoRA policy then
    costs what decoding the full model costs. The base weights are never written (unlike peft's ``merge``, whose
    ``unmerge`` would leave rounding in them), and the copies are freed on exit: they exist only while decoding,
    when no activations are held. The logits differ from the unmerged forward by float rounding only. Layers
    with DoRA or another LoRA variant, a LoRA bias, adapters turned off or merged, or sharded weights (FSDP,
    DeepSpeed ZeRO-3) keep their own forward. Yields the number of layers merged."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # no peft: nothing to merge
        yield 0
        return
    patched: list[tuple[torch.nn.Module, object]] = []
    try:
        for m in model.modules():
            if not isinstance(m, LoraLinear) or m.merged or m.disable_adapters:
                continue
            active = [a for a in m.active_adapters if a in m.lora_A]
            if not active or any(getattr(m, "lora_variant", {}).get(a) is not None for a in active) or any(
                    m.use_dora.get(a, False) or getattr(m, "lora_bias", {}).get(a, False) for a in active):
                continue
            base = m.get_base_layer()
            w = base.weight
            if type(w).__name__ == "DTensor" or hasattr(w, "ds_id") or not w.is_floating_point():
                continue
            with torch.no_grad():
                weight = w.detach().clone()
                for a in active:
                    weight += m.get_delta_weight(a).to(weight.dtype)

            def forward(x, *args, _w=weight, _b=base.bias, **kwargs):
                return torch.nn.functional.linear(x, _w, _b)

            patched.append((m, vars(m).get("forward")))
            m.forward = forward
        yield len(patched)
    finally:
        for m, prev in patched:
            if prev is None:
                del m.forward
            else:
                m.forward = prev


@torch.no_grad()
def generate_groups(model, prompts, num_generations, *, max_new_tokens, eos_token_ids, pad_token_id,
                    temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                    do_sample=True, seeds=None, generation_kwargs=None, compact=True, merge_lora=True) -> Rollout:
    """``num_generations`` completions for each prompt (token-id lists, already templated).

    Each prompt's forward runs once; its KV cache is repeated to ``num_generations`` rows and all rows
    decode as one batch. ``seeds``: one int per completion row (``len(prompts) * num_generations``);
    None draws them from torch's default generator. ``generation_kwargs`` override the sampling
    arguments (keys in ``GENERATION_KWARGS``; others are refused). ``compact``: True drops finished
    rows from the batch after every step, an int k every k steps, False never (finished rows are fed
    padding): the same tokens either way, only the work differs. ``merge_lora``: a LoRA model's adapted linears
    decode as one matmul with their merged weight (``merged_lora``). The model runs in eval
    mode without gradients; every module's training flag is restored afterwards.
    """
    from transformers import DynamicCache

    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty, do_sample=do_sample, max_new_tokens=max_new_tokens)
    extra = dict(generation_kwargs or {})
    unknown = sorted(set(extra) - set(GENERATION_KWARGS))
    if unknown:
        raise ValueError(f"generation_kwargs: {', '.join(map(repr, unknown))} not supported by preftune's rollout; "
                         f"supported keys: {', '.join(GENERATION_KWARGS)}. Remove them from generation_kwargs.")
    sampling.update(extra)
    max_new_tokens = int(sampling.pop("max_new_tokens"))
    do_sample = bool(sampling["do_sample"])
    eos_token_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    G = int(num_generations)
    _check_args(prompts, G, max_new_tokens, eos_token_ids, seeds, sampling["temperature"] if do_sample else None)

    every = int(compact)  # True -> 1: drop finished rows at every step's end
    if every < 0:
        raise ValueError(f"generate_groups: compact={compact}; pass True, False or a number of steps >= 1")
    device = next(model.parameters()).device
    n, R = len(prompts), len(prompts) * G
    if seeds is None:
        seeds = torch.randint(0, 2**62, (R,)).tolist()
    penalty, warpers = _processors(**sampling, device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)

    modes = _module_modes(model)
    model.eval()
    merged = contextlib.ExitStack()  # the merged LoRA weights, freed however decoding ends
    try:
        if merge_lora:
            merged.enter_context(merged_lora(model))
        # Prefill: left-padded prompts, one forward, logits of the last position only.
        _sync(device)
        t0 = time.perf_counter()
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        L = int(lengths.max())
        ids = torch.full((n, L), int(pad_token_id), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(device)
        mask = (torch.arange(L, device=device) >= (L - lengths)[:, None]).long()  # (n, L)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=getattr(model, "config", None))
        cache_kw = {_cache_kwarg(model): cache}
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **cache_kw)
        if cache.get_seq_length() != L:
            raise RuntimeError(f"generate_groups: {type(model).__name__} did not fill the KV cache passed as "
                               f"{next(iter(cache_kw))}=; the rollout needs a transformers causal LM that takes "
                               "a DynamicCache")
        logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (R, V)
        if G > 1:
            cache.batch_repeat_interleave(G)
        mask = mask.repeat_interleave(G, dim=0)  # (R, L)
        next_pos = lengths.repeat_interleave(G)  # (R,)
        history = None
        if len(penalty):  # padding replaced by the row's own last prompt token: no effect on the penalty
            history = torch.where(mask.bool(), ids.repeat_interleave(G, dim=0), ids[:, -1:].repeat_interleave(G, 0))
        _sync(device)
        t1 = time.perf_counter()

        # Decode: `active` holds the global row index of every row still in the batch.
        seed_words = seed_tensor(seeds, device)
        active = torch.arange(R, device=device)
        tokens = torch.full((R, max_new_tokens), int(pad_token_id), dtype=torch.long, device=device)
        finished_at = torch.full((R,), -1, dtype=torch.long, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)  # over the active rows
        for step in range(max_new_tokens):
            tok = next_tokens(logits, history, seed_words[active], step, penalty, warpers, do_sample)
            live = ~done
            tokens[active[live], step] = tok[live]
            hit = live & torch.isin(tok, eos)
            finished_at[active[hit]] = step
            done = done | hit
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            tok = tok.masked_fill(done, int(pad_token_id))
            if every and (step + 1) % every == 0 and bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, tok, mask, next_pos, done = active[keep], tok[keep], mask[keep], next_pos[keep], done[keep]
                if history is not None:
                    history = history[keep]
            if history is not None:
                history = torch.cat([history, tok[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, **cache_kw)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        _sync(device)
        t2 = time.perf_counter()
    finally:
        merged.close()
        for m, was in modes:
            m.training = was

    ends = finished_at.tolist()
    rows = tokens.tolist()
    completion_ids = [row[: e + 1] if e >= 0 else row for row, e in zip(rows, ends)]
    truncated = [e < 0 for e in ends]
    return Rollout(completion_ids, truncated, {"prefill_s": t1 - t0, "decode_s": t2 - t1})
