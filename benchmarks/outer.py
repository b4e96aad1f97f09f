"""The models a run can ship, scored on rows no cross-validation saw (issue 35): (a) the average of the fold models,
(b) the final model trained on every CV row (``cv.final``), (c) merged adapters (``python -m train merge``).

Usage:
    python -m train holdout --config CFG --labels train.csv --frac 0.2 --out OUTER
    python -m train --config CFG --set data.train_csv=OUTER/inner.csv --set output_dir=RUN --set cv.final=true
    python -m train merge --run RUN --method cat --out RUN/merged_cat      # and/or svd
    python -m benchmarks.outer --outer OUTER --run RUN --model final=RUN/final/last \\
        --model merged_cat=RUN/merged_cat [--model ...] [--out-dir RUN/outer_eval]
        [--probs NAME=PROBS.csv:THRESHOLDS.json ...] [--versus NAME ...]

Each model predicts ``OUTER/outer.csv`` with ``python -m infer predict`` (kept in ``--out-dir``: a rerun reuses the
files); the tuned cascade is ``python -m infer tune`` on the run's OOF (the CV's folds, inner rows only), applied to
every model alike. ``--probs`` adds probabilities already predicted for the outer rows (e.g. a pipeline's
``blend.csv``), whose "tuned" column decodes with their own thresholds file (e.g. the pipeline's
``thresholds.json``, tuned on its own OOF). Prints, per model: exact match with the run's default cascade and the
tuned one, the paired difference from (a) (or from each model ``--versus`` names: one table each) with a 95%
bootstrap interval, and prediction rows/s of the input (the fold average pays k models per row; model loading
excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from core.config import RunConfig
from core.decoding import read_thresholds
from core.io import read_labels, read_probs, write_json
from core.metrics import paired_difference
from core.thresholds import ThresholdSpec


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outer", required=True, help="folder of python -m train holdout (inner.csv, outer.csv)")
    ap.add_argument("--run", required=True, help="the CV run on inner.csv: (a) is its fold average")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=ADAPTER",
                    help="another model to score (repeatable): an adapter folder or a run folder")
    ap.add_argument("--probs", action="append", default=[], metavar="NAME=PROBS.csv:THRESHOLDS.json",
                    help="probabilities of the outer rows already predicted, decoded with their own thresholds")
    ap.add_argument("--versus", action="append", metavar="NAME",
                    help="the model the others are paired with (repeatable: one table each; default (a))")
    ap.add_argument("--out-dir", help="where the probabilities go (default RUN/outer_eval)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    run, outer = Path(args.run), Path(args.outer)
    out = Path(args.out_dir or run / "outer_eval")
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_yaml(run / "run_config.yaml", [])
    for flag, spec in [("--model", m) for m in args.model] + [("--probs", p) for p in args.probs]:
        if "=" not in spec or (flag == "--probs" and ":" not in spec.split("=", 1)[1]):
            raise SystemExit(f"{flag} {spec!r}: expected {'NAME=ADAPTER' if flag == '--model' else 'NAME=PROBS:THRESHOLDS'}")
    models = [("fold average", str(run), None)] + [(*m.split("=", 1), None) for m in args.model]
    models += [(name, *spec.rsplit(":", 1)) for name, spec in (p.split("=", 1) for p in args.probs)]
    names = [m[0] for m in models]
    if len(set(names)) < len(names):
        raise SystemExit(f"two models named {next(n for n in names if names.count(n) > 1)!r}: names must differ")
    versus = args.versus or ["fold average"]
    unknown = [v for v in versus if v not in names]
    if unknown:  # before any model predicts
        raise SystemExit(f"--versus {unknown[0]!r}: not a model of this table ({', '.join(names)})")

    thresholds = out / "thresholds.json"
    if not thresholds.exists():
        sh("-m", "infer", "tune", "--oof", str(run / "oof.csv"), "--labels", str(outer / "inner.csv"),
           "--out", str(thresholds), "--no-progress")
    tuned = read_thresholds(thresholds)
    rows, preds, first_ids = [], {}, []
    for name, adapter, own in models:
        probs_path = Path(adapter) if own else out / f"{name.replace(' ', '_')}.csv"
        if own and not probs_path.is_file():
            raise SystemExit(f"--probs {name}: no such file {probs_path}")
        if not probs_path.exists():
            sh("-m", "infer", "predict", "--adapter", adapter, "--input", str(outer / "outer.csv"),
               "--out", str(probs_path))
        ids, probs, names = read_probs(probs_path)
        first_ids = first_ids if rows else list(ids)
        if list(ids) != first_ids:
            raise SystemExit(f"{probs_path}: not the rows of {rows[0]['model']!r} in the same order")
        _, labels = read_labels(outer / "outer.csv", names, probs_path, id_column=cfg.data.id_column)
        meta = json.loads(Path(f"{probs_path}.meta.json").read_text())
        default = ThresholdSpec.from_decode(names, cfg.decode)
        own_tuned = read_thresholds(own) if own else tuned
        preds[name] = {"cascade": default.decode(probs), "tuned": own_tuned.decode(probs)}
        seconds = meta.get("seconds", {}).get("predict")  # a blend's file has no prediction time of its own
        rows.append({"model": name, "adapters": len(meta.get("adapters", [])), "rows": len(ids),
                     "rows_per_s": round(len(ids) / seconds, 2) if seconds else None, "labels": labels})
    labels = {r["model"]: r.pop("labels") for r in rows}
    table = [dict(r, em_cascade=None, em_tuned=None, vs={}) for r in rows]
    fmt = lambda d: f"{d['difference']:+.4f} ({d['low']:+.4f} .. {d['high']:+.4f})"
    width = max(14, *(len(r["model"]) for r in rows))
    for v in versus:
        print(f"\n{rows[0]['rows']} outer rows of {outer} ; run {run} ; tuned cascade from {thresholds} "
              f"(--probs: their own) ; paired with {v!r}")
        print(f"{'model':<{width}} {'adapters':>8} {'EM cascade':>10} {'EM tuned':>9} {'vs cascade, 95% CI':>30} "
              f"{'vs tuned, 95% CI':>30} {'rows/s':>7}")
        for line in table:
            name, y = line["model"], labels[line["model"]]
            d = {dec: paired_difference(y, preds[v][dec], preds[name][dec]) for dec in ("cascade", "tuned")}
            line["em_cascade"], line["em_tuned"] = d["cascade"]["exact_match_b"], d["tuned"]["exact_match_b"]
            line["vs"][v] = d
            print(f"{name:<{width}} {line['adapters']:>8} {line['em_cascade']:>10.4f} {line['em_tuned']:>9.4f} "
                  f"{fmt(d['cascade']):>30} {fmt(d['tuned']):>30} {line['rows_per_s'] or '-':>7}")
    if args.json:
        write_json(args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
