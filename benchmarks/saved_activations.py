"""Bytes autograd keeps for backward in one preftune forward (``model_logps``), on this machine.

Loads the embedded SmolLM2-135M (or ``--model``), optionally wraps it in LoRA, fuses its layers as the
trainer does, and counts the distinct storages saved for backward during one forward over a prefix
batch of synthetic pairs (parameters excluded, each storage once, all of them kept alive until
counted). Deterministic, unlike peak RSS: use it to compare memory changes. The norms' recompute
(``fused.recompute_norm_outputs``, on in training) is off here: its saved-tensor hooks would take
precedence over this count's, so the norms' outputs count as kept.

    python benchmarks/saved_activations.py --lora --lora-dropout 0.05
"""

from __future__ import annotations

import argparse
import contextlib


def saved_bytes(model, batch) -> int:
    import torch

    from preftune import fused
    from preftune.logps import model_logps

    kept: dict[int, torch.Tensor] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t
        return t

    real = fused.recompute_norm_outputs
    fused.recompute_norm_outputs = contextlib.nullcontext  # its hooks would take precedence over this count's
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model_logps(model, batch)
    finally:
        fused.recompute_norm_outputs = real
    return sum(t.untyped_storage().nbytes() for ptr, t in kept.items() if ptr not in params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--lengths", default="60,50,50", help="prompt,chosen,rejected tokens per pair")
    p.add_argument("--lora", action="store_true", help="LoRA r 16 on all linear projections")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--no-fuse", action="store_true", help="the model's own layers (no fuse_layers)")
    p.add_argument("--recompute-mlp", action="store_true", help="fuse_layers(recompute_mlp=True)")
    a = p.parse_args(argv)

    import torch

    from preftune import models
    from preftune.data.batching import collate
    from preftune.fused import fuse_layers

    torch.manual_seed(0)
    model = models.load_model(a.model or str(models.embedded_model_path()), dtype=torch.float32)
    if a.lora:
        model = models.apply_peft(model, models.lora_config_from_args(16, 32, a.lora_dropout, None))
    model.train()
    if not a.no_fuse:
        fuse_layers(model, triton=False, recompute_mlp=a.recompute_mlp)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    lp, lc, lr = (int(n) for n in a.lengths.split(","))

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    feats = [{"prompt_ids": ids(lp), "chosen_ids": ids(lc), "rejected_ids": ids(lr), "index": i} for i in range(a.pairs)]
    batch = collate(feats, layout="prefix", pad_token_id=0)
    n = saved_bytes(model, batch)
    print(f"saved for backward: {n / 2**20:.1f} MiB (lora={a.lora}, lora_dropout={a.lora_dropout if a.lora else '-'}, "
          f"fused={not a.no_fuse}, recompute_mlp={a.recompute_mlp}; the norms' recompute off)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
