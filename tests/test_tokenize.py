"""Tokenizing pairs: prefix property, BOS/EOS handling, templates that break it, truncation."""

from __future__ import annotations

import hashlib
import json
import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.data.formats import PreferencePair, load_rows, normalize
from preftune.data.tokenize import Dropped, fingerprint, tokenize_dataset, tokenize_pair, truncate_pair
from preftune.testing import CHATML_TEMPLATE, tiny_tokenizer

PLAIN_TEMPLATE = (  # no end-of-turn token, no BOS: "user: hi\nassistant: "
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Renders the user turns differently when a reply follows: the prompt is no prefix of prompt+reply.
REPLY_AWARE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' and messages[-1]['role'] == 'assistant' %}[answered] {% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conv(prompt="Hi there", chosen="Hello!", rejected="Go away.", index=0):
    return PreferencePair([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen}],
                          [{"role": "assistant", "content": rejected}], "conversational", f"row {index}", index)


def std(prompt="The sky is", chosen=" blue.", rejected=" green.", index=0):
    return PreferencePair(prompt, chosen, rejected, "standard", f"row {index}", index)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- standard pairs


def test_standard_pair_without_bos():
    tok = tiny_tokenizer()
    out = tokenize_pair(std(), tok)
    assert out == {"prompt_ids": ids(tok, "The sky is"), "chosen_ids": ids(tok, " blue.") + [tok.eos_token_id],
                   "rejected_ids": ids(tok, " green.") + [tok.eos_token_id], "index": 0}


def test_standard_pair_with_bos_matches_tokenizer_call():
    tok = tiny_tokenizer(bos=True)
    out = tokenize_pair(std(), tok)
    assert out["prompt_ids"] == tok("The sky is")["input_ids"]  # BOS once, as the tokenizer adds it
    assert out["prompt_ids"][0] == tok.bos_token_id and out["prompt_ids"].count(tok.bos_token_id) == 1
    assert tok.bos_token_id not in out["chosen_ids"]
    # A prompt that already starts with the BOS text gets no second one.
    assert tokenize_pair(std(prompt="<|im_start|>The sky is"), tok)["prompt_ids"] == out["prompt_ids"]


def test_eos_appended_once():
    tok = tiny_tokenizer()
    out = tokenize_pair(std(chosen=" blue.<|im_end|>"), tok)
    assert out["chosen_ids"] == ids(tok, " blue.") + [tok.eos_token_id]
    assert out["rejected_ids"][-1] == tok.eos_token_id and out["rejected_ids"].count(tok.eos_token_id) == 1


@pytest.mark.parametrize("bos", [False, True])
def test_empty_prompt_gets_one_token(bos):
    tok = tiny_tokenizer(bos=bos)
    out = tokenize_pair(std(prompt=""), tok)
    assert out["prompt_ids"] == [tok.bos_token_id if bos else tok.eos_token_id]


# ----------------------------------------------------------------------------- conversational pairs


@pytest.mark.parametrize("bos", [False, True])
def test_conversational_prefix_property(bos):
    tok = tiny_tokenizer(bos=bos)
    pair = conv()
    out = tokenize_pair(pair, tok)
    for key, reply in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
        full = tok.apply_chat_template(pair.prompt + reply, tokenize=False)
        assert out["prompt_ids"] + out[key] == ids(tok, full)  # the rendered text starts with <|im_start|>
    prompt_text = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    assert out["prompt_ids"] == ids(tok, prompt_text)
    assert tok.decode(out["chosen_ids"]) == "Hello!<|im_end|>\n"  # template end tokens kept, EOS inside


