"""preftune vs TRL's DPOTrainer: the same DPO job, side by side, in one invocation.

    python benchmarks/vs_trl.py                 # CPU: SmolLM2-135M (embedded), float32, batch 4
    python benchmarks/vs_trl.py --steps 6 --shapes short --modes full
    python benchmarks/vs_trl.py --gpu-config    # GPU: a 0.5B-class random model, seq 1024 (needs CUDA)

Each side runs in its own subprocess (so peak memory is its own): same weights, same pairs in the
same order, same batch size, learning rate, beta, max_length and seed. Reported per side: pairs/s and
tokens/s over the whole job including the reference pass, peak memory (RSS on CPU, allocated on GPU),
the losses of the first steps, and model-FLOPs utilization (MFU): useful FLOPs divided by wall time
and by the matmul peak this script measures on the machine. Useful FLOPs per needed token
(prompt + chosen + rejected, the prompt counted once) are 6N for the policy's forward and backward
plus 2N for the reference forward, N = parameters of the matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORDS = (
    "the a model data train token answer question value result river mountain city number letter color "
    "simple quick careful brown green bright small large first second later because while before after "
    "explain describe compare list write short long clear exact step reason check"
).split()


def make_pairs(n: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict]:
    """Deterministic synthetic text pairs of roughly the requested token lengths."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {"prompt": text(prompt_words) + "?", "chosen": " " + text(response_words) + ".", "rejected": " " + text(response_words) + "!"}
        for _ in range(n)
    ]


SHAPES = {
    # words ~ tokens for this vocabulary of common words
    "short": dict(prompt_words=60, response_words=50, max_length=256),
    "long": dict(prompt_words=300, response_words=60, max_length=512),
}


