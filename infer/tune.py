"""Tune the cascade decoding on out-of-fold probabilities (``python -m infer tune``).

What is tuned (objective: exact-match accuracy by default, micro-F1 on request):

1. the cascade's global ``start`` / ``stop`` / ``step`` with Optuna (TPE, seeded; the reference cascade
   0.55 / 0.20 / 0.05 is the first trial, so the in-sample result is never worse than it);
2. per-class offsets added to every cascade threshold of a class (``ThresholdSpec.class_offsets``): coordinate
   search over a grid, class by class (deterministic); each class's best offset is shrunk toward 0 (= the global
   thresholds) by ``n_pos / (n_pos + k)`` so that rare classes do not overfit, and kept only if the shrunk offset
   still improves the objective.

The honest estimate of the gain is nested: for each fold, tune on the other folds and score the left-out one with
the default cascade and with the tuned decoding; the left-out predictions are pooled over the folds.

``--strategy sets`` adds set decoding (:mod:`core.sets`: each row's label set chosen among the sets seen in the
labels, the tuned cascade's set and the top singletons / pairs, by likelihood + lambda * log prior), grid-tuned on
top of the tuned cascade with leave-one-out priors, as a third column of the nested estimate (each fold's priors from
its training rows only); the file written is then the set decoder (``"strategy": "sets"``).

Usage:
    python -m infer tune --oof RUN/oof.csv --labels train.csv --out thresholds.json [--folds RUN/folds.csv]
                         [--strategy sets]

Python:
    from infer.tune import tune_thresholds, nested_estimate
    spec = tune_thresholds(probs, labels, label_names, objective="exact_match", n_trials=200, seed=0)
    est = nested_estimate(probs, labels, folds, label_names)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.config import ConfigError, DecodeArgs, RunConfig
from core.errors import InputError
from core.io import (ID_COLUMN, align_ids, meta_path, optimistic_reason, progress_bar, read_folds, read_labels,
                     read_oof, versions, write_json)
from core.metrics import OBJECTIVES, objective_score, scores
from core.sets import SetDecoder, is_sets, tune_sets
from core.thresholds import (
    ARGMAX,
    DEFAULT_FALLBACK,
    DEFAULT_START,
    DEFAULT_STEP,
    DEFAULT_STOP,
    Fallback,
    ThresholdSpec,
    apply_fallback,
    cascade_steps,
    check_fallback,
    decode_global,
    fallback_name,
)
from core.thresholds import resolve_fallback as core_resolve_fallback

DEFAULT_TRIALS = 200
DEFAULT_SHRINK = 20.0
DEFAULT_KFOLD = 5
STRATEGIES = ("cascade", "sets")
OFFSET_GRID = tuple(round(x, 10) for x in np.arange(-0.30, 0.30 + 1e-9, 0.02))
# Search space of the global cascade (Optuna, discrete steps so that the reference values are on the grid).
START_RANGE, STOP_RANGE, STEP_RANGE = (0.20, 0.90, 0.01), (0.02, 0.60, 0.01), (0.01, 0.15, 0.005)


# ---------------------------------------------------------------------------------------------------------------
# Pure tuning math
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Files: thresholds.json, folds, fallback
# ---------------------------------------------------------------------------------------------------------------


def read_thresholds(path: str | Path) -> ThresholdSpec | SetDecoder:
    """Read and validate a ``thresholds.json``: a cascade (``ThresholdSpec.to_dict()`` + meta, files without a
    ``strategy`` key included) or, with ``"strategy": "sets"``, a :class:`core.sets.SetDecoder` (its cascade
    candidate's fields at the top level plus a ``sets`` object). Both have ``.decode(probs)`` and ``.label_names``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: thresholds file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None
    names = d.get("label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: key 'label_names' must be a non-empty list of strings")
    known = {"label_names", "start", "stop", "step", "fallback", "class_offsets", "meta"}
    try:
        spec = ThresholdSpec.from_dict({k: v for k, v in d.items() if k in known})
        spec.steps  # noqa: B018 - validates start/stop/step
        check_fallback(spec.fallback, len(names))
        if spec.class_offsets is not None and len(spec.class_offsets) != len(names):
            raise ValueError(f"class_offsets has {len(spec.class_offsets)} values for {len(names)} labels")
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid thresholds: {e}") from None
    strategy = d.get("strategy", "cascade")
    if strategy == "cascade":
        return spec
    if strategy != "sets":
        raise InputError(f"{path}: unknown decoding strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    try:
        return SetDecoder.from_dict({**d, "meta": spec.meta})
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid set decoding: {type(e).__name__} {e}") from None


def check_spec_labels(spec: ThresholdSpec | SetDecoder, spec_path, label_names: Sequence[str], probs_path) -> None:
    """The thresholds must be for the probability file's label set (the order may differ)."""
    if set(spec.label_names) == set(label_names) and len(spec.label_names) == len(label_names):
        return
    a, b = list(spec.label_names), list(label_names)
    only_spec = [n for n in a if n not in set(b)]
    only_probs = [n for n in b if n not in set(a)]
    raise InputError(f"{spec_path}: thresholds are for a different label set than {probs_path} "
                     f"({len(a)} vs {len(b)} labels; only in the thresholds: {only_spec[:5]}, only in the "
                     f"probability file: {only_probs[:5]})")


def resolve_fallback(label_names: Sequence[str], fallback, path, given: bool = True) -> Fallback:
    """``--fallback`` (a label name, a class id as written in submissions, 'argmax' or 'none') -> what
    :func:`core.thresholds.cascade` takes; errors name ``path`` and the valid values."""
    try:
        return core_resolve_fallback(label_names, fallback)
    except ValueError as e:
        raise InputError(f"{'--fallback' if given else path}: {e}") from None


def adapter_default_spec(ref) -> ThresholdSpec:
    """The cascade of an adapter's config (its ``decode`` section; ``ref`` a :class:`core.adapter.AdapterRef`).

    Raises:
        InputError: its ``decode.fallback`` is not one of its labels.
    """
    try:
        return ThresholdSpec.from_decode(ref.label_names, ref.cfg.decode)
    except ValueError as e:
        raise InputError(f"{ref.folder / 'run_config.yaml'}: decode.fallback: {e}") from None


def adapter_spec(ref, thresholds: str | Path | None = None) -> ThresholdSpec | SetDecoder:
    """An adapter's decoding (serve, ui): ``thresholds`` (a ``thresholds.json``, cascade or sets, checked against its
    labels and put in their order), else its config's ``decode`` section (:func:`adapter_default_spec`)."""
    if thresholds is None:
        return adapter_default_spec(ref)
    spec = read_thresholds(thresholds)
    check_spec_labels(spec, thresholds, ref.label_names, ref.folder / "label_names.json")
    if is_sets(spec):
        return spec.reorder(ref.label_names)
    if list(spec.label_names) != list(ref.label_names):  # same set, other order: reorder the offsets
        if spec.class_offsets is not None:
            pos = {n: i for i, n in enumerate(spec.label_names)}
            offsets = tuple(spec.class_offsets[pos[n]] for n in ref.label_names)
        else:
            offsets = None
        fb = spec.fallback if spec.fallback in (None, ARGMAX) else \
            list(ref.label_names).index(spec.label_names[spec.fallback])
        spec = ThresholdSpec(tuple(ref.label_names), spec.start, spec.stop, spec.step, fb, offsets, spec.meta)
    return spec


def run_config_of(probs_path: str | Path) -> tuple[RunConfig | None, str]:
    """The config of the run that produced a probability file, and where it was found (None: not found).

    Looked up in the file's ``.meta.json`` (``config`` of an out-of-fold file, or the ``adapters`` of a
    ``predict`` output), then ``run_config.yaml`` beside the file.
    """
    probs_path = Path(probs_path)
    candidates: list[tuple[dict | Path, str]] = []
    meta_file = meta_path(probs_path)
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            candidates.append((meta["config"], str(meta_file)))
        for a in (meta.get("adapters") or []) if isinstance(meta, dict) else []:
            folder = Path(str(a.get("folder", ""))) if isinstance(a, dict) else None
            if folder is not None and (folder / "run_config.yaml").is_file():
                candidates.append((folder / "run_config.yaml", str(folder / "run_config.yaml")))
                break
    if (probs_path.parent / "run_config.yaml").is_file():
        candidates.append((probs_path.parent / "run_config.yaml", str(probs_path.parent / "run_config.yaml")))
    for raw, source in candidates:
        try:
            return (RunConfig.from_dict(raw, source) if isinstance(raw, dict) else RunConfig.from_yaml(raw)), source
        except ConfigError:
            continue
    return None, "no run config found beside the file"


def labels_id_column(probs_path: str | Path, given: str | None = None) -> str:
    """The id column of the labelled / test CSV that goes with a probability file: ``--id-column`` if given, else
    the producing run's ``data.id_column``, else the probability file's own ``index``."""
    if given:
        return given
    cfg, _ = run_config_of(probs_path)
    return cfg.data.id_column if cfg is not None else ID_COLUMN


def default_spec(probs_path: str | Path, label_names: Sequence[str], fallback=None, log=print) -> ThresholdSpec:
    """The cascade of the run that produced ``probs_path`` (its ``decode`` section, :func:`run_config_of`), else
    the generic default (argmax fallback, said in a note); ``--fallback`` overrides the fallback.

    Raises:
        InputError: the configured or given fallback is not one of the file's labels.
    """
    cfg, source = run_config_of(probs_path)
    decode = cfg.decode if cfg is not None else DecodeArgs()
    if fallback is not None:
        fb = resolve_fallback(label_names, fallback, probs_path, True)
    else:
        if cfg is None:  # a file from elsewhere: its run's fallback class is unknown
            log(f"note: {probs_path}: no run config in its .meta.json or beside it: the default cascade falls back "
                f"to {decode.fallback} (pass --fallback to choose)")
        try:
            fb = core_resolve_fallback(label_names, decode.fallback)
        except ValueError as e:
            raise InputError(f"{probs_path}: decode.fallback of {source}: {e}; pass --fallback") from None
    return ThresholdSpec(tuple(label_names), decode.start, decode.stop, decode.step, fb)


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


def check_honest(path: str | Path, nested: bool, opt_out: str, log=print) -> str | None:
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
        log(f"note: {path}: {reason}")
    return reason


def run_tune(oof: str | Path, labels: str | Path, out: str | Path, folds: str | Path | None = None,
             objective: str = "exact_match", n_trials: int = DEFAULT_TRIALS, seed: int = 0,
             fallback: str | int | None = None, per_class: bool = True, shrink: float = DEFAULT_SHRINK,
             kfolds: int = DEFAULT_KFOLD, nested: bool = True, progress: bool = True, log=print,
             id_column: str | None = None, strategy: str = "cascade") -> ThresholdSpec | SetDecoder:
    """Read, validate, tune, estimate and write ``out`` (nothing is written unless everything succeeds).

    ``strategy="sets"`` also tunes set decoding on top of the tuned cascade (its candidate), reports it as a third
    column and writes the :class:`core.sets.SetDecoder` (priors from every labelled out-of-fold row).
    """
    t0 = time.time()
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if n_trials < 1:
        raise InputError(f"--n-trials must be >= 1, got {n_trials}")
    optimistic = check_honest(oof, nested, "--no-nested", log)
    ids, probs, names, fold_col = read_oof(oof)
    label_ids, y_all = read_labels(labels, names, probs_path=oof, id_column=labels_id_column(oof, id_column))
    y = y_all[align_ids(oof, ids, labels, label_ids)]
    fb = default_spec(oof, names, fallback, log=log).fallback
    log(f"tune: {len(ids)} out-of-fold rows x {len(names)} classes from {oof}" +
        (f" ({len(ids)} of {len(label_ids)} labelled rows of {labels})" if len(ids) != len(label_ids)
         else f"; labels {labels}") + f"; objective {objective}, {n_trials} trials, seed {seed}")

    fold_of, source = resolve_folds(folds, oof, ids, fold_col, kfolds, seed)
    # The fallback is tuned too unless --fallback fixes it: the run's (e.g. a "no meaning" class) or argmax.
    others = () if fallback is not None else (ARGMAX,)
    kw = dict(objective=objective, n_trials=n_trials, seed=seed, fallback=fb, per_class=per_class, shrink=shrink,
              fallbacks=others)

    estimate = None
    if nested:
        log(f"nested estimate over {len(set(fold_of.tolist()))} folds from {source}")
        estimate = nested_estimate(probs, y, fold_of, names, progress=progress, strategy=strategy, **kw)
    spec = tune_thresholds(probs, y, names, progress=progress, desc="tune on all folds", **kw)
    spec.meta.update({
        "produced_by": "python -m infer tune", "oof": str(oof), "labels": str(labels), "rows": len(ids),
        "objective": objective, "n_trials": int(n_trials), "seed": int(seed), "per_class": per_class,
        "shrink_k": float(shrink), "fallback_class": fallback_name(names, spec.fallback),
        "fallback_candidates": list(dict.fromkeys(fallback_name(names, f) for f in (fb, *others))),
        "folds_source": source, "nested": estimate, "versions": versions(),
        **({"optimistic": optimistic} if optimistic else {})})
    result = spec
    if strategy == "sets":
        dec = tune_sets(probs, y, names, ThresholdSpec(spec.label_names, spec.start, spec.stop, spec.step,
                                                       spec.fallback, spec.class_offsets), objective)
        spec.meta["in_sample"]["sets"] = scores(y, dec.decode(probs))
        result = SetDecoder(**{**{f: getattr(dec, f) for f in ("label_names", "sets", "log_priors",
                                                                 "floor_log_prior", "lam", "temperature",
                                                                 "singletons", "pair_top", "cascade")},
                               "meta": {**spec.meta, "strategy": "sets", "set_priors": dec.meta}})
    log(report(result, estimate))
    if strategy == "sets" and estimate is not None and estimate["pooled"]["sets"][objective] <= \
            estimate["pooled"]["tuned"][objective]:
        log(f"note: set decoding does not beat the tuned cascade in the nested estimate ({objective} "
            f"{estimate['pooled']['sets'][objective]:.4f} vs {estimate['pooled']['tuned'][objective]:.4f}); "
            f"{out} holds the set decoding as asked: tune without --strategy sets to keep the cascade")
    write_json(out, result.to_dict())
    log(f"wrote {out} ({time.time() - t0:.1f} s)")
    return result


def report(spec: ThresholdSpec | SetDecoder, estimate: dict | None) -> str:
    """Default cascade vs tuned (and set decoding, when ``spec`` is one), side by side: nested (honest) and
    in-sample (optimistic)."""
    sets = is_sets(spec)
    casc = spec.cascade if sets else spec
    ins = spec.meta["in_sample"]
    has_sets = estimate is not None and "sets" in estimate["pooled"]
    lines = []
    if estimate is not None:
        obj = estimate["objective"]
        lines += [f"nested estimate ({obj}; tuned on the other folds, scored on the left-out fold):",
                  f"  {'fold':>6} {'rows':>6} {'default':>9} {'tuned':>9} {'gain':>8}" +
                  (f" {'sets':>9} {'gain':>8}" if has_sets else "")]
        for r in estimate["per_fold"]:
            line = (f"  {r['fold']:>6} {r['rows']:>6} {r['default']:>9.4f} {r['tuned']:>9.4f} "
                    f"{r['tuned'] - r['default']:>+8.4f}")
            if has_sets:
                line += f" {r['sets']:>9.4f} {r['sets'] - r['default']:>+8.4f}"
            lines.append(line)
    head = f"  {'metric':<12} {'default cascade':>16}"
    if estimate is not None:
        head += f" {'tuned (nested)':>15} {'gain':>8}"
        if has_sets:
            head += f" {'sets (nested)':>14} {'gain':>8}"
    head += f" {'tuned (in-sample)':>18}"
    if sets:
        head += f" {'sets (in-sample)':>17}"
    lines += ["scores (default cascade = the run's decode section, fallback as configured):", head]
    for m in ("exact_match", "micro_f1", "macro_f1", "weighted_f1"):
        row = f"  {m:<12} {ins['default'][m]:>16.4f}"
        if estimate is not None:
            d, t = estimate["pooled"]["default"][m], estimate["pooled"]["tuned"][m]
            row = f"  {m:<12} {d:>16.4f} {t:>15.4f} {t - d:>+8.4f}"
            if has_sets:
                v = estimate["pooled"]["sets"][m]
                row += f" {v:>14.4f} {v - d:>+8.4f}"
        row += f" {ins['tuned'][m]:>18.4f}"
        if sets:
            row += f" {ins['sets'][m]:>17.4f}"
        lines.append(row)
    n_off = sum(1 for x in (casc.class_offsets or ()) if x != 0)
    lines.append(f"tuned decoding: start {casc.start:g}, stop {casc.stop:g}, step {casc.step:g} "
                 f"({len(casc.steps)} thresholds), fallback "
                 f"{fallback_name(casc.label_names, casc.fallback)}, per-class offsets on "
                 f"{n_off} class(es)")
    if sets:
        lines.append(f"set decoding (written): lambda {spec.lam:g}, temperature {spec.temperature:g}, "
                     f"{len(spec.sets)} candidate sets seen in {spec.meta['set_priors']['train_rows']} rows, "
                     f"top {spec.singletons} singletons, pairs of the top {spec.pair_top} labels, and the tuned "
                     f"cascade's set above")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="tune the cascade (or set) decoding on out-of-fold probabilities",
        description="Tune the cascade's start/stop/step (Optuna, seeded) and shrunk per-class offsets on out-of-fold "
                    "probabilities; print an honest nested estimate of the gain and write thresholds.json.")
    p.add_argument("--oof", required=True, help="out-of-fold probability CSV (e.g. RUN/oof.csv)")
    p.add_argument("--labels", required=True, help="labelled CSV with the same ids (e.g. train.csv)")
    p.add_argument("--out", required=True, help="thresholds JSON to write")
    p.add_argument("--folds", help="folds CSV (index, fold) for the nested estimate (default: RUN/folds.csv beside "
                                   "the OOF file, a 'fold' column, else a seeded K-fold split)")
    p.add_argument("--objective", choices=OBJECTIVES, default="exact_match")
    p.add_argument("--n-trials", type=int, default=DEFAULT_TRIALS, help="Optuna trials for start/stop/step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-column",
                   help="id column of the labelled / --ids CSV (default: the run's data.id_column, else index)")
    p.add_argument("--fallback", help="for rows no threshold selects: a label name, a class id, 'argmax' or 'none' "
                                      "(fixed; default: tuned, decode.fallback of the run that wrote the file or "
                                      "argmax, whichever scores better)")
    p.add_argument("--no-per-class", action="store_true", help="tune only the global cascade")
    p.add_argument("--shrink", type=float, default=DEFAULT_SHRINK,
                   help="k of the per-class shrinkage n_pos / (n_pos + k) (0 = none)")
    p.add_argument("--kfold", type=int, default=DEFAULT_KFOLD, help="folds of the fallback split")
    p.add_argument("--strategy", choices=STRATEGIES, default="cascade",
                   help="sets: also tune set decoding (label sets seen in the labels, with a prior; the tuned cascade's "
                        "set a candidate), report it beside the cascades and write it")
    p.add_argument("--no-nested", action="store_true", help="skip the nested estimate")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)
    return p


def _cli(args) -> int:
    try:
        if args.shrink < 0:
            raise InputError(f"--shrink must be >= 0, got {args.shrink}")
        if args.kfold < 2:
            raise InputError(f"--kfold must be >= 2, got {args.kfold}")
        run_tune(args.oof, args.labels, args.out, folds=args.folds, objective=args.objective,
                 n_trials=args.n_trials, seed=args.seed, fallback=args.fallback, per_class=not args.no_per_class,
                 shrink=args.shrink, kfolds=args.kfold, nested=not args.no_nested, progress=not args.no_progress,
                 id_column=args.id_column, strategy=args.strategy)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
