"""``python -m train tfidf``: the TF-IDF + logistic-regression baseline's out-of-fold and test probabilities, on the
run's folds, in the toolkit's probability-file format; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE_SET_ARGS
from trainkit import ROOT, SAMPLE_TRAIN, write_rows

import train.__main__ as cli
from core.config import RunConfig
from core.data import read_csv
from core.decoding import default_spec
from core.io import read_probs
from core.metrics import exact_match
from core.thresholds import cascade
from train.data import make_folds
from train.tfidf import fit_predict, fit_predict_soft, soft_fit_targets

SAMPLE_TEST = ROOT / "data" / "sample_test.csv"


def main(argv: list[str]) -> int:
    """``python -m train tfidf ARGV`` in-process: its exit status."""
    return cli.main(["tfidf", *argv])


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
    assert default_spec(out / "oof.csv", names).fallback == 19   # tune / evaluate / blend decode as configured


def test_the_baseline_does_not_import_torch():
    """The TF-IDF baseline, its command and distillation's soft-target source load without torch."""
    import subprocess
    import sys

    code = "import sys, train.tfidf_run, train.commands.tfidf, train.distill; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.stdout.strip() == "False", res.stderr[-2000:]


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


# ---- the TF-IDF student (distillation) -------------------------------------------------------------------------


def test_soft_fit_with_hard_targets_is_the_hard_fit():
    texts = np.asarray(pd.read_csv(SAMPLE_TRAIN)["text"].fillna("").astype(str))[:120]
    y = np.zeros((120, 3), dtype=np.int8)
    y[:, 0] = [("доставк" in t.lower()) for t in texts]
    y[::3, 1] = 1
    y[:, 2] = 0                                   # constant: the constant, as in fit_predict
    hard = fit_predict(texts[:90], y[:90], texts[90:], c=4.0, seed=0)
    soft = fit_predict_soft(texts[:90], y[:90].astype(float), np.ones(90), texts[90:], c=4.0, seed=0)
    assert np.abs(hard - soft).max() < 1e-3 and (soft[:, 2] == 0).all()


def test_soft_targets_follow_the_distillation_loss():
    y = np.array([[1, 0], [0, 1], [0, 0]])
    s = np.array([[0.6, 0.2], [0.1, 0.7], [0.9, 0.3]])
    labelled = np.array([True, True, False])
    t, w = soft_fit_targets(y, s, labelled, alpha=1.0)           # hard only; the unlabelled row weighs nothing
    assert (t[:2] == y[:2]).all() and list(w) == [1, 1, 0]
    t, w = soft_fit_targets(y, s, labelled, alpha=0.0)           # soft only
    assert np.allclose(t, s) and list(w) == [1, 1, 1]
    t, w = soft_fit_targets(y, s, labelled, alpha=0.25)
    assert np.allclose(t[0], [0.25 + 0.75 * 0.6, 0.75 * 0.2]) and np.allclose(t[2], s[2]) and list(w) == [1, 1, 0.75]
    # The weighted BCE against these targets is the distillation loss's (linear in the target): check one row.
    z = np.array([0.3, -1.2])
    bce = lambda tt: -(tt * np.log(1 / (1 + np.exp(-z))) + (1 - tt) * np.log(1 - 1 / (1 + np.exp(-z))))
    assert np.allclose(bce(t[0]), 0.25 * bce(y[0]) + 0.75 * bce(s[0]))


@pytest.fixture(scope="module")
def tfidf_teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "tfidf"
    assert main(args(out)) == 0
    return out


def test_tfidf_student_learns_from_fold_k_teachers_only(tfidf_teacher_run, tmp_path):
    unl = tmp_path / "unl.csv"
    pd.read_csv(SAMPLE_TEST).head(40).to_csv(unl, index=False)
    out = tmp_path / "student"
    assert main(args(out, "--folds", tfidf_teacher_run / "folds.csv", "--teacher", tfidf_teacher_run,
                     "--unlabelled", unl, "--set", "distill.alpha=0.5")) == 0
    folds = pd.read_csv(out / "folds.csv")
    for k in range(3):  # fold k's teacher targets cover every row but fold k's: the fold-k model never saw them
        ids, _, _ = read_probs(out / "teachers" / f"t0_fold_{k}.csv")
        own = set(folds.loc[folds["fold"] == k, "index"].astype(str))
        assert not own & set(map(str, ids)) and len(ids) == (folds["fold"] != k).sum() + 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distill"]["teachers"][0]["teacher"] == str(tfidf_teacher_run)
    assert summary["distill"]["unlabelled_rows"] == 40
    _, student, _ = read_probs(out / "oof.csv")
    _, teacher, _ = read_probs(tfidf_teacher_run / "oof.csv")
    assert 0 < np.abs(student - teacher).max() < 0.5             # taught, not copied

    # alpha 1 without unlabelled rows: hard labels only, the teacher's own fit; cached targets reused
    hard = tmp_path / "hard"
    assert main(args(hard, "--folds", tfidf_teacher_run / "folds.csv", "--teacher", tfidf_teacher_run,
                     "--set", "distill.alpha=1", "--targets-from", out / "teachers")) == 2   # other rows: refused
    assert not hard.exists()
    assert main(args(hard, "--folds", tfidf_teacher_run / "folds.csv", "--teacher", tfidf_teacher_run,
                     "--set", "distill.alpha=1")) == 0
    _, p, _ = read_probs(hard / "oof.csv")
    assert np.abs(p - teacher).max() < 1e-3


