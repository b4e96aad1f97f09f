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


def test_outer_benchmark_pairs_every_model_with_each_versus(tmp_path, tiny_run, small_csv, capsys):
    """``python -m benchmarks.outer``: the run's fold average and another adapter scored on outer rows, one paired
    table per ``--versus``; an unknown ``--versus`` stops before any model predicts."""
    from benchmarks.outer import main as outer_main

    outer = tmp_path / "outer"
    outer.mkdir()
    pd.read_csv(small_csv).to_csv(outer / "inner.csv", index=False)  # the rows tiny_run's CV saw
    pd.read_csv(SAMPLE_TRAIN).iloc[60:90].to_csv(outer / "outer.csv", index=False)
    out, table = tmp_path / "eval", tmp_path / "table.json"
    base = ["--outer", str(outer), "--run", str(tiny_run), "--model", f"f0={tiny_run / 'fold_0' / 'last'}",
            "--out-dir", str(out)]
    with pytest.raises(SystemExit, match="'f1': not a model"):
        outer_main([*base, "--versus", "f1"])
    with pytest.raises(SystemExit, match="two models named 'f0'"):
        outer_main([*base, "--model", f"f0={tiny_run / 'fold_1' / 'last'}"])
    assert not out.exists() or not any(out.glob("*.csv"))
    assert outer_main([*base, "--versus", "fold average", "--versus", "f0", "--json", str(table)]) == 0
    assert capsys.readouterr().out.count("outer rows of") == 2
    rows = {r["model"]: r for r in json.loads(table.read_text())}
    assert set(rows) == {"fold average", "f0"} and rows["fold average"]["adapters"] == 2
    for name, row in rows.items():
        assert set(row["vs"]) == {"fold average", "f0"} and row["rows"] == 30
        for dec in ("cascade", "tuned"):
            assert row["vs"][name][dec]["difference"] == 0
            assert row[f"em_{dec}"] == row["vs"]["f0"][dec]["exact_match_b"]
    for dec in ("cascade", "tuned"):  # the same pair either way round: the difference changes sign
        assert rows["f0"]["vs"]["fold average"][dec]["difference"] == \
            pytest.approx(-rows["fold average"]["vs"]["f0"][dec]["difference"])
