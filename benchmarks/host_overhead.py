"""Host (Python and dispatch) time of a preftune step, measured where compute is negligible.

A 24-layer Llama with hidden size 32 built in code, the byte-level test tokenizer, batch 8 of short
pairs, one CPU thread: a step here is almost all per-op and per-module host work, which on a GPU
is what a step costs when kernels are short (LoRA's small matmuls, many layers). Reports the median
step after two warm-up steps, for full fine-tuning, LoRA with the live reference (adapters off)
and LoRA with a precomputed reference.

    python benchmarks/host_overhead.py --modes full,lora,lora-precompute --steps 24
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def run(mode: str, steps: int, layers: int) -> float:
    """Median step seconds of one job (steps >= 4), on one CPU thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed_steps(mode, steps, layers)
    finally:
        torch.set_num_threads(threads)


def _timed_steps(mode: str, steps: int, layers: int) -> float:
    from preftune import DPOConfig, DPOTrainer
    from preftune.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    rows = [dict(prompt=f"question {i} " * 3, chosen=f"good answer {i}", rejected=f"bad reply {i}!")
            for i in range(8 * steps)]
    model = tiny_model(vocab_size=len(tok), num_hidden_layers=layers, hidden_size=32, intermediate_size=64)
    peft = None
    if mode.startswith("lora"):
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = tempfile.mkdtemp(prefix="bench-host-")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=8, learning_rate=1e-4, max_steps=steps,
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", max_length=64,
                     max_prompt_length=None, cache_dir=out + "/cache", disable_tqdm=True,
                     precompute_ref_log_probs=True if mode == "lora-precompute" else None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=peft)
    times, clip, last = [], trainer._clip, [None]

    def timed_clip():  # one call per optimizer step: the time between two calls is one step
        r = clip()
        now = time.perf_counter()
        if last[0] is not None:
            times.append(now - last[0])
        last[0] = now
        return r

    trainer._clip = timed_clip
    trainer.train()
    return statistics.median(times[2:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="full,lora,lora-precompute")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--layers", type=int, default=24)
    a = p.parse_args(argv)
    for mode in a.modes.split(","):
        print(f"{mode}: median step {run(mode, a.steps, a.layers) * 1e3:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
