"""``python -m infer export``: merge one adapter into its base, a plain transformers folder (the work:
:mod:`infer.export`)."""

from __future__ import annotations

import argparse

from core.cli import add_verbose_argument
from core.io import check_out_dir
from infer.export import DEFAULT_PROBE_ROWS, DTYPES, export


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="merge one adapter into its base: a plain transformers folder (no peft/bitsandbytes)",
        description="Load the adapter's base without 4-bit, merge the LoRA weights and the score head, and write an "
                    "AutoModelForSequenceClassification folder with id2label, tokenizer, model card and provenance.")
    p.add_argument("--adapter", required=True, help="adapter folder, run folder (with --fold) or Hub id")
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="load/merge/save dtype (default bf16)")
    p.add_argument("--fold", type=int, help="fold K of a run folder (merging cannot average folds)")
    p.add_argument("--probe", help="CSV whose first rows measure the probability differences "
                                   "(default: the adapter's data.train_csv)")
    p.add_argument("--probe-rows", type=int, default=DEFAULT_PROBE_ROWS)
    p.add_argument("--no-4bit-compare", action="store_true", help="skip loading the 4-bit adapter path to compare")
    p.add_argument("--base-model", help="local folder of the base model (overrides the adapter's run_config)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out, "--out", must_not_exist=True)
    export(args.adapter, args.out, dtype=args.dtype, fold=args.fold, probe=args.probe,
           probe_rows=args.probe_rows, compare_4bit=not args.no_4bit_compare, device=args.device,
           base_model=args.base_model)
    return 0
