"""core.thresholds: the vectorised cascade against a literal re-implementation of the reference solution's loop
(hypothesis property tests, including probabilities exactly on a threshold), the one-pass decoder used in tuning,
ThresholdSpec round trips and class ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.threshold_search import _ClassSearch
from core.thresholds import (
    ThresholdSpec,
    cascade,
    cascade_steps,
    class_ids,
    decode_global,
    resolve_fallback,
    threshold,
)

# The reference solution's thresholds, as literal floats.
REFERENCE = [0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]
# Probabilities on the 0.05 grid, both as literals (== the thresholds) and as computed 0.05 * k (often off by an ulp).
GRID = sorted({*REFERENCE, *(0.05 * k for k in range(21)), *(round(0.05 * k, 2) for k in range(21)),
               np.nextafter(0.2, 1), np.nextafter(0.55, 0)})


def reference_loop(probs, thresholds=REFERENCE, fallback=19):
    """The reference solution's decoding, literally."""
    out = []
    for row in probs:
        for t in thresholds:
            sel = [j for j, p in enumerate(row) if p > t]
            if sel:
                break
        else:
            sel = [fallback] if fallback is not None else []
        out.append(sel)
    return out


def as_lists(preds):
    return [list(np.flatnonzero(r)) for r in preds]


def prob_matrix(min_cols=20, max_cols=50, elements=None):
    elements = elements if elements is not None else st.floats(0, 1, allow_nan=False, width=64)
    shape = st.tuples(st.integers(1, 40), st.integers(min_cols, max_cols))
    return shape.flatmap(lambda s: arrays(np.float64, s, elements=elements))


def test_default_steps_are_the_reference_literals():
    assert list(cascade_steps()) == REFERENCE


@settings(max_examples=300, deadline=None, database=None)
@given(prob_matrix())
def test_cascade_equals_reference_loop_on_random_probabilities(probs):
    assert as_lists(cascade(probs, fallback=19)) == reference_loop(probs)


@settings(max_examples=300, deadline=None, database=None)
@given(prob_matrix(elements=st.sampled_from(GRID)))
def test_cascade_equals_reference_loop_on_the_threshold_grid(probs):
    """Values exactly equal to a threshold are not selected by it (strictly greater)."""
    assert as_lists(cascade(probs, fallback=19)) == reference_loop(probs)
    assert as_lists(decode_global(probs, cascade_steps(), 19)) == reference_loop(probs)


def test_exactly_on_threshold_examples():
    p = np.zeros((4, 20))
    p[0, 3] = 0.55           # not > 0.55, but > 0.5
    p[1, [2, 5]] = [0.2, 0.2]  # on the last threshold: nothing -> fallback
    p[2, [1, 4]] = [0.45, 0.3]  # 0.45 passes 0.4 (first hit), 0.3 does not
    p[3, 7] = 0.05 * 11       # the same double as 0.55: selected by 0.5, not 0.55
    assert as_lists(cascade(p, fallback=19)) == [[3], [19], [1], [7]] == reference_loop(p)


@settings(max_examples=200, deadline=None, database=None)
@given(prob_matrix(min_cols=2, max_cols=30, elements=st.sampled_from(GRID)),
       st.integers(0, 60), st.integers(0, 60), st.integers(1, 20), st.data())
def test_configurable_cascade_equals_literal_loop(probs, a, b, step_k, data):
    start, stop = max(a, b) / 100, min(a, b) / 100
    step = step_k / 100
    steps = cascade_steps(start, stop, step)
    fallback = data.draw(st.one_of(st.none(), st.integers(0, probs.shape[1] - 1)))
    expect = reference_loop(probs, steps, fallback)
    assert as_lists(cascade(probs, steps, fallback)) == expect
    assert as_lists(decode_global(probs, steps, fallback)) == expect
    assert all(s[i] > s[i + 1] for s in [steps] for i in range(len(s) - 1)) and steps[0] == start


@settings(max_examples=100, deadline=None, database=None)
@given(prob_matrix(min_cols=20, max_cols=30, elements=st.sampled_from(GRID)), st.data())
def test_class_offsets_equal_literal_loop_with_per_class_thresholds(probs, data):
    offsets = np.array(data.draw(st.lists(st.sampled_from([-0.1, -0.05, 0.0, 0.02, 0.05, 0.1]),
                                          min_size=probs.shape[1], max_size=probs.shape[1])))
    expect = []
    for row in probs:
        for t in REFERENCE:
            sel = [j for j, p in enumerate(row) if p > t + offsets[j]]
            if sel:
                break
        else:
            sel = [19]
        expect.append(sel)
    assert as_lists(cascade(probs, fallback=19, class_offsets=offsets)) == expect
    spec = ThresholdSpec(tuple(f"c{j}" for j in range(probs.shape[1])), fallback=19, class_offsets=tuple(offsets))
    assert as_lists(spec.decode(probs)) == expect


