"""core.data: the one prompt formatter formats a value as the training CSV typed it (issue 34: train/serve skew),
and a text column with no text is refused where the CSV is read."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from conftest import SAMPLE_DATA, SAMPLE_TEMPLATE, SAMPLE_TRAIN

from core.adapter import AdapterRef
from core.config import DataArgs, RunConfig
from core.data import csv_field_kinds, field_kinds, format_prompt, format_value, read_csv
from core.errors import InputError

ARGS = DataArgs(**SAMPLE_DATA)


def test_sample_csv_kinds_and_numbers_format_as_training_did():
    kinds = csv_field_kinds(SAMPLE_TRAIN, SAMPLE_TEMPLATE)
    assert kinds == {"assessment": "float", "tags": "str", "text": "str"}
    row = {"tags": "{DELIVERY}", "text": "t"}
    prompts = {format_prompt(SAMPLE_TEMPLATE, {**row, "assessment": v}, kinds) for v in (4, 4.0, "4", "4.0", " 4 ")}
    assert prompts == {"user assesment: 4.0\n\nTags: DELIVERY\n\nReview: t"}
    assert format_value(None, "float") == "" and format_value("", "float") == ""
    assert format_value(4.0, "int") == "4" and format_value("7", "int") == "7"
    for bad in ("abc", True, [4], "inf", "nan", float("inf"), {"a": 1}):
        with pytest.raises(ValueError, match="number"):
            format_value(bad, "float")
    with pytest.raises(ValueError, match="whole number"):
        format_value(4.5, "int")
    with pytest.raises(ValueError, match="assessment"):
        format_prompt(SAMPLE_TEMPLATE, {**row, "assessment": "abc"}, kinds)
    # Without kinds (an adapter of unknown training data) values format as given, as before.
    assert format_prompt(SAMPLE_TEMPLATE, {**row, "assessment": 4}) == "user assesment: 4\n\nTags: DELIVERY\n\nReview: t"


def test_field_kinds_from_pandas_dtypes():
    df = pd.DataFrame({"a": [1, 2], "b": [1.0, None], "c": ["x", "y"], "d": [True, False]})
    assert field_kinds(df, ["a", "b", "c", "d", "e"]) == {"a": "int", "b": "float", "c": "str", "d": "str",
                                                          "e": "str"}


def test_read_csv_with_the_training_kinds(tmp_path):
    """A test CSV whose assessment column has no gap reads as ints; with the training kinds it formats as 4.0."""
    path = tmp_path / "test.csv"
    pd.DataFrame({"index": [0, 1], "assessment": [4, 5], "tags": ["{A}", None], "text": ["x", "y"]}).to_csv(
        path, index=False)
    own = read_csv(path, ARGS, labelled=False)
    assert own.texts[0].startswith("user assesment: 4\n") and own.field_kinds["assessment"] == "int"
    trained = read_csv(path, ARGS, labelled=False, kinds={"assessment": "float"})
    assert trained.texts[0].startswith("user assesment: 4.0\n")
    pd.DataFrame({"index": [0], "assessment": ["x"], "tags": [None], "text": ["x"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"row 2 .*assessment: must be a number"):
        read_csv(path, ARGS, labelled=False, kinds={"assessment": "float"})


def test_adapter_field_kinds_from_info_else_training_csv(tmp_path):
    cfg = RunConfig.from_dict({"data": {**SAMPLE_DATA, "train_csv": str(SAMPLE_TRAIN)}})
    ref = AdapterRef(spec="x", folder=tmp_path, cfg=cfg, label_names=["a"])
    assert ref.field_kinds == {"assessment": "float", "tags": "str", "text": "str"}
    ref = AdapterRef(spec="x", folder=tmp_path, cfg=cfg, label_names=["a"], info={"field_kinds": {"assessment": "int"}})
    assert ref.field_kinds == {"assessment": "int"}
    cfg = RunConfig.from_dict({"data": {**SAMPLE_DATA, "train_csv": str(tmp_path / "gone.csv")}})
    assert AdapterRef(spec="x", folder=tmp_path, cfg=cfg, label_names=["a"]).field_kinds is None


def labelled_csv(path, texts):
    n = len(texts)
    pd.DataFrame({"index": range(n), "assessment": [4.0] * n, "tags": [None] * n, "text": texts,
                  "trend_id_res0": [0, 1] * (n // 2) + [0] * (n % 2)}).to_csv(path, index=False)
    return path


def test_empty_text_column_is_refused_and_empty_rows_are_counted(tmp_path, caplog):
    path = labelled_csv(tmp_path / "empty.csv", [None, "", "   ", None])
    with pytest.raises(InputError, match=r"text column 'text' is empty in every row \(4 rows\)"):
        read_csv(path, ARGS)
    read_csv(path, ARGS, labelled=False)  # predicting such rows is allowed (their prompts are the other fields)
    path = labelled_csv(tmp_path / "some.csv", ["a", None, "b", ""])
    with caplog.at_level(logging.INFO, logger="core.data"):
        ds = read_csv(path, ARGS)
    assert len(ds.texts) == 4 and "2 of 4 rows have an empty 'text'" in caplog.text
