"""The benchmark scripts that need nothing beyond preftune's own install still run (no timings asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["full", "lora", "lora-precompute"])
def test_host_overhead_runs_each_mode(mode):
    import torch

    threads = torch.get_num_threads()
    bench = _load("host_overhead")
    assert bench.run(mode, steps=4, layers=2) > 0
    assert torch.get_num_threads() == threads  # the process's thread count is put back


def test_saved_activations_counts_what_backward_keeps():
    """saved_bytes: the LoRA dropout's share (the fused path keeps a one-byte mask where peft's keeps a
    dropped copy and noise), and the norms' recompute put back after the count."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from preftune import fused
    from preftune.data.batching import collate
    from preftune.testing import tiny_model

    bench = _load("saved_activations")
    feats = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13], "index": i} for i in range(2)]
    batch = collate(feats, layout="prefix", pad_token_id=0)
    real = fused.recompute_norm_outputs
    counts = {}
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        eager = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "down_proj"]))
        lean = copy.deepcopy(eager)
        fused.fuse_layers(lean, triton=False)
        counts[p] = bench.saved_bytes(eager, batch), bench.saved_bytes(lean, batch)
    assert fused.recompute_norm_outputs is real
    assert counts[0.3][1] - counts[0.0][1] < counts[0.3][0] - counts[0.0][0]


def test_gpu_path_host_runs_in_its_own_process():
    """It stubs preftune's kernel launches for the whole process: run as a script, as documented."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_path_host.py"
    proc = subprocess.run([sys.executable, str(script), "--layers", "2", "--rounds", "1", "--reps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "top-level aten calls" in ln]
    assert len(lines) == 2
    kernel, eager = (int(ln.rsplit(" ", 1)[1]) for ln in lines)
    assert kernel < eager  # the rotary kernel is fewer calls than transformers' ops


def test_memory_trace_accounts_rss_and_heap():
    """One step of the benchmark's job: each step phase has a row, the maxima are consistent, and the
    heap's bytes in use (glibc) fit inside the RSS."""
    bench = _load("memory_trace")
    if bench.heap_in_use() is None:
        pytest.skip("needs glibc's mallinfo2")
    import vs_trl  # memory_trace put benchmarks/ on the path

    from preftune.models import embedded_model_path

    out = bench.trace(vs_trl.make_job(str(embedded_model_path()), "short", steps=1, batch=1))
    phases = [name for name, _, _ in out["rows"]]
    assert {"forward 1", "backward 1"} <= set(phases)
    for _, rss, use in out["rows"]:
        assert 0 < use < rss
    assert out["max_rss"][0] >= max(rss for _, rss, _ in out["rows"])
    assert out["max_in_use"][0] >= max(use for _, _, use in out["rows"])
    assert len(out["result"]["losses"]) == 1


# --- benchmarks/grpo_vs_trl.py: its arguments, its clock and each side's worker on a tiny model (no timings) ---


