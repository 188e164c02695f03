"""Command line: preftune train | grpo | eval | precompute-ref | merge | losses | report | data demo | --version.

`preftune train` with no arguments runs DPO on the embedded SmolLM2-135M-Instruct with the bundled
demo preference data. Every DPOConfig field is a flag (`preftune train --help` lists them);
`--config FILE.yaml` loads a file and flags override it.
"""

from __future__ import annotations

import argparse
import logging
import sys

USAGE = """preftune <command> [options]

commands:
  train            train with DPO (no arguments: embedded default model + bundled demo data)
  grpo             train with GRPO (no arguments: embedded default model + bundled demo prompts and
                   their verifiers as rewards); --reward NAME|module:fn, repeatable
  eval             reward metrics and generation-based evaluation of a trained model
  precompute-ref   run only the reference log-prob pass into the on-disk cache
  merge RUN_DIR --out DIR   merge a LoRA run's adapters into a full Hugging Face model
  losses           list every preference loss with its parameters and defaults
  report RUN_DIR   write plots and an HTML report from a run directory
  data demo --out DIR   write the bundled demo preference data as JSONL

  --version        print preftune's version
"""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate.utils.other"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(argv: list[str]) -> int:
    from preftune.config import DPOConfig
    from preftune.run import train

    config, extras = DPOConfig.parse_cli(argv, prog="preftune train", use_demo_defaults_when_empty=True)
    # --eval_dataset is the command line's own way to name an eval set: it is used (at the end of training)
    # unless an eval_strategy says otherwise, where the Python API keeps eval_strategy="no" as it is
    eval_at_end = config.eval_dataset is not None and "eval_strategy" not in extras.fields_set
    train(config, eval_at_end=eval_at_end)
    return 0


def cmd_grpo(argv: list[str]) -> int:
    from preftune.grpo.config import GRPOConfig

    config, _ = GRPOConfig.parse_cli(argv, prog="preftune grpo", use_demo_defaults_when_empty=True)
    from preftune.grpo.run import train

    train(config)
    return 0


def cmd_precompute_ref(argv: list[str]) -> int:
    from preftune.config import DPOConfig
    from preftune.data.pipeline import FROM_CONFIG
    from preftune.trainer import DPOTrainer

    config, _ = DPOConfig.parse_cli(argv, prog="preftune precompute-ref", use_demo_defaults_when_empty=True)
    config.precompute_ref_log_probs = True
    trainer = DPOTrainer(args=config, train_dataset=FROM_CONFIG)
    trainer.reference = trainer._build_reference()
    print(f"reference log-probs cached for {len(trainer.train_split)} train pairs"
          + (f" and {len(trainer.eval_split)} eval pairs" if trainer.eval_split is not None else ""))
    return 0


def cmd_losses(argv: list[str]) -> int:
    from preftune.losses import describe_losses

    print(describe_losses())
    return 0


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="preftune report", description="plots and an HTML page from a run directory")
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    from preftune.report import detect_likelihood_collapse, print_collapse_warning, read_metrics, write_report

    path = write_report(a.run_dir)
    train_rows, _ = read_metrics(a.run_dir)
    print_collapse_warning(detect_likelihood_collapse(train_rows))
    print(f"report: {path}")
    return 0


def cmd_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="preftune data", description="bundled data utilities")
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo", help="write the bundled demo preference data as JSONL")
    d.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    from preftune.data.demo import write_demo

    for path in write_demo(a.out).values():
        print(path)
    return 0


def cmd_merge(argv: list[str]) -> int:
    from preftune.merge import MERGE_DTYPES, merge_run

    p = argparse.ArgumentParser(
        prog="preftune merge", description="merge a LoRA run's adapters into its base model: a full Hugging Face "
        "model folder (safetensors, tokenizer, model card) that transformers loads without peft")
    p.add_argument("run_dir", help="the output_dir of a run trained with use_peft (or a checkpoint's model/ folder)")
    p.add_argument("--out", required=True, help="new folder for the merged model (must not exist or be empty)")
    p.add_argument("--base_model", default=None, help="the adapters' base model (default: the one the run loaded, "
                   "from adapter_config.json or the run's config.yaml)")
    p.add_argument("--dtype", default="float32", choices=MERGE_DTYPES,
                   help="dtype of the saved weights (the merge runs in float32)")
    a = p.parse_args(argv)
    out = merge_run(a.run_dir, a.out, base_model=a.base_model, dtype=a.dtype)
    print(f"merged model: {out.resolve()}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from preftune.evaluate_cli import run_eval_cli

    return run_eval_cli(argv)


COMMANDS = {
    "train": cmd_train,
    "grpo": cmd_grpo,
    "eval": cmd_eval,
    "precompute-ref": cmd_precompute_ref,
    "merge": cmd_merge,
    "losses": cmd_losses,
    "report": cmd_report,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from preftune import __version__

        print(f"preftune {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"preftune: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging("--verbose" in rest)
    rest = [a for a in rest if a != "--verbose"]
    try:
        return COMMANDS[cmd](rest) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"preftune {cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
