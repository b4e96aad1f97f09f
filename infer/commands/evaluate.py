"""``python -m infer evaluate``: metrics table and plots of a probability file against labels (the work:
:mod:`infer.evaluate`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.errors import InputError
from core.io import check_out_dir
from infer.evaluate import evaluate


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="metrics table and plots of a probability file against labels",
        description="Exact match and micro/macro/weighted F1 of 0.5 thresholding, the default cascade and tuned "
                    "thresholds; exact match by true label count and rare vs frequent classes' mean F1; per-class "
                    "F1 bar chart, score-vs-threshold curve and reliability (calibration) diagram as PNG, metrics as "
                    "JSON.")
    p.add_argument("--probs", required=True, help="probability CSV (e.g. RUN/oof.csv)")
    p.add_argument("--labels", required=True, help="labelled CSV with the same ids")
    p.add_argument("--thresholds", help="thresholds.json from python -m infer tune")
    p.add_argument("--out-dir", help="folder for the PNGs and the metrics JSON (default: beside --probs)")
    p.add_argument("--id-column",
                   help="id column of the labelled / --ids CSV (default: the run's data.id_column, else index)")
    p.add_argument("--fallback", help="for rows no threshold selects: a label name, a class id, 'argmax' or 'none' "
                                      "(default: decode.fallback of the run that wrote the file, else argmax)")
    p.add_argument("--baseline", help="another probability CSV with the same rows: prints the paired exact-match "
                                      "difference with a 95%% bootstrap interval")
    p.add_argument("--rare-max-prevalence", type=float, default=0.01,
                   help="a class is rare when at least one and at most this fraction of the rows have it: the "
                        "rare classes' mean F1 is printed beside the frequent ones' (default: 0.01)")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not 0 < args.rare_max_prevalence <= 1:
        raise InputError(f"--rare-max-prevalence must be in (0, 1], got {args.rare_max_prevalence}")
    check_out_dir(args.out_dir)
    evaluate(args.probs, args.labels, args.thresholds, args.out_dir, args.fallback, baseline=args.baseline,
             id_column=args.id_column, rare_max_prevalence=args.rare_max_prevalence)
    return 0