def test_grpo_vs_trl_dry_run_lists_one_job_per_shape_mode_and_group_size(capsys):
    import json

    bench = _load("grpo_vs_trl")
    assert bench.main(["--dry-run", "--shapes", "short", "long", "--modes", "full", "--generations", "4", "8",
                       "--beta", "0.04", "--sides", "preftune", "trl"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [(j["shape"], j["generations"]) for j in jobs] == [("short", 4), ("short", 8), ("long", 4), ("long", 8)]
    assert [j["max_completion_length"] for j in jobs] == [32, 32, 64, 64]
    assert all(j["beta"] == 0.04 and j["temperature"] == 1.0 and j["sides"] == ["preftune", "trl"] for j in jobs)


@pytest.mark.parametrize("argv, message", [
    (["--accumulation", "3"], "--accumulation 3 must divide the 16 completions"),
    (["--generations", "1"], "--generations 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--sides", "trl-gc"], "invalid choice"),
])
def test_grpo_vs_trl_refuses_bad_arguments_by_name(argv, message, capsys):
    bench = _load("grpo_vs_trl")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--dry-run", *argv])  # the default --generations 4 8: 16 completions a step first
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_grpo_vs_trl_phase_clock_counts_nested_calls_once(monkeypatch):
    """A wrapped call's seconds exclude those of wrapped calls inside it; a call whose condition is false is not
    counted (a fake clock: no timing)."""
    bench = _load("grpo_vs_trl")
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    clock = bench.PhaseClock("cpu")

    def advance(dt):
        now[0] += dt

    inner = clock.wrap(lambda: advance(5.0), "generation")
    skipped = clock.wrap(lambda: advance(7.0), "logps", when=lambda: False)

    def outer_body():
        advance(1.0)
        inner()
        skipped()
        advance(2.0)

    clock.wrap(outer_body, "update")()
    assert clock.take() == {"generation": 5.0, "update": 10.0}
    assert clock.take() == {}


def test_grpo_vs_trl_reward_varies_and_summary_skips_the_first_step():
    bench = _load("grpo_vs_trl")
    bench.REWARD_CALLS.clear()
    assert bench.vowel_share(["aa", "ab", "", "xyz"], completion_ids=[[1], [2, 3], [], [4]]) == [1.0, 0.5, 0.0, 0.0]
    assert bench.REWARD_CALLS[0]["completion_tokens"] == [1, 2, 0, 1]

    def step(seconds, update, reward):
        return dict(seconds=seconds, phases={"generation": seconds - update, "update": update}, completions=4,
                    completion_tokens=10, trained_tokens=50, mean_reward=reward, prompt_rows=[0])

    raw = dict(wall_s=20.0, peak_mem=2**20, n_matmul=1000,
               steps=[step(10.0, 5.0, 0.1), step(4.0, 2.0, 0.2), step(6.0, 3.0, 0.3)])
    full, lora = bench.summarize(raw, "full", peak=1.0), bench.summarize(raw, "lora", peak=1.0)
    assert full["step_s"] == 5.0  # the median of the steps after the first
    assert full["phases_s"]["update"] == 2.5 and full["phases_s"]["scoring"] == 0.0
    assert (full["reward_first"], full["reward_last"]) == (0.1, 0.3)
    assert full["completions_per_s"] == 12 / 20.0 and full["tokens_per_s"] == 30 / 20.0
    assert full["update_mfu"] == pytest.approx(6 * 1000 * 150 / 10.0)
    assert lora["update_mfu"] == pytest.approx(4 * 1000 * 150 / 10.0)


@pytest.fixture(scope="module")
def grpo_worker_results(tmp_path_factory):
    """Each side's worker (its own process, as the benchmark runs it) for 2 steps of 2 prompts x G 2 on a tiny
    model, computed once per side."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train_worker import make_model_dir

    model = make_model_dir(tmp_path_factory.mktemp("grpo-bench-model"))
    bench = _load("grpo_vs_trl")
    results = {}

    def run(side):
        if side not in results:
            job = bench.make_job(str(model), "short", steps=2, prompts_per_step=2, generations=2,
                                 max_completion_length=4, side=side)
            results[side] = bench.spawn(job)
        return results[side]

    return run


def _check_worker_result(res, side):
    assert res["side"] == side and len(res["steps"]) == 2
    for step in res["steps"]:
        assert step["completions"] == 4 and 0 < step["completion_tokens"] <= 16
        assert step["trained_tokens"] > step["completion_tokens"]  # the prompts counted too
        phases = step["phases"]
        assert phases["generation"] > 0 and phases["update"] > 0 and phases["scoring"] > 0
        assert phases["other"] > -1e-6  # no phase counted twice
        assert sum(phases.values()) == pytest.approx(step["seconds"])
    assert [s["prompt_rows"] for s in res["steps"]] == [[0, 1], [2, 3]]  # in dataset order, no shuffle


def test_grpo_vs_trl_preftune_worker_splits_each_step(grpo_worker_results):
    _check_worker_result(grpo_worker_results("preftune"), "preftune")


@pytest.mark.parametrize("side", ["trl", "trl-nogc"])
def test_grpo_vs_trl_trl_worker_splits_each_step(side, grpo_worker_results):
    pytest.importorskip("trl")
    res = grpo_worker_results(side)
    _check_worker_result(res, side)
    assert res["gradient_checkpointing"] is (side == "trl")  # TRL's default, and the side without it


def test_grpo_vs_trl_main_writes_ratios_of_each_sides_median_run(tmp_path, monkeypatch, capsys):
    """The driver without workers: rounds of every side, each side's median-wall run, ratios preftune / TRL,
    a warning when the sides saw different prompts, and the JSON."""
    import json

    bench = _load("grpo_vs_trl")
    walls = {"preftune": iter([30.0, 10.0, 20.0]), "trl": iter([40.0, 60.0, 50.0])}

    def fake_spawn(job):
        wall = next(walls[job["side"]])
        rows = [[0, 1], [2, 3]] if job["side"] == "preftune" else [[0, 1], [3, 2]]
        steps = [dict(seconds=wall / 2, phases={"update": 1.0, "other": wall / 2 - 1.0}, completions=8,
                      completion_tokens=20, trained_tokens=100, mean_reward=0.5, prompt_rows=r) for r in rows]
        return dict(side=job["side"], wall_s=wall, init_s=0.0, steps=steps, peak_mem=wall * 2**20, n_matmul=10)

    monkeypatch.setattr(bench, "spawn", fake_spawn)
    monkeypatch.setattr(bench.vs_trl, "matmul_peak", lambda device, dtype: 1.0)
    monkeypatch.setattr(bench.vs_trl, "versions", lambda: {"device": "test", "cpus": 1})
    out = tmp_path / "r.json"
    assert bench.main(["--shapes", "short", "--modes", "full", "--generations", "4", "--sides", "preftune", "trl",
                       "--repeats", "3", "--steps", "2", "--out", str(out)]) == 0
    assert "WARNING: the sides trained on different prompts" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["results"]
    assert row["sides"]["preftune"]["walls_s"] == [30.0, 10.0, 20.0] and row["sides"]["preftune"]["job_s"] == 20.0
    assert row["sides"]["trl"]["job_s"] == 50.0
    assert row["ratios"]["trl"]["step_s"] == pytest.approx(20.0 / 50.0)
    assert row["ratios"]["trl"]["peak_mem"] == pytest.approx(20.0 / 50.0)
    assert row["same_prompts"] is False
