"""``python -m infer`` tune / submit / evaluate / blend through the CLI (``infer.__main__.main(argv)``, in process):
outputs and their formats, reproducibility, and every bad input exiting 2 with the file and column/row named and
no output file written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.io import meta_path, read_probs, write_probs
from infer.__main__ import main

REPO = Path(__file__).resolve().parents[2]
DLS = REPO.parent / "shared" / "data" / "dls"
NAMES = [f"trend_id_res{j}" for j in range(20)]


def make_data(n=240, n_labels=20, seed=0, noise=0.15):
    """Ids, labels (>= 1 per row) and informative probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.07).astype(np.int8)
    y[y.sum(axis=1) == 0, 19 % n_labels] = 1
    p = np.clip(np.where(y == 1, 0.55, 0.12) + rng.normal(0, noise, y.shape), 0, 1)
    return np.arange(5000, 5000 + n), y, p


def write_labels(path, ids, y, names=None):
    """A labelled CSV in the competition format (unnamed row number, index, text columns, label columns)."""
    names = names or [f"trend_id_res{j}" for j in range(y.shape[1])]
    df = pd.DataFrame(y, columns=names)
    df.insert(0, "text", "отзыв")
    df.insert(0, "tags", "{DELIVERY}")
    df.insert(0, "assessment", 4.0)
    df.insert(0, "index", ids)
    df.to_csv(path)  # leading unnamed row-number column, like train.csv
    return path


@pytest.fixture()
def data(tmp_path):
    ids, y, p = make_data()
    labels = write_labels(tmp_path / "train.csv", ids, y)
    oof = tmp_path / "oof.csv"
    write_probs(oof, ids, p, NAMES)
    tids, _, tp = make_data(n=50, seed=1)
    probs = tmp_path / "probs.csv"
    write_probs(probs, tids + 10000, tp, NAMES)
    return {"dir": tmp_path, "ids": ids, "y": y, "p": p, "labels": labels, "oof": oof, "probs": probs,
            "test_ids": tids + 10000, "test_p": tp}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def tune_args(d, out, *extra):
    return ["tune", "--oof", d["oof"], "--labels", d["labels"], "--out", out, "--n-trials", 25, "--no-progress",
            *extra]


# --------------------------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------------------------


def test_tune_writes_reproducible_thresholds_with_meta(data, capsys):
    out1, out2 = data["dir"] / "t1.json", data["dir"] / "t2.json"
    code, stdout, _ = run(tune_args(data, out1), capsys)
    assert code == 0, stdout
    assert "nested estimate" in stdout and "default cascade" in stdout and "tuned (nested)" in stdout
    assert "seeded 5-fold split" in stdout
    assert run(tune_args(data, out2), capsys)[0] == 0
    assert out1.read_bytes() == out2.read_bytes()
    d = json.loads(out1.read_text())
    assert d["label_names"] == NAMES and d["fallback"] == "argmax"  # no run config beside the file: the default
    meta = d["meta"]
    assert meta["oof"] == str(data["oof"]) and meta["labels"] == str(data["labels"])
    assert meta["objective"] == "exact_match" and meta["n_trials"] == 25 and meta["seed"] == 0
    assert meta["nested"]["folds"] == 5 and "numpy" in meta["versions"]
    assert set(meta["in_sample"]) == {"default", "tuned"}
    assert meta["in_sample"]["tuned"]["exact_match"] >= meta["in_sample"]["default"]["exact_match"]


def test_tune_uses_the_runs_folds_file_or_a_fold_column(data, capsys):
    folds = pd.DataFrame({"index": data["ids"][::-1], "fold": np.arange(len(data["ids"]))[::-1] % 3})
    folds.to_csv(data["dir"] / "folds.csv", index=False)  # RUN/folds.csv beside RUN/oof.csv, found on its own
    code, stdout, _ = run(tune_args(data, data["dir"] / "t.json", "--no-per-class", "--objective", "micro_f1"),
                          capsys)
    assert code == 0 and f"3 folds from {data['dir'] / 'folds.csv'}" in stdout
    meta = json.loads((data["dir"] / "t.json").read_text())["meta"]
    assert meta["objective"] == "micro_f1" and meta["nested"]["folds"] == 3
    assert json.loads((data["dir"] / "t.json").read_text())["class_offsets"] is None

    df = pd.read_csv(data["oof"])
    df["fold"] = np.arange(len(df)) % 2
    df.to_csv(data["dir"] / "oof_fold.csv", index=False)
    args = tune_args(data, data["dir"] / "t2.json", "--no-per-class")
    args[2] = data["dir"] / "oof_fold.csv"
    (data["dir"] / "folds.csv").unlink()
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "2 folds from the 'fold' column" in stdout


