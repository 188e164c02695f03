"""Evaluate by generating: batched generation, verifier pass rates and pairwise win rates with
Wilson 95% intervals, and a before/after table.

- :func:`generate` — left-padded batched ``model.generate`` over str or chat-message prompts.
- :func:`verifier_eval` — pass rate of a ``verify_fn(row, text) -> bool | float`` over generations.
- :func:`win_rate` — policy vs reference generations judged by ``reward_fn(row, text) -> float``.
- :func:`generation_eval` — before/after rows and samples: the reference (or adapters off) vs the policy.
- :func:`load_reward_fn` — ``"module:function"`` (or ``"path/to/file.py:function"``) to a callable.
- :func:`table_row` / :func:`format_table` — before/after rows and their console rendering.

The scoring halves (:func:`score_texts`, :func:`compare_texts`) take texts, not models, so they can
be checked on hand numbers.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from preftune.report import TABLE_COLUMNS, table_cells

Z_95 = 1.959963984540054  # Φ⁻¹(0.975)


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p̂ = successes / n:

        center = (p̂ + z²/2n) / (1 + z²/n),   half = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)

    `successes` may be fractional (ties counted as half a win). n = 0 gives (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, center - half), min(1.0, center + half)


# --------------------------------------------------------------------------------------------------
# Generation


def _encode(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt: message lists through the chat template with the generation prompt
    (the template adds its own special tokens), plain strings with the tokenizer's special tokens."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("message prompts need a tokenizer with a chat template (tokenizer.chat_template is empty)")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise TypeError(f"a prompt must be a str or a list of {{role, content}} dicts, got {type(prompt).__name__}")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def generate(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 16, seed: int = 0,
             progress: bool = True) -> list[str]:
    """Generate one completion per prompt, in prompt order; returns the decoded new text only.

    prompts: strs or chat-message lists (``[{"role": ..., "content": ...}, ...]``).
    Prompts are sorted by length and cut into batches of `batch_size` to keep padding small; each
    batch is padded on the left (tokenizer.padding_side is set to "left" for the call and restored)
    with an attention mask, so the last position of every row is its own last prompt token.
    Greedy decoding (do_sample=False) is deterministic; sampling uses `temperature`/`top_p` and is
    seeded with `seed` without disturbing the caller's RNG state. The model is put in eval mode for
    the call and its training flag restored after.
    """
    if not prompts:
        return []
    encoded = [_encode(tokenizer, p) for p in prompts]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id,
                      eos_token_id=eos or None)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []

    from tqdm.auto import tqdm

    texts: list[str | None] = [None] * len(prompts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for batch in tqdm(batches, desc="generate", disable=not progress, dynamic_ncols=True):
                seqs = [encoded[i] for i in batch]
                if tokenizer.pad_token_id is not None:
                    padded = tokenizer.pad({"input_ids": seqs}, padding=True, return_tensors="pt")
                else:  # tokenizer.pad needs a pad token; pad with EOS by hand
                    padded = _left_pad(seqs, pad_id)
                input_ids = padded["input_ids"].to(device)  # (b, T)
                attention_mask = padded["attention_mask"].to(device)  # (b, T), 0 on the left padding
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)  # (b, T + new)
                for i, row in zip(batch, out[:, input_ids.shape[1]:].tolist()):
                    texts[i] = tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts  # type: ignore[return-value]


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """New tokens up to (not including) the first EOS; what follows it is padding."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[:j]
    return ids


