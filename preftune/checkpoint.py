"""Checkpoints that are either complete or absent, keep-last-k rotation, and exact resume.

A checkpoint is written into a hidden temporary directory beside its final place, every file
flushed to disk, a `COMPLETE` marker written last, and then the directory is renamed into place
(`os.replace` is atomic on one filesystem). A directory without the marker is never picked up,
and old checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
HF_STATE = "trainer_state.json"  # transformers' TrainerState, as the HF Trainer writes it
OWN_STATE = "preftune_state.json"  # TrainState: what exact resume needs (older checkpoints: in HF_STATE)
ALGORITHM_STATE = "algorithm_state.pt"  # every process's algorithm state (GRPO: its generation batch), in rank order
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where the loop is: optimizer steps taken and samples consumed (the data position)."""

    global_step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0  # consecutive skipped steps up to here (max_nonfinite_steps counts on after a resume)
    metrics_lines: int = 0  # rows of metrics.jsonl written when the checkpoint was taken
    log_window: dict | None = None  # the logging window not yet logged (window_state), to resume it exactly

    @classmethod
    def from_json(cls, path: Path) -> TrainState:
        data = json.loads(Path(path).read_text())
        if "pairs_seen" in data:  # checkpoints written before the loop was shared by algorithms
            data.setdefault("samples_seen", data.pop("pairs_seen"))
        names = ("global_step", "samples_seen", "nonfinite_steps", "nonfinite_in_a_row", "metrics_lines", "log_window")
        return cls(**{k: data[k] for k in names if k in data})


def read_states(path: Path) -> tuple[TrainState, dict | None]:
    """(TrainState, the HF TrainerState's fields or None) of a checkpoint directory. A checkpoint written before
    preftune kept the HF state holds its TrainState in trainer_state.json and no HF state (None)."""
    path = Path(path)
    if (path / OWN_STATE).is_file():
        return TrainState.from_json(path / OWN_STATE), json.loads((path / HF_STATE).read_text())
    return TrainState.from_json(path / HF_STATE), None


def window_state(window, samples: int, tokens: int) -> dict:
    """The logging window (a MetricAccumulator plus sample/token counts) as JSON-exact floats.

    float32 sums go through Python floats (float64), which hold them exactly, so a resumed window
    adds up to the same bits as one that was never interrupted."""
    return {"sums": {k: float(v) for k, v in window._sums.items()},
            "counts": {k: float(v) for k, v in window._counts.items()}, "samples": samples, "tokens": tokens}


def restore_window(window, data: dict | None, device) -> tuple[int, int]:
    """Refill an empty MetricAccumulator from `window_state`; returns (samples, tokens) of the window."""
    if not data:
        return 0, 0
    for key, value in data["sums"].items():
        window._sums[key] = torch.tensor(value, dtype=torch.float32, device=device)
        window._counts[key] = torch.tensor(data["counts"][key], dtype=torch.float32, device=device)
    return int(data["samples"] if "samples" in data else data["pairs"]), int(data["tokens"])


class CheckpointError(RuntimeError):
    pass


def check_writable(directory: Path) -> None:
    """Create the output directory; fail before training, not at the first save, when it cannot be written."""
    probe = Path(directory) / f".write-test-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"output_dir {directory} is not writable ({e.strerror}); choose another --output_dir or fix its permissions"
        ) from e


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _assert_finite(model) -> None:
    """model: a module, or a state dict (name -> tensor)."""
    items = model.items() if isinstance(model, dict) else model.named_parameters()
    for name, p in items:
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to save: parameter {name} has non-finite values")


def _versions() -> dict:
    import accelerate
    import transformers

    import preftune

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "preftune": preftune.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()  # (int, tuple of 625 ints, float | None)
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(accelerator) -> list[dict] | None:
    """Every process's RNG state, on the main process (a collective); None with one process.

    Saved beside the main process's own so that a resume on the same number of processes gives
    each process back its own streams (LoRA dropout, for one, draws masks on every process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return gather_object([_rng_state()])


def _load_rng_state(path: Path) -> dict:
    """rng_state.pt with `weights_only=True`: tensors, lists, ints and floats only (no pickle code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint RNG state ({e}); it is damaged or from "
                              "another preftune version: resume from another checkpoint") from e


