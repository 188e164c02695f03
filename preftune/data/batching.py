"""Collate tokenized preference pairs, or GRPO groups, into one of four batch layouts.

Every layout answers the same question for the log-prob head (``preftune.logps``): which
hidden states predict which completion tokens, and for which response. A batch is a list of
prompts, each with its responses (completions); ``collate`` takes pairs (a prompt with a chosen
and a rejected response: B pairs give 2B responses, numbered chosen of pair i -> i, rejected of
pair i -> B + i) and ``collate_groups`` takes GRPO groups (a prompt with its G completions, G per
group, numbered in order: group 0's completions 0..g0-1, then group 1's). docs/CONTRACTS.md
"Batch". The layouts differ only in how the sequences sit in the (R, T) grid:

- ``padded``: one row ``prompt + response`` per response, in response order, right-padded, a 2D
  attention mask (the layout of eq 6.7/6.8: "concatenate, pad to equal length").
- ``packed`` (padding-free): those sequences end to end in ONE row, position ids restarting at
  0 per sequence and ``attention_mask=None``. transformers' ``create_causal_mask`` then finds
  the sequence boundaries from the position ids (``find_packed_sequence_indices``: a new
  sequence wherever the position does not grow by 1) and builds the block-diagonal causal mask
  itself for sdpa/eager; flash-attention uses the same position ids for its varlen kernel. The
  tests prove packed == padded log-probs.
- ``prefix`` (prefix-shared): one row per prompt, ``prompt + response 0 + response 1 + ...``; every
  response takes the position ids that follow the prompt (len(prompt)...) and a 4D bool mask lets
  it see the prompt and itself but no other response. The prompt runs once per pair or group.
  The last prompt token predicts the first token of every response, so its flat index appears
  once per response in ``positions``, with different ``targets`` and ``segments``.
- ``prefix_packed``: the rows of ``prefix`` end to end in ONE row, without padding, and instead of
  a mask the attention as variable-length sequences (``batch["varlen"]``, a `VarlenPrefix`): per
  prompt, ``prompt + response 0`` attends causally to itself, and every later response attends to
  its prompt's keys followed by its own, causally aligned at the end (the keys gathered by
  ``k_index``). That is the form of flash attention's variable-length kernel (``preftune.logps``
  runs it on a GPU and a per-sequence SDPA elsewhere): no padding, no (T, T) mask, no attention
  over blocks the mask would hide. Row lengths are not rounded (no kernel here plans per shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
LAYOUTS = ("padded", "packed", "prefix", "prefix_packed")
PREFIX_LAYOUTS = ("prefix", "prefix_packed")  # the prompt once per pair or group


@dataclass
class VarlenPrefix:
    """Attention of a ``prefix_packed`` batch as variable-length sequences over its one row.

    Per prompt, in row order (the queries are the row as it is): query sequence ``prompt + response 0``,
    then one query sequence per later response that has tokens (an empty one has no sequence). The key
    sequence of ``prompt + response 0`` is the same span; that of a later response is the prompt followed
    by the response's span, gathered from the row by ``k_index``. So a sequence whose keys are its queries
    starts a prompt's span, and each other one has (keys - queries) prompt keys. Every sequence is causal
    with the queries aligned to the END of its keys (response token j sees the whole prompt and its own
    tokens 0..j). For pairs: sequence 2i is pair i's ``prompt + chosen``, 2i+1 its ``rejected``.
    ``cu_q``/``cu_k`` (int32, sequences + 1) are the cumulative lengths, ``max_q``/``max_k`` the longest,
    the ``*_host`` lists the same on the host. ``scratch`` holds what the attention derives from them
    once per batch instead of once per layer (``preftune.attention.per_sequence``'s masks).
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    k_index: torch.Tensor
    max_q: int
    max_k: int
    cu_q_host: list[int]
    cu_k_host: list[int]
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device) -> VarlenPrefix:
        return VarlenPrefix(self.cu_q.to(device), self.cu_k.to(device), self.k_index.to(device), self.max_q,
                            self.max_k, self.cu_q_host, self.cu_k_host)


