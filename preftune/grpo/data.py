"""GRPO's data: prompt rows as TRL takes them, tokenized once, and the order rounds draw them in.

A row is a dict with a ``prompt`` (a string, or a list of ``{"role", "content"}`` messages for
conversational data) and any other columns; every other column goes to the reward functions as a
keyword list (TRL's convention). Conversational prompts go through the tokenizer's chat template with
the generation prompt (``chat_template_kwargs`` passed on); plain strings are tokenized as they are,
with the tokenizer's special tokens (a BOS where the tokenizer adds one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from preftune.data.pipeline import is_stream


def is_conversational(prompt) -> bool:
    """A message list: ``[{"role": ..., "content": ...}, ...]``."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)


def encode_prompt(tokenizer, prompt, *, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of one prompt (see the module docstring); at least one token."""
    if is_conversational(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational prompts (message lists) need a tokenizer with a chat template; "
                             "tokenizer.chat_template is empty: set one, or give the prompts as plain strings")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                            return_dict=False, **(chat_template_kwargs or {}))
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding either way
            ids = ids["input_ids"]
        ids = list(ids)
    elif isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        raise TypeError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got "
                        f"{type(prompt).__name__}")
    if not ids:  # an empty string with a tokenizer that adds nothing: the model needs one token to predict from
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return [int(i) for i in ids]


@dataclass
class PromptSet:
    """The prompt rows of one split: the rows as given, their columns, and the prompts' token ids."""

    name: str
    rows: list[dict]
    prompt_ids: list[list[int]]
    columns: list[str] = field(default_factory=list)  # every column but "prompt", passed to reward functions
    conversational: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    def column_lists(self, indices: Sequence[int]) -> dict[str, list]:
        """{column: [value of each row in indices]} for the reward functions."""
        return {c: [self.rows[i].get(c) for i in indices] for c in self.columns}


def to_rows(dataset, *, name: str, need: int | None = None, bad_rows: str = "error") -> list[dict]:
    """A dataset argument (datasets.Dataset / IterableDataset, list of dicts, or a file/folder/hub name) as a
    list of dict rows. A stream is read in its order up to ``need`` rows."""
    from preftune.data.formats import load_rows

    if is_stream(dataset):
        rows = []
        for row in dataset:
            rows.append(dict(row))
            if need is not None and len(rows) >= need:
                break
        return rows
    if isinstance(dataset, (str,)) or hasattr(dataset, "__fspath__"):
        dataset = load_rows(dataset, bad_rows=bad_rows)
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    rows = list(dataset)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{name} row {i} is a {type(row).__name__}; each row must be a dict with a 'prompt'")
    return [dict(r) for r in rows]


def prepare_prompts(dataset, tokenizer, *, name: str, chat_template_kwargs: dict | None = None,
                    need: int | None = None, bad_rows: str = "error") -> PromptSet:
    """Rows -> `PromptSet`, with an error naming the row for a missing or malformed prompt."""
    rows = to_rows(dataset, name=name, need=need, bad_rows=bad_rows)
    if not rows:
        raise ValueError(f"{name} has no rows; GRPO needs prompts (a 'prompt' column)")
    ids, conv = [], None
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"{name} row {i} has no 'prompt' column (columns: {sorted(row)}); GRPO's data is "
                             "prompt-only: rename the column holding the prompt to 'prompt'")
        c = is_conversational(row["prompt"])
        if conv is None:
            conv = c
        elif c != conv:
            raise ValueError(f"{name} row {i}: its prompt is {'a message list' if c else 'a string'} but row 0's is "
                             f"{'a message list' if conv else 'a string'}; use one kind throughout")
        try:
            ids.append(encode_prompt(tokenizer, row["prompt"], chat_template_kwargs=chat_template_kwargs))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name} row {i}: {e}") from e
    columns = sorted({k for row in rows for k in row} - {"prompt"})
    return PromptSet(name, rows, ids, columns, bool(conv))


def prompt_order(num_prompts: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The order an epoch draws its prompts in: a permutation seeded by (seed, epoch), or as given."""
    if not shuffle:
        return list(range(num_prompts))
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_prompts, generator=gen).tolist()


def row_seed(seed: int, round_index: int, slot: int) -> int:
    """The sampling seed of one completion: fixed by the run's seed, the generation round and the
    completion's place in the round's global batch, whatever process generates it."""
    x = (int(seed) * 0x9E3779B1 + int(round_index) * 0x85EBCA77 + int(slot) * 0xC2B2AE3D) & ((1 << 63) - 1)
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return x ^ (x >> 32)
