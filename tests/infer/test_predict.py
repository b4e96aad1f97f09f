"""infer.predict on a tiny random Gemma 3 (4-bit, local word-level tokenizer): output format, ensembling,
batching, reproduction of the training's out-of-fold probabilities, and error paths that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from core.cli import setup_logging
from core.errors import InputError
from core.io import meta_path, read_probs
from infer.__main__ import main
from infer.predict import load_predictor, predict

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TRAIN = REPO / "data" / "sample_train.csv"
SAMPLE_TEST = REPO / "data" / "sample_test.csv"


# --------------------------------------------------------------------------------------------------------------
# A tiny trained run (two folds, 2 steps each) on the random 2-layer Gemma 3 of tests/conftest.py (`tiny_model`).
# Built by tests/conftest.py (`tiny_run`, `train_tiny_run`), which test_hub.py and others share.
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_csv(tmp_path_factory) -> Path:
    """20 unlabelled rows in an order that is not sorted by length (prediction sorts internally)."""
    path = tmp_path_factory.mktemp("input") / "test.csv"
    df = pd.read_csv(SAMPLE_TEST).head(20)
    df = df.iloc[np.random.default_rng(1).permutation(len(df))]
    df.to_csv(path, index=False)
    return path


def probs_of(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return read_probs(path)


# --------------------------------------------------------------------------------------------------------------


def test_output_ids_order_columns_and_meta(tiny_run, test_csv, tmp_path, capsys):
    setup_logging()
    out = tmp_path / "probs.csv"
    meta = predict([str(tiny_run / "fold_0" / "last")], test_csv, out, progress=False)
    ids, probs, cols = probs_of(out)
    labels = json.loads((tiny_run / "label_names.json").read_text())["label_names"]
    assert list(ids) == list(pd.read_csv(test_csv)["index"])  # input order kept
    assert cols == labels
    assert probs.shape == (20, len(labels)) and ((probs > 0) & (probs < 1)).all()
    assert pd.read_csv(out).columns[0] == "index"
    saved = json.loads(meta_path(out).read_text())
    assert saved["input"] == str(test_csv) and saved["rows"] == 20
    assert saved["adapters"][0]["folder"] == str(tiny_run / "fold_0" / "last") and saved["weights"] == [1.0]
    assert {"torch", "transformers", "peft"} <= set(saved["versions"])
    assert meta["rows_per_s"] > 0
    assert "rows/s" in capsys.readouterr().out


def test_reproduces_training_out_of_fold_probabilities(tiny_run, tmp_path):
    """Loading base + adapter (+ its score head) gives the probabilities the trained model gave on its fold."""
    folds = pd.read_csv(tiny_run / "folds.csv")
    train = pd.read_csv(json.loads((tiny_run / "summary.json").read_text())["config"]["data"]["train_csv"])
    val = train[folds["fold"].to_numpy() == 1]
    val.to_csv(tmp_path / "val.csv", index=False)
    predict([str(tiny_run / "fold_1" / "last")], tmp_path / "val.csv", tmp_path / "p.csv", progress=False)
    _, probs, _ = probs_of(tmp_path / "p.csv")
    np.testing.assert_allclose(probs, np.load(tiny_run / "fold_1" / "val_probs_last.npy"), atol=2e-6)


def test_mean_pooling_reaches_every_load_of_the_run(tiny_model, small_csv, tmp_path):
    """A run trained with model.pooling=mean (head from the descriptions, pooled the same way): predict reproduces its
    out-of-fold probabilities, so predict pools as training did; the export refuses it (plain transformers pools the
    last token) before loading anything."""
    from conftest import train_tiny_run

    from infer.export import export

    run = train_tiny_run(tmp_path, tiny_model, small_csv, folds=(1,), pooling="mean", head_init="descriptions")
    assert yaml.safe_load((run / "run_config.yaml").read_text())["model"]["pooling"] == "mean"
    folds = pd.read_csv(run / "folds.csv")
    pd.read_csv(small_csv)[folds["fold"].to_numpy() == 1].to_csv(tmp_path / "val.csv", index=False)
    predict([str(run / "fold_1" / "last")], tmp_path / "val.csv", tmp_path / "p.csv", progress=False)
    oof = np.load(run / "fold_1" / "val_probs_last.npy")
    np.testing.assert_allclose(probs_of(tmp_path / "p.csv")[1], oof, atol=2e-6)
    # the same adapter pooled the last token gives other probabilities: its setting is what made them equal
    own = run / "fold_1" / "last" / "run_config.yaml"
    cfg = yaml.safe_load(own.read_text())
    cfg["model"]["pooling"] = "last"
    own.write_text(yaml.safe_dump(cfg))
    predict([str(run / "fold_1" / "last")], tmp_path / "val.csv", tmp_path / "q.csv", progress=False)
    assert np.abs(probs_of(tmp_path / "q.csv")[1] - oof).max() > 1e-3
    cfg["model"]["pooling"] = "mean"
    own.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match="model.pooling=mean"):
        export(str(run / "fold_1" / "last"), tmp_path / "export", dtype="fp32")
    assert not (tmp_path / "export").exists()


def test_a_16bit_run_loads_16bit_everywhere(tiny_model, small_csv, tmp_path):
    """A run trained on the unquantized base (quantization.load_in_4bit=false): predict loads no 4-bit layer and
    reproduces its out-of-fold probabilities; read as a 4-bit run the same adapter gives other probabilities, so the
    run's setting is what made them equal."""
    import bitsandbytes as bnb
    from conftest import train_tiny_run

    from infer.predict import load_predictor

    run = train_tiny_run(tmp_path, tiny_model, small_csv, folds=(1,), quantization={"load_in_4bit": False})
    adapter = run / "fold_1" / "last"
    assert yaml.safe_load((adapter / "run_config.yaml").read_text())["quantization"]["load_in_4bit"] is False
    predictor = load_predictor(str(adapter))
    assert not [m for m in predictor.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    folds = pd.read_csv(run / "folds.csv")
    pd.read_csv(small_csv)[folds["fold"].to_numpy() == 1].to_csv(tmp_path / "val.csv", index=False)
    predict([str(adapter)], tmp_path / "val.csv", tmp_path / "p.csv", progress=False)
    oof = np.load(run / "fold_1" / "val_probs_last.npy")
    np.testing.assert_allclose(probs_of(tmp_path / "p.csv")[1], oof, atol=2e-6)
    own = adapter / "run_config.yaml"
    cfg = yaml.safe_load(own.read_text())
    cfg["quantization"]["load_in_4bit"] = True
    own.write_text(yaml.safe_dump(cfg))
    predict([str(adapter)], tmp_path / "val.csv", tmp_path / "q.csv", progress=False)
    assert np.abs(probs_of(tmp_path / "q.csv")[1] - oof).max() > 1e-3


def test_run_folder_and_weights_average_the_adapters(tiny_run, test_csv, tmp_path):
    f0, f1 = str(tiny_run / "fold_0" / "last"), str(tiny_run / "fold_1" / "last")
    predict([f0], test_csv, tmp_path / "p0.csv", progress=False)
    predict([f1], test_csv, tmp_path / "p1.csv", progress=False)
    p0, p1 = probs_of(tmp_path / "p0.csv")[1], probs_of(tmp_path / "p1.csv")[1]
    assert np.abs(p0 - p1).max() > 1e-3  # the folds really differ, so averaging is tested

    predict([str(tiny_run)], test_csv, tmp_path / "run.csv", progress=False)  # run folder = all its folds
    np.testing.assert_allclose(probs_of(tmp_path / "run.csv")[1], (p0 + p1) / 2, atol=2e-6)

    meta = predict(f"{f0},{f1}", test_csv, tmp_path / "w.csv", weights="1,3", progress=False)
    np.testing.assert_allclose(probs_of(tmp_path / "w.csv")[1], 0.25 * p0 + 0.75 * p1, atol=2e-6)
    assert meta["weights"] == [0.25, 0.75]


def test_batched_equals_one_at_a_time(tiny_run, test_csv):
    import torch

    from core.data import read_csv

    p = load_predictor(str(tiny_run / "fold_0" / "last"))
    texts = read_csv(test_csv, p.data, labelled=False).texts
    ids = p.token_ids(texts)
    assert len({len(t) for t in ids}) > 3  # various lengths: padding is exercised
    batched = p.predict_token_ids(ids, batch_size=8)
    single = np.concatenate([p.predict_token_ids([t], batch_size=1) for t in ids])
    # fp32 (CPU): equal to float noise. bf16/fp16 autocast (GPU): different batch shapes round differently.
    np.testing.assert_allclose(batched, single, atol=1e-5 if p.dtype == torch.float32 else 2e-2)
    np.testing.assert_allclose(p.predict_texts(texts, batch_size=64), batched, atol=1e-6)
    csv_ids, csv_probs = p.predict_csv(test_csv)
    assert list(csv_ids) == list(pd.read_csv(test_csv)["index"])
    np.testing.assert_allclose(csv_probs, batched, atol=1e-6)
    p.close()


# --------------------------------------------------------------------------------------------------------------
# Errors: one clear line naming the file/key, nothing written
# --------------------------------------------------------------------------------------------------------------


def _copy_adapter(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run / "fold_0" / "last", dest)
    return dest


def _expect_error(adapters, input_csv, out: Path, match: str, **kw):
    with pytest.raises(InputError, match=match) as e:
        predict(adapters, input_csv, out, progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and not meta_path(out).exists()
    assert not any(out.parent.glob(".*.tmp"))


def test_error_missing_and_incomplete_adapter(tiny_run, test_csv, tmp_path):
    out = tmp_path / "p.csv"
    _expect_error([str(tmp_path / "nope")], test_csv, out, "adapter folder not found")
    bad = _copy_adapter(tiny_run, tmp_path / "incomplete")
    (bad / "adapter_model.safetensors").unlink()
    _expect_error([str(bad)], test_csv, out, r"incomplete adapter folder, missing adapter_model\.safetensors")
    bad2 = _copy_adapter(tiny_run, tmp_path / "noconfig")
    (bad2 / "run_config.yaml").unlink()
    _expect_error([str(bad2)], test_csv, out, "missing run_config.yaml")
    (tmp_path / "emptyrun").mkdir()
    (tmp_path / "emptyrun" / "run_config.yaml").write_text((tiny_run / "run_config.yaml").read_text())
    _expect_error([str(tmp_path / "emptyrun")], test_csv, out, "without any finished fold adapter")


def test_error_label_names_disagree(tiny_run, test_csv, tmp_path):
    other = _copy_adapter(tiny_run, tmp_path / "other")
    labels = json.loads((other / "label_names.json").read_text())
    labels["label_names"][3] = "renamed"
    (other / "label_names.json").write_text(json.dumps(labels))
    _expect_error([str(tiny_run / "fold_0" / "last"), str(other)], test_csv, tmp_path / "p.csv",
                  r"other/label_names\.json: label names differ .* position 3")


def test_error_head_size_differs_from_label_names(tiny_run, test_csv, tmp_path):
    bad = _copy_adapter(tiny_run, tmp_path / "bad")
    labels = json.loads((bad / "label_names.json").read_text())
    labels["label_names"] = labels["label_names"][:-1]
    (bad / "label_names.json").write_text(json.dumps(labels))
    _expect_error([str(bad)], test_csv, tmp_path / "p.csv", r"score head has 20 labels but .*lists 19")


def test_error_labels_like(tiny_run, test_csv, tmp_path):
    df = pd.read_csv(SAMPLE_TRAIN).head(5)
    df.drop(columns=["trend_id_res19"]).to_csv(tmp_path / "fewer.csv", index=False)
    _expect_error([str(tiny_run)], test_csv, tmp_path / "p.csv", r"head has 20 labels but .*fewer\.csv has 19",
                  labels_like=tmp_path / "fewer.csv")
    df.to_csv(tmp_path / "same.csv", index=False)  # matching labels: accepted (checked without a model)
    from infer.predict import collect

    assert len(collect([str(tiny_run)], labels_like=tmp_path / "same.csv")) == 2


def test_error_input_missing_template_column(tiny_run, tmp_path):
    pd.read_csv(SAMPLE_TEST).head(5).drop(columns=["tags"]).to_csv(tmp_path / "in.csv", index=False)
    _expect_error([str(tiny_run)], tmp_path / "in.csv", tmp_path / "p.csv", r"in\.csv: missing column\(s\) \['tags'\]")
    _expect_error([str(tiny_run)], tmp_path / "absent.csv", tmp_path / "p.csv", r"absent\.csv: file not found")


def test_error_bad_weights(tiny_run, test_csv, tmp_path):
    _expect_error([str(tiny_run)], test_csv, tmp_path / "p.csv", "2 values for 1 adapters", weights="0.5,0.5")
    _expect_error([str(tiny_run), str(tiny_run)], test_csv, tmp_path / "p.csv", "non-negative", weights="1,-1")


def test_cli_register(tiny_run, test_csv, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    assert main(["predict", "--adapter", f"{tiny_run}/fold_0/last,{tiny_run}/fold_1/last",
                 "--input", str(test_csv), "--out", str(out), "--batch-size", "4", "--no-progress"]) == 0
    assert out.is_file()
    assert main(["predict", "--adapter", str(tmp_path / "missing"), "--input", str(test_csv),
                 "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter folder not found") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_error_adapter_tokenizer_differs_from_base(tiny_run, test_csv, tmp_path):
    """An adapter trained on another vocabulary (e.g. a trimmed base) must not run on this base with wrong ids."""
    from transformers import AutoTokenizer

    bad = _copy_adapter(tiny_run, tmp_path / "othervocab")
    tok = AutoTokenizer.from_pretrained(bad)
    tok.add_tokens(["zzzunseen"])
    tok.save_pretrained(bad)
    _expect_error([str(bad)], test_csv, tmp_path / "p.csv", r"othervocab: the adapter's tokenizer has \d+ tokens but")
