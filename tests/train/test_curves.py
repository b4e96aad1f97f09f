"""``RUN/curves.png``: written when a run finishes, whole after a resume (the per-step log travels in the checkpoint),
re-drawn when a resumed run adds folds, and drawn from an older run's ``metrics.json`` (no per-step log) too."""

from __future__ import annotations

import json

import numpy as np
import pytest
from trainkit import Killed, kill_at, tiny_config_for

from train.curves import CURVES_FILE, run_curves, smooth, write_run_curves
from train.run import FoldResult, main

PNG = b"\x89PNG\r\n\x1a\n"



def image_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def whole(tiny_model, small_csv, tmp_path_factory):
    """Fold 0 of 3, uninterrupted: 2 epochs of 5 optimizer steps."""
    out = tmp_path_factory.mktemp("whole") / "run"
    main(tiny_config_for(tiny_model, small_csv, out))
    return out


def test_a_run_draws_its_curves(whole):
    assert (whole / CURVES_FILE).read_bytes()[:8] == PNG and image_size(whole / CURVES_FILE) == (1500, 440)
    curves = run_curves(whole)
    assert list(curves) == ["fold 0"]
    log, history = curves["fold 0"]["log_history"], curves["fold 0"]["history"]
    assert [r["step"] for r in log] == list(range(1, 11)) and [h["epoch"] for h in history] == [1, 2]
    assert all(set(r) == {"step", "loss", "learning_rate", "grad_norm", "rows_per_s"} for r in log)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["rows_per_s"] > 0 for r in log)
    assert log[0]["learning_rate"] > log[-1]["learning_rate"]  # the cosine schedule, warm-up 0


def test_a_resumed_run_draws_every_step_and_redraws_when_folds_are_added(tiny_model, small_csv, tmp_path, whole):
    out = tmp_path / "run"
    cfg = tiny_config_for(tiny_model, small_csv, out, train__save_every_steps=2)
    with pytest.raises(Killed):
        main(cfg, callbacks=kill_at(6))  # mid epoch 2, after epoch 1's evaluation
    assert not (out / CURVES_FILE).exists()  # drawn when the run finishes
    main(cfg, resume=True)
    log = run_curves(out)["fold 0"]["log_history"]
    assert [r["step"] for r in log] == list(range(1, 11))  # steps 1-6 from the checkpoint, 7-10 from this call
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in run_curves(whole)["fold 0"]["log_history"]],
                                                     abs=1e-5)
    first = (out / CURVES_FILE).read_bytes()
    assert first[:8] == PNG

    more = tiny_config_for(tiny_model, small_csv, out, train__save_every_steps=2, cv__folds=[0, 1])
    main(more, resume=True)  # fold 0 is read back, fold 1 trains: the picture has both
    curves = run_curves(out)
    assert list(curves) == ["fold 0", "fold 1"] and len(curves["fold 1"]["log_history"]) == 10
    assert (out / CURVES_FILE).read_bytes() != first


def test_curves_of_an_older_run_without_the_step_log(tmp_path):
    """metrics.json written before log_history existed: it still loads, and its epochs are drawn."""
    run = tmp_path / "old"
    for k in (0, 1, 10):
        (run / f"fold_{k}").mkdir(parents=True)
        history = [{"epoch": e, "step": 5 * e, "cascade/exact_match": 0.3 + 0.1 * e + 0.01 * k,
                    "cascade/micro_f1": 0.4 + 0.1 * e} for e in (1, 2)]
        (run / f"fold_{k}" / "metrics.json").write_text(json.dumps(
            {"fold": k, "history": history, "best": None, "steps": 10, "samples": 80, "real_tokens": 1,
             "padded_tokens": 1, "train_seconds": 1.0}))
        np.save(run / f"fold_{k}" / "val_probs_last.npy", np.zeros((2, 3)))
    r = FoldResult.load(run / "fold_1", np.arange(2), "last")
    assert r.log_history == [] and r.steps == 10
    assert list(run_curves(run)) == ["fold 0", "fold 1", "fold 10"]  # in fold order, not string order
    assert write_run_curves(run) == run / CURVES_FILE and (run / CURVES_FILE).read_bytes()[:8] == PNG
    assert write_run_curves(tmp_path / "empty") is None and not (tmp_path / "empty").exists()


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 3, 5, 7], 2).tolist() == [1, 2, 4, 6]
    assert smooth([2.0], 5).tolist() == [2.0]


def test_dapt_draws_its_loss_without_a_tracker(tiny_model, tmp_path):
    from trainkit import ROOT

    from train import dapt

    out = tmp_path / "dapt"
    cfg = tiny_config_for(tiny_model, ROOT / "data" / "sample_train.csv", out, train__num_epochs=1,
                          train__max_steps=3)
    info = dapt.main(cfg, [str(ROOT / "data" / "sample_test.csv")], out)
    assert len(info["loss_history"]) == 3 and (out / CURVES_FILE).read_bytes()[:8] == PNG
    assert not (out / "logs").exists()
