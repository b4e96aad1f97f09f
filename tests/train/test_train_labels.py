"""data.train_labels_csv: the models train on its rows and labels while the folds, the held-out evaluation, oof.csv's
scores and summary.json stay data.train_csv's (issue 38: the training folds' labels change, the scored rows never);
a bad file stops the run before anything is written; a resume refuses a changed file."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from trainkit import as_set_args, tiny_overrides

import train.__main__ as cli
from core.config import RunConfig
from core.data import read_csv
from core.io import read_probs
from core.metrics import scores
from core.thresholds import ThresholdSpec
from train import checkpoint
from train.data import TrainingLabels, read_training_labels
from train.run import Fold, Rows
from train.run_dir import LATER_DEFAULTS, run_fingerprint

LABELS = [f"trend_id_res{k}" for k in range(20)]
DROP_AT = [1, 7, 20, 33, 41, 55]      # positions of small_csv's rows left out of the training labels
FLIP_AT = [2, 3, 10, 25, 40, 50]      # positions whose training labels become trend_id_res0 + trend_id_res19


def write_train_labels(small_csv, path):
    """small_csv's id and label columns, without the DROP_AT rows and with the FLIP_AT rows relabelled."""
    df = pd.read_csv(small_csv)[["index", *LABELS]]
    df.loc[FLIP_AT, LABELS] = 0
    df.loc[FLIP_AT, ["trend_id_res0", "trend_id_res19"]] = 1
    df.drop(index=DROP_AT).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def runs(tiny_model, small_csv, tmp_path_factory):
    """A run of every fold (3 folds, 1 epoch, set decoding scored too) on the training labels, and a plain run of the
    same data (fold 0, one step: its folds.csv)."""
    root = tmp_path_factory.mktemp("train_labels")
    labels_csv = write_train_labels(small_csv, root / "train_labels.csv")
    out, base = root / "run", root / "base"
    raw = tiny_overrides(tiny_model, small_csv, out, train__num_epochs=1, cv__folds=[0, 1, 2],
                         data__train_labels_csv=str(labels_csv), decode__strategy="sets")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the toolkit logs to the current stdout
        assert cli.main(as_set_args(raw)) == 0
    assert cli.main(as_set_args(tiny_overrides(tiny_model, small_csv, base, train__num_epochs=1, train__max_steps=1,
                                               cv__folds=[0]))) == 0
    return {"out": out, "base": base, "labels_csv": labels_csv, "raw": raw, "log": log.getvalue()}


def test_the_folds_are_those_of_the_original_labels(runs):
    folds = pd.read_csv(runs["out"] / "folds.csv")
    assert folds.equals(pd.read_csv(runs["base"] / "folds.csv"))
    assert len(folds) == 60  # the rows not trained on are in their folds too


def test_every_row_is_scored_on_the_original_labels(runs, small_csv):
    out = runs["out"]
    cfg = RunConfig.from_yaml(out / "run_config.yaml")
    assert cfg.data.train_labels_csv == str(runs["labels_csv"])
    original = read_csv(small_csv, cfg.data)
    trained_on = original.labels.copy()
    trained_on[FLIP_AT] = 0
    trained_on[np.ix_(FLIP_AT, [0, 19])] = 1
    ids, probs, _ = read_probs(out / "oof.csv", original.label_names)
    assert ids.tolist() == original.ids.tolist()  # every row, the dropped ones too, in the CSV's order
    pred = ThresholdSpec.from_decode(original.label_names, cfg.decode).decode(probs)
    summary = json.loads((out / "summary.json").read_text())
    on_original, on_trained = scores(original.labels, pred), scores(trained_on, pred)
    assert on_original["micro_f1"] != on_trained["micro_f1"]  # the two label sets score these predictions apart
    for key in ("exact_match", "micro_f1"):
        assert summary["oof_metrics"][f"cascade/{key}"] == pytest.approx(on_original[key])
    folds = pd.read_csv(out / "folds.csv")["fold"].to_numpy()
    sets_hits = 0.0
    for k in range(3):  # the per-epoch evaluation of each fold too
        metrics = json.loads((out / f"fold_{k}" / "metrics.json").read_text())["history"][-1]
        on_fold = scores(original.labels[folds == k], pred[folds == k])
        assert metrics["cascade/exact_match"] == pytest.approx(on_fold["exact_match"])
        assert metrics["cascade/micro_f1"] == pytest.approx(on_fold["micro_f1"])
        sets_hits += metrics["sets/exact_match"] * (folds == k).sum()
    # Set decoding's priors: the labels each fold trained on, in the summary as in the per-epoch evaluation.
    assert summary["oof_metrics"]["sets/exact_match"] == pytest.approx(sets_hits / 60)


