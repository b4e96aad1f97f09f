"""Tune a run's decoding end to end, from files: what ``python -m infer tune`` does, and what ``train`` tunes a
final or merged adapter's ``thresholds.json`` with (:func:`train.merge.tune_thresholds`).

:func:`run_tune` reads an out-of-fold probability file and its labels, tunes the cascade
(:mod:`core.threshold_search`), gives an honest nested estimate of the gain, and writes ``thresholds.json`` (nothing
is written unless everything succeeds; with ``out=None`` nothing at all: the caller writes the returned decoder).
``strategy="sets"`` adds set decoding (:mod:`core.sets`: each row's label set chosen among the sets seen in the
labels, the tuned cascade's set and the top singletons / pairs, by likelihood + lambda * log prior), grid-tuned on
top of the tuned cascade with leave-one-out priors, as a third column of the nested estimate (each fold's priors
from its training rows only); the file written is then the set decoder (``"strategy": "sets"``). The report is
logged, never printed.

Python:
    from core.tuning import run_tune
    spec = run_tune("RUN/oof.csv", "train.csv", "thresholds.json")
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from core.decoding import STRATEGIES, default_spec, labels_id_column
from core.errors import InputError
from core.io import align_ids, read_labels, read_oof, versions, write_json
from core.metrics import OBJECTIVES, scores
from core.sets import SetDecoder, is_sets, tune_sets
from core.threshold_search import (
    DEFAULT_KFOLD,
    DEFAULT_SHRINK,
    DEFAULT_TRIALS,
    check_honest,
    nested_estimate,
    resolve_folds,
    tune_thresholds,
)
from core.thresholds import ARGMAX, ThresholdSpec, fallback_name

logger = logging.getLogger(__name__)


def run_tune(oof: str | Path, labels: str | Path, out: str | Path | None, folds: str | Path | None = None,
             objective: str = "exact_match", n_trials: int = DEFAULT_TRIALS, seed: int = 0,
             fallback: str | int | None = None, per_class: bool = True, shrink: float = DEFAULT_SHRINK,
             kfolds: int = DEFAULT_KFOLD, nested: bool = True, progress: bool = True,
             id_column: str | None = None, strategy: str = "cascade") -> ThresholdSpec | SetDecoder:
    """Read, validate, tune, estimate and write ``out`` (nothing is written unless everything succeeds; ``out=None``:
    only returned).

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
    optimistic = check_honest(oof, nested, "--no-nested")
    ids, probs, names, fold_col = read_oof(oof)
    label_ids, y_all = read_labels(labels, names, probs_path=oof, id_column=labels_id_column(oof, id_column))
    y = y_all[align_ids(oof, ids, labels, label_ids)]
    fb = default_spec(oof, names, fallback).fallback
    logger.info(f"tune: {len(ids)} out-of-fold rows x {len(names)} classes from {oof}" +
                (f" ({len(ids)} of {len(label_ids)} labelled rows of {labels})" if len(ids) != len(label_ids)
                 else f"; labels {labels}") + f"; objective {objective}, {n_trials} trials, seed {seed}")

    fold_of, source = resolve_folds(folds, oof, ids, fold_col, kfolds, seed)
    # The fallback is tuned too unless --fallback fixes it: the run's (e.g. a "no meaning" class) or argmax.
    others = () if fallback is not None else (ARGMAX,)
    kw = {"objective": objective, "n_trials": n_trials, "seed": seed, "fallback": fb, "per_class": per_class,
          "shrink": shrink, "fallbacks": others}

    estimate = None
    if nested:
        logger.info(f"nested estimate over {len(set(fold_of.tolist()))} folds from {source}")
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
    logger.info(report(result, estimate))
    if strategy == "sets" and estimate is not None and estimate["pooled"]["sets"][objective] <= \
            estimate["pooled"]["tuned"][objective]:
        logger.info(f"note: set decoding does not beat the tuned cascade in the nested estimate ({objective} "
                    f"{estimate['pooled']['sets'][objective]:.4f} vs {estimate['pooled']['tuned'][objective]:.4f}); "
                    f"{out or 'the result'} holds the set decoding as asked: tune without --strategy sets to keep "
                    f"the cascade")
    if out is None:
        logger.info(f"tuned ({time.time() - t0:.1f} s)")
    else:
        write_json(out, result.to_dict())
        logger.info(f"wrote {out} ({time.time() - t0:.1f} s)")
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
