"""core.sets: set decoding by likelihood + set prior (hypothesis property tests against brute force), its file round
trip, the leave-one-out tuning and a synthetic check that it beats the tuned cascade on correlated labels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.sets import SetDecoder, log_likelihood, smoothed_log_priors, tune_sets
from core.thresholds import ThresholdSpec

PROB = st.floats(0.001, 0.999, allow_nan=False)


def prob_matrix(min_cols=1, max_cols=8, max_rows=12, elements=PROB):
    return st.tuples(st.integers(1, max_rows), st.integers(min_cols, max_cols)).flatmap(
        lambda s: arrays(np.float64, s, elements=elements))


def label_matrix(n_labels, max_rows=20):
    return arrays(np.int8, st.tuples(st.integers(1, max_rows), st.just(n_labels)), elements=st.integers(0, 1))


def power_set_decoder(n_labels, lam=0.0, temperature=1.0):
    sets = tuple(s for r in range(n_labels + 1) for s in itertools.combinations(range(n_labels), r))
    lp, floor = smoothed_log_priors(np.ones(len(sets)), len(sets), 1.0)
    return SetDecoder(tuple(f"c{j}" for j in range(n_labels)), sets, tuple(lp), floor, lam, temperature)


def score(probs, preds, dec: SetDecoder):
    """The objective of each row's set, looked up literally (a seen set's prior, else the floor)."""
    prior = {s: lp for s, lp in zip(dec.sets, dec.log_priors)}
    lp = np.array([prior.get(tuple(np.flatnonzero(r).tolist()), dec.floor_log_prior) for r in preds])
    return log_likelihood(probs, preds, dec.temperature) + dec.lam * lp


@settings(max_examples=150, deadline=None, database=None)
@given(prob_matrix(max_cols=7))
def test_lambda0_power_set_is_the_independent_optimum(probs):
    """lambda 0, T 1, every subset a candidate: brute force over subsets = each label in iff p > 0.5."""
    n_labels = probs.shape[1]
    dec = power_set_decoder(n_labels)
    got = dec.decode(probs)
    subsets = np.array(list(itertools.product((0, 1), repeat=n_labels)), dtype=np.int8)
    brute = np.array([subsets[np.argmax([log_likelihood(row[None], s[None])[0] for s in subsets])] for row in probs])
    np.testing.assert_allclose(log_likelihood(probs, got), log_likelihood(probs, brute), atol=1e-9)
    clear = (np.abs(probs - 0.5) > 1e-6).all(axis=1)
    np.testing.assert_array_equal(got[clear], (probs[clear] > 0.5).astype(np.int8))


@settings(max_examples=100, deadline=None, database=None)
@given(label_matrix(6), st.data(), st.floats(0, 2), st.floats(0.3, 1.5))
def test_a_dominant_set_wins(labels, data, lam, temperature):
    """Probabilities 1 - 1e-6 on a set and 1e-6 elsewhere: that set, seen in training or not. Dominant: the
    log-likelihood margin over any other set (>= log(1e6 - 1) / T = 9.2 per differing label) beats lambda times the
    largest log-prior ratio (<= 2 log 21 = 6.1 for 20 training rows)."""
    dec = SetDecoder.fit(labels, lam=lam, temperature=temperature)
    target = np.array(data.draw(st.lists(st.integers(0, 1), min_size=6, max_size=6)), dtype=np.int8)
    if not target.any():  # the cascade (argmax fallback) never proposes the empty set
        target[data.draw(st.integers(0, 5))] = 1
    probs = np.where(target == 1, 1 - 1e-6, 1e-6)[None]
    np.testing.assert_array_equal(dec.decode(probs)[0], target)


@settings(max_examples=100, deadline=None, database=None)
@given(prob_matrix(min_cols=2, max_cols=8, max_rows=15), st.data())
def test_invariant_to_row_order(probs, data):
    labels = data.draw(arrays(np.int8, (10, probs.shape[1]), elements=st.integers(0, 1)))
    dec = SetDecoder.fit(labels, lam=data.draw(st.floats(0, 3)), temperature=data.draw(st.floats(0.3, 3)),
                         singletons=data.draw(st.integers(0, 4)), pair_top=data.draw(st.integers(0, 5)))
    perm = np.array(data.draw(st.permutations(range(len(probs)))), dtype=np.int64)
    np.testing.assert_array_equal(dec.decode(probs[perm]), dec.decode(probs)[perm])


@settings(max_examples=150, deadline=None, database=None)
@given(prob_matrix(min_cols=2, max_cols=8, max_rows=15), st.data())
def test_optimal_among_its_candidates_and_the_cascade_set_is_one(probs, data):
    """The decoded set scores at least the cascade's set, every seen set, every top singleton and top pair."""
    n_labels = probs.shape[1]
    labels = data.draw(arrays(np.int8, (data.draw(st.integers(1, 12)), n_labels), elements=st.integers(0, 1)))
    fb = data.draw(st.sampled_from(["argmax", None, 0]))
    dec = SetDecoder.fit(labels, cascade=ThresholdSpec(tuple(f"class_{j}" for j in range(n_labels)), fallback=fb),
                         lam=data.draw(st.floats(0, 3)), temperature=data.draw(st.floats(0.3, 3)),
                         singletons=data.draw(st.integers(0, 3)), pair_top=data.draw(st.integers(0, 4)))
    got = score(probs, dec.decode(probs), dec)
    cands = [dec.cascade.decode(probs)] + [np.broadcast_to(m, probs.shape) for m in dec.matrix]
    z = np.log(probs) - np.log1p(-probs)
    order = np.argsort(-z, axis=1, kind="stable")
    for j in range(min(dec.singletons, n_labels)):
        c = np.zeros_like(probs, dtype=np.int8)
        c[np.arange(len(probs)), order[:, j]] = 1
        cands.append(c)
    for a, b in itertools.combinations(range(min(dec.pair_top, n_labels)), 2):
        c = np.zeros_like(probs, dtype=np.int8)
        c[np.arange(len(probs)), order[:, a]] = c[np.arange(len(probs)), order[:, b]] = 1
        cands.append(c)
    for c in cands:
        assert np.all(got >= score(probs, c, dec) - 1e-9)


