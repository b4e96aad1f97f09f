"""core.metrics breakdowns: exact match by true label count and the rare / frequent classes' mean F1, on small
hand-made arrays whose figures are worked out by hand, plus properties (the groups partition the rows and their
weighted exact match is the overall one; rare + frequent + absent is every class)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.metrics import by_label_count, exact_match, per_class_f1, rare_class_f1

# 6 rows x 4 labels. True counts: rows 0-2 one label, rows 3-4 two, row 5 four.
Y_TRUE = np.array([[1, 0, 0, 0],
                   [0, 1, 0, 0],
                   [1, 0, 0, 0],
                   [1, 1, 0, 0],
                   [0, 1, 1, 0],
                   [1, 1, 1, 1]])
Y_PRED = np.array([[1, 0, 0, 0],   # right
                   [1, 0, 0, 0],   # wrong label, count right (1)
                   [1, 1, 0, 0],   # one too many: wrong, predicted 2
                   [1, 0, 0, 0],   # two true labels predicted as one: wrong, predicted 1
                   [0, 1, 1, 0],   # right
                   [1, 1, 1, 0]])  # 3 of 4: wrong, predicted 3


def test_by_label_count_by_hand():
    rows = by_label_count(Y_TRUE, Y_PRED)
    assert [r["labels"] for r in rows] == ["1", "2", "4+"]            # no 0- or 3-label rows: left out
    one, two, many = rows
    assert (one["rows"], one["share"]) == (3, pytest.approx(3 / 6))
    assert one["exact_match"] == pytest.approx(1 / 3)                 # row 0 only
    assert one["mean_predicted"] == pytest.approx((1 + 1 + 2) / 3)
    assert one["count_right"] == pytest.approx(2 / 3)                 # rows 0 and 1 (1 wrong label, count 1)
    assert (two["rows"], two["exact_match"], two["mean_predicted"], two["count_right"]) == (2, 0.5, 1.5, 0.5)
    assert (many["rows"], many["exact_match"], many["mean_predicted"], many["count_right"]) == (1, 0.0, 3.0, 0.0)


def test_by_label_count_max_count_empty_rows_and_bad_input():
    # max_count 2: rows with 2 or more labels share "2+"; a row with no true label is group "0"; a 3-label row
    # predicted with 2 labels (row 7) is in "2+" but its count is wrong
    y = np.vstack([Y_TRUE, [[0, 0, 0, 0], [1, 1, 1, 0]]])
    p = np.vstack([Y_PRED, [[0, 0, 0, 0], [1, 1, 0, 0]]])
    rows = by_label_count(y, p, max_count=2)
    assert [(r["labels"], r["rows"]) for r in rows] == [("0", 1), ("1", 3), ("2+", 4)]
    assert rows[0]["exact_match"] == 1.0 and rows[0]["count_right"] == 1.0 and rows[0]["mean_predicted"] == 0.0
    plus = rows[2]                                                    # rows 3, 4 (right), 5, 7
    assert plus["exact_match"] == 0.25
    assert plus["count_right"] == 0.25                                # each row against its own count: only row 4
    assert plus["mean_predicted"] == pytest.approx((1 + 2 + 3 + 2) / 4)
    assert by_label_count(np.zeros((0, 4)), np.zeros((0, 4))) == []
    with pytest.raises(ValueError, match="same shape"):
        by_label_count(Y_TRUE, Y_PRED[:, :3])
    with pytest.raises(ValueError, match="max_count"):
        by_label_count(Y_TRUE, Y_PRED, max_count=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(
    arrays(np.int8, (n, 5), elements=st.integers(0, 1)), arrays(np.int8, (n, 5), elements=st.integers(0, 1)),
    st.integers(1, 6))))
def test_by_label_count_partitions_the_rows(case):
    y, p, max_count = case
    rows = by_label_count(y, p, max_count)
    assert sum(r["rows"] for r in rows) == len(y) and sum(r["share"] for r in rows) == pytest.approx(1)
    assert sum(r["share"] * r["exact_match"] for r in rows) == pytest.approx(exact_match(y, p))
    assert sum(r["rows"] * r["mean_predicted"] for r in rows) == pytest.approx(p.sum())
    assert all(r["rows"] > 0 and r["exact_match"] <= r["count_right"] for r in rows)  # a right set has its count


def test_rare_class_f1_by_hand():
    # 100 rows x 5 classes; positives 1, 3, 4, 20, 0 (class 4 absent). With max_prevalence 0.03: classes 0, 1 rare
    # (1 and 3 of 100 rows), 2 and 3 frequent, 4 in neither group.
    y = np.zeros((100, 5), int)
    y[:1, 0] = 1
    y[:3, 1] = 1
    y[:4, 2] = 1
    y[:20, 3] = 1
    p = np.zeros_like(y)
    p[:3, 1] = 1                     # class 1: F1 1
    p[:2, 2] = 1                     # class 2: 2 of 4 found, none wrong: F1 2*2 / (4 + 2) = 2/3
    p[:20, 3] = 1                    # class 3: F1 1
    p[50, 4] = 1                     # class 4 (no positive) predicted once: left out whatever its F1
    # class 0: never predicted: F1 0
    r = rare_class_f1(y, p, max_prevalence=0.03)
    f1 = per_class_f1(y, p)
    assert f1.tolist() == pytest.approx([0, 1, 2 / 3, 1, 0])
    assert (r["rows"], r["absent"], r["max_prevalence"], r["low_f1"]) == (100, 1, 0.03, 0.3)
    assert r["rare"] == {"classes": 2, "indices": [0, 1], "min_positives": 1, "max_positives": 3,
                         "mean_f1": pytest.approx(0.5), "below_low_f1": 1, "zero_f1": 1}
    assert r["frequent"] == {"classes": 2, "min_positives": 4, "max_positives": 20,
                             "mean_f1": pytest.approx((2 / 3 + 1) / 2), "below_low_f1": 0, "zero_f1": 0}
    # the boundary is inclusive, as a fraction of the rows: 4 of 100 rows is rare at 0.04; 0.29 of 100 rows is 29
    assert rare_class_f1(y, p, max_prevalence=0.04)["rare"]["indices"] == [0, 1, 2]
    y29 = np.zeros((100, 2), int)
    y29[:29, 0] = 1
    y29[:, 1] = 1
    assert rare_class_f1(y29, y29, max_prevalence=0.29)["rare"]["indices"] == [0]
    # no rare class: its figures are None; low_f1 moves the count
    none = rare_class_f1(y, p, max_prevalence=0.005)
    assert none["rare"]["classes"] == 0 and none["rare"]["mean_f1"] is None and none["frequent"]["classes"] == 4
    assert rare_class_f1(y, p, max_prevalence=0.03, low_f1=0.7)["frequent"]["below_low_f1"] == 1
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="max_prevalence"):
            rare_class_f1(y, p, max_prevalence=bad)
    with pytest.raises(ValueError, match="same shape"):
        rare_class_f1(y, p[:10])


@settings(max_examples=40, deadline=None)
@given(arrays(np.int8, (30, 6), elements=st.integers(0, 1)), arrays(np.int8, (30, 6), elements=st.integers(0, 1)),
       st.sampled_from([0.01, 0.1, 0.2, 0.5, 1.0]))
def test_rare_and_frequent_classes_split_the_present_ones(y, p, max_prevalence):
    r = rare_class_f1(y, p, max_prevalence)
    assert r["rare"]["classes"] + r["frequent"]["classes"] + r["absent"] == y.shape[1]
    f1, pos = per_class_f1(y, p), y.sum(axis=0)
    rare = r["rare"]["indices"]
    assert all(1 <= pos[j] <= max_prevalence * len(y) + 1e-9 for j in rare)
    if rare:
        assert r["rare"]["mean_f1"] == pytest.approx(f1[rare].mean())
