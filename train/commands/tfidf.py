"""``python -m train tfidf``: the TF-IDF + logistic-regression baseline on a run's folds, or the cheapest distilled
student (the run: :mod:`train.tfidf_run`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument, module_doc
from core.config import RunConfig, add_config_arguments
from core.errors import InputError
from train.commands.distill import add_teacher_arguments, teacher_overrides


def register(subparsers) -> None:
    p = subparsers.add_parser("tfidf", help="TF-IDF + logistic-regression baseline, same folds",
                              description=module_doc("train.tfidf_run"), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--folds", help="folds CSV (index, fold), e.g. an LLM run's folds.csv; default: the config's split")
    p.add_argument("--test", help="unlabelled CSV to predict with a model fitted on all labelled rows")
    p.add_argument("--C", dest="c", type=float, default=4.0, help="inverse L2 regularisation of the regressions")
    add_teacher_arguments(p)
    p.add_argument("--targets-from", metavar="DIR", help="distillation: reuse the teacher target files of an earlier "
                   "run's teachers/ folder (each checked against its teacher and rows)")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_yaml(args.config, teacher_overrides(args))
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if args.targets_from and not cfg.distill.teachers:
        raise InputError("--targets-from needs --teacher (a distilled student)")
    from train import tfidf_run

    tfidf_run.main(cfg, args.out, args.folds, args.test, args.c, targets_from=args.targets_from)
    return 0
