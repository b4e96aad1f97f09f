"""decode.strategy: sets at train time: the per-epoch metrics gain sets/* (priors from the fold's training rows),
keep: best follows the configured strategy, and the new key leaves older runs' checkpoint fingerprints alone."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import RunConfig
from core.errors import ConfigError
from core.sets import SetDecoder
from core.thresholds import ThresholdSpec
from train.evaluation import evaluate, fold_decoding, selection_key
from train.run_dir import run_fingerprint


def test_config_strategy_and_fingerprint_compatibility():
    assert RunConfig.from_dict({}).decode.strategy == "cascade"
    cfg = RunConfig.from_dict({"decode": {"strategy": "sets"}})
    assert cfg.decode.strategy == "sets" and selection_key(cfg) == "sets/exact_match"
    with pytest.raises(ConfigError, match="decode.strategy"):
        RunConfig.from_dict({"decode": {"strategy": "magic"}})
    # The default strategy (LoRA+ off, cv.seed unset) is not in the fingerprint (older checkpoints still resume) ...
    from train import checkpoint

    default = RunConfig.from_dict({})
    flat = {k: v for k, v in checkpoint.flat(default.to_dict()).items()
            if k not in ("decode.strategy", "train.lora_plus_ratio", "cv.seed", "model.head_init", "model.pooling",
                         "data.train_labels_csv")}
    assert run_fingerprint(default) == checkpoint.fingerprint(
        {k: v for k, v in flat.items() if not any(k == f or (f.endswith(".") and k.startswith(f))
                                                    for f in checkpoint.RESUME_FREE)})
    # ... but changing it changes what a run computes (keep: best), so it is.
    assert run_fingerprint(cfg) != run_fingerprint(default)
    assert run_fingerprint(RunConfig.from_dict({"train": {"lora_plus_ratio": 16}})) != run_fingerprint(default)
    assert run_fingerprint(RunConfig.from_dict({"cv": {"seed": 7}})) != run_fingerprint(default)
    assert run_fingerprint(RunConfig.from_dict({"model": {"pooling": "mean"}})) != run_fingerprint(default)


def test_fold_decoding_uses_the_training_rows_only_and_evaluate_reports_sets():
    rng = np.random.default_rng(0)
    labels = np.zeros((100, 6), dtype=np.int8)
    labels[:50, 0] = 1
    labels[50:, [1, 2]] = 1
    labels[95:] = 0
    labels[95:, 5] = 1  # {5} only in the validation rows
    names = tuple(f"l{j}" for j in range(6))
    cascade = ThresholdSpec(names)
    train_idx, val_idx = np.arange(90), np.arange(90, 100)
    cfg = RunConfig.from_dict({"decode": {"strategy": "sets"}})
    dec = fold_decoding(cfg, cascade, labels, train_idx)
    assert isinstance(dec, SetDecoder) and dec.sets == SetDecoder.fit(labels[train_idx]).sets
    assert (5,) not in dec.sets and dec.cascade == cascade
    assert fold_decoding(RunConfig.from_dict({}), cascade, labels, train_idx) is cascade
    probs = np.clip(labels[val_idx] * 0.5 + rng.random((10, 6)) * 0.4, 0, 1)
    m = evaluate(probs, labels[val_idx], dec)
    assert {"t0.5/exact_match", "cascade/exact_match", "sets/exact_match"} <= set(m)
    assert m["cascade/exact_match"] == evaluate(probs, labels[val_idx], cascade)["cascade/exact_match"]
    assert "sets/exact_match" not in evaluate(probs, labels[val_idx], cascade)


@pytest.mark.slow
def test_a_tiny_run_with_strategy_sets_reports_sets_per_epoch_and_out_of_fold(tiny_model, small_csv, tmp_path):
    from trainkit import tiny_config_for

    from train.run import main

    cfg = tiny_config_for(tiny_model, small_csv, tmp_path / "run", cv__folds=[0], train__num_epochs=1,
                          train__keep="best", decode__strategy="sets")
    summary = main(cfg)
    assert "sets/exact_match" in summary["oof_metrics"] and "cascade/exact_match" in summary["oof_metrics"]
    assert all("sets/exact_match" in f for f in summary["per_fold"])
    assert "sets/exact_match" in summary["mean_fold_metrics"]


def test_tfidf_with_strategy_sets_scores_each_fold_with_its_own_priors(tmp_path):
    import json

    import pandas as pd
    from conftest import SAMPLE_SET_ARGS
    from trainkit import SAMPLE_TRAIN

    from core.config import RunConfig
    from core.data import read_csv
    from core.io import read_probs
    from core.metrics import exact_match
    from train.__main__ import main

    out = tmp_path / "tfidf"
    assert main(["tfidf", "--set", f"data.train_csv={SAMPLE_TRAIN}", "--set", "cv.n_folds=3", *SAMPLE_SET_ARGS,
                 "--set", "decode.strategy=sets", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all("sets/exact_match" in f for f in summary["per_fold"])
    cfg = RunConfig.from_yaml(None, [f"data.train_csv={SAMPLE_TRAIN}", "cv.n_folds=3", *SAMPLE_SET_ARGS[1::2]])
    ds = read_csv(SAMPLE_TRAIN, cfg.data)
    _, oof, _ = read_probs(out / "oof.csv")
    folds = pd.read_csv(out / "folds.csv")["fold"].to_numpy()
    pred = np.zeros(ds.labels.shape, dtype=np.int8)
    for f in sorted(set(folds.tolist())):
        val = folds == f
        pred[val] = SetDecoder.fit(ds.labels[~val], ds.label_names,
                                   ThresholdSpec.from_decode(ds.label_names, cfg.decode)).decode(oof[val])
    assert summary["oof_metrics"]["sets/exact_match"] == pytest.approx(exact_match(ds.labels, pred))
