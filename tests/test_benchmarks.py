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
