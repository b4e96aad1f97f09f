"""``python -m infer submit``: the ``index,target`` submission CSV from a probability file (the work:
:mod:`infer.submit`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.io import check_out_file
from infer.submit import FORMATS, submit


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "submit", help="write index,target submission CSV from a probability file",
        description="Decode a probability file (tuned thresholds or the default cascade) into the competition's "
                    "index,target format (target = space-separated class ids), same ids and order.")
    p.add_argument("--probs", required=True, help="probability CSV (python -m infer predict)")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--thresholds", help="thresholds.json from python -m infer tune (default: the reference cascade)")
    p.add_argument("--id-column",
                   help="id column of the labelled / --ids CSV (default: the run's data.id_column, else index)")
    p.add_argument("--fallback", help="for rows no threshold selects: a label name, a class id, 'argmax' or 'none' "
                                      "(default: decode.fallback of the run that wrote the file, else argmax)")
    p.add_argument("--ids", help="CSV (e.g. test.csv) whose id column the rows must match, in order")
    p.add_argument("--format", choices=FORMATS, help="after the id column: target = space-separated class ids, "
                                                     "names = space-separated label names, onehot = a 0/1 column "
                                                     "per label (default: the run's data.submission_format)")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    submit(args.probs, args.out, args.thresholds, args.fallback, args.ids, id_column=args.id_column, fmt=args.format)
    return 0
