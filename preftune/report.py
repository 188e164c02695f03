"""See what training did: read a run's metrics file, plot it, flag likelihood collapse, write an HTML report.

Input is the run directory the trainer writes (docs/CONTRACTS.md, "Metrics file"):
``<run_dir>/metrics.jsonl`` (one JSON object per log, train lines and ``eval_``-prefixed eval lines),
``<run_dir>/config.yaml`` (the resolved config) and, for a GRPO run with log_completions on,
``<run_dir>/completions.jsonl``. Output: PNG plots under ``<run_dir>/plots`` and a self-contained
``<run_dir>/report.html`` (plots embedded as data URIs, no external assets).

DPO and GRPO runs share the plotting code; what differs is the list of panels (:data:`PANELS`),
chosen by :func:`detect_algorithm` from the metric names alone, so a run folder without its
config.yaml still gets the right report.

Entry points: :func:`read_metrics`, :func:`detect_algorithm`, :func:`plot_metrics`,
:func:`detect_likelihood_collapse`, :func:`print_collapse_warning`, :func:`read_completions`,
:func:`write_report`. Nothing heavy is imported at module load; matplotlib is imported when plotting.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.html"
COMPLETIONS_FILE = "completions.jsonl"
EVAL_PREFIX = "eval_"

# One entry per plot: (file stem, title, y label, train metric names). Eval points come from the
# same names with the `eval_` prefix and are drawn as markers on the same axes. A name may hold a
# `*` (matched against the run's metric names, e.g. one curve per reward function), and a curve
# `<x>/mean` whose run also logs `<x>/std` gets a shaded mean ± std band. PLOTS is DPO's list.
PLOTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("loss", "Loss", "loss", ("loss", "nll_loss")),
    ("reward_accuracy", "Reward accuracy", "accuracy (r_chosen > r_rejected)", ("rewards/accuracies",)),
    ("rewards", "Implicit rewards  β·log(π/π_ref)", "reward", ("rewards/chosen", "rewards/rejected")),
    ("margins", "Reward margin  r_chosen − r_rejected", "margin", ("rewards/margins",)),
    ("logps", "Sequence log-probabilities", "log π (nats, summed over tokens)", ("logps/chosen", "logps/rejected")),
    ("learning_rate", "Learning rate", "learning rate", ("learning_rate",)),
    ("grad_norm", "Gradient norm (before clipping)", "‖g‖₂", ("grad_norm",)),
]
_SHARED = {panel[0]: panel for panel in PLOTS if panel[0] in ("loss", "learning_rate", "grad_norm")}

# GRPO's panels, over TRL's GRPO metric names.
GRPO_PLOTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("reward", "Reward (mean over the batch's completions)", "reward", ("reward", "rewards/*/mean")),
    ("reward_std", "Reward spread within groups", "reward std", ("reward_std",)),
    ("frac_reward_zero_std", "Groups whose completions all scored the same (no learning signal)",
     "fraction of groups", ("frac_reward_zero_std", "dynamic_sampling/frac_filled_zero_std")),
    ("completion_length", "Completion length", "tokens",
     ("completions/mean_length", "completions/min_length", "completions/max_length",
      "completions/mean_terminated_length")),
    ("clipped_ratio", "Completions cut at max_completion_length (no EOS)", "fraction",
     ("completions/clipped_ratio",)),
    ("kl", "KL to the reference policy", "KL (nats per token)", ("kl",)),
    ("entropy", "Policy entropy over completion tokens", "entropy (nats per token)", ("entropy",)),
    ("clip_ratio", "Importance-ratio clipping", "fraction of tokens",
     ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")),
    ("dynamic_sampling", "Dynamic sampling", "count", ("dynamic_sampling/resample_rounds",
                                                       "dynamic_sampling/generated_groups")),
    _SHARED["loss"],
    _SHARED["learning_rate"],
    _SHARED["grad_norm"],
]

# The panel list per algorithm; detect_algorithm picks the key.
PANELS: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = {"dpo": PLOTS, "grpo": GRPO_PLOTS}

# Remedies the reference document gives for likelihood collapse (§6.9.5 NCA, §6.9.7 RPO, §6.2 on β).
COLLAPSE_REMEDIES = (
    "NCA: loss_type=nca_pair with a small beta (e.g. beta=0.01) adds an absolute likelihood term that "
    "penalises pushing both responses down (reference §6.9.5).",
    "RPO: rpo_alpha=1.0 adds an NLL term on the chosen response so the model keeps generating it (§6.9.7).",
    "A higher beta: a stronger KL pull toward the reference limits how far both log-probs can fall (§6.2).",
)


# --------------------------------------------------------------------------------------------------
# Reading


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file a run appends to, in file order.

    Blank lines are skipped. A last line that is not valid JSON (the run crashed mid-write) is dropped
    with a warning on stderr; a bad line anywhere else is an error naming the file and line.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:
                print(f"preftune report: {path}:{lineno}: ignoring a truncated last line ({e.msg})", file=sys.stderr)
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); fix or delete that line") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """Read ``<run_dir>/metrics.jsonl`` into ``(train_rows, eval_rows)``, in file order.

    A line is an eval row when any of its keys starts with ``eval_``. Blank lines are skipped. A last
    line that is not valid JSON (the run crashed mid-write) is dropped with a warning on stderr; a bad
    line anywhere else is an error naming the file and line.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file; is {run_dir} a preftune run directory (output_dir)?")
    train, evals = [], []
    for row in _read_jsonl(path):
        (evals if any(key.startswith(EVAL_PREFIX) for key in row) else train).append(row)
    return train, evals