def test_a_never_seen_set_is_reachable_through_the_cascade():
    labels = np.array([[1, 0, 0, 0], [0, 1, 0, 0]] * 5, dtype=np.int8)
    dec = SetDecoder.fit(labels, lam=1.0, singletons=0, pair_top=0)
    probs = np.array([[0.95, 0.9, 0.97, 0.01]])  # the cascade takes {0, 1, 2}, never seen
    np.testing.assert_array_equal(dec.decode(probs), [[1, 1, 1, 0]])
    _, source = dec.decode_with_source(probs)
    assert source.tolist() == [1]
    # A strong prior pulls an uncertain row to a frequent set instead.
    np.testing.assert_array_equal(SetDecoder.fit(labels, lam=3.0).decode(np.array([[0.6, 0.1, 0.52, 0.1]])),
                                  [[1, 0, 0, 0]])


def test_round_trip_and_reorder():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 5)) < 0.3).astype(np.int8)
    names = tuple(f"label{j}" for j in range(5))
    dec = SetDecoder.fit(labels, names, ThresholdSpec(names, 0.6, 0.3, 0.1, 2, (0.0, 0.1, 0.0, -0.1, 0.0)),
                         lam=0.7, temperature=1.3)
    d = dec.to_dict()
    assert d["strategy"] == "sets" and d["start"] == 0.6 and d["fallback"] == 2  # a cascade file plus "sets"
    back = SetDecoder.from_dict(d)
    assert back == dec
    probs = rng.random((30, 5))
    np.testing.assert_array_equal(back.decode(probs), dec.decode(probs))
    order = [3, 0, 4, 1, 2]
    re = dec.reorder([names[j] for j in order])
    np.testing.assert_array_equal(re.decode(probs[:, order]), dec.decode(probs)[:, order])
    with pytest.raises(ValueError, match="lambda"):
        SetDecoder.fit(labels, lam=-1)


def correlated_data(n=1500, n_labels=12, seed=0):
    """Labels drawn from a few frequent sets (Zipf) plus 8% random rare sets; a model's probabilities = sigmoid of a
    noisy per-label score, noisier than the gaps between the frequent sets."""
    rng = np.random.default_rng(seed)
    frequent = [(0,), (1,), (0, 2), (3,), (1, 4), (5,), (0, 2, 6), (7,), (3, 8), (9,), (1, 10), (11,)]
    w = 1.0 / np.arange(1, len(frequent) + 1)
    y = np.zeros((n, n_labels), dtype=np.int8)
    pick = rng.choice(len(frequent), size=n, p=w / w.sum())
    for i, k in enumerate(pick):
        y[i, list(frequent[k])] = 1
    rare = rng.random(n) < 0.08
    y[rare] = (rng.random((int(rare.sum()), n_labels)) < 0.2).astype(np.int8)
    y[rare & (y.sum(axis=1) == 0), 0] = 1
    logit = np.where(y == 1, 1.0, -2.5) + rng.normal(0, 1.6, size=y.shape)
    return 1 / (1 + np.exp(-logit)), y


def test_tune_sets_is_leave_one_out_and_deterministic():
    probs, y = correlated_data(600)
    a = tune_sets(probs, y)
    b = tune_sets(probs, y)
    assert a == b and a.meta["train_rows"] == 600
    assert a.sets == SetDecoder.fit(y).sets  # the decoder's priors: every row tuned on


def test_sets_beat_the_tuned_cascade_on_correlated_labels():
    """Nested estimate (tuned on 4 folds, scored on the 5th, rotated; priors from the 4 folds only)."""
    from core.threshold_search import kfold, nested_estimate

    probs, y = correlated_data()
    est = nested_estimate(probs, y, kfold(len(y), 5, 0), n_trials=25, strategy="sets")
    em = {k: v["exact_match"] for k, v in est["pooled"].items()}
    assert em["sets"] > em["tuned"] + 0.03, em
    assert all("sets" in r for r in est["per_fold"])


def test_core_sets_is_numpy_only_and_its_objectives_match_core_metrics():
    import subprocess
    import sys

    code = "import sys, core.sets; print(sorted(m for m in ('sklearn', 'scipy', 'torch', 'pandas') if m in sys.modules))"
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
    from core.metrics import objective_score
    from core.sets import _objective

    rng = np.random.default_rng(0)
    y, p = (rng.random((50, 6)) < 0.3).astype(np.int8), (rng.random((50, 6)) < 0.3).astype(np.int8)
    for obj in ("exact_match", "micro_f1"):
        assert _objective(y, p, obj) == pytest.approx(objective_score(y, p, obj))
