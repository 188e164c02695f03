"""Collate tokenized preference pairs into one of four batch layouts.

Every layout answers the same question for the log-prob head (``preftune.logps``): which
hidden states predict which completion tokens, and for which response. B pairs give 2B
responses, numbered chosen of pair i -> i, rejected of pair i -> B + i (docs/CONTRACTS.md
"Batch"). The layouts differ only in how the sequences sit in the (R, T) grid:

- ``padded``: 2B rows ``prompt + chosen`` then ``prompt + rejected``, right-padded, a 2D
  attention mask (the layout of eq 6.7/6.8: "concatenate, pad to equal length").
- ``packed`` (padding-free): the 2B sequences end to end in ONE row, position ids restarting at
  0 per sequence and ``attention_mask=None``. transformers' ``create_causal_mask`` then finds
  the sequence boundaries from the position ids (``find_packed_sequence_indices``: a new
  sequence wherever the position does not grow by 1) and builds the block-diagonal causal mask
  itself for sdpa/eager; flash-attention uses the same position ids for its varlen kernel. The
  tests prove packed == padded log-probs.
- ``prefix`` (prefix-shared): one row per pair, ``prompt + chosen + rejected``; the rejected
  tokens take the position ids the chosen ones have (len(prompt)...) and a 4D bool mask lets
  them see the prompt and themselves but not the chosen tokens. The prompt runs once per pair.
  The last prompt token predicts both chosen[0] and rejected[0], so its flat index appears
  twice in ``positions``, with different ``targets`` and ``segments``.
- ``prefix_packed``: the rows of ``prefix`` end to end in ONE row, without padding, and instead of
  a mask the attention as variable-length sequences (``batch["varlen"]``, a `VarlenPrefix`): per
  pair, ``prompt + chosen`` attends causally to itself, and ``rejected`` attends to its prompt's
  keys followed by its own, causally aligned at the end (the keys gathered by ``k_index``). That is
  the form of flash attention's variable-length kernel (``preftune.logps`` runs it on a GPU and a
  per-sequence SDPA elsewhere): no padding, no (T, T) mask, no attention over blocks the mask would
  hide. Row lengths are not rounded (no kernel here plans per shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
LAYOUTS = ("padded", "packed", "prefix", "prefix_packed")
PREFIX_LAYOUTS = ("prefix", "prefix_packed")  # the prompt once per pair


@dataclass
class VarlenPrefix:
    """Attention of a ``prefix_packed`` batch as variable-length sequences over its one row.

    Query sequence 2i is pair i's ``prompt + chosen`` and 2i+1 its ``rejected``, in row order (the
    queries are the row as it is). Key sequence 2i is the same span; 2i+1 is the prompt followed by the
    rejected span, gathered from the row by ``k_index``. Every sequence is causal with the queries
    aligned to the END of its keys (rejected token j sees the whole prompt and rejected 0..j).
    ``cu_q``/``cu_k`` (int32, 2B+1) are the cumulative lengths, ``max_q``/``max_k`` the longest, the
    ``*_host`` lists the same on the host. ``scratch`` holds what the attention derives from them once
    per batch instead of once per layer (``preftune.attention.per_sequence``'s masks).
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


def pair_num_tokens(feature: dict, layout: str = "packed") -> int:
    """Tokens a pair occupies in a batch: the prompt once for ``prefix``, twice otherwise."""
    p, c, r = len(feature["prompt_ids"]), len(feature["chosen_ids"]), len(feature["rejected_ids"])
    return p + c + r if layout in PREFIX_LAYOUTS else 2 * p + c + r


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
    not apply to ``prefix_packed``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"collate: layout={layout!r} is not one of {LAYOUTS}.")
    if not isinstance(pad_token_id, int):
        raise ValueError(
            f"collate: pad_token_id must be an int, got {pad_token_id!r}; set tokenizer.pad_token "
            "(e.g. to the EOS token) before training."
        )
    _check_features(features)
    B = len(features)
    completions = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]

    # Each row: tokens, position ids, and spans (response, anchor, start, completion) where the
    # completion sits at row offsets start.. and its first token is predicted from offset `anchor`.
    rows: list[tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]] = []
    if layout == "padded":
        for r, comp in enumerate(completions):
            prompt = features[r % B]["prompt_ids"]
            P = len(prompt)
            rows.append((prompt + comp, list(range(P + len(comp))), [(r, P - 1, P, comp)]))
    elif layout == "packed":
        tokens, pos, spans = [], [], []
        for r, comp in enumerate(completions):
            prompt = features[r % B]["prompt_ids"]
            P, start = len(prompt), len(tokens)
            tokens += prompt + comp
            pos += range(P + len(comp))
            spans.append((r, start + P - 1, start + P, comp))
        rows.append((tokens, pos, spans))
    else:  # prefix, prefix_packed
        for i, f in enumerate(features):
            prompt, chosen, rejected = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
            P, C = len(prompt), len(chosen)
            pos = list(range(P + C)) + list(range(P, P + len(rejected)))
            spans = [(i, P - 1, P, chosen), (B + i, P - 1, P + C, rejected)]
            rows.append((prompt + chosen + rejected, pos, spans))
        if layout == "prefix_packed":
            varlen = _varlen_prefix([len(f["prompt_ids"]) for f in features], [len(f["chosen_ids"]) for f in features],
                                    [len(f["rejected_ids"]) for f in features], device)  # fmt: skip
            tokens, pos, spans = [], [], []
            for row_tokens, row_pos, row_spans in rows:
                start = len(tokens)
                spans += [(r, start + anchor, start + s0, comp) for r, anchor, s0, comp in row_spans]
                tokens += row_tokens
                pos += row_pos
            rows = [(tokens, pos, spans)]
            pad_to_multiple_of = None

    R = len(rows)
    T = _round_up(max(len(t) for t, _, _ in rows), pad_to_multiple_of)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    lengths = torch.tensor([len(t) for t, _, _ in rows])  # (R,)
    positions, targets, segments = [], [], []
    for row, (tokens, pos, spans) in enumerate(rows):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        position_ids[row, : len(pos)] = torch.tensor(pos)
        if layout == "packed":  # tail padding forms its own "sequence" 0.. that nothing attends to
            position_ids[row, len(pos) :] = torch.arange(T - len(pos))
        else:
            position_ids[row, len(pos) :] = torch.arange(len(pos), T)
        for r, anchor, start, comp in spans:
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
        "num_pairs": B,
        "pair_index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long),
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


