"""preftune vs TRL's DPOTrainer: the same DPO job, side by side, in one invocation.

    python benchmarks/vs_trl.py                 # CPU: SmolLM2-135M (embedded), float32, batch 4
    python benchmarks/vs_trl.py --steps 6 --shapes short --modes full
    python benchmarks/vs_trl.py --gpu-models qwen0.5b --shapes seq1024 --batch 8   # GPU, random weights

Each side runs in its own subprocess (so peak memory is its own): same weights, same pairs in the
same order, same batch size, learning rate, beta, max_length and seed. Reported per side: pairs/s and
tokens/s over the whole job including the reference pass, peak memory (RSS on CPU, allocated on GPU),
the losses of the first steps, and model-FLOPs utilization (MFU): useful FLOPs divided by wall time
and by the matmul peak this script measures on the machine. Useful FLOPs per needed token
(prompt + chosen + rejected, the prompt counted once) are 6N for the policy's forward and backward
plus 2N for the reference forward, N = parameters of the matmuls; with LoRA the backward has no
weight gradients of the frozen matmuls, so 4N + 2N. The TRL workers get the environment this script
was started with (preftune's THP_MEM_ALLOC_ENABLE=1 only with --trl-thp).
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
# The environment as the user started this script: importing preftune (here, for the model path) sets
# THP_MEM_ALLOC_ENABLE=1, a preftune default that must not leak into the TRL workers (--trl-thp adds it).
USER_ENV = dict(os.environ)

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
    # one word of the list above is one SmolLM2 token (checked: 61/51 and 301/61 tokens on average)
    "short": dict(prompt_words=60, response_words=50, max_length=256),
    "long": dict(prompt_words=300, response_words=60, max_length=512),
    "seq1024": dict(prompt_words=640, response_words=360, max_length=1024),  # GPU: ~1002 tokens per sequence
}

# GPU models: random weights from a config (speed does not depend on the values), bodies of the 0.5B class.
# Vocabularies are >= 49152, the embedded tokenizer's, whose ids the synthetic pairs use.
GPU_MODELS = {
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-v49k": dict(arch="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=49152, tie_word_embeddings=False),
    "llama-v128k": dict(arch="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=16, vocab_size=128256, tie_word_embeddings=False),
}


def build_random_model(name: str, tokenizer_dir: str, dtype_name: str, out_dir: str) -> str:
    """Save a random-weight model of GPU_MODELS[name] (seed 0) with the tokenizer files beside it; both
    sides load this same directory, so they start from the same weights."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(GPU_MODELS[name])
    arch = spec.pop("arch")
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    cfg = cfg_cls(**spec, max_position_embeddings=4096, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
    model = model_cls(cfg).to(getattr(torch, dtype_name))
    path = Path(out_dir) / name
    model.save_pretrained(path)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return str(path)


def matmul_peak(device: str, dtype_name: str) -> float:
    """Measured matmul throughput (FLOP/s): the best of several large square matmuls after warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for i in range(8 if device == "cuda" else 5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10 if device == "cuda" else 1):
            c = a @ b
        c[0, 0].item()
        dt = (time.perf_counter() - t) / (10 if device == "cuda" else 1)
        if i:  # the first is warm-up
            best = max(best, 2 * n**3 / dt)
    return best


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: every 2-D weight except the input embedding (a lookup),
    plus the output head even when it is tied to the embedding. LoRA factors are left out."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and p is not emb and "lora_" not in n)
    if head is emb:
        total += head.numel()
    return total


def peak_memory_bytes(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def load_model_and_tokenizer(job: dict):
    """(model, tokenizer, device) of a job, loaded the same way on every side of a benchmark: the job's dtype,
    SDPA attention, the GPU when there is one, the tokenizer's eos as pad when it has none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"]),
                                                 attn_implementation="sdpa").to(device)
    tok = AutoTokenizer.from_pretrained(job["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, device


def _common(job: dict):
    """The pairs, the model and the tokenizer, loaded the same way on both sides (before the clock starts)."""
    import torch

    torch.manual_seed(job["seed"])
    shape = SHAPES[job["shape"]]
    rows = make_pairs(job["num_pairs"], shape["prompt_words"], shape["response_words"], job["seed"])
    model, tok, device = load_model_and_tokenizer(job)
    return rows, model, tok, device


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed_job(device: str, build):
    """(trainer, wall seconds, construction seconds) of one whole job: the trainer's construction
    (tokenizing, the reference model or the precomputed reference pass) and every training step."""
    _sync(device)
    t0 = time.perf_counter()
    trainer = build()
    t_init = time.perf_counter()
    trainer.train()
    _sync(device)
    return trainer, time.perf_counter() - t0, t_init - t0


def make_job(model: str, shape: str, steps: int, batch: int, **options) -> dict:
    """One preftune job as the workers take it: ``options`` override the defaults (full fine-tuning,
    lr 5e-6, seed 0, float32, preftune's automatic layout, chunk, reference and kernels)."""
    job = dict(model=model, shape=shape, mode="full", steps=steps, batch=batch, lr=5e-6, seed=0, dtype="float32",
               max_length=SHAPES[shape]["max_length"], num_pairs=steps * batch, layout="auto", chunk=None,
               ref="auto", cudnn_attention=None, pad_multiple=None, ref_batch=None, triton_kernels=True,
               max_grad_norm=1.0, optim_in_backward=False, recompute_mlp=False, side="preftune")
    job.update(options)
    return job


def run_preftune(job: dict) -> dict:
    from preftune import DPOConfig, DPOTrainer
    from preftune.data.pipeline import StepPlan

    rows, model, tok, device = _common(job)
    out = tempfile.mkdtemp(prefix="bench-preftune-")
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=job["lr"], beta=0.1, max_length=job["max_length"], max_prompt_length=None,
        max_steps=job["steps"], logging_steps=1, save_strategy="no", eval_strategy="no", seed=job["seed"],
        report_to="none", warmup_steps=0, lr_scheduler_type="constant", gradient_checkpointing=False,
        precompute_ref_log_probs={"auto": None, "live": False, "precompute": True}[job.get("ref", "auto")],
        dtype=job["dtype"], bf16=job["dtype"] == "bfloat16",
        batch_layout=job.get("layout", "auto"), logps_chunk_size=job.get("chunk"),
        max_grad_norm=job.get("max_grad_norm", 1.0), weight_decay=0.0, cache_dir=os.path.join(out, "cache"),
        optim_in_backward=job.get("optim_in_backward", False), recompute_mlp=job.get("recompute_mlp", False),
        cudnn_attention=job.get("cudnn_attention"), pad_to_multiple_of=job.get("pad_multiple"),
        precompute_ref_batch_size=job.get("ref_batch"), triton_kernels=job.get("triton_kernels", True),
    )
    trainer, wall, init_s = _timed_job(device, lambda: DPOTrainer(
        model=model, args=args, train_dataset=rows, processing_class=tok,
        peft_config=_lora() if job["mode"] == "lora" else None))
    rows_logged = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    losses = [r["loss"] for r in rows_logged if "loss" in r]
    step_s = [job["batch"] / r["pairs_per_second"] for r in rows_logged if r.get("pairs_per_second")]
    if len(trainer.train_split) != len(rows):
        raise RuntimeError(f"preftune kept {len(trainer.train_split)} of {len(rows)} pairs; the orders would differ")
    plan = StepPlan(len(trainer.train_split), job["batch"], 1, 1, job["seed"])
    used = plan.permutation(0)[: job["steps"] * job["batch"]]
    n_tok = sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
                for f in (trainer.train_split.features[i] for i in used))
    base = trainer.accelerator.unwrap_model(trainer.model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return dict(side="preftune", wall_s=wall, init_s=init_s, losses=losses, needed_tokens=n_tok,
                pairs=len(used), peak_mem=peak_memory_bytes(device), n_matmul=matmul_params(base), order=used,
                layout=trainer.layout, chunk=args.logps_chunk_size, pad_to_multiple_of=trainer.pad_multiple,
                cudnn_attention=trainer.cudnn_attention, triton_kernels=args.triton_kernels, step_s=step_s,
                optim_in_backward=args.optim_in_backward, recompute_mlp=args.recompute_mlp)


def run_trl(job: dict) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    rows, model, tok, device = _common(job)
    order = job["order"]  # preftune's data order: TRL reads the same pairs sequentially
    ds = Dataset.from_list([rows[i] for i in order])

    class SequentialDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    # TRL's defaults gradient_checkpointing=True and bf16=True are set to preftune's here (off; the dtype of the
    # job), so both run the same arithmetic; TRL has no max_prompt_length and its padding_free is disabled.
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=job["lr"], beta=0.1, max_length=job["max_length"], max_steps=job["steps"], logging_steps=1,
        save_strategy="no", eval_strategy="no", seed=job["seed"], report_to="none", warmup_steps=0,
        lr_scheduler_type="constant", gradient_checkpointing=False, bf16=job["dtype"] == "bfloat16",
        precompute_ref_log_probs=job.get("precompute", False), max_grad_norm=job.get("max_grad_norm", 1.0),
        weight_decay=0.0,
        dataloader_drop_last=True, use_cpu=device == "cpu", disable_tqdm=True,
    )
    trainer, wall, init_s = _timed_job(device, lambda: SequentialDPOTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok,
        peft_config=_lora() if job["mode"] == "lora" else None))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(side="trl-precompute" if job.get("precompute") else "trl", wall_s=wall, init_s=init_s,
                losses=losses, peak_mem=peak_memory_bytes(device))


