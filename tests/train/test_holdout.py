"""``python -m train holdout``: a deterministic multilabel-stratified outer split, copied verbatim."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from trainkit import ROOT, SAMPLE_TRAIN

from core.errors import InputError
from train.__main__ import main
from train.data import holdout_split

CONFIG = ROOT / "configs/gemma-3-270m/qlora.yaml"


def test_holdout_split_is_deterministic_stratified_and_sized():
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 6)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.02]).astype(np.int8)
    held = holdout_split(labels, 0.2, seed=7)
    assert held.dtype == bool and abs(held.sum() - 100) <= 3
    assert np.array_equal(held, holdout_split(labels, 0.2, seed=7))
    assert not np.array_equal(held, holdout_split(labels, 0.2, seed=8))
    # stratified: each label's share among the held-out rows is close to its share overall
    assert np.abs(labels[held].mean(0) - labels.mean(0)).max() < 0.02


def test_holdout_split_binary_and_bad_fractions():
    labels = (np.arange(40) % 4 == 0).astype(np.int8)[:, None]
    held = holdout_split(labels, 0.25, seed=0)
    assert held.sum() == 10 and labels[held].sum() in (2, 3)  # 10 positives of 40: 2.5 expected
    for frac in (0, 1, 1.5, 0.001):
        with pytest.raises(InputError):
            holdout_split(labels, frac, seed=0)


def test_holdout_command_writes_inner_and_outer_verbatim(tmp_path):
    out = tmp_path / "outer"
    assert main(["holdout", "--config", str(CONFIG), "--labels", str(SAMPLE_TRAIN), "--frac", "0.25",
                 "--out", str(out)]) == 0
    read = lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)
    src, inner, outer = read(SAMPLE_TRAIN), read(out / "inner.csv"), read(out / "outer.csv")
    assert list(inner.columns) == list(src.columns) == list(outer.columns)
    # iterative stratification sizes the split approximately (DLS: 729 of 3,700 at 0.2)
    assert len(inner) + len(outer) == len(src) and abs(len(outer) - 0.25 * len(src)) <= 0.03 * len(src)
    assert not set(inner["index"]) & set(outer["index"])
    both = pd.concat([inner, outer]).set_index("index").loc[src["index"]].reset_index()[src.columns]
    assert (both.to_numpy() == src.to_numpy()).all()  # every value as it was, nothing rewritten
    meta = json.loads((out / "holdout.json").read_text())
    assert meta["outer_rows"] == len(outer) and meta["seed"] == 42 and meta["frac"] == 0.25
    # an existing output folder is refused before anything is written
    assert main(["holdout", "--config", str(CONFIG), "--labels", str(SAMPLE_TRAIN), "--out", str(out)]) == 2
