"""``python -m train tfidf``: the TF-IDF + logistic-regression baseline's out-of-fold and test probabilities, on the
run's folds, in the toolkit's probability-file format; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE_SET_ARGS
from trainkit import ROOT, SAMPLE_TRAIN, write_rows

from core.config import RunConfig
from core.data import read_csv
from core.io import read_probs
from core.metrics import exact_match
from core.thresholds import cascade
from train.data import make_folds
from train.tfidf import fit_predict, main

SAMPLE_TEST = ROOT / "data" / "sample_test.csv"


def args(out, *extra, train=SAMPLE_TRAIN):
    return ["--set", f"data.train_csv={train}", "--set", "cv.n_folds=3", *SAMPLE_SET_ARGS, "--out", str(out),
            *map(str, extra)]


def test_oof_and_test_probabilities_on_the_runs_folds(tmp_path, capsys):
    out = tmp_path / "tfidf"
    assert main(args(out, "--test", SAMPLE_TEST)) == 0
    assert "out of fold: exact match" in capsys.readouterr().out
    cfg = RunConfig.from_yaml(None, [f"data.train_csv={SAMPLE_TRAIN}", "cv.n_folds=3", *SAMPLE_SET_ARGS[1::2]])
    ds = read_csv(SAMPLE_TRAIN, cfg.data)
    ids, oof, names = read_probs(out / "oof.csv")
    assert list(ids) == list(ds.ids) and names == ds.label_names and ((oof >= 0) & (oof <= 1)).all()
    folds = pd.read_csv(out / "folds.csv")
    assert (folds["fold"].to_numpy() == make_folds(ds.labels, 3, cfg.train.seed)).all()   # what `python -m train` uses
    # Better than predicting the most common label set for every row.
    sets = pd.Series(["".join(map(str, r)) for r in ds.labels]).value_counts()
    assert exact_match(ds.labels, cascade(oof)) > sets.iloc[0] / len(ds.labels) + 0.2
    test_ids, test_p, _ = read_probs(out / "test_probs.csv", names)
    assert list(test_ids) == pd.read_csv(SAMPLE_TEST)["index"].tolist() and test_p.shape == (len(test_ids), 20)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0, 1, 2] and len(summary["per_fold"]) == 3
    assert summary["oof_metrics"]["cascade/exact_match"] == pytest.approx(exact_match(ds.labels, cascade(oof)))


def test_folds_file_is_followed(tmp_path):
    ds_ids = pd.read_csv(SAMPLE_TRAIN)["index"]
    given = pd.DataFrame({"index": ds_ids, "fold": np.arange(len(ds_ids)) % 2}).sample(frac=1, random_state=0)
    given.to_csv(tmp_path / "folds.csv", index=False)
    assert main(args(tmp_path / "out", "--folds", tmp_path / "folds.csv")) == 0
    written = pd.read_csv(tmp_path / "out" / "folds.csv")
    assert written["index"].tolist() == ds_ids.tolist()
    assert (written["fold"].to_numpy() == np.arange(len(ds_ids)) % 2).all()


def test_a_class_absent_from_the_training_rows_gets_probability_zero():
    texts = ["быстрая доставка", "курьер опоздал", "доставка вовремя", "опоздал на час"] * 5
    y = np.zeros((20, 3), dtype=np.int8)
    y[::2, 0] = 1                                 # the "доставка" texts
    y[1::2, 1] = 1                                # the "опоздал" texts
    # class 2: never positive
    p = fit_predict(texts, y, ["курьер опоздал", "быстрая доставка"], c=4.0, seed=0)
    assert p.shape == (2, 3) and (p[:, 2] == 0).all() and p[0, 1] > p[0, 0] and p[1, 0] > p[1, 1]


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(out, train=tmp_path / "missing.csv")) == 2
    assert "missing.csv: file not found" in capsys.readouterr().err and not out.exists()

    assert main(args(out, "--folds", tmp_path / "nofolds.csv")) == 2
    assert "nofolds.csv: folds file not found" in capsys.readouterr().err and not out.exists()

    few = write_rows(tmp_path / "few.csv", 50)
    pd.DataFrame({"index": pd.read_csv(few)["index"], "fold": 0}).to_csv(tmp_path / "short.csv", index=False)
    assert main(args(out, "--folds", tmp_path / "short.csv")) == 2   # the folds of 50 rows, 400 to train on
    err = capsys.readouterr().err
    assert "short.csv" in err and "not in" in err and not out.exists()

    bad = write_rows(tmp_path / "bad.csv", 30, trend_id_res3=2)
    assert main(args(out, train=bad)) == 2
    assert "bad.csv: row 2" in capsys.readouterr().err and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(args(out)) == 2
    assert "already holds files" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"
