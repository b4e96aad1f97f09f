"""``python -m train holdout``: set labelled rows aside for a measurement no cross-validation sees.

Splits a labelled CSV into ``OUT/inner.csv`` (the rows to cross-validate and train on) and ``OUT/outer.csv`` (the
held-out rows, scored once at the end), multilabel-stratified and deterministic in ``--seed``. The rows are copied
verbatim (every column, in the original order); ``OUT/holdout.json`` records the source, fraction, seed and counts.

    python -m train holdout --config configs/gemma-3-270m/qlora.yaml --labels ../shared/data/dls/train.csv \\
        --frac 0.2 --out runs/outer
    python -m train --config configs/gemma-3-270m/qlora.yaml --set data.train_csv=runs/outer/inner.csv --out RUN
    python -m infer predict --adapter RUN --test runs/outer/outer.csv --out RUN/outer_probs.csv
    python -m infer evaluate --labels runs/outer/outer.csv --probs RUN/outer_probs.csv

Exit status: 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_verbose_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("holdout", help="split a labelled CSV into inner (CV) and outer (held-out) rows",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="labelled CSV to split")
    p.add_argument("--config", help="run config YAML: its data section names the id and label columns "
                                    "(default: the toolkit's defaults)")
    p.add_argument("--frac", type=float, default=0.2, help="share of rows held out (default 0.2)")
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    add_verbose_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    import pandas as pd

    from core.config import DataArgs, RunConfig
    from core.data import read_csv
    from core.io import atomic_dir, check_out_dir, versions, write_json
    from train.data import holdout_split

    check_out_dir(args.out, "--out", must_not_exist=True)
    data = RunConfig.from_yaml(args.config, []).data if args.config else DataArgs()
    ds = read_csv(args.labels, data)  # validates ids, text and 0/1 labels; names the file and row on error
    held = holdout_split(ds.labels, args.frac, args.seed)
    df = pd.read_csv(args.labels, keep_default_na=False, dtype=str)  # verbatim: no float or NaN rewriting
    with atomic_dir(args.out) as tmp:
        df[~held].to_csv(Path(tmp) / "inner.csv", index=False)
        df[held].to_csv(Path(tmp) / "outer.csv", index=False)
        write_json(Path(tmp) / "holdout.json", {
            "source": str(args.labels), "frac": args.frac, "seed": args.seed, "rows": len(df),
            "inner_rows": int((~held).sum()), "outer_rows": int(held.sum()), "label_columns": ds.label_names,
            "outer_label_counts": {n: int(c) for n, c in zip(ds.label_names, ds.labels[held].sum(0))},
            "versions": versions(("numpy", "pandas", "scikit-learn", "iterative-stratification"))})
    logging.getLogger(__name__).info(f"{args.out}: {int((~held).sum())} inner rows (inner.csv), "
                                     f"{int(held.sum())} held-out rows (outer.csv)")
    return 0
