"""Mixture-of-experts models: the router's load-balancing loss in the DPO loss, as TRL adds it
(``router_aux_loss_coef * aux_loss``), full fine-tuning and LoRA (on attention, and on the experts'
weights through peft's ``target_parameters``), on a tiny Mixtral built in code."""

from __future__ import annotations

import pytest
import torch

from preftune import DPOConfig
from preftune.data.batching import collate
from preftune.dpo import DPOObjective
from preftune.logps import model_pair_logps
from preftune.models import router_aux_loss_coef
from preftune.testing import tiny_model, tiny_tokenizer
from tests.test_trainer import VOCAB, conversational_rows, make_trainer, train_rows

E, TOP_K = 4, 2


def tiny_mixtral(seed: int = 0, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=TOP_K, max_position_embeddings=512)
    kw.update(overrides)
    return MixtralForCausalLM(MixtralConfig(**kw))


def features(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(2, 7, (3,), generator=g))
        ids = lambda k: torch.randint(4, VOCAB, (k,), generator=g).tolist()  # noqa: E731
        out.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "index": i})
    return out


def written_out_aux(router_logits: tuple, real: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss written out: over every layer's real tokens, the share of
    top-k picks each expert gets times its mean router probability, summed over experts, times E."""
    probs = torch.cat([torch.softmax(r.float(), -1) for r in router_logits])  # (L * R * T, E)
    keep = real.reshape(-1).bool().repeat(len(router_logits))
    probs = probs[keep]
    picks = torch.zeros_like(probs).scatter_(1, probs.topk(TOP_K, -1).indices, 1.0)
    return (picks.mean(0) * probs.mean(0)).sum() * E


def real_tokens(feats, layout: str, batch: dict) -> torch.Tensor:
    """(R, T) 1 at real tokens, from the pairs' lengths (not from any mask)."""
    R, T = batch["input_ids"].shape
    lens = {"padded": [len(f["prompt_ids"]) + len(f[k]) for k in ("chosen_ids", "rejected_ids") for f in feats],
            "prefix": [len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in feats]}
    lens["packed"] = [sum(lens["padded"])]
    lens["prefix_packed"] = [sum(lens["prefix"])]
    return (torch.arange(T)[None] < torch.tensor(lens[layout])[:, None]).long()


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix"])  # prefix_packed: held to prefix below
def test_aux_loss_is_the_models_router_loss_over_the_real_tokens(layout):
    model = tiny_mixtral().eval()
    feats = features()
    batch = collate(feats, layout=layout, pad_token_id=0, pad_to_multiple_of=8)  # padding that must not count
    got = model_pair_logps(model, batch, router_aux_loss=True).aux_loss
    assert got is not None and got.requires_grad
    if layout == "padded":  # the model's own aux_loss output, as TRL reads it
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_router_logits=True).aux_loss
        torch.testing.assert_close(got, own)
    # the router logits of the same forward, the loss written out over the real tokens
    with torch.no_grad():
        hidden_kwargs = {}
        if layout == "prefix":
            mask = batch["attention_mask"]
            hidden_kwargs["attention_mask"] = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        elif layout == "padded":
            hidden_kwargs["attention_mask"] = batch["attention_mask"]
        router = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                             output_router_logits=True, **hidden_kwargs).router_logits  # no cache: packed detected
    torch.testing.assert_close(got.detach(), written_out_aux(router, real_tokens(feats, layout, batch)))


def test_aux_loss_agrees_across_layouts_with_the_same_tokens():
    """padded and packed run the same sequences (prompt twice), prefix and prefix_packed the same rows."""
    model = tiny_mixtral().eval()
    feats = features()
    aux = {lay: model_pair_logps(model, collate(feats, layout=lay, pad_token_id=0), router_aux_loss=True).aux_loss
           for lay in ("padded", "packed", "prefix", "prefix_packed")}
    torch.testing.assert_close(aux["padded"], aux["packed"])
    torch.testing.assert_close(aux["prefix"], aux["prefix_packed"])
    assert not torch.allclose(aux["padded"], aux["prefix"])  # the prompt counts once in the prefix rows


