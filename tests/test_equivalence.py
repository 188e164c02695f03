"""The four batch layouts are the same math: log-probs, gradients and one trainer step.

The slow obvious twin everywhere is the plain path: each response alone, ``prompt + response``
unpadded through the model, full (T, V) logits, ``logps_from_logits`` (eq 6.3 with the mask of
eq 6.7/6.8). Padded, packed, prefix-shared and prefix-shared packed batches must give its per-response log-probs (1e-5,
float32) and its gradients, and one optimizer step of ``DPOTrainer`` under each ``batch_layout``
must give the weights that the plain path with ``torch.optim.AdamW`` gives. Prompts of different
lengths share a batch, and some pairs are truncated by ``max_length``. No timings are asserted.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from preftune.data.batching import LAYOUTS, collate
from preftune.logps import logps_from_logits, model_logps
from preftune.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)


def plain_logps(model, feats) -> torch.Tensor:
    """(2B,) float32: chosen of pair i at i, rejected at B + i; one unpadded sequence per response."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for f in feats:
            ids = torch.tensor([f["prompt_ids"] + f[key]])  # (1, T)
            labels = ids.clone()
            labels[:, : len(f["prompt_ids"])] = -100
            logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
            out.append(logps_from_logits(logits, labels)[0][0])
    return torch.stack(out)


def random_features(n: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]

    # prompt lengths 1..23 in one batch; a 1-token response, and pairs whose responses share a prefix
    feats = [dict(prompt_ids=ids(1, 23), chosen_ids=ids(1, 12), rejected_ids=ids(1, 12), index=i) for i in range(n)]
    feats[0]["chosen_ids"] = feats[0]["chosen_ids"][:1]
    feats[1]["rejected_ids"] = feats[1]["chosen_ids"][:3] + ids(2, 4)
    return feats


def grads_of(model, logps: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logps * weights).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_layouts_match_plain_path_values_and_grads(chunk_size):
    model = tiny_model(vocab_size=64, seed=1)
    feats = random_features(5, 64, seed=3)
    weights = torch.randn(10, generator=torch.Generator().manual_seed(0))  # mixes every response's gradient
    want = plain_logps(model, feats)
    want_grads = grads_of(model, want, weights)
    for layout in LAYOUTS:
        batch = collate(feats, layout=layout, pad_token_id=0, pad_to_multiple_of=8 if layout == "padded" else None)
        got = model_logps(model, batch, chunk_size=chunk_size)
        got = torch.cat([got.chosen_logps, got.rejected_logps])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m, lay=layout: f"{lay}: {m}")
        for g, w in zip(grads_of(model, got, weights), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, lay=layout: f"{lay} grad: {m}")


def test_layouts_match_each_other_under_inference_mode():
    """The reference pass (no autograd) gives the same numbers as the training pass, in every layout."""
    model = tiny_model(vocab_size=64, seed=2)
    feats = random_features(4, 64, seed=4)
    with torch.no_grad():
        want = plain_logps(model, feats)
    for layout in LAYOUTS:
        with torch.inference_mode():
            r = model_logps(model, collate(feats, layout=layout, pad_token_id=0), chunk_size=3)
        torch.testing.assert_close(torch.cat([r.chosen_logps, r.rejected_logps]), want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# One DPOTrainer step per layout == the plain path with torch's AdamW


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(3, 26), "chosen": text(4, 30), "rejected": text(4, 30)} for _ in range(n)]


MAX_LENGTH = 36  # prompt + longest response above can reach 56: several pairs get truncated
LR, EPS, BETA = 0.05, 1.0, 0.1  # adam eps 1 keeps the first update ~ lr * g / (|g| + 1): smooth in g


def _trainer(layout: str, tmp_path, rows):
    from preftune import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / layout), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
        max_steps=1, learning_rate=LR, adam_epsilon=EPS, weight_decay=0.0, max_grad_norm=0.0, beta=BETA,
        max_length=MAX_LENGTH, max_prompt_length=None, warmup_steps=0, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", batch_layout=layout,
        logps_chunk_size=7, use_cpu=True, seed=0,
    )
    return DPOTrainer(model=tiny_model(vocab_size=len(tiny_tokenizer()), seed=5), args=args,
                      train_dataset=rows, processing_class=tiny_tokenizer())


def _plain_step(feats) -> dict:
    """The same step by hand: plain log-probs, DPO loss (eq 6.13 mean over pairs), torch's AdamW."""
    model = tiny_model(vocab_size=len(tiny_tokenizer()), seed=5)
    with torch.no_grad():
        ref = plain_logps(model, feats)  # the reference is the initial policy
    B = len(feats)
    pol = plain_logps(model, feats)
    margin = (pol[:B] - ref[:B]) - (pol[B:] - ref[B:])
    loss = -F.logsigmoid(BETA * margin).mean()
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0).step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_one_trainer_step_is_the_same_under_every_layout(tmp_path):
    rows = _rows(6, seed=7)
    start = {k: v.clone() for k, v in tiny_model(vocab_size=len(tiny_tokenizer()), seed=5).state_dict().items()}
    after, feats = {}, None
    for layout in LAYOUTS:
        t = _trainer(layout, tmp_path, rows)
        feats = [t.train_split.features[i] for i in range(len(t.train_split))]
        t.train()
        after[layout] = {k: v.detach() for k, v in t.accelerator.unwrap_model(t.model).state_dict().items()}
    lengths = [(len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])) for f in feats]
    assert len(feats) == len(rows)
    assert any(p + max(c, r) == MAX_LENGTH for p, c, r in lengths), f"no pair was truncated: {lengths}"
    assert len({p for p, _, _ in lengths}) > 2, "the prompts should have different lengths"
    want = _plain_step(feats)
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    assert moved > 1e-3, "the step should move the weights visibly"
    for layout, state in after.items():
        for k, v in want.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=2e-6, msg=lambda m, lay=layout, k=k: f"{lay} {k}: {m}")
