"""A user's own data is the normal case: 1 (binary), 3 and 10 labels with any column names, an id column with any
name and a template with any fields, end to end (train -> predict -> tune -> submit) on a tiny 4-bit model; and no
module of the toolkit knows the DLS data (its constants live in configs/ and the tests' sample helpers only)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import RunConfig
from core.io import read_probs

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["fast", "slow", "cheap", "price", "late", "fresh", "rude", "kind", "broken", "great", "app", "courier"]


def user_csv(path: Path, label_names: list[str], n: int, seed: int, labelled: bool = True) -> Path:
    """Reviews with a ``review_id`` id, ``title`` / ``body`` text and 0/1 columns named ``label_names``."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "review_id": [f"r-{seed}-{i}" for i in range(n)],
        "title": [" ".join(rng.choice(WORDS, 2)) for _ in range(n)],
        "body": [" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(n)],
        "stars": rng.integers(1, 6, n),  # a numeric column the template does not use: not a label (not 0/1)
    })
    if labelled:
        y = (rng.random((n, len(label_names))) < 0.3).astype(int)
        y[y.sum(axis=1) == 0, 0] = 1
        for j, name in enumerate(label_names):
            df[name] = y[:, j]
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("label_names, explicit", [
    (["is_spam"], True),                                   # binary
    (["red", "green", "blue"], False),                     # detected as the 0/1 columns
    (["yes", "no"], False),                                # 2
    ([f"topic {c}" for c in "abcdefghij"], True),          # 10 labels, names with spaces
    ([f"L{j:03d}" for j in range(300)], False),            # 300
])
def test_train_predict_tune_submit_on_user_data(tmp_path, tiny_model, label_names, explicit, capsys):
    from core.cli import setup_logging
    from core.tuning import run_tune
    from infer.predict import predict
    from infer.submit import submit
    from train.run import main as run_main

    setup_logging()  # the run's messages on stdout, as the command line has them
    train_csv = user_csv(tmp_path / "train.csv", label_names, 48, seed=1)
    test_csv = user_csv(tmp_path / "test.csv", label_names, 12, seed=2, labelled=False)
    data = {"train_csv": str(train_csv), "id_column": "review_id", "text_template": "{title}\n\n{body}",
            "max_length": 32}
    if explicit:
        data["label_columns"] = label_names
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": str(tiny_model)}, "data": data,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"num_epochs": 1, "max_steps": 2, "micro_batch_size": 8, "eval_batch_size": 16,
                  "save_every_steps": 0},
        "cv": {"n_folds": 2}, "output_dir": str(tmp_path / "run"),
    })
    summary = run_main(cfg)
    out = capsys.readouterr().out
    if not explicit:
        assert f"label columns detected (only 0/1 values; set data.label_columns to choose): {label_names}" in out
    run = tmp_path / "run"
    assert summary["label_names"] == label_names and summary["rows"] == 48
    assert json.loads((run / "fold_0" / "last" / "label_names.json").read_text())["label_names"] == label_names

    probs = tmp_path / "probs.csv"
    predict([str(run)], test_csv, probs, progress=False)
    ids, p, names = read_probs(probs)
    assert names == label_names and p.shape == (12, len(label_names))
    assert list(ids) == list(pd.read_csv(test_csv)["review_id"])

    spec = run_tune(run / "oof.csv", train_csv, tmp_path / "thresholds.json", n_trials=5, progress=False)
    assert spec.fallback == "argmax" and list(spec.label_names) == label_names
    sub = submit(probs, tmp_path / "submission.csv", thresholds=tmp_path / "thresholds.json", ids=test_csv)
    assert list(sub["review_id"]) == list(ids)  # the run's id column, not the DLS "index"
    targets = [t.split() for t in sub["target"]]
    assert all(len(t) >= 1 for t in targets)  # argmax fallback: every row gets a label
    assert {int(c) for t in targets for c in t} <= set(range(len(label_names)))


def test_a_fallback_that_is_not_a_label_is_refused_before_training(tmp_path, tiny_model):
    from core.errors import ConfigError
    from train.run import main as run_main

    train_csv = user_csv(tmp_path / "train.csv", ["a", "b"], 20, seed=3)
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": str(tiny_model)}, "decode": {"fallback": "trend_id_res19"},
        "data": {"train_csv": str(train_csv), "id_column": "review_id", "text_template": "{body}"},
        "output_dir": str(tmp_path / "run"),
    })
    with pytest.raises(ConfigError, match=r"decode.fallback: fallback 'trend_id_res19' is neither a label \(a, b\)"):
        run_main(cfg)
    assert not (tmp_path / "run").exists()