def test_no_double_bos_when_template_renders_it():
    tok = tiny_tokenizer(bos=True)
    tok.chat_template = CHATML_TEMPLATE.replace("add_bos_in_template", "true")
    out = tokenize_pair(conv(), tok)
    text = tok.apply_chat_template(conv().prompt, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|><|im_start|>user")  # the template's BOS, then the turn marker
    assert out["prompt_ids"] == ids(tok, text)  # and not a third <|im_start|> from the tokenizer
    assert tok(text)["input_ids"][:3] == [tok.bos_token_id] * 3


def test_bos_added_and_eos_appended_for_a_plain_template():
    tok = tiny_tokenizer(bos=True)
    out = tokenize_pair(conv(), tok, chat_template=PLAIN_TEMPLATE)
    assert out["prompt_ids"] == [tok.bos_token_id] + ids(tok, "user: Hi there\nassistant: ")
    assert out["chosen_ids"] == ids(tok, "Hello!\n") + [tok.eos_token_id]


def test_missing_chat_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat template: pass a tokenizer with a chat template, or set `chat_template`"):
        tokenize_dataset([conv()], tok)
    assert tokenize_dataset([std()], tok)[0]["prompt_ids"] == ids(tok, "The sky is")  # strings need none
    assert len(tokenize_dataset([conv()], tok, chat_template=CHATML_TEMPLATE.replace("add_bos_in_template", "false"))) == 1


def test_template_breaking_prefix_tokenizes_apart_and_warns_once(caplog):
    tok = tiny_tokenizer()
    tok.chat_template = REPLY_AWARE_TEMPLATE
    pairs = [conv(index=i, prompt=f"q{i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="preftune.data.tokenize"):
        out = tokenize_dataset(pairs, tok)
    warnings = [r for r in caplog.records if "prefix" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 3 pairs" in warnings[0].getMessage()
    assert out.template_note is not None and "3 of 3" in out.template_note
    prompt_text = tok.apply_chat_template(pairs[0].prompt, tokenize=False, add_generation_prompt=True)
    assert not tok.apply_chat_template(pairs[0].prompt + pairs[0].chosen, tokenize=False).startswith(prompt_text)
    assert out[0]["prompt_ids"] == ids(tok, prompt_text)  # what the model sees when generating
    assert out[0]["chosen_ids"] == ids(tok, "Hello!<|im_end|>\n")
    assert out[0]["rejected_ids"] == ids(tok, "Go away.<|im_end|>\n")
    assert tokenize_dataset(pairs, tiny_tokenizer()).template_note is None


def test_template_hiding_the_reply_is_an_error():
    tok = tiny_tokenizer()
    tok.chat_template = REPLY_AWARE_TEMPLATE.replace("m['content']", "m['content'][::-1]")
    with pytest.raises(ValueError, match="reply's text cannot be located.*set `chat_template`"):
        tokenize_dataset([conv()], tok)


def merging_tokenizer():
    """tiny_tokenizer plus one BPE merge, "\\n" + "H", so a token spans the prompt/reply boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer()
    vocab = dict(base.get_vocab())
    vocab["ĊH"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "H")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = base.chat_template
    return tok


def test_token_merging_across_the_boundary_tokenizes_apart(caplog):
    tok = merging_tokenizer()
    assert ids(tok, "\nH") == [tok.convert_tokens_to_ids("ĊH")]
    with caplog.at_level(logging.WARNING, logger="preftune.data.tokenize"):
        out = tokenize_dataset([conv(), conv(chosen="ok", rejected="no")], tok)
    assert "1 of 2 pairs" in out.template_note
    prompt_text = tok.apply_chat_template(conv().prompt, tokenize=False, add_generation_prompt=True)
    assert out[0]["prompt_ids"] == ids(tok, prompt_text)
    assert out[0]["chosen_ids"] == ids(tok, "Hello!<|im_end|>\n")
    assert tok.decode(out[0]["prompt_ids"] + out[0]["chosen_ids"]) == tok.apply_chat_template(
        conv().prompt + conv().chosen, tokenize=False)


# ----------------------------------------------------------------------------- truncation


def test_truncation_cases_by_hand():
    p, c, r = list(range(10)), [20, 21, 22, 23, 24], [30, 31, 32]
    assert truncate_pair(p, c, r, max_prompt_length=4) == ([6, 7, 8, 9], c, r)  # keep_end
    assert truncate_pair(p, c, r, max_prompt_length=4, truncation_mode="keep_start") == ([0, 1, 2, 3], c, r)
    assert truncate_pair(p, c, r, max_prompt_length=4, keep_first=1) == ([0, 7, 8, 9], c, r)  # BOS kept
    assert truncate_pair(p, c, r, max_completion_length=2) == (p, [20, 21], [30, 31])
    start = dict(truncation_mode="keep_start")  # no prompt limit: the prompt stays whole, responses are cut
    assert truncate_pair(p, c, r, max_length=12, **start) == (p, [20, 21], [30, 31])  # budget 12 - 10 = 2
    assert truncate_pair(p, c, r, max_length=13, **start) == (p, c[:3], r)
    assert truncate_pair(p, c, r, max_length=15, **start) == (p, c, r)
    assert truncate_pair(p, c, r, max_length=10, **start) == Dropped("prompt_too_long")
    assert truncate_pair(p, c, r, max_length=10, max_prompt_length=6) == (p[4:], c[:4], r)
    # keep_end, no prompt limit: the prompt loses its first tokens until it fits beside the longer response
    assert truncate_pair(p, c, r, max_length=12) == (p[3:], c, r)  # 12 - 5 = 7 prompt tokens
    assert truncate_pair(p, c, r, max_length=12, keep_first=1) == ([0, *p[4:]], c, r)  # BOS kept
    assert truncate_pair(p, c, r, max_length=15) == (p, c, r)
    assert truncate_pair(p, c, r, max_length=10, max_completion_length=2) == (p[2:], c[:2], r[:2])
    # the longer response alone fills max_length: the prompt keeps its last token, the responses their first
    assert truncate_pair(p, c, r, max_length=4) == ([9], c[:3], r)
    assert truncate_pair(p, [], r) == Dropped("empty_response")
    assert not Dropped("x")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.integers(1, 8),
       st.one_of(st.none(), st.integers(1, 20)), st.one_of(st.none(), st.integers(1, 8)),
       st.one_of(st.none(), st.integers(1, 6)), st.sampled_from(["keep_end", "keep_start"]))
def test_truncation_invariants(lp, lc, lr, max_length, max_prompt, max_completion, mode):
    p, c, r = list(range(lp)), list(range(100, 100 + lc)), list(range(200, 200 + lr))
    out = truncate_pair(p, c, r, max_length=max_length, max_prompt_length=max_prompt,
                        max_completion_length=max_completion, truncation_mode=mode)
    lp2 = min(lp, max_prompt or lp)
    if max_prompt is None and max_length is not None and mode == "keep_end":  # cut as one sequence
        longest = min(max(lc, lr), max_completion or 10**9)
        lp2 = min(lp, max(max_length - longest, 1))
    budget = (max_length - lp2) if max_length is not None else 10**9
    if budget < 1:
        assert out == Dropped("prompt_too_long")
        return
    p2, c2, r2 = out
    assert p2 == (p[:lp2] if mode == "keep_start" else p[lp - lp2 :])
    n = min(budget, max_completion or 10**9)
    assert c2 == c[:n] and r2 == r[:n]
    assert max_length is None or len(p2) + max(len(c2), len(r2)) <= max_length


def test_dataset_drops_and_renumbers():
    tok = tiny_tokenizer()
    pairs = [std(prompt="x" * n, index=i) for i, n in enumerate([3, 50, 4, 60])]
    out = tokenize_dataset(pairs, tok, max_length=20, truncation_mode="keep_start")
    assert out.dropped == {"prompt_too_long": 2}
    assert [f["index"] for f in out] == [0, 1] and [p.index for p in out.pairs] == [0, 2]
    assert out[1]["prompt_ids"] == ids(tok, "xxxx")
    out = tokenize_dataset(pairs, tok, max_length=20, max_prompt_length=10)
    assert len(out) == 4 and not out.dropped
    assert all(len(f["prompt_ids"]) <= 10 and len(f["prompt_ids"]) + len(f["chosen_ids"]) <= 20 for f in out)
    out = tokenize_dataset(pairs, tok, max_length=20)  # keep_end, no prompt limit: prompts lose their start
    assert len(out) == 4 and not out.dropped
    for f, pair in zip(out, pairs):
        longest = max(len(f["chosen_ids"]), len(f["rejected_ids"]))
        assert len(f["prompt_ids"]) + longest <= 20
        whole = tokenize_pair(pair, tok, max_length=None)
        assert f["chosen_ids"] == whole["chosen_ids"] and f["rejected_ids"] == whole["rejected_ids"]


def test_keep_end_without_prompt_limit_cuts_like_one_sequence():
    """The obvious twin: the longer response's sequence prompt + response, cut to its last max_length tokens,
    leaves exactly the prompt that truncate_pair keeps (shorter responses fit beside it)."""
    p, long_, short = list(range(40)), list(range(100, 112)), list(range(200, 205))
    for max_length in range(13, 60):
        out = truncate_pair(p, long_, short, max_length=max_length)
        sequence = (p + long_)[-max_length:]
        assert out == (sequence[: len(sequence) - len(long_)], long_, short), max_length


def test_tokenize_pair_reports_drop_reason():
    out = tokenize_pair(std(prompt="x" * 30), tiny_tokenizer(), max_length=10, truncation_mode="keep_start")
    assert out == Dropped("prompt_too_long") and not out


@pytest.mark.parametrize("kw", [dict(max_length=0), dict(max_prompt_length=-1), dict(max_completion_length=1.5),
                                dict(truncation_mode="middle")])
def test_bad_options(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        tokenize_dataset([std()], tiny_tokenizer(), **kw)


def test_million_character_row_is_truncated(tmp_path):
    path = tmp_path / "big.jsonl"
    big = [{"role": "assistant", "content": "y" * 1_000_000}]
    path.write_text(json.dumps({"prompt": "p", "chosen": big, "rejected": [{"role": "assistant", "content": "n"}]}))
    out = tokenize_dataset(normalize(load_rows(path)), tiny_tokenizer(), max_length=64)
    assert len(out) == 1 and len(out[0]["prompt_ids"]) + len(out[0]["chosen_ids"]) == 64
    assert out[0]["rejected_ids"] == ids(tiny_tokenizer(), "n<|im_end|>\n")


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_matches_a_plain_sha256():
    tok = tiny_tokenizer()
    out = tokenize_dataset([std(), conv(index=1)], tok)
    h = hashlib.sha256()
    for f in out:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(struct.pack("<q", len(f[key])) + struct.pack(f"<{len(f[key])}q", *f[key]))
    assert out.fingerprint == h.hexdigest() == fingerprint(list(out))
    assert tokenize_dataset([std(), conv(index=1)], tok).fingerprint == out.fingerprint
    assert tokenize_dataset([std(), conv(index=1)], tok, max_length=8).fingerprint != out.fingerprint


def test_dataset_encodes_in_batches_with_the_ids_of_one_call_per_pair(monkeypatch):
    """The batched encoding (texts of many pairs per tokenizer call, chunk boundaries crossed, texts
    repeated across pairs) equals tokenizing each pair on its own, for standard and chat pairs,
    also where a template breaks the prefix property."""
    import preftune.data.tokenize as tk

    monkeypatch.setattr(tk, "_AHEAD", 3)
    pairs = [std(prompt=f"p{i % 2} is", chosen=" same.", rejected=f" r{i}.", index=i) for i in range(5)]
    pairs += [conv(prompt=f"q{i % 3}", chosen="Hello!", rejected=f"no {i}", index=5 + i) for i in range(5)]
    for template in (None, REPLY_AWARE_TEMPLATE):
        tok = tiny_tokenizer()
        if template:
            tok.chat_template = template
        batched_calls = []
        real_call = type(tok).__call__

        def counting(self, text, *a, _calls=batched_calls, _real=real_call, **k):
            if isinstance(text, list):
                _calls.append(len(text))
            return _real(self, text, *a, **k)

        with monkeypatch.context() as m:
            m.setattr(type(tok), "__call__", counting)
            out = tokenize_dataset(pairs, tok, max_length=40)
            one_by_one = [tokenize_pair(p, tok, max_length=40) for p in pairs]
        assert [dict(f, index=0) for f in out] == [dict(f, index=0) for f in one_by_one]
        assert len(batched_calls) == 4  # ceil(10 / 3) chunks of pairs, one call each
