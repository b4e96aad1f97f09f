"""The figures of ``bash benchmarks/levers.sh RUNS``: each lever against the shipped config on the same rows.

Usage:
    python -m benchmarks.levers RUNS [--labels ../shared/data/dls/train.csv] [--json out.json]
    python -m benchmarks.levers subset FULL_OOF ROWS_OF OUT      # FULL_OOF cut to the rows of ROWS_OF (same meta)

Per run (a ``python -m train`` run folder with ``oof.csv``, or an OOF file such as the blend's): out-of-fold exact
match at 0.5, with the default cascade, with the tuned cascade and with set decoding (both nested: tuned on the other
folds, the left-out fold scored, rotated, over the base run's ``folds.csv``), micro-F1 (cascade), and the paired
difference to the base run on the same rows (default cascade; 95% bootstrap interval, ``infer evaluate --baseline``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from core.io import align_ids, meta_path, read_probs, write_probs

RUNS = ("base", "ens", "dapt2", "ep3", "lora64")
FILES = {"tfidf (base's rows)": "tfidf_base_rows.csv", "blend base + tfidf": "blend_oof.csv"}


def subset(full: str, rows_of: str, out: str) -> None:
    """Write ``full`` cut to the ids of ``rows_of`` (in ``rows_of``'s order), keeping ``full``'s meta."""
    ids, p, names = read_probs(full)
    want, _, _ = read_probs(rows_of)
    idx = align_ids(rows_of, want, full, ids)
    mp = meta_path(full)
    meta = json.loads(mp.read_text()) if mp.is_file() else {}
    for k in ("label_names", "rows", "versions"):
        meta.pop(k, None)
    write_probs(out, ids[idx], p[idx], names, meta={**meta, "subset_of": full, "rows_of": rows_of})


def figures(oof: Path, labels: str, folds: Path, baseline: Path | None, work: Path) -> dict:
    """Exact match (0.5, cascade, tuned nested, sets nested) and the paired difference to ``baseline``."""
    from infer.evaluate import evaluate
    from infer.tune import run_tune

    quiet = dict(log=lambda m: None)
    res = evaluate(oof, labels, out_dir=work, baseline=baseline, **quiet)
    m = res["metrics"]
    dec = run_tune(oof, labels, work / "thresholds_sets.json", folds=folds, strategy="sets", progress=False, **quiet)
    nested = dec.meta["nested"]
    out = {"oof": str(oof), "rows": res["rows"], "em_0.5": m["threshold 0.5"]["exact_match"],
           "em_cascade": m["default cascade"]["exact_match"], "micro_f1": m["default cascade"]["micro_f1"],
           "em_tuned_nested": nested["pooled"]["tuned"]["exact_match"],
           "em_sets_nested": nested["pooled"]["sets"]["exact_match"],
           "per_fold": nested["per_fold"]}
    if baseline is not None:
        out["vs_base"] = res["baseline"]["default cascade"]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["subset"]:
        if len(argv) != 4:
            print("usage: python -m benchmarks.levers subset FULL_OOF ROWS_OF OUT", file=sys.stderr)
            return 2
        subset(*argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the folder benchmarks/levers.sh wrote")
    ap.add_argument("--labels", default="../shared/data/dls/train.csv")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    base = runs / "base"
    folds = base / "folds.csv"
    items = [(name, runs / name / "oof.csv", runs / name) for name in RUNS if (runs / name / "summary.json").is_file()]
    items += [(name, runs / f, runs / "eval" / Path(f).stem) for name, f in FILES.items() if (runs / f).is_file()]
    rows = []
    for name, oof, work in items:
        work.mkdir(parents=True, exist_ok=True)
        r = figures(oof, args.labels, folds, None if name == "base" else base / "oof.csv", work)
        rows.append({"name": name, **r})
    b = rows[0]
    print(f"{runs}: {b['rows']} out-of-fold rows (folds {sorted({f['fold'] for f in b['per_fold']})} of "
          f"{args.labels}); nested = tuned on the other folds, the left-out fold scored")
    print("| run | EM @0.5 | EM cascade | EM tuned (nested) | EM sets (nested) | micro-F1 | cascade vs base (95% CI) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        v = r.get("vs_base")
        vs = "-" if v is None else f"{v['difference']:+.4f} ({v['low']:+.4f} .. {v['high']:+.4f})"
        print(f"| {r['name']} | {r['em_0.5']:.4f} | {r['em_cascade']:.4f} | {r['em_tuned_nested']:.4f} | "
              f"{r['em_sets_nested']:.4f} | {r['micro_f1']:.4f} | {vs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
