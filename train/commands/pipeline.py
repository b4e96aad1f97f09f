"""``python -m train pipeline``: the best pipeline in one command, each step the documented command in a subprocess
(the steps, when one is skipped or redone, and the layout of ``RUN``: :mod:`train.pipeline`).

Usage:
    python -m train pipeline --config configs/gemma-3-270m/pipeline.yaml --set train_csv=train.csv \\
        --test test.csv --out runs/best                      # trim-vocab, DAPT, CV, TF-IDF, blend, tune, submit
    python -m train pipeline --config PIPELINE.yaml --test test.csv --out RUN --dry-run   # what would run, and why
    python -m train pipeline --config PIPELINE.yaml --out RUN --print-config              # the resolved config

Run it again to continue: finished steps are skipped, a half-done CV or DAPT resumes. It ends with a table of every
step (status, time, figure).

Exit status: 0 on success, 2 on bad input (config, paths, finished work the pipeline would throw away), 1 when a
step fails (the message names the step and its log).
"""

from __future__ import annotations

import argparse
import sys

from core.cli import add_verbose_argument
from core.errors import TrainingError


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the best pipeline in one command (trim-vocab .. submit)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="pipeline YAML (configs/*/pipeline.yaml); default: every field's default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline config value, e.g. --set tfidf.enabled=true --set 'cv.seeds=[42,7]' "
                        "(repeatable; the run config's own: --set 'overrides=[train.num_epochs=3]')")
    p.add_argument("--print-config", action="store_true", help="print the resolved pipeline config and exit")
    p.add_argument("--test", help="CSV to predict and submit (sets test_csv)")
    p.add_argument("--out", required=True, help="the pipeline's folder (every step's output, logs, pipeline.json)")
    p.add_argument("--dry-run", action="store_true", help="print what each step would do and its command; run nothing")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from train import pipeline

    overrides = list(args.overrides) + ([f"test_csv={json.dumps(args.test)}"] if args.test else [])
    cfg = pipeline.PipelineConfig.from_yaml(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    actions, results = pipeline.run_pipeline(cfg, args.out, echo=echo, dry_run=args.dry_run)
    if args.dry_run:
        for i, a in enumerate(actions, 1):
            print(f"[{i}/{len(actions)}] {a.step.name}: {a.do}" + (f" ({a.why})" if a.why else ""))
            print(f"    {pipeline.display_command(a.step.argv)}")
        return 0
    print("\n" + pipeline.format_table(results))
    failed = pipeline.failure(results)
    if failed is not None:
        raise TrainingError(f"step {failed.name} failed ({failed.figure}); its log: {failed.log}")
    return 0
