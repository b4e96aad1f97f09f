"""cv.final: the final model on every labelled row (RUN/final/last) with thresholds tuned on the out-of-fold rows,
taken by infer predict / submit / serve / export / push; resumed like a fold when killed; added to a finished run on
--resume (only the final model trains); the old distill.final key refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import SAMPLE_TEST
from safetensors.torch import load_file
from trainkit import as_set_args, kill_at_launcher, run_cli, tiny_overrides

import train.__main__ as cli
from core.config import RunConfig
from core.decoding import read_thresholds
from core.errors import ConfigError


def test_cv_final_config(capsys):
    with pytest.raises(ConfigError, match=r"distill.final moved to cv.final"):
        RunConfig.from_dict({"distill": {"teachers": ["t"], "final": True}})
    # A run_config.yaml saved before the move holds distill.final: false; it still loads.
    assert RunConfig.from_dict({"distill": {"final": False}}).cv.final is False
    with pytest.raises(ConfigError, match="cv.final needs train.keep=last"):
        RunConfig.from_dict({"cv": {"final": True}, "train": {"keep": "best"}})
    # --final sets cv.final on the cv and the distill commands.
    for argv in (["--final", "--print-config"], ["distill", "--teacher", "t", "--final", "--print-config"]):
        assert cli.main(argv) == 0
        assert yaml.safe_load(capsys.readouterr().out)["cv"]["final"] is True


@pytest.fixture(scope="module")
def final_run(tiny_model, small_csv, tmp_path_factory):
    """Fold 0 of 3 and the final model (2 epochs, micro-batch 8), thresholds tuned by python -m infer tune."""
    out = tmp_path_factory.mktemp("final") / "run"
    assert cli.main(["--final", *as_set_args(tiny_overrides(tiny_model, small_csv, out))]) == 0
    return out


def test_final_model_trains_on_every_row_and_is_an_adapter(final_run, small_csv):
    from core.adapter import read_adapter

    final = final_run / "final"
    ref = read_adapter(final / "last")
    assert ref.info["final"] is True and ref.info["rows"] == 60 and ref.info["epoch"] == 2
    metrics = json.loads((final / "metrics.json").read_text())
    fold0 = json.loads((final_run / "fold_0" / "metrics.json").read_text())
    # The folds' epochs: 2 x 60 rows (8 steps of 8 an epoch) against fold 0's 2 x 39 (5 steps).
    assert (metrics["samples"], metrics["steps"]) == (120, 16) and (fold0["samples"], fold0["steps"]) == (78, 10)
    summary = json.loads((final_run / "summary.json").read_text())
    assert summary["final"]["adapter"] == str(final / "last") and summary["final"]["rows_labelled"] == 60
    assert summary["final"]["thresholds"] == str(final / "last" / "thresholds.json")
    assert len(pd.read_csv(final_run / "oof.csv")) == 21   # fold 0's rows: the final model is not out of fold
    spec = read_thresholds(final / "last" / "thresholds.json")
    assert spec.label_names == tuple(ref.label_names)
    meta = spec.meta
    assert meta["produced_by"] == "python -m infer tune" and meta["oof"] == str(final_run / "oof.csv")
    assert meta["labels"] == str(small_csv) and meta["nested"] is not None
    assert meta["adapter_thresholds"]["for"] == str(final / "last")
    assert "out-of-fold probabilities of folds [0]" in meta["adapter_thresholds"]["tuned_on"]


def test_predict_submit_serve_export_push_take_the_final_model(final_run, tmp_path, capsys):
    from infer.export import TOLERANCE, export
    from infer.hub import upload_plan
    from infer.predict import predict
    from infer.submit import submit

    adapter = final_run / "final" / "last"
    probs = tmp_path / "probs.csv"
    predict([str(adapter)], SAMPLE_TEST, probs, progress=False)
    capsys.readouterr()
    # submit decodes with the adapter's own thresholds.json unless --thresholds names another
    auto = submit(probs, tmp_path / "auto.csv")
    assert f"decoding with {adapter / 'thresholds.json'}" in capsys.readouterr().out
    explicit = submit(probs, tmp_path / "explicit.csv", thresholds=adapter / "thresholds.json")
    pd.testing.assert_frame_equal(auto, explicit)

    pytest.importorskip("fastapi")
    from infer.serve.app import create_app
    from infer.serve.settings import Settings

    app = create_app(lambda refs: None, Settings(adapters=[str(adapter)]))
    assert app.state.spec.meta["adapter_thresholds"]["for"] == str(adapter)

    info = export(str(adapter), tmp_path / "exported", dtype="fp32", compare_4bit=False, probe_rows=4)
    assert info["max_abs_prob_diff"]["reloaded_vs_adapter"] <= TOLERANCE["fp32"]
    plan = {f.path for f in upload_plan(adapter, "user/final")}
    assert {"adapter_model.safetensors", "adapter_config.json", "thresholds.json", "README.md",
            "run_config.yaml", "label_names.json"} <= plan


def test_final_added_on_resume_trains_only_it_and_a_killed_final_fit_resumes(tiny_model, small_csv, final_run,
                                                                             tmp_path, monkeypatch, capsys):
    """The CV alone, then --resume --final killed at the final model's step-12 checkpoint (of 16), then resumed:
    fold 0 is never retrained and the final model ends where the uninterrupted run's did."""
    import train.merge

    out = tmp_path / "run"
    args = as_set_args(tiny_overrides(tiny_model, small_csv, out, train__save_every_steps=3))
    assert cli.main(args) == 0
    assert not (out / "final").exists()
    fold0 = out / "fold_0" / "last" / "adapter_model.safetensors"
    fold0_state = (fold0.stat().st_mtime_ns, fold0.read_bytes())

    killed = run_cli([*args, "--resume", "--final"], launcher=kill_at_launcher(12))
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert "fold 0: already done, skipped" in killed.stdout
    assert not (out / "final" / "metrics.json").exists() and (out / "final" / "checkpoint").is_dir()

    tuned = []
    monkeypatch.setattr(train.merge, "tune_thresholds",
                        lambda oof, *a, **k: tuned.append(oof) or {"label_names": ["x"], "meta": {}})
    capsys.readouterr()
    assert cli.main([*args, "--resume", "--final"]) == 0
    printed = capsys.readouterr().out
    assert "fold 0: already done, skipped" in printed and "final model: resumed at epoch 1 step 12/16" in printed
    assert tuned == [out / "oof.csv"]
    assert (fold0.stat().st_mtime_ns, fold0.read_bytes()) == fold0_state
    got = load_file(out / "final" / "last" / "adapter_model.safetensors")
    want = load_file(final_run / "final" / "last" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
    ma, mb = (json.loads((d / "final" / "metrics.json").read_text()) for d in (out, final_run))
    assert ma["history"] == mb["history"] and ma["samples"] == mb["samples"] == 120
    log = json.loads((out / "resume_log.json").read_text())
    assert log[-1]["changed"]["cv.final"] == {"old": False, "new": True}
    np.testing.assert_allclose(pd.read_csv(out / "oof.csv").iloc[:, 1:].to_numpy(),
                               pd.read_csv(final_run / "oof.csv").iloc[:, 1:].to_numpy(), atol=1e-6)
