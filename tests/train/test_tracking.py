"""Experiment tracking (``train.report_to``) on tiny random-init models: the TensorBoard event files of a run hold
every optimizer step's scalars and every epoch's metrics (read back with tensorboard's own event reader), a resumed
run leaves each step once, DAPT logs too, W&B (offline) and MLflow (its local SQLite store) get the same scalars when
they are installed, and the config refuses unknown trackers."""

from __future__ import annotations

import json

import pytest
from trainkit import ROOT, Killed, kill_at, tiny_config_for

from core.config import RunConfig
from core.errors import ConfigError
from train import tracking
from train.run import main

STEP_TAGS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/rows_per_s"}


def read_events(folder):
    """{tag: [(step, value), ...]} of every scalar under ``folder``, as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def metrics(run_dir, fold="fold_0"):
    return json.loads((run_dir / fold / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tb_run(tiny_model, small_csv, tmp_path_factory):
    """Fold 0 of 3, 2 epochs of 5 optimizer steps (39 training rows, micro-batch 8), tracked with TensorBoard."""
    out = tmp_path_factory.mktemp("tb") / "run"
    main(tiny_config_for(tiny_model, small_csv, out, train__report_to=["tensorboard"]))
    return out


def test_tensorboard_events_hold_every_step_and_epoch(tb_run):
    scalars, acc = read_events(tb_run / "logs" / "fold_0")
    m = metrics(tb_run)
    assert STEP_TAGS <= set(scalars)
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == list(range(1, 11)), tag
    # The values are those of the fold's log_history (what curves.png draws), in float32.
    for tag in STEP_TAGS:
        key = tag.removeprefix("train/")
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in m["log_history"]], rel=1e-5), tag
    # Every metric of the per-epoch evaluation, at the epoch's last step.
    eval_keys = [k for k in m["history"][0] if "/" in k]
    assert {"cascade/exact_match", "cascade/micro_f1", "t0.5/exact_match", "t0.5/macro_f1"} <= set(eval_keys)
    for key in eval_keys:
        assert [s for s, _ in scalars[f"eval/{key}"]] == [h["step"] for h in m["history"]] == [5, 10], key
        assert [v for _, v in scalars[f"eval/{key}"]] == pytest.approx([h[key] for h in m["history"]], rel=1e-5), key
    # The resolved config: as text and as HParams.
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report_to:" in text and "num_epochs: 2" in text
    assert acc.PluginTagToContent("hparams")


def test_no_report_to_writes_no_logs(tiny_model, small_csv, tmp_path):
    out = tmp_path / "run"
    main(tiny_config_for(tiny_model, small_csv, out, train__max_steps=2, train__num_epochs=1))
    assert not (out / "logs").exists()
    assert [r["step"] for r in metrics(out)["log_history"]] == [1, 2]  # the curves' data is kept all the same


def test_a_resumed_run_shows_each_step_once(tiny_model, small_csv, tmp_path, tb_run):
    """Killed after the step-4 checkpoint, with events of steps 5-6 already on disk (flushed before the kill): the
    resumed run hides them (purge_step) and its own steps 5-10 are the ones shown, as in an uninterrupted run."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    cfg = tiny_config_for(tiny_model, small_csv, out, train__report_to=["tensorboard"], train__save_every_steps=2)
    with pytest.raises(Killed):
        main(cfg, callbacks=kill_at(4))
    stale = SummaryWriter(str(out / "logs" / "fold_0"))  # what the interrupted process had written after step 4
    for step in (5, 6):
        stale.add_scalar("train/loss", 99.0, step)
    stale.close()
    assert [s for s, _ in read_events(out / "logs" / "fold_0")[0]["train/loss"]] == [1, 2, 3, 4, 5, 6]

    main(cfg, resume=True)
    scalars, _ = read_events(out / "logs" / "fold_0")
    uninterrupted, _ = read_events(tb_run / "logs" / "fold_0")
    for tag in (*STEP_TAGS - {"train/rows_per_s"}, "eval/cascade/exact_match"):
        assert [s for s, _ in scalars[tag]] == [s for s, _ in uninterrupted[tag]], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in uninterrupted[tag]], abs=1e-5), tag
    assert [r["step"] for r in metrics(out)["log_history"]] == list(range(1, 11))