def test_the_dropped_rows_are_not_trained_on(runs):
    out = runs["out"]
    folds = pd.read_csv(out / "folds.csv")["fold"].to_numpy()
    trained = np.ones(60, dtype=bool)
    trained[DROP_AT] = False
    samples = [json.loads((out / f"fold_{k}" / "metrics.json").read_text())["samples"] for k in range(3)]
    assert samples == [int(((folds != k) & trained).sum()) for k in range(3)]  # 1 epoch: each training row once
    assert samples != [int((folds != k).sum()) for k in range(3)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_labels"] == {"csv": str(runs["labels_csv"]), "rows": 60, "rows_not_trained": 6,
                                       "rows_relabelled": 6}
    assert summary["throughput"]["train_samples"] == sum(samples)
    assert f"training labels from {runs['labels_csv']}: 6 of 60 rows not trained on, 6 trained on changed " \
           f"labels" in runs["log"]


def test_a_resume_refuses_other_training_labels(runs, capsys):
    other = runs["labels_csv"].with_name("other.csv")
    other.write_bytes(runs["labels_csv"].read_bytes())
    raw = json.loads(json.dumps(runs["raw"]))
    raw["data"]["train_labels_csv"] = str(other)
    assert cli.main(["--resume", *as_set_args(raw)]) == 2
    err = capsys.readouterr().err
    assert "cannot --resume" in err and "data.train_labels_csv" in err and str(other) in err