# A prompt and its responses, each (response number, completion token ids): what every layout is built from.
_Prompt = tuple[list[int], list[tuple[int, list[int]]]]


def _check_features(features: Sequence[dict]) -> None:
    if len(features) == 0:
        raise ValueError("collate: got an empty list of pairs; a batch needs at least one pair.")
    for f in features:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if len(f[key]) == 0:
                raise ValueError(
                    f"collate: pair index={f.get('index')} has an empty {key!r}; tokenize guarantees "
                    "len >= 1 (BOS/EOS are added), so re-tokenize with preftune.data.tokenize."
                )


def _check_groups(groups: Sequence[dict]) -> None:
    if len(groups) == 0:
        raise ValueError("collate_groups: got an empty list of groups; a batch needs at least one group.")
    for n, g in enumerate(groups):
        where = f"collate_groups: group {n} (index={g.get('index')})"
        for key in ("prompt_ids", "completions", "index"):
            if key not in g:
                raise ValueError(f"{where} has no {key!r}; a group is a dict with 'prompt_ids' (token ids), "
                                 "'completions' (a list of token-id lists) and 'index' (int).")
        if len(g["prompt_ids"]) == 0:
            raise ValueError(f"{where} has an empty 'prompt_ids'; a completion is predicted from its prompt's last "
                             "token, so every prompt needs at least one token (e.g. BOS).")
        if isinstance(g["completions"], (str, bytes)) or len(g["completions"]) == 0:
            raise ValueError(f"{where} has no completions; give 'completions' as a list of at least one list of "
                             "token ids (a completion may be empty).")
        if any(not isinstance(c, Sequence) or isinstance(c, (str, bytes)) for c in g["completions"]):
            raise ValueError(f"{where}: 'completions' must be a list of token-id lists, one per completion, "
                             f"got {type(g['completions'][0]).__name__} items; wrap a single completion in a list.")


def _check_args(name: str, layout: str, pad_token_id) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout={layout!r} is not one of {LAYOUTS}.")
    if not isinstance(pad_token_id, int):
        raise ValueError(
            f"{name}: pad_token_id must be an int, got {pad_token_id!r}; set tokenizer.pad_token "
            "(e.g. to the EOS token) before training."
        )


def pair_num_tokens(feature: dict, layout: str = "packed") -> int:
    """Tokens a pair occupies in a batch: the prompt once for ``prefix``, twice otherwise."""
    p, c, r = len(feature["prompt_ids"]), len(feature["chosen_ids"]), len(feature["rejected_ids"])
    return p + c + r if layout in PREFIX_LAYOUTS else 2 * p + c + r


