"""``python -m infer audit``: duplicates, conflicting labels, likely label errors and empty rows of a labelled CSV
(the work: :mod:`infer.audit`; what each reason means: docs/audit.md).

Usage:
    python -m infer audit --labels train.csv [--oof RUN/oof.csv] [--test test.csv] [--config CFG] [--drop R,R]
        --out DIR
"""

from __future__ import annotations

import argparse
import logging

from core.cli import add_verbose_argument
from core.config import RunConfig, add_config_arguments, apply_override
from core.decoding import run_config_of
from core.errors import InputError
from core.io import check_out_dir
from infer.audit import (
    DROP_REASONS,
    NEAR_THRESHOLD,
    ON_CHOICES,
    check_drop,
    check_out_folder,
    run_audit,
    summary_lines,
)

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "audit", help="duplicates, conflicting labels, likely label errors and empty rows of a labelled CSV",
        description="Flag exact and near duplicate texts (within the labelled CSV and against --test), duplicates "
                    "whose labels conflict, rows whose text is empty or only punctuation, and (with --oof) likely "
                    "label errors by cleanlab's confident learning. Writes DIR/flagged.csv, DIR/summary.json, "
                    "DIR/audit.png and two files to train on (data.train_labels_csv of python -m train): "
                    "DIR/train_labels_dropped.csv (the rows flagged for none of --drop) and "
                    "DIR/train_labels_majority.csv (exact duplicates given their group's majority). The id, text "
                    "template and label columns come from the config's data section (--config; else the run config "
                    "beside --oof; else the defaults).")
    p.add_argument("--labels", required=True, help="labelled CSV (e.g. train.csv)")
    p.add_argument("--oof", help="out-of-fold probabilities of the same rows (e.g. RUN/oof.csv): adds label issues")
    p.add_argument("--test", help="unlabelled CSV (e.g. test.csv): its rows that duplicate labelled ones")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier audit's: replaced)")
    p.add_argument("--on", choices=ON_CHOICES, default="text",
                   help="compare the template's text field (default) or the whole prompt the model sees")
    p.add_argument("--near-threshold", type=float, default=NEAR_THRESHOLD,
                   help="cosine similarity (character 3-5-gram TF-IDF) from which two different texts are near "
                        "duplicates (default %(default)s)")
    p.add_argument("--drop", default=",".join(DROP_REASONS), metavar="REASON[,REASON]",
                   help="the reasons that leave a row out of train_labels_dropped.csv (default %(default)s: "
                        "duplicates whose labels agree stay)")
    add_config_arguments(p)
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """``--config`` (with ``--set``), else the run config of ``--oof`` (``--set`` applied to it), else defaults."""
    if args.config or not args.oof:
        return RunConfig.from_yaml(args.config, args.overrides), args.config or "<defaults>"
    cfg, source = run_config_of(args.oof)
    if cfg is None:
        logger.info(f"note: {args.oof}: {source}; using the default data section (pass --config)")
        return RunConfig.from_yaml(None, args.overrides), "<defaults>"
    if not args.overrides:
        return cfg, source
    raw = cfg.to_dict()
    for item in args.overrides:
        apply_override(raw, item)
    return RunConfig.from_dict(raw, source), source


def run(args: argparse.Namespace) -> int:
    cfg, source = resolve_config(args)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if not 0.0 < args.near_threshold <= 1.0:
        raise InputError(f"--near-threshold must be in (0, 1], got {args.near_threshold}")
    drop = check_drop([r.strip() for r in args.drop.split(",") if r.strip()])
    check_out_dir(args.out, "--out")
    check_out_folder(args.out)
    result = run_audit(args.labels, args.out, cfg, source, oof=args.oof, test=args.test, on=args.on,
                       near_threshold=args.near_threshold, drop=drop)
    logger.info("\n".join(summary_lines(result, args.out)))
    return 0
