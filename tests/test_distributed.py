"""Several processes on CPU (gloo): a 2-process run against its 1-process twin.

Two launches cover every scenario (torch start-up costs seconds per process):
- `torchrun --nproc_per_node 2` (gloo): per-device batch 2, accumulation 1, precomputed
  reference, a checkpoint at step 2, evaluation on 5 pairs (uneven shards: 3 and 2).
- one plain process: batch 2 x accumulation 2 (the same global batch of 4), then a resume from the
  2-process checkpoint in this single process.
The 1-process run is the slow obvious twin: same final weights (1e-5), same logged losses and metrics,
same reference cache file; the resumed run ends where the 2-process run ended.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def _launch(spec: dict, path: Path, procs: int) -> None:
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    if procs > 1:
        # torchrun: on CPU `accelerate launch --cpu` starts several processes only through MPI; under torchrun
        # the Accelerator reads RANK / WORLD_SIZE and picks gloo, as it does on GPUs with NCCL
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(path)]
    else:
        cmd = [sys.executable, str(WORKER), str(path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _assert_rows_close(a: list[dict], b: list[dict], skip=("pairs_per_second", "tokens_per_second")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = set(ra) - set(skip)
        assert keys == set(rb) - set(skip), (sorted(ra), sorted(rb))
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    tok = tiny_tokenizer()
    model_dir = tmp / "model"
    tiny_model(len(tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    two, one, resumed = tmp / "two", tmp / "one", tmp / "resumed"
    _launch({"model": str(model_dir), "jobs": [
        {"config": _config(two, tmp / "cache2", per_device_train_batch_size=2, gradient_accumulation_steps=1),
         "out": str(tmp / "two.json")},
    ]}, tmp / "spec2.json", procs=2)
    _launch({"model": str(model_dir), "jobs": [
        {"config": _config(one, tmp / "cache1", per_device_train_batch_size=2, gradient_accumulation_steps=2),
         "out": str(tmp / "one.json")},
        {"config": _config(resumed, tmp / "cache1", per_device_train_batch_size=2, gradient_accumulation_steps=2),
         "resume": str(two / "checkpoint-2"), "out": str(tmp / "resumed.json")},
    ]}, tmp / "spec1.json", procs=1)
    info = {name: json.loads((tmp / f"{name}.json").read_text()) for name in ("two", "one", "resumed")}
    return dict(tmp=tmp, two=two, one=one, resumed=resumed, info=info, model_dir=model_dir)


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


def test_eval_reduction_counts_uneven_shards(runs):
    """5 eval pairs over 2 ranks (3 + 2, batch 2: rank 1 runs one filler batch counted as 0 pairs)."""
    e2, e1 = runs["info"]["two"]["final_eval"], runs["info"]["one"]["final_eval"]
    assert e2.keys() == e1.keys() and "eval_loss" in e1
    for k in e1:
        assert e2[k] == pytest.approx(e1[k], rel=1e-5, abs=1e-6), k
    accuracy = e1["eval_rewards/accuracies"] * 5
    assert accuracy == pytest.approx(round(accuracy), abs=1e-5), "accuracy must be a count over 5 pairs"


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