@settings(max_examples=60, deadline=None, database=None)
@given(prob_matrix(min_cols=20, max_cols=25, elements=st.sampled_from(GRID)), st.data(),
       st.sampled_from([19, "argmax", None]))
def test_incremental_class_search_scores_match_cascade(probs, data, fallback):
    """The per-class tuner's incremental scores are exactly those of decoding with cascade(), for a fixed fallback
    class, the argmax fallback and none."""
    from core.metrics import objective_score

    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    y = (rng.random(probs.shape) < 0.2).astype(np.int8)
    steps = cascade_steps()
    for objective in ("exact_match", "micro_f1"):
        offsets = np.zeros(probs.shape[1])
        search = _ClassSearch(probs, y, steps, fallback, offsets, objective)
        for c, v in [(0, 0.05), (3, -0.1), (19, 0.02)]:
            assert search.score(c, search.hits(c, v)) == pytest.approx(objective_score(
                y, cascade(probs, steps, fallback, np.where(np.arange(len(offsets)) == c, v, search.o)),
                objective), abs=1e-12)
            search.set(c, v)
        assert search.score(0, search.h[:, :, 0]) == pytest.approx(
            objective_score(y, cascade(probs, steps, fallback, search.o), objective), abs=1e-12)


@settings(max_examples=80, deadline=None, database=None)
@given(prob_matrix(min_cols=1, max_cols=12))
def test_argmax_fallback_gives_every_row_a_label_only_when_nothing_passes(probs):
    steps = cascade_steps()
    preds = cascade(probs, steps, "argmax")
    assert (preds.sum(axis=1) >= 1).all()
    empty = ~(probs > steps[-1]).any(axis=1)
    assert np.array_equal(preds[~empty], cascade(probs, steps, None)[~empty])
    assert (preds[empty].sum(axis=1) == 1).all()
    assert np.array_equal(preds[empty].argmax(axis=1), probs[empty].argmax(axis=1))
    assert np.array_equal(decode_global(probs, steps, "argmax"), preds)


def test_fallback_by_name_id_argmax_or_none():
    names = ["spam", "ham", "eggs"]
    assert resolve_fallback(names, "ham") == 1 and resolve_fallback(names, "2") == 2
    assert resolve_fallback(names, "ARGMAX") == "argmax" and resolve_fallback(names, "none") is None
    assert resolve_fallback(["y_a7", "y_a19"], "19") == 1  # a class id as written in submissions
    with pytest.raises(ValueError, match="'bacon' is neither a label .*spam, ham, eggs"):
        resolve_fallback(names, "bacon")
    spec = ThresholdSpec.from_decode(names, type("D", (), {"start": 0.6, "stop": 0.3, "step": 0.1, "fallback": "eggs"}))
    assert spec.fallback == 2 and spec.steps == (0.6, 0.5, 0.4, 0.3)


def test_cascade_rejects_bad_arguments():
    with pytest.raises(ValueError, match="out of range"):
        cascade(np.zeros((2, 10)), fallback=19)  # a fallback class the 10 classes do not have
    with pytest.raises(ValueError):
        cascade(np.zeros((2, 10)), steps=[0.2, 0.3], fallback=0)
    assert cascade(np.zeros((2, 10)), fallback=None).sum() == 0
    assert threshold(np.array([[0.5, 0.51]])).tolist() == [[0, 1]]


def test_spec_round_trip_and_class_ids():
    spec = ThresholdSpec(("a1", "a2"), 0.6, 0.1, 0.1, 1, (0.05, -0.02), meta={"x": 1})
    again = ThresholdSpec.from_dict(spec.to_dict())
    assert again == spec and again.meta == {"x": 1}
    assert class_ids([f"trend_id_res{j}" for j in (3, 0, 12)]) == [3, 0, 12]
    assert class_ids(["x", "y"]) == [0, 1]
    assert class_ids(["a1", "b2"]) == [0, 1]  # different prefixes: positions
    assert class_ids(["a1", "a01"]) == [0, 1]  # duplicate ids: positions