def _metric_names(train: list[dict], evals: list[dict]) -> list[str]:
    """Every metric name the run logged (eval names without their prefix), in order of first appearance."""
    names = {}
    for row in train:
        names.update(dict.fromkeys(row))
    for row in evals:
        names.update(dict.fromkeys(k[len(EVAL_PREFIX):] for k in row if k.startswith(EVAL_PREFIX)))
    return [k for k in names if k not in ("step", "epoch")]


def _is_grpo_metric(name: str) -> bool:
    return (name in ("reward", "reward_std", "frac_reward_zero_std") or name.startswith("completions/")
            or (name.startswith("rewards/") and name.endswith(("/mean", "/std"))))


def detect_algorithm(train: list[dict], evals: list[dict] = ()) -> str:
    """The key of :data:`PANELS` that fits the run: ``"grpo"`` when any row carries one of GRPO's own
    metric names (``reward``, ``reward_std``, ``frac_reward_zero_std``, ``completions/...``,
    ``rewards/<function>/mean|std``, train or ``eval_``-prefixed), else ``"dpo"`` (DPO's reward
    metrics are ``rewards/chosen`` and the like, never one of these)."""
    return "grpo" if any(_is_grpo_metric(n) for n in _metric_names(train, list(evals))) else "dpo"


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite number under `key`."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(row.get("step", i)))
            ys.append(float(v))
    return xs, ys


# --------------------------------------------------------------------------------------------------
# Plots


def _expand(keys: tuple[str, ...], names: list[str]) -> list[str]:
    """`keys` with each ``*`` pattern replaced by the run's matching metric names (first-seen order)."""
    out = []
    for key in keys:
        out += [n for n in names if fnmatch.fnmatchcase(n, key)] if "*" in key else [key]
    return list(dict.fromkeys(out))


