"""``python -m train trim-vocab``: shrink a model's vocabulary to a corpus (what is kept and checked: :mod:`train.vocab`).

Exit status: 0 on success, 2 on bad input, 1 when a check of the trimmed tokenizer or model fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.cli import add_verbose_argument, module_doc
from core.config import DEFAULT_TEMPLATE, ModelArgs
from core.errors import InputError
from train.data import read_corpus, split_paths


def register(subparsers) -> None:
    p = subparsers.add_parser("trim-vocab", help="shrink the embedding matrix to the corpus",
                              description=module_doc("train.vocab"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder, Hub id in the local cache, or embedded:gemma-3-270m "
                                   "(default: the --config's model.name_or_path)")
    p.add_argument("--config", help="run config YAML: its model and data.text_template are the defaults")
    p.add_argument("--corpus", action="append", required=True, metavar="CSV[,CSV]",
                   help="CSV(s) whose formatted rows define the vocabulary (repeatable, comma-separated)")
    p.add_argument("--template", help="prompt template over CSV columns (default: the config's or the toolkit's "
                                      "default data.text_template)")
    p.add_argument("--eval", action="append", default=[], metavar="CSV[,CSV]",
                   help="CSV(s) outside the corpus to measure coverage on (byte fallback / unknown tokens)")
    p.add_argument("--out", required=True, help="output model folder (must not exist unless --overwrite)")
    p.add_argument("--keep-bytes", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the 256 byte-fallback tokens so any text stays representable (default: on)")
    p.add_argument("--keep-ascii", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the single-character tokens of printable ASCII, used or not (default: on)")
    p.add_argument("--keep-added", choices=["used", "all"], default="used",
                   help="added tokens to keep: special-map and used ones (default) or all")
    p.add_argument("--check-texts", type=int, default=8,
                   help="corpus texts to compare hidden states / logits on before and after (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from train.vocab import ID_MAP, TRIM_REPORT, trim_vocab

    margs, template = ModelArgs(), DEFAULT_TEMPLATE
    if args.config:
        from core.config import RunConfig

        cfg = RunConfig.from_yaml(args.config, [])
        margs, template = cfg.model, cfg.data.text_template
    if args.model:
        margs = ModelArgs(name_or_path=args.model, cache_dir=margs.cache_dir)
    if args.template is not None:
        # A shell cannot easily pass a newline: accept the two-character escapes \n and \t.
        template = args.template.replace("\\n", "\n").replace("\\t", "\t")
    from core.data import template_fields

    template_fields(template)  # a bad template is an input error before anything is loaded
    if Path(args.out).exists() and not args.overwrite:
        raise InputError(f"{args.out}: output folder already exists (pass --overwrite to replace it)")
    corpus = read_corpus(split_paths(args.corpus), template, template_key="--template")
    evals = [read_corpus([p], template, what="eval corpus", template_key="--template")
             for p in split_paths(args.eval)]
    from core.model import resolve_model_path

    model_path = resolve_model_path(margs)
    report = trim_vocab(model_path, corpus, args.out, template=template, keep_bytes=args.keep_bytes,
                        keep_added=args.keep_added, eval_corpora=evals, overwrite=args.overwrite,
                        check_texts=args.check_texts, keep_ascii=args.keep_ascii)
    summary = {k: v for k, v in report.items() if k != "versions"}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    p = report["parameters"]
    print(f"kept {report['kept_rows']} of {report['original_rows']} rows ({100 * report['kept_fraction']:.1f}%), "
          f"parameters {p['before']:,} -> {p['after']:,}, corpus coverage {100 * report['corpus']['coverage']:.1f}%; "
          f"wrote {args.out} ({TRIM_REPORT}, {ID_MAP})")
    return 0