# --------------------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------------------


def test_submit_format_order_and_class_ids(data, capsys):
    out = data["dir"] / "submission.csv"
    code, stdout, _ = run(["submit", "--probs", data["probs"], "--out", out], capsys)
    assert code == 0, stdout
    text = out.read_text()
    assert text.splitlines()[0] == "index,target"
    if (DLS / "sample_submission.csv").is_file():
        assert text.splitlines()[0] == (DLS / "sample_submission.csv").read_text().splitlines()[0]
    sub = pd.read_csv(out, dtype={"target": str}, keep_default_na=False)
    assert list(sub["index"]) == list(data["test_ids"])
    p = data["test_p"]
    for row, target in zip(p, sub["target"]):  # the reference loop
        for t in [0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]:
            sel = [j for j, v in enumerate(row) if v > t]
            if sel:
                break
        else:
            sel = [19]
        assert target == " ".join(map(str, sel))

    # Columns in another order: class ids come from the names, targets ascending, same rows.
    shuffled = data["dir"] / "shuffled.csv"
    perm = np.random.default_rng(0).permutation(20)
    write_probs(shuffled, data["test_ids"], p[:, perm], [NAMES[j] for j in perm])
    out2 = data["dir"] / "submission2.csv"
    assert run(["submit", "--probs", shuffled, "--out", out2], capsys)[0] == 0
    assert out2.read_text() == text


def test_submit_with_tuned_thresholds_and_ids_check(data, capsys):
    thr = data["dir"] / "thr.json"
    assert run(tune_args(data, thr, "--no-nested"), capsys)[0] == 0
    test_csv = data["dir"] / "test.csv"
    pd.DataFrame({"index": data["test_ids"], "text": "x"}).to_csv(test_csv, index=False)
    out = data["dir"] / "sub.csv"
    code, stdout, _ = run(["submit", "--probs", data["probs"], "--thresholds", thr, "--ids", test_csv, "--out", out],
                          capsys)
    assert code == 0 and "decoded with" in stdout
    from core.decoding import read_thresholds

    spec = read_thresholds(thr)
    preds = spec.decode(data["test_p"])
    sub = pd.read_csv(out, dtype={"target": str}, keep_default_na=False)
    assert list(sub["target"]) == [" ".join(map(str, np.flatnonzero(r))) for r in preds]


def test_submit_fallback_option_and_small_label_sets(tmp_path, capsys):
    ids, _, p = make_data(n=30, n_labels=5)
    p[:3] = 0.01  # rows that fall back
    p[0, 2] = p[1, 4] = p[2, 0] = 0.02
    probs = tmp_path / "p5.csv"
    write_probs(probs, ids, p, [f"trend_id_res{j}" for j in range(5)])
    out = tmp_path / "sub.csv"
    assert run(["submit", "--probs", probs, "--out", out], capsys)[0] == 0  # default: each row's most probable class
    sub = pd.read_csv(out, dtype={"target": str}, keep_default_na=False)
    assert list(sub["target"][:3]) == ["2", "4", "0"]
    for value in ("3", "trend_id_res3"):  # a class id as in submissions, or a label name
        assert run(["submit", "--probs", probs, "--out", out, "--fallback", value], capsys)[0] == 0
        sub = pd.read_csv(out, dtype={"target": str}, keep_default_na=False)
        assert list(sub["target"][:3]) == ["3", "3", "3"]
    assert run(["submit", "--probs", probs, "--out", out, "--fallback", "none"], capsys)[0] == 0
    assert out.read_text().splitlines()[1] == f"{ids[0]},"
    code, _, err = run(["submit", "--probs", probs, "--out", tmp_path / "x.csv", "--fallback", "7"], capsys)
    assert code == 2 and "--fallback" in err and "'7'" in err and not (tmp_path / "x.csv").exists()


