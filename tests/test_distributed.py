"""Several processes on CPU (gloo): each multi-process run against its 1-process twin.

torch start-up costs seconds per process, so each launch runs several jobs (tests/_dist_worker.py):
- `torchrun --nproc_per_node 2`: per-device batch 2, accumulation 1, precomputed reference, a
  checkpoint at step 2, evaluation on 5 pairs (uneven shards: 3 and 2); then the same with LoRA
  (live reference: the adapters switched off).
- one plain process: batch 2 x accumulation 2 (the same global batch of 4), a resume from the
  2-process checkpoint, and the LoRA twin.
- `torchrun --nproc_per_node 2 -m preftune train` (the CLI) and `python -m preftune train` with
  accumulation 2.
- FSDP2 over 2 CPU processes (accelerate's FSDP path forced on CPU, see tests/_dist_worker.py): the
  full model with a precomputed reference; a live sharded reference with gradient checkpointing;
  LoRA; TR-DPO (refused); exact resumes from an FSDP checkpoint in 2 processes and in 1.
Each 1-process run is the slow obvious twin: same final weights, same logged losses and metrics,
same reference cache file; a resumed run ends where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.reference import merge_shard_tables, precompute_reference_logps, reference_deepspeed_config
from preftune.testing import tiny_model, tiny_tokenizer

WORKER = Path(__file__).with_name("_dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out: Path, cache: Path, **kw) -> dict:
    base = dict(output_dir=str(out), cache_dir=str(cache), demo_train_size=16, demo_eval_size=5, max_length=96,
                max_prompt_length=48, max_steps=3, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1,
                logging_steps=1, save_steps=2, eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=2,
                precompute_ref_log_probs=True, use_cpu=True, report_to="none", seed=0, max_grad_norm=1.0)
    base.update(kw)
    return base


FSDP_ENV = {  # what `accelerate launch --config_file examples/accelerate/fsdp.yaml` sets
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}


def _run(args: list[str], procs: int, env: dict | None = None) -> str:
    """`python ARGS` in one process, or `torchrun --nproc_per_node PROCS ARGS`; returns stdout + stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true", **(env or {}))
    if procs > 1:
        # torchrun: on CPU `accelerate launch --cpu` starts several processes only through MPI; under torchrun
        # the Accelerator reads RANK / WORLD_SIZE and picks gloo, as it does on GPUs with NCCL
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout + r.stderr


def _launch(spec: dict, path: Path, procs: int, env: dict | None = None) -> str:
    path.write_text(json.dumps(spec))
    return _run([str(WORKER), str(path)], procs, env)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / name))


def _assert_weights_close(a: dict, b: dict, atol: float, start: dict | None = None) -> None:
    assert a.keys() == b.keys()
    if start is not None:
        moved = max(float((b[k] - start[k]).abs().max()) for k in b)
        assert moved > 1e-4, "training did not change the weights; the comparison would prove nothing"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _assert_rows_close(a: list[dict], b: list[dict], skip=("pairs_per_second", "tokens_per_second"),
                       rel: float = 1e-5) -> None:  # fmt: skip
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = set(ra) - set(skip)
        assert keys == set(rb) - set(skip), (sorted(ra), sorted(rb))
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k, ra[k], rb[k])