# --------------------------------------------------------------------------------------------


def spawn(job: dict, extra_env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        path = f.name
    env = dict(USER_ENV, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **(extra_env or {}))
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


SIDES = ("preftune", "trl", "trl_precompute")


def _row(model_name: str, shape: str, mode: str, res: dict, peak: float) -> dict:
    """Ratios of one (model, shape, mode) from its sides' raw results."""
    ours = res["preftune"]
    n, tokens = ours["n_matmul"], ours["needed_tokens"]
    # policy forward 2N + backward 4N (input and weight gradients) + reference forward 2N; with LoRA
    # the frozen weights get no gradient, so the backward is 2N (the adapters' FLOPs are left out)
    per_token = 6 * n if mode == "lora" else 8 * n
    for r in res.values():
        r.update(pairs_per_s=ours["pairs"] / r["wall_s"], tokens_per_s=tokens / r["wall_s"],
                 mfu=(per_token * tokens / r["wall_s"]) / peak)
        r.pop("order", None)
    row = dict(model=model_name, shape=shape, mode=mode, **res)
    for side in ("trl", "trl_precompute"):
        if side in res:
            theirs = res[side]
            k = min(len(ours["losses"]), len(theirs["losses"]), 3)
            row[f"speedup_vs_{side}"] = ours["pairs_per_s"] / theirs["pairs_per_s"]
            row[f"memory_ratio_vs_{side}"] = ours["peak_mem"] / theirs["peak_mem"]
            row[f"first_losses_max_rel_diff_vs_{side}"] = max(
                (abs(x - y) / max(abs(y), 1e-12) for x, y in zip(ours["losses"][:k], theirs["losses"][:k])),
                default=float("nan"))
    return row


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count), with every run's wall."""
    chosen = dict(sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2])
    chosen["walls_s"] = [round(r["wall_s"], 3) for r in runs]
    return chosen


