"""The bundled demo preference data: four small tasks with verifiers, generated deterministically.

Each task is learnable by a small instruct model (SmolLM2-135M-Instruct) in a few hundred DPO
steps; responses are short (under ~40 tokens). Rows are conversational::

    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}], "task": str, "answer": str, "constraint": str,
     "max_words": int}

Every row has the same keys (unused ones are "" or 0), so the rows also load as a
`datasets.Dataset`. Tasks:

- ``number_only``: "Answer with only the number: what is 7 + 5?" chosen ``12``, rejected a wordy
  (correct) sentence. Verifier: the reply is exactly the right integer.
- ``arithmetic``: chosen ``7 + 5 = 12.``, rejected the same with a wrong result. Verifier: the last
  integer in the reply is the answer.
- ``concise``: a short factual question; chosen one sentence, rejected the same sentence wrapped in
  filler. Verifier: at most ``max_words`` words and the answer word present.
- ``constraint``: a question plus a stated constraint (all capitals, all lowercase, end with "!",
  start with "Answer:", wrap in double quotes); chosen satisfies it, rejected does not. Verifier:
  the constraint holds and the answer is present.

Train and eval are disjoint by construction: a prompt belongs to the eval split iff the first byte
of its sha256 is divisible by 10, whatever the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SIZES = {"train": 2400, "eval": 200}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WORDS = ["apple", "river", "garden", "window", "pencil", "orange", "mountain", "cat", "bridge", "planet",
         "music", "candle", "forest", "rocket", "basket", "yellow", "island", "turtle", "castle", "dog",
         "lemon", "ocean", "table", "spoon", "violin", "winter", "cloud", "tiger", "kitchen", "paper"]
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
             "early": "late", "open": "closed", "full": "empty", "hard": "soft", "wet": "dry", "old": "new",
             "high": "low", "long": "short", "loud": "quiet", "rich": "poor", "strong": "weak", "thick": "thin"}
OPENERS = ["Great question! I am really happy to help you with this.",
           "Let me explain this carefully so that everything is clear.",
           "Well, there are a few things to think about here.",
           "Sure, I would be glad to walk you through this."]
CLOSERS = ["I hope this helps, feel free to ask more!",
           "That is the main point to remember here.",
           "Let me know if you want more details."]


# ----------------------------------------------------------------------------- operands and facts


def _sum_question(rng: random.Random) -> tuple[str, str, int]:
    """(words, symbols, answer) for a random +, - or x problem, e.g. ("7 plus 5", "7 + 5", 12)."""
    op = rng.choice("+-x")
    if op == "x":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} times {b}", f"{a} x {b}", a * b
    a, b = rng.randint(10, 99), rng.randint(2, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} minus {b}", f"{a} - {b}", a - b
    return f"{a} plus {b}", f"{a} + {b}", a + b


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """(question, one-sentence answer, answer word) for a short factual question."""
    kind = rng.randrange(7)
    if kind == 0:
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}.", DAYS[(i + 1) % 7]
    if kind == 1:
        i = rng.randrange(12)
        nxt = MONTHS[(i + 1) % 12]
        return f"Which month comes after {MONTHS[i]}?", f"{nxt} comes after {MONTHS[i]}.", nxt
    if kind == 2:
        i = rng.randrange(25)
        a, b = chr(65 + i), chr(66 + i)
        return f"What letter comes after {a} in the alphabet?", f"The letter after {a} is {b}.", b
    if kind == 3:
        a, b = rng.sample(range(1, 1000), 2)
        return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.", str(max(a, b))
    if kind == 4:
        n = rng.randint(1, 999)
        parity = "even" if n % 2 == 0 else "odd"
        return f"Is {n} even or odd?", f"{n} is {parity}.", parity
    if kind == 5:
        w = rng.choice(WORDS)
        return f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters.", str(len(w))
    w = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of '{w}'?", f"The opposite of '{w}' is '{OPPOSITES[w]}'.", OPPOSITES[w]


def _has_word(text: str, word: str, *, ignore_case: bool = False) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE if ignore_case else 0) is not None


# ----------------------------------------------------------------------------- the four tasks


def _make_number_only(rng):
    words, symbols, ans = _sum_question(rng)
    prompt = rng.choice([f"Answer with only the number: what is {words}?",
                         f"What is {words}? Reply with just the number.",
                         f"Give only the number, no words: {symbols} = ?",
                         f"How much is {symbols}? Only the number, please."])
    rejected = rng.choice([f"The answer is {ans}.", f"Sure! {symbols} equals {ans}.",
                           f"{words.capitalize()} makes {ans}, so the answer is {ans}."])
    return dict(prompt=prompt, chosen=str(ans), rejected=rejected, answer=str(ans))


def _check_number_only(row, text):
    m = re.fullmatch(r"\s*(-?\d+)\s*", text)
    return m is not None and int(m.group(1)) == int(row["answer"])


def _make_arithmetic(rng):
    words, symbols, ans = _sum_question(rng)
    prompt = rng.choice([f"What is {symbols}?", f"Calculate {words}.", f"Compute {symbols}.",
                         f"What do you get for {words}?"])
    wrong = ans + rng.choice([d for d in range(-10, 11) if d != 0 and ans + d >= 0])
    return dict(prompt=prompt, chosen=f"{symbols} = {ans}.", rejected=f"{symbols} = {wrong}.", answer=str(ans))


def _check_arithmetic(row, text):
    nums = re.findall(r"-?\d+", text)
    return bool(nums) and int(nums[-1]) == int(row["answer"])


def _make_concise(rng):
    question, sentence, answer = _fact(rng)
    prompt = rng.choice([question, f"Quick question: {question}", f"{question} Keep it short."])
    rejected = f"{rng.choice(OPENERS)} {sentence} {rng.choice(CLOSERS)}"
    return dict(prompt=prompt, chosen=sentence, rejected=rejected, answer=answer, max_words=15)


def _check_concise(row, text):
    return len(text.split()) <= int(row["max_words"]) and _has_word(text, row["answer"])


CONSTRAINTS: dict[str, tuple[str, Callable[[str], str], Callable[[str], bool]]] = {
    # name: (instruction, make a sentence satisfy it, does a reply satisfy it)
    "uppercase": ("Reply in all capital letters.", str.upper,
                  lambda t: any(c.isalpha() for c in t) and t == t.upper()),
    "lowercase": ("Reply in all lowercase letters.", str.lower,
                  lambda t: any(c.isalpha() for c in t) and t == t.lower()),
    "exclamation": ("End your answer with an exclamation mark.", lambda s: s.rstrip(".") + "!",
                    lambda t: t.rstrip().endswith("!")),
    "answer_prefix": ("Start your reply with 'Answer:'.", lambda s: "Answer: " + s,
                      lambda t: t.lstrip().startswith("Answer:")),
    "quoted": ("Wrap your whole answer in double quotes.", lambda s: f'"{s}"',
               lambda t: len(t.strip()) >= 2 and t.strip()[0] == '"' and t.strip()[-1] == '"'),
}


def _make_constraint(rng):
    question, sentence, answer = _fact(rng)
    name = rng.choice(sorted(CONSTRAINTS))
    instruction, satisfy, holds = CONSTRAINTS[name]
    prompt = rng.choice([f"{instruction} {question}", f"{question} {instruction}"])
    # The violating reply must really violate (e.g. a sentence that happens to be all lowercase).
    rejected = sentence if not holds(sentence) else "Sure: " + sentence
    return dict(prompt=prompt, chosen=satisfy(sentence), rejected=rejected, answer=answer, constraint=name)


def _check_constraint(row, text):
    return CONSTRAINTS[row["constraint"]][2](text) and _has_word(text, row["answer"], ignore_case=True)


@dataclass(frozen=True)
class DemoTask:
    """One demo task: `make(rng)` draws a row's fields; `verify(row, completion_text)` checks a reply."""

    name: str
    description: str
    make: Callable[[random.Random], dict]
    check: Callable[[dict, str], bool]

    def verify(self, row: dict, completion_text: str) -> bool:
        return bool(self.check(row, completion_text))


