"""``python -m infer predict``: probabilities for a CSV from trained adapter(s) (the work: :mod:`infer.predict`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.io import check_out_file
from infer.predict import predict


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="probabilities for a CSV from trained adapter(s)",
        description="Probabilities for an unlabelled CSV from one or more adapters (a fold adapter folder, a run "
                    "folder = all its folds, or a Hub id already pulled); several are averaged.")
    p.add_argument("--adapter", required=True, action="append", metavar="A[,B,...]",
                   help="adapter folder, run folder or Hub id (comma-separated or repeated for an ensemble)")
    p.add_argument("--input", required=True, help="CSV with the id column and the prompt template's columns")
    p.add_argument("--out", required=True, help="probability CSV to write (index + one column per label)")
    p.add_argument("--weights", help="comma-separated ensemble weights, one per --adapter value (default equal)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--labels-like", help="labelled CSV whose label columns the adapters must match")
    p.add_argument("--base-model", help="local folder of the base model (overrides the adapter's run_config)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)  # before any model loads
    adapters = [a for value in args.adapter for a in value.split(",") if a.strip()]
    predict(adapters, args.input, args.out, weights=args.weights, batch_size=args.batch_size,
            progress=not args.no_progress, labels_like=args.labels_like, device=args.device,
            base_model=args.base_model)
    return 0