def print_table(results: list[dict]) -> None:
    print(f"{'model':<12}{'shape':<8}{'mode':<5}{'side':<15}{'pairs/s':>9}{'tok/s':>9}{'peak MiB':>10}{'MFU':>7}"
          "  first losses")
    for row in results:
        for side in SIDES:
            if side in row:
                r = row[side]
                print(f"{row['model']:<12}{row['shape']:<8}{row['mode']:<5}{side:<15}{r['pairs_per_s']:>9.2f}"
                      f"{r['tokens_per_s']:>9.0f}{r['peak_mem'] / 2**20:>10.0f}{r['mfu'] * 100:>6.1f}%  "
                      f"{[round(x, 5) for x in r['losses'][:3]]}"
                      + (f"  walls {r['walls_s']}" if len(r.get("walls_s", [])) > 1 else ""))
        for side in ("trl", "trl_precompute"):
            if side in row:
                print(f"{'':<25}vs {side}: {row[f'speedup_vs_{side}']:.2f}x pairs/s, memory "
                      f"{row[f'memory_ratio_vs_{side}']:.2f}x, first-loss rel diff "
                      f"{row[f'first_losses_max_rel_diff_vs_{side}']:.1e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gpu-models", default=None,
                   help=f"comma list of random-weight configs to build instead of --model: {', '.join(GPU_MODELS)}")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --gpu-models (default: the embedded one)")
    p.add_argument("--shapes", default="short,long", help=f"data shapes: {', '.join(SHAPES)}")
    p.add_argument("--modes", default="full,lora", help="full and/or lora")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides to run (preftune is always run)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per job")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of all sides, one after the other; each side reports its median-wall run "
                        "(and every run's wall), so drift of a shared machine cannot favour one side")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--dtype", default=None, help="float32 on CPU (default), bfloat16 on GPU")
    p.add_argument("--layout", default="auto", help="preftune batch layout: auto (= prefix) | prefix | prefix_packed | padded | packed")
    p.add_argument("--chunk", type=int, default=None, help="preftune logps_chunk_size (default: its automatic one)")
    p.add_argument("--ref", default="auto", choices=("auto", "live", "precompute"),
                   help="preftune reference: auto (its default: the pairs the run uses, precomputed with the policy "
                        "before training), live (a frozen copy) or precompute (the whole dataset, TRL's meaning)")
    p.add_argument("--cudnn-attention", default=None, choices=("on", "off"),
                   help="preftune cudnn_attention (default: its automatic choice)")
    p.add_argument("--triton-kernels", default="on", choices=("on", "off"),
                   help="preftune triton_kernels (on a GPU: the log-prob head, RMSNorm and SwiGLU as Triton kernels; "
                        "default on)")
    p.add_argument("--pad-multiple", type=int, default=None, help="preftune pad_to_multiple_of")
    p.add_argument("--ref-batch", type=int, default=None, help="preftune precompute_ref_batch_size")
    p.add_argument("--trl-thp", action="store_true",
                   help="run the TRL sides with THP_MEM_ALLOC_ENABLE=1 too (preftune sets it when imported)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping of every side (0 = off)")
    p.add_argument("--optim-in-backward", action="store_true",
                   help="preftune updates each parameter inside backward and frees its gradient (needs "
                        "--max-grad-norm 0: an update made during backward cannot be clipped by the global norm)")
    p.add_argument("--recompute-mlp", action="store_true", help="preftune's recompute_mlp (gate and up made again in "
                   "backward)")
    p.add_argument("--out", default="benchmarks/results.json")
    a = p.parse_args(argv)
    if a.optim_in_backward and a.max_grad_norm:
        p.error(f"--optim-in-backward needs --max-grad-norm 0 (got {a.max_grad_norm:g}); it applies to every side")
    if a.worker:
        job = json.loads(Path(a.worker).read_text())
        res = run_preftune(job) if job["side"] == "preftune" else run_trl(job)
        print(json.dumps(res))
        return 0

    import torch

    from preftune.models import embedded_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    peak = matmul_peak(device, dtype)
    info = versions()
    print(f"machine: {info['device']} ({info['cpus']} cpus); measured {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("device", "cpus")), flush=True)
    if a.gpu_models:
        tmp = tempfile.mkdtemp(prefix="bench-models-")
        tok_dir = a.tokenizer or str(embedded_model_path())
        models = {m: build_random_model(m, tok_dir, dtype, tmp) for m in a.gpu_models.split(",")}
    else:
        models = {"smollm2-135m": a.model or str(embedded_model_path())}
    sides = [s for s in a.sides.split(",") if s != "preftune"]
    results = []
    for model_name, path in models.items():
        for shape in a.shapes.split(","):
            for mode in a.modes.split(","):
                base = make_job(path, shape, a.steps, a.batch, mode=mode, lr=a.lr, dtype=dtype, layout=a.layout,
                                chunk=a.chunk, ref=a.ref,
                                cudnn_attention=None if a.cudnn_attention is None else a.cudnn_attention == "on",
                                pad_multiple=a.pad_multiple, ref_batch=a.ref_batch,
                                triton_kernels=a.triton_kernels == "on", max_grad_norm=a.max_grad_norm,
                                optim_in_backward=a.optim_in_backward, recompute_mlp=a.recompute_mlp)
                runs: dict[str, list[dict]] = {s: [] for s in ["preftune", *sides]}
                for _ in range(a.repeats):  # rounds of every side in turn: a slow spell of the machine hits all
                    ours = spawn(dict(base, side="preftune"))
                    runs["preftune"].append(ours)
                    for side in sides:
                        runs[side].append(spawn(dict(base, side="trl", order=ours["order"],
                                                     precompute=side == "trl_precompute"),
                                                {"THP_MEM_ALLOC_ENABLE": "1"} if a.trl_thp else None))
                res = {side: _median_run(r) for side, r in runs.items()}
                row = _row(model_name, shape, mode, res, peak)
                results.append(row)
                print_table([row])
                print(flush=True)
    print("\n== all ==")
    print_table(results)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(command=" ".join(["python benchmarks/vs_trl.py", *(argv or sys.argv[1:])]),
                                           versions=info, matmul_peak_flops=peak, dtype=dtype, steps=a.steps, repeats=a.repeats,
                                           batch=a.batch, max_grad_norm=a.max_grad_norm,
                                           optim_in_backward=a.optim_in_backward, results=results), indent=1))
    print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