def test_decoding_and_id_column_come_from_the_run(tmp_path, capsys):
    """A run's decode section (fallback by label name) and data.id_column are the defaults of tune / submit /
    evaluate for the probability files it wrote; a fallback the labels lack is an error naming the run config."""
    ids, y, p = make_data(n=120)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.yaml").write_text("data:\n  id_column: review_id\ndecode:\n  fallback: trend_id_res19\n")
    oof = run_dir / "oof.csv"
    write_probs(oof, ids, p, NAMES)
    labels = tmp_path / "train.csv"
    df = pd.DataFrame(y, columns=NAMES)
    df.insert(0, "review_id", ids)
    df.to_csv(labels, index=False)
    thr = tmp_path / "t.json"
    code, stdout, err = run(["tune", "--oof", oof, "--labels", labels, "--out", thr, "--n-trials", 5, "--no-progress",
                             "--no-nested"], capsys)
    assert code == 0, err
    tuned = json.loads(thr.read_text())   # the fallback is tuned between the run's and argmax
    assert tuned["meta"]["fallback_candidates"] == ["trend_id_res19", "argmax"] and tuned["fallback"] in (19, "argmax")
    code, stdout, err = run(["tune", "--oof", oof, "--labels", labels, "--out", thr, "--n-trials", 5, "--no-progress",
                             "--no-nested", "--fallback", "trend_id_res19"], capsys)   # fixed
    assert code == 0, err
    assert json.loads(thr.read_text())["fallback"] == 19
    p0 = p.copy()
    p0[:4] = 0.01
    probs = run_dir / "test_probs.csv"
    write_probs(probs, ids, p0, NAMES)
    assert run(["submit", "--probs", probs, "--out", tmp_path / "s.csv"], capsys)[0] == 0
    sub = pd.read_csv(tmp_path / "s.csv", dtype={"target": str}, keep_default_na=False)
    assert list(sub["target"][:4]) == ["19"] * 4
    code, stdout, err = run(["evaluate", "--probs", oof, "--labels", labels, "--out-dir", tmp_path / "ev"], capsys)
    assert code == 0 and "no run config" not in stdout + err
    other = tmp_path / "other.csv"   # a blend written elsewhere decodes like the first model's run
    write_probs(other, ids, np.clip(p + 0.05, 0, 1), NAMES)
    code, stdout, err = run(["evaluate", "--probs", other, "--labels", labels, "--out-dir", tmp_path / "ev",
                             "--id-column", "review_id"], capsys)
    assert code == 0 and "no run config" in stdout + err and "falls back to argmax" in stdout + err  # said, not silent
    assert run(["blend", "--oof", f"{oof},{other}", "--labels", labels, "--out-oof", tmp_path / "b.csv",
                "--no-nested", "--n-trials", 3, "--no-progress"], capsys)[0] == 0
    from core.decoding import default_spec

    assert default_spec(tmp_path / "b.csv", NAMES).fallback == 19
    (run_dir / "run_config.yaml").write_text("decode:\n  fallback: no_such_label\n")
    code, _, err = run(["submit", "--probs", probs, "--out", tmp_path / "s2.csv"], capsys)
    assert code == 2 and "decode.fallback" in err and "run_config.yaml" in err and "no_such_label" in err


# --------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------


