"""From a dataset argument to tokenized pairs, and the order in which pairs are trained on.

`prepare_splits` chains the data modules (load -> normalize -> tokenize) and reports what was
dropped; `StepPlan` decides which pairs each process sees at each optimizer step, so that the
same seed gives the same global batches whatever the number of processes.

Every split is tokenized up front, streams too: a `datasets.IterableDataset` for training gives
exactly the rows the run needs (``max_steps`` x the global batch, in the stream's order, which the
plan then keeps: a stream is not shuffled, as in Hugging Face's Trainer); one for evaluation is read
whole (up to `MAX_STREAM_EVAL_ROWS` rows). An eval argument that is a mapping (a dict of datasets,
a `DatasetDict`, an `IterableDatasetDict`) gives one eval split per name.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.data.formats import load_rows, normalize, skipped_summary, write_skipped
from preftune.data.tokenize import tokenize_dataset

logger = logging.getLogger(__name__)

# an iterable eval set is read whole before evaluating; a stream longer than this is refused as unbounded
MAX_STREAM_EVAL_ROWS = 1_000_000


class _FromConfig:
    """`FROM_CONFIG`: the training data named by the config (``dataset_name``, else the bundled demo data)."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


# passed as ``DPOTrainer(train_dataset=FROM_CONFIG)`` by `preftune.train()` and the command line, whose data
# comes from the config; in code, ``train_dataset`` is required, as in TRL
FROM_CONFIG = _FromConfig()


def is_stream(obj) -> bool:
    """A `datasets.IterableDataset` (a stream: no length, read in order)."""
    datasets = sys.modules.get("datasets")  # not imported: the object cannot be one of its classes
    return datasets is not None and isinstance(obj, datasets.IterableDataset)


def _is_dataset_dict(obj) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict))


def check_train_dataset(train_dataset, args) -> None:
    """Refuse, before any model is loaded, a training dataset the trainer cannot take (TRL's rules and wording):
    none at all, a dict of splits, a stream without ``max_steps`` or with ``precompute_ref_log_probs=True``."""
    if train_dataset is None:
        raise ValueError(
            "`train_dataset` is required: pass a datasets.Dataset / IterableDataset, a list of rows or a data file "
            "(the config's dataset_name is read by preftune.train() and the command line)")
    if _is_dataset_dict(train_dataset):
        raise TypeError(
            f"`train_dataset` must be a `Dataset` or `IterableDataset`, got `{type(train_dataset).__name__}`. Pick "
            f"one of its splits {sorted(train_dataset)}, e.g. train_dataset=dataset['train']")
    if is_stream(train_dataset):
        if not args.max_steps or args.max_steps <= 0:
            raise ValueError(
                "args.max_steps must be set to a positive value if dataloader does not have a length, was "
                f"{args.max_steps}: train_dataset is an IterableDataset (a stream has no length); set max_steps")
    check_streams_precompute(train_dataset, args)


def check_streams_precompute(dataset, args) -> None:
    """``precompute_ref_log_probs=True`` (the whole dataset cached before training) cannot take a stream."""
    streams = dataset.values() if isinstance(dataset, Mapping) else [dataset]
    if args.precompute_ref_log_probs is True and any(is_stream(d) for d in streams):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
            "Dataset or set `precompute_ref_log_probs=False`. (Leaving it unset, preftune precomputes exactly the "
            "pairs the run uses, which works with a stream.)")


@dataclass
class PreparedSplit:
    """Tokenized pairs of one split plus the bookkeeping the run reports."""

    name: str
    features: object  # TokenizedPairs: list-like of contract dicts, `.fingerprint`, `.dropped`
    rows: list  # the PreferencePair behind each feature, aligned with features (eval prompts)
    skipped: list
    format: str
    source: object = None  # what the rows were read from: the dataset argument, or the rows the config named
    streamed: bool = False  # read from a stream: trained on in the stream's order, never shuffled

    def __len__(self) -> int:
        return len(self.features)


def _demo_rows(split: str, args) -> list[dict]:
    from preftune.data.demo import demo_dataset

    n = {"train": getattr(args, "demo_train_size", None), "eval": getattr(args, "demo_eval_size", None)}[split]
    return demo_dataset(split=split, n=n, seed=0, tasks=getattr(args, "demo_tasks", None))


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


def _tokenize(name, rows, origin, tokenizer, args, *, allow_empty: bool = False) -> PreparedSplit:
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
    if len(feats) == 0 and not allow_empty:
        raise ValueError(
            f"{name} data ({origin}): no usable preference pair left "
            f"(skipped: {len(norm.skipped)}, dropped by truncation: {dict(feats.dropped)}); "
            "check the file, or raise max_length / max_prompt_length"
        )
    return PreparedSplit(name=name, features=feats, rows=feats.pairs, skipped=norm.skipped, format=norm.format,
                         source=rows)


