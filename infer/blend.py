"""Blend several models' probabilities with weights tuned on their out-of-fold predictions (``python -m infer blend``).

The blend is the weighted mean of the probability files (weights >= 0, summing to 1), e.g. Gemma + Mistral, or an
LLM + a TF-IDF model. Weights are tuned with Optuna (TPE, seeded; equal weights and each single model are tried
first) to maximise the objective (exact match by default, micro-F1 on request) of the default cascade on the
blended out-of-fold probabilities. Tune thresholds on the blended OOF afterwards (``--out-oof``, then
``python -m infer tune``).

The blend's OOF score with weights tuned on the same OOF is optimistic; the nested estimate (weights tuned on all
folds but one, the left-out fold scored, rotated) is the honest one, printed beside it. Thresholds (or set decoding)
tuned afterwards on the blended OOF inherit the weights' optimism: ``--tune-decoding cascade|sets`` tunes them inside
the same nested estimate (weights, then decoding, on all folds but one), the honest figure of blend + tune together.

Usage:
    python -m infer blend --probs a.csv,b.csv --oof a_oof.csv,b_oof.csv --labels train.csv --out blend.csv \\
        [--out-oof blend_oof.csv] [--folds RUN/folds.csv] [--objective micro_f1] [--n-trials 100] [--seed 0] \\
        [--tune-decoding cascade|sets]
    python -m infer blend --oof a_oof.csv,b_oof.csv --labels train.csv      # only measure: OOF scores, no test file
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.io import align_ids, probs_id_column, progress_bar, read_labels, read_probs, write_probs
from core.metrics import OBJECTIVES, objective_score, scores
from core.thresholds import ARGMAX, DEFAULT_FALLBACK, Fallback, cascade_steps, decode_global

DEFAULT_TRIALS = 100

logger = logging.getLogger(__name__)


def blend_probs(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of N x L probability arrays (weights normalised to sum 1), clipped to [0, 1]."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return np.clip(np.tensordot(w, np.stack([np.asarray(p, dtype=np.float64) for p in probs]), axes=1), 0.0, 1.0)


def search_weights(oofs: Sequence[np.ndarray], labels: np.ndarray, objective: str = "exact_match",
                   n_trials: int = DEFAULT_TRIALS, seed: int = 0, fallback: Fallback = DEFAULT_FALLBACK,
                   steps: Sequence[float] | None = None, progress: bool = False) -> tuple[list[float], float]:
    """Blend weights maximising the objective of the cascade on the blended OOF (Optuna TPE, seeded).

    Equal weights, then each model alone, are the first trials; ties go to the earliest trial.

    Returns:
        (weights summing to 1, best objective).
    """
    import optuna


    optuna.logging.set_verbosity(optuna.logging.WARNING)
    m = len(oofs)
    y = np.asarray(labels).astype(np.int8)
    steps = cascade_steps() if steps is None else tuple(steps)
    cache: dict[tuple, float] = {}

    def weights_of(params) -> tuple:
        x = np.array([params[f"w{i}"] for i in range(m)], dtype=np.float64)
        if x.sum() <= 0:
            x = np.ones(m)
        return tuple(np.round(x / x.sum(), 6))

    def fn(trial):
        w = weights_of({f"w{i}": trial.suggest_float(f"w{i}", 0.0, 1.0, step=0.01) for i in range(m)})
        if w not in cache:
            cache[w] = objective_score(y, decode_global(blend_probs(oofs, w), steps, fallback), objective)
        return cache[w]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({f"w{i}": 1.0 for i in range(m)})
    for j in range(m):
        study.enqueue_trial({f"w{i}": float(i == j) for i in range(m)})
    n = max(int(n_trials), m + 1)
    bar = progress_bar(n, "blend weights", progress)
    study.optimize(fn, n_trials=n, callbacks=[lambda s, t: bar.update(1)] if bar else None)
    if bar:
        bar.close()
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    return [float(v) for v in weights_of(best.params)], float(best.value)


def nested_blend(oofs: Sequence[np.ndarray], labels: np.ndarray, folds: Sequence[int], objective: str = "exact_match",
                 n_trials: int = DEFAULT_TRIALS, seed: int = 0, fallback: Fallback = DEFAULT_FALLBACK,
                 strategy: str | None = None, label_names: Sequence[str] | None = None, **tune_kwargs) -> dict:
    """Honest estimate of the blend: tune the weights on all folds but one, decode the left-out fold's blend with
    the default cascade, rotate; the left-out predictions are pooled.

    ``strategy`` (``"cascade"`` or ``"sets"``): also tune the decoding on each fold's blended training rows (as
    :func:`core.threshold_search.nested_estimate`, same ``seed``, ``tune_kwargs`` passed on) and score the left-out
    fold with it: the honest figure of blend + ``tune`` together. Its result is under ``"decoding"``.

    Returns ``{"folds", "per_fold": [{"fold", "rows", "weights", objective}], "pooled": scores}`` (+ ``"decoding"``).
    """

    y = np.asarray(labels).astype(np.int8)
    folds = np.asarray(folds)
    uniq = sorted(set(folds.tolist()))
    if len(uniq) < 2:
        raise ValueError("the nested estimate needs at least 2 folds")
    steps = cascade_steps()
    pred = np.zeros_like(y)
    per_fold = []
    for f in uniq:
        test = folds == f
        w, _ = search_weights([p[~test] for p in oofs], y[~test], objective, n_trials, seed, fallback, steps)
        pred[test] = decode_global(blend_probs([p[test] for p in oofs], w), steps, fallback)
        per_fold.append({"fold": int(f), "rows": int(test.sum()), "weights": w,
                         objective: float(objective_score(y[test], pred[test], objective))})
    out = {"folds": len(uniq), "per_fold": per_fold, "pooled": scores(y, pred)}
    if strategy is not None:
        from core.threshold_search import nested_estimate

        weights = {r["fold"]: r["weights"] for r in per_fold}

        def fold_blend(train: np.ndarray) -> np.ndarray:  # the weights tuned above without the left-out fold
            return blend_probs(oofs, weights[int(folds[~train][0])])

        out["decoding"] = nested_estimate(oofs[0], y, folds, label_names, fallback, objective, strategy=strategy,
                                          fold_probs=fold_blend, seed=seed, **tune_kwargs)
    return out


def _split(value: str | Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s) for s in value]
    items = [s for s in items if s]
    if not items:
        raise InputError(f"{what}: no file given")
    return items


def _read_group(paths: Sequence[str], names: Sequence[str] | None):
    """Read probability files that must share labels and ids; rows aligned to the first file's ids."""
    ids0, first, names0 = read_probs(paths[0], names)
    arrays = [first]
    for path in paths[1:]:
        ids, p, _ = read_probs(path, names0)
        idx = align_ids(path, ids, paths[0], ids0, same_set=True)
        aligned = np.empty_like(p)
        aligned[idx] = p
        arrays.append(aligned)
    return ids0, arrays, names0