def group_num_tokens(group: dict, layout: str = "packed") -> int:
    """Tokens a group occupies in a batch: the prompt once for the prefix layouts, once per completion otherwise."""
    p, cs = len(group["prompt_ids"]), [len(c) for c in group["completions"]]
    return p + sum(cs) if layout in PREFIX_LAYOUTS else p * len(cs) + sum(cs)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate(
    features: Sequence[dict],
    *,
    layout: str = "padded",
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Tokenized pairs (CONTRACTS.md "Tokenized pair") -> one batch (CONTRACTS.md "Batch").

    Returns ``input_ids (R, T)``, ``attention_mask``, ``position_ids (R, T)``, ``positions``,
    ``targets``, ``segments`` (all (K,)), ``num_pairs``, ``pair_index (B,)``, ``num_tokens``,
    for ``padded`` also ``labels (R, T)``, for ``prefix_packed`` ``varlen`` (a `VarlenPrefix`, on
    ``device``). R = 2B (padded), 1 (packed, prefix_packed) or B (prefix). ``pad_to_multiple_of`` does
    not apply to ``prefix_packed``. A pair is a group of two (``collate_groups``) whose responses are
    numbered chosen of pair i -> i, rejected -> B + i.
    """
    _check_args("collate", layout, pad_token_id)
    _check_features(features)
    B = len(features)
    prompts = [(list(f["prompt_ids"]), [(i, list(f["chosen_ids"])), (B + i, list(f["rejected_ids"]))])
               for i, f in enumerate(features)]  # fmt: skip
    index = {"num_pairs": B, "pair_index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long)}
    return _collate(prompts, 2 * B, index, layout, pad_token_id, pad_to_multiple_of, device)


def collate_groups(
    groups: Sequence[dict],
    *,
    layout: str = "padded",
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """GRPO groups -> one batch (CONTRACTS.md "Batch"), the layouts and keys of ``collate``.

    groups: ``{"prompt_ids": [int, ...] (len >= 1), "completions": [[int, ...], ...] (>= 1 per group; a
    completion may be empty and then contributes no token), "index": int}``; the groups may have
    different numbers of completions (a group split across micro-batches). Responses are numbered in
    order: group 0's completions 0..g0-1, then group 1's, ... R = the total number of completions.
    Returns ``collate``'s keys without ``num_pairs``/``pair_index`` and with ``num_responses`` (int R) and
    ``group_index`` (num_groups,) long, the groups' ``index`` fields. Rows: one per completion
    (padded), one per group (prefix: the prompt, then its completions, each at the positions after the
    prompt and seeing the prompt and itself only), or one (packed, prefix_packed).
    """
    _check_args("collate_groups", layout, pad_token_id)
    _check_groups(groups)
    prompts, r = [], 0
    for g in groups:
        completions = [list(c) for c in g["completions"]]
        prompts.append((list(g["prompt_ids"]), [(r + j, c) for j, c in enumerate(completions)]))
        r += len(completions)
    index = {"num_responses": r, "group_index": torch.tensor([int(g["index"]) for g in groups], dtype=torch.long)}
    return _collate(prompts, r, index, layout, pad_token_id, pad_to_multiple_of, device)


def _collate(prompts: list[_Prompt], num_responses: int, index: dict, layout: str, pad_token_id: int,
             pad_to_multiple_of: int | None, device) -> dict:
    """The batch of these prompts and their responses (numbered 0..num_responses-1) in ``layout``; ``index``
    holds the caller's counting keys, placed before ``num_tokens``."""
    # Each row: tokens, position ids, and spans (response, anchor, start, completion) where the
    # completion sits at row offsets start.. and its first token is predicted from offset `anchor`.
    rows: list[tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]] = []
    if layout in ("padded", "packed"):
        by_response: list[tuple[list[int], list[int]] | None] = [None] * num_responses
        for prompt, responses in prompts:
            for r, comp in responses:
                by_response[r] = (prompt, comp)
        for r, (prompt, comp) in enumerate(by_response):
            P = len(prompt)
            rows.append((prompt + comp, list(range(P + len(comp))), [(r, P - 1, P, comp)]))
        if layout == "packed":
            rows = [_end_to_end(rows)]
    else:  # prefix, prefix_packed
        for prompt, responses in prompts:
            P = len(prompt)
            tokens, pos, spans = list(prompt), list(range(P)), []
            for r, comp in responses:
                spans.append((r, P - 1, len(tokens), comp))
                tokens += comp
                pos += range(P, P + len(comp))
            rows.append((tokens, pos, spans))
        if layout == "prefix_packed":
            varlen = _varlen_prefix([(len(p), [len(c) for _, c in responses]) for p, responses in prompts], device)
            rows = [_end_to_end(rows)]
            pad_to_multiple_of = None

    R = len(rows)
    T = _round_up(max(len(t) for t, _, _ in rows), pad_to_multiple_of)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    lengths = torch.tensor([len(t) for t, _, _ in rows])  # (R,)
    positions, targets, segments = [], [], []
    for row, (tokens, pos, spans) in enumerate(rows):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[row, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        if layout == "packed":  # tail padding forms its own "sequence" 0.. that nothing attends to
            position_ids[row, len(pos) :] = torch.arange(T - len(pos))
        else:
            position_ids[row, len(pos) :] = torch.arange(len(pos), T)
        for r, anchor, start, comp in spans:
            if not comp:  # an empty completion: nothing to predict
                continue
            # completion token j is predicted from offset start+j-1, token 0 from `anchor`
            offsets = [anchor] + list(range(start, start + len(comp) - 1))
            positions += [row * T + o for o in offsets]
            targets += comp
            segments += [r] * len(comp)

    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "positions": torch.tensor(positions, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "segments": torch.tensor(segments, dtype=torch.long),
        **index,
        "num_tokens": int(lengths.sum()),
    }
    valid = torch.arange(T)[None, :] < lengths[:, None]  # (R, T) True = real token
    if layout == "padded":
        batch["attention_mask"] = valid.long()
        labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        for row, (tokens, _, spans) in enumerate(rows):
            start = spans[0][2]
            labels[row, start : len(tokens)] = input_ids[row, start : len(tokens)]
        batch["labels"] = labels
    elif layout == "packed":
        batch["attention_mask"] = None
    elif layout == "prefix_packed":
        batch["attention_mask"] = None
        batch["varlen"] = varlen
    else:
        batch["attention_mask"] = _prefix_mask(rows, T, device)
    return batch


def _end_to_end(rows: list) -> tuple[list[int], list[int], list]:
    """Rows (tokens, positions, spans) joined into one, the spans' offsets moved to where their row lands."""
    tokens, pos, spans = [], [], []
    for row_tokens, row_pos, row_spans in rows:
        start = len(tokens)
        spans += [(r, start + anchor, start + s0, comp) for r, anchor, s0, comp in row_spans]
        tokens += row_tokens
        pos += row_pos
    return tokens, pos, spans


def _varlen_prefix(prompts: list[tuple[int, list[int]]], device) -> VarlenPrefix:
    """The `VarlenPrefix` of prompts (prompt length, [response lengths]) each followed by its responses, end
    to end in one row. A later response without tokens gets no sequence (no empty sequence for the kernel)."""
    q_lens, k_lens, k_index, start = [], [], [], 0
    for p, lens in prompts:
        first = p + lens[0]
        q_lens.append(first)
        k_lens.append(first)
        k_index.append(torch.arange(start, start + first))
        own = start + first
        for n in lens[1:]:
            if n:
                q_lens.append(n)
                k_lens.append(p + n)
                k_index += [torch.arange(start, start + p), torch.arange(own, own + n)]
            own += n
        start = own
    cu_q = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(k_lens).cumsum(0).tolist()]
    return VarlenPrefix(torch.tensor(cu_q, dtype=torch.int32, device=device),
                        torch.tensor(cu_k, dtype=torch.int32, device=device),
                        torch.cat(k_index).to(device), max(q_lens), max(k_lens), cu_q, cu_k)  # fmt: skip


def _prefix_mask(rows: list, T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(R, 1, T, T) bool, True = query may attend key, built on ``device`` (default CPU) from the
    (R, T) part ids. On the CPU it was most of a collate, with the GPU idle (docs/benchmarks.md); on the
    GPU it is a few kernels.

    Key k is visible to query q iff k <= q (row offsets), both are real tokens, and k is in the
    prompt or in q's own part (a response sees the prompt and itself, no other response). Every
    query also sees itself, so pad rows are never fully masked (a fully masked row gives NaN in
    SDPA); pad outputs are never read.
    """
    part = torch.full((len(rows), T), -1, dtype=torch.long)  # (R, T) 0 prompt, j + 1 the row's response j
    for row, (_, _, spans) in enumerate(rows):
        part[row, : spans[0][2]] = 0
        for j, (_, _, start, comp) in enumerate(spans):
            part[row, start : start + len(comp)] = j + 1
    part = part.to(device) if device is not None else part
    q, k = part[:, :, None], part[:, None, :]  # (R, T, 1), (R, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=part.device).tril()
    mask = causal & (q >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(T, dtype=torch.bool, device=part.device)
    return mask[:, None]  # (R, 1, T, T)
