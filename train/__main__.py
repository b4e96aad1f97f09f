"""``python -m train``: the training command line, one parser built from the command modules in ``train/commands/``.

Commands (each in train/commands/<name>.py, which runs the library module named here):
    [cv]        cross-validated QLoRA multilabel training, the default    train/run.py
    dapt        domain-adaptive pretraining on unlabelled text            train/dapt.py
    tfidf       TF-IDF + logistic-regression baseline, same folds         train/tfidf_run.py
    distill     a student learning from teacher runs' soft targets        train/run.py + train/distill.py
    trim-vocab  shrink the embedding matrix to the corpus                 train/vocab.py
    prune       drop decoder layers / MLP channels by importance          train/prune.py
    holdout     set labelled rows aside (inner.csv / outer.csv)           train/data.py
    merge       fold adapters (and seeds) merged into one adapter         train/merge.py
    pipeline    the best pipeline in one command (trim-vocab .. submit)   train/pipeline.py

Usage:
    python -m train --config configs/gemma-3-270m/qlora.yaml [--set train.lr=1e-4 --set cv.folds=[0]] [--resume]
    torchrun --nproc_per_node 2 -m train --config configs/gemma-2-9b/qlora.yaml      # DDP, one 4-bit copy per GPU
    python -m train --config configs/gemma-3-270m/qlora.yaml --print-config          # resolved config, no training
    python -m train COMMAND -h                                                       # a command's options

Exit status: 0 on success, 2 on bad input (config, data, paths), 1 when training fails.
"""

from __future__ import annotations

import argparse
import sys

from core.cli import run_command, setup_logging
from train.commands import cv, dapt, distill, holdout, merge, pipeline, prune, tfidf, trim_vocab

COMMANDS = (cv, dapt, tfidf, distill, trim_vocab, prune, holdout, merge, pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None, callbacks=None) -> int:
    """Run the command line; ``callbacks`` (a :class:`train.callbacks.Callbacks`) are handed to the training recipe
    (tests inject a hard kill after a checkpoint this way)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["cv", *argv]  # no command name: `python -m train --config X` is the cross-validated training
    args = build_parser().parse_args(argv)
    args.callbacks = callbacks
    setup_logging(args.verbose)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