def _varlen_prefix(P: list[int], C: list[int], R: list[int], device) -> VarlenPrefix:
    """The `VarlenPrefix` of pairs with these prompt / chosen / rejected lengths, end to end in one row."""
    q_lens, k_lens, k_index, start = [], [], [], 0
    for p, c, r in zip(P, C, R):
        q_lens += [p + c, r]
        k_lens += [p + c, p + r]
        k_index += [torch.arange(start, start + p + c), torch.arange(start, start + p),
                    torch.arange(start + p + c, start + p + c + r)]  # fmt: skip
        start += p + c + r
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
    prompt or in q's own part (chosen sees prompt+chosen, rejected sees prompt+rejected). Every
    query also sees itself, so pad rows are never fully masked (a fully masked row gives NaN in
    SDPA); pad outputs are never read.
    """
    part = torch.full((len(rows), T), -1, dtype=torch.long)  # (R, T) 0 prompt, 1 chosen, 2 rejected
    for row, (_, _, spans) in enumerate(rows):
        (_, _, c_start, chosen), (_, _, r_start, rejected) = spans
        part[row, :c_start] = 0
        part[row, c_start : r_start] = 1
        part[row, r_start : r_start + len(rejected)] = 2
    part = part.to(device) if device is not None else part
    q, k = part[:, :, None], part[:, None, :]  # (R, T, 1), (R, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=part.device).tril()
    mask = causal & (q >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(T, dtype=torch.bool, device=part.device)
    return mask[:, None]  # (R, 1, T, T)
