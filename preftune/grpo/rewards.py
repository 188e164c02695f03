"""Score GRPO completions with reward functions and reward models, called as TRL 1.16 calls them.

A reward function is called with keyword arguments only::

    f(prompts=[...], completions=[...], completion_ids=[[int, ...], ...],
      <every other dataset column>=[...], trainer_state=state, log_extra=fn, log_metric=fn)

and returns one float (or None: "not applicable to this completion") per completion. For
conversational data the prompts are message lists and each completion is
``[{"role": "assistant", "content": text}]``; for standard data both are strings. ``log_extra(column,
values)`` adds a column to the completions table, ``log_metric(name, value)`` a scalar metric averaged
over the logging step; both are collected into :class:`RewardOutput`.

Synchronous functions run one after the other in the calling thread; ``async def`` functions (or
callables whose ``__call__`` is async) run concurrently with ``asyncio.gather`` on one event loop
that lives in a daemon thread for the life of the :class:`RewardFunctions`, so clients bound to a
loop (HTTP sessions) stay valid from one batch to the next.

A reward model (a path/id of an ``AutoModelForSequenceClassification`` checkpoint with one label, or
the model itself) scores prompt + completion (the chat template applied for conversational data);
its reward is ``logits[:, 0]``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import numbers
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Dataset columns TRL does not forward as keywords (they are passed as prompts=/completions=/completion_ids=).
_NOT_FORWARDED = ("prompt", "completion", "completion_ids")
# Keywords the reward functions receive besides the dataset columns; a column of that name would clash.
_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardError(ValueError):
    """A reward function failed, or returned something other than one number or None per completion."""


@dataclass
class RewardOutput:
    """What one scoring call produced.

    rewards: (N, F) float32, one column per reward function in order, NaN where a function returned None.
    logs: extra completions-table columns from ``log_extra(column, values)``, in call order.
    metrics: ``log_metric(name, value)`` values of this call, per name (the trainer averages them).
    """

    rewards: torch.Tensor
    logs: dict[str, list] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)


def callable_name(func: Callable) -> str:
    """A reward function's name: ``__name__``, through ``functools.partial``, else the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def is_async_callable(func: Callable) -> bool:
    """True when calling `func` returns a coroutine: async functions, partials of them, and instances
    whose ``__call__`` is async."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(func.__call__)


def is_conversational(prompt) -> bool:
    """A prompt given as a list of ``{"role", "content"}`` messages (TRL's conversational format)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def model_name(model: nn.Module) -> str:
    """TRL's name for a reward model: the last part of the name or path it was loaded from."""
    return str(getattr(model.config, "_name_or_path", "")).rstrip("/").split("/")[-1]


def _short(obj, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


class RewardFunctions:
    """The reward functions of a GRPO run, scored together on a batch of completions.

    reward_funcs: a callable, a path/id of a sequence-classification reward model, a loaded
        ``PreTrainedModel``, or a list mixing those (TRL's ``reward_funcs``).
    reward_processing_classes: one tokenizer, or a list as long as `reward_funcs` (None entries for
        functions); a reward model without one gets ``AutoTokenizer.from_pretrained`` of its own path.
        A tokenizer without a pad token gets its EOS token as pad, and the model's config the pad id
        (the model reads its reward at the last non-pad token).
    device: where reward models run (None: where they already are).
    model_init_kwargs: keyword arguments for ``from_pretrained`` of reward models given as str.
    chat_template_kwargs: extra arguments for the reward tokenizers' chat template.
    batch_size: reward-model rows per forward (None: the whole batch in one forward, as TRL).
    """

    def __init__(self, reward_funcs, *, reward_processing_classes=None, device=None, model_init_kwargs=None,
                 chat_template_kwargs: dict | None = None, batch_size: int | None = None):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty: give at least one reward function or reward model")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: give a positive number of rows per reward-model forward")
        init_kwargs = dict(model_init_kwargs or {})
        self.funcs: list = [self._load_model(f, init_kwargs) if isinstance(f, str) else f for f in funcs]
        for i, f in enumerate(self.funcs):
            if not isinstance(f, nn.Module) and not callable(f):
                raise TypeError(f"reward_funcs[{i}] is a {type(f).__name__}: give a function, a reward model or "
                                "the path/id of one")
        self.names = [model_name(f) if isinstance(f, nn.Module) else callable_name(f) for f in self.funcs]
        self.processing_classes = self._processing_classes(reward_processing_classes, funcs, init_kwargs)
        for f in self.funcs:
            if isinstance(f, nn.Module):
                f.eval()  # no dropout: a completion's reward does not depend on the draw
                if device is not None:
                    f.to(device)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_size = batch_size
        self._all_none_warned: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.funcs)

    # ------------------------------------------------------------------------------------- set-up

    @staticmethod
    def _load_model(path: str, init_kwargs: dict) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **init_kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward model {path!r} could not be loaded as a sequence-classification model: {e}. "
                             "Give the path or hub id of a reward model, or a reward function") from e
        return model.eval()

    def _processing_classes(self, given, originals: list, init_kwargs: dict) -> list:
        n = len(self.funcs)
        if given is None:
            classes = [None] * n
        elif isinstance(given, (list, tuple)):
            classes = list(given)
        else:
            classes = [given]
        if len(classes) != n:
            raise ValueError(f"reward_processing_classes has {len(classes)} entries but there are {n} reward "
                             "functions: give one per reward function (None for plain functions)")
        for i, (func, tok) in enumerate(zip(self.funcs, classes)):
            if not isinstance(func, nn.Module):
                continue
            if tok is None:
                from transformers import AutoTokenizer

                source = originals[i] if isinstance(originals[i], str) else func.config._name_or_path
                tok = AutoTokenizer.from_pretrained(source, revision=init_kwargs.get("revision"))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            text_config = func.config.get_text_config() if hasattr(func.config, "get_text_config") else func.config
            text_config.pad_token_id = tok.pad_token_id
            classes[i] = tok
        return classes

    # ------------------------------------------------------------------------------------- scoring

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence,
                 columns: dict[str, list] | None = None, *, trainer_state=None) -> RewardOutput:
        """Score N completions with every reward function -> :class:`RewardOutput` (rewards (N, F)).

        prompts, completions: strings (standard data) or message lists (conversational), one per completion
            (a prompt repeated for each of its completions); completion_ids: token ids per completion.
        columns: the other dataset columns, one value per completion; "prompt", "completion" and
            "completion_ids" are dropped (they arrive as prompts=/completions=/completion_ids=).
        """
        n = len(prompts)
        if len(completions) != n or len(completion_ids) != n:
            raise ValueError(f"{n} prompts, {len(completions)} completions and {len(completion_ids)} completion_ids: "
                             "give one prompt (repeated per completion) and one completion_ids list per completion")
        kwargs = self._column_kwargs(columns or {}, n)
        logs: dict[str, list] = defaultdict(list)
        metrics: dict[str, list[float]] = defaultdict(list)
        kwargs["trainer_state"] = trainer_state
        kwargs["log_extra"] = lambda column, values: logs[column].extend(values)
        kwargs["log_metric"] = lambda name, value: metrics[name].append(value)
        call = dict(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids),
                    **kwargs)

        rewards = torch.zeros(n, len(self.funcs), dtype=torch.float32)  # (N, F)
        pending = []
        for i, func in enumerate(self.funcs):
            if isinstance(func, nn.Module):
                try:
                    rewards[:, i] = self._score_model(i, call["prompts"], call["completions"])
                except Exception as e:
                    raise self._raised(i, call["prompts"], e) from e
            elif is_async_callable(func):
                pending.append(i)
            else:
                try:
                    out = func(**call)
                except Exception as e:
                    raise self._raised(i, call["prompts"], e) from e
                rewards[:, i] = self._check(i, out, n)
        if pending:
            for i, out in zip(pending, self._run_async([self.funcs[i] for i in pending], call)):
                if isinstance(out, BaseException):
                    raise self._raised(i, call["prompts"], out) from out
                rewards[:, i] = self._check(i, out, n)
        self._warn_none(rewards, call, kwargs)
        return RewardOutput(rewards=rewards, logs=dict(logs), metrics=dict(metrics))

    @staticmethod
    def _column_kwargs(columns: dict, n: int) -> dict[str, list]:
        kwargs = {}
        for key, values in columns.items():
            if key in _NOT_FORWARDED:
                continue
            if key in _RESERVED:
                raise ValueError(f"dataset column {key!r} has the name of a keyword the reward functions receive "
                                 f"({', '.join(_RESERVED)}): rename the column")
            values = list(values)
            if len(values) != n:
                raise ValueError(f"dataset column {key!r} has {len(values)} values for {n} completions: give one "
                                 "value per completion (a prompt's value repeated for each of its completions)")
            kwargs[key] = values
        return kwargs

    def _raised(self, i: int, prompts: list, e: BaseException) -> RewardError:
        kind = "reward model" if isinstance(self.funcs[i], nn.Module) else "reward function"
        return RewardError(f"{kind} {self.names[i]!r} raised {type(e).__name__}: {e} (while scoring a "
                           f"batch whose first prompt is {_short(prompts[0] if prompts else None)}). Fix the "
                           "function, or return None for completions it does not apply to")

    def _check(self, i: int, out, n: int) -> torch.Tensor:
        """One function's return value -> (N,) float32 with NaN for None, or RewardError naming it."""
        name = self.names[i]
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().reshape(-1).tolist() if out.dim() == 1 else out
        elif hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # a 1-D numpy array
            out = out.tolist()
        if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
            raise RewardError(f"reward function {name!r} returned a {type(out).__name__}: expected a list of {n} "
                              "rewards (a float or None per completion)")
        if len(out) != n:
            raise RewardError(f"reward function {name!r} returned {len(out)} rewards but {n} were expected (one per "
                              "completion): return exactly one float or None per completion")
        values = []
        for j, r in enumerate(out):
            if r is None:
                values.append(math.nan)
            elif isinstance(r, numbers.Real):
                values.append(float(r))
            elif isinstance(r, torch.Tensor) and r.numel() == 1 and not r.is_complex():
                values.append(float(r.item()))
            else:
                raise RewardError(f"reward function {name!r} returned {_short(r, 60)} ({type(r).__name__}) for "
                                  f"completion {j}: expected a float or None")
            if math.isinf(values[-1]):  # it would make its whole group's advantages NaN
                raise RewardError(f"reward function {name!r} returned {values[-1]} for completion {j}: return a "
                                  "finite number, or None where the reward does not apply")
        return torch.tensor(values, dtype=torch.float32)

    def _score_model(self, i: int, prompts: list, completions: list) -> torch.Tensor:
        """logits[:, 0] of reward model i on prompt + completion (templated when conversational) -> (N,)."""
        model, tok = self.funcs[i], self.processing_classes[i]
        if prompts and is_conversational(prompts[0]):
            texts = [tok.apply_chat_template(list(p) + list(c), tokenize=False, **self.chat_template_kwargs)
                     for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        device = next(model.parameters()).device
        step = self.batch_size or max(len(texts), 1)
        scores = []
        with torch.inference_mode():
            for start in range(0, len(texts), step):
                enc = tok(texts[start:start + step], return_tensors="pt", padding=True, padding_side="right",
                          add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                scores.append(model(**enc).logits[:, 0].float().cpu())  # (b,)
        return torch.cat(scores) if scores else torch.zeros(0)

    # ------------------------------------------------------------------------------------- async

    def _run_async(self, funcs: list, call: dict) -> list:
        """Await every async function concurrently on the daemon loop; a result or the exception, per function."""
        loop = self._event_loop()

        async def gather():
            return await asyncio.gather(*(f(**call) for f in funcs), return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(gather(), loop).result()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run():
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._loop_thread = threading.Thread(target=run, name="preftune-rewards", daemon=True)
            self._loop_thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    def close(self) -> None:
        """Stop the async event loop (started on the first batch with an async function); idempotent."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
            self._loop.close()
            self._loop = self._loop_thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------- None

    def _warn_none(self, rewards: torch.Tensor, call: dict, kwargs: dict) -> None:
        """Warn (once per function) when a function returned None for the whole batch, and (as TRL, every
        batch) when some completion got None from every function: it will have advantage 0."""
        nan = torch.isnan(rewards)  # (N, F)
        if rewards.shape[0] == 0:
            return
        for i, name in enumerate(self.names):
            if nan[:, i].all() and name not in self._all_none_warned:
                self._all_none_warned.add(name)
                warnings.warn(f"reward function {name!r} returned None for every completion of a batch: it gives "
                              "no signal there. Check that the dataset has the columns it reads", stacklevel=3)
        rows = nan.all(dim=1).nonzero(as_tuple=True)[0]
        if len(rows):
            r = int(rows[0])
            row = {k: v[r] for k, v in kwargs.items() if k not in ("trainer_state", "log_extra", "log_metric")}
            row["prompt"], row["completion"] = call["prompts"][r], call["completions"][r]
            logger.warning("every reward function returned None for %d completion(s), e.g. %s; they get advantage "
                           "0. Make sure at least one reward function applies to every row", len(rows), _short(row, 400))
