"""Built-in reward functions for GRPO, and how the command line names them.

Every reward has TRL's signature, ``f(completions, **kwargs) -> list[float | None]`` (None: the
reward does not apply to that completion). Completions may be strings or
``[{"role": "assistant", "content": text}]`` message lists.

- :func:`accuracy_reward` — the final number or ``\\boxed{...}`` answer against the ``solution`` (or ``answer``) column.
- :func:`reasoning_accuracy_reward` — the same on the text after ``</think>``; 0.0 when reasoning never ends.
- :func:`get_cosine_scaled_reward` — correctness scaled by length on a cosine schedule (factory).
- :func:`think_format_reward` — ``<think>...</think>`` then the answer.
- :func:`get_soft_overlong_punishment` — DAPO's soft length penalty on completion tokens (factory).
- :func:`get_repetition_penalty_reward` — repeated token n-grams, negative (factory).
- :func:`get_length_reward` — closeness to a target length, dense (factory).
- :func:`demo_reward` / :func:`demo_shaping_reward` — the bundled demo tasks' verifiers, 0/1 and partial credit.

``REGISTRY`` maps the names ``--reward NAME`` accepts to these; :func:`make_reward` builds one
(``"length(target_len=20)"`` passes arguments to a factory, config fields fill the rest) and
:func:`load_reward` also takes ``"module:function"`` / ``"path/to/file.py:function"``.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from preftune.data import demo
from preftune.evaluate import load_reward_fn


def completion_text(completion) -> str:
    """The text of one completion: a string as is, a message list's last message content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else " ".join(
            part.get("text", "") for part in content if isinstance(part, dict))
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