def test_cached_targets_of_another_teacher_are_refused(tfidf_teacher_run, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(args(first, "--folds", tfidf_teacher_run / "folds.csv", "--teacher", tfidf_teacher_run)) == 0
    other = tmp_path / "other_teacher"
    assert main(args(other, "--folds", tfidf_teacher_run / "folds.csv", "--C", 1)) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(args(out, "--folds", tfidf_teacher_run / "folds.csv", "--teacher", other,
                     "--targets-from", first / "teachers")) == 2
    err = capsys.readouterr().err
    assert "cached targets of teacher" in err and str(other) in err and not out.exists()
    # the same teacher and rows: the cached files are used, the student is the same
    assert main(args(out, "--folds", tfidf_teacher_run / "folds.csv", "--teacher", tfidf_teacher_run,
                     "--targets-from", first / "teachers")) == 0
    assert "3 cached teacher target file(s)" in capsys.readouterr().out
    assert (out / "oof.csv").read_text() == (first / "oof.csv").read_text()


def test_cv_folds_fits_only_those_folds(tfidf_teacher_run, tmp_path, capsys):
    out = tmp_path / "fold1"
    assert main(args(out, "--folds", tfidf_teacher_run / "folds.csv", "--set", "cv.folds=[1]")) == 0
    ids, p, _ = read_probs(out / "oof.csv")
    folds = pd.read_csv(tfidf_teacher_run / "folds.csv")
    assert sorted(map(str, ids)) == sorted(folds.loc[folds["fold"] == 1, "index"].astype(str))
    all_ids, full, _ = read_probs(tfidf_teacher_run / "oof.csv")
    pos = {str(i): r for r, i in enumerate(all_ids)}
    assert np.allclose(p, full[[pos[str(i)] for i in ids]])
    assert json.loads((out / "summary.json").read_text())["folds"] == [1]
    assert main(args(tmp_path / "bad", "--folds", tfidf_teacher_run / "folds.csv", "--set", "cv.folds=[7]")) == 2
    assert "cv.folds must be a non-empty list of fold indices in [0, 3), got [7]" in capsys.readouterr().err


def test_cv_seed_keeps_the_split_when_train_seed_changes(tmp_path):
    """``cv.seed`` fixes the fold split, so a run with another ``train.seed`` is paired with the first on the same
    rows (the seed lever of the levers benchmark); without it the split follows ``train.seed``."""
    def folds_of(name, *sets):
        assert main([*args(tmp_path / name), *sets]) == 0
        return pd.read_csv(tmp_path / name / "folds.csv")["fold"].to_numpy()

    base = folds_of("base")
    assert (folds_of("cv_seed", "--set", "train.seed=7", "--set", "cv.seed=42") == base).all()
    assert not (folds_of("train_seed", "--set", "train.seed=7") == base).all()


def test_the_training_labels_file_sets_what_the_fits_learn_and_the_scores_stay(tmp_path):
    """``data.train_labels_csv`` (e.g. the audit's files): each fit learns its labels on its rows, as
    ``python -m train`` does, while ``oof.csv`` keeps every row and the figures are on ``data.train_csv``'s labels."""
    df = pd.read_csv(SAMPLE_TRAIN)
    labels = [c for c in df.columns if c.startswith("trend_id_res")]
    flip, drop = df.index[::5], df.index[1::7].difference(df.index[::5])
    relabelled = df.copy()
    relabelled.loc[flip, labels] = 0
    relabelled.loc[flip, "trend_id_res3"] = 1
    relabelled.to_csv(tmp_path / "relabelled.csv", index=False)
    relabelled[["index", *labels]].to_csv(tmp_path / "labels.csv", index=False)
    relabelled[["index", *labels]].drop(index=drop).to_csv(tmp_path / "labels_dropped.csv", index=False)
    assert main(args(tmp_path / "plain", "--test", SAMPLE_TEST)) == 0
    folds = tmp_path / "plain" / "folds.csv"
    assert main(args(tmp_path / "relab", "--folds", folds, "--test", SAMPLE_TEST, train=tmp_path / "relabelled.csv")) == 0
    assert main(args(tmp_path / "file", "--folds", folds, "--test", SAMPLE_TEST,
                     "--set", f"data.train_labels_csv={tmp_path / 'labels.csv'}")) == 0
    _, want, _ = read_probs(tmp_path / "relab" / "oof.csv")
    _, got, _ = read_probs(tmp_path / "file" / "oof.csv")
    _, plain, _ = read_probs(tmp_path / "plain" / "oof.csv")
    np.testing.assert_allclose(got, want, atol=1e-12)             # the fits of data.train_csv relabelled
    assert np.abs(got - plain).max() > 0.05
    _, want_test, _ = read_probs(tmp_path / "relab" / "test_probs.csv")
    _, got_test, _ = read_probs(tmp_path / "file" / "test_probs.csv")
    np.testing.assert_allclose(got_test, want_test, atol=1e-12)
    original = read_csv(SAMPLE_TRAIN, RunConfig.from_yaml(None, SAMPLE_SET_ARGS[1::2]).data).labels
    summary = json.loads((tmp_path / "file" / "summary.json").read_text())
    assert summary["oof_metrics"]["cascade/exact_match"] == pytest.approx(exact_match(original, cascade(got, fallback=19)))
    assert summary["train_labels"]["rows_relabelled"] == len(flip) - int((df.loc[flip, labels].to_numpy() ==
                                                                          relabelled.loc[flip, labels].to_numpy()).all(axis=1).sum())

    assert main(args(tmp_path / "dropped", "--folds", folds,
                     "--set", f"data.train_labels_csv={tmp_path / 'labels_dropped.csv'}")) == 0
    ids, dropped, _ = read_probs(tmp_path / "dropped" / "oof.csv")
    assert len(ids) == len(df) and np.abs(dropped - got).max() > 1e-6   # every row scored; fewer rows fitted
    assert json.loads((tmp_path / "dropped" / "summary.json").read_text())["train_labels"]["rows_not_trained"] == len(drop)