def _tokenize_stream(name, stream, tokenizer, args, *, need: int | None) -> PreparedSplit:
    """A stream's first `need` usable pairs (rows skipped or dropped by truncation are made up for from the
    rows after them), in the stream's order; ``need=None``: the whole stream, refused past
    `MAX_STREAM_EVAL_ROWS` rows as unbounded."""
    origin, it = type(stream).__name__, iter(stream)
    if need is None:
        rows = list(itertools.islice(it, MAX_STREAM_EVAL_ROWS + 1))
        if len(rows) > MAX_STREAM_EVAL_ROWS:
            raise ValueError(
                f"{name} data ({origin}): the stream has more than {MAX_STREAM_EVAL_ROWS} rows (or no end); an "
                "evaluation set is read whole before evaluating, so pass a bounded one, e.g. dataset.take(n)")
        split = _tokenize(name, rows, origin, tokenizer, args)
    else:
        rows = list(itertools.islice(it, need))
        ended = len(rows) < need
        split = _tokenize(name, rows, origin, tokenizer, args, allow_empty=True)
        while len(split) < need and not ended:  # make up for skipped / dropped rows from the rest of the stream
            want = need - len(split)
            more = list(itertools.islice(it, want))
            rows += more
            ended = len(more) < want
            split = _tokenize(name, rows, origin, tokenizer, args, allow_empty=True)
        if len(split) == 0:
            split = _tokenize(name, rows, origin, tokenizer, args)  # raises: no usable pair
        if len(split) < need:
            logger.warning("%s data (%s): the stream ended after %d usable pairs, fewer than the %d that max_steps x "
                           "the global batch needs; training goes over them again, in the same order", name, origin,
                           len(split), need)
    split.source, split.streamed = stream, True
    return split


def prepare_splits(args, tokenizer, train_dataset=None, eval_dataset=None, *, num_processes: int = 1):
    """Tokenized (train, eval) from explicit datasets or, with no train_dataset, from the config's sources.

    eval is None, a `PreparedSplit`, or for a mapping of eval sets ``{name: PreparedSplit}`` (`prepare_eval`).
    A stream for training gives its first ``max_steps x global batch`` usable pairs (`num_processes` is part of
    the global batch)."""
    if train_dataset is None or train_dataset is FROM_CONFIG:
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
    if is_stream(train_src):
        rows = origin = None
    else:
        rows, origin = _load(train_src, split, args, config)
    if fraction:
        rows = list(rows)
        gen = torch.Generator().manual_seed(int(args.seed))
        perm = torch.randperm(len(rows), generator=gen).tolist()
        n_eval = max(1, int(round(len(rows) * fraction)))
        eval_rows = [rows[i] for i in sorted(perm[:n_eval])]
        rows = [rows[i] for i in sorted(perm[n_eval:])]
        eval_split = _tokenize("eval", eval_rows, f"{origin} (held-out {fraction:g})", tokenizer, args)
    elif eval_dataset is not None and _is_split_name(eval_dataset, train_src):
        eval_rows, eval_origin = _load(train_src, eval_dataset, args, config)
        eval_split = _tokenize("eval", eval_rows, eval_origin, tokenizer, args)
    elif eval_dataset is not None:  # a hub dataset of its own takes the same configuration; local files have none
        eval_split = prepare_eval(eval_dataset, tokenizer, args, config=config if _is_hub_name(eval_dataset) else None)
    else:
        eval_split = None
    if rows is None:
        need = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
        train_split = _tokenize_stream("train", train_src, tokenizer, args, need=need)
    else:
        train_split = _tokenize("train", rows, origin, tokenizer, args)
    return train_split, eval_split


def prepare_eval(source, tokenizer, args, *, config: str | None = None):
    """One eval dataset argument tokenized: a `PreparedSplit`, or ``{name: PreparedSplit}`` for a mapping of
    named eval sets (a dict of datasets, a `DatasetDict`, an `IterableDatasetDict`), as Hugging Face's Trainer
    evaluates each under the metric prefix ``eval_<name>``."""
    if isinstance(source, Mapping):
        if not source:
            raise ValueError("eval_dataset is an empty dict: name at least one eval set ({'test': dataset}), or "
                             "pass eval_dataset=None")
        return {str(k): prepare_one(ds, tokenizer, args, name=f"eval_{k}") for k, ds in source.items()}
    return prepare_one(source, tokenizer, args, config=config)


def prepare_one(source, tokenizer, args, *, name: str = "eval", split: str | None = None,
                config: str | None = None) -> PreparedSplit:
    """Tokenize one dataset argument (path, Dataset, IterableDataset, list of rows) on its own."""
    if is_stream(source):
        return _tokenize_stream(name, source, tokenizer, args, need=None)
    if isinstance(source, Mapping):
        raise ValueError(f"{name} data: got a mapping of datasets {sorted(map(str, source))} where one dataset is "
                         "needed; pick one of them")
    rows, origin = _load(source, split, args, config)
    return _tokenize(name, rows, origin, tokenizer, args)


def named_splits(eval_split) -> list[tuple[str, PreparedSplit]]:
    """(metric prefix, split) of each eval split: ``[("eval", split)]``, or ``("eval_<name>", split)`` per named set."""
    if eval_split is None:
        return []
    if isinstance(eval_split, Mapping):
        return [(f"eval_{k}", v) for k, v in eval_split.items()]
    return [("eval", eval_split)]


def _is_split_name(eval_dataset, train_src) -> bool:
    """A bare word like "test" that is no file: a split of the (non-demo) training dataset."""
    return (isinstance(eval_dataset, str) and not Path(eval_dataset).exists() and train_src is not None
            and not isinstance(train_src, tuple) and "/" not in eval_dataset and "." not in eval_dataset)


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
    than G samples per epoch is left out (the permutation changes every epoch). ``shuffle=False`` keeps
    the samples' own order in every epoch (a streamed dataset: the stream's order, as Hugging Face's
    Trainer takes a stream).
    """

    num_samples: int
    micro_batch: int
    num_processes: int
    accumulation: int
    seed: int
    shuffle: bool = True

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.num_processes * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
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
