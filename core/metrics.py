"""Multilabel metrics (pure). Exact-match accuracy is the DLS competition's metric."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def exact_match(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    return float((y_true == y_pred).all(axis=1).mean()) if len(y_true) else float("nan")


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Exact match plus micro/macro/weighted F1 (classes absent from both count as F1 0 in macro)."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    out = {"exact_match": exact_match(y_true, y_pred)}
    for avg in ("micro", "macro", "weighted"):
        out[f"{avg}_f1"] = float(f1_score(y_true, y_pred, average=avg, zero_division=0))
    return out


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    return f1_score(np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int), average=None, zero_division=0)


OBJECTIVES = ("exact_match", "micro_f1")


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Micro-averaged F1 in numpy (same value as sklearn's, much faster in a tuning loop); 0 when nothing is
    predicted or true."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = np.count_nonzero(t & p)
    denom = np.count_nonzero(t) + np.count_nonzero(p)
    return 2.0 * tp / denom if denom else 0.0


def objective_score(y_true: np.ndarray, y_pred: np.ndarray, objective: str = "exact_match") -> float:
    """One of :data:`OBJECTIVES` (the quantity threshold tuning and blending maximise)."""
    if objective == "exact_match":
        return exact_match(y_true, y_pred)
    if objective == "micro_f1":
        return micro_f1(y_true, y_pred)
    raise ValueError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Exact match of ``pred_b`` minus that of ``pred_a`` on the same rows, with a paired bootstrap interval.

    Rows are resampled together (``scipy.stats.bootstrap`` of the per-row differences, percentile interval), so
    the interval is that of the difference, not of either score. Also the rows only one side gets right.
    """
    from scipy.stats import bootstrap

    y_true, pred_a, pred_b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    if not (y_true.shape == pred_a.shape == pred_b.shape) or not len(y_true):
        raise ValueError(f"need the same rows on both sides (labels {y_true.shape}, a {pred_a.shape}, "
                         f"b {pred_b.shape})")
    ok_a, ok_b = (y_true == pred_a).all(axis=1), (y_true == pred_b).all(axis=1)
    d = ok_b.astype(np.float64) - ok_a
    diff = float(d.mean())
    if np.all(d == d[0]):  # no spread: every resample gives the same difference
        lo = hi = diff
    else:
        ci = bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return {"exact_match_a": float(ok_a.mean()), "exact_match_b": float(ok_b.mean()), "difference": diff,
            "low": lo, "high": hi, "confidence": confidence, "rows": len(d),
            "only_a": int((ok_a & ~ok_b).sum()), "only_b": int((ok_b & ~ok_a).sum())}


def by_label_count(y_true: np.ndarray, y_pred: np.ndarray, max_count: int = 4) -> list[dict]:
    """Rows grouped by their true number of labels: where the exact match is won or lost.

    A row's group is its count of true labels, ``0 .. max_count - 1``, the last group ``"<max_count>+"`` holding
    every row with ``max_count`` or more; empty groups are left out. Per group, in order of the count:

    * ``labels``: the group's name (``"0"``, ``"1"``, ..., ``"4+"``);
    * ``rows``: its rows, and ``share``: their fraction of all rows;
    * ``exact_match``: the fraction of its rows whose predicted set is the true set;
    * ``mean_predicted``: the mean number of labels predicted for its rows;
    * ``count_right``: the fraction of its rows predicted with as many labels as they truly have (each row against
      its own count, also in the last group), right labels or not.

    A row with two true labels predicted as one label is wrong and has predicted count 1. The groups' ``rows`` sum to
    all rows, and their exact matches weighted by ``share`` give the overall exact match.

    Args:
        y_true: 0/1 array, rows x labels.
        y_pred: 0/1 array of the same shape.
        max_count: the count from which rows share one group (>= 1).

    Returns:
        One dict per non-empty group; an empty list for no rows.

    Raises:
        ValueError: shapes differ or are not 2-D, or ``max_count`` < 1.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"need two 2-D arrays of the same shape: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    if int(max_count) != max_count or max_count < 1:
        raise ValueError(f"max_count must be an integer >= 1, got {max_count}")
    true_count, pred_count = (y_true != 0).sum(axis=1), (y_pred != 0).sum(axis=1)
    right = (y_true == y_pred).all(axis=1)
    group = np.minimum(true_count, max_count)
    out = []
    for g in range(max_count + 1):
        rows = group == g
        n = int(rows.sum())
        if n:
            out.append({"labels": f"{g}+" if g == max_count else str(g), "rows": n, "share": n / len(y_true),
                        "exact_match": float(right[rows].mean()), "mean_predicted": float(pred_count[rows].mean()),
                        "count_right": float((pred_count[rows] == true_count[rows]).mean())})
    return out


def rare_class_f1(y_true: np.ndarray, y_pred: np.ndarray, max_prevalence: float = 0.01,
                  low_f1: float = 0.3) -> dict:
    """Per-class F1 (:func:`per_class_f1`) summarised over the rare classes and over the frequent ones.

    A class is rare when its positives in ``y_true`` are at least 1 and at most ``max_prevalence`` of the rows
    (``positives / rows <= max_prevalence``), frequent when they are more; a class with no positive is in neither
    group (``absent`` counts them: its F1 says nothing). Per group (``rare``, ``frequent``):

    * ``classes``: how many; ``indices``: which (column indices, rare group only);
    * ``min_positives`` / ``max_positives``: the fewest / most positives of its classes;
    * ``mean_f1``: the unweighted mean of its classes' F1 (a macro F1 over the group);
    * ``below_low_f1``: how many have F1 < ``low_f1``; ``zero_f1``: how many have F1 == 0 (never predicted right).

    A group without classes has ``classes`` 0 and ``None`` for the figures.

    Args:
        y_true: 0/1 array, rows x labels.
        y_pred: 0/1 array of the same shape.
        max_prevalence: the largest fraction of rows a rare class has positive, in (0, 1].
        low_f1: the F1 under which a class counts in ``below_low_f1``.

    Returns:
        ``{"max_prevalence", "low_f1", "rows", "absent", "rare": {...}, "frequent": {...}}``.

    Raises:
        ValueError: shapes differ or are not 2-D, no rows, or ``max_prevalence`` outside (0, 1].
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or not len(y_true):
        raise ValueError(f"need two 2-D arrays of the same shape with rows: y_true {y_true.shape} vs "
                         f"y_pred {y_pred.shape}")
    if not 0 < max_prevalence <= 1:
        raise ValueError(f"max_prevalence must be in (0, 1], got {max_prevalence}")
    positives = (y_true != 0).sum(axis=0)
    f1 = per_class_f1(y_true != 0, y_pred != 0)
    rare = (positives >= 1) & (positives / len(y_true) <= max_prevalence)  # a ratio: 29 / 100 <= 0.29 holds
    frequent = positives / len(y_true) > max_prevalence

    def summary(mask: np.ndarray) -> dict:
        k = int(mask.sum())
        return {"classes": k,
                "min_positives": int(positives[mask].min()) if k else None,
                "max_positives": int(positives[mask].max()) if k else None,
                "mean_f1": float(f1[mask].mean()) if k else None,
                "below_low_f1": int((f1[mask] < low_f1).sum()) if k else None,
                "zero_f1": int((f1[mask] == 0).sum()) if k else None}

    return {"max_prevalence": float(max_prevalence), "low_f1": float(low_f1), "rows": len(y_true),
            "absent": int((positives == 0).sum()),
            "rare": {**summary(rare), "indices": np.flatnonzero(rare).tolist()}, "frequent": summary(frequent)}