def test_dapt_logs_its_loss(tiny_model, tmp_path):
    from train import dapt

    out = tmp_path / "dapt"
    cfg = tiny_config_for(tiny_model, ROOT / "data" / "sample_train.csv", out, train__num_epochs=1,
                          train__max_steps=4, train__report_to=["tensorboard"])
    info = dapt.main(cfg, [str(ROOT / "data" / "sample_test.csv")], out, eval_rows=8)
    scalars, _ = read_events(out / "logs")  # kept in the adapter folder that replaced the run folder
    assert STEP_TAGS <= set(scalars) and [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(info["loss_history"], abs=1e-4)
    assert [s for s, _ in scalars["eval/loss"]] == [0, 4]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([info["eval_loss_start"], info["eval_loss_end"]])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- wandb / mlflow, if installed


def test_wandb_offline_run_gets_the_scalars(tiny_model, small_csv, tmp_path, monkeypatch):
    """A real offline W&B run (WANDB_MODE=offline, as wandb reads it): what the tracker hands ``Run.log`` (spied on,
    then passed on) and the run file wandb writes."""
    wandb = pytest.importorskip("wandb")  # "when installed": no extra of this project installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    logged = []
    log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    out = tmp_path / "run"
    main(tiny_config_for(tiny_model, small_csv, out, train__max_steps=3, train__num_epochs=1,
                         train__report_to=["wandb"]))
    m = metrics(out)
    losses = [(step, d["train/loss"]) for step, d in logged if "train/loss" in d]
    assert [s for s, _ in losses] == [r["step"] for r in m["log_history"]] == [1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in m["log_history"]])
    evals = [(step, d) for step, d in logged if "eval/cascade/exact_match" in d]
    assert len(evals) == 1 and evals[0][0] == 3 and evals[0][1]["eval/cascade/exact_match"] == pytest.approx(
        m["history"][0]["cascade/exact_match"])
    run_id = json.loads((out / "logs" / "fold_0" / "trackers.json").read_text())["wandb"]
    files = list((out / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    assert b"train/grad_norm" in data and b"eval/cascade/micro_f1" in data and b"run/fold_0" in data


def test_mlflow_local_store_gets_the_scalars_and_a_resume_continues_its_run(tiny_model, small_csv, tmp_path,
                                                                            monkeypatch):
    pytest.importorskip("mlflow")  # "when installed": no extra of this project installs it
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)

    out = tmp_path / "run"
    cfg = tiny_config_for(tiny_model, small_csv, out, train__report_to=["mlflow"], train__save_every_steps=2)
    with pytest.raises(Killed):
        main(cfg, callbacks=kill_at(4))
    main(cfg, resume=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'logs' / 'mlflow.db'}")  # the default store
    experiment = client.get_experiment_by_name("run")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run/fold_0" and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    m = metrics(out)
    losses = sorted((x.step, x.value) for x in client.get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in losses] == list(range(1, 11))  # each step once, across the interruption
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in m["log_history"]], rel=1e-5)
    em = sorted((x.step, x.value) for x in client.get_metric_history(run_id, "eval/cascade/exact_match"))
    assert [s for s, _ in em] == [5, 10]
    assert [v for _, v in em] == pytest.approx([h["cascade/exact_match"] for h in m["history"]])
    assert runs[0].data.params["train.report_to"] == '["mlflow"]' and runs[0].data.params["lora.r"] == "4"


# ------------------------------------------------------------------------------------------------------- config


def test_report_to_names_and_resolution(monkeypatch):
    assert RunConfig.from_dict({"train": {"report_to": ["tensorboard", "wandb"]}}).train.report_to == [
        "tensorboard", "wandb"]
    for bad in (["tensorbord"], ["all", "wandb"], ["none", "tensorboard"]):
        with pytest.raises(ConfigError, match=r"train\.report_to"):
            RunConfig.from_dict({"train": {"report_to": bad}})
    with pytest.raises(ConfigError, match=r"train\.report_to must be a list"):
        RunConfig.from_dict({"train": {"report_to": "tensorboard"}})
    assert tracking.resolve([]) == tracking.resolve(["none"]) == []
    monkeypatch.setattr(tracking, "_installed", lambda name: name != "wandb")
    assert tracking.resolve(["all"]) == ["tensorboard", "mlflow"]
    assert tracking.resolve(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]


def test_a_resume_may_change_report_to(tiny_model, small_csv, tmp_path):
    from train.run_dir import run_fingerprint

    a = tiny_config_for(tiny_model, small_csv, tmp_path / "run")
    b = tiny_config_for(tiny_model, small_csv, tmp_path / "run", train__report_to=["tensorboard"])
    assert run_fingerprint(a) == run_fingerprint(b)
