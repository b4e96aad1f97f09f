"""Pure data functions: prompt formatting, label columns, CSV validation, folds, batch order, collation, losses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SAMPLE_DATA, SAMPLE_TEMPLATE
from hypothesis import given, settings
from hypothesis import strategies as st
from trainkit import ROOT, SAMPLE_TRAIN, write_rows

from core.config import DataArgs, LossArgs
from core.data import (
    collate,
    format_prompt,
    format_value,
    label_columns,
    read_csv,
    read_label_descriptions,
    template_fields,
)
from core.errors import InputError
from train.data import batch_order, make_folds, split_by_tokens
from train.loss import multilabel_loss, pos_weight_from_labels

# --- prompt formatting ------------------------------------------------------------------------------------------

def test_template_fields_in_order_of_first_use():
    assert template_fields(SAMPLE_TEMPLATE) == ["assessment", "tags", "text"]
    assert template_fields("{b} {a} {b}") == ["b", "a"]
    assert template_fields("no fields") == []


@pytest.mark.parametrize("template", ["{} text", "{0} text", "{text"])
def test_bad_template_is_an_input_error(template):
    with pytest.raises(InputError, match="text_template"):
        template_fields(template)


@pytest.mark.parametrize("value, expected", [
    ("{DELIVERY,PRICE}", "DELIVERY,PRICE"),
    ("{}", ""),
    ("{A}", "A"),
    ("a {b} c", "a {b} c"),           # only a whole-cell set literal loses its braces
    (float("nan"), ""),
    (None, ""),
    (2.0, "2.0"),
    (3, "3"),
    ("лучший сервис 👍", "лучший сервис 👍"),
    ("", ""),
    (["DELIVERY", "PRICE"], "DELIVERY,PRICE"),  # a JSON list (serving) formats like the CSV's set literal
    (("A",), "A"),
    ([], ""),
])
def test_format_value(value, expected):
    assert format_value(value) == expected


def test_format_prompt_matches_reference_template():
    row = {"assessment": 2.0, "tags": "{CATALOG_NAVIGATION,PRICE}", "text": "Дорого 👍"}
    assert format_prompt(SAMPLE_TEMPLATE, row) == ("user assesment: 2.0\n\nTags: CATALOG_NAVIGATION,PRICE\n\n"
                                                    "Review: Дорого 👍")
    # Missing tags (NaN in the CSV) and an empty text become empty strings, not "nan".
    row = {"assessment": 0.0, "tags": float("nan"), "text": float("nan")}
    assert format_prompt(SAMPLE_TEMPLATE, row) == "user assesment: 0.0\n\nTags: \n\nReview: "
    # Braces in the template that are not fields stay literal.
    assert format_prompt("{{x}} {text}", {"text": "t"}) == "{x} t"


def test_read_csv_formats_like_format_prompt(tmp_path):
    path = write_rows(tmp_path / "d.csv", 30)
    ds = read_csv(path, DataArgs(**SAMPLE_DATA))
    df = pd.read_csv(path)
    assert ds.texts == [format_prompt(SAMPLE_TEMPLATE, r) for r in df.to_dict("records")]
    assert list(ds.ids) == df["index"].tolist()
    assert ds.labels.shape == (30, 20) and ds.labels.dtype == np.int8
    assert ds.label_names == [f"trend_id_res{i}" for i in range(20)]
    assert not any("nan" in t for t in ds.texts)
    assert not any("{" in t or "}" in t for t in ds.texts)


# --- label columns ----------------------------------------------------------------------------------------------

def test_label_columns_ordered_by_numeric_suffix():
    cols = ["index", "text", "y10", "y2", "y1", "y0", "y_extra", "y11"]
    assert label_columns(cols, DataArgs(label_prefix="y"), "f.csv") == ["y0", "y1", "y2", "y10", "y11", "y_extra"]


def test_label_columns_explicit_list_keeps_its_order():
    cols = ["index", "text", "b", "a"]
    assert label_columns(cols, DataArgs(label_columns=["b", "a"]), "f.csv") == ["b", "a"]
    with pytest.raises(InputError, match="f.csv.*'c'"):
        label_columns(cols, DataArgs(label_columns=["b", "c"]), "f.csv")


def test_label_columns_none_with_prefix():
    with pytest.raises(InputError, match="f.csv.*'lbl'"):
        label_columns(["index", "text"], DataArgs(label_prefix="lbl"), "f.csv")


def test_shuffled_label_columns_read_in_numeric_order(tmp_path):
    df = pd.read_csv(SAMPLE_TRAIN).head(20)
    labels = [c for c in df.columns if c.startswith("trend_id_res")]
    shuffled = df[["index", "text", "tags", "assessment"] + list(reversed(labels))]
    path = tmp_path / "shuffled.csv"
    shuffled.to_csv(path, index=False)
    ds = read_csv(path, DataArgs(**SAMPLE_DATA))
    assert ds.label_names == labels
    np.testing.assert_array_equal(ds.labels, df[labels].to_numpy())


# --- CSV validation (unit level; the CLI tests check exit codes and messages end to end) -----------------------

def test_read_csv_errors(tmp_path):
    args = DataArgs(**SAMPLE_DATA)
    with pytest.raises(InputError, match="nope.csv: file not found"):
        read_csv(tmp_path / "nope.csv", args)
    header_only = tmp_path / "empty.csv"
    pd.read_csv(SAMPLE_TRAIN).head(0).to_csv(header_only, index=False)
    with pytest.raises(InputError, match="empty.csv.*empty"):
        read_csv(header_only, args)
    zero_bytes = tmp_path / "zero.csv"
    zero_bytes.write_text("")
    with pytest.raises(InputError, match="zero.csv"):
        read_csv(zero_bytes, args)
    no_text = tmp_path / "no_text.csv"
    pd.read_csv(SAMPLE_TRAIN).head(5).rename(columns={"text": "txt"}).to_csv(no_text, index=False)
    with pytest.raises(InputError, match=r"no_text.csv: missing column\(s\) \['text'\]"):
        read_csv(no_text, args)
    bad = write_rows(tmp_path / "bad.csv", 5, trend_id_res3=[0, 0, 2, 0, 0])
    with pytest.raises(InputError, match=r"bad.csv: row 4 \(id 11002\) column 'trend_id_res3'.*2"):
        read_csv(bad, args)
    missing_label = write_rows(tmp_path / "nan.csv", 5, trend_id_res0=[0, None, 0, 0, 0])
    with pytest.raises(InputError, match=r"nan.csv: row 3 .* column 'trend_id_res0'"):
        read_csv(missing_label, args)
    dup = write_rows(tmp_path / "dup.csv", 5, index=[1, 2, 3, 2, 5])
    with pytest.raises(InputError, match=r"dup.csv: duplicate id 2 .* row 5"):
        read_csv(dup, args)
    # Unlabelled data does not need label columns.
    test = read_csv(ROOT / "data" / "sample_test.csv", args, labelled=False, label_names=["a", "b"])
    assert test.labels is None and test.label_names == ["a", "b"] and len(test.texts) == 100


def test_label_descriptions(tmp_path):
    names = [f"trend_id_res{i}" for i in range(20)]
    desc = read_label_descriptions(ROOT / "data" / "sample_trends.csv", names)
    assert desc["trend_id_res0"] == "Долгая доставка" and len(desc) == 20
    assert read_label_descriptions(None, names) == {}
    with pytest.raises(InputError, match="missing.csv"):
        read_label_descriptions(tmp_path / "missing.csv", names)
    # an empty name cell is no description (pandas reads it as NaN; it must not become the text "nan")
    (tmp_path / "names.csv").write_text("id,name\n0,fast delivery\n1,\n2,  \n", encoding="utf-8")
    assert read_label_descriptions(tmp_path / "names.csv", ["lab0", "lab1", "lab2"]) == {"lab0": "fast delivery"}


# --- folds ------------------------------------------------------------------------------------------------------

def test_folds_deterministic_disjoint_and_stratified():
    labels = pd.read_csv(SAMPLE_TRAIN).filter(like="trend_id_res").to_numpy()
    a = make_folds(labels, 5, seed=42)
    b = make_folds(labels, 5, seed=42)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) == set(range(5))            # every row in exactly one fold
    assert not np.array_equal(a, make_folds(labels, 5, seed=7))
    sizes = np.bincount(a)
    assert sizes.max() - sizes.min() <= 5, sizes        # 400 rows -> ~80 each
    # Stratified: each class's positives are spread evenly over the folds (a random split is off by up to ~8).
    for c in range(labels.shape[1]):
        per_fold = np.array([labels[a == k, c].sum() for k in range(5)])
        assert per_fold.max() - per_fold.min() <= 2, (c, per_fold)


def test_too_few_rows_for_folds():
    with pytest.raises(InputError, match="cv.n_folds"):
        make_folds(np.eye(3, dtype=int), 5, seed=0)


# --- batch order ------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=300), batch_size=st.integers(1, 17),
       seed=st.integers(0, 2**31), group=st.booleans(), mega=st.integers(1, 8))
def test_batch_order_covers_each_row_once(lengths, batch_size, seed, group, mega):
    batches = batch_order(lengths, batch_size, seed, group_by_length=group, mega=mega)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == math.ceil(len(lengths) / batch_size)
    assert batches == batch_order(lengths, batch_size, seed, group_by_length=group, mega=mega)


def test_batch_order_depends_on_seed():
    lengths = list(range(1, 101))
    assert batch_order(lengths, 8, 1) != batch_order(lengths, 8, 2)
    assert batch_order(lengths, 8, 1, group_by_length=False) != batch_order(lengths, 8, 2, group_by_length=False)


def test_group_by_length_reduces_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 128, size=2000)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = padded(batch_order(lengths, 16, 3, group_by_length=True))
    plain = padded(batch_order(lengths, 16, 3, group_by_length=False))
    assert grouped < 0.75 * plain, (grouped, plain, lengths.sum())
    # ... while the batch order stays random (not sorted by length).
    maxima = [max(lengths[i] for i in b) for b in batch_order(lengths, 16, 3)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 130), min_size=1, max_size=40),
       budget=st.one_of(st.none(), st.integers(1, 600)), data=st.data())
def test_split_by_tokens_covers_rows_within_the_budget(lengths, budget, data):
    rows = data.draw(st.permutations(range(len(lengths))))[:data.draw(st.integers(1, len(lengths)))]
    pieces = split_by_tokens(rows, lengths, budget)
    assert sorted(i for p in pieces for i in p) == sorted(rows)
    if budget is None:
        assert pieces == [list(rows)]
        return
    for p in pieces:
        assert len(p) >= 1
        assert len(p) == 1 or len(p) * max(lengths[i] for i in p) <= budget
    # Greedy, longest first: a piece is cut only where the next row would break the budget.
    for a, b in itertools.pairwise(pieces):
        assert (len(a) + 1) * lengths[a[0]] > budget


def test_split_by_tokens_examples():
    lengths = [40, 127, 30, 40, 100]
    assert split_by_tokens([0, 1, 2, 3, 4], lengths, 10_000) == [[1, 4, 0, 3, 2]]
    assert split_by_tokens([0, 1, 2, 3, 4], lengths, 254) == [[1, 4], [0, 3, 2]]
    assert split_by_tokens([0, 1, 2, 3, 4], lengths, 100) == [[1], [4], [0, 3], [2]]
    assert split_by_tokens([], lengths, 100) == []


# --- collation --------------------------------------------------------------------------------------------------

def test_collate_right_pads():
    out = collate([[5, 6, 7], [8], [9, 10]], pad_id=0, labels=np.array([[1, 0], [0, 1], [1, 1]], dtype=np.int8))
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["input_ids"].dtype == torch.long
    assert out["labels"].dtype == torch.float32 and out["labels"].tolist() == [[1, 0], [0, 1], [1, 1]]
    assert "labels" not in collate([[1]], pad_id=3)
    assert collate([[1], [2, 4]], pad_id=3)["input_ids"].tolist() == [[1, 3], [2, 4]]


# --- losses -----------------------------------------------------------------------------------------------------

def test_losses_finite_and_prefer_correct_logits():
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    good = (targets * 2 - 1) * 4
    for name in ("bce", "focal", "asymmetric"):
        args = LossArgs(name=name)
        lo, hi = multilabel_loss(good, targets, args), multilabel_loss(-good, targets, args)
        assert torch.isfinite(lo) and torch.isfinite(hi) and lo < hi, name
    bce = multilabel_loss(good, targets, LossArgs())
    assert torch.allclose(bce, torch.nn.functional.binary_cross_entropy_with_logits(good, targets))


def test_pos_weight_modes():
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 1]] * 25)   # 25 of 100 positive per class? (25, 25)
    labels[:, 1] = 0
    labels[:2, 1] = 1                                           # class 1: 2 of 100 positive
    assert pos_weight_from_labels(labels, "none", 10.0) is None
    bal = pos_weight_from_labels(labels, "balanced", 10.0)
    assert bal[0].item() == pytest.approx(3.0) and bal[1].item() == pytest.approx(10.0)   # 98/2 clipped
    sq = pos_weight_from_labels(labels, "sqrt", 10.0)
    assert sq[0].item() == pytest.approx(math.sqrt(3.0)) and sq[1].item() == pytest.approx(7.0)
