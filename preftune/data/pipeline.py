"""From a dataset argument to tokenized pairs, and the order in which pairs are trained on.

`prepare_split` chains the data modules (load -> normalize -> tokenize) and reports what was
dropped; `StepPlan` decides which pairs each process sees at each optimizer step, so that the
same seed gives the same global batches whatever the number of processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.data.formats import load_rows, normalize, skipped_summary, write_skipped
from preftune.data.tokenize import tokenize_dataset

logger = logging.getLogger(__name__)


@dataclass
class PreparedSplit:
    """Tokenized pairs of one split plus the bookkeeping the run reports."""

    name: str
    features: object  # TokenizedPairs: list-like of contract dicts, `.fingerprint`, `.dropped`
    rows: list  # the PreferencePair behind each feature, aligned with features (eval prompts)
    skipped: list
    format: str

    def __len__(self) -> int:
        return len(self.features)


def _demo_rows(split: str, args) -> list[dict]:
    from preftune.data.demo import demo_dataset

    n = {"train": getattr(args, "demo_train_size", None), "eval": getattr(args, "demo_eval_size", None)}[split]
    return demo_dataset(split=split, n=n, seed=0)


def resolve_sources(args) -> tuple[object, object, float | None]:
    """(train source, eval source or None, eval fraction or None) from the config.

    No dataset at all means the bundled demo data (train and eval splits). `eval_dataset` may be a
    path, a split name of the training dataset, or a fraction in (0, 1) held out from it.
    """
    train = getattr(args, "dataset_name", None) or getattr(args, "dataset", None)
    eval_arg = getattr(args, "eval_dataset", None)
    if train is None:
        eval_src = ("demo", "eval") if eval_arg is None else eval_arg
        return ("demo", "train"), eval_src, None
    fraction = None
    if isinstance(eval_arg, (int, float)) or (isinstance(eval_arg, str) and _is_fraction(eval_arg)):
        fraction = float(eval_arg)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"eval_dataset={eval_arg!r}: a held-out fraction must be in (0, 1), e.g. 0.05")
        eval_arg = None
    return train, eval_arg, fraction


def _is_fraction(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return not Path(text).exists()


def _load(source, split: str | None, args, config: str | None = None):
    if isinstance(source, tuple) and source[0] == "demo":
        return _demo_rows(source[1], args), f"demo:{source[1]}"
    rows = load_rows(source, split=split, bad_rows=getattr(args, "bad_rows", "error"), config=config)
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    if config is not None:
        name += f" ({config})"
    return rows, name


def _is_hub_name(source) -> bool:
    """A string that names no local file or folder: a dataset of the hub (or its cache)."""
    return isinstance(source, str) and not Path(source).exists()


def _tokenize(name, rows, origin, tokenizer, args) -> PreparedSplit:
    bad_rows = getattr(args, "bad_rows", "error")
    norm = normalize(rows, origin_name=origin, bad_rows=bad_rows)
    feats = tokenize_dataset(
        norm.pairs,
        tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=getattr(args, "max_completion_length", None),
        truncation_mode=args.truncation_mode,
    )
    if len(feats) == 0:
        raise ValueError(
            f"{name} data ({origin}): no usable preference pair left "
            f"(skipped: {len(norm.skipped)}, dropped by truncation: {dict(feats.dropped)}); "
            "check the file, or raise max_length / max_prompt_length"
        )
    return PreparedSplit(name=name, features=feats, rows=feats.pairs, skipped=norm.skipped, format=norm.format)


def prepare_splits(args, tokenizer, train_dataset=None, eval_dataset=None):
    """Tokenized (train, eval or None) from explicit datasets or from the config's sources."""
    if train_dataset is None:
        train_src, eval_src, fraction = resolve_sources(args)
        if eval_dataset is None:
            eval_dataset = eval_src
    else:
        train_src, fraction = train_dataset, None
    split = getattr(args, "dataset_split", None) or "train"
    config = getattr(args, "dataset_config", None)
    if config is not None and isinstance(train_src, tuple):
        raise ValueError(f"dataset_config={config!r} names a configuration of dataset_name, but no dataset_name is set "
                         "(the bundled demo data has no configurations); set dataset_name or unset dataset_config")
    rows, origin = _load(train_src, split, args, config)
    if fraction:
        rows = list(rows)
        gen = torch.Generator().manual_seed(int(args.seed))
        perm = torch.randperm(len(rows), generator=gen).tolist()
        n_eval = max(1, int(round(len(rows) * fraction)))
        eval_rows = [rows[i] for i in sorted(perm[:n_eval])]
        rows = [rows[i] for i in sorted(perm[n_eval:])]
        eval_split = _tokenize("eval", eval_rows, f"{origin} (held-out {fraction:g})", tokenizer, args)
    elif eval_dataset is not None:
        if _is_split_name(eval_dataset, train_src):
            eval_rows, eval_origin = _load(train_src, eval_dataset, args, config)
        else:  # a hub dataset of its own takes the same configuration; local files have none
            eval_rows, eval_origin = _load(eval_dataset, "test" if _is_dict_like(eval_dataset) else None, args,
                                           config if _is_hub_name(eval_dataset) else None)
        eval_split = _tokenize("eval", eval_rows, eval_origin, tokenizer, args)
    else:
        eval_split = None
    train_split = _tokenize("train", rows, origin, tokenizer, args)
    return train_split, eval_split


