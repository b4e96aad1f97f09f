"""The threshold search behind :func:`core.tuning.run_tune` (``python -m infer tune``, a final or merged adapter's
thresholds) and ``infer blend``: cascade thresholds tuned on labelled probabilities, and the nested estimate of the
gain.

What is tuned (objective: exact-match accuracy by default, micro-F1 on request):

1. the cascade's global ``start`` / ``stop`` / ``step`` with Optuna (TPE, seeded; the reference cascade
   0.55 / 0.20 / 0.05 is the first trial, so the in-sample result is never worse than it);
2. per-class offsets added to every cascade threshold of a class (``ThresholdSpec.class_offsets``): coordinate
   search over a grid, class by class (deterministic); each class's best offset is shrunk toward 0 (= the global
   thresholds) by ``n_pos / (n_pos + k)`` so that rare classes do not overfit, and kept only if the shrunk offset
   still improves the objective.

The honest estimate of the gain is nested: for each fold, tune on the other folds and score the left-out one with
the default cascade and with the tuned decoding; the left-out predictions are pooled over the folds. With
``strategy="sets"`` it also scores set decoding (:mod:`core.sets`), each fold's priors from its training rows only.

The tuning functions are pure and deterministic (the same inputs and seed give the same result);
:func:`resolve_folds` and :func:`check_honest` read the files a nested estimate needs.

Python:
    from core.threshold_search import tune_thresholds, nested_estimate
    spec = tune_thresholds(probs, labels, label_names, objective="exact_match", n_trials=200, seed=0)
    est = nested_estimate(probs, labels, folds, label_names)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.decoding import STRATEGIES
from core.errors import InputError
from core.io import optimistic_reason, progress_bar, read_folds
from core.metrics import OBJECTIVES, objective_score, scores
from core.sets import tune_sets
from core.thresholds import (
    DEFAULT_FALLBACK,
    DEFAULT_START,
    DEFAULT_STEP,
    DEFAULT_STOP,
    Fallback,
    ThresholdSpec,
    apply_fallback,
    cascade_steps,
    decode_global,
)

logger = logging.getLogger(__name__)

DEFAULT_TRIALS = 200
DEFAULT_SHRINK = 20.0
DEFAULT_KFOLD = 5
OFFSET_GRID = tuple(round(x, 10) for x in np.arange(-0.30, 0.30 + 1e-9, 0.02))
# Search space of the global cascade (Optuna, discrete steps so that the reference values are on the grid).
START_RANGE, STOP_RANGE, STEP_RANGE = (0.20, 0.90, 0.01), (0.02, 0.60, 0.01), (0.01, 0.15, 0.005)


def shrink_factors(labels: np.ndarray, k: float) -> np.ndarray:
    """``n_pos / (n_pos + k)`` per class (0 for a class without positives; 1 everywhere when k = 0)."""
    n_pos = np.asarray(labels).astype(bool).sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(n_pos > 0, n_pos / (n_pos + float(k)), 0.0)
    return f


def _suggest(trial) -> tuple[float, float, float]:
    start = round(trial.suggest_float("start", *START_RANGE[:2], step=START_RANGE[2]), 6)
    stop = round(trial.suggest_float("stop", *STOP_RANGE[:2], step=STOP_RANGE[2]), 6)
    step = round(trial.suggest_float("step", *STEP_RANGE[:2], step=STEP_RANGE[2]), 6)
    return start, min(stop, start), step


def search_global(probs: np.ndarray, labels: np.ndarray, objective: str = "exact_match",
                  n_trials: int = DEFAULT_TRIALS, seed: int = 0, fallback: Fallback = DEFAULT_FALLBACK,
                  progress: bool = False, desc: str = "tune cascade") -> tuple[tuple[float, float, float], float]:
    """Optuna (TPE, seeded) over the cascade's start/stop/step; returns ((start, stop, step), best score)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int8)
    rowmax = probs.max(axis=1)
    cache: dict[tuple, float] = {}

    def value(start, stop, step):
        key = cascade_steps(start, stop, step)
        if key not in cache:
            cache[key] = objective_score(y, decode_global(probs, key, fallback, rowmax), objective)
        return cache[key]

    def fn(trial):
        return value(*_suggest(trial))

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"start": DEFAULT_START, "stop": DEFAULT_STOP, "step": DEFAULT_STEP})
    bar = progress_bar(n_trials, desc, progress)
    study.optimize(fn, n_trials=max(1, int(n_trials)), callbacks=[lambda s, t: bar.update(1)] if bar else None)
    if bar:
        bar.close()
    # Best value; ties go to the earliest trial (the reference cascade comes first).
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    start, stop, step = _suggest(optuna.trial.FixedTrial(best.params))
    return (start, stop, step), float(best.value)


