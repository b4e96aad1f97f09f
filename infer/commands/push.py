"""``python -m infer push``: upload a trained run (adapters + model card) to the Hub (the work: :mod:`infer.hub`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from infer.hub import push


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("push", help="upload a trained run (adapters + model card) to the Hugging Face Hub",
                              description="Upload a run folder's finished fold adapters, run files and a generated "
                                          "model card to a Hub model repo, in one commit.")
    p.add_argument("run_dir", help="run folder (output_dir of python -m train), or one adapter folder (RUN/final/last, "
                                   "a merged adapter)")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="print the files and sizes; no network")
    p.add_argument("--stage", help="with --dry-run: also write the upload folder here for inspection")
    p.add_argument("--thresholds", help="thresholds.json to include (default RUN_DIR/thresholds.json if present)")
    p.add_argument("--base-model", help="Hub id of the base model for the card (default from run_config.yaml)")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    push(args.run_dir, args.repo, private=args.private, dry_run=args.dry_run, thresholds=args.thresholds,
         base_model=args.base_model, stage_dir=args.stage)
    return 0
