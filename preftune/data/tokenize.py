"""`PreferencePair` -> tokenized pair (docs/CONTRACTS.md "Tokenized pair").

Each pair becomes ``{"prompt_ids", "chosen_ids", "rejected_ids", "index"}`` (lists of ints).

Standard (string) pairs: ``prompt_ids`` is the prompt with the tokenizer's BOS when it adds one;
each response is tokenized without special tokens and gets EOS appended unless it already ends
with it.

Conversational pairs: the prompt is rendered with the chat template and the generation prompt
(``add_generation_prompt=True``), and prompt + response as a whole conversation; both texts are
tokenized without special tokens, the tokenizer's BOS prepended only when the text does not
already start with it (no double BOS). The completion is the prompt+response ids after the prompt
ids, so it keeps the template's end tokens (``<|im_end|>\\n``); EOS is appended if it holds none.
Where a template breaks that prefix property (a token merges across the boundary, or the prompt is
rendered differently when a reply follows), the response text is tokenized on its own instead,
and one warning per dataset says so.

Truncation, in this order (P = prompt, C / R = chosen / rejected):

1. ``max_prompt_length``: ``keep_end`` keeps the last tokens of P (the part next to the reply;
   a leading BOS is kept too), ``keep_start`` the first ones.
2. ``max_completion_length``: C and R each keep their first tokens.
3. With ``max_prompt_length=None`` (no separate prompt limit) the pair is cut as one sequence, as
   TRL cuts prompt + completion to ``max_length``: ``keep_end`` drops the first tokens of P (a
   leading BOS kept) until P plus the longer response fits, keeping at least P's last token;
   ``keep_start`` leaves P whole for rule 4.
4. ``max_length`` bounds len(P) + max(len(C), len(R)): the responses are cut to
   ``max_length - len(P)``; if that is < 1 the pair is dropped with reason ``"prompt_too_long"``.
A pair left with an empty response is dropped (``"empty_response"``), never trained on.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from array import array
from collections import Counter
from dataclasses import dataclass

from preftune.data.formats import NormalizedData, PreferencePair

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass(frozen=True)
class Dropped:
    """Why a pair was not tokenized; falsy, so ``if not result`` treats it like None."""

    reason: str

    def __bool__(self) -> bool:
        return False


class TokenizedPairs(list):
    """A list of tokenized-pair dicts (``index`` = position in this list) plus bookkeeping.

    pairs: the kept `PreferencePair`s, aligned with the dicts; dropped: Counter of reasons;
    fingerprint: sha256 hex over all ids (the reference-cache key); template_note: set when some
    responses had to be tokenized apart from their prompt.
    """

    def __init__(self, features=(), *, pairs=(), dropped=None, template_note: str | None = None):
        super().__init__(features)
        self.pairs = list(pairs)
        self.dropped = Counter(dropped or {})
        self.template_note = template_note
        self.fingerprint = fingerprint(self)


def fingerprint(features) -> str:
    """sha256 hex of every pair's prompt/chosen/rejected ids, in order (lengths included)."""
    h = hashlib.sha256()
    for f in features:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = array("q", f[key])
            if sys.byteorder == "big":
                ids.byteswap()
            h.update(len(ids).to_bytes(8, "little"))
            h.update(ids.tobytes())
    return h.hexdigest()


