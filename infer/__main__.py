"""``python -m infer``: the inference command line.

Subcommands:
    predict   probabilities for a CSV from trained adapter(s)           (infer/predict.py)
    push      upload a trained run to the Hugging Face Hub              (infer/hub.py)
    pull      download a pushed run into the Hugging Face cache         (infer/hub.py)
    tune      tune the cascade decoding on out-of-fold probabilities    (infer/commands/tune.py)
    submit    write the index,target submission from a probability file (infer/submit.py)
    evaluate  metrics table + plots of a probability file against labels (infer/evaluate.py)
    blend     blend models with weights tuned on out-of-fold predictions (infer/blend.py)
    serve     HTTP API over trained adapter(s), micro-batched               (infer/serve.py)
    export    merge one adapter into its base: a plain transformers folder (infer/export.py)
    ui        web UI (Streamlit) for one adapter: a review form and a CSV tab (infer/ui.py)

Exit status: 0 on success, 2 on bad input (``error: <message>`` on stderr; nothing is written).
"""

from __future__ import annotations

import argparse
import sys

from core.io import InputError


def build_parser() -> argparse.ArgumentParser:
    from infer import blend, evaluate, export, hub, predict, serve, submit, ui
    from infer.commands import tune

    parser = argparse.ArgumentParser(prog="python -m infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict.register(sub)
    hub.register(sub)
    tune.register(sub)
    submit.register(sub)
    evaluate.register(sub)
    blend.register(sub)
    serve.register(sub)
    export.register(sub)
    ui.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:  # handlers report their own errors; this is a safety net
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
