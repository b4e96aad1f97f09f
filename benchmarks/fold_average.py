"""Thresholds tuned on single-model out-of-fold probabilities, applied to the average of the fold models: does the
smoother average need other thresholds? Measured with the TF-IDF model (cheap enough to nest), issue 18.

Usage:
    python -m benchmarks.fold_average --folds RUN/folds.csv [--labels ../shared/data/dls/train.csv] [--json out.json]

For every outer fold k of ``--folds`` (the rows of fold k play the test set): the other folds form a 4-fold CV as
``python -m train`` would run it (each inner model fits on 3 of them and scores the 4th: the inner out-of-fold file
``tune`` sees) and every inner model also scores fold k. On fold k's rows it compares one inner model's probabilities
(what the thresholds were tuned on: single models) with the mean of the 4 inner models' (what ``infer predict`` on a
run folder submits), each decoded with the default cascade and with the cascade tuned on the inner out-of-fold file.
The remedy measured: a temperature on the average (``sigmoid(logit(p) / T)``), T chosen without labels so that the
tuned cascade gives the average as many labels per row as it gives a single model on the same rows.
Prints per outer fold and pooled: exact match (single / average, default and tuned cascade, average with T) and the
probability shape (mean max probability, rows with a class above 0.5).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from core.config import RunConfig
from core.data import read_csv
from core.io import read_folds
from core.metrics import exact_match
from core.threshold_search import tune_thresholds
from core.thresholds import ThresholdSpec
from train.tfidf import fit_predict

DLS = "../shared/data/dls"


def sharpen(p: np.ndarray, t: float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return 1 / (1 + np.exp(-np.log(p / (1 - p)) / t))


def shape(p: np.ndarray) -> dict:
    return {"mean_max_prob": float(p.max(axis=1).mean()), "rows_with_a_class_above_0.5": float((p > 0.5).any(1).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fold_average", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", required=True, help="folds.csv of the run (index, fold)")
    ap.add_argument("--labels", default=f"{DLS}/train.csv")
    ap.add_argument("--C", dest="c", type=float, default=4.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg = RunConfig.from_yaml("configs/gemma-3-270m/qlora.yaml", [f"data.train_csv={args.labels}"])
    ds = read_csv(args.labels, cfg.data)
    fold_of = read_folds(args.folds, ds.path, ds.ids)
    texts, y = np.asarray(ds.texts, dtype=object), ds.labels
    names = ds.label_names
    default = ThresholdSpec.from_decode(names, cfg.decode)
    out = {"per_fold": [], "setting": f"tfidf C={args.c}, folds {args.folds}"}
    pooled = {k: np.zeros_like(y) for k in ("single_default", "single_tuned", "avg_default", "avg_tuned",
                                             "avg_T_tuned")}
    single_all, avg_all = np.zeros(y.shape), np.zeros(y.shape)
    for k in sorted(set(fold_of.tolist())):
        test = fold_of == k
        inner = sorted(set(fold_of[~test].tolist()))
        inner_oof = np.zeros(y.shape)
        on_test = []
        for j in inner:
            fit = (~test) & (fold_of != j)
            p = fit_predict(texts[fit], y[fit], np.concatenate([texts[fold_of == j], texts[test]]), args.c,
                            cfg.train.seed)
            n_j = int((fold_of == j).sum())
            inner_oof[fold_of == j] = p[:n_j]
            on_test.append(p[n_j:])
        rows = ~test
        spec = tune_thresholds(inner_oof[rows], y[rows], names, fallback=default.fallback)
        single, avg = on_test[0], np.mean(on_test, axis=0)
        # Remedy: T chosen without labels (fold k's rows are the test set): the average gets as many labels per
        # row from the tuned cascade as a single model's output gets.
        target = spec.decode(single).sum(axis=1).mean()
        grid = np.round(np.arange(0.5, 1.21, 0.05), 2)
        counts = [abs(spec.decode(sharpen(avg, t)).sum(axis=1).mean() - target) for t in grid]
        t_best = float(grid[int(np.argmin(counts))])
        preds = {"single_default": default.decode(single), "single_tuned": spec.decode(single),
                 "avg_default": default.decode(avg), "avg_tuned": spec.decode(avg),
                 "avg_T_tuned": spec.decode(sharpen(avg, t_best))}
        for name, pr in preds.items():
            pooled[name][test] = pr
        single_all[test], avg_all[test] = single, avg
        row = {"fold": int(k), "rows": int(test.sum()), "T": t_best,
               **{name: exact_match(y[test], pr) for name, pr in preds.items()},
               "single_shape": shape(single), "avg_shape": shape(avg)}
        out["per_fold"].append(row)
        print(f"fold {k}: " + ", ".join(f"{n} {row[n]:.4f}" for n in preds) + f"; T {t_best}", flush=True)
    out["pooled"] = {name: exact_match(y, pr) for name, pr in pooled.items()}
    out["single_shape"], out["avg_shape"] = shape(single_all), shape(avg_all)
    print(f"pooled over {len(y)} rows (exact match): " + ", ".join(f"{n} {v:.4f}" for n, v in out["pooled"].items()))
    print(f"probability shape: single {out['single_shape']}, average {out['avg_shape']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