def test_evaluate_prints_the_table_and_writes_pngs_and_metrics(data, capsys):
    thr = data["dir"] / "thr.json"
    assert run(tune_args(data, thr, "--no-nested"), capsys)[0] == 0
    out_dir = data["dir"] / "eval"
    code, stdout, _ = run(["evaluate", "--probs", data["oof"], "--labels", data["labels"], "--thresholds", thr,
                           "--out-dir", out_dir, "--rare-max-prevalence", 0.06], capsys)
    assert code == 0
    for row in ("threshold 0.5", "default cascade", "tuned", "exact_match", "micro_f1", "macro_f1", "weighted_f1"):
        assert row in stdout
    for name in ("oof.per_class_f1.png", "oof.threshold_curve.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out_dir / "oof.eval.json").read_text())
    assert set(m["metrics"]) == {"threshold 0.5", "default cascade", "tuned"}
    assert set(m["per_class_f1"]["tuned"]) == set(NAMES) and len(m["curve"]["threshold"]) == 19
    from core.metrics import scores
    from core.thresholds import cascade

    assert m["metrics"]["default cascade"] == pytest.approx(scores(data["y"], cascade(data["p"])))
    # the breakdowns by true label count and over rare / frequent classes, per decoding, in the JSON and printed
    from core.metrics import by_label_count, rare_class_f1

    assert set(m["by_label_count"]) == set(m["rare_class_f1"]) == {"default cascade", "tuned"}
    assert m["by_label_count"]["default cascade"] == by_label_count(data["y"], cascade(data["p"]))  # floats: JSON exact
    rare = m["rare_class_f1"]["default cascade"]   # 7 of the 20 classes have at most 6% of the 240 rows (10..14)
    expected = rare_class_f1(data["y"], cascade(data["p"]), max_prevalence=0.06)
    assert rare["rare"]["names"] == [NAMES[j] for j in expected["rare"]["indices"]] and rare["rare"]["classes"] == 7
    assert rare["rare"]["mean_f1"] == expected["rare"]["mean_f1"] and rare["max_prevalence"] == 0.06
    assert "rows by true label count" in stdout and "classes by positives" in stdout
    lines = stdout.splitlines()
    for g in m["by_label_count"]["tuned"]:   # one line per group: label count, rows, ..., the tuned exact match
        assert any(line.startswith(f"{g['labels']} ") and f"{g['rows']}" in line and f"{g['exact_match']:.4f}" in line
                   for line in lines)
    assert any(line.startswith("rare ") and " 7 " in line and f"{expected['rare']['mean_f1']:.4f}" in line
               for line in lines)
    code, _, err = run(["evaluate", "--probs", data["oof"], "--labels", data["labels"], "--rare-max-prevalence", 0,
                        "--out-dir", data["dir"] / "ev0"], capsys)
    assert code == 2 and "--rare-max-prevalence" in err and not (data["dir"] / "ev0").exists()
    # default --out-dir: beside the probability file
    assert run(["evaluate", "--probs", data["oof"], "--labels", data["labels"]], capsys)[0] == 0
    assert (data["dir"] / "oof.eval.json").is_file() and (data["dir"] / "oof.threshold_curve.png").is_file()
    assert json.loads((data["dir"] / "oof.eval.json").read_text())["rare_class_f1"]["default cascade"]["rare"][
        "classes"] == 0   # the default 1% of 240 rows: no class is that rare


def test_evaluate_against_a_baseline_prints_the_paired_difference(data, capsys):
    from core.metrics import exact_match
    from core.thresholds import cascade

    d = data["dir"]
    rng = np.random.default_rng(7)
    base_p = rng.random(data["p"].shape)
    order = rng.permutation(len(data["ids"]))  # another row order and another column order: aligned by id and name
    base = d / "base_oof.csv"
    write_probs(base, data["ids"][order], base_p[order][:, ::-1], NAMES[::-1])
    code, stdout, _ = run(["evaluate", "--probs", data["oof"], "--labels", data["labels"], "--baseline", base,
                           "--out-dir", d / "ev"], capsys)
    assert code == 0 and f"vs baseline {base}" in stdout and "CI" in stdout
    c = json.loads((d / "ev" / "oof.eval.json").read_text())["baseline"]
    assert c["probs"] == str(base) and set(c) == {"probs", "threshold 0.5", "default cascade"}
    gap = exact_match(data["y"], cascade(data["p"])) - exact_match(data["y"], cascade(base_p))
    assert gap > 0 and c["default cascade"]["difference"] == pytest.approx(gap)
    assert c["default cascade"]["low"] <= gap <= c["default cascade"]["high"]
    # a baseline without one of the rows: an error naming the file and the id
    write_probs(base, data["ids"][1:], base_p[1:], NAMES)
    code, _, err = run(["evaluate", "--probs", data["oof"], "--labels", data["labels"], "--baseline", base,
                        "--out-dir", d / "ev2"], capsys)
    assert code == 2 and str(base) in err and f"id {data['ids'][0]}" in err and not (d / "ev2").exists()


def test_per_class_chart_names_classes_from_the_run_folder(tmp_path):
    from infer.evaluate import class_labels, run_descriptions

    probs = tmp_path / "oof.csv"
    assert run_descriptions(probs, ["a", "b"]) == {}  # no label_names.json: column names only
    (tmp_path / "label_names.json").write_text(json.dumps(
        {"label_names": ["a", "b"], "descriptions": {"a": "Долгая\n доставка", "b": "x" * 60}}))
    desc = run_descriptions(probs, ["a", "b"])
    assert class_labels(["a", "b"], {"a": 3, "b": 0}, desc) == [
        "a Долгая доставка (n=3)", "b " + "x" * 39 + "… (n=0)"]
    assert class_labels(["a"], {"a": 1}) == ["a (n=1)"]


# --------------------------------------------------------------------------------------------------------------
# blend
# --------------------------------------------------------------------------------------------------------------


def test_blend_weights_the_better_model_and_writes_the_blend(data, capsys):
    d = data["dir"]
    rng = np.random.default_rng(5)
    bad_oof, bad_probs = d / "bad_oof.csv", d / "bad_probs.csv"
    order = rng.permutation(len(data["ids"]))  # another row order: aligned by id
    write_probs(bad_oof, data["ids"][order], rng.random(data["p"].shape)[order] * 0.9, NAMES)
    write_probs(bad_probs, data["test_ids"], rng.random(data["test_p"].shape), NAMES)
    out, out_oof = d / "blend.csv", d / "blend_oof.csv"
    code, stdout, _ = run(["blend", "--probs", f"{data['probs']},{bad_probs}", "--oof", f"{data['oof']},{bad_oof}",
                           "--labels", data["labels"], "--out", out, "--out-oof", out_oof, "--n-trials", 30,
                           "--no-progress"], capsys)
    assert code == 0 and "blend" in stdout and str(bad_oof) in stdout
    meta = json.loads(meta_path(out).read_text())
    w = meta["weights"]
    assert w[0] > w[1] and meta["inputs"] == [str(data["probs"]), str(bad_probs)]
    ids, p, names = read_probs(out)
    assert list(ids) == list(data["test_ids"]) and names == NAMES
    assert np.allclose(p, w[0] * data["test_p"] + w[1] * read_probs(bad_probs)[1], atol=2e-6)
    assert read_probs(out_oof)[1].shape == data["p"].shape
    scores = meta["oof_scores"]
    assert scores["blend (in-sample)"]["exact_match"] >= scores[str(data["oof"])]["exact_match"]
    # The honest figure: weights tuned on 4 folds, the 5th scored (no folds.csv here: a seeded 5-fold split).
    nested = meta["nested"]
    assert nested["folds"] == 5 and len(nested["per_fold"]) == 5 and "nested estimate over 5 folds" in stdout
    assert scores["blend (nested)"] == nested["pooled"]
    assert scores[str(bad_oof)]["exact_match"] < nested["pooled"]["exact_match"] <= scores["blend (in-sample)"][
        "exact_match"]


def test_blend_without_probs_only_measures(data, capsys):
    d = data["dir"]
    other = d / "other_oof.csv"
    write_probs(other, data["ids"], np.random.default_rng(6).random(data["p"].shape), NAMES)
    before = sorted(p.name for p in d.iterdir())
    code, stdout, _ = run(["blend", "--oof", f"{data['oof']},{other}", "--labels", data["labels"], "--n-trials", 10,
                           "--no-progress"], capsys)
    assert code == 0 and "blend (nested)" in stdout and "wrote" not in stdout
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written
    code, _, err = run(["blend", "--oof", f"{data['oof']},{other}", "--labels", data["labels"], "--out", d / "b.csv",
                        "--n-trials", 10, "--no-progress"], capsys)
    assert code == 2 and "--out needs --probs" in err and not (d / "b.csv").exists()


def test_blend_tune_decoding_reports_blend_plus_tune_nested(data, capsys):
    d = data["dir"]
    other, out_oof = d / "other_oof.csv", d / "blend_oof.csv"
    write_probs(other, data["ids"], np.clip(data["p"] + np.random.default_rng(7).normal(0, 0.2, data["p"].shape),
                                            0, 1), NAMES)
    code, stdout, _ = run(["blend", "--oof", f"{data['oof']},{other}", "--labels", data["labels"], "--n-trials", 5,
                           "--tune-decoding", "sets", "--out-oof", out_oof, "--no-progress"], capsys)
    assert code == 0 and "blend + tuned cascade (nested)" in stdout and "blend + sets (nested)" in stdout
    meta = json.loads(meta_path(out_oof).read_text())
    dec, rows = meta["nested"]["decoding"], meta["oof_scores"]
    assert dec["folds"] == 5 and dec["pooled"]["default"] == rows["blend (nested)"] == meta["nested"]["pooled"]
    assert rows["blend + tuned cascade (nested)"] == dec["pooled"]["tuned"]
    assert rows["blend + sets (nested)"] == dec["pooled"]["sets"]
    code, _, err = run(["blend", "--oof", f"{data['oof']},{other}", "--labels", data["labels"], "--n-trials", 5,
                        "--tune-decoding", "sets", "--no-nested", "--no-progress"], capsys)
    assert code == 2 and "--tune-decoding is part of the nested estimate" in err


@pytest.mark.parametrize("marked", ["key", "keep_best"])
def test_an_optimistic_oof_file_is_refused_for_nested_estimates(data, capsys, marked):
    """The OOF file of a train.keep=best run (each fold's epoch chosen on its rows) gives no nested estimate in tune
    or blend; --no-nested goes on and says so; evaluate says so. Marked by the key, or (older files) by the
    out-of-fold kind with adapter best."""
    d = data["dir"]
    opt = d / "best_oof.csv"
    meta = ({"kind": "out-of-fold probabilities", "adapter": "last", "optimistic": "picked on these rows"}
            if marked == "key" else {"kind": "out-of-fold probabilities", "adapter": "best"})
    write_probs(opt, data["ids"], data["p"], NAMES, meta=meta)
    out = d / "t.json"
    code, _, err = run(["tune", "--oof", opt, "--labels", data["labels"], "--out", out, "--n-trials", 5,
                        "--no-progress"], capsys)
    assert code == 2 and str(opt) in err and "optimistic" in err and "--no-nested" in err and not out.exists()
    code, _, err = run(["blend", "--oof", f"{data['oof']},{opt}", "--labels", data["labels"], "--n-trials", 5,
                        "--no-progress"], capsys)
    assert code == 2 and str(opt) in err and "optimistic" in err
    code, stdout, _ = run(["tune", "--oof", opt, "--labels", data["labels"], "--out", out, "--n-trials", 5,
                           "--no-progress", "--no-nested"], capsys)
    assert code == 0 and "optimistic" in stdout and json.loads(out.read_text())["meta"]["optimistic"]
    code, stdout, _ = run(["evaluate", "--probs", opt, "--labels", data["labels"]], capsys)
    assert code == 0 and "optimistic" in stdout
    assert json.loads((d / "best_oof.eval.json").read_text())["optimistic"]
    # the same rows without the mark: a nested estimate as usual
    code, stdout, _ = run(tune_args(data, d / "t2.json"), capsys)
    notes = [ln for ln in stdout.splitlines() if ln.startswith(f"note: {data['oof']}") and "no run config" not in ln]
    assert code == 0 and "nested estimate" in stdout and not notes


# --------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, the file and column/row named, nothing written
# --------------------------------------------------------------------------------------------------------------


def bad_file(data, name, mutate):
    df = pd.read_csv(data["oof"])
    df = mutate(df)
    path = data["dir"] / name
    df.to_csv(path, index=False)
    return path


BAD_PROBS = {
    "missing_column": (lambda df: df.drop(columns=["trend_id_res7"]), ["trend_id_res7"]),
    "extra_column": (lambda df: df.assign(trend_id_res20=0.1), ["trend_id_res20"]),
    "above_one": (lambda df: df.assign(trend_id_res3=df["trend_id_res3"].where(df.index != 4, 1.5)),
                  ["row 6", "trend_id_res3", "1.5"]),
    "negative": (lambda df: df.assign(trend_id_res2=df["trend_id_res2"].where(df.index != 0, -0.1)),
                 ["row 2", "trend_id_res2"]),
    "nan": (lambda df: df.assign(trend_id_res0=df["trend_id_res0"].where(df.index != 9, np.nan)),
            ["row 11", "trend_id_res0"]),
    "unknown_id": (lambda df: df.assign(index=df["index"].where(df.index != 2, 999999)), ["row 4", "999999"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PROBS))
def test_bad_probability_files_exit_2_and_write_nothing(data, case, capsys):
    mutate, needles = BAD_PROBS[case]
    bad = bad_file(data, f"{case}.csv", mutate)
    d = data["dir"]
    commands = {
        "tune": ["tune", "--oof", bad, "--labels", data["labels"], "--out", d / "out.json", "--n-trials", 5],
        "evaluate": ["evaluate", "--probs", bad, "--labels", data["labels"], "--out-dir", d / "ev"],
        "blend": ["blend", "--probs", f"{data['probs']},{data['probs']}", "--oof", f"{data['oof']},{bad}",
                  "--labels", data["labels"], "--out", d / "out.csv"],
    }
    if case not in ("unknown_id", "extra_column", "missing_column"):
        commands["submit"] = ["submit", "--probs", bad, "--out", d / "out.csv"]
    for name, argv in commands.items():
        code, _, err = run(argv, capsys)
        assert code == 2, (name, err)
        assert err.startswith("error: ") and str(bad) in err, (name, err)
        for needle in needles:
            assert needle in err, (name, needle, err)
    assert not (d / "out.json").exists() and not (d / "out.csv").exists() and not (d / "ev").exists()
    assert not meta_path(d / "out.csv").exists()
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_blend_files_must_agree_on_ids(data, capsys):
    d = data["dir"]
    other = bad_file(data, "other_oof.csv", lambda df: df.iloc[:-1])  # one row fewer
    code, _, err = run(["blend", "--probs", f"{data['probs']},{data['probs']}", "--oof", f"{data['oof']},{other}",
                        "--labels", data["labels"], "--out", d / "out.csv"], capsys)
    assert code == 2 and str(other) in err and str(data["ids"][-1]) in err and not (d / "out.csv").exists()
    other_probs = d / "other_probs.csv"
    write_probs(other_probs, data["test_ids"] + 1, data["test_p"], NAMES)
    code, _, err = run(["blend", "--probs", f"{data['probs']},{other_probs}", "--oof", f"{data['oof']},{data['oof']}",
                        "--labels", data["labels"], "--out", d / "out.csv"], capsys)
    assert code == 2 and str(other_probs) in err and "row " in err and not (d / "out.csv").exists()
    code, _, err = run(["blend", "--probs", str(data["probs"]), "--oof", f"{data['oof']},{data['oof']}",
                        "--labels", data["labels"], "--out", d / "out.csv"], capsys)
    assert code == 2 and "--oof" in err


def test_thresholds_for_another_label_set_are_refused(data, capsys):
    d = data["dir"]
    thr = d / "thr.json"
    assert run(tune_args(data, thr, "--no-nested"), capsys)[0] == 0
    spec = json.loads(thr.read_text())
    spec["label_names"] = [n.replace("trend_id_res1", "trend_id_resX") if n == "trend_id_res1" else n
                           for n in spec["label_names"]]
    other = d / "other.json"
    other.write_text(json.dumps(spec))
    for argv in (["submit", "--probs", data["probs"], "--thresholds", other, "--out", d / "out.csv"],
                 ["evaluate", "--probs", data["oof"], "--labels", data["labels"], "--thresholds", other,
                  "--out-dir", d / "ev"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and str(other) in err and "trend_id_resX" in err and "trend_id_res1" in err, err
    broken = d / "broken.json"
    broken.write_text("{not json")
    code, _, err = run(["submit", "--probs", data["probs"], "--thresholds", broken, "--out", d / "out.csv"], capsys)
    assert code == 2 and str(broken) in err
    assert not (d / "out.csv").exists() and not (d / "ev").exists()


def test_ids_that_do_not_match_the_input(data, capsys):
    d = data["dir"]
    test_csv = d / "test.csv"
    swapped = list(data["test_ids"])
    swapped[3], swapped[4] = swapped[4], swapped[3]
    pd.DataFrame({"index": swapped, "text": "x"}).to_csv(test_csv, index=False)
    code, _, err = run(["submit", "--probs", data["probs"], "--ids", test_csv, "--out", d / "out.csv"], capsys)
    assert code == 2 and str(test_csv) in err and "row 5" in err and not (d / "out.csv").exists()
    # labels with a bad value / a labels file without the probs' rows
    labels = write_labels(d / "labels_bad.csv", data["ids"], np.where(np.arange(20) == 4, 2, data["y"]))
    code, _, err = run(["tune", "--oof", data["oof"], "--labels", labels, "--out", d / "out.json"], capsys)
    assert code == 2 and str(labels) in err and "trend_id_res4" in err and not (d / "out.json").exists()
    fewer = write_labels(d / "labels_fewer.csv", data["ids"][:-5], data["y"][:-5])
    code, _, err = run(["evaluate", "--probs", data["oof"], "--labels", fewer, "--out-dir", d / "ev"], capsys)
    assert code == 2 and str(data["oof"]) in err and str(fewer) in err and str(data["ids"][-5]) in err
    folds = d / "folds_bad.csv"
    pd.DataFrame({"index": data["ids"][:-1], "fold": 0}).to_csv(folds, index=False)
    code, _, err = run(tune_args(data, d / "out.json", "--folds", folds), capsys)
    assert code == 2 and str(folds) in err and str(data["ids"][-1]) in err
    assert not (d / "out.json").exists() and not (d / "ev").exists()


def test_real_competition_files_when_present(tmp_path, capsys):
    """The real train.csv (3,700 rows, 50 labels) as the labels file for an OOF of some of its rows."""
    if not (DLS / "train.csv").is_file():
        pytest.skip("../shared/data/dls not available")
    ids = pd.read_csv(DLS / "train.csv", usecols=["index"])["index"].to_numpy()[:300]
    rng = np.random.default_rng(0)
    names = [f"trend_id_res{j}" for j in range(50)]
    write_probs(tmp_path / "oof.csv", ids, rng.random((300, 50)) * 0.7, names)
    code, stdout, _ = run(["tune", "--oof", tmp_path / "oof.csv", "--labels", DLS / "train.csv", "--out",
                           tmp_path / "t.json", "--n-trials", 10, "--no-nested", "--no-progress"], capsys)
    assert code == 0 and "300 of 3700 labelled rows" in stdout
    assert run(["submit", "--probs", tmp_path / "oof.csv", "--thresholds", tmp_path / "t.json", "--out",
                tmp_path / "s.csv"], capsys)[0] == 0
    sample = pd.read_csv(DLS / "sample_submission.csv", nrows=5, dtype={"target": str}, keep_default_na=False)
    sub = pd.read_csv(tmp_path / "s.csv", dtype={"target": str}, keep_default_na=False)
    assert list(sub.columns) == list(sample.columns) and sub["index"].dtype == sample["index"].dtype


def test_python_m_infer_lists_every_subcommand_and_exits_2_on_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("predict", "push", "pull", "tune", "submit", "evaluate", "blend"):
        assert name in help_text
    r = subprocess.run([sys.executable, "-m", "infer", "submit", "--probs", "/nonexistent/p.csv", "--out",
                        "/tmp/never-written.csv"], cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "error: /nonexistent/p.csv" in r.stderr


def test_atomic_writes_have_the_usual_permissions(tmp_path):
    """mkstemp/mkdtemp create 0600/0700; artifacts (shared, uploaded) must get the umask's permissions."""
    import os

    from core.io import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            write_text(d / "b.txt", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "b.txt").stat().st_mode & 0o777 == 0o644