class _ClassSearch:
    """Exact incremental evaluation of the cascade while one class's offset changes (others fixed).

    Keeps, for every row and cascade level, how many classes pass, how many disagree with the labels and how many
    true positives there are, so that scoring a candidate offset of class ``c`` costs O(rows x levels).
    """

    def __init__(self, probs, labels, steps, fallback, offsets, objective):
        self.p = np.asarray(probs, dtype=np.float64)
        self.y = np.asarray(labels).astype(bool)
        self.s = np.asarray(steps, dtype=np.float64)
        self.objective = objective
        self.o = np.array(offsets, dtype=np.float64)
        n, n_labels = self.p.shape
        self.rows = np.arange(n)
        # Same float arithmetic as cascade(): probs > (t + offsets).
        self.h = self.p[:, None, :] > (self.s[:, None] + self.o[None, :])[None]  # N x K x L
        y3 = self.y[:, None, :]
        self.cnt = self.h.sum(axis=2)
        self.wrong = (self.h != y3).sum(axis=2)
        self.tp = (self.h & y3).sum(axis=2)
        self.n_true = int(self.y.sum())
        fb = np.zeros((n, n_labels), dtype=bool)  # each row's fallback prediction (argmax: its own class)
        apply_fallback(fb, self.p, np.ones(n, dtype=bool), fallback)
        self.fb_correct = (self.y == fb).all(axis=1)
        self.fb_tp = (self.y & fb).sum(axis=1)
        self.fb_cnt = fb.sum(axis=1)

    def hits(self, c: int, offset: float) -> np.ndarray:
        return self.p[:, c][:, None] > (self.s + offset)[None, :]

    def score(self, c: int, b: np.ndarray) -> float:
        """Objective when class ``c``'s hits per level are ``b`` (N x K)."""
        hc, yc = self.h[:, :, c], self.y[:, c]
        hit = ((self.cnt - hc) > 0) | b
        has = hit.any(axis=1)
        lv = hit.argmax(axis=1)
        r = self.rows
        bl, hl = b[r, lv], hc[r, lv]
        if self.objective == "exact_match":
            ok = (self.wrong[r, lv] - (hl != yc) == 0) & (bl == yc)
            return float(np.where(has, ok, self.fb_correct).mean())
        tp = np.where(has, self.tp[r, lv] - (hl & yc) + (bl & yc), self.fb_tp).sum()
        pc = np.where(has, self.cnt[r, lv] - hl + bl, self.fb_cnt).sum()
        return 2.0 * tp / (pc + self.n_true) if pc + self.n_true else 0.0

    def set(self, c: int, offset: float) -> None:
        old = self.h[:, :, c]
        new = self.hits(c, offset)
        yc = self.y[:, c][:, None]
        self.cnt += new.astype(np.int64) - old
        self.wrong += (new != yc).astype(np.int64) - (old != yc)
        self.tp += (new & yc).astype(np.int64) - (old & yc)
        self.h[:, :, c] = new
        self.o[c] = offset