# LoRA without dropout: with dropout each process draws its own masks, so 2 x 1 and 1 x 2 differ
LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, precompute_ref_log_probs=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    tok = tiny_tokenizer()
    model_dir = tmp / "model"
    tiny_model(len(tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    tied_dir = tmp / "tied_model"  # the input embedding adds its rows into the head's gradient (logps)
    tiny_model(len(tok), seed=0, tie_word_embeddings=True).save_pretrained(tied_dir)
    tok.save_pretrained(tied_dir)
    two, one, resumed = tmp / "two", tmp / "one", tmp / "resumed"
    two_lora, one_lora = tmp / "two_lora", tmp / "one_lora"
    _launch({"model": str(model_dir), "jobs": [
        {"config": _config(two, tmp / "cache2", per_device_train_batch_size=2, gradient_accumulation_steps=1),
         "out": str(tmp / "two.json"), "predictions": True},
        {"config": _config(two_lora, tmp / "cache2", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                           **LORA), "out": str(tmp / "two_lora.json")},
        {"config": _config(tmp / "two_workers", tmp / "cache2", per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, dataloader_num_workers=2), "out": str(tmp / "two_workers.json")},
        {"config": _config(tmp / "two_drop", tmp / "cache2", per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, **dict(LORA, lora_dropout=0.3)),
         "out": str(tmp / "two_drop.json")},
        {"config": _config(tmp / "two_drop_resumed", tmp / "cache2", per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, **dict(LORA, lora_dropout=0.3)),
         "resume": str(tmp / "two_drop" / "checkpoint-2"), "out": str(tmp / "two_drop_resumed.json")},
        {"config": _config(tmp / "two_tied", tmp / "cache_tied2", per_device_train_batch_size=2,
                           gradient_accumulation_steps=1), "model": str(tied_dir), "out": str(tmp / "two_tied.json")},
    ]}, tmp / "spec2.json", procs=2)
    _launch({"model": str(model_dir), "jobs": [
        {"config": _config(one, tmp / "cache1", per_device_train_batch_size=2, gradient_accumulation_steps=2),
         "out": str(tmp / "one.json"), "predictions": True},
        {"config": _config(resumed, tmp / "cache1", per_device_train_batch_size=2, gradient_accumulation_steps=2),
         "resume": str(two / "checkpoint-2"), "out": str(tmp / "resumed.json")},
        {"config": _config(one_lora, tmp / "cache1", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           **LORA), "out": str(tmp / "one_lora.json")},
        {"config": _config(tmp / "one_tied", tmp / "cache_tied1", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2), "model": str(tied_dir), "out": str(tmp / "one_tied.json")},
    ]}, tmp / "spec1.json", procs=1)
    names = ("two", "one", "resumed", "two_lora", "one_lora")
    info = {name: json.loads((tmp / f"{name}.json").read_text()) for name in names}
    return dict(tmp=tmp, two=two, one=one, resumed=resumed, two_lora=two_lora, one_lora=one_lora, info=info,
                model_dir=model_dir, tied_dir=tied_dir)


def test_two_processes_match_one_process_with_accumulation(runs):
    assert runs["info"]["two"]["num_processes"] == 2 and runs["info"]["one"]["num_processes"] == 1
    w2, w1, w0 = _weights(runs["two"]), _weights(runs["one"]), _weights(runs["model_dir"])
    assert w2.keys() == w1.keys()
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)
    assert moved > 1e-3, "training did not change the weights; the comparison would prove nothing"
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    rows2, rows1 = _rows(runs["two"]), _rows(runs["one"])
    assert [r["step"] for r in rows1 if "loss" in r] == [1, 2, 3]
    _assert_rows_close(rows2, rows1)


def test_two_processes_with_loader_workers_train_each_process_on_its_own_micro_batches(runs):
    """dataloader_num_workers=2 under 2 processes: each rank's workers collate that rank's micro-batches, so
    the run is the one whose ranks collate in the loop, bit for bit."""
    w, w0 = _weights(runs["tmp"] / "two_workers"), _weights(runs["two"])
    assert w.keys() == w0.keys() and all(torch.equal(w[k], w0[k]) for k in w)
    _assert_rows_close(_rows(runs["tmp"] / "two_workers"), _rows(runs["two"]), rel=0)


def test_tied_embeddings_two_processes_match_one_process(runs):
    """DDP reduces the tied weight's gradient once it is whole: the embedding's rows are added into the
    head's gradient before the weight's AccumulateGrad (where DDP's hook sits) runs."""
    tmp = runs["tmp"]
    w2, w1, w0 = _weights(tmp / "two_tied"), _weights(tmp / "one_tied"), _weights(runs["tied_dir"])
    assert "lm_head.weight" not in w0  # saved tied
    _assert_weights_close(w2, w1, atol=1e-5, start=w0)
    _assert_rows_close(_rows(tmp / "two_tied"), _rows(tmp / "one_tied"))


def test_lora_two_processes_match_one_process_with_accumulation(runs):
    """LoRA under DDP: only the adapters train and sync; the reference is the policy with adapters off."""
    info = runs["info"]
    assert (info["two_lora"]["num_processes"], info["one_lora"]["num_processes"]) == (2, 1)
    assert info["two_lora"]["distributed_type"] == "MULTI_CPU"
    assert not (runs["two_lora"] / "model.safetensors").exists()  # the adapter alone is saved
    name = "adapter_model.safetensors"
    a2, a1 = _weights(runs["two_lora"], name), _weights(runs["one_lora"], name)
    assert a1 and all("lora_" in k for k in a1)
    zero = {k: torch.zeros_like(v) for k, v in a1.items() if "lora_B" in k}  # lora_B starts at 0
    _assert_weights_close({k: a2[k] for k in zero}, {k: a1[k] for k in zero}, atol=1e-5, start=zero)
    _assert_weights_close(a2, a1, atol=1e-5)
    rows2, rows1 = _rows(runs["two_lora"]), _rows(runs["one_lora"])
    assert [r["step"] for r in rows1 if "loss" in r] == [1, 2, 3]
    _assert_rows_close(rows2, rows1)
    for k, v in info["one_lora"]["final_eval"].items():
        assert info["two_lora"]["final_eval"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_two_process_resume_restores_every_process_random_state(runs):
    """LoRA dropout draws masks on every process: each process's RNG state is in the checkpoint, so a
    2-process resume with dropout ends exactly where the uninterrupted run ended."""
    name = "adapter_model.safetensors"
    full, resumed = _weights(runs["tmp"] / "two_drop", name), _weights(runs["tmp"] / "two_drop_resumed", name)
    assert full.keys() == resumed.keys() and full
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-7, msg=k)
    after = [r for r in _rows(runs["tmp"] / "two_drop") if r["step"] > 2]  # the resumed run logs from step 3
    assert any("loss" in r for r in after)  # the comparison below is not empty
    _assert_rows_close(_rows(runs["tmp"] / "two_drop_resumed"), after, rel=1e-7)
    # the dropout run differs from the dropout-free one, so the masks did matter
    plain = _weights(runs["two_lora"], name)
    assert max(float((plain[k] - full[k]).abs().max()) for k in full) > 1e-5


def test_eval_reduction_counts_uneven_shards(runs):
    """5 eval pairs over 2 ranks (3 + 2, batch 2: rank 1 runs one filler batch counted as 0 pairs)."""
    e2, e1 = runs["info"]["two"]["final_eval"], runs["info"]["one"]["final_eval"]
    assert e2.keys() == e1.keys() and "eval_loss" in e1
    for k in e1:
        assert e2[k] == pytest.approx(e1[k], rel=1e-5, abs=1e-6), k
    accuracy = e1["eval_rewards/accuracies"] * 5
    assert accuracy == pytest.approx(round(accuracy), abs=1e-5), "accuracy must be a count over 5 pairs"


def test_compute_metrics_gets_every_processs_pairs_in_order(runs):
    """compute_metrics' per-pair predictions gathered from 2 ranks (strided shards, a filler batch) are the
    one-process run's, row for row."""
    p2, p1 = (np.array(runs["info"][k]["predictions"]) for k in ("two", "one"))
    assert p1.shape == (5, 4) and p2.shape == (5, 4)
    np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-5)


