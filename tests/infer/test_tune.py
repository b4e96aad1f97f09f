"""core.threshold_search and infer.blend as pure functions: tuning improves the in-sample score where the best
thresholds are far from the reference cascade, is reproducible, shrinks per-class offsets of rare classes, and the
nested estimate runs; blending prefers the better model."""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics import exact_match, micro_f1, objective_score
from core.threshold_search import kfold, nested_estimate, search_offsets, shrink_factors, tune_thresholds
from core.thresholds import ThresholdSpec, cascade
from infer.blend import blend_probs, search_weights

NAMES = tuple(f"trend_id_res{j}" for j in range(20))


def low_confidence(n=400, n_labels=20, seed=0):
    """Labels (>= 1 per row) whose positives score 0.08-0.18 and negatives 0-0.06: the reference cascade (stop 0.2)
    selects nothing and falls back to class 19; a cascade reaching ~0.07 is nearly perfect."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.08).astype(np.int8)
    y[y.sum(axis=1) == 0, rng.integers(0, n_labels)] = 1
    p = np.where(y == 1, rng.uniform(0.08, 0.18, y.shape), rng.uniform(0.0, 0.06, y.shape))
    return p, y


def test_tuning_improves_when_the_best_threshold_is_far_from_the_default():
    p, y = low_confidence()
    spec = tune_thresholds(p, y, NAMES, n_trials=60, seed=0, fallback=19)
    default = exact_match(y, cascade(p, fallback=19))
    tuned = exact_match(y, spec.decode(p))
    assert default < 0.2 and tuned > 0.95
    assert spec.stop < 0.08 and spec.meta["in_sample"]["tuned"]["exact_match"] == pytest.approx(tuned)
    f1_spec = tune_thresholds(p, y, NAMES, objective="micro_f1", n_trials=60, seed=0, fallback=19)
    assert micro_f1(y, f1_spec.decode(p)) > micro_f1(y, cascade(p, fallback=19)) + 0.5


def test_tuning_never_loses_to_the_default_in_sample():
    rng = np.random.default_rng(3)
    y = (rng.random((300, 20)) < 0.1).astype(np.int8)
    p = np.clip(y * 0.5 + rng.normal(0.2, 0.2, y.shape), 0, 1)
    for objective in ("exact_match", "micro_f1"):
        spec = tune_thresholds(p, y, NAMES, objective=objective, n_trials=30, seed=1)
        assert objective_score(y, spec.decode(p), objective) >= objective_score(y, cascade(p), objective)


def test_tuning_is_reproducible():
    p, y = low_confidence(seed=2)
    a = tune_thresholds(p, y, NAMES, n_trials=40, seed=7)
    b = tune_thresholds(p, y, NAMES, n_trials=40, seed=7)
    assert a.to_dict() == b.to_dict()


def test_per_class_offsets_fix_a_class_with_its_own_scale_and_are_shrunk():
    """Class 5's positives score only 0.3-0.4 while the rest are confident: a per-class offset on class 5 helps;
    a larger shrinkage k gives a smaller offset."""
    rng = np.random.default_rng(0)
    n = 600
    y = np.zeros((n, 20), dtype=np.int8)
    y[np.arange(n), rng.integers(0, 20, n)] = 1
    y[rng.random(n) < 0.3, 5] = 1
    p = np.where(y == 1, rng.uniform(0.7, 0.95, y.shape), rng.uniform(0.0, 0.45, y.shape))
    p[:, 5] = np.where(y[:, 5] == 1, rng.uniform(0.5, 0.6, n), rng.uniform(0.0, 0.3, n))
    steps = (0.8, 0.7, 0.6, 0.5)
    base = objective_score(y, cascade(p, steps, 19))
    o0, v0 = search_offsets(p, y, steps, 19, shrink=0.0)
    o1, _ = search_offsets(p, y, steps, 19, shrink=200.0)
    assert v0 > base and o0[5] < 0
    assert v0 == pytest.approx(objective_score(y, cascade(p, steps, 19, o0)))
    assert 0 >= o1[5] > o0[5]
    f = shrink_factors(y, 20.0)
    assert f[5] == pytest.approx(y[:, 5].sum() / (y[:, 5].sum() + 20))
    assert shrink_factors(np.zeros((5, 2)), 20.0).tolist() == [0.0, 0.0]


def test_nested_estimate_runs_and_reports_default_vs_tuned():
    p, y = low_confidence(n=300)
    folds = kfold(len(y), 3, seed=0)
    est = nested_estimate(p, y, folds, NAMES, n_trials=30, seed=0, fallback=19)
    assert est["folds"] == 3 and [r["fold"] for r in est["per_fold"]] == [0, 1, 2]
    assert sum(r["rows"] for r in est["per_fold"]) == 300
    assert est["pooled"]["tuned"]["exact_match"] > est["pooled"]["default"]["exact_match"] + 0.5
    pooled = est["pooled"]
    assert est["gain"] == pytest.approx(pooled["tuned"]["exact_match"] - pooled["default"]["exact_match"])
    assert (kfold(50, 5, 1) == kfold(50, 5, 1)).all() and sorted(set(kfold(50, 5, 1))) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        nested_estimate(p, y, np.zeros(len(y)), NAMES)


def test_blend_prefers_the_better_model():
    rng = np.random.default_rng(0)
    y = np.zeros((500, 20), dtype=np.int8)
    y[np.arange(500), rng.integers(0, 20, 500)] = 1
    good = np.clip(np.where(y == 1, 0.8, 0.1) + rng.normal(0, 0.12, y.shape), 0, 1)
    bad = rng.random(y.shape) * 0.9
    w, best = search_weights([bad, good], y, n_trials=40, seed=0)
    assert w[1] > w[0] and sum(w) == pytest.approx(1)
    assert best >= exact_match(y, cascade(good)) > exact_match(y, cascade(bad))
    assert search_weights([bad, good], y, n_trials=40, seed=0) == (w, best)
    assert np.allclose(blend_probs([np.ones((2, 2)), np.zeros((2, 2))], [3, 1]), 0.75)


def test_nested_blend_tunes_each_folds_weights_on_the_other_folds():
    from core.metrics import scores
    from core.thresholds import cascade_steps, decode_global
    from infer.blend import nested_blend

    rng = np.random.default_rng(1)
    y = np.zeros((300, 20), dtype=np.int8)
    y[np.arange(300), rng.integers(0, 20, 300)] = 1
    good = np.clip(np.where(y == 1, 0.7, 0.15) + rng.normal(0, 0.15, y.shape), 0, 1)
    other = np.clip(np.where(y == 1, 0.6, 0.2) + rng.normal(0, 0.2, y.shape), 0, 1)
    folds = np.arange(300) % 3
    est = nested_blend([good, other], y, folds, n_trials=20, seed=0, fallback=19)
    assert est["folds"] == 3 and [r["fold"] for r in est["per_fold"]] == [0, 1, 2]
    pred = np.zeros_like(y)
    for r in est["per_fold"]:
        test = folds == r["fold"]
        assert r["weights"] == search_weights([good[~test], other[~test]], y[~test], n_trials=20, seed=0,
                                              fallback=19)[0]
        pred[test] = decode_global(blend_probs([good[test], other[test]], r["weights"]), cascade_steps(), 19)
    assert est["pooled"] == scores(y, pred)
    with pytest.raises(ValueError):
        nested_blend([good, other], y, np.zeros(300), n_trials=5)


def test_nested_blend_tunes_the_decoding_on_each_folds_blended_training_rows_only():
    """blend + tune, honestly: per fold the weights tuned without the left-out fold, then the cascade and the set
    decoding tuned on the blended training rows, the left-out rows decoded with them; the default column equals the
    plain nested blend. A fold_probs that returns the file itself gives the plain nested estimate."""
    from core.metrics import scores
    from core.sets import tune_sets
    from infer.blend import nested_blend

    rng = np.random.default_rng(2)
    y = np.zeros((240, 20), dtype=np.int8)
    y[np.arange(240), rng.integers(0, 20, 240)] = 1
    y[rng.random(240) < 0.3, 3] = 1
    good = np.clip(np.where(y == 1, 0.45, 0.1) + rng.normal(0, 0.12, y.shape), 0, 1)
    other = np.clip(np.where(y == 1, 0.4, 0.15) + rng.normal(0, 0.15, y.shape), 0, 1)
    folds = np.arange(240) % 3
    kw = {"n_trials": 8, "seed": 0, "fallback": 19}
    est = nested_blend([good, other], y, folds, strategy="sets", label_names=NAMES, per_class=False, **kw)
    dec = est["decoding"]
    assert dec["strategy"] == "sets" and dec["folds"] == 3
    assert dec["pooled"]["default"] == est["pooled"]
    tuned, sets = np.zeros_like(y), np.zeros_like(y)
    for r in est["per_fold"]:
        test = folds == r["fold"]
        b = blend_probs([good, other], r["weights"])
        spec = tune_thresholds(b[~test], y[~test], NAMES, per_class=False, fallback=19)  # tune's own trials
        tuned[test] = spec.decode(b[test])
        sets[test] = tune_sets(b[~test], y[~test], NAMES, spec, "exact_match").decode(b[test])
    assert dec["pooled"]["tuned"] == scores(y, tuned) and dec["pooled"]["sets"] == scores(y, sets)
    assert nested_blend([good, other], y, folds, **kw) == {k: v for k, v in est.items() if k != "decoding"}

    plain = nested_estimate(good, y, folds, NAMES, per_class=False, **kw)
    assert nested_estimate(good, y, folds, NAMES, per_class=False, fold_probs=lambda train: good, **kw) == plain


def test_spec_decode_matches_the_fast_global_decoder():
    from core.thresholds import decode_global

    p, _ = low_confidence(seed=5)
    spec = ThresholdSpec(NAMES, 0.3, 0.05, 0.025, 19)
    assert (decode_global(p, spec.steps, 19) == spec.decode(p)).all()


def test_paired_difference_is_the_exact_match_gap_with_a_paired_interval():
    from core.metrics import paired_difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (400, 5))
    a, b = y.copy(), y.copy()
    a[:80, 0] ^= 1  # a wrong on rows 0-79
    b[60:100, 1] ^= 1  # b wrong on rows 60-99: only a right on 80-99, only b right on 0-59
    r = paired_difference(y, a, b)
    assert r["exact_match_a"] == exact_match(y, a) == 0.8 and r["exact_match_b"] == exact_match(y, b) == 0.9
    assert r["difference"] == pytest.approx(0.1) and (r["only_a"], r["only_b"], r["rows"]) == (20, 60, 400)
    assert 0 < r["low"] < 0.1 < r["high"] < 0.2
    assert paired_difference(y, a, b) == r  # seeded
    s = paired_difference(y, b, a)  # swapped: the interval mirrors
    assert s["difference"] == pytest.approx(-0.1) and s["low"] == pytest.approx(-r["high"], abs=0.01)
    same = paired_difference(y, a, a)
    assert (same["difference"], same["low"], same["high"], same["only_a"], same["only_b"]) == (0, 0, 0, 0, 0)
    # the same gap from fewer rows where the two disagree (b right wherever a is) is more certain: a narrower interval
    c = y.copy()
    c[40:80, 0] ^= 1
    fewer = paired_difference(y, a, c)
    assert (fewer["difference"], fewer["only_a"], fewer["only_b"]) == (pytest.approx(0.1), 0, 40)
    assert fewer["high"] - fewer["low"] < r["high"] - r["low"]
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(y, a, b[:10])


def test_fallback_is_tuned_only_when_it_strictly_helps():
    """Rows whose single label scores below every threshold: falling back to their most probable class beats a fixed
    "no meaning" class; where that class is the truth of those rows, the configured fallback is kept."""
    rng = np.random.default_rng(5)
    n = 300
    y = np.zeros((n, 20), dtype=np.int8)
    y[np.arange(n), rng.integers(0, 19, n)] = 1                  # never class 19
    p = np.where(y == 1, rng.uniform(0.6, 0.9, y.shape), rng.uniform(0.0, 0.1, y.shape))
    weak = np.flatnonzero(rng.random(n) < 0.3)                    # right but unsure: below 0.2, still the row's max,
    p[weak] = rng.uniform(0.0, 0.03, (len(weak), 20))             # a wrong class close behind, at any level
    truth = y[weak].argmax(axis=1)
    other = (truth + 1 + rng.integers(0, 18, len(weak))) % 19
    p[weak, other] = rng.uniform(0.04, 0.17, len(weak))
    p[weak, truth] = p[weak, other] + rng.uniform(0.002, 0.02, len(weak))
    spec = tune_thresholds(p, y, NAMES, n_trials=20, seed=0, fallback=19, fallbacks=("argmax",), per_class=False)
    assert spec.fallback == "argmax" and exact_match(y, spec.decode(p)) > exact_match(y, cascade(p, fallback=19))
    assert spec.meta["in_sample"]["default"]["exact_match"] == pytest.approx(exact_match(y, cascade(p, fallback=19)))
    kept = tune_thresholds(p, y, NAMES, n_trials=20, seed=0, fallback=19, per_class=False)    # no candidates
    assert kept.fallback == 19
    y19 = y.copy()
    y19[weak] = 0
    y19[weak, 19] = 1                                             # the unsure rows really are "no meaning"
    p19 = p.copy()
    p19[weak, 19] = 0.01
    assert tune_thresholds(p19, y19, NAMES, n_trials=20, seed=0, fallback=19, fallbacks=("argmax",),
                           per_class=False).fallback == 19