def _std_band(rows: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, mean − std, mean + std) over the rows that carry both `key` = ``<x>/mean`` and ``<x>/std``."""
    if not key.endswith("/mean"):
        return [], [], []
    std_key = key[: -len("mean")] + "std"
    xs, lo, hi = [], [], []
    for i, row in enumerate(rows):
        m, s = row.get(key), row.get(std_key)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (m, s)):
            xs.append(float(row.get("step", i)))
            lo.append(m - s)
            hi.append(m + s)
    return xs, lo, hi


def plot_metrics(run_dir, out_dir=None, *, algorithm: str | None = None) -> list[Path]:
    """Write one PNG per panel of the run's algorithm (:data:`PANELS`) to `out_dir` (default
    ``<run_dir>/plots``).

    algorithm: a key of :data:`PANELS`; None detects it from the metric names (:func:`detect_algorithm`).
    Train values are lines over the optimizer step, eval values markers of the same colour on the
    same axes; a ``<x>/mean`` curve with a logged ``<x>/std`` gets a shaded ± std band. A plot whose
    metrics appear in neither train nor eval rows is skipped. Returns the written paths in panel order.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no global backend state

    train, evals = read_metrics(run_dir)
    if algorithm is None:
        algorithm = detect_algorithm(train, evals)
    if algorithm not in PANELS:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {', '.join(PANELS)}, "
                         "or None to detect it from the metric names")
    names = _metric_names(train, evals)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, ylabel, keys in PANELS[algorithm]:
        curves = [(key, _series(train, key), _series(evals, EVAL_PREFIX + key)) for key in _expand(keys, names)]
        curves = [c for c in curves if c[1][0] or c[2][0]]
        if not curves:
            continue
        fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        banded = False
        for i, (key, (tx, ty), (ex, ey)) in enumerate(curves):
            color = f"C{i}"
            bx, lo, hi = _std_band(train, key)
            if bx:
                ax.fill_between(bx, lo, hi, color=color, alpha=0.15, linewidth=0)
                banded = True
            if tx:
                ax.plot(tx, ty, color=color, linewidth=1.5, marker="." if len(tx) < 3 else None, label=f"train {key}")
            if ex:
                ax.plot(ex, ey, color=color, linestyle="none", marker="o", markersize=6,
                        markeredgecolor="black", label=f"eval {key}")
        ax.set_title(title + ("\n(shaded: train mean ± std)" if banded else ""))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if stem == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        path = out / f"{stem}.png"
        fig.savefig(path, format="png")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# Likelihood collapse


