"""``python -m infer evaluate``'s reliability (calibration) diagram: the bins, the expected calibration error and the
Brier score over every (row, label) pair, and the PNG beside the other plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_infer_cli import NAMES, make_data, write_labels

from core.io import write_probs
from infer.__main__ import main
from infer.evaluate import calibration


def test_calibration_of_known_probabilities():
    # Every pair at 0.8, half of them positive: one bin, 0.3 off the diagonal.
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    c = calibration(np.full(y.shape, 0.8), y)
    assert c["mean_probability"] == pytest.approx([0.8]) and c["fraction_positive"] == pytest.approx([0.5])
    assert c["pairs"] == [8] and c["ece"] == pytest.approx(0.3)
    assert c["brier"] == pytest.approx(0.5 * 0.2 ** 2 + 0.5 * 0.8 ** 2)


def test_calibration_weights_the_bins_by_their_pairs():
    rng = np.random.default_rng(0)
    p = rng.random((4000, 5))
    calibrated = calibration(p, (rng.random(p.shape) < p).astype(int))  # positives drawn at the stated rate
    assert calibrated["ece"] < 0.02 and sum(calibrated["pairs"]) == p.size and len(calibrated["pairs"]) == 10
    overconfident = calibration(p, (rng.random(p.shape) < 0.5).astype(int))  # the probabilities say nothing
    assert overconfident["ece"] == pytest.approx(0.25, abs=0.02)
    from sklearn.calibration import calibration_curve

    y = (rng.random((40, 1)) < 0.3).astype(int)
    frac, mean = calibration_curve(y.ravel(), np.linspace(0, 1, 40), n_bins=10)
    c = calibration(np.linspace(0, 1, 40)[:, None], y)
    assert c["mean_probability"] == pytest.approx(mean.tolist()) and c["fraction_positive"] == pytest.approx(frac)
    assert c["pairs"] == [4] * 10


def test_evaluate_writes_the_reliability_diagram(tmp_path, capsys):
    ids, y, p = make_data()
    labels = write_labels(tmp_path / "train.csv", ids, y)
    oof = tmp_path / "oof.csv"
    write_probs(oof, ids, p, NAMES)
    out = tmp_path / "eval"
    assert main(["evaluate", "--probs", str(oof), "--labels", str(labels), "--out-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    png = out / "oof.reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "oof.eval.json").read_text())
    assert m["files"]["reliability_png"] == str(png)
    expected = calibration(p, y)
    assert m["calibration"].keys() == expected.keys()
    for key, value in expected.items():
        assert m["calibration"][key] == pytest.approx(value), key
    assert f"ECE {m['calibration']['ece']:.4f}" in stdout and f"{p.size} (row, label) pairs" in stdout
