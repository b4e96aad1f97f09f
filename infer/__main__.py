"""``python -m infer``: the inference command line.

Subcommands (each one module of ``infer/commands/``: its arguments, and the library call it makes):
    predict   probabilities for a CSV from trained adapter(s)             (infer/commands/predict.py)
    push      upload a trained run to the Hugging Face Hub                (infer/commands/push.py)
    pull      download a pushed run into the Hugging Face cache           (infer/commands/pull.py)
    tune      tune the cascade decoding on out-of-fold probabilities      (infer/commands/tune.py)
    submit    write the index,target submission from a probability file   (infer/commands/submit.py)
    evaluate  metrics table + plots of a probability file against labels  (infer/commands/evaluate.py)
    blend     blend models with weights tuned on out-of-fold predictions  (infer/commands/blend.py)
    serve     HTTP API over trained adapter(s), micro-batched             (infer/commands/serve.py)
    export    merge one adapter into its base: a plain transformers folder (infer/commands/export.py)
    ui        web UI (Streamlit) for one adapter: a review form and a CSV tab (infer/commands/ui.py)
    audit     duplicates, label conflicts, likely label errors, empty rows  (infer/commands/audit.py)

Exit status: 0 on success, 2 on bad input (``error: <message>`` on stderr; nothing is written).
"""

from __future__ import annotations

import argparse
import sys

from core.cli import run_command, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from infer.commands import audit, blend, evaluate, export, predict, pull, push, serve, submit, tune, ui

    parser = argparse.ArgumentParser(prog="python -m infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (predict, push, pull, tune, submit, evaluate, blend, serve, export, ui, audit):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