# (edit of the training labels file, fragments of the one error line besides its path)
BAD_FILES = {
    "unknown_id": (lambda df: pd.concat([df, df.tail(1).assign(index=999999)]), ["row 62", "id 999999",
                                                                                 "not in"]),
    "missing_label_column": (lambda df: df.drop(columns="trend_id_res7"), ["trend_id_res7", "missing"]),
    "extra_label_column": (lambda df: df.assign(trend_id_res20=0), ["trend_id_res20", "extra"]),
    "duplicate_id": (lambda df: pd.concat([df, df.head(1)]), ["duplicate id", "row 62"]),
    "label_value": (lambda df: df.assign(trend_id_res3=np.where(np.arange(len(df)) == 4, 2, df["trend_id_res3"])),
                    ["row 6", "'trend_id_res3'", "not 0 or 1"]),
    "no_id_column": (lambda df: df.drop(columns="index"), ["no id column 'index'"]),
    "missing_file": (None, ["file not found"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_training_labels_file_stops_before_anything_is_written(tiny_model, small_csv, tmp_path, capsys, case):
    edit, fragments = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    if edit is not None:
        edit(pd.read_csv(small_csv)[["index", *LABELS]]).to_csv(path, index=False)
    out = tmp_path / "out"
    assert cli.main(as_set_args(tiny_overrides(tiny_model, small_csv, out, data__train_labels_csv=str(path)))) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for f in [str(path), "data.train_labels_csv", *fragments]:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the parts
def test_rows_train_on_masks_the_rows_and_keeps_the_scored_labels():
    labels = np.eye(4, dtype=np.int8)[[0, 1, 2, 3, 0, 1]]
    new = labels.copy()
    new[2] = [0, 0, 0, 1]
    trained = np.array([True, False, True, True, False, True])
    # Distillation's rows: the 6 labelled ones, then 2 unlabelled ones in no fold (trained on in every fold).
    rows = Rows([[1]] * 8, np.concatenate([labels, np.zeros((2, 4), np.int8)]), np.array([0, 0, 1, 1, 2, 2, -1, -1]))
    rows = rows.train_on(TrainingLabels("t.csv", new, trained, 1))
    assert rows.labels[2].tolist() == [0, 0, 0, 1] and rows.scored_labels[2].tolist() == [0, 0, 1, 0]
    assert rows.trained.tolist() == [*trained, True, True]
    fold0, fold1 = Fold.cv(0, rows, None), Fold.cv(1, rows, None)
    assert fold0.train_idx.tolist() == [2, 3, 5, 6, 7] and fold0.val_idx.tolist() == [0, 1]
    assert fold1.train_idx.tolist() == [0, 5, 6, 7] and fold1.val_idx.tolist() == [2, 3]
    plain = Rows([[1]] * 6, labels, np.array([0, 0, 1, 1, 2, 2]))  # without training labels: as before
    assert plain.scored_labels is plain.labels and Fold.cv(0, plain, None).train_idx.tolist() == [2, 3, 4, 5]


def test_the_final_model_trains_on_the_trained_rows_only(tmp_path, monkeypatch):
    import train.run as run_module
    from train.dist import DistEnv

    models = []
    monkeypatch.setattr(run_module, "train_fold", lambda run, rows, fold: models.append(fold))
    labels = np.eye(3, dtype=np.int8)[[0, 1, 2, 0, 1, 2]]
    rows = Rows([[1]] * 6, labels, np.array([0, 0, 1, 1, 2, 2]))
    rows = rows.train_on(TrainingLabels("t.csv", labels, np.array([True, False, True, True, True, False]), 0))
    out = run_module.train_final(run_module.Run(RunConfig.from_dict({}), DistEnv()), rows, None, tmp_path)
    assert models[0].train_idx.tolist() == [0, 2, 3, 4] and len(models[0].val_idx) == 0
    assert models[0].adapter_info["rows"] == 4 and out["rows_labelled"] == 4


def test_read_training_labels_detected_columns_and_any_id_order(tmp_path):
    train = pd.DataFrame({"id": [10, 11, 12, 13], "text": ["a", "b", "c", "d"], "stars": [1, 5, 0, 3],
                          "x": [1, 0, 0, 1], "y": [0, 1, 1, 0]})
    train.to_csv(tmp_path / "train.csv", index=False)
    cfg = RunConfig.from_dict({"data": {"train_csv": str(tmp_path / "train.csv"),
                                        "train_labels_csv": str(tmp_path / "labels.csv")}})
    ds = read_csv(tmp_path / "train.csv", cfg.data)
    assert ds.label_names == ["x", "y"]
    # The training labels: other order, row 11 dropped, row 13 relabelled; 'stars' is 0/1 in these rows but not a
    # label column of train.csv, so not one here either.
    train.iloc[[3, 2, 0]].assign(x=[1, 0, 1], y=[1, 1, 0]).to_csv(tmp_path / "labels.csv", index=False)
    tl = read_training_labels(cfg.data, ds)
    assert tl.trained.tolist() == [True, False, True, True]
    assert tl.labels.tolist() == [[1, 0], [0, 1], [0, 1], [1, 1]] and tl.relabelled == 1
    assert read_training_labels(RunConfig.from_dict({}).data, ds) is None


def test_config_key_and_resume_fingerprint():
    cfg = RunConfig.from_dict({"data": {"train_labels_csv": "a.csv"}})
    assert cfg.data.train_labels_csv == "a.csv" and RunConfig.from_dict({}).data.train_labels_csv is None
    assert yaml.safe_load(cfg.to_yaml())["data"]["train_labels_csv"] == "a.csv"
    # A checkpoint written before the key existed still resumes; the key changes what a run computes.
    default = RunConfig.from_dict({})
    older = default.to_dict()
    del older["data"]["train_labels_csv"]
    assert run_fingerprint(default) == checkpoint.fingerprint(checkpoint.result_settings(older, later=LATER_DEFAULTS))
    assert run_fingerprint(cfg) != run_fingerprint(default)
    assert run_fingerprint(cfg) != run_fingerprint(RunConfig.from_dict({"data": {"train_labels_csv": "b.csv"}}))


def test_the_summary_decodes_sets_with_the_priors_the_folds_trained_on(tmp_path):
    from train.evaluation import fold_decoding
    from train.run import FoldResult
    from train.summary import write_summary

    rng = np.random.default_rng(0)
    y = np.eye(3, dtype=np.int8)[np.arange(12) % 3]
    pd.DataFrame({"id": range(12), "text": [f"t{i}" for i in range(12)], "a": y[:, 0], "b": y[:, 1],
                  "c": y[:, 2]}).to_csv(tmp_path / "train.csv", index=False)
    cfg = RunConfig.from_dict({"data": {"train_csv": str(tmp_path / "train.csv")}, "decode": {"strategy": "sets"},
                               "output_dir": str(tmp_path / "run")})
    ds = read_csv(tmp_path / "train.csv", cfg.data)
    decode = ThresholdSpec.from_decode(ds.label_names, cfg.decode)
    folds = np.arange(12) // 6
    probs = rng.uniform(0.3, 0.6, (12, 3))
    new = np.tile(np.array([[1, 1, 0]], np.int8), (12, 1))  # the training labels: {a, b}, a set never in train.csv
    trained = np.arange(12) != 5
    rows = Rows([[1]] * 12, y, folds).train_on(TrainingLabels("t.csv", new, trained, 11))
    results = [FoldResult(k, [{"epoch": 1}], None, 1, 1, 1, 1, 1.0, val_index=np.flatnonzero(folds == k),
                          probs=probs[folds == k]) for k in (0, 1)]
    summary = write_summary(cfg, tmp_path, ds, ds.label_names, results, 1.0, decode, trained_on=rows)
    pred, pred_original = np.zeros_like(y), np.zeros_like(y)
    for k in (0, 1):
        val, train_rows = folds == k, np.flatnonzero((folds != k) & trained)
        pred[val] = fold_decoding(cfg, decode, new, train_rows).decode(probs[val])
        pred_original[val] = fold_decoding(cfg, decode, y, np.flatnonzero(folds != k)).decode(probs[val])
    assert summary["oof_metrics"]["sets/exact_match"] == pytest.approx(scores(y, pred)["exact_match"])
    assert scores(y, pred)["exact_match"] != scores(y, pred_original)["exact_match"]  # the priors matter here