TASKS: dict[str, DemoTask] = {
    t.name: t
    for t in (
        DemoTask("number_only", "answer with only the number when asked to", _make_number_only, _check_number_only),
        DemoTask("arithmetic", "give the correct result of a sum, difference or product",
                 _make_arithmetic, _check_arithmetic),
        DemoTask("concise", "answer a short question in one short sentence", _make_concise, _check_concise),
        DemoTask("constraint", "follow a stated format constraint", _make_constraint, _check_constraint),
    )
}


def verify(row: dict, completion_text: str) -> bool:
    """True if completion_text solves the demo row (dispatches on row["task"])."""
    if row.get("task") not in TASKS:
        raise KeyError(f"row task {row.get('task')!r} is not a demo task ({', '.join(TASKS)})")
    return TASKS[row["task"]].verify(row, completion_text)


# ----------------------------------------------------------------------------- datasets


def prompt_split(prompt: str) -> str:
    """"eval" for about 1 prompt in 10 (by a hash of its text), else "train"."""
    return "eval" if hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 10 == 0 else "train"


def demo_dataset(split: str = "train", n: int | None = None, seed: int = 0,
                 tasks: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """n demo rows of one split (default 2400 train / 200 eval), the same for the same seed.

    tasks: the task names to draw from (None = all four, in TASKS order). Tasks are balanced (row i
    draws the (i mod len(tasks))-th task, then the rows are shuffled); prompts are unique within the
    split and never shared between splits.
    """
    if split not in DEFAULT_SIZES:
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    unknown = [t for t in (tasks or []) if t not in TASKS]
    if unknown or (tasks is not None and not tasks):
        raise ValueError(f"demo tasks {list(tasks)!r}: choose one or more of {', '.join(TASKS)}")
    n = DEFAULT_SIZES[split] if n is None else int(n)
    rng = random.Random(f"preftune-demo/{seed}/{split}")
    names, seen, rows = list(tasks or TASKS), set(), []
    for i in range(n):
        task = TASKS[names[i % len(names)]]
        for _ in range(10_000):
            fields = task.make(rng)
            if fields["prompt"] not in seen and prompt_split(fields["prompt"]) == split:
                break
        else:
            raise RuntimeError(f"demo task {task.name}: ran out of distinct {split} prompts at row {i}")
        seen.add(fields["prompt"])
        rows.append({
            "prompt": [{"role": "user", "content": fields["prompt"]}],
            "chosen": [{"role": "assistant", "content": fields["chosen"]}],
            "rejected": [{"role": "assistant", "content": fields["rejected"]}],
            "task": task.name,
            "answer": fields.get("answer", ""),
            "constraint": fields.get("constraint", ""),
            "max_words": fields.get("max_words", 0),
        })
    rng.shuffle(rows)
    return rows


def write_demo(out_dir, *, n_train: int | None = None, n_eval: int | None = None, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl under out_dir; returns {"train": path, "eval": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in demo_dataset(split, n=n, seed=seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths
