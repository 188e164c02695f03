"""preftune.report: metrics reading, plots, likelihood-collapse rule, HTML report (checked in chromium)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from preftune.report import (
    COLLAPSE_REMEDIES,
    GRPO_PLOTS,
    PLOTS,
    detect_algorithm,
    detect_likelihood_collapse,
    plot_metrics,
    print_collapse_warning,
    read_completions,
    read_metrics,
    reward_table,
    table_cells,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_rows(collapse: bool, steps: int = 40, eval_every: int = 10, seed: int = 0) -> list[dict]:
    """Train logs every step and eval logs every `eval_every` steps, with a little noise.

    healthy: chosen log-prob rises a little, rejected falls, chosen reward > 0.
    collapse: both log-probs fall (chosen by ~30 nats), chosen reward goes negative, margin still grows.
    """
    rng = random.Random(seed)
    beta = 0.1
    rows = []
    for step in range(1, steps + 1):
        f = step / steps
        d_chosen = -30 * f if collapse else 2 * f  # log π(y_w) − log π_ref(y_w)
        d_rejected = -45 * f if collapse else -20 * f
        noise = lambda s=0.3: rng.uniform(-s, s)  # noqa: E731
        rc, rr = beta * d_chosen + noise(0.02), beta * d_rejected + noise(0.02)
        rows.append({
            "step": step, "epoch": round(f, 4), "loss": math.log(2) * (1 - 0.7 * f) + noise(0.01),
            "grad_norm": 5 - 3 * f + noise(), "learning_rate": 5e-7 * min(1.0, step / 4),
            "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
            "rewards/accuracies": min(1.0, 0.5 + f / 2), "logps/chosen": -50 + d_chosen + noise(),
            "logps/rejected": -55 + d_rejected + noise(), "pairs_per_second": 10.0, "tokens_per_second": 2000.0,
        })
        if step % eval_every == 0:
            rows.append({"step": step, "epoch": round(f, 4), "eval_loss": math.log(2) * (1 - 0.6 * f),
                         "eval_rewards/accuracies": 0.5 + f / 3, "eval_rewards/margins": rc - rr + 0.1,
                         "eval_logps/chosen": -50 + d_chosen, "eval_logps/rejected": -55 + d_rejected})
    return rows


def write_run(run_dir: Path, rows: list[dict], config_yaml: str | None = "beta: 0.1\nloss_type: sigmoid\n") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if config_yaml is not None:
        (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    return run_dir


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------------------------------
# read_metrics


def test_read_metrics_splits_train_and_eval(tmp_path):
    rows = synthetic_rows(collapse=False, steps=20, eval_every=10)
    train, evals = read_metrics(write_run(tmp_path, rows))
    assert len(train) == 20 and len(evals) == 2
    assert [r["step"] for r in evals] == [10, 20]
    assert train[3] == rows[3]
    assert all("eval_loss" not in r for r in train)


def test_read_metrics_tolerates_truncated_last_line(tmp_path, capsys):
    rows = synthetic_rows(collapse=False, steps=5, eval_every=100)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "loss": 0.6'  # crash mid-write
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    train, evals = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and evals == []
    assert "metrics.jsonl:6" in capsys.readouterr().err


def test_read_metrics_bad_middle_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# plots


def test_plot_metrics_writes_valid_pngs_and_skips_absent(tmp_path):
    import matplotlib.image as mpimg

    rows = synthetic_rows(collapse=False, steps=12, eval_every=6)
    for r in rows:
        r.pop("grad_norm", None)  # a metric the run did not log: its plot is skipped
    paths = plot_metrics(write_run(tmp_path / "run", rows))
    stems = [p.stem for p in paths]
    assert stems == [s for s, *_ in PLOTS if s != "grad_norm"]
    for p in paths:
        assert p.parent == tmp_path / "run" / "plots"
        data = p.read_bytes()
        assert png_size(data) == (640, 360)
        img = mpimg.imread(p)
        assert img.shape[:2] == (360, 640) and img.std() > 0.01  # not blank


def test_plot_metrics_eval_only_metric_still_plotted(tmp_path):
    rows = [{"step": 0, "epoch": 0.0, "eval_loss": 0.69}, {"step": 5, "epoch": 1.0, "eval_loss": 0.5}]
    paths = plot_metrics(write_run(tmp_path, rows), out_dir=tmp_path / "elsewhere")
    assert [p.name for p in paths] == ["loss.png"] and paths[0].parent == tmp_path / "elsewhere"


# --------------------------------------------------------------------------------------------------
# likelihood collapse


def test_collapse_detected_only_in_collapsing_run():
    healthy = [r for r in synthetic_rows(collapse=False) if "loss" in r]
    collapsing = [r for r in synthetic_rows(collapse=True) if "loss" in r]
    assert detect_likelihood_collapse(healthy) is None
    finding = detect_likelihood_collapse(collapsing)
    assert finding is not None
    assert finding.remedies == COLLAPSE_REMEDIES
    joined = " ".join(finding.remedies)
    assert "nca_pair" in joined and "rpo_alpha=1.0" in joined and "higher beta" in joined
    ev = finding.evidence
    assert ev["logps_chosen_early"] - ev["logps_chosen_late"] > 20
    assert ev["rewards_chosen_late"] < 0 < ev["margin_late"]
    assert "§6.9.5" in finding.message


def _rows(**series):
    n = len(next(iter(series.values())))
    return [{"step": i + 1, **{k.replace("__", "/"): v[i] for k, v in series.items()}} for i in range(n)]


def test_collapse_rule_each_condition_matters():
    up, down = [0.1 * i for i in range(10)], [-0.1 * i for i in range(10)]
    lp_down = [-50 - 3 * i for i in range(10)]
    # rewards only (no log-probs logged): chosen reward negative and falling, margin up -> collapse
    assert detect_likelihood_collapse(_rows(rewards__margins=up, rewards__chosen=down)) is not None
    # margin shrinking -> no collapse
    assert detect_likelihood_collapse(_rows(rewards__margins=down, rewards__chosen=down)) is None
    # chosen reward rising -> no collapse
    assert detect_likelihood_collapse(_rows(rewards__margins=up, rewards__chosen=up)) is None
    # log-probs only: chosen falls 27 nats with rejected -> collapse; chosen drop under 1 nat -> none
    rej = [-60 - 6 * i for i in range(10)]
    assert detect_likelihood_collapse(_rows(rewards__margins=up, logps__chosen=lp_down, logps__rejected=rej))
    flat = [-50 - 0.05 * i for i in range(10)]
    assert detect_likelihood_collapse(_rows(rewards__margins=up, logps__chosen=flat, logps__rejected=rej)) is None
    # chosen log-prob down (longer responses later) but chosen reward positive: not collapse
    assert detect_likelihood_collapse(_rows(rewards__margins=up, logps__chosen=lp_down, rewards__chosen=up)) is None
    # too few logs, or nothing about the chosen response -> no verdict
    assert detect_likelihood_collapse(_rows(rewards__margins=up[:5], rewards__chosen=down[:5])) is None
    assert detect_likelihood_collapse(_rows(rewards__margins=up)) is None
    assert detect_likelihood_collapse([]) is None


def test_print_collapse_warning():
    finding = detect_likelihood_collapse([r for r in synthetic_rows(collapse=True) if "loss" in r])
    buf = io.StringIO()
    print_collapse_warning(finding, file=buf)
    out = buf.getvalue()
    assert "WARNING: Likelihood collapse" in out and "nca_pair" in out and "rpo_alpha=1.0" in out
    buf = io.StringIO()
    print_collapse_warning(None, file=buf)
    assert buf.getvalue() == ""


# --------------------------------------------------------------------------------------------------
# HTML report

EVAL_TABLE = [
    {"metric": "demo pass rate", "before": 0.25, "after": 0.75, "n": 40, "before_ci": (0.142, 0.402),
     "after_ci": (0.598, 0.858)},
    {"metric": "win rate vs reference", "before": None, "after": 0.6125, "n": 40, "after_ci": (0.456, 0.748)},
]
SAMPLES = [
    {"prompt": [{"role": "user", "content": "Add 2 and 3 <b>now</b>"}], "reference": "It is 6 & more",
     "trained": "<script>alert('x')</script>5"},
    {"prompt": "Reverse 'abc'", "reference": "abc", "trained": "cba"},
]


def test_table_cells():
    assert table_cells(EVAL_TABLE[0]) == ["demo pass rate", "0.250", "0.750", "40", "[0.142, 0.402] → [0.598, 0.858]"]
    assert table_cells(EVAL_TABLE[1]) == ["win rate vs reference", "-", "0.613", "40", "[0.456, 0.748]"]


def test_write_report_contents_and_escaping(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(collapse=True), config_yaml="beta: 0.1\nnote: '<i>x</i>'\n")
    page_path = write_report(run, eval_table=EVAL_TABLE, samples=SAMPLES)
    assert page_path == run / "report.html"
    page = page_path.read_text(encoding="utf-8")
    # plots embedded, identical to the PNG files
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pngs = sorted((run / "plots").glob("*.png"))
    assert len(uris) == len(pngs) == len(PLOTS)
    assert {base64.b64decode(u) for u in uris} == {p.read_bytes() for p in pngs}
    # nothing external
    assert "http://" not in page and "https://" not in page and "<link" not in page
    # config read from config.yaml, escaped
    assert "beta: 0.1" in page and "&lt;i&gt;x&lt;/i&gt;" in page and "<i>x</i>" not in page
    # eval table, samples (escaped), warning box
    assert "demo pass rate" in page and "[0.598, 0.858]" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;5" in page and "<script>" not in page
    assert "user: Add 2 and 3 &lt;b&gt;now&lt;/b&gt;" in page and "It is 6 &amp; more" in page
    assert 'id="collapse-warning"' in page and "nca_pair" in page


def test_write_report_healthy_run_and_config_dict(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(collapse=False), config_yaml=None)
    page = write_report(run, config={"beta": 0.25, "output_dir": tmp_path / "run"}).read_text(encoding="utf-8")
    assert 'id="collapse-warning"' not in page
    assert "beta: 0.25" in page and 'id="eval-table"' not in page and 'id="samples"' not in page
    assert 'id="final-metrics"' in page


def test_write_report_without_metrics_or_config(tmp_path):
    page = write_report(tmp_path, samples=SAMPLES[1:]).read_text(encoding="utf-8")
    assert "no metrics file" in page and "no config given" in page and "cba" in page
    assert "data:image/png" not in page


# --------------------------------------------------------------------------------------------------
# GRPO runs

GRPO_FUNCS = ("accuracy_reward", "think_format_reward")


def grpo_rows(steps: int = 30, eval_every: int = 10, kl: bool = True, seed: int = 0) -> list[dict]:
    """GRPO train logs every step (TRL's metric names, two reward functions) and eval logs every
    `eval_every` steps. accuracy_reward rises 0.2 -> 0.8, think_format_reward stays near 0.5."""
    rng = random.Random(seed)
    rows = []
    for step in range(1, steps + 1):
        f = step / steps
        acc, fmt = 0.2 + 0.6 * f, 0.5 + rng.uniform(-0.05, 0.05)
        row = {"step": step, "epoch": round(f, 4), "loss": 0.01 * rng.uniform(-1, 1), "grad_norm": 1 + rng.random(),
               "learning_rate": 1e-6, "num_tokens": 4000.0 * step,
               "completions/mean_length": 60 - 20 * f, "completions/min_length": 10.0,
               "completions/max_length": 128.0, "completions/clipped_ratio": 0.3 * (1 - f),
               "completions/mean_terminated_length": 50 - 15 * f,
               f"rewards/{GRPO_FUNCS[0]}/mean": acc, f"rewards/{GRPO_FUNCS[0]}/std": 0.4,
               f"rewards/{GRPO_FUNCS[1]}/mean": fmt, f"rewards/{GRPO_FUNCS[1]}/std": 0.1,
               "reward": acc + fmt, "reward_std": 0.3, "frac_reward_zero_std": 0.5 * (1 - f),
               "entropy": 1.5 - f, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.01,
               "clip_ratio/region_mean": 0.01, "completions_per_second": 8.0, "tokens_per_second": 500.0}
        if kl:
            row["kl"] = 0.002 * step
        rows.append(row)
        if step % eval_every == 0:
            rows.append({"step": step, "epoch": round(f, 4), "eval_loss": 0.0, "eval_reward": acc + fmt + 0.05,
                         f"eval_rewards/{GRPO_FUNCS[0]}/mean": acc + 0.05, f"eval_rewards/{GRPO_FUNCS[0]}/std": 0.4,
                         "eval_completions/mean_length": 55 - 20 * f, **({"eval_kl": 0.002 * step} if kl else {})})
    return rows


def grpo_completions(rounds=(0, 1, 2), per_round: int = 6) -> list[dict]:
    return [{"step": 3 * r, "round": r, "prompt": [{"role": "user", "content": f"round {r} <q>{i // 3}</q>"}],
             "completion": f"answer r{r}c{i} & done", "rewards": {GRPO_FUNCS[0]: float(i % 2), GRPO_FUNCS[1]: None},
             "advantage": (i % 2 - 0.5) * 1.25}
            for r in rounds for i in range(per_round)]


def test_detect_algorithm():
    assert detect_algorithm(grpo_rows(steps=2)) == "grpo"
    assert detect_algorithm([{"step": 1, "loss": 0.1}], [{"step": 1, "eval_reward": 1.0}]) == "grpo"
    assert detect_algorithm([{"step": 1, "rewards/my_fn/mean": 0.5}]) == "grpo"
    assert detect_algorithm(synthetic_rows(collapse=True, steps=3)) == "dpo"  # rewards/chosen etc. are DPO's
    assert detect_algorithm([]) == "dpo"


@pytest.mark.parametrize("kl", [True, False])
def test_plot_metrics_grpo_panels(tmp_path, kl):
    import matplotlib.image as mpimg

    run = write_run(tmp_path / "run", grpo_rows(kl=kl), config_yaml=None)
    paths = plot_metrics(run)
    expected = [s for s, *_ in GRPO_PLOTS if s != "dynamic_sampling" and (kl or s != "kl")]
    assert [p.stem for p in paths] == expected
    for p in paths:
        assert png_size(p.read_bytes()) == (640, 360) and mpimg.imread(p).std() > 0.01
    # DPO's panels drawn on the same run find only the shared loss / learning rate / grad norm
    assert [p.stem for p in plot_metrics(run, out_dir=tmp_path / "as_dpo", algorithm="dpo")] == [
        "loss", "learning_rate", "grad_norm"]
    with pytest.raises(ValueError, match="algorithm='ppo'.*dpo, grpo"):
        plot_metrics(run, algorithm="ppo")


def test_reward_plot_has_one_curve_and_band_per_function(tmp_path, monkeypatch):
    """The reward panel draws `reward` plus one line per rewards/<fn>/mean, eval markers, and one
    ± std band per function (around that function's mean); checked through the calls matplotlib got."""
    from matplotlib.axes import Axes

    legends, bands = {}, {}
    real_legend, real_fill = Axes.legend, Axes.fill_between

    def spy_legend(self, *args, **kwargs):
        legends[self.get_title()] = self.get_legend_handles_labels()[1]
        return real_legend(self, *args, **kwargs)

    def spy_fill(self, x, lo, hi, **kwargs):
        bands.setdefault(id(self), []).append((list(x), list(lo), list(hi)))
        return real_fill(self, x, lo, hi, **kwargs)

    monkeypatch.setattr(Axes, "legend", spy_legend)
    monkeypatch.setattr(Axes, "fill_between", spy_fill)
    rows = grpo_rows(steps=6, eval_every=3)
    plot_metrics(write_run(tmp_path, rows))
    title = "Reward (mean over the batch's completions)\n(shaded: train mean ± std)"
    fa, ff = (f"rewards/{n}/mean" for n in GRPO_FUNCS)
    assert legends[title] == ["train reward", "eval reward", f"train {fa}", f"eval {fa}", f"train {ff}"]
    assert "Importance-ratio clipping" in legends and "KL to the reference policy" in legends
    (drawn,) = bands.values()  # only the reward panel has bands
    train = [r for r in rows if "reward" in r]
    assert drawn == [([float(r["step"]) for r in train], [r[m] - r[m[:-4] + "std"] for r in train],
                      [r[m] + r[m[:-4] + "std"] for r in train]) for m in (fa, ff)]


def test_reward_table_first_vs_last_logs():
    train = [r for r in grpo_rows(steps=30) if "reward" in r]
    header, rows = reward_table(train)
    assert header == ["metric", "first 10 logs (mean)", "last 10 logs (mean)", "change"]
    table = {r[0]: r[1:] for r in rows}
    assert list(table) == ["reward", f"rewards/{GRPO_FUNCS[0]}/mean", f"rewards/{GRPO_FUNCS[1]}/mean"]
    # accuracy 0.2 + 0.6·step/30: steps 1..10 average 0.2 + 0.6·5.5/30 = 0.31, steps 21..30 0.71
    assert table[f"rewards/{GRPO_FUNCS[0]}/mean"] == ["0.310", "0.710", "+0.400"]
    # fewer than 20 logs: the windows shrink so they do not overlap
    assert reward_table(train[:6])[0][1] == "first 3 logs (mean)"
    assert reward_table([{"step": 1, "loss": 0.2}])[1] == []


def test_read_completions_first_and_last_round(tmp_path):
    assert read_completions(tmp_path) == []
    rows = grpo_completions(rounds=(0, 1, 2), per_round=6)
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    picked = read_completions(tmp_path, per_round=4)
    assert [(r["round"], r["completion"]) for r in picked] == (
        [(0, f"answer r0c{i} & done") for i in range(4)] + [(2, f"answer r2c{i} & done") for i in range(4)])
    (tmp_path / "completions.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    assert read_completions(tmp_path) == rows[:1]  # one round: shown once


@pytest.mark.parametrize("kl", [True, False])
def test_write_report_grpo_run(tmp_path, kl):
    run = write_run(tmp_path / "run", grpo_rows(kl=kl), config_yaml="loss_type: dapo\nnum_generations: 4\nbeta: 0.0\n")
    rows = grpo_completions()
    (run / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    page = write_report(run).read_text(encoding="utf-8")
    expected = [s for s, *_ in GRPO_PLOTS if s != "dynamic_sampling" and (kl or s != "kl")]
    assert sorted(p.stem for p in (run / "plots").glob("*.png")) == sorted(expected)
    alts = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)"', page)
    assert alts == expected
    assert "GRPO run: 30 train logs, 3 eval logs" in page and 'id="collapse-warning"' not in page
    # the reward table and the final metrics name the GRPO metrics
    assert 'id="reward-table"' in page and f"rewards/{GRPO_FUNCS[0]}/mean" in page and "+0.400" in page
    for name in ("frac_reward_zero_std", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean"):
        assert f"<td>{name}</td>" in page
    assert ("<td>kl</td>" in page) == kl
    # logged completions: first and last round, escaped, with rewards and advantage
    assert 'id="completions"' in page
    assert "user: round 0 &lt;q&gt;0&lt;/q&gt;" in page and "answer r2c3 &amp; done" in page
    assert "answer r1c0" not in page and "answer r0c4" not in page
    assert f"{GRPO_FUNCS[0]} = 1.000\n{GRPO_FUNCS[1]} = -" in page and "<td>0.625</td>" in page
    assert "loss_type: dapo" in page


def test_write_report_grpo_without_completions_and_dynamic_sampling(tmp_path):
    rows = grpo_rows(steps=8, eval_every=100)
    for r in rows:
        r.update({"dynamic_sampling/resample_rounds": 1.0, "dynamic_sampling/generated_groups": 6.0,
                  "dynamic_sampling/frac_filled_zero_std": 0.25})
    run = write_run(tmp_path / "run", rows, config_yaml=None)
    page = write_report(run).read_text(encoding="utf-8")
    assert (run / "plots" / "dynamic_sampling.png").is_file() and 'alt="dynamic_sampling"' in page
    assert 'id="completions"' not in page and 'id="reward-table"' in page


def test_collapse_check_skips_grpo_rows():
    assert detect_likelihood_collapse([r for r in grpo_rows() if "loss" in r]) is None


# --------------------------------------------------------------------------------------------------
# The page in a real browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


class _DomSummary(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.warning = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag == "table":
            self.tables.append(attrs.get("id"))
        if attrs.get("id") == "collapse-warning":
            self.warning = True


def _chromium(args: list[str], user_data_dir: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_data_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium not installed (scripts/install_chromium.sh installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image as mpimg

    assert CHROMIUM is not None, "CI is set but chromium is missing: run scripts/install_chromium.sh"
    run = write_run(tmp_path / "run", synthetic_rows(collapse=True))
    url = write_report(run, eval_table=EVAL_TABLE, samples=SAMPLES).resolve().as_uri()

    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    summary = _DomSummary()
    summary.feed(dom.stdout)
    assert len(summary.imgs) == len(PLOTS) and all(s.startswith("data:image/png;base64,") for s in summary.imgs)
    assert {"final-metrics", "eval-table", "samples"} <= set(summary.tables) and summary.warning
    assert "<script>" not in dom.stdout  # the escaped sample stayed text

    shot = tmp_path / "page.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", url], tmp_path / "profile-shot")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert png_size(shot.read_bytes()) == (1280, 2000)
    img = mpimg.imread(shot)[..., :3]  # (2000, 1280, 3) floats in [0, 1]
    assert img.std() > 0.05  # text, tables and plots, not a blank page
    dark = (img.mean(axis=-1) < 0.5).mean()
    assert 0.001 < dark < 0.5