@dataclass(frozen=True)
class Finding:
    """Something in the metrics the user should act on."""

    title: str
    message: str
    remedies: tuple[str, ...] = ()
    evidence: dict = field(default_factory=dict)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def detect_likelihood_collapse(train_rows: list[dict], *, min_logs: int = 6, window_frac: float = 0.2,
                               min_logp_drop: float = 1.0) -> Finding | None:
    """Flag DPO's likelihood collapse (reference §6.9.5): the chosen response's probability falls
    along with the rejected one's while the margin between them grows.

    The rule, over the train logs (n = logs that carry ``rewards/margins``; fewer than `min_logs`
    gives ``None``). ``early(k)`` and ``late(k)`` are the means of metric k over the first and last
    w = max(2, round(window_frac·n)) logs that carry k (smoothing away batch-to-batch noise).
    Collapse is reported when all checkable conditions hold and at least one of (2), (3) is checkable:

    1. the margin grew:          late(rewards/margins) > early(rewards/margins)
    2. chosen log-prob fell:     early(logps/chosen) − late(logps/chosen) > min_logp_drop nats,
                                 and logps/rejected fell too: late(logps/rejected) < early(logps/rejected)
    3. chosen now below the reference and still falling:
                                 late(rewards/chosen) < 0 and late(rewards/chosen) < early(rewards/chosen)

    ``rewards/chosen`` = β·(log π(y_w) − log π_ref(y_w)) is reference-normalised, so (3) is the
    signal that does not move with the lengths of whatever responses a batch happened to hold.

    The check is DPO's: for rows of another algorithm (:func:`detect_algorithm`) it returns None.
    """
    if detect_algorithm(train_rows) != "dpo":
        return None
    n = len(_series(train_rows, "rewards/margins")[1])
    if n < min_logs:
        return None

    def window(key: str) -> tuple[float, float] | None:
        ys = _series(train_rows, key)[1]
        w = max(2, round(window_frac * len(ys)))
        if len(ys) < 2 * w:
            return None
        return _mean(ys[:w]), _mean(ys[-w:])

    margins, chosen_lp, rejected_lp = window("rewards/margins"), window("logps/chosen"), window("logps/rejected")
    chosen_r = window("rewards/chosen")
    if margins is None or (chosen_lp is None and chosen_r is None):
        return None
    if not margins[1] > margins[0]:
        return None
    evidence = {"margin_early": margins[0], "margin_late": margins[1]}
    parts = [f"the reward margin rose from {margins[0]:.3g} to {margins[1]:.3g}"]
    if chosen_lp is not None:
        drop = chosen_lp[0] - chosen_lp[1]
        if not drop > min_logp_drop:
            return None
        if rejected_lp is not None and not rejected_lp[1] < rejected_lp[0]:
            return None
        evidence.update(logps_chosen_early=chosen_lp[0], logps_chosen_late=chosen_lp[1])
        parts.append(f"the chosen log-prob fell from {chosen_lp[0]:.3g} to {chosen_lp[1]:.3g} ({drop:.3g} nats)")
        if rejected_lp is not None:
            evidence.update(logps_rejected_early=rejected_lp[0], logps_rejected_late=rejected_lp[1])
            parts.append(f"the rejected log-prob fell from {rejected_lp[0]:.3g} to {rejected_lp[1]:.3g}")
    if chosen_r is not None:
        if not (chosen_r[1] < 0 and chosen_r[1] < chosen_r[0]):
            return None
        evidence.update(rewards_chosen_early=chosen_r[0], rewards_chosen_late=chosen_r[1])
        parts.append(f"the chosen reward went from {chosen_r[0]:.3g} to {chosen_r[1]:.3g} (below zero: the "
                     "policy now finds the preferred responses less likely than the reference does)")
    message = (
        "Likelihood collapse: " + "; ".join(parts) + ". The DPO loss only sees the difference between the "
        "two responses, so it can widen the margin by pushing both down (reference §6.9.5)."
    )
    return Finding("Likelihood collapse", message, COLLAPSE_REMEDIES, evidence)


def print_collapse_warning(finding: Finding | None, file=None) -> None:
    """Print `finding` as a boxed console warning (to stderr by default); nothing when it is None."""
    if finding is None:
        return
    file = sys.stderr if file is None else file
    bar = "!" * 78
    print(bar, file=file)
    print(f"WARNING: {finding.title}", file=file)
    print(finding.message, file=file)
    print("What to try:", file=file)
    for remedy in finding.remedies:
        print(f"  - {remedy}", file=file)
    print(bar, file=file)


# --------------------------------------------------------------------------------------------------
# Tables shared by the console (evaluate.format_table) and the HTML page

TABLE_COLUMNS = ("metric", "before", "after", "n", "95% CI")


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:.0f}"  # throughputs
    if v != 0 and abs(v) < 0.001:
        return f"{v:.3g}"  # learning rates
    return f"{v:.3f}"


def _ci(ci) -> str | None:
    return None if ci is None else f"[{_num(ci[0])}, {_num(ci[1])}]"