def test_precompute_under_two_processes_writes_the_same_cache(runs):
    from safetensors import safe_open

    files2 = sorted((runs["tmp"] / "cache2").glob("*.safetensors"))
    files1 = sorted((runs["tmp"] / "cache1").glob("*.safetensors"))
    assert [f.name for f in files2] == [f.name for f in files1] and len(files1) == 2  # train and eval tables
    for f2, f1 in zip(files2, files1):
        with safe_open(str(f2), framework="pt") as a, safe_open(str(f1), framework="pt") as b:
            assert a.metadata()["key"] == b.metadata()["key"]
            t2, t1 = a.get_tensor("logps"), b.get_tensor("logps")
        assert not torch.isnan(t1).any()
        torch.testing.assert_close(t2, t1, rtol=0, atol=1e-6)


def test_resume_two_process_checkpoint_in_one_process(runs):
    assert runs["info"]["resumed"]["num_processes"] == 1
    w2, wr = _weights(runs["two"]), _weights(runs["resumed"])
    for k in w2:
        torch.testing.assert_close(wr[k], w2[k], rtol=0, atol=1e-5, msg=k)
    step3 = [r for r in _rows(runs["resumed"]) if r["step"] == 3 and "loss" in r]
    _assert_rows_close(step3, [r for r in _rows(runs["two"]) if r["step"] == 3 and "loss" in r])


