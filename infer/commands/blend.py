"""``python -m infer blend``: blend models' probabilities with weights tuned on out-of-fold predictions (the work:
:mod:`infer.blend`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.errors import InputError
from core.io import check_out_file
from core.metrics import OBJECTIVES
from infer.blend import DEFAULT_TRIALS, run_blend


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "blend", help="blend models' probabilities with weights tuned on out-of-fold predictions",
        description="Weighted mean of probability files; weights tuned (Optuna, seeded) on the models' out-of-fold "
                    "files against the labels. Writes the blended probabilities (+ .meta.json with the weights).")
    p.add_argument("--probs", help="comma-separated probability files to blend (e.g. test predictions); "
                                   "without it, blend only measures the blend on the OOF rows")
    p.add_argument("--oof", required=True, help="comma-separated out-of-fold files of the same models, same order")
    p.add_argument("--labels", required=True, help="labelled CSV for the OOF ids (e.g. train.csv)")
    p.add_argument("--out", help="blended probability file (default: blend.csv beside the first --probs file)")
    p.add_argument("--out-oof", help="also write the blended out-of-fold file (to tune thresholds on)")
    p.add_argument("--objective", choices=OBJECTIVES, default="exact_match")
    p.add_argument("--n-trials", type=int, default=DEFAULT_TRIALS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-column",
                   help="id column of the labelled / --ids CSV (default: the run's data.id_column, else index)")
    p.add_argument("--fallback", help="for rows no threshold selects: a label name, a class id, 'argmax' or 'none' "
                                      "(default: decode.fallback of the run that wrote the file, else argmax)")
    p.add_argument("--folds", help="folds CSV (index, fold) for the nested estimate (default: RUN/folds.csv beside "
                                   "the first --oof file, else a seeded K-fold)")
    p.add_argument("--kfold", type=int, default=5, help="folds of the fallback split")
    p.add_argument("--no-nested", action="store_true", help="skip the nested estimate")
    p.add_argument("--tune-decoding", choices=("cascade", "sets"),
                   help="the nested estimate also tunes the decoding on each fold's blended training rows (as tune "
                        "--strategy) and scores the left-out fold with it: the honest figure of blend + tune")
    p.add_argument("--no-progress", action="store_true")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.n_trials < 1:
        raise InputError(f"--n-trials must be >= 1, got {args.n_trials}")
    check_out_file(args.out)
    check_out_file(args.out_oof, "--out-oof")
    run_blend(args.probs, args.oof, args.labels, args.out, args.out_oof, args.objective, args.n_trials,
              args.seed, args.fallback, folds=args.folds, kfolds=args.kfold, nested=not args.no_nested,
              progress=not args.no_progress, id_column=args.id_column,
              tune_decoding=args.tune_decoding)
    return 0