def search_offsets(probs: np.ndarray, labels: np.ndarray, steps: Sequence[float], fallback: Fallback,
                   objective: str = "exact_match", shrink: float = DEFAULT_SHRINK,
                   grid: Sequence[float] = OFFSET_GRID, passes: int = 2) -> tuple[np.ndarray, float]:
    """Per-class offsets by coordinate search (classes in order, ``passes`` times), shrunk toward 0.

    For class c the best grid offset v (ties: the smallest |v|) given the other classes' offsets is shrunk to
    ``round(v * n_pos / (n_pos + shrink), 4)`` and kept only if that strictly improves the objective.

    Returns:
        (offsets, objective with them).
    """
    search = _ClassSearch(probs, labels, steps, fallback, np.zeros(np.shape(probs)[1]), objective)
    factors = shrink_factors(labels, shrink)
    grid = sorted({float(v) for v in grid} | {0.0}, key=lambda v: (abs(v), v))
    current = search.score(0, search.h[:, :, 0])
    for _ in range(max(0, int(passes))):
        changed = False
        for c in range(search.p.shape[1]):
            if factors[c] == 0:
                continue
            vals = [search.score(c, search.hits(c, v)) for v in grid]
            best = grid[int(np.argmax(vals))]  # first max: smallest |v| among ties
            applied = round(best * factors[c], 4)
            if applied == search.o[c]:
                continue
            s = search.score(c, search.hits(c, applied))
            if s > current + 1e-12:
                search.set(c, applied)
                current = s
                changed = True
        if not changed:
            break
    return search.o.copy(), float(current)


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None = None,
                    objective: str = "exact_match", n_trials: int = DEFAULT_TRIALS, seed: int = 0,
                    fallback: Fallback = DEFAULT_FALLBACK, per_class: bool = True, shrink: float = DEFAULT_SHRINK,
                    grid: Sequence[float] = OFFSET_GRID, passes: int = 2, progress: bool = False,
                    desc: str = "tune cascade", fallbacks: Sequence[Fallback] = ()) -> ThresholdSpec:
    """Tune the cascade (global start/stop/step and the fallback, then shrunk per-class offsets) on labelled
    probabilities.

    ``fallbacks``: other fallbacks to try besides ``fallback`` (e.g. ``argmax`` beside a "no meaning" class), each
    with its own global search; one replaces ``fallback`` only if it strictly improves the objective.
    Pure and deterministic: the same inputs and seed give the same spec. ``spec.meta`` holds the in-sample scores.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int8)
    if probs.shape != labels.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be the same N x L shape")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    names = tuple(label_names) if label_names is not None else tuple(f"class_{j}" for j in range(probs.shape[1]))
    configured = fallback
    (start, stop, step), value = search_global(probs, labels, objective, n_trials, seed, fallback, progress, desc)
    for fb in dict.fromkeys(f for f in fallbacks if f != configured):  # the global search again with each
        steps, v = search_global(probs, labels, objective, n_trials, seed, fb, progress, f"{desc} (fallback {fb})")
        if v > value + 1e-12:
            (start, stop, step), value, fallback = steps, v, fb
    offsets = None
    if per_class:
        o, v = search_offsets(probs, labels, cascade_steps(start, stop, step), fallback, objective, shrink, grid,
                              passes)
        if v > value and np.any(o != 0):
            offsets, value = tuple(float(x) for x in o), v
    spec = ThresholdSpec(names, start, stop, step, fallback, offsets)
    default = ThresholdSpec(names, fallback=configured)
    spec.meta.update({"objective": objective, "in_sample": {"default": scores(labels, default.decode(probs)),
                                                              "tuned": scores(labels, spec.decode(probs))}})
    return spec


def kfold(n: int, k: int = DEFAULT_KFOLD, seed: int = 0) -> np.ndarray:
    """Seeded shuffled K-fold assignment (fold per row) for when the OOF file carries no folds."""
    if n < 2:
        raise InputError(f"{n} row(s) cannot be split into folds for the nested estimate")
    k = min(k, n)
    order = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, dtype=np.int64)
    folds[order] = np.arange(n) % k
    return folds


def nested_estimate(probs: np.ndarray, labels: np.ndarray, folds: Sequence[int],
                    label_names: Sequence[str] | None = None, fallback: Fallback = DEFAULT_FALLBACK,
                    objective: str = "exact_match", progress: bool = False, strategy: str = "cascade",
                    fold_probs=None, **tune_kwargs) -> dict:
    """Honest estimate of the tuning gain: tune on all folds but one, decode the left-out fold, rotate.

    ``strategy="sets"`` also tunes set decoding (:func:`core.sets.tune_sets`, its cascade candidate the fold's tuned
    cascade, its set priors from the fold's training rows only) and scores it on the left-out fold.
    ``fold_probs``: a function of a fold's training-row mask returning the N x L probabilities that fold uses (e.g.
    a blend whose weights are tuned on those rows only, :func:`infer.blend.nested_blend`); default ``probs``.

    Returns a dict: per-fold scores (default cascade vs tuned, the objective; ``sets`` too with that strategy), and
    the pooled left-out predictions' full scores (``pooled.default`` / ``pooled.tuned`` / ``pooled.sets``), plus
    ``gain`` (pooled tuned - default objective; ``gain_sets``: sets - default).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int8)
    folds = np.asarray(folds)
    uniq = sorted(set(folds.tolist()))
    if len(uniq) < 2:
        raise ValueError("the nested estimate needs at least 2 folds")
    names = tuple(label_names) if label_names is not None else tuple(f"class_{j}" for j in range(probs.shape[1]))
    default = ThresholdSpec(names, fallback=fallback)
    pred_default = np.zeros_like(labels)
    pred_tuned = np.zeros_like(pred_default)
    pred_sets = np.zeros_like(pred_default) if strategy == "sets" else None
    per_fold = []
    bar = progress_bar(len(uniq), "nested estimate", progress)
    for f in uniq:
        test = folds == f
        p = probs if fold_probs is None else np.asarray(fold_probs(~test), dtype=np.float64)
        pred_default[test] = default.decode(p[test])  # row by row: the same as decoding every row at once
        spec = tune_thresholds(p[~test], labels[~test], names, objective=objective, fallback=fallback,
                               **tune_kwargs)
        pred_tuned[test] = spec.decode(p[test])
        extra = {}
        if pred_sets is not None:  # priors from this fold's training rows only
            dec = tune_sets(p[~test], labels[~test], names, spec, objective)
            pred_sets[test] = dec.decode(p[test])
            extra = {"sets": objective_score(labels[test], pred_sets[test], objective), "lambda": dec.lam,
                     "temperature": dec.temperature, "singletons": dec.singletons, "pair_top": dec.pair_top}
        per_fold.append({
            "fold": int(f) if isinstance(f, (int, np.integer)) else f, "rows": int(test.sum()),
            "default": objective_score(labels[test], pred_default[test], objective),
            "tuned": objective_score(labels[test], pred_tuned[test], objective),
            "start": spec.start, "stop": spec.stop, "step": spec.step,
            "tuned_classes": int(np.count_nonzero(spec.class_offsets)) if spec.class_offsets else 0, **extra})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    pooled = {"default": scores(labels, pred_default), "tuned": scores(labels, pred_tuned)}
    out = {"objective": objective, "folds": len(uniq), "per_fold": per_fold, "pooled": pooled,
           "gain": pooled["tuned"][objective] - pooled["default"][objective], "strategy": strategy}
    if pred_sets is not None:
        pooled["sets"] = scores(labels, pred_sets)
        out["gain_sets"] = pooled["sets"][objective] - pooled["default"][objective]
    return out


