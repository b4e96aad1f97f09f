"""Set decoding: pick each row's label set among candidates by likelihood plus a set prior. numpy only.

For a row with (optionally temperature-calibrated) probabilities ``p``, a candidate set ``S`` scores::

    sum_{i in S} log p_i + sum_{i not in S} log(1 - p_i) + lambda * log prior(S)

and the best candidate wins. Candidates are the label sets seen in the training labels (prior: their smoothed
frequency ``(count + alpha) / (n + alpha * (K + 1))`` for K distinct sets over n rows), the cascade's own set for the
row, the row's ``singletons`` most probable labels alone, and every pair of its ``pair_top`` most probable labels.
A set never seen in training is reachable through the last three with the smoothing's floor prior
``alpha / (n + alpha * (K + 1))``. A dynamic candidate that is also a seen set is scored with the floor prior; the
seen copy (prior >= floor, lambda >= 0) scores at least as high, so this is the same as looking its prior up.

Temperature ``T`` calibrates as ``sigmoid(logit(p) / T)``. All rows are scored at once with matrix operations on the
log-odds (the sum of ``log(1 - p)`` over all labels is shared by every candidate of a row and drops out). Because of
that, a row's score is ``sum_{i in S} logit(p_i) / T + lambda * log prior(S)`` plus a constant, so the chosen set
depends on ``lambda * T`` only: the temperature matters beside lambda only as this product (tuning both searches
the product on a finer grid).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from core.thresholds import ThresholdSpec

STRATEGY = "sets"
EPS = 1e-7
DEFAULT_LAMBDA, DEFAULT_TEMPERATURE, DEFAULT_SINGLETONS, DEFAULT_PAIR_TOP, DEFAULT_ALPHA = 1.0, 1.0, 3, 4, 1.0
# The grid of tune_sets: exhaustive, hence deterministic without a seed.
LAMBDA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
TEMPERATURE_GRID = (0.5, 0.7, 1.0, 1.4, 2.0)
RULES_GRID = ((0, 0), (3, 0), (3, 4))
"""(singletons, pair_top) pairs tried by :func:`tune_sets`."""
SOURCES = ("seen", "cascade", "singleton", "pair")
"""What :meth:`SetDecoder.decode_with_source` reports per row, by position."""


def log_odds(probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``logit(p) / T`` with ``p`` clipped to ``[EPS, 1 - EPS]`` (N x L float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return (np.log(p) - np.log1p(-p)) / float(temperature)


def log_likelihood(probs: np.ndarray, preds: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per row ``sum log q(in) + sum log(1 - q(out))`` of the 0/1 sets ``preds`` under the calibrated ``q``."""
    z = log_odds(probs, temperature)
    log1m = -np.logaddexp(0.0, z)  # log(1 - sigmoid(z))
    return log1m.sum(axis=1) + (z * np.asarray(preds, dtype=np.float64)).sum(axis=1)


def set_matrix(sets: Sequence[Sequence[int]], n_labels: int) -> np.ndarray:
    """K x L int8 membership matrix of label-index sets."""
    m = np.zeros((len(sets), n_labels), dtype=np.int8)
    for k, s in enumerate(sets):
        m[k, list(s)] = 1
    return m


def count_sets(labels: np.ndarray) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """Distinct label sets of 0/1 ``labels`` (most frequent first, ties in index order) and their counts."""
    y = np.asarray(labels).astype(np.int8)
    if y.ndim != 2 or not len(y):
        raise ValueError(f"labels must be a non-empty N x L 0/1 array, got shape {y.shape}")
    uniq, counts = np.unique(y, axis=0, return_counts=True)
    sets = [tuple(int(i) for i in np.flatnonzero(u)) for u in uniq]
    order = sorted(range(len(sets)), key=lambda k: (-counts[k], sets[k]))
    return tuple(sets[k] for k in order), counts[order].astype(np.int64)