def _own_rng_state(state: dict, accelerator) -> dict:
    """This process's saved RNG state when the checkpoint has one per process for this many
    processes; otherwise the main process's (a resume on another process count)."""
    per = state.get("per_process")
    if per and len(per) == accelerator.num_processes:
        return per[accelerator.process_index]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, trainer, state: TrainState, accelerator, state_dict: dict | None = None,
                    optimizer_state: dict | None = None, rng_states: list[dict] | None = None,
                    engine_state: Path | None = None, algorithm_state: list | None = None) -> Path:  # fmt: skip
    """Write `<output_dir>/checkpoint-<step>/` atomically; then apply `save_total_limit` (never deleting the
    best checkpoint, ``trainer.state.best_model_checkpoint``).

    Two state files: ``trainer_state.json``, transformers' `TrainerState` (``trainer.state``, with its log
    history, best metric and the state of `ExportableState` callbacks) exactly as the HF Trainer writes it, and
    ``preftune_state.json``, preftune's `TrainState` (data position, non-finite counters, the unlogged window).

    state_dict: the full model state dict when parameters are sharded (FSDP, ZeRO-3), gathered by
    every rank with ``accelerator.get_state_dict`` before the main process calls this.
    optimizer_state: the full optimizer state under FSDP, from :func:`gather_optimizer_state` (also a
    collective); None saves ``trainer.optimizer.state_dict()``.
    rng_states: every process's RNG state from :func:`gather_rng_states` (a collective), or None.
    engine_state: under DeepSpeed, the folder every process wrote its part of DeepSpeed's checkpoint to
    (``preftune.zero.save_engine_state``): moved in as ``deepspeed/``, in place of ``optimizer.pt``.
    algorithm_state: every process's algorithm state (``TrainLoop._algorithm_state``, in rank order), saved as
    ``algorithm_state.pt`` (GRPO: the generation batch being trained on)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.global_step}"
    tmp = output_dir / f".tmp-checkpoint-{state.global_step}-{os.getpid()}"
    model = accelerator.unwrap_model(trainer.model)
    _assert_finite(model if state_dict is None else state_dict)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_tagged(model, tmp / "model", model_tags(trainer), state_dict=state_dict)
        trainer.tokenizer.save_pretrained(tmp / "model")
        if engine_state is not None:  # DeepSpeed: the optimizer state is DeepSpeed's, per process
            from preftune.zero import move_engine_state

            move_engine_state(engine_state, tmp)
        else:
            optimizer_state = optimizer_state if optimizer_state is not None else trainer.optimizer.state_dict()
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = _rng_state()
        if rng_states:
            rng["per_process"] = rng_states
        torch.save(rng, tmp / "rng_state.pt")
        if algorithm_state is not None:
            torch.save(algorithm_state, tmp / ALGORITHM_STATE)
        state.metrics_lines = _count_lines(output_dir / "metrics.jsonl")
        if sd := _reference_state(trainer.reference):
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / "reference.safetensors"))
        (tmp / OWN_STATE).write_text(json.dumps(asdict(state), indent=1))
        hf_state = getattr(trainer, "state", None)
        if hf_state is not None and hasattr(hf_state, "save_to_json"):
            _note_best_checkpoint(hf_state, output_dir, state.global_step)
            hf_state.save_to_json(str(tmp / HF_STATE))
        trainer.args.to_yaml(tmp / "config.yaml")
        (tmp / "versions.json").write_text(json.dumps(_versions(), indent=1))
        _fsync_tree(tmp)
        (tmp / MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is untouched. "
            "Free disk space or choose another output_dir, then resume with --resume_from_checkpoint latest"
        ) from e
    logger.info("saved checkpoint %s", final)
    best = getattr(getattr(trainer, "state", None), "best_model_checkpoint", None)
    _rotate(output_dir, trainer.args.save_total_limit, keep=final, best=Path(best) if best else None)
    return final


def _note_best_checkpoint(hf_state, output_dir: Path, step: int) -> None:
    """As the HF Trainer: the best evaluation's step names the best checkpoint once that checkpoint exists (the
    one being written counts)."""
    best = getattr(hf_state, "best_global_step", None)
    if best:
        folder = Path(output_dir) / f"checkpoint-{best}"
        if best == step or (folder / MARKER).is_file():
            hf_state.best_model_checkpoint = str(folder)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    if not Path(output_dir).is_dir():
        return found
    for p in Path(output_dir).iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _rotate(output_dir: Path, limit: int | None, keep: Path, best: Path | None = None) -> None:
    if not limit or limit <= 0:
        return
    ckpts = list_checkpoints(output_dir)
    if best is not None and best in ckpts:  # the best one is kept beside the newest `limit` (as the HF Trainer)
        ckpts.remove(best)
        limit = max(1, limit - 1) if limit > 1 else limit
    for old in ckpts[: max(0, len(ckpts) - limit)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in Path(output_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(output_dir: Path, spec) -> Path:
    """A checkpoint path from `resume_from_checkpoint`: a directory, or "latest"/True."""
    if spec is True or (isinstance(spec, str) and spec.lower() in ("latest", "last", "true")):
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise CheckpointError(f"resume_from_checkpoint=latest: no complete checkpoint in {output_dir}")
        return ckpts[-1]
    path = Path(spec)
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"resume_from_checkpoint={spec}: not a complete checkpoint directory (no {MARKER} marker); "
            "use 'latest' to pick the newest complete one"
        )
    return path


def load_checkpoint(path: Path, trainer, accelerator) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG and reference state from `path`; returns its TrainState
    (`read_states` gives the HF TrainerState beside it)."""

    load_model_weights(path, trainer, accelerator)
    return _load_optimizer_rng_reference(path, trainer, accelerator)


