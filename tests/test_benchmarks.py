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