def prepare_one(source, tokenizer, args, *, name: str = "eval", split: str | None = None) -> PreparedSplit:
    """Tokenize one dataset argument (path, Dataset, list of rows) on its own."""
    rows, origin = _load(source, split, args)
    return _tokenize(name, rows, origin, tokenizer, args)


def _is_split_name(eval_dataset, train_src) -> bool:
    """A bare word like "test" that is no file: a split of the (non-demo) training dataset."""
    return (isinstance(eval_dataset, str) and not Path(eval_dataset).exists() and train_src is not None
            and not isinstance(train_src, tuple) and "/" not in eval_dataset and "." not in eval_dataset)


def _is_dict_like(obj) -> bool:
    return hasattr(obj, "keys") and not isinstance(obj, (str, Path))


def report_skips(split: PreparedSplit, output_dir: str | Path | None) -> str | None:
    """Summary line of skipped rows and dropped pairs; writes skipped rows to output_dir."""
    parts = []
    if split.skipped:
        parts.append(f"skipped {len(split.skipped)} bad rows ({skipped_summary(split.skipped)})")
        if output_dir is not None:
            path = Path(output_dir) / ("skipped_rows.jsonl" if split.name == "train" else f"skipped_rows_{split.name}.jsonl")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_skipped(split.skipped, path)
            except OSError as e:
                raise ValueError(f"cannot write {path} ({e.strerror or e}); choose a writable --output_dir") from e
            parts.append(f"written to {path}")
    dropped = dict(getattr(split.features, "dropped", {}) or {})
    if dropped:
        parts.append("dropped by truncation: " + ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    return f"{split.name} data: " + "; ".join(parts) if parts else None


@dataclass
class StepPlan:
    """Which samples (DPO: pairs) each process trains on at each optimizer step.

    Each epoch is a fresh permutation of the samples drawn from (seed, epoch). One optimizer step
    consumes G = B_micro x N_procs x K_accum consecutive samples of it; micro-batch k of process r
    takes the slice [(k*N + r)*B, (k*N + r + 1)*B). The same seed and G give the same global batches
    for any (N, K) split of G, which makes 2 processes x K=1 equal 1 process x K=2. A tail of fewer
    than G samples per epoch is left out (the permutation changes every epoch).
    """

    num_samples: int
    micro_batch: int
    num_processes: int
    accumulation: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.num_processes * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def micro_batches(self, perm: list[int], step_in_epoch: int, rank: int) -> list[list[int]]:
        """Sample indices of each of this process's K micro-batches for one optimizer step."""
        start = step_in_epoch * self.global_batch
        chunk = perm[start : start + self.global_batch]
        b, n = self.micro_batch, self.num_processes
        return [chunk[(k * n + rank) * b : (k * n + rank + 1) * b] for k in range(self.accumulation)]

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        if max_steps and max_steps > 0:
            return int(max_steps)
        return max(1, math.ceil(self.steps_per_epoch * float(num_train_epochs)))
