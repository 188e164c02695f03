"""preftune.dpo: the per-pair losses of a micro-batch, LD-DPO (ld_alpha) and WPO (use_weighting) against
their formulas written out on full logits, in training, evaluation and the reference pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_trainer import config, conversational_rows, make_trainer, train_rows

from preftune.data.batching import collate
from preftune.dpo import DPOObjective
from preftune.reference import FrozenModelReference
from preftune.testing import tiny_model

VOCAB = 300
BETA = 0.1


def _token_stats(model, batch):
    """Per response (R = 2B, chosen rows first): the completion tokens' log p and log sum_v p_v^2, from the
    full (R, T, V) logits of a padded batch: the plain twin of the chunked head."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits.double()
    logp_all = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    out = []
    for r in range(labels.shape[0]):
        keep = labels[r] != -100
        lp = logp_all[r][keep]  # (n, V)
        tok = lp.gather(-1, labels[r][keep].unsqueeze(-1)).squeeze(-1)
        out.append((tok, torch.logsumexp(2 * lp, -1)))
    return out


def _expected(policy, ref, batch, *, ld_alpha=None, wpo=False):
    """-log sigmoid(beta (pi_c - ref_c - pi_r + ref_r)) times the WPO weight, written out per pair."""
    pol, rf = _token_stats(policy, batch), _token_stats(ref, batch)
    b = len(pol) // 2
    losses = []
    for i in range(b):
        def summed(stats, j, public):
            tok = stats[j][0]
            if ld_alpha is None:
                return float(tok.sum())
            return float(tok[:public].sum() + ld_alpha * tok[public:].sum())

        public = min(len(pol[i][0]), len(pol[b + i][0]))
        margin = (summed(pol, i, public) - summed(rf, i, public)) - (summed(pol, b + i, public) - summed(rf, b + i, public))
        loss = -math.log(1 / (1 + math.exp(-BETA * margin)))
        if wpo:
            a = lambda j: float((pol[j][0] - pol[j][1]).mean())  # noqa: E731
            loss *= math.exp(a(i) + a(b + i))
        losses.append(loss)
    return torch.tensor(losses, dtype=torch.float64)


def _models():
    torch.manual_seed(0)
    policy = tiny_model(VOCAB)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval(), ref.eval()


@pytest.mark.parametrize("layout", ["padded", "prefix"])
@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.3}, {"use_weighting": True}, {"ld_alpha": 0.0, "use_weighting": True}])
def test_pair_losses_match_the_written_out_formula(tmp_path, layout, options):
    trainer = make_trainer(tmp_path, conversational_rows(6), beta=BETA, **options)
    policy, ref = _models()
    feats = list(trainer.train_split.features)
    pad = trainer.tokenizer.pad_token_id
    got, _ = trainer.objective.pair_losses(policy, collate(feats, layout=layout, pad_token_id=pad), FrozenModelReference(ref))
    want = _expected(policy, ref, collate(feats, layout="padded", pad_token_id=pad),
                     ld_alpha=options.get("ld_alpha"), wpo=options.get("use_weighting", False))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    if options:  # the option changes the numbers (the pairs' lengths differ, the weights are not 1)
        plain = _expected(policy, ref, collate(feats, layout="padded", pad_token_id=pad))
        assert (got.double() - plain).abs().max() > 1e-4


def test_runs_with_each_option_differ_and_precomputed_equals_live(tmp_path):
    rows = conversational_rows(8)
    plain = make_trainer(tmp_path, rows, name="plain", max_steps=3)
    plain.train()
    for options in ({"ld_alpha": 0.2}, {"use_weighting": True}):
        tag = "_".join(options)
        live = make_trainer(tmp_path, rows, name=f"live_{tag}", max_steps=3, precompute_ref_log_probs=False, **options)
        live.train()
        cached = make_trainer(tmp_path, rows, name=f"cached_{tag}", max_steps=3, precompute_ref_log_probs=True,
                              **options)
        cached.train()
        a, b, p = train_rows(live), train_rows(cached), train_rows(plain)
        for x, y in zip(a, b, strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert any(abs(x["loss"] - y["loss"]) > 1e-6 for x, y in zip(a, p, strict=True)), (options, a, p)


def test_ld_alpha_is_part_of_the_reference_cache_key(tmp_path):
    from preftune.reference import reference_cache_key

    parts = dict(model_id="m", model_fingerprint="w", tokenizer_fingerprint="t", data_fingerprint="d", max_length=8,
                 max_prompt_length=None, max_completion_length=None, truncation_mode="keep_end", chat_template=None)
    plain = reference_cache_key(**parts)
    assert reference_cache_key(**parts, ld_alpha=None) == plain  # plain tables keep their key
    assert len({plain, reference_cache_key(**parts, ld_alpha=0.5), reference_cache_key(**parts, ld_alpha=0.6)}) == 3
    cfg = config(tmp_path, ld_alpha=0.5, use_weighting=True)
    objective = DPOObjective.from_args(cfg)
    assert objective.reference_kwargs == {"ld_alpha": 0.5} and objective.wpo
    trainer = make_trainer(tmp_path, conversational_rows(4), name="key", ld_alpha=0.5)
    assert trainer._cache_key_parts(None)["ld_alpha"] == 0.5