# --- the CLI under torchrun ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    from _train_worker import make_model_dir, pair_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("cli")
    model_dir = make_model_dir(tmp / "model")
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows(16))
    flags = ["--model_name_or_path", str(model_dir), "--dataset", str(data), "--eval_dataset", "0.25",
             "--eval_strategy", "steps", "--eval_steps", "100", "--eval_on_start", "true", "--max_steps", "3",
             "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
             "--save_steps", "2", "--seed", "0", "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    two, one = tmp / "two", tmp / "one"
    log2 = _run(["-m", "preftune", "train", *flags, "--output_dir", str(two)], procs=2)
    log1 = _run(["-m", "preftune", "train", *flags, "--gradient_accumulation_steps", "2", "--output_dir", str(one)],
                procs=1)
    return dict(two=two, one=one, log2=log2, log1=log1, model_dir=model_dir)


def test_cli_under_torchrun_matches_one_process_with_accumulation(cli_runs):
    """`torchrun --nproc_per_node 2 -m preftune train --use_cpu true` = `preftune train` with accumulation 2."""
    _assert_weights_close(_weights(cli_runs["two"]), _weights(cli_runs["one"]), atol=1e-5,
                          start=_weights(cli_runs["model_dir"]))
    rows2, rows1 = _rows(cli_runs["two"]), _rows(cli_runs["one"])
    assert [r["step"] for r in rows1 if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows1 if "eval_loss" in r] == [0, 3]
    _assert_rows_close(rows2, rows1)


def test_cli_under_torchrun_writes_from_the_main_process_only(cli_runs):
    two = cli_runs["two"]
    assert [r["step"] for r in _rows(two)] == [r["step"] for r in _rows(cli_runs["one"])]  # each row once
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint-", ".tmp"))) == ["checkpoint-2"]
    assert (two / "checkpoint-2" / "COMPLETE").is_file() and (two / "model.safetensors").is_file()
    assert not list(two.glob("**/.tmp*"))  # no leftover temporary files from a second writer
    # the closing summary (held-out table, paths) is printed by the main process alone
    assert cli_runs["log2"].count("trained model:") == 1 and cli_runs["log1"].count("trained model:") == 1
    assert cli_runs["log2"].count("held-out pairs:") == 1


# --- FSDP2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    tmp, model_dir = runs["tmp"], runs["model_dir"]
    names = ("fsdp", "fsdp_live_gc", "fsdp_lora", "fsdp_resumed", "fsdp_lora_resumed", "fsdp_resumed1")
    out = {name: tmp / name for name in names}
    base = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1)
    log = _launch({"model": str(model_dir), "fsdp_on_cpu": True, "jobs": [
        {"config": _config(out["fsdp"], tmp / "cache_fsdp", **base), "out": str(tmp / "fsdp.json")},
        {"config": _config(out["fsdp_live_gc"], tmp / "cache_fsdp", precompute_ref_log_probs=False,
                           gradient_checkpointing=True, **base), "out": str(tmp / "fsdp_live_gc.json")},
        {"config": _config(out["fsdp_lora"], tmp / "cache_fsdp", **LORA, **base), "out": str(tmp / "fsdp_lora.json")},
        {"config": _config(tmp / "fsdp_trdpo", tmp / "cache_fsdp", precompute_ref_log_probs=False,
                           sync_ref_model=True, **base),
         "expect_error": "sync_ref_model=True (TR-DPO) is not supported with sharded parameters (FSDP"},
        {"config": _config(out["fsdp_resumed"], tmp / "cache_fsdp", **base),
         "resume": str(out["fsdp"] / "checkpoint-2"), "out": str(tmp / "fsdp_resumed.json")},
        {"config": _config(out["fsdp_lora_resumed"], tmp / "cache_fsdp", **LORA, **base),
         "resume": str(out["fsdp_lora"] / "checkpoint-2"), "out": str(tmp / "fsdp_lora_resumed.json")},
    ]}, tmp / "spec_fsdp.json", procs=2, env=FSDP_ENV)
    _launch({"model": str(model_dir), "jobs": [  # the FSDP checkpoint in one plain process
        {"config": _config(out["fsdp_resumed1"], tmp / "cache_fsdp", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2),
         "resume": str(out["fsdp"] / "checkpoint-2"), "out": str(tmp / "fsdp_resumed1.json")},
    ]}, tmp / "spec_fsdp1.json", procs=1)
    info = {name: json.loads((tmp / f"{name}.json").read_text()) for name in names}
    return dict(out, info=info, log=log)