def load_model_weights(path: Path, trainer, accelerator) -> None:
    """Load a checkpoint's model (or adapter) weights into ``trainer.model`` (sharded under FSDP)."""
    from safetensors.torch import load_file

    from preftune import zero

    model = accelerator.unwrap_model(trainer.model)
    model_dir = Path(path) / "model"
    adapter = model_dir / "adapter_model.safetensors"
    if zero.check_resume(path, accelerator):  # DeepSpeed: the model and its optimizer partition from its files
        zero.load_engine_state(trainer.model, path)
    elif adapter.is_file() and _is_fsdp(accelerator):
        _load_sharded(model, _adapter_keys_to_model_keys(model, load_file(str(adapter)), path), path, adapter=True)
    elif adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
    else:
        sd = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        if _is_fsdp(accelerator):
            _load_sharded(model, sd, path)
        else:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            _check_keys(model, missing, unexpected, path)


def _load_optimizer_rng_reference(path: Path, trainer, accelerator) -> TrainState:
    from safetensors.torch import load_file

    from preftune import zero

    if not zero.is_deepspeed(accelerator):  # DeepSpeed's engine loads its own partitions
        optimizer_state = torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)
        if _is_fsdp(accelerator):
            _load_sharded_optimizer(trainer, optimizer_state, path)
        else:
            trainer.optimizer.load_state_dict(optimizer_state)
    trainer.scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt", weights_only=True))
    _set_rng_state(_own_rng_state(_load_rng_state(Path(path) / "rng_state.pt"), accelerator))
    ref_file = Path(path) / "reference.safetensors"
    if ref_file.is_file():
        _load_reference_state(trainer.reference, load_file(str(ref_file)))
    algo_file = Path(path) / ALGORITHM_STATE
    if algo_file.is_file():
        states = torch.load(algo_file, map_location="cpu", weights_only=False)
        if len(states) != accelerator.num_processes:
            raise CheckpointError(f"{algo_file} holds the state of {len(states)} processes but this run has "
                                  f"{accelerator.num_processes}; resume with the same number of processes")
        trainer._load_algorithm_state(states[accelerator.process_index])
    return read_states(path)[0]


def _check_keys(model, missing, unexpected, path) -> None:
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")  # fmt: skip