def smoothed_log_priors(counts: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, float]:
    """``log((count + alpha) / (n + alpha * (K + 1)))`` per seen set and the floor ``log(alpha / ...)`` of an unseen
    one (``alpha`` > 0 keeps the floor finite)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    counts = np.asarray(counts, dtype=np.float64)
    z = float(n) + alpha * (len(counts) + 1)
    return np.log(counts + alpha) - np.log(z), float(np.log(alpha) - np.log(z))


@dataclass(frozen=True)
class _Candidates:
    """Every candidate's log-likelihood (up to each row's shared constant) and how to rebuild its set."""

    seen: np.ndarray  # N x K
    cascade: np.ndarray  # N x 1
    singles: np.ndarray  # N x S
    pairs: np.ndarray  # N x P
    cascade_preds: np.ndarray  # N x L int8
    top: np.ndarray  # N x max(S, pair_top) label indices, most probable first
    pair_index: np.ndarray  # P x 2 positions into ``top``


def _candidates(probs: np.ndarray, matrix: np.ndarray, cascade: ThresholdSpec | None, temperature: float,
               singletons: int, pair_top: int) -> _Candidates:
    """Score every candidate of every row (pure matrix ops; the cascade runs on the uncalibrated ``probs``)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (rows x classes), got shape {probs.shape}")
    n, n_labels = probs.shape
    z = log_odds(probs, temperature)
    seen = z @ matrix.T.astype(np.float64)
    if cascade is not None:
        cpred = cascade.decode(probs)
        cscore = (z * cpred).sum(axis=1, keepdims=True)
    else:
        cpred = np.zeros((n, n_labels), dtype=np.int8)
        cscore = np.empty((n, 0))
    singletons, pair_top = min(int(singletons), n_labels), min(int(pair_top), n_labels)
    k = max(singletons, pair_top)
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]
    zt = np.take_along_axis(z, top, axis=1)
    pair_index = np.array(list(itertools.combinations(range(pair_top), 2)), dtype=np.int64).reshape(-1, 2)
    pairs = zt[:, pair_index[:, 0]] + zt[:, pair_index[:, 1]] if len(pair_index) else np.empty((n, 0))
    return _Candidates(seen, cscore, zt[:, :singletons], pairs, cpred, top, pair_index)


def _choose(c: _Candidates, seen_prior: np.ndarray, floor: float, lam: float,
           seen_mask: np.ndarray | None = None) -> np.ndarray:
    """Index of each row's best candidate in the order seen | cascade | singletons | pairs (first max wins).

    ``seen_prior``: log prior per seen set (K) or per row and set (N x K, e.g. leave-one-out); ``seen_mask``
    (N x K bool, optional) drops seen candidates from some rows.
    """
    seen = c.seen + lam * seen_prior
    if seen_mask is not None:
        seen = np.where(seen_mask, seen, -np.inf)
    dyn = np.concatenate([c.cascade, c.singles, c.pairs], axis=1) + lam * floor
    return np.concatenate([seen, dyn], axis=1).argmax(axis=1)


