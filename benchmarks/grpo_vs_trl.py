"""preftune vs TRL's GRPOTrainer: the same GRPO job, side by side, in one invocation.

    python benchmarks/grpo_vs_trl.py                    # CPU: SmolLM2-135M (embedded), float32, 4 prompts x G
    python benchmarks/grpo_vs_trl.py --steps 3 --shapes short --modes full --generations 4 --repeats 3
    python benchmarks/grpo_vs_trl.py --sides trl --steps 2 --shapes short --modes full   # TRL only (a harness check)

Each side runs in its own subprocess (so peak memory is its own), one after the other: the same model weights,
the same plain-text prompts (a ``prompt`` column) in the same order (``shuffle_dataset=False`` on every side),
the same reward function (``vowel_share`` below: cheap, deterministic, different for every completion), the
same num_generations G, prompts per step, max_completion_length, temperature, learning rate, beta and seed.
The sides: ``preftune`` (its defaults otherwise), ``trl`` (TRL's defaults, with ``bf16=False`` on CPU where its
default would autocast to bfloat16) and ``trl-nogc`` (the same with ``gradient_checkpointing=False``).

Reported per side: seconds per step (the median of the steps after the first, each step measured from the end
of the one before, so it includes everything the trainer does between two updates) and the whole job
(construction and every step); completions/s and completion tokens/s over the whole job; the split of a step
into generation, scoring (the reward function), old/reference log-probs (no-grad forwards), the update
(forward, backward and optimizer step) and the rest; peak memory (RSS on CPU, allocated on GPU); the mean
reward of the first and last steps (recorded by the reward function itself, so both sides count it the same
way); and model-FLOPs utilization of the update. The split comes from wrappers put around the trainers'
methods in the worker process (never in library code):

    TRL       generation  ``_generate_single_turn``;  scoring  ``_calculate_rewards``;
              log-probs   ``_get_per_token_logps_and_entropies`` when called without grad;
              update      ``training_step`` minus what it calls of the above and of
                          ``_generate_and_score_completions`` (whose own remainder: tokenizing, decoding,
                          advantages, is "rollout"), plus the optimizer step;
    preftune  generation  ``preftune.grpo.rollout.generate_groups``;  scoring  the trainer's ``_score``;
              log-probs   the trainer's ``_attach_logps``;
              update      the loop's ``_optimizer_step`` minus what it calls of the above and of the trainer's
                          ``_make_round`` (whose own remainder: advantages, splitting, metrics, is "rollout"),
                          plus the optimizer step.

(preftune's ``_score`` decodes the completions to text; TRL decodes them in ``_generate_and_score_completions``,
so decoding counts as scoring on one side and as rollout on the other: a few milliseconds.)

The time between ``on_pre_optimizer_step`` and ``on_optimizer_step`` (the optimizer's step) counts as update
on both sides; whatever no wrapper covers (clipping, the schedule, logging) is "other".

MFU of the update: useful FLOPs over the update's seconds and the matmul peak this script measures (the one
benchmarks/vs_trl.py measures). Useful FLOPs per trained token are 6N for full fine-tuning (forward 2N,
backward 4N) and 4N with LoRA (no weight gradients of the frozen matmuls), N = parameters of the matmuls.
The trained tokens are counted the same way for every side, as the work the math needs: each completion's
tokens plus its prompt's once per group (every completion of a group sees the same prompt states), so a side
that runs the prompt once per completion does more work than is useful and shows it as lower utilization.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The environment as the user started this script: importing preftune sets THP_MEM_ALLOC_ENABLE=1, a preftune
# default that must not leak into the TRL workers.
USER_ENV = dict(os.environ)
sys.path.insert(0, str(HERE))
import vs_trl  # noqa: E402  (benchmarks/ put on the path just above)

SHAPES = {
    # one word of vs_trl.WORDS is one SmolLM2 token
    "short": dict(prompt_words=40, max_completion_length=32),
    "long": dict(prompt_words=300, max_completion_length=64),
}
SIDES = ("preftune", "trl", "trl-nogc")
PHASES = ("generation", "scoring", "logps", "update", "rollout", "other")


def make_prompts(n: int, prompt_words: int, seed: int = 0) -> list[dict]:
    """Deterministic synthetic plain-text prompts of about ``prompt_words`` tokens."""
    rng = random.Random(seed)
    return [{"prompt": "Continue this list: " + " ".join(rng.choice(vs_trl.WORDS) for _ in range(prompt_words))}
            for _ in range(n)]


# What the reward function saw, per call (the worker's process only): one call per generation batch.
REWARD_CALLS: list[dict] = []


def vowel_share(completions, completion_ids=None, **kwargs) -> list[float]:
    """Share of the completion's characters that are vowels (0 for an empty one): deterministic, cheap, and
    different for nearly every sampled completion, so every group has a spread to learn from."""
    rewards = [sum(c in "aeiouAEIOU" for c in text) / len(text) if text else 0.0 for text in completions]
    REWARD_CALLS.append(dict(rewards=rewards, completion_tokens=[len(ids) for ids in completion_ids or []],
                             prompts=list(kwargs.get("prompts") or [])))
    return rewards


class PhaseClock:
    """Exclusive seconds per phase: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self, device: str):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []

    def wrap(self, fn, phase: str, when=None):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if when is not None and not when():
                return fn(*args, **kwargs)
            vs_trl._sync(self.device)
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                vs_trl._sync(self.device)
                inner = self._stack.pop()
                dt = time.perf_counter() - t0
                self.totals[phase] += dt - inner
                if self._stack:
                    self._stack[-1] += dt
        return timed

    def patch(self, owner, name: str, phase: str, when=None) -> bool:
        """Replace ``owner.name`` (a class's method or a module's function) by its timed wrapper."""
        fn = getattr(owner, name, None)
        if fn is None:
            return False
        setattr(owner, name, self.wrap(fn, phase, when))
        return True

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def step_callback(clock: PhaseClock):
    """A TrainerCallback (both trainers call them) that closes each step: its seconds from the end of the one
    before, the phases' seconds, and the reward calls made during it."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self._last = None
            self._opt = None

        def on_step_begin(self, args, state, control, **kw):
            if self._last is None:
                self._last = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            vs_trl._sync(clock.device)
            self._opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            vs_trl._sync(clock.device)
            clock.totals["update"] += time.perf_counter() - self._opt

        def on_step_end(self, args, state, control, **kw):
            vs_trl._sync(clock.device)
            now = time.perf_counter()
            phases = clock.take()
            calls = REWARD_CALLS[:]
            REWARD_CALLS.clear()
            seconds = now - self._last
            phases["other"] = seconds - sum(v for k, v in phases.items() if k != "other")
            rewards = [r for c in calls for r in c["rewards"]]
            self.steps.append(dict(seconds=seconds, phases=phases, completions=len(rewards),
                                   completion_tokens=sum(n for c in calls for n in c["completion_tokens"]),
                                   prompts=[p for c in calls for p in c["prompts"]],
                                   mean_reward=sum(rewards) / len(rewards) if rewards else float("nan")))
            self._last = now

    return StepClock()


# --------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def _load(job: dict):
    """The prompts, the model and the tokenizer, loaded the same way on every side (before the clock starts)."""
    import torch
    from datasets import Dataset

    torch.manual_seed(job["seed"])
    rows = make_prompts(job["steps"] * job["prompts_per_step"], SHAPES[job["shape"]]["prompt_words"], job["seed"])
    model, tok, device = vs_trl.load_model_and_tokenizer(job)
    prompts = {r["prompt"]: (i, len(tok(r["prompt"])["input_ids"])) for i, r in enumerate(rows)}  # (row, tokens)
    return Dataset.from_list(rows), model, tok, device, prompts


def shared_args(job: dict, device: str, output_dir: str) -> dict:
    """The GRPOConfig fields both sides get, by TRL's names; everything else is each side's default."""
    completions = job["prompts_per_step"] * job["generations"]
    if completions % job["accumulation"]:
        raise ValueError(f"--accumulation {job['accumulation']} must divide the {completions} completions of a step "
                         f"(--prompts-per-step {job['prompts_per_step']} x --generations {job['generations']})")
    return dict(
        output_dir=output_dir, per_device_train_batch_size=completions // job["accumulation"],
        gradient_accumulation_steps=job["accumulation"], num_generations=job["generations"],
        max_completion_length=job["max_completion_length"], temperature=job["temperature"],
        learning_rate=job["lr"], beta=job["beta"], seed=job["seed"], shuffle_dataset=False, max_steps=job["steps"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device == "cpu",
        bf16=job["dtype"] == "bfloat16",
    )


def _result(side: str, clock_cb, wall: float, init_s: float, device: str, n_matmul: int, prompts: dict) -> dict:
    steps = clock_cb.steps
    for s in steps:
        seen = s.pop("prompts")
        # the trained tokens: each completion's own plus its prompt's once per group (the step's distinct prompts)
        s["trained_tokens"] = s["completion_tokens"] + sum(prompts[p][1] for p in dict.fromkeys(seen))
        s["prompt_rows"] = list(dict.fromkeys(prompts[p][0] for p in seen))  # the step's prompts, in order
    return dict(side=side, wall_s=wall, init_s=init_s, steps=steps, peak_mem=vs_trl.peak_memory_bytes(device),
                n_matmul=n_matmul, device=device)


def run_trl(job: dict) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    ds, model, tok, device, prompts = _load(job)
    n_matmul = vs_trl.matmul_params(model)
    clock = PhaseClock(device)
    import torch

    no_grad = lambda: not torch.is_grad_enabled()  # noqa: E731  (the old/reference passes, not the loss's forward)
    for name, phase, when in (("_generate_single_turn", "generation", None), ("_calculate_rewards", "scoring", None),
                              ("_get_per_token_logps_and_entropies", "logps", no_grad),
                              ("_generate_and_score_completions", "rollout", None), ("training_step", "update", None)):
        if not clock.patch(GRPOTrainer, name, phase, when):
            raise RuntimeError(f"TRL's GRPOTrainer has no {name}: this benchmark's split needs updating for trl")
    out = tempfile.mkdtemp(prefix="bench-grpo-trl-")
    args = shared_args(job, device, out)
    if job["side"] == "trl-nogc":
        args["gradient_checkpointing"] = False
    cb = step_callback(clock)
    trainer, wall, init_s = vs_trl._timed_job(device, lambda: GRPOTrainer(
        model=model, reward_funcs=vowel_share, args=GRPOConfig(**args), train_dataset=ds, processing_class=tok,
        peft_config=vs_trl._lora() if job["mode"] == "lora" else None, callbacks=[cb]))
    res = _result(job["side"], cb, wall, init_s, device, n_matmul, prompts)
    res["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    return res


def run_preftune(job: dict) -> dict:
    from preftune import GRPOConfig, GRPOTrainer
    from preftune.grpo import rollout

    trainer_module = sys.modules[GRPOTrainer.__module__]
    ds, model, tok, device, prompts = _load(job)
    n_matmul = vs_trl.matmul_params(model)
    clock = PhaseClock(device)
    generate = clock.wrap(rollout.generate_groups, "generation")
    rollout.generate_groups = generate
    if getattr(trainer_module, "generate_groups", None) is not None:  # imported by name into the trainer's module
        trainer_module.generate_groups = generate
    for name, phase in (("_score", "scoring"), ("_attach_logps", "logps"), ("_make_round", "rollout"),
                        ("_optimizer_step", "update")):
        if not clock.patch(GRPOTrainer, name, phase):
            raise RuntimeError(f"preftune's GRPOTrainer has no {name}: this benchmark's split needs updating")
    out = tempfile.mkdtemp(prefix="bench-grpo-preftune-")
    cb = step_callback(clock)
    trainer, wall, init_s = vs_trl._timed_job(device, lambda: GRPOTrainer(
        model=model, reward_funcs=vowel_share, args=GRPOConfig(**shared_args(job, device, out)), train_dataset=ds,
        processing_class=tok, peft_config=vs_trl._lora() if job["mode"] == "lora" else None, callbacks=[cb]))
    return _result("preftune", cb, wall, init_s, device, n_matmul, prompts)


# --------------------------------------------------------------------------------------------


def make_job(model: str, shape: str, mode: str = "full", **options) -> dict:
    """One job as the workers take it: ``options`` override the defaults (2 steps, 4 prompts x G 4 per step,
    one micro-batch, temperature 1, lr 1e-6, beta 0, seed 0, float32)."""
    job = dict(model=model, shape=shape, mode=mode, steps=2, prompts_per_step=4, generations=4, accumulation=1,
               max_completion_length=SHAPES[shape]["max_completion_length"], temperature=1.0, lr=1e-6, beta=0.0,
               seed=0, dtype="float32", side="preftune")
    job.update(options)
    return job


def spawn(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        path = f.name
    env = dict(USER_ENV, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", path], capture_output=True, text=True, env=env)
    os.unlink(path)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {job['side']} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(res: dict, mode: str, peak: float) -> dict:
    """A side's raw steps -> the numbers the table shows."""
    steps, wall = res["steps"], res["wall_s"]
    later = steps[1:] or steps  # the first step pays the warm-up
    completions = sum(s["completions"] for s in steps)
    update_s = sum(s["phases"].get("update", 0.0) for s in steps)
    flops = (4 if mode == "lora" else 6) * res["n_matmul"] * sum(s["trained_tokens"] for s in steps)
    return dict(
        step_s=statistics.median(s["seconds"] for s in later), job_s=wall, walls_s=res.get("walls_s", [wall]),
        steps=len(steps),
        completions_per_s=completions / wall, tokens_per_s=sum(s["completion_tokens"] for s in steps) / wall,
        phases_s={p: statistics.median(s["phases"].get(p, 0.0) for s in later) for p in PHASES},
        peak_mem=res["peak_mem"], update_mfu=flops / update_s / peak if update_s > 0 else float("nan"),
        reward_first=steps[0]["mean_reward"] if steps else float("nan"),
        reward_last=steps[-1]["mean_reward"] if steps else float("nan"),
        mean_completion_tokens=sum(s["completion_tokens"] for s in steps) / max(completions, 1))


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<6}{'mode':<5}{'G':>3} {'side':<9}{'s/step':>8}{'job s':>8}{'compl/s':>8}{'tok/s':>7}"
          + "".join(f"{p[:6]:>8}" for p in PHASES) + f"{'peak MiB':>9}{'MFU':>7}  reward first/last")
    for row in rows:
        for side in SIDES:
            if side not in row["sides"]:
                continue
            r = row["sides"][side]
            print(f"{row['shape']:<6}{row['mode']:<5}{row['generations']:>3} {side:<9}{r['step_s']:>8.2f}"
                  f"{r['job_s']:>8.1f}{r['completions_per_s']:>8.2f}{r['tokens_per_s']:>7.0f}"
                  + "".join(f"{r['phases_s'][p]:>8.2f}" for p in PHASES)
                  + f"{r['peak_mem'] / 2**20:>9.0f}{r['update_mfu'] * 100:>6.1f}%  "
                    f"{r['reward_first']:.4f} / {r['reward_last']:.4f}")
        for side, ratio in row.get("ratios", {}).items():
            print(f"{'':<15}preftune/{side}: step time {ratio['step_s']:.2f}x (speed-up {1 / ratio['step_s']:.2f}x), "
                  f"job {ratio['job_s']:.2f}x, peak memory {ratio['peak_mem']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shapes", nargs="+", default=["short", "long"], choices=list(SHAPES),
                   help="short: ~40-token prompts, 32 new tokens; long: ~300-token prompts, 64 new tokens")
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--generations", nargs="+", type=int, default=[4, 8], help="num_generations G (one job each)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES), help="which sides to run")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per job")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of all sides, one after the other; each side reports its median-wall run (and "
                        "every run's wall), so drift of a shared machine cannot favour one side")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimizer step (x G completions)")
    p.add_argument("--accumulation", type=int, default=1,
                   help="gradient_accumulation_steps: the step's completions in this many micro-batches")
    p.add_argument("--max-completion-length", type=int, default=None,
                   help="max_completion_length (default: the shape's, 32 short / 64 long)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-6, help="learning_rate (TRL's default)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 adds the reference's log-probs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 on CPU (default), bfloat16 on GPU")
    p.add_argument("--out", default="benchmarks/grpo_results.json")
    p.add_argument("--dry-run", action="store_true",
                   help="print the jobs each side would run, as JSON, and exit (no model loaded, nothing timed)")
    a = p.parse_args(argv)
    if a.worker:
        job = json.loads(Path(a.worker).read_text())
        res = run_preftune(job) if job["side"] == "preftune" else run_trl(job)
        print(json.dumps(res))
        return 0
    for name in ("steps", "repeats", "prompts_per_step", "accumulation"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(a, name)})")
    for g in a.generations:
        if g < 2:
            p.error(f"--generations {g}: GRPO's group advantages need at least 2 completions per prompt")
        if (a.prompts_per_step * g) % a.accumulation:
            p.error(f"--accumulation {a.accumulation} must divide the {a.prompts_per_step * g} completions of a step "
                    f"(--prompts-per-step {a.prompts_per_step} x --generations {g})")

    import torch

    from preftune.models import embedded_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    model = a.model or str(embedded_model_path())
    jobs = [make_job(model, shape, mode, steps=a.steps, prompts_per_step=a.prompts_per_step, generations=g,
                     accumulation=a.accumulation, temperature=a.temperature, lr=a.lr, beta=a.beta, seed=a.seed,
                     dtype=dtype, **({"max_completion_length": a.max_completion_length}
                                    if a.max_completion_length else {}))
            for shape in a.shapes for mode in a.modes for g in a.generations]
    if a.dry_run:
        print(json.dumps([dict(job, sides=a.sides) for job in jobs], indent=1))
        return 0
    peak = vs_trl.matmul_peak(device, dtype)
    info = vs_trl.versions()
    print(f"machine: {info['device']} ({info['cpus']} cpus); measured {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("device", "cpus")), flush=True)
    rows = []
    for job in jobs:
        runs: dict[str, list[dict]] = {side: [] for side in a.sides}
        for _ in range(a.repeats):  # rounds of every side in turn: a slow spell of the machine hits all of them
            for side in a.sides:
                runs[side].append(spawn(dict(job, side=side)))
        raw = {side: vs_trl._median_run(r) for side, r in runs.items()}
        orders = {side: [s["prompt_rows"] for s in r["steps"]] for side, r in raw.items()}
        row = dict(shape=job["shape"], mode=job["mode"], generations=job["generations"], job=job,
                   sides={side: summarize(r, job["mode"], peak) for side, r in raw.items()},
                   same_prompts=len({json.dumps(o) for o in orders.values()}) == 1, raw=raw)
        if not row["same_prompts"]:
            print(f"WARNING: the sides trained on different prompts (dataset rows per step: {orders}); their "
                  "rewards are not comparable", flush=True)
        if "preftune" in row["sides"]:
            ours = row["sides"]["preftune"]
            row["ratios"] = {side: {k: ours[k] / r[k] for k in ("step_s", "job_s", "peak_mem")}
                             for side, r in row["sides"].items() if side != "preftune"}
        rows.append(row)
        print_table([row])
        print(flush=True)
    print("\n== all ==")
    print_table(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(
        command=" ".join(["python benchmarks/grpo_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        versions=info, matmul_peak_flops=peak, dtype=dtype, results=rows), indent=1))
    print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
