"""preftune.data.batching: the layouts, checked by hand and against each other (prefix_packed by hand in test_attention.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

from preftune.data.batching import IGNORE_INDEX, collate

PAD = 0
FEATS = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12], "index": 4},
    {"prompt_ids": [20], "chosen_ids": [30], "rejected_ids": [31, 32], "index": 9},
]


def per_segment(batch):
    """{segment: [targets in order]} from a batch's flat (positions, targets, segments)."""
    out: dict[int, list[int]] = {}
    for t, s in zip(batch["targets"].tolist(), batch["segments"].tolist()):
        out.setdefault(s, []).append(t)
    return out


def test_padded_by_hand():
    b = collate(FEATS, layout="padded", pad_token_id=PAD)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, PAD],
        [20, 30, PAD, PAD, PAD, PAD],
        [5, 6, 7, 10, 11, 12],
        [20, 31, 32, PAD, PAD, PAD],
    ]
    assert b["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]
    assert b["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4]
    assert b["labels"].tolist() == [
        [-100, -100, -100, 8, 9, -100],
        [-100, 30, -100, -100, -100, -100],
        [-100, -100, -100, 10, 11, 12],
        [-100, 31, 32, -100, -100, -100],
    ]
    # chosen of pair 0 predicted from flat 2, 3; chosen of pair 1 from row 1 offset 0 -> flat 6
    assert b["positions"].tolist() == [2, 3, 6, 14, 15, 16, 18, 19]
    assert b["segments"].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    assert b["targets"].tolist() == [8, 9, 30, 10, 11, 12, 31, 32]
    assert b["num_pairs"] == 2 and b["pair_index"].tolist() == [4, 9]
    assert b["num_tokens"] == 5 + 2 + 6 + 3


def test_padded_labels_match_positions():
    b = collate(FEATS, layout="padded", pad_token_id=PAD, pad_to_multiple_of=8)
    assert b["input_ids"].shape[1] == 8
    shifted = b["labels"][:, 1:]  # position t predicts labels[t+1]
    R, T = b["input_ids"].shape
    flat = torch.nonzero(shifted.reshape(R, T - 1) != IGNORE_INDEX)
    assert (flat[:, 0] * T + flat[:, 1]).tolist() == b["positions"].tolist()


def test_packed_one_row_and_transformers_sees_the_sequences():
    b = collate(FEATS, layout="packed", pad_token_id=PAD, pad_to_multiple_of=8)
    lengths = [5, 2, 6, 3]  # prompt+chosen x2, prompt+rejected x2
    assert b["input_ids"].shape == (1, 16) and b["attention_mask"] is None
    pos = b["position_ids"][0].tolist()
    assert pos == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert b["num_tokens"] == sum(lengths)
    # transformers builds its block-diagonal mask from these ids: one block per sequence (+ tail pad)
    seq = find_packed_sequence_indices(b["position_ids"])[0].tolist()
    assert seq == [0] * 5 + [1] * 2 + [2] * 6 + [3] * 3
    # next-token consistency: the token after each position is its target
    assert b["input_ids"].view(-1)[b["positions"] + 1].tolist() == b["targets"].tolist()


def test_prefix_positions_and_mask():
    b = collate(FEATS, layout="prefix", pad_token_id=PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [20, 30, 31, 32, 0, 0, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert b["position_ids"][1, :4].tolist() == [0, 1, 1, 2]
    # the last prompt token (flat 2 and 8) predicts both chosen[0] and rejected[0]
    assert b["positions"].tolist() == [2, 3, 2, 5, 6, 8, 8, 10]
    assert b["segments"].tolist() == [0, 0, 2, 2, 2, 1, 3, 3]
    assert b["targets"].tolist() == [8, 9, 10, 11, 12, 30, 31, 32]
    assert b["num_tokens"] == 8 + 4
    m = b["attention_mask"]
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    m0 = m[0, 0].int().tolist()
    assert m0[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # chosen[1]: prompt + chosen, causal
    assert m0[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected[0]: prompt + itself, no chosen
    assert m0[7] == [1, 1, 1, 0, 0, 1, 1, 1]
    m1 = m[1, 0].int().tolist()
    assert m1[3] == [1, 0, 1, 1, 0, 0, 0, 0]
    assert m1[6] == [0, 0, 0, 0, 0, 0, 1, 0]  # pad query sees only itself (no NaN row)
    assert all(row.any() for row in m.view(-1, 8))


def test_single_pair_and_errors():
    for layout in ("padded", "packed", "prefix"):
        b = collate(FEATS[1:], layout=layout, pad_token_id=PAD)
        assert b["num_pairs"] == 1 and b["pair_index"].tolist() == [9]
        assert per_segment(b) == {0: [30], 1: [31, 32]}
    with pytest.raises(ValueError, match="empty list"):
        collate([], layout="packed", pad_token_id=PAD)
    with pytest.raises(ValueError, match="layout"):
        collate(FEATS, layout="ragged", pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(FEATS, layout="padded", pad_token_id=None)
    bad = [dict(FEATS[0], chosen_ids=[])]
    with pytest.raises(ValueError, match="index=4.*'chosen_ids'"):
        collate(bad, layout="padded", pad_token_id=PAD)


ids = st.lists(st.integers(1, 50), min_size=1, max_size=6)
pairs = st.lists(st.fixed_dictionaries({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids}), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(pairs, st.sampled_from([None, 1, 8]))
def test_layouts_agree_on_what_is_predicted(raw, multiple):
    feats = [dict(f, index=i) for i, f in enumerate(raw)]
    B = len(feats)
    expected = {i: f["chosen_ids"] for i, f in enumerate(feats)} | {B + i: f["rejected_ids"] for i, f in enumerate(feats)}
    for layout in ("padded", "packed", "prefix"):
        b = collate(feats, layout=layout, pad_token_id=PAD, pad_to_multiple_of=multiple)
        assert per_segment(b) == expected
        R, T = b["input_ids"].shape
        assert b["position_ids"].shape == (R, T) and int(b["positions"].max()) < R * T - 1
        if layout != "prefix":  # prefix: rejected[0] is predicted from the prompt, not its left neighbour
            assert b["input_ids"].view(-1)[b["positions"] + 1].tolist() == b["targets"].tolist()
        else:  # each predicting query may attend its own position, and rejected never sees chosen
            mask = b["attention_mask"][:, 0]
            assert mask.view(-1, T)[b["positions"], b["positions"] % T].all()


def test_prefix_mask_is_built_on_the_requested_device():
    # the (R, 1, T, T) mask is the one large tensor of a batch: it is made where the model runs
    # (on "meta" here, which refuses any operand left on the CPU), the rest stays on the CPU
    b = collate(FEATS, layout="prefix", pad_token_id=PAD, pad_to_multiple_of=8, device="meta")
    ref = collate(FEATS, layout="prefix", pad_token_id=PAD, pad_to_multiple_of=8)
    assert b["attention_mask"].device.type == "meta" and b["attention_mask"].shape == ref["attention_mask"].shape
    assert b["input_ids"].device.type == "cpu" and torch.equal(b["input_ids"], ref["input_ids"])
    same = collate(FEATS, layout="prefix", pad_token_id=PAD, pad_to_multiple_of=8, device="cpu")
    assert torch.equal(same["attention_mask"], ref["attention_mask"])