def resolve_folds(folds: str | Path | None, oof: str | Path, ids, fold_col: np.ndarray | None, kfolds: int,
                  seed: int) -> tuple[np.ndarray, str]:
    """Folds of the OOF rows for a nested estimate: ``folds`` (a folds.csv), the OOF file's fold column, RUN/folds.csv
    beside the OOF file, else a seeded K-fold. Returns (fold per row, where it came from)."""
    fold_of, source = None, None
    if folds is not None:
        fold_of, source = read_folds(folds, oof, ids), str(folds)
    elif fold_col is not None:
        fold_of, source = fold_col, f"the 'fold' column of {oof}"
    elif (Path(oof).parent / "folds.csv").is_file():
        sidecar = Path(oof).parent / "folds.csv"
        fold_of, source = read_folds(sidecar, oof, ids), str(sidecar)
    why = "no fold assignment found"
    if fold_of is not None and len(set(fold_of.tolist())) < 2:
        why, fold_of = f"{source} puts every out-of-fold row in one fold", None
    if fold_of is None:
        fold_of = kfold(len(ids), kfolds, seed)
        source = f"a seeded {len(set(fold_of.tolist()))}-fold split (seed {seed}; {why})"
    return fold_of, source


def check_honest(path: str | Path, nested: bool, opt_out: str) -> str | None:
    """Refuse a nested estimate on a probability file whose scores are optimistic by construction
    (:func:`core.io.optimistic_reason`: e.g. the OOF file of a ``train.keep=best`` run); without one, say so and
    return the reason (None: nothing known against the file).

    Raises:
        InputError: ``nested`` and the file is optimistic.
    """
    reason = optimistic_reason(path)
    if reason and nested:
        raise InputError(f"{path}: {reason}; a nested estimate on it would be optimistic too. Use the out-of-fold "
                         f"file of a train.keep=last run for an honest estimate, or pass {opt_out} to go on "
                         f"without one")
    if reason:
        logger.info(f"note: {path}: {reason}")
    return reason