def run_blend(probs: str | Sequence[str], oof: str | Sequence[str], labels: str | Path, out: str | Path | None = None,
              out_oof: str | Path | None = None, objective: str = "exact_match", n_trials: int = DEFAULT_TRIALS,
              seed: int = 0, fallback=None, folds: str | Path | None = None, kfolds: int = 5, nested: bool = True,
              progress: bool = True, id_column: str | None = None, tune_decoding: str | None = None) -> dict:
    """Read and validate everything, tune the weights (and estimate the blend's score honestly, nested over the
    folds: ``folds`` file, else RUN/folds.csv beside the first OOF file, else a seeded K-fold), then write the
    blended file(s). ``tune_decoding`` (``cascade`` / ``sets``): the nested estimate also tunes the decoding on each
    fold's blended training rows, as ``tune --strategy`` would (the fallback tuned too unless ``fallback`` is given)."""
    from core.decoding import STRATEGIES, default_spec, labels_id_column, run_config_of
    from core.threshold_search import check_honest, resolve_folds

    oof = _split(oof, "--oof")
    probs = None if probs is None else _split(probs, "--probs")  # None: measure the blend on OOF rows only
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if probs is None and out is not None:
        raise InputError("--out needs --probs (the test predictions to blend); without them blend only measures, "
                         "and --out-oof writes the blended out-of-fold file")
    if probs is not None and len(probs) != len(oof):
        raise InputError(f"--probs has {len(probs)} file(s) but --oof has {len(oof)}: give one OOF file per model, "
                         f"in the same order")
    if len(oof) < 2:
        raise InputError("blend needs at least two models (--probs a.csv,b.csv --oof a_oof.csv,b_oof.csv)")
    if tune_decoding is not None and tune_decoding not in STRATEGIES:
        raise InputError(f"--tune-decoding must be one of {', '.join(STRATEGIES)}, got {tune_decoding!r}")
    if tune_decoding is not None and not nested:
        raise InputError("--tune-decoding is part of the nested estimate: drop --no-nested")
    for path in oof:
        check_honest(path, nested, "--no-nested")
    oof_ids, oofs, names = _read_group(oof, None)
    label_ids, y_all = read_labels(labels, names, probs_path=oof[0], id_column=labels_id_column(oof[0], id_column))
    y = y_all[align_ids(oof[0], oof_ids, labels, label_ids)]
    test_ids, tests, _ = _read_group(probs, names) if probs is not None else (None, None, None)
    default = default_spec(oof[0], names, fallback)
    fb = default.fallback
    if probs is not None:
        out = Path(probs[0]).with_name("blend.csv") if out is None else Path(out)

    logger.info(f"blend: {len(oof)} models; {len(oof_ids)} out-of-fold rows x {len(names)} classes; objective "
                f"{objective}, {n_trials} trials, seed {seed}")
    weights, best = search_weights(oofs, y, objective, n_trials, seed, fb, progress=progress)
    rows = {path: scores(y, default.decode(p)) for path, p in zip(oof, oofs)}
    blended_oof = blend_probs(oofs, weights)
    rows["blend (in-sample)"] = scores(y, default.decode(blended_oof))
    estimate = None
    if nested:
        fold_of, source = resolve_folds(folds, oof[0], oof_ids, None, kfolds, seed)
        logger.info(f"nested estimate over {len(set(fold_of.tolist()))} folds from {source}")
        extra = {} if tune_decoding is None else {
            "strategy": tune_decoding, "label_names": names, "progress": progress,
            "fallbacks": () if fallback is not None else (ARGMAX,)}
        estimate = nested_blend(oofs, y, fold_of, objective, n_trials, seed, fb, **extra)
        rows["blend (nested)"] = estimate["pooled"]
        if tune_decoding is not None:
            dec = estimate["decoding"]["pooled"]
            rows["blend + tuned cascade (nested)"] = dec["tuned"]
            if "sets" in dec:
                rows["blend + sets (nested)"] = dec["sets"]
    width = max(len(str(k)) for k in rows) + 2
    lines = ["OOF scores (the default cascade unless the row names another decoding):",
             f"  {'model':<{width}} {'weight':>7} {'exact_match':>12} {'micro_f1':>9}"]
    for i, (k, s) in enumerate(rows.items()):
        w = f"{weights[i]:.3f}" if i < len(weights) else ""
        lines.append(f"  {k:<{width}} {w:>7} {s['exact_match']:>12.4f} {s['micro_f1']:>9.4f}")
    if estimate is not None:
        lines.append("  nested: weights tuned on the other folds, the left-out fold scored; per fold: " + "; ".join(
            f"{r['fold']}: {r[objective]:.4f} ({', '.join(f'{w:.2f}' for w in r['weights'])})"
            for r in estimate["per_fold"]))
    logger.info("\n".join(lines))

    meta = {"kind": "blend", "produced_by": "python -m infer blend", "inputs": list(probs or []), "oof": list(oof),
            "labels": str(labels), "weights": weights, "objective": objective, "n_trials": int(n_trials),
            "seed": int(seed), "oof_scores": rows, "nested": estimate}
    cfg, _ = run_config_of(oof[0])
    if cfg is not None:  # the first model's run config: tune / submit / evaluate of the blend decode like that run
        meta["config"] = cfg.to_dict()
    written = []
    if probs is not None:
        write_probs(out, test_ids, blend_probs(tests, weights), names, meta=meta, id_column=probs_id_column(probs[0]))
        written.append(str(out))
    if out_oof is not None:
        write_probs(out_oof, oof_ids, blended_oof, names, meta={**meta, "kind": "blend (out-of-fold)"},
                    id_column=probs_id_column(oof[0]))
        written.append(str(out_oof))
    if written:
        logger.info("wrote " + ", ".join(written))
    return {"weights": weights, "objective_value": best, "oof_scores": rows, "nested": estimate,
            "out": None if probs is None else str(out),
            "out_oof": None if out_oof is None else str(out_oof)}

