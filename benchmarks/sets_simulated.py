"""Set decoding vs the tuned cascade on simulated probabilities for the DLS label sets (no model, CPU, ~1 minute).

The labels are the real ``train.csv`` ones (3,700 rows x 50 labels, 568 distinct sets); the "model" is simulated:
per-label logits ``+sep/2`` for a positive and ``-sep/2 - 2.5`` for a negative, plus Gaussian noise, with a per-class
separability ``sep``. A seeded 5-fold split; then ``python -m infer tune --strategy sets`` on it (nested estimate:
default cascade, tuned cascade, sets). This is not a real model's out-of-fold file: real errors are correlated in
ways this noise is not.

Usage:
    python -m benchmarks.sets_simulated --model weak --out-dir /tmp/sets_weak    # sep 1..3, noise 1.6
    python -m benchmarks.sets_simulated --model strong --out-dir /tmp/sets_strong  # sep 2..4.5, noise 1.3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.shapes import DLS
from core.io import write_probs
from core.tuning import run_tune

MODELS = {"weak": ((1.0, 3.0), 1.6), "strong": ((2.0, 4.5), 1.3)}
"""(separability range, noise sd) of the simulated models."""


def simulate(labels: np.ndarray, sep_range: tuple[float, float], noise: float, seed: int = 0) -> tuple:
    """(probabilities, fold per row) for 0/1 ``labels``, seeded."""
    rng = np.random.default_rng(seed)
    sep = rng.uniform(*sep_range, size=labels.shape[1])
    logit = np.where(labels == 1, sep / 2, -sep / 2 - 2.5) + rng.normal(0, noise, size=labels.shape)
    folds = np.empty(len(labels), dtype=int)
    folds[rng.permutation(len(labels))] = np.arange(len(labels)) % 5
    return 1 / (1 + np.exp(-logit)), folds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="weak")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / DLS))
    p.add_argument("--n-trials", type=int, default=100)
    args = p.parse_args(argv)
    df = pd.read_csv(args.data)
    cols = [c for c in df.columns if c.startswith("trend_id_res")]
    y = df[cols].to_numpy().astype(np.int8)
    sep_range, noise = MODELS[args.model]
    probs, folds = simulate(y, sep_range, noise)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_probs(out / "oof.csv", df["index"].to_numpy(), probs, cols)
    pd.DataFrame({"index": df["index"], "fold": folds}).to_csv(out / "folds.csv", index=False)
    run_tune(out / "oof.csv", args.data, out / "thresholds.json", folds=out / "folds.csv", n_trials=args.n_trials,
             strategy="sets", progress=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