# ----------------------------------------------------------------------------- accuracy


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
# A number: optional sign (not a hyphen inside a word or between digits), thousands groups or digits,
# decimals, then an optional "/denominator".
_NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
                     r"|(?<![\w.])[-−]?\.\d+")


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` in text, braces balanced, in order."""
    out = []
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for j in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[start:j])
                break
    return out


def _clean(text: str) -> str:
    """Strip LaTeX and currency decoration around a number: $, \\$, \\left/\\right, \\text{}, {,} thousands, %."""
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    text = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\%", "").replace("%", "")
    return _LATEX_FRAC.sub(r"\1/\2", text)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as "12", "-12.50", "1,200", "3/4", "\\frac{3}{4}", "$12" or
    "50%" (= 50), alone apart from spaces and a final period; None if text is not one number."""
    text = _clean(text).strip().rstrip(".").strip()
    if not text or _NUMBER.fullmatch(text) is None:
        return None
    text = text.replace("−", "-").replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> str | None:
    """The answer a completion gives: its last ``\\boxed{...}``, else its last number; None if neither."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1]
    numbers = _NUMBER.findall(_clean(text))
    return numbers[-1] if numbers else None


def _normalize(text: str) -> str:
    return re.sub(r"\s+", "", _clean(text)).rstrip(".").lower()


def _gold(value) -> str | None:
    """A gold answer from a solution/answer cell: its last boxed content if any, else the cell; None if empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    if not value:
        return None
    boxed = boxed_contents(value)
    return boxed[-1] if boxed else value


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numbers compare by exact value (12 == 12.0 == 24/2, 1,200 == 1200); anything else as text without
    spaces or LaTeX decoration, case-insensitively."""
    if predicted is None:
        return False
    g, p = parse_number(gold), parse_number(predicted)
    if g is not None:
        return p is not None and p == g
    return _normalize(predicted) == _normalize(gold)


def accuracy_reward(completions, solution=None, answer=None, log_extra=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold answer, else 0.0; None for a row without one.

    The gold answer is the row's ``solution`` column (TRL's name), else its ``answer`` column; a
    boxed gold (``"... \\boxed{12}"``) compares by its boxed content. The completion's answer is its last
    ``\\boxed{...}``, else its last number. Numbers compare exactly by value, other answers as text.
    Logs the columns "solution", "gold_parsed" and "answer_parsed" through log_extra.
    """
    golds = solution if solution is not None else answer
    if golds is None:
        raise ValueError("accuracy_reward reads the gold answer from a 'solution' or 'answer' dataset column; the "
                         "dataset has neither: add one, or use another reward")
    rewards, gold_parsed, answer_parsed = [], [], []
    for completion, cell in zip(completions, golds, strict=True):
        gold = _gold(cell)
        predicted = final_answer(completion_text(completion))
        rewards.append(None if gold is None else float(answers_match(predicted, gold)))
        gold_parsed.append("[missing]" if gold is None else gold)
        answer_parsed.append("[none]" if predicted is None else predicted)
    if log_extra is not None:
        log_extra("solution", [None if g is None else str(g) for g in golds])
        log_extra("gold_parsed", gold_parsed)
        log_extra("answer_parsed", answer_parsed)
    return rewards


def reasoning_accuracy_reward(completions, solution=None, answer=None, reasoning_delimiters=None, log_extra=None,
                              **kwargs) -> list[float | None]:
    """:func:`accuracy_reward` on the text after the reasoning: after the first of `reasoning_delimiters`
    (default ``["</think>"]``) that the completion contains, split at its last occurrence. A completion
    whose reasoning never ends gets 0.0 (not None: unfinished reasoning is penalized)."""
    delimiters = ["</think>"] if reasoning_delimiters is None else list(reasoning_delimiters)
    finals = []
    for completion in completions:
        text = completion_text(completion)
        delim = next((d for d in delimiters if d in text), None)
        finals.append(None if delim is None else text.split(delim)[-1])
    scored = accuracy_reward([f or "" for f in finals], solution=solution, answer=answer, log_extra=log_extra)
    return [0.0 if f is None else r for f, r in zip(finals, scored)]


class _CosineScaledReward:
    """Correctness scaled by length on a cosine schedule (Demystifying Long CoT, appendix C.1)."""

    __name__ = "cosine_scaled_reward"

    def __init__(self, max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct):
        self.max_len = int(max_len)
        # (lo, hi): the reward at length >= max_len and at length 0
        self.correct = (float(min_value_correct), float(max_value_correct))
        self.wrong = (float(max_value_wrong), float(min_value_wrong))

    def __call__(self, completions, completion_ids, solution=None, answer=None, **kwargs) -> list[float | None]:
        rewards = []
        for ok, ids in zip(accuracy_reward(completions, solution=solution, answer=answer), completion_ids, strict=True):
            if ok is None:
                rewards.append(None)
                continue
            # lo + (hi - lo) * (1 + cos(pi * L / L_max)) / 2: hi at length 0, lo from L_max on, so a correct
            # reply earns less as it grows and a wrong one is penalized less (keeps exploring).
            lo, hi = self.correct if ok else self.wrong
            progress = min(len(ids) / self.max_len, 1.0)
            rewards.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress)))
        return rewards


def get_cosine_scaled_reward(max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                             min_value_correct: float = 0.5, max_value_correct: float = 1.0) -> Callable:
    """:func:`accuracy_reward` scaled by the completion's token count on a cosine schedule, named
    ``cosine_scaled_reward``: a correct reply earns from `max_value_correct` (length 0) down to
    `min_value_correct` (length >= max_len); a wrong one from `min_value_wrong` (length 0) up to
    `max_value_wrong`; None where the row has no gold answer."""
    if max_len < 1:
        raise ValueError(f"cosine scaled reward: max_len={max_len}: give a positive length in tokens")
    return _CosineScaledReward(max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)


# ----------------------------------------------------------------------------- format


def think_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion opens with ``<think>``, has no second ``<think>``, and closes it with
    ``</think>`` (anything, possibly nothing, may follow); else 0.0."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        ok = text.startswith("<think>") and text.count("<think>") == 1 and "</think>" in text[len("<think>"):]
        rewards.append(1.0 if ok else 0.0)
    return rewards


# ----------------------------------------------------------------------------- length and repetition


class _SoftOverlongPunishment:
    """DAPO's soft overlong punishment (eq. 13) on the number of completion tokens |y|:
    0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up to L_max, -1 beyond."""

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        self.max_completion_len, self.soft_punish_cache = int(max_completion_len), int(soft_punish_cache)

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        free = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            n = len(ids)
            if n <= free:
                rewards.append(0.0)
            elif n <= self.max_completion_len:
                rewards.append((free - n) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft overlong punishment (eq. 13), named ``soft_overlong_punishment_reward``: no penalty up
    to ``max_completion_len - soft_punish_cache`` tokens, then linearly down to -1 at
    ``max_completion_len``, and -1 beyond."""
    if max_completion_len < 1 or not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(f"soft overlong punishment: max_completion_len={max_completion_len}, soft_punish_cache="
                         f"{soft_punish_cache}: need max_completion_len >= 1 and 0 <= soft_punish_cache <= it")
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


class _RepetitionPenalty:
    """(1 - distinct n-grams / n-grams) x max_penalty over completion token ids; 0 under n tokens."""

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int, max_penalty: float):
        self.ngram_size, self.max_penalty = int(ngram_size), float(max_penalty)

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            ids = list(ids)
            grams = [tuple(ids[i:i + self.ngram_size]) for i in range(len(ids) - self.ngram_size + 1)]
            repeated = 1 - len(set(grams)) / len(grams) if grams else 0.0
            rewards.append(repeated * self.max_penalty if repeated else 0.0)
        return rewards


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """Penalty for repeated token n-grams, named ``repetition_penalty_reward``: 0 with no repeated
    n-gram, towards `max_penalty` (<= 0) as the completion repeats itself."""
    if ngram_size < 1:
        raise ValueError(f"repetition penalty: ngram_size={ngram_size}: give 1 or more")
    if max_penalty > 0:
        raise ValueError(f"repetition penalty: max_penalty={max_penalty} is a bonus: give a value <= 0")
    return _RepetitionPenalty(ngram_size, max_penalty)


class _LengthReward:
    """1 - |L - target| / target, floored at 0: L in tokens (completion_ids) or whitespace words."""

    __name__ = "length_reward"

    def __init__(self, target_len: int, unit: str):
        self.target_len, self.unit = int(target_len), unit

    def __call__(self, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if self.unit == "tokens":
            lengths = [len(ids) for ids in completion_ids]
        else:
            lengths = [len(completion_text(c).split()) for c in completions]
        return [max(0.0, 1.0 - abs(n - self.target_len) / self.target_len) for n in lengths]


def get_length_reward(target_len: int, unit: str = "tokens") -> Callable:
    """A dense length target, named ``length_reward``: 1 at `target_len`, falling linearly to 0 at 0 and
    at twice the target. unit: "tokens" (completion token ids) or "words" (whitespace-separated)."""
    if target_len < 1:
        raise ValueError(f"length reward: target_len={target_len}: give a positive length")
    if unit not in ("tokens", "words"):
        raise ValueError(f"length reward: unit={unit!r}: use 'tokens' or 'words'")
    return _LengthReward(target_len, unit)


# ----------------------------------------------------------------------------- the demo tasks


def _demo_rows(n: int, kwargs: dict) -> list[dict | None]:
    """Each completion's demo row (task, answer, constraint, max_words), None where task is not a demo task."""
    tasks = kwargs.get("task")
    if tasks is None:
        raise ValueError("the demo rewards read the 'task', 'answer', 'constraint' and 'max_words' columns of the "
                         "bundled demo data; this dataset has no 'task' column")
    rows = []
    for j in range(n):
        row = {key: kwargs[key][j] for key in ("task", "answer", "constraint", "max_words") if key in kwargs}
        rows.append(row if row.get("task") in demo.TASKS else None)
    return rows


def demo_reward(completions, **kwargs) -> list[float | None]:
    """1.0 when the demo task's verifier (``preftune.data.demo.verify``) accepts the completion, else 0.0;
    None for a row whose task is not a demo task."""
    rows = _demo_rows(len(completions), kwargs)
    return [None if row is None else float(demo.verify(row, completion_text(c))) for c, row in zip(completions, rows)]


def _int_near(predicted: int | None, answer: int) -> float:
    """1 at the answer, falling linearly to 0 at a distance of max(|answer|, 10)."""
    if predicted is None:
        return 0.0
    return max(0.0, 1.0 - abs(predicted - answer) / max(abs(answer), 10))


def _constraint_partial(name: str, text: str) -> float:
    """How far a reply goes toward a demo constraint, in [0, 1]; 1 exactly when the constraint holds."""
    stripped = text.strip()
    if name in ("uppercase", "lowercase"):
        if demo.CONSTRAINTS[name][2](text):
            return 1.0
        cased = [c for c in text if c.upper() != c.lower()]  # letters that have a case
        good = sum(c.isupper() if name == "uppercase" else c.islower() for c in cased)
        return min(good / len(cased), 0.9) if cased else 0.0  # below 1: the verifier says no
    if name == "exclamation":
        return 1.0 if stripped.endswith("!") else 0.5 if "!" in text else 0.0
    if name == "answer_prefix":
        return 1.0 if stripped.startswith("Answer:") else 0.5 if "answer:" in text.lower() else 0.0
    if name == "quoted":
        if len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"':
            return 1.0
        return 0.5 * (stripped[:1] == '"') + 0.5 * (stripped[-1:] == '"') if len(stripped) >= 2 else 0.0
    raise KeyError(f"constraint {name!r} is not a demo constraint ({', '.join(demo.CONSTRAINTS)})")


def _shaping(row: dict, text: str) -> float:
    """Partial credit for one demo reply, in [0, 1]; 1.0 exactly when demo.verify accepts it."""
    task, answer = row["task"], str(row.get("answer", ""))
    if task == "number_only":
        nums = re.findall(r"-?\d+", text)
        present = any(int(x) == int(answer) for x in nums)
        brevity = 1.0 / max(len(text.split()), 1)
        score = 0.5 * present + 0.5 * brevity
        return 1.0 if demo.verify(row, text) else min(score, 0.9)
    if task == "arithmetic":
        nums = re.findall(r"-?\d+", text)
        last = int(nums[-1]) if nums else None
        present = any(int(x) == int(answer) for x in nums)
        score = 0.25 * present + 0.25 * _int_near(last, int(answer)) + 0.5 * (last == int(answer))
        return score
    if task == "concise":
        n, limit = len(text.split()), int(row["max_words"])
        brevity = 1.0 if n <= limit else limit / n
        return 0.5 * demo._has_word(text, answer) + 0.5 * brevity
    if task == "constraint":
        present = demo._has_word(text, answer, ignore_case=True)
        return 0.5 * present + 0.5 * _constraint_partial(row["constraint"], text)
    raise KeyError(f"demo task {task!r} has no shaping reward")


def demo_shaping_reward(completions, **kwargs) -> list[float | None]:
    """Dense partial credit for the demo tasks, in [0, 1] and 1.0 exactly when the verifier passes, so
    groups whose binary reward is all 0 still rank their completions:

    - number_only: half for the right number anywhere, half for brevity (1 / words);
    - arithmetic: a quarter for the answer anywhere, a quarter for the last number's closeness, half for it exact;
    - concise: half for the answer word, half for the word count (1 within max_words, else max_words / words);
    - constraint: half for the answer word, half for how far the constraint holds (share of letters in
      the right case, "!" present but not last, "answer:" present but not first, one of two quotes).

    None for a row whose task is not a demo task.
    """
    rows = _demo_rows(len(completions), kwargs)
    return [None if row is None else float(_shaping(row, completion_text(c))) for c, row in zip(completions, rows)]


# ----------------------------------------------------------------------------- registry


REGISTRY: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "reasoning_accuracy": reasoning_accuracy_reward,
    "cosine_scaled": get_cosine_scaled_reward,
    "think_format": think_format_reward,
    "soft_overlong_punishment": get_soft_overlong_punishment,
    "repetition_penalty": get_repetition_penalty_reward,
    "length": get_length_reward,
    "demo": demo_reward,
    "demo_shaping": demo_shaping_reward,
}
# The registry entries that are factories, and the config fields that fill their arguments when not given.
FACTORIES: dict[str, dict[str, str]] = {
    "cosine_scaled": {"max_len": "max_completion_length"},
    "soft_overlong_punishment": {"max_completion_len": "max_completion_length"},
    "repetition_penalty": {},
    "length": {},
}


def _parse_spec(spec: str) -> tuple[str, dict]:
    """ "name" or "name(key=value, ...)" (literal values) -> (name, arguments)."""
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"reward {spec!r}: write NAME or NAME(key=value, ...), e.g. 'length(target_len=20)'") from e
    if isinstance(node, ast.Name):
        return node.id, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        try:
            return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError as e:
            raise ValueError(f"reward {spec!r}: argument values must be literals (numbers, strings)") from e
    raise ValueError(f"reward {spec!r}: write NAME or NAME(key=value, ...) with keyword arguments only, "
                     "e.g. 'length(target_len=20)'")


def make_reward(spec: str, config=None) -> Callable:
    """A registry reward from "NAME" or "NAME(key=value, ...)".

    A plain function takes no arguments. A factory's arguments come from the spec, else from the
    config field FACTORIES names (soft_overlong_punishment's max_completion_len from
    config.max_completion_length), else its default; a missing one is an error naming it.
    """
    name, given = _parse_spec(spec)
    if name not in REGISTRY:
        raise ValueError(f"reward {name!r} is not a built-in reward ({', '.join(REGISTRY)}); for your own "
                         "function write 'module:function' or 'path/to/file.py:function'")
    target = REGISTRY[name]
    if name not in FACTORIES:
        if given:
            raise ValueError(f"reward {name!r} takes no arguments (got {', '.join(given)})")
        return target
    params = inspect.signature(target).parameters
    unknown = [k for k in given if k not in params]
    if unknown:
        raise ValueError(f"reward {name!r} has no argument {', '.join(map(repr, unknown))}; its arguments: "
                         f"{', '.join(params)}")
    kwargs = dict(given)
    for arg, cfg_field in FACTORIES[name].items():
        if arg not in kwargs and config is not None and getattr(config, cfg_field, None) is not None:
            kwargs[arg] = getattr(config, cfg_field)
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"reward {name!r} needs {', '.join(missing)}: write e.g. "
                         f"'{name}({', '.join(f'{p}=...' for p in missing)})'")
    return target(**kwargs)


def load_reward(spec, config=None):
    """A reward for ``reward_funcs`` from a command-line spec.

    - "NAME" / "NAME(key=value, ...)": a built-in (:data:`REGISTRY`, built by :func:`make_reward`);
    - "module:function" or "path/to/file.py:function": your own function (``function`` may be dotted);
    - a reward model's folder or hub id ("org/name"): returned as the string, loaded by RewardFunctions.
    A callable is returned as is.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward {spec!r}: give a built-in name ({', '.join(REGISTRY)}), 'module:function', "
                         "'path/to/file.py:function' or a reward model's path")
    spec = spec.strip()
    name = spec.split("(", 1)[0].strip()
    if name in REGISTRY:
        return make_reward(spec, config)
    if ":" in spec:
        return load_reward_fn(spec)
    if Path(spec).is_dir() or (spec.count("/") == 1 and not spec.endswith(".py")):
        return spec
    raise ValueError(f"reward {spec!r} is not a built-in reward ({', '.join(REGISTRY)}), a 'module:function', a "
                     "'path/to/file.py:function' or an existing reward-model folder")