# --- FSDP: parameters and optimizer state sharded across processes -----------------------------
# A checkpoint always holds whole tensors in torch's own formats (an HF model directory and
# ``optimizer.state_dict()`` with parameters numbered in param-group order), so it resumes on any
# number of processes, with or without FSDP. Under FSDP every process gathers (save) or slices
# (load) its shard with torch.distributed.checkpoint's full-state-dict API (tested with FSDP2 on CPU).


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def gather_optimizer_state(trainer, accelerator) -> dict | None:
    """The whole optimizer state to checkpoint under FSDP, else None (``optimizer.state_dict()`` serves).

    A collective: every process calls it; the main process gets torch's ``optimizer.state_dict()``
    format with whole (unsharded) tensors on the CPU, the others an empty dict."""
    if not _is_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(trainer.model, _torch_optimizer(trainer.optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # fmt: skip
    if not accelerator.is_main_process:
        return {}
    # keyed by parameter name -> numbered like optimizer.state_dict(): names in param-group order
    number = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    return {"state": {number[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in full["param_groups"]]}


def _load_sharded_optimizer(trainer, saved: dict, path) -> None:
    """Load a whole ``optimizer.state_dict()`` into an optimizer over FSDP-sharded parameters."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    optimizer = _torch_optimizer(trainer.optimizer)
    names = [n for g in get_optimizer_state_dict(trainer.model, optimizer)["param_groups"] for n in g["params"]]
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"checkpoint {path}: its optimizer has parameter groups of sizes {sizes}, this run "
                              f"{[len(g['params']) for g in optimizer.param_groups]}; resume with the same model, "
                              "LoRA and weight-decay settings")  # fmt: skip
    full = {"state": {names[int(i)]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(trainer.model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _adapter_keys_to_model_keys(model, adapter_sd: dict, path) -> dict:
    """A saved LoRA adapter's tensors under the model's own parameter names (peft drops the adapter name)."""
    name = getattr(model, "active_adapter", "default")
    out = {}
    for key in model.state_dict():
        saved = key.replace(f".{name}.", ".")
        if saved != key and saved in adapter_sd:
            out[key] = adapter_sd[saved]
    if len(out) != len(adapter_sd):
        used = {k.replace(f".{name}.", ".") for k in out}
        raise CheckpointError(f"checkpoint {path}: adapter tensors {sorted(adapter_sd.keys() - used)[:5]} match no "
                              "parameter of this model")  # fmt: skip
    return out


def _load_sharded(model, sd: dict, path, adapter: bool = False) -> None:
    """Load whole tensors into FSDP-sharded parameters: each process keeps its own slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    keys = set(model.state_dict())  # FSDP2: the DTensor (sharded) state dict, nothing is gathered
    _check_keys(model, [] if adapter else sorted(keys - sd.keys()), sorted(sd.keys() - keys), path)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))


def _reference_state(reference) -> dict:
    """The reference's mutable state: what TR-DPO mixed into it (a frozen reference has none)."""
    if reference is None:
        return {}
    if callable(getattr(reference, "state_dict", None)):
        return reference.state_dict()
    if getattr(reference, "sync", None) is None:
        return {}
    if hasattr(reference, "ref_params"):  # the LoRA "ref" adapter
        return {f"ref_params.{i}": p for i, p in enumerate(reference.ref_params)}
    return dict(reference.model.state_dict())


def _load_reference_state(reference, sd: dict) -> None:
    if reference is None:
        raise CheckpointError("the checkpoint holds a TR-DPO reference state but this run has no reference; "
                              "resume with the same loss and sync_ref_model settings")
    if callable(getattr(reference, "load_state_dict", None)):
        reference.load_state_dict(sd)
    elif hasattr(reference, "ref_params"):
        with torch.no_grad():
            for i, p in enumerate(reference.ref_params):
                p.copy_(sd[f"ref_params.{i}"])
    else:
        reference.model.load_state_dict(sd)


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def _is_tied(model, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def truncate_metrics(path: Path, step: int, lines: int | None = None) -> None:
    """After a resume, drop logged rows past the checkpoint's step (and a torn last line).

    lines: keep at most the first `lines` rows, those the file held when the checkpoint was written
    (drops an evaluation row logged after the checkpoint at its own step; 0 for a fresh run)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    raw = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for line in raw[:lines] if lines is not None else raw:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and int(row.get("step", 0)) <= step:
            keep.append(line.rstrip("\n"))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


def model_tags(trainer) -> list[str]:
    """The tags a trainer's saved models carry: "preftune" and its algorithm (the loop's ``progress_desc``)."""
    return ["preftune", *([trainer.progress_desc] if getattr(trainer, "progress_desc", None) else [])]


def save_tagged(model, directory: Path, tags: list[str] | None, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(directory)`` after ``model.add_model_tags(tags)`` where the model has it, as
    TRL's trainers tag theirs. A PEFT model writes the tags into its README.md itself; for a full model,
    which writes a model card only when pushed, a README.md with the same metadata block is written here
    (unless the folder has one)."""
    add = getattr(model, "add_model_tags", None)
    if tags and add is not None:
        add(list(tags))
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    readme = Path(directory) / "README.md"
    if tags and add is not None and not readme.exists():
        from huggingface_hub import ModelCard, ModelCardData

        all_tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *tags]))
        data = ModelCardData(library_name="transformers", tags=all_tags)
        ModelCard(f"---\n{data.to_yaml()}\n---\n\nTrained with preftune ({', '.join(tags[1:]) or 'preftune'}).\n"
                  ).save(readme)


def save_pretrained_atomic(model, tokenizer, out_dir: Path, state_dict: dict | None = None,
                           tags: list[str] | None = None) -> None:
    """Save a Hugging Face model (or adapter) and tokenizer into out_dir, each file replaced atomically.
    state_dict: the gathered full state dict of a sharded model (see `save_checkpoint`). tags: added to
    the model and its model card (`save_tagged`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _assert_finite(model if state_dict is None else state_dict)
    tmp = out_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_tagged(model, tmp, tags, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
        _fsync_dir(out_dir)
    except OSError as e:
        raise CheckpointError(f"could not save the model to {out_dir} ({e.strerror or e}); free space or change output_dir") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