class _Encoder:
    """Text -> ids with the tokenizer's special prefix (BOS) added once, and chat rendering."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tok = tokenizer
        self.chat_template = chat_template
        self._known: dict[str, list[int]] = {}  # texts encoded ahead by `encode_ahead`
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before tokenizing pairs")
        plain = self.plain("a")
        full = list(tokenizer("a")["input_ids"])
        at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
        self.prefix = full[:at]  # usually [bos] or []
        self.bos = tokenizer.bos_token_id

    def plain(self, text: str) -> list[int]:
        ids = self._known.get(text)
        return list(ids if ids is not None else self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_ahead(self, texts) -> None:
        """Encode ``texts`` in one batched tokenizer call, for the ``plain`` calls that follow; forgets
        what was encoded ahead before. A fast tokenizer encodes a batch on all cores and without the
        GIL, several times faster than one call per text (docs/benchmarks.md, construction). The ids are
        the same as one call per text."""
        todo = list(dict.fromkeys(texts))
        self._known = dict(zip(todo, self.tok(todo, add_special_tokens=False)["input_ids"])) if todo else {}

    def with_prefix(self, text: str) -> list[int]:
        ids = self.plain(text)
        if self.prefix and ids[: len(self.prefix)] != self.prefix:
            ids = self.prefix + ids
        return ids

    def render(self, messages: list, generation_prompt: bool) -> str:
        if self.chat_template is None and not getattr(self.tok, "chat_template", None):
            raise ValueError(
                "the data is conversational (message lists) but the tokenizer has no chat template: "
                "pass a tokenizer with a chat template, or set `chat_template`"
            )
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.chat_template
        )


def _response_text(enc: _Encoder, prompt: list, prompt_text: str, full_text: str, response: list) -> str:
    """The text of the response alone, when prompt_text is not a token prefix of full_text."""
    if full_text.startswith(prompt_text):  # a token merged across the boundary
        return full_text[len(prompt_text) :]
    # The template renders the prompt differently when a reply follows: the response starts where
    # the first response message's content starts in the full rendering (found with a marker).
    marker = "\u2063preftune-reply\u2063"
    first = dict(response[0], content=marker + (response[0].get("content") or ""))
    marked = enc.render(prompt + [first] + list(response[1:]), False)
    at = marked.find(marker)
    if at >= 0 and full_text[:at] == marked[:at]:
        return full_text[at:]
    raise ValueError(
        "the chat template renders the prompt differently when a reply follows, and the reply's text "
        "cannot be located in the rendering; pass a tokenizer whose template renders message content "
        "verbatim, or set `chat_template`"
    )


def _texts(pair: PreferencePair, enc: _Encoder) -> tuple[str, str, str]:
    """The texts ``_encode`` tokenizes: (prompt, chosen, rejected), or for a conversation the rendered
    prompt (with the generation prompt) and the two rendered whole conversations."""
    if pair.kind != "conversational":
        return pair.prompt, pair.chosen, pair.rejected
    return (enc.render(list(pair.prompt), True),
            *(enc.render(list(pair.prompt) + list(response), False) for response in (pair.chosen, pair.rejected)))


def _encode(pair: PreferencePair, enc: _Encoder,
            texts: tuple[str, str, str] | None = None) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt_ids, chosen_ids, rejected_ids, tokenized_apart) before truncation; ``texts`` =
    ``_texts(pair, enc)`` when the caller has them."""
    separate = False
    texts = texts or _texts(pair, enc)
    if pair.kind == "conversational":
        prompt_text = texts[0]
        prompt_ids = enc.with_prefix(prompt_text)
        responses = []
        for response, full_text in zip((pair.chosen, pair.rejected), texts[1:]):
            full_ids = enc.with_prefix(full_text)
            if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
                ids = full_ids[len(prompt_ids) :]
            else:
                separate = True
                ids = enc.plain(_response_text(enc, list(pair.prompt), prompt_text, full_text, list(response)))
            responses.append(ids if enc.eos in ids else ids + [enc.eos])
    else:
        prompt_ids = enc.with_prefix(texts[0])
        responses = []
        for text in texts[1:]:
            ids = enc.plain(text)
            responses.append(ids if ids and ids[-1] == enc.eos else ids + [enc.eos])
    if not prompt_ids:  # batching needs >= 1 prompt token
        prompt_ids = [enc.bos if enc.bos is not None else enc.eos]
    return prompt_ids, responses[0], responses[1], separate


def _check_options(max_length, max_prompt_length, max_completion_length, truncation_mode) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                        ("max_completion_length", max_completion_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be a positive integer or None (no limit)")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={truncation_mode!r}: use 'keep_end' or 'keep_start'")


