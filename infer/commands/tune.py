"""``python -m infer tune``: tune the cascade (or set) decoding on out-of-fold probabilities.

The work is :func:`core.tuning.run_tune`; the search itself is :mod:`core.threshold_search`.

Usage:
    python -m infer tune --oof RUN/oof.csv --labels train.csv --out thresholds.json [--folds RUN/folds.csv]
                         [--strategy sets]
"""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.decoding import STRATEGIES
from core.errors import InputError
from core.io import check_out_file
from core.metrics import OBJECTIVES
from core.threshold_search import DEFAULT_KFOLD, DEFAULT_SHRINK, DEFAULT_TRIALS
from core.tuning import run_tune


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="tune the cascade (or set) decoding on out-of-fold probabilities",
        description="Tune the cascade's start/stop/step (Optuna, seeded) and shrunk per-class offsets on out-of-fold "
                    "probabilities; print an honest nested estimate of the gain and write thresholds.json.")
    p.add_argument("--oof", required=True, help="out-of-fold probability CSV (e.g. RUN/oof.csv)")
    p.add_argument("--labels", required=True, help="labelled CSV with the same ids (e.g. train.csv)")
    p.add_argument("--out", required=True, help="thresholds JSON to write")
    p.add_argument("--folds", help="folds CSV (index, fold) for the nested estimate (default: RUN/folds.csv beside "
                                   "the OOF file, a 'fold' column, else a seeded K-fold split)")
    p.add_argument("--objective", choices=OBJECTIVES, default="exact_match")
    p.add_argument("--n-trials", type=int, default=DEFAULT_TRIALS, help="Optuna trials for start/stop/step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-column",
                   help="id column of the labelled / --ids CSV (default: the run's data.id_column, else index)")
    p.add_argument("--fallback", help="for rows no threshold selects: a label name, a class id, 'argmax' or 'none' "
                                      "(fixed; default: tuned, decode.fallback of the run that wrote the file or "
                                      "argmax, whichever scores better)")
    p.add_argument("--no-per-class", action="store_true", help="tune only the global cascade")
    p.add_argument("--shrink", type=float, default=DEFAULT_SHRINK,
                   help="k of the per-class shrinkage n_pos / (n_pos + k) (0 = none)")
    p.add_argument("--kfold", type=int, default=DEFAULT_KFOLD, help="folds of the fallback split")
    p.add_argument("--strategy", choices=STRATEGIES, default="cascade",
                   help="sets: also tune set decoding (label sets seen in the labels, with a prior; the tuned "
                        "cascade's set a candidate), report it beside the cascades and write it")
    p.add_argument("--no-nested", action="store_true", help="skip the nested estimate")
    p.add_argument("--no-progress", action="store_true")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.shrink < 0:
        raise InputError(f"--shrink must be >= 0, got {args.shrink}")
    if args.kfold < 2:
        raise InputError(f"--kfold must be >= 2, got {args.kfold}")
    check_out_file(args.out)
    run_tune(args.oof, args.labels, args.out, folds=args.folds, objective=args.objective,
             n_trials=args.n_trials, seed=args.seed, fallback=args.fallback, per_class=not args.no_per_class,
             shrink=args.shrink, kfolds=args.kfold, nested=not args.no_nested, progress=not args.no_progress,
             id_column=args.id_column, strategy=args.strategy)
    return 0