def table_cells(row: dict) -> list[str]:
    """The :data:`TABLE_COLUMNS` cells of one eval-table row.

    A row is ``{"metric": str, "before": float|None, "after": float|None, "n": int|None,
    "before_ci": (lo, hi)|None, "after_ci": (lo, hi)|None}`` (``preftune.evaluate.table_row`` builds
    one from two result dicts); the CI cell shows ``before → after`` when both are given.
    """
    cis = [c for c in (_ci(row.get("before_ci")), _ci(row.get("after_ci"))) if c is not None]
    return [str(row.get("metric", "?")), _num(row.get("before")), _num(row.get("after")),
            _num(row.get("n")), " → ".join(cis) if cis else "-"]


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
figure { margin: 0; } img { max-width: 100%; border: 1px solid #ddd; }
pre, .text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 1em; border: 1px solid #ddd; }
.warning { background: #fff3cd; border: 2px solid #d39e00; padding: 0.5em 1.5em; margin: 1em 0; }
table.samples td { width: 33%; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header, body_rows, table_id: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>" for cells in body_rows)
    return f'<table id="{table_id}"{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _prompt_text(prompt) -> str:
    """A prompt as text: strings as is, message lists as ``role: content`` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def _config_text(run_dir: Path, config: dict | None) -> str | None:
    if config is not None:
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)
    path = run_dir / CONFIG_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _final_metrics(train: list[dict], evals: list[dict]) -> list[list[str]]:
    last_train = train[-1] if train else {}
    last_eval = evals[-1] if evals else {}
    keys = [k for k in last_train if k not in ("step", "epoch")]
    keys += [k[len(EVAL_PREFIX):] for k in last_eval if k.startswith(EVAL_PREFIX) and k[len(EVAL_PREFIX):] not in keys]
    return [[k, _num(last_train.get(k)), _num(last_eval.get(EVAL_PREFIX + k))] for k in keys]


# --------------------------------------------------------------------------------------------------
# GRPO: reward before/after and logged completions

REWARD_WINDOW = 10  # logs averaged at each end of the reward table
COMPLETIONS_PER_ROUND = 4  # rows shown from the first and from the last logged round
MAX_COMPLETION_CHARS = 2000  # a longer prompt or completion is cut in the page (the file keeps it whole)


def reward_table(train: list[dict], window: int = REWARD_WINDOW) -> tuple[list[str], list[list[str]]]:
    """(header, rows) comparing the mean of ``reward`` and of each ``rewards/<function>/mean`` over the
    first and the last k train logs that carry it, k = min(window, n // 2) (at least 1), so the two
    windows never overlap once there are two logs. Empty rows when the run logged no reward."""
    keys = _expand(("reward", "rewards/*/mean"), _metric_names(train, []))
    series = [(key, _series(train, key)[1]) for key in keys]
    series = [(key, ys) for key, ys in series if ys]
    k = max(1, min(window, min((len(ys) for _, ys in series), default=0) // 2))
    header = ["metric", f"first {k} logs (mean)", f"last {k} logs (mean)", "change"]
    rows = []
    for key, ys in series:
        first, last = _mean(ys[:k]), _mean(ys[-k:])
        rows.append([key, _num(first), _num(last), f"{last - first:+.3f}"])
    return header, rows


def read_completions(run_dir, per_round: int = COMPLETIONS_PER_ROUND) -> list[dict]:
    """The first `per_round` rows of the first and of the last logged round of
    ``<run_dir>/completions.jsonl`` (rows ``{step, round, prompt, completion, rewards: {name: value},
    advantage}``; a row without ``round`` is grouped by its ``step``), in file order; [] when the
    file does not exist. One logged round gives its rows once."""
    path = Path(run_dir) / COMPLETIONS_FILE
    if not path.is_file():
        return []
    rows = _read_jsonl(path)
    if not rows:
        return []
    round_of = [row.get("round", row.get("step")) for row in rows]
    picked = []
    for r in dict.fromkeys((round_of[0], round_of[-1])):
        picked += [row for row, ro in zip(rows, round_of) if ro == r][:per_round]
    return picked


def _clip_text(text: str) -> str:
    extra = len(text) - MAX_COMPLETION_CHARS
    return text if extra <= 0 else f"{text[:MAX_COMPLETION_CHARS]} … ({extra} more characters)"


def _completion_cells(row: dict) -> list[str]:
    rewards = row.get("rewards")
    if isinstance(rewards, dict):
        reward_text = "\n".join(f"{name} = {_num(v)}" for name, v in rewards.items())
    else:
        reward_text = _num(rewards)
    return [_num(row.get("round", row.get("step"))), _num(row.get("step")),
            _clip_text(_prompt_text(row.get("prompt", ""))), _clip_text(_prompt_text(row.get("completion", ""))),
            reward_text, _num(row.get("advantage"))]


def write_report(run_dir, *, config: dict | None = None, eval_table: list[dict] | None = None,
                 samples: list[dict] | None = None) -> Path:
    """Write the self-contained HTML run report ``<run_dir>/report.html`` and return its path.

    run_dir: the run's output_dir. Its metrics.jsonl gives the plots (also written as PNG files under
        ``<run_dir>/plots``), the final train/eval metrics and, for DPO, the likelihood-collapse check;
        a run without one gets a page that says so. A GRPO run (:func:`detect_algorithm`) also gets
        its reward over the first and last logs (:func:`reward_table`) and, when the run wrote
        ``completions.jsonl``, a sample of its logged completions (:func:`read_completions`).
    config: the resolved config; None reads ``<run_dir>/config.yaml`` as is.
    eval_table: before/after rows (see :func:`table_cells`).
    samples: ``{"prompt": str | messages, "reference": str, "trained": str}`` dicts, shown side by side.
    Every piece of text is HTML-escaped; plots are embedded as base64 PNG data URIs.
    """
    run_dir = Path(run_dir)
    parts = [f"<h1>preftune run report</h1><p class=\"meta\">run directory: {_e(run_dir.resolve())}</p>"]
    plots = None
    try:
        train, evals = read_metrics(run_dir)
    except FileNotFoundError as e:
        train, evals, plots = [], [], []
        parts.append(f"<p>{_e(e)}</p>")
    algorithm = detect_algorithm(train, evals)
    if plots is None:
        plots = plot_metrics(run_dir, algorithm=algorithm)
        kind = "" if algorithm == "dpo" else f"{algorithm.upper()} run: "
        parts.append(f'<p class="meta">{kind}{len(train)} train logs, {len(evals)} eval logs</p>')
    finding = detect_likelihood_collapse(train)  # None for a GRPO run: the check is DPO's
    if finding is not None:
        remedies = "".join(f"<li>{_e(r)}</li>" for r in finding.remedies)
        parts.append(f'<div class="warning" id="collapse-warning"><h2>Warning: {_e(finding.title)}</h2>'
                     f"<p>{_e(finding.message)}</p><p>What to try:</p><ul>{remedies}</ul></div>")
    if algorithm == "grpo":
        header, rows = reward_table(train)
        if rows:
            parts.append("<h2>Reward: first vs last logs</h2>" + _html_table(header, rows, "reward-table"))
    if train or evals:
        parts.append("<h2>Final metrics</h2>" + _html_table(
            ["metric", "train (last log)", "eval (last log)"], _final_metrics(train, evals), "final-metrics"))
    if eval_table:
        parts.append("<h2>Evaluation: before and after training</h2>"
                     + _html_table(TABLE_COLUMNS, [table_cells(r) for r in eval_table], "eval-table"))
    if plots:
        figures = []
        for path in plots:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
                           f"<figcaption>{_e(path.name)}</figcaption></figure>")
        parts.append('<h2>Training curves</h2><div class="plots">' + "".join(figures) + "</div>")
    if samples:
        rows = [[_prompt_text(s.get("prompt", "")), s.get("reference", ""), s.get("trained", "")] for s in samples]
        table = _html_table(["prompt", "reference model", "trained model"], rows, "samples", "samples text")
        parts.append("<h2>Sample generations</h2>" + table)
    logged = read_completions(run_dir)
    if logged:
        table = _html_table(["round", "step", "prompt", "completion", "rewards", "advantage"],
                            [_completion_cells(row) for row in logged], "completions", "text")
        parts.append(f"<h2>Logged completions (first and last logged round, from {_e(COMPLETIONS_FILE)})</h2>"
                     + table)
    config_text = _config_text(run_dir, config)
    parts.append("<h2>Configuration</h2>" + (f'<pre id="config">{_e(config_text)}</pre>' if config_text is not None
                                              else f"<p>no config given and no {_e(CONFIG_FILE)} in the run directory</p>"))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>preftune report: {_e(run_dir.name)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    out = run_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out