def test_the_pipeline_on_user_data(tmp_path, tiny_model, capsys):
    """``python -m train pipeline`` on a user's CSV (``review_id``, ``title`` / ``body``, 3 named labels) and the
    toolkit's defaults: DAPT on the test text, two seeds of a 2-fold CV and a variant with the fields in another
    order (``cv.variants``), TF-IDF, their blend, set decoding tuned,
    predictions and the submission under the user's id column; then a second invocation that skips every step.
    (No trim-vocab: the tiny model's word vocabulary, built from the sample data, knows none of these words.)"""
    import yaml

    from train.__main__ import main

    labels = ["price", "delivery", "app"]
    train_csv = user_csv(tmp_path / "reviews.csv", labels, 48, seed=1)
    test_csv = user_csv(tmp_path / "new_reviews.csv", labels, 12, seed=2, labelled=False)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "overrides": [f"model.name_or_path={tiny_model}", "data.id_column=review_id",
                      'data.text_template="{title}\\n\\n{body}"', f"data.label_columns={json.dumps(labels)}",
                      "data.max_length=32", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj, v_proj]",
                      "train.num_epochs=1", "train.max_steps=2", "train.micro_batch_size=8",
                      "train.eval_batch_size=16", "train.save_every_steps=0", "cv.n_folds=2"],
        "train_csv": str(train_csv), "dapt": {"enabled": True}, "cv": {"seeds": [42, 7], "variants": {"body_first": [
            'data.text_template="{body}\\n\\n{title}"']}},
        "tfidf": {"enabled": True}, "blend": {"n_trials": 5}, "tune": {"strategy": "sets", "n_trials": 5}}))
    out = tmp_path / "run"
    argv = ["pipeline", "--config", str(config), "--test", str(test_csv), "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out.rsplit("\nstep ", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["dapt", "cv", "cv-seed7", "cv-body_first", "predict", "predict",
                                                 "predict", "tfidf", "blend", "tune", "submit"]
    assert all(" ran " in line for line in table), table
    summary = json.loads((out / "cv-seed7" / "summary.json").read_text())
    assert summary["label_names"] == labels and summary["config"]["train"]["seed"] == 7
    assert summary["config"]["cv"]["seed"] == 42 and summary["config"]["lora"]["init_adapter"] == str(out / "dapt")
    assert (out / "cv" / "folds.csv").read_text() == (out / "cv-seed7" / "folds.csv").read_text()  # paired seeds
    variant = json.loads((out / "cv-body_first" / "summary.json").read_text())["config"]
    assert variant["data"]["text_template"] == "{body}\n\n{title}" and variant["train"]["seed"] == 42
    assert (out / "cv" / "folds.csv").read_text() == (out / "cv-body_first" / "folds.csv").read_text()
    assert json.loads((out / "dapt" / "dapt_info.json").read_text())["corpus"][0]["path"] == str(test_csv)
    meta = json.loads((out / "blend.csv.meta.json").read_text())
    assert meta["inputs"] == [str(out / "probs" / f"{m}.csv") for m in ("cv", "cv-seed7", "cv-body_first")] + [
        str(out / "tfidf" / "test_probs.csv")]
    assert json.loads((out / "thresholds.json").read_text())["strategy"] == "sets"
    sub = pd.read_csv(out / "submission.csv")
    # The user's rows in their order, under their own id column (the blend keeps its inputs' id column).
    assert list(sub["review_id"]) == list(pd.read_csv(test_csv)["review_id"])
    assert pd.read_csv(out / "tfidf" / "oof.csv", nrows=0).columns[0] == "review_id"
    assert {int(c) for t in sub["target"] for c in str(t).split()} <= {0, 1, 2}

    assert main(argv) == 0
    again = capsys.readouterr().out.rsplit("\nstep ", 1)[1].splitlines()[1:]
    assert all(" skipped " in line for line in again), again


DLS_STRINGS = ("trend_id_res", "assesment", "{assessment}", "{tags}")


def dls_constants(path: Path) -> list[str]:
    """Places in a module that name the DLS data: its label prefix, prompt fields, class 19 or 50 labels."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{path.name}:{node.lineno} {s!r}" for s in DLS_STRINGS if s in node.value]
        elif isinstance(node, ast.Constant) and type(node.value) is int and node.value == 19:
            found.append(f"{path.name}:{node.lineno} 19")
        elif isinstance(node, ast.keyword) and node.arg in ("num_labels", "fallback") \
                and isinstance(node.value, ast.Constant) and node.value.value in (19, 50):
            found.append(f"{path.name}:{node.lineno} {node.arg}={node.value.value}")
    return found


@pytest.mark.parametrize("package", ["core", "train", "infer"])
def test_no_module_knows_the_dls_data(package):
    hits = [h for f in sorted((ROOT / package).rglob("*.py")) for h in dls_constants(f)]
    assert not hits, "DLS constants in the code (they belong in configs/): " + "; ".join(hits)


def test_the_dls_grep_finds_what_it_looks_for(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('PREFIX = "trend_id_res"\nFALLBACK = 19\nx = load(num_labels=50)\nok = 20\n')
    assert len(dls_constants(f)) == 3
