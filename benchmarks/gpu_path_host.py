"""Host work of the GPU code path, measured on CPU: one ``model_logps`` forward and backward.

On a GPU a DPO step of a small model is bound by host work (Python, dispatch, kernel launches), not
by the kernels. This script makes the GPU path's calls on CPU tensors without their compute:
preftune's Triton kernels are taken (Triton's interpreter mode, CPU tensors let through) but their
launches are stubbed out, so each fused norm, SwiGLU, rotary embedding and head chunk is one call, as
on a GPU. A 24-layer Qwen2 of hidden size 64 (the model's own math is tiny), 4 prefix-layout pairs,
one thread. It reports the median time of a forward and backward and the count of top-level aten
calls, alternating the variants over rounds. The values computed are meaningless (no kernel runs).

    python benchmarks/gpu_path_host.py                  # the rotary kernel against transformers' ops
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

_KERNELS = ("_rmsnorm_fwd", "_rmsnorm_bwd", "_silu_mul_fwd", "_silu_mul_bwd", "_head_fwd", "_head_bwd", "_rope")


class _NoLaunch:
    """A Triton kernel's ``kernel[grid](...)`` that launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="timed forward+backward passes per variant and round")
    a = p.parse_args(argv)

    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from preftune import fused, kernels
    from preftune.data.batching import collate
    from preftune.logps import model_logps, use_triton_head

    if kernels.triton is None or not kernels.INTERPRETED:
        raise SystemExit("needs Triton, imported after TRITON_INTERPRET=1 (run this script as its own process)")
    kernels._interpreter_on_cpu = lambda: True  # CPU tensors take the interpreted kernels
    for name in _KERNELS:
        setattr(kernels, name, _NoLaunch())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    fused.fuse_layers(model, triton=True)
    use_triton_head(model)
    feats = [{"prompt_ids": list(range(5, 25 + i)), "chosen_ids": list(range(40, 50)),
              "rejected_ids": list(range(60, 68)), "index": i} for i in range(4)]
    batch = collate(feats, layout="prefix", pad_token_id=0, pad_to_multiple_of=64)
    variants = {"rope kernel": fused.fast_rope, "transformers' rotary ops": contextlib.nullcontext}

    def step():
        out = model_logps(model, batch)
        (out.chosen_logps - out.rejected_logps).sum().backward()
        model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for name, ctx in variants.items():
            fused.fast_rope = ctx
            for _ in range(2):
                step()
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t)
            times.setdefault(name, []).append(statistics.median(ts) * 1e3)
    for name, ctx in variants.items():
        fused.fast_rope = ctx
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        calls = sum(1 for e in prof.events() if e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
        print(f"{name}: median ms per round {[round(t, 1) for t in times[name]]}, top-level aten calls {calls}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