def truncate_pair(prompt_ids, chosen_ids, rejected_ids, *, max_length=None, max_prompt_length=None,
                  max_completion_length=None, truncation_mode="keep_end", keep_first: int = 0):
    """Apply the truncation rules of the module docstring; returns (P, C, R) or `Dropped`.

    keep_first: leading prompt tokens (a BOS) that keep_end keeps when it cuts the prompt.
    """
    p, c, r = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_prompt_length is not None:
        p = _cut_prompt(p, max_prompt_length, truncation_mode, keep_first)
    if max_completion_length is not None:
        c, r = c[:max_completion_length], r[:max_completion_length]
    if max_prompt_length is None and max_length is not None and truncation_mode == "keep_end":
        room = max(max_length - max(len(c), len(r)), min(len(p), keep_first + 1))
        p = _cut_prompt(p, room, "keep_end", keep_first)
    if max_length is not None and len(p) + max(len(c), len(r)) > max_length:
        budget = max_length - len(p)
        if budget < 1:
            return Dropped("prompt_too_long")
        c, r = c[:budget], r[:budget]
    if not c or not r:
        return Dropped("empty_response")
    return p, c, r


def _cut_prompt(p: list, n: int, truncation_mode: str, keep_first: int) -> list:
    """The prompt ids cut to ``n`` tokens: the first ones (keep_start) or the last ones with the
    ``keep_first`` leading ones (a BOS) kept (keep_end)."""
    if len(p) <= n:
        return p
    if truncation_mode == "keep_start":
        return p[:n]
    if 0 < keep_first < n:
        return p[:keep_first] + p[len(p) - (n - keep_first) :]
    return p[len(p) - n :]


def _tokenize_one(pair, enc, opts, texts=None) -> tuple[dict | Dropped, bool]:
    prompt_ids, chosen_ids, rejected_ids, separate = _encode(pair, enc, texts)
    keep_first = len(enc.prefix) if enc.prefix and prompt_ids[: len(enc.prefix)] == enc.prefix else 0
    out = truncate_pair(prompt_ids, chosen_ids, rejected_ids, keep_first=keep_first, **opts)
    if isinstance(out, Dropped):
        return out, separate
    p, c, r = out
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "index": pair.index}, separate


def tokenize_pair(pair: PreferencePair, tokenizer, *, max_length=None, max_prompt_length=None,
                  max_completion_length=None, truncation_mode="keep_end", chat_template=None):
    """One pair -> a tokenized-pair dict (``index`` = pair.index), or `Dropped(reason)`."""
    opts = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                max_completion_length=max_completion_length, truncation_mode=truncation_mode)
    _check_options(**opts)
    out, separate = _tokenize_one(pair, _Encoder(tokenizer, chat_template), opts)
    if separate:
        logger.warning("%s: the chat template does not render the prompt as a prefix of prompt+response; "
                       "the response was tokenized on its own", pair.origin)
    return out


_AHEAD = 1024  # pairs per batched tokenizer call in tokenize_dataset


def tokenize_dataset(pairs, tokenizer, *, max_length=None, max_prompt_length=None, max_completion_length=None,
                     truncation_mode="keep_end", chat_template=None) -> TokenizedPairs:
    """Tokenize pairs (a list of `PreferencePair` or `NormalizedData`) -> `TokenizedPairs`.

    Dropped pairs are counted by reason in ``.dropped``; the kept ones are renumbered so that
    ``result[i]["index"] == i`` and ``result.pairs[i]`` is the source pair.
    """
    pairs = list(pairs.pairs if isinstance(pairs, NormalizedData) else pairs)
    opts = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                max_completion_length=max_completion_length, truncation_mode=truncation_mode)
    _check_options(**opts)
    enc = _Encoder(tokenizer, chat_template)
    features, kept, dropped, apart = [], [], Counter(), 0
    for start in range(0, len(pairs), _AHEAD):  # the texts of _AHEAD pairs encoded in one batched call
        chunk = pairs[start : start + _AHEAD]
        texts = [_texts(pair, enc) for pair in chunk]
        enc.encode_ahead(t for three in texts for t in three)
        for pair, three in zip(chunk, texts):
            out, separate = _tokenize_one(pair, enc, opts, three)
            apart += separate
            if isinstance(out, Dropped):
                dropped[out.reason] += 1
                continue
            out["index"] = len(features)
            features.append(out)
            kept.append(pair)
    enc.encode_ahead(())
    note = None
    if apart:
        note = (f"the chat template does not render the prompt as a prefix of prompt+response for {apart} "
                f"of {len(pairs)} pairs; their responses were tokenized on their own")
        logger.warning(note)
    return TokenizedPairs(features, pairs=kept, dropped=dropped, template_note=note)
