"""``python -m train distill``: a student run learning from teacher runs' soft targets (the rules:
:mod:`train.distill`; the student trains with :mod:`train.run`). ``--teacher`` / ``--teacher-weights`` /
``--unlabelled`` also serve ``python -m train tfidf``."""

from __future__ import annotations

import argparse
import json

from core.cli import add_verbose_argument
from core.config import RunConfig, add_config_arguments
from core.errors import InputError
from train import distill
from train.commands.cv import add_final_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="a student learning from teacher runs' soft targets",
                              description=distill.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    add_teacher_arguments(p)
    add_final_argument(p)
    p.add_argument("--resume", action="store_true", help="continue the student run in output_dir")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A student run with ``distill.*`` from the command line (see :mod:`train.distill`)."""
    overrides = teacher_overrides(args) + (["cv.final=true"] if args.final else [])
    cfg = RunConfig.from_yaml(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if not cfg.distill.teachers:
        raise InputError("python -m train distill needs --teacher RUN[,RUN2...] (or distill.teachers)")
    from train.run import main  # torch and transformers load here, not when the parser is built

    main(cfg, resume=args.resume, callbacks=args.callbacks)
    return 0


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    """``--teacher``, ``--teacher-weights``, ``--unlabelled``: the ``distill`` section from the command line (``train
    distill`` and ``train tfidf``)."""
    p.add_argument("--teacher", help="teacher run folder(s), comma-separated (sets distill.teachers)")
    p.add_argument("--teacher-weights", help="one weight per teacher, comma-separated (distill.teacher_weights)")
    p.add_argument("--unlabelled", help="CSV of unlabelled rows for the soft term (distill.unlabelled_csv)")


def teacher_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides of ``args.overrides`` followed by those of :func:`add_teacher_arguments`."""
    overrides = list(args.overrides)
    if args.teacher:
        overrides.append("distill.teachers=" + json.dumps([t for t in args.teacher.split(",") if t.strip()]))
    if args.teacher_weights:
        overrides.append("distill.teacher_weights=" + json.dumps(_floats(args.teacher_weights, "--teacher-weights")))
    if args.unlabelled:
        overrides.append("distill.unlabelled_csv=" + json.dumps(args.unlabelled))
    return overrides


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None