def test_pair_losses_carry_coef_times_aux_on_every_pair_and_its_gradient():
    model = tiny_mixtral().eval()
    batch = collate(features(), layout="prefix", pad_token_id=0)
    args = DPOConfig(output_dir="unused", loss_type="sft")  # reference-free: the policy alone
    plain, weighted = DPOObjective.from_args(args), DPOObjective.from_args(args)
    weighted.router_aux_loss_coef = 0.5
    base, m0 = plain.pair_losses(model, batch, None)
    losses, metrics = weighted.pair_losses(model, batch, None)
    aux = model_pair_logps(model, batch, router_aux_loss=True).aux_loss
    torch.testing.assert_close(losses, base + 0.5 * aux)
    torch.testing.assert_close(metrics["aux_loss"], aux.detach())
    assert "aux_loss" not in m0
    # the aux term's gradient reaches the router: d(sum losses) = d(sum base) + B * 0.5 * d aux
    gate = model.model.layers[0].mlp.gate.weight
    g_with = torch.autograd.grad(losses.sum(), gate)[0]
    g_base = torch.autograd.grad(plain.pair_losses(model, batch, None)[0].sum(), gate)[0]
    g_aux = torch.autograd.grad(model_pair_logps(model, batch, router_aux_loss=True).aux_loss, gate)[0]
    assert g_aux.abs().sum() > 0
    torch.testing.assert_close(g_with, g_base + len(features()) * 0.5 * g_aux)


def test_coefficient_follows_trl():
    moe = tiny_mixtral()
    assert router_aux_loss_coef(moe, None) == moe.config.router_aux_loss_coef == 0.001
    assert router_aux_loss_coef(moe, 0.0) == 0.0 and router_aux_loss_coef(moe, 0.2) == 0.2
    dense = tiny_model(VOCAB)
    assert router_aux_loss_coef(dense, None) == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.5 but LlamaForCausalLM is not a mixture-of-experts"):
        router_aux_loss_coef(dense, 0.5)
    with pytest.raises(Exception, match="router_aux_loss_coef"):
        DPOConfig(output_dir="unused", router_aux_loss_coef=-1.0)


def test_reference_forward_computes_no_router_loss():
    """A config with output_router_logits=True still gets output_router_logits=False for log-probs alone."""
    model = tiny_mixtral(output_router_logits=True).eval()
    out = model_pair_logps(model, collate(features(), layout="prefix", pad_token_id=0))
    assert out.aux_loss is None


def _trained_names(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("peft", [None, "attention", "experts"])
def test_moe_trains_with_aux_loss(tmp_path, peft):
    from peft import LoraConfig

    peft_config = {None: None,
                   "attention": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                   "experts": LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])}[peft]
    trainer = make_trainer(tmp_path, model=tiny_mixtral(), peft_config=peft_config, router_aux_loss_coef=0.01)
    assert trainer.objective.router_aux_loss_coef == 0.01
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    rows = train_rows(trainer)
    assert all(r["aux_loss"] > 0 for r in rows)
    changed = _trained_names(before, model)
    if peft is None:
        assert any(".mlp.gate." in n for n in changed) and any("experts" in n for n in changed)
    else:
        assert changed and all("lora_" in n for n in changed)
        if peft == "experts":
            assert any("experts" in n for n in changed)
        # the reference is the model with its adapters off: the initial model's log-probs
        batch = trainer._to_device(trainer._collate(trainer.train_split.features[:2]))
        ref = trainer.reference.logps(batch)
        initial = tiny_mixtral().eval()
        with torch.no_grad():
            want = model_pair_logps(initial, batch)
        torch.testing.assert_close(ref.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-4)


def test_gpt_oss_loads_eager_and_trains(tmp_path):
    """GPT-OSS declares no SDPA support: loaded from disk it gets eager attention, and trains with its aux loss."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from preftune.models import load_model

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
                       num_experts_per_tok=TOP_K, max_position_embeddings=512, sliding_window=512,
                       layer_types=["full_attention", "full_attention"])
    GptOssForCausalLM(cfg).save_pretrained(tmp_path / "gptoss")
    tiny_tokenizer().save_pretrained(tmp_path / "gptoss")
    model = load_model(tmp_path / "gptoss", dtype="float32")
    assert model.config._attn_implementation == "eager"
    trainer = make_trainer(tmp_path, conversational_rows(4), model=model, max_steps=1)
    trainer.train()
    assert train_rows(trainer)[-1]["aux_loss"] > 0