def _materialise(c: _Candidates, matrix: np.ndarray, winner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0/1 sets (N x L int8) of the winning candidates, and which kind won (index into :data:`SOURCES`)."""
    n, n_labels = c.cascade_preds.shape
    k, nc, ns = c.seen.shape[1], c.cascade.shape[1], c.singles.shape[1]
    rows = np.arange(n)
    preds = np.zeros((n, n_labels), dtype=np.int8)
    source = np.zeros(n, dtype=np.int8)
    is_seen = winner < k
    preds[is_seen] = matrix[winner[is_seen]]
    is_casc = (winner >= k) & (winner < k + nc)
    preds[is_casc] = c.cascade_preds[is_casc]
    source[is_casc] = 1
    j = winner - k - nc
    is_single = (j >= 0) & (j < ns)
    r = rows[is_single]
    preds[r, c.top[r, j[is_single]]] = 1
    source[is_single] = 2
    jp = j - ns
    is_pair = jp >= 0
    r = rows[is_pair]
    for col in (0, 1):
        preds[r, c.top[r, c.pair_index[jp[is_pair], col]]] = 1
    source[is_pair] = 3
    return preds, source


@dataclass(frozen=True)
class SetDecoder:
    """Set decoding (see the module docstring), saved in ``thresholds.json`` as a cascade file (its cascade
    candidate's fields at the top level) plus ``"strategy": "sets"`` and a ``"sets"`` object."""

    label_names: tuple[str, ...]
    sets: tuple[tuple[int, ...], ...]
    """Candidate sets seen in training, as label indices."""
    log_priors: tuple[float, ...]
    floor_log_prior: float
    """Log prior of a set never seen in training (the smoothing's floor)."""
    lam: float = DEFAULT_LAMBDA
    temperature: float = DEFAULT_TEMPERATURE
    singletons: int = DEFAULT_SINGLETONS
    pair_top: int = DEFAULT_PAIR_TOP
    cascade: ThresholdSpec | None = None
    """The cascade whose set is a candidate of each row; None: the default cascade (argmax fallback)."""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n_labels = len(self.label_names)
        if len(self.sets) != len(self.log_priors):
            raise ValueError(f"{len(self.sets)} sets but {len(self.log_priors)} log priors")
        if any(not 0 <= i < n_labels for s in self.sets for i in s):
            raise ValueError(f"a candidate set has a label index outside 0..{n_labels - 1}")
        if not self.lam >= 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.singletons < 0 or self.pair_top < 0:
            raise ValueError(f"singletons and pair_top must be >= 0, got {self.singletons}, {self.pair_top}")
        if self.log_priors and self.floor_log_prior > min(self.log_priors) + 1e-12:
            raise ValueError("the floor prior must not exceed any seen set's prior")
        if self.cascade is None:
            object.__setattr__(self, "cascade", ThresholdSpec(tuple(self.label_names)))
        elif tuple(self.cascade.label_names) != tuple(self.label_names):
            raise ValueError("the cascade candidate must have the same labels, in the same order")

    strategy = STRATEGY

    @classmethod
    def fit(cls, labels: np.ndarray, label_names: Sequence[str] | None = None, cascade: ThresholdSpec | None = None,
            lam: float = DEFAULT_LAMBDA, temperature: float = DEFAULT_TEMPERATURE,
            singletons: int = DEFAULT_SINGLETONS, pair_top: int = DEFAULT_PAIR_TOP,
            alpha: float = DEFAULT_ALPHA) -> SetDecoder:
        """Candidate sets and smoothed priors from training labels (N x L 0/1).

        Args:
            labels: the training rows' labels; only these give the priors.
            label_names: column names (default ``class_0`` ...).
            cascade: the cascade whose per-row set is a candidate (default: the reference cascade, argmax fallback).
            lam: weight of the log prior (0: likelihood only).
            temperature: calibration ``sigmoid(logit(p) / T)``.
            singletons: how many of a row's most probable labels are candidates alone.
            pair_top: every pair of a row's ``pair_top`` most probable labels is a candidate.
            alpha: additive smoothing of the set frequencies (> 0).
        """
        y = np.asarray(labels)
        names = tuple(label_names) if label_names is not None else tuple(f"class_{j}" for j in range(y.shape[1]))
        sets, counts = count_sets(y)
        lp, floor = smoothed_log_priors(counts, len(y), alpha)
        return cls(names, sets, tuple(float(x) for x in lp), floor, float(lam), float(temperature), int(singletons),
                   int(pair_top), cascade, {"counts": [int(c) for c in counts], "alpha": float(alpha),
                                            "train_rows": len(y)})

    @property
    def matrix(self) -> np.ndarray:
        return set_matrix(self.sets, len(self.label_names))

    @property
    def fallback(self):
        """The cascade candidate's fallback (what reports show as this decoding's fallback)."""
        return self.cascade.fallback

    def decode_with_source(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N x L int8 sets, per-row index into :data:`SOURCES` of the kind of candidate that won)."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.label_names):
            raise ValueError(f"probs must be N x {len(self.label_names)}, got shape {probs.shape}")
        m = self.matrix
        c = _candidates(probs, m, self.cascade, self.temperature, self.singletons, self.pair_top)
        winner = _choose(c, np.asarray(self.log_priors, dtype=np.float64), self.floor_log_prior, self.lam)
        return _materialise(c, m, winner)

    def decode(self, probs: np.ndarray) -> np.ndarray:
        """N x L int8 0/1 predictions."""
        return self.decode_with_source(probs)[0]

    def with_cascade(self, cascade: ThresholdSpec) -> SetDecoder:
        return replace(self, cascade=cascade)

    def reorder(self, label_names: Sequence[str]) -> SetDecoder:
        """The same decoding for columns in ``label_names`` order (the same label set)."""
        names = tuple(label_names)
        if sorted(names) != sorted(self.label_names):
            raise ValueError("reorder needs the same label set")
        if names == tuple(self.label_names):
            return self
        new = {n: i for i, n in enumerate(names)}
        pos = [new[n] for n in self.label_names]
        c = self.cascade
        offsets = None if c.class_offsets is None else tuple(c.class_offsets[self.label_names.index(n)] for n in names)
        fb = c.fallback if c.fallback is None or isinstance(c.fallback, str) else pos[c.fallback]
        casc = ThresholdSpec(names, c.start, c.stop, c.step, fb, offsets, c.meta)
        sets = tuple(tuple(sorted(pos[i] for i in s)) for s in self.sets)
        return replace(self, label_names=names, sets=sets, cascade=casc)

    def to_dict(self) -> dict:
        d = self.cascade.to_dict()
        d.pop("meta", None)
        d["strategy"] = STRATEGY
        d["sets"] = {"lambda": self.lam, "temperature": self.temperature, "singletons": self.singletons,
                     "pair_top": self.pair_top, "floor_log_prior": self.floor_log_prior,
                     "candidates": [list(s) for s in self.sets], "log_priors": list(self.log_priors)}
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SetDecoder:
        s = d["sets"]
        known = {"label_names", "start", "stop", "step", "fallback", "class_offsets"}
        casc = ThresholdSpec.from_dict({k: v for k, v in d.items() if k in known})
        return cls(tuple(d["label_names"]), tuple(tuple(int(i) for i in c) for c in s["candidates"]),
                   tuple(float(x) for x in s["log_priors"]), float(s["floor_log_prior"]), float(s["lambda"]),
                   float(s["temperature"]), int(s["singletons"]), int(s["pair_top"]), casc, dict(d.get("meta") or {}))


def is_sets(spec) -> bool:
    """Whether a decoding (what ``core.decoding.read_thresholds`` returns) is a :class:`SetDecoder`."""
    return isinstance(spec, SetDecoder)


def cascade_of(spec):
    """The cascade of a decoding: the spec itself, or a :class:`SetDecoder`'s cascade candidate."""
    return spec.cascade if isinstance(spec, SetDecoder) else spec


def _objective(y: np.ndarray, preds: np.ndarray, objective: str) -> float:
    """Exact match or micro-F1 in numpy (the values of :func:`core.metrics.objective_score`, without its sklearn
    import: this module stays numpy only)."""
    if objective == "exact_match":
        return float((y == preds).all(axis=1).mean())
    if objective == "micro_f1":
        t, p = y.astype(bool), preds.astype(bool)
        denom = np.count_nonzero(t) + np.count_nonzero(p)
        return 2.0 * np.count_nonzero(t & p) / denom if denom else 0.0
    raise ValueError(f"unknown objective {objective!r} (exact_match or micro_f1)")


def tune_sets(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None = None,
              cascade: ThresholdSpec | None = None, objective: str = "exact_match",
              lambdas: Sequence[float] = LAMBDA_GRID, temperatures: Sequence[float] = TEMPERATURE_GRID,
              rules: Sequence[tuple[int, int]] = RULES_GRID, alpha: float = DEFAULT_ALPHA) -> SetDecoder:
    """Grid search of lambda, temperature and (singletons, pair_top) on labelled (out-of-fold) probabilities.

    Priors come from ``labels`` (the rows tuned on), leave-one-out while scoring: a row's own set counts one less
    (and is no seen candidate of that row if it occurs only there), so lambda is not rewarded for recalling the row
    itself. Exhaustive and deterministic; ties go to the first grid point (temperature, then lambda, then rules, in
    the given orders).

    Args:
        probs: N x L out-of-fold probabilities of the rows tuned on.
        labels: their N x L 0/1 labels (the only source of the priors).
        label_names: column names (default ``class_0`` ...).
        cascade: the cascade candidate (e.g. the cascade tuned on the same rows); default the reference cascade.
        objective: one of :data:`core.metrics.OBJECTIVES`.
        lambdas, temperatures, rules: the grid.
        alpha: additive smoothing of the set frequencies.

    Returns:
        The best :class:`SetDecoder`, priors from all of ``labels``; ``meta["tuned_value_loo"]`` is its
        leave-one-out objective on these rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int8)
    if probs.shape != y.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and labels {y.shape} must be the same N x L shape")
    base = SetDecoder.fit(y, label_names, cascade, alpha=alpha)
    m = base.matrix
    counts = np.asarray(base.meta["counts"], dtype=np.float64)
    lp = np.asarray(base.log_priors)
    z_norm = float(len(y)) + alpha * (len(counts) + 1)
    # Each row's own set: its column among the seen sets (every training row has one).
    key = {s: k for k, s in enumerate(base.sets)}
    own = np.array([key[tuple(np.flatnonzero(r).tolist())] for r in y], dtype=np.int64)
    rows = np.arange(len(y))
    prior = np.broadcast_to(lp, (len(y), len(lp))).copy()
    prior[rows, own] = np.log(counts[own] - 1 + alpha) - np.log(z_norm)
    mask = np.ones(prior.shape, dtype=bool)
    mask[rows, own] = counts[own] > 1
    best, best_val = None, -np.inf
    max_single = max(r[0] for r in rules)
    max_pair = max(r[1] for r in rules)
    for t in temperatures:
        c = _candidates(probs, m, base.cascade, t, max_single, max_pair)
        for lam in lambdas:
            for singles, pair_top in rules:
                pair_cols = np.flatnonzero((c.pair_index < pair_top).all(axis=1))
                sub = _Candidates(c.seen, c.cascade, c.singles[:, :singles], c.pairs[:, pair_cols], c.cascade_preds,
                                  c.top, c.pair_index[pair_cols])
                preds, _ = _materialise(sub, m, _choose(sub, prior, base.floor_log_prior, lam, mask))
                v = _objective(y, preds, objective)
                if v > best_val + 1e-12:
                    best, best_val = (lam, t, singles, pair_top), v
    lam, t, singles, pair_top = best
    meta = {**base.meta, "objective": objective, "tuned_value_loo": float(best_val)}
    return replace(base, lam=float(lam), temperature=float(t), singletons=int(singles), pair_top=int(pair_top),
                   meta=meta)