def matmul_peak(device: str, dtype_name: str) -> float:
    """Measured matmul throughput (FLOP/s): the best of several large square matmuls."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        dt = time.perf_counter() - t
        best = max(best, 2 * n**3 / dt)
    return best


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: every 2-D weight except the input embedding (a lookup),
    plus the output head even when it is tied to the embedding."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.ndim == 2 and p is not emb)
    if head is emb:
        total += head.numel()
    return total


def peak_memory_bytes(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def needed_tokens(tokenizer, rows: list[dict], max_length: int) -> int:
    total = 0
    for r in rows:
        p = len(tokenizer(r["prompt"]).input_ids)
        c = len(tokenizer(r["chosen"], add_special_tokens=False).input_ids) + 1
        j = len(tokenizer(r["rejected"], add_special_tokens=False).input_ids) + 1
        total += min(p + c, max_length) + max(0, min(p + j, max_length) - p)
    return total


# --------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def _common(job: dict):
    import torch

    torch.manual_seed(job["seed"])
    rows = make_pairs(job["num_pairs"], SHAPES[job["shape"]]["prompt_words"], SHAPES[job["shape"]]["response_words"], job["seed"])
    return rows


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def run_preftune(job: dict) -> dict:
    import torch

    from preftune import DPOConfig, DPOTrainer
    from preftune.data.pipeline import StepPlan

    rows = _common(job)
    out = tempfile.mkdtemp(prefix="bench-preftune-")
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=job["lr"], beta=0.1, max_length=job["max_length"], max_prompt_length=None,
        max_steps=job["steps"], logging_steps=1, save_strategy="no", eval_strategy="no", seed=job["seed"],
        report_to="none", warmup_ratio=0.0, lr_scheduler_type="constant", gradient_checkpointing=False,
        precompute_ref_log_probs=job.get("precompute", False), dtype=job["dtype"], bf16=job["dtype"] == "bfloat16",
        batch_layout=job.get("layout", "prefix"), max_grad_norm=1.0, weight_decay=0.0,
        cache_dir=os.path.join(out, "cache"),
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=job["model"], args=args, train_dataset=rows,
                         peft_config=_lora() if job["mode"] == "lora" else None)
    t_load = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t_load
    losses = [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line and "eval_loss" not in line]
    plan = StepPlan(len(trainer.train_split), job["batch"], 1, 1, job["seed"])
    used = plan.permutation(0)[: job["steps"] * job["batch"]]
    n_tok = sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
                for f in (trainer.train_split.features[i] for i in used))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return dict(side="preftune", wall_s=wall, load_s=t_load - t0, losses=losses, needed_tokens=n_tok,
                pairs=len(used), peak_mem=peak_memory_bytes(device),
                n_matmul=matmul_params(trainer.accelerator.unwrap_model(trainer.model).get_base_model()
                                       if job["mode"] == "lora" else trainer.accelerator.unwrap_model(trainer.model)),
                order=used)


def run_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = _common(job)
    order = job["order"]  # preftune's data order: TRL reads the same pairs sequentially
    ds = Dataset.from_list([rows[i] for i in order])

    class SequentialDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    dtype = getattr(torch, job["dtype"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(job["model"])
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=job["lr"], beta=0.1, max_length=job["max_length"], max_steps=job["steps"], logging_steps=1,
        save_strategy="no", eval_strategy="no", seed=job["seed"], report_to="none", warmup_ratio=0.0,
        lr_scheduler_type="constant", gradient_checkpointing=False, bf16=job["dtype"] == "bfloat16",
        precompute_ref_log_probs=job.get("precompute", False), max_grad_norm=1.0, weight_decay=0.0,
        dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = SequentialDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                   peft_config=_lora() if job["mode"] == "lora" else None)
    t_load = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t_load
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return dict(side="trl-precompute" if job.get("precompute") else "trl", wall_s=wall, load_s=t_load - t0,
                losses=losses, peak_mem=peak_memory_bytes(device))


# --------------------------------------------------------------------------------------------


def spawn(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        path = f.name
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", path], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {job['side']} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    import preftune

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                accelerate=accelerate.__version__, trl=trl.__version__, preftune=preftune.__version__,
                device=dev, cpus=os.cpu_count())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker")
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shapes", default="short,long")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--dtype", default=None, help="float32 on CPU (default), bfloat16 on GPU")
    p.add_argument("--layout", default="prefix", help="preftune batch layout: prefix | padded | packed")
    p.add_argument("--out", default="benchmarks/results.json")
    a = p.parse_args(argv)
    if a.worker:
        job = json.loads(Path(a.worker).read_text())
        res = run_preftune(job) if job["side"] == "preftune" else run_trl(job)
        print(json.dumps(res))
        return 0

    import torch

    from preftune.models import embedded_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    model = a.model or str(embedded_model_path())
    peak = matmul_peak(device, dtype)
    info = versions()
    print(f"machine: {info['device']} ({info['cpus']} cpus); measured {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("device", "cpus")))
    results = []
    for shape in a.shapes.split(","):
        for mode in a.modes.split(","):
            base = dict(model=model, shape=shape, mode=mode, steps=a.steps, batch=a.batch, lr=a.lr, seed=0,
                        dtype=dtype, max_length=SHAPES[shape]["max_length"], num_pairs=a.steps * a.batch,
                        layout=a.layout)
            ours = spawn(dict(base, side="preftune"))
            theirs = spawn(dict(base, side="trl", order=ours["order"]))
            theirs_pre = spawn(dict(base, side="trl", order=ours["order"], precompute=True))
            n = ours["n_matmul"]
            for r in (ours, theirs, theirs_pre):
                r.update(shape=shape, mode=mode, pairs_per_s=ours["pairs"] / r["wall_s"],
                         tokens_per_s=ours["needed_tokens"] / r["wall_s"],
                         mfu=(8 * n * ours["needed_tokens"] / r["wall_s"]) / peak)
                r.pop("order", None)
            k = min(len(ours["losses"]), len(theirs["losses"]), 3)
            rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(ours["losses"][:k], theirs["losses"][:k])) if k else float("nan")
            row = dict(shape=shape, mode=mode, preftune=ours, trl=theirs, trl_precompute=theirs_pre,
                       speedup_vs_trl=ours["pairs_per_s"] / theirs["pairs_per_s"],
                       speedup_vs_trl_precompute=ours["pairs_per_s"] / theirs_pre["pairs_per_s"],
                       memory_ratio_vs_trl=ours["peak_mem"] / theirs["peak_mem"],
                       memory_ratio_vs_trl_precompute=ours["peak_mem"] / theirs_pre["peak_mem"],
                       first_losses_max_rel_diff=rel)
            results.append(row)
            print(f"[{shape}/{mode}] preftune {ours['pairs_per_s']:.2f} pairs/s, TRL {theirs['pairs_per_s']:.2f}, "
                  f"TRL+precompute {theirs_pre['pairs_per_s']:.2f}", flush=True)
    print()
    hdr = f"{'shape':<6}{'mode':<6}{'side':<16}{'pairs/s':>9}{'tok/s':>9}{'peak MiB':>10}{'MFU':>7}  first losses"
    print(hdr)
    for row in results:
        for key in ("preftune", "trl", "trl_precompute"):
            r = row[key]
            print(f"{row['shape']:<6}{row['mode']:<6}{key:<16}{r['pairs_per_s']:>9.2f}{r['tokens_per_s']:>9.0f}"
                  f"{r['peak_mem'] / 2**20:>10.0f}{r['mfu'] * 100:>6.1f}%  {[round(x, 4) for x in r['losses'][:3]]}")
        print(f"{'':<12}ratios: {row['speedup_vs_trl']:.2f}x pairs/s vs TRL, {row['speedup_vs_trl_precompute']:.2f}x vs "
              f"TRL+precompute; memory {row['memory_ratio_vs_trl']:.2f} of TRL's, "
              f"{row['memory_ratio_vs_trl_precompute']:.2f} of TRL+precompute's; first-loss rel diff "
              f"{row['first_losses_max_rel_diff']:.1e}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(versions=info, matmul_peak_flops=peak, dtype=dtype, results=results), indent=1))
    print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