def _left_pad(seqs: list[list[int]], pad_id: int) -> dict:
    """Left-pad token lists for a tokenizer without a pad token: ids (b, T) and mask (b, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------
# Scores


def score_texts(rows: Sequence[dict], texts: Sequence[str], verify_fn: Callable) -> dict:
    """Pass rate of `texts` (one per row) under ``verify_fn(row, text)``: a bool, or a float in
    [0, 1] for partial credit. Returns ``{n, passed, rate, ci_low, ci_high}`` (Wilson 95%)."""
    if len(rows) != len(texts):
        raise ValueError(f"{len(rows)} rows but {len(texts)} texts")
    if not rows:
        raise ValueError("no rows to evaluate")
    passed = 0.0
    for i, (row, text) in enumerate(zip(rows, texts)):
        score = float(verify_fn(row, text))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"verify_fn returned {score} for row {i}; it must return a bool or a float in [0, 1]")
        passed += score
    n = len(rows)
    lo, hi = wilson_interval(passed, n)
    return {"n": n, "passed": passed, "rate": passed / n, "ci_low": lo, "ci_high": hi}


def compare_texts(rows: Sequence[dict], policy_texts: Sequence[str], reference_texts: Sequence[str],
                  reward_fn: Callable) -> dict:
    """Judge policy against reference text per row with ``reward_fn(row, text) -> float``: higher
    reward wins, equal rewards tie (half a win). Returns ``{n, wins, ties, losses, win_rate, ci_low,
    ci_high}`` with win_rate = (wins + ties/2) / n and its Wilson 95% interval."""
    if not (len(rows) == len(policy_texts) == len(reference_texts)):
        raise ValueError(f"{len(rows)} rows, {len(policy_texts)} policy texts, {len(reference_texts)} reference texts")
    if not rows:
        raise ValueError("no rows to evaluate")
    wins = ties = losses = 0
    for row, mine, theirs in zip(rows, policy_texts, reference_texts):
        a, b = float(reward_fn(row, mine)), float(reward_fn(row, theirs))
        if a > b:
            wins += 1
        elif a == b:
            ties += 1
        else:
            losses += 1
    n = len(rows)
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "win_rate": score / n, "ci_low": lo, "ci_high": hi}


def verifier_eval(model, tokenizer, rows: Sequence[dict], verify_fn: Callable, *, return_texts: bool = False,
                  **gen_kwargs) -> dict:
    """Generate from each row's ``prompt`` and score with `verify_fn` (see :func:`score_texts`).
    gen_kwargs go to :func:`generate`; return_texts adds the generations under ``"texts"``."""
    texts = generate(model, tokenizer, [row["prompt"] for row in rows], **gen_kwargs)
    result = score_texts(rows, texts, verify_fn)
    if return_texts:
        result["texts"] = texts
    return result


def win_rate(policy, reference, tokenizer, rows: Sequence[dict], reward_fn: Callable, *,
             return_texts: bool = False, **gen_kwargs) -> dict:
    """Both models generate for the same prompts (same gen_kwargs and seed); `reward_fn` judges
    (see :func:`compare_texts`). return_texts adds ``"policy_texts"`` and ``"reference_texts"``."""
    prompts = [row["prompt"] for row in rows]
    mine = generate(policy, tokenizer, prompts, **gen_kwargs)
    theirs = generate(reference, tokenizer, prompts, **gen_kwargs)
    result = compare_texts(rows, mine, theirs, reward_fn)
    if return_texts:
        result.update(policy_texts=mine, reference_texts=theirs)
    return result


@contextlib.contextmanager
def _as_reference(policy, reference):
    """The model that generates the 'before' side: the reference, or the policy with adapters off."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def generation_eval(policy, reference, tokenizer, rows: list[dict], *, reward_fn=None, verify_fn=None,
                    max_new_tokens: int = 48, batch_size: int = 16, sampled: bool = False, seed: int = 0):
    """Before/after table rows and sample generations for `rows` (each with a `prompt`)."""
    prompts = [r["prompt"] for r in rows]
    modes = [("greedy", dict(do_sample=False))] + ([("sampled", dict(do_sample=True, seed=seed))] if sampled else [])
    table, samples = [], []
    for label, kw in modes:
        with _as_reference(policy, reference) as ref:
            before_texts = generate(ref, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)
        after_texts = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)
        if verify_fn is not None:
            table.append(table_row(f"verifier pass rate ({label})", score_texts(rows, before_texts, verify_fn),
                                   score_texts(rows, after_texts, verify_fn)))
        if reward_fn is not None:
            table.append(table_row(f"win rate vs reference ({label})", None,
                                   compare_texts(rows, after_texts, before_texts, reward_fn)))
        if label == "greedy":
            samples = [{"prompt": p, "reference": b, "trained": a}
                       for p, b, a in list(zip(prompts, before_texts, after_texts))[:6]]
    return table, samples


def load_reward_fn(spec: str) -> Callable:
    """Resolve ``"package.module:function"`` (or ``"path/to/file.py:function"``; ``function`` may be
    dotted, ``Class.method``) to the callable. Errors say which part was not found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: expected 'module:function', e.g. 'my_rewards:score'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise ValueError(f"reward function {spec!r}: module {module_name!r} not found; check the name and "
                                 "that it is importable (on PYTHONPATH or installed)") from e
            raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


# --------------------------------------------------------------------------------------------------
# Before/after table


def _rate_and_ci(result: dict | None):
    if result is None:
        return None, None, None
    rate = result["rate"] if "rate" in result else result["win_rate"]
    return rate, result.get("n"), (result["ci_low"], result["ci_high"])


def table_row(metric: str, before: dict | None = None, after: dict | None = None) -> dict:
    """A before/after row from two :func:`verifier_eval` / :func:`win_rate` results (either may be None)."""
    b, nb, cb = _rate_and_ci(before)
    a, na, ca = _rate_and_ci(after)
    return {"metric": metric, "before": b, "after": a, "n": na if na is not None else nb,
            "before_ci": cb, "after_ci": ca}


def format_table(rows: list[dict]) -> str:
    """The before/after rows as an aligned console table: metric, before, after, n, 95% CI."""
    cells = [list(TABLE_COLUMNS)] + [table_cells(r) for r in rows]
    widths = [max(len(line[j]) for line in cells) for j in range(len(TABLE_COLUMNS))]

    def fmt(line):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule] + [fmt(line) for line in cells[1:]])