def test_fsdp2_matches_ddp(runs, fsdp_runs):
    """FSDP2 (parameters, gradients and optimizer state sharded over 2 processes) = DDP = 1 x accumulation 2."""
    info = fsdp_runs["info"]
    for name in ("fsdp", "fsdp_live_gc", "fsdp_lora", "fsdp_resumed", "fsdp_lora_resumed"):
        assert info[name]["distributed_type"] == "FSDP" and info[name]["num_processes"] == 2, name
        assert info[name]["sharded"] and info[name]["optimizer_holds_sharded_params"], name
    _assert_weights_close(_weights(fsdp_runs["fsdp"]), _weights(runs["two"]), atol=1e-4,
                          start=_weights(runs["model_dir"]))
    _assert_rows_close(_rows(fsdp_runs["fsdp"]), _rows(runs["two"]), rel=1e-4)
    for k, v in runs["info"]["two"]["final_eval"].items():  # evaluation: uneven shards, a filler batch
        assert info["fsdp"]["final_eval"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_fsdp2_precompute_writes_the_same_cache(runs, fsdp_runs):
    from safetensors import safe_open

    files = sorted((runs["tmp"] / "cache_fsdp").glob("*.safetensors"))
    files2 = sorted((runs["tmp"] / "cache2").glob("*.safetensors"))
    assert [f.name for f in files] == [f.name for f in files2] and len(files) == 2
    for f, f2 in zip(files, files2):
        with safe_open(str(f), framework="pt") as a, safe_open(str(f2), framework="pt") as b:
            assert a.metadata()["key"] == b.metadata()["key"]
            torch.testing.assert_close(a.get_tensor("logps"), b.get_tensor("logps"), rtol=0, atol=1e-6)


def test_fsdp2_live_sharded_reference_with_gradient_checkpointing(runs, fsdp_runs):
    """The frozen reference sharded by fully_shard (no precompute) and gradient checkpointing on the policy."""
    _assert_weights_close(_weights(fsdp_runs["fsdp_live_gc"]), _weights(runs["two"]), atol=1e-4)
    _assert_rows_close(_rows(fsdp_runs["fsdp_live_gc"]), _rows(runs["two"]), rel=1e-4)


def test_fsdp2_lora(runs, fsdp_runs):
    name = "adapter_model.safetensors"
    _assert_weights_close(_weights(fsdp_runs["fsdp_lora"], name), _weights(runs["two_lora"], name), atol=1e-5)
    _assert_rows_close(_rows(fsdp_runs["fsdp_lora"]), _rows(runs["two_lora"]), rel=1e-4)


def test_fsdp2_refuses_tr_dpo(fsdp_runs):
    assert fsdp_runs["log"].count("expected error: sync_ref_model=True (TR-DPO) is not supported") == 2  # each rank


def test_fsdp2_checkpoint_holds_whole_tensors_and_resumes_exactly(runs, fsdp_runs):
    ckpt_dir = fsdp_runs["fsdp"] / "checkpoint-2"
    saved = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    w0 = _weights(runs["model_dir"])
    n_params = sum(len(g["params"]) for g in saved["param_groups"])
    assert n_params == len(w0) and len(saved["state"]) == n_params  # torch's own format, every parameter
    shapes = sorted(tuple(s["exp_avg"].shape) for s in saved["state"].values())
    assert shapes == sorted(tuple(w.shape) for w in w0.values())  # whole tensors, not one process's shard
    assert all(type(s["exp_avg"]) is torch.Tensor for s in saved["state"].values())
    final = _weights(fsdp_runs["fsdp"])
    _assert_weights_close(_weights(fsdp_runs["fsdp_resumed"]), final, atol=1e-6)  # 2 processes, FSDP
    _assert_weights_close(_weights(fsdp_runs["fsdp_resumed1"]), final, atol=1e-5)  # 1 process
    step3 = [r for r in _rows(fsdp_runs["fsdp"]) if r["step"] == 3 and "loss" in r]
    assert len(step3) == 1  # the comparison below is not empty
    for name in ("fsdp_resumed", "fsdp_resumed1"):
        _assert_rows_close([r for r in _rows(fsdp_runs[name]) if r["step"] == 3 and "loss" in r], step3)
    name = "adapter_model.safetensors"
    _assert_weights_close(_weights(fsdp_runs["fsdp_lora_resumed"], name), _weights(fsdp_runs["fsdp_lora"], name),
                          atol=1e-6)


# --- in-process pieces -------------------------------------------------------------------------


def test_sharded_precompute_merges_to_the_single_pass_table():
    """Ranks 0..2 of 3 each compute every third batch; the merge equals the one-process pass bit for bit."""
    from preftune.data.tokenize import tokenize_dataset

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=1)
    pairs = [{"prompt": "q" * (i % 4 + 1), "chosen": "yes" * (i % 3 + 1), "rejected": "no" + "!" * i} for i in range(7)]
    from preftune.data.formats import normalize

    feats = tokenize_dataset(normalize(pairs).pairs, tok, max_length=64, max_prompt_length=32)
    full = precompute_reference_logps(model, feats, batch_size=2, pad_token_id=tok.pad_token_id, progress=False)
    shards = [precompute_reference_logps(model, feats, batch_size=2, pad_token_id=tok.pad_token_id, progress=False,
                                         rank=r, world_size=3) for r in range(3)]
    assert all(torch.isnan(s).any() for s in shards)  # each rank really computed only part
    merged = merge_shard_tables(shards[0], lambda t: t + sum(torch.cat([s.nan_to_num(0), (~s.isnan()).float()], 1)
                                                             for s in shards[1:]))
    assert torch.equal(merged, full)


def test_reference_deepspeed_config():
    train = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "optimizer": {"type": "AdamW"},
             "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
    cfg = reference_deepspeed_config(train, micro_batch=2, accumulation=4, world_size=8, mixed_precision="bf16")
    assert cfg["zero_optimization"] == {"stage": 0} and "optimizer" not in cfg and "gradient_clipping" not in cfg
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"]) == (2, 64)
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert train["zero_optimization"]["stage"] == 2  # the policy's config is left alone
    z3 = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto", "offload_optimizer": {"device": "cpu"},
                                "offload_param": {"device": "cpu"}}}
    cfg3 = reference_deepspeed_config(z3, micro_batch=1, accumulation=1, world_size=2, mixed_precision="no")
    assert cfg3["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
