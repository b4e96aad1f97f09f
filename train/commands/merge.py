"""``python -m train merge``: the fold adapters of one or more runs (seeds) merged into one adapter folder (the
work: :mod:`train.merge`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.io import check_out_dir
from train import merge


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge fold adapters (and seeds) into one adapter",
                              description=merge.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", dest="runs", action="append", default=[], required=True, metavar="RUN",
                   help="run folder of python -m train: every finished fold adapter (repeatable: seeds)")
    p.add_argument("--method", choices=merge.METHODS, default="cat",
                   help="cat: the exact mean of the LoRA deltas at rank n x r (default); svd: rank r, approximate")
    p.add_argument("--out", required=True, help="adapter folder to create (must not exist)")
    p.add_argument("--device", help="torch device for the merge (default: cuda if available, else cpu)")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out, "--out", must_not_exist=True)
    merge.merge(args.runs, args.out, method=args.method, device=args.device)
    return 0
