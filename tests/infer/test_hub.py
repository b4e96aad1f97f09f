"""infer.hub with huggingface_hub mocked (never the real Hub): upload plan and dry run, model card, token/offline
errors that change nothing, pull / resolve / pull_run, and a folder round trip (push -> download -> predict gives
the same probabilities as predicting from the original run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import SAMPLE_DATA

from core import hub as transport
from core.cli import setup_logging
from core.errors import InputError
from core.io import read_probs
from infer import hub
from infer.__main__ import main

REPO = Path(__file__).resolve().parents[2]


class NoNetwork:
    """Stands in for huggingface_hub's network entry points: any use fails the test."""

    def __init__(self, *a, **k):
        raise AssertionError("the real Hugging Face Hub must not be used in tests")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Guard: no network client, an empty private HF cache, no ambient token."""
    monkeypatch.setattr(hub.hf, "HfApi", NoNetwork)
    real_snapshot = hub.hf.snapshot_download

    def snapshot_cache_only(*a, **k):
        if not k.get("local_files_only"):
            raise AssertionError("snapshot_download without local_files_only in a test")
        return real_snapshot(*a, **k)

    monkeypatch.setattr(hub.hf, "snapshot_download", snapshot_cache_only)
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub.hf, "get_token", lambda: None)
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", False)  # tests set it where they need it


# --------------------------------------------------------------------------------------------------------------
# A fabricated run folder (no model needed): two finished folds, one unfinished, temp files, a checkpoint
# --------------------------------------------------------------------------------------------------------------

LABELS = [f"trend_id_res{i}" for i in range(3)]


def make_fake_run(root: Path, thresholds: bool = False) -> Path:
    from core.config import RunConfig

    run = root / "myrun"
    cfg = RunConfig.from_dict({"cv": {"n_folds": 3}, "data": dict(SAMPLE_DATA), "output_dir": str(run)})
    run.mkdir(parents=True)
    (run / "run_config.yaml").write_text(cfg.to_yaml())
    (run / "label_names.json").write_text(json.dumps({"label_names": LABELS, "descriptions": {
        "trend_id_res0": "Долгая доставка", "trend_id_res1": "Высокие цены"}}, ensure_ascii=False))
    (run / "folds.csv").write_text("index,fold\n1,0\n2,1\n3,2\n")
    (run / "oof.csv").write_text("index,trend_id_res0,trend_id_res1,trend_id_res2\n1,0.1,0.2,0.3\n")
    (run / "oof.csv.meta.json").write_text("{}")
    metrics = {"t0.5/exact_match": 0.5, "cascade/exact_match": 0.625, "cascade/micro_f1": 0.75}
    (run / "summary.json").write_text(json.dumps({
        "folds": [0, 1], "rows": 2, "oof_metrics": metrics, "mean_fold_metrics": metrics,
        "per_fold": [{"fold": 0, "epoch": 2, **metrics}, {"fold": 1, "epoch": 2, **metrics}],
        "versions": {"torch": "2.x", "peft": "0.21"}, "device": "cpu",
        "throughput": {"samples_per_s": 9.5}, "wall_seconds": 3.0}))
    if thresholds:
        (run / "thresholds.json").write_text(json.dumps({"label_names": LABELS, "start": 0.5, "fallback": 2}))
    for k in (0, 1, 2):
        fold = run / f"fold_{k}"
        (fold / "checkpoint").mkdir(parents=True)
        (fold / "checkpoint" / "state.pt").write_bytes(b"x" * 100)
        if k == 2:  # unfinished: checkpoint only
            continue
        (fold / "metrics.json").write_text("{}")
        (fold / "val_probs_last.npy").write_bytes(b"npy")
        for kind in ("last", "best"):
            a = fold / kind
            a.mkdir()
            for name, size in [("adapter_model.safetensors", 1000 + k), ("adapter_config.json", 10),
                               ("tokenizer.json", 20), ("run_config.yaml", 5), ("label_names.json", 5),
                               ("adapter_info.json", 5), ("README.md", 5)]:
                (a / name).write_bytes(b"a" * size)
        (fold / ".last.abc.tmp").mkdir()  # an interrupted atomic write
        (fold / ".last.abc.tmp" / "junk").write_text("junk")
    return run


def snapshot_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --------------------------------------------------------------------------------------------------------------


def test_upload_plan_and_dry_run(tmp_path, capsys):
    setup_logging()
    run = make_fake_run(tmp_path)
    before = snapshot_tree(tmp_path)
    plan = hub.push(run, "user/my-run", dry_run=True)
    paths = [f.path for f in plan]
    assert paths[0] == "README.md"
    assert {"run_config.yaml", "label_names.json", "folds.csv", "oof.csv", "oof.csv.meta.json",
            "summary.json"} <= set(paths)
    for k in (0, 1):
        assert {f"fold_{k}/metrics.json", f"fold_{k}/val_probs_last.npy", f"fold_{k}/last/adapter_model.safetensors",
                f"fold_{k}/last/adapter_config.json", f"fold_{k}/last/tokenizer.json",
                f"fold_{k}/last/label_names.json"} <= set(paths)
    assert not [p for p in paths if "checkpoint" in p or "/best/" in p or "fold_2" in p or "tmp" in p]
    assert "thresholds.json" not in paths
    out = capsys.readouterr().out
    assert "dry run" in out and "fold_0/last/adapter_model.safetensors" in out and "1,000" in out
    assert f"total ({len(plan)} files)" in out
    assert snapshot_tree(tmp_path) == before  # nothing written

    stage = tmp_path / "stage"
    hub.push(run, "user/my-run", dry_run=True, stage_dir=stage)
    staged = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    assert staged == sorted(paths)
    assert (stage / "fold_1/last/adapter_model.safetensors").read_bytes() == b"a" * 1001


def test_upload_plan_carries_the_final_model(tmp_path):
    """A run trained with cv.final: its final model (final/last/, final/metrics.json) goes up with the folds, not its
    checkpoint, and the card says how to predict with it; an unfinished final model (no metrics.json) stays home."""
    run = make_fake_run(tmp_path)
    final = run / "final"
    (final / "checkpoint").mkdir(parents=True)
    (final / "checkpoint" / "state.safetensors").write_bytes(b"x" * 100)
    (final / "last").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "thresholds.json", "tokenizer.json"):
        (final / "last" / name).write_bytes(b"f" * 7)
    plan = hub.upload_plan(run, "user/my-run")
    paths = [f.path for f in plan]
    assert not [p for p in paths if p.startswith("final/")]  # training stopped before the final model finished
    card = plan[0].content.decode()
    assert "final/last" not in card

    (final / "metrics.json").write_text("{}")
    plan = hub.upload_plan(run, "user/my-run")
    paths = [f.path for f in plan]
    assert {"final/metrics.json", "final/last/adapter_model.safetensors", "final/last/adapter_config.json",
            "final/last/thresholds.json", "final/last/tokenizer.json"} <= set(paths)
    assert not [p for p in paths if "checkpoint" in p]
    card = plan[0].content.decode()
    assert "--adapter user/my-run,user/my-run/final/last" in card and "each fold 1/4, the final model 1/2" in card
    assert "- `final/last/`: the final model's adapter folder" in card


def test_model_card(tmp_path):
    run = make_fake_run(tmp_path, thresholds=True)
    plan = hub.upload_plan(run, "user/my-run")
    assert "thresholds.json" in [f.path for f in plan]
    card = plan[0].content.decode()
    meta = front_matter(card)
    assert meta["base_model"] == "google/gemma-3-270m"
    assert meta["library_name"] == "peft" and meta["license"] == "gemma"
    results = meta["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in results["metrics"]}["cascade_exact_match"] == 0.625
    assert results["dataset"]["name"] == "sample_train.csv"
    assert "| `trend_id_res0` | Долгая доставка |" in card and "| `trend_id_res2` |  |" in card
    assert "python -m infer predict --adapter user/my-run" in card
    assert "python -m infer pull user/my-run" in card and "--thresholds thresholds.json" in card
    assert 'subfolder="fold_0/last"' in card and "## Decision thresholds" in card
    assert "| cascade/exact_match | 0.6250 | 0.6250 |" in card
    assert "user assesment: {assessment}" in card  # the prompt template
    assert '"peft": "0.21"' in card

    # A base model that is a local path is not put in the front matter (invalid there), --base-model is.
    cfg_text = (run / "run_config.yaml").read_text().replace("embedded:gemma-3-270m", str(tmp_path))
    (run / "run_config.yaml").write_text(cfg_text)
    assert "base_model" not in front_matter(hub.upload_plan(run, "user/x")[0].content.decode())
    meta = front_matter(hub.upload_plan(run, "user/x", base_model="google/gemma-2-9b-it")[0].content.decode())
    assert meta["base_model"] == "google/gemma-2-9b-it"
    # A run that pools the mean gets no plain-transformers snippet (it would pool the last token), a note instead.
    assert "PeftModel.from_pretrained" in card
    cfg = yaml.safe_load((run / "run_config.yaml").read_text())
    cfg["model"]["pooling"] = "mean"
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    mean_card = hub.upload_plan(run, "user/x")[0].content.decode()
    assert "PeftModel.from_pretrained" not in mean_card and "`model.pooling: mean`" in mean_card


def test_push_errors_change_nothing(tmp_path, monkeypatch, capsys):
    run = make_fake_run(tmp_path)
    before = snapshot_tree(tmp_path)
    with pytest.raises(hub.HubError, match="no Hugging Face token .*HF_TOKEN"):
        hub.push(run, "user/my-run")
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        hub.push(run, "user/my-run", token="hf_x")
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", False)

    class Unreachable:
        def __init__(self, token=None):
            pass

        def whoami(self):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub.hf, "HfApi", Unreachable)
    with pytest.raises(hub.HubError, match="cannot be reached .*ConnectionError.*nothing was uploaded"):
        hub.push(run, "user/my-run", token="hf_x")
    with pytest.raises(InputError, match="not a Hub repo id"):
        hub.push(run, "no-slash", dry_run=True)
    with pytest.raises(InputError, match="not a run folder"):
        hub.push(run / "fold_0", "user/x", dry_run=True)
    shutil.rmtree(run / "fold_0" / "last"), shutil.rmtree(run / "fold_1" / "last")
    before = snapshot_tree(tmp_path)
    with pytest.raises(InputError, match="no finished fold to push"):
        hub.push(run, "user/x", dry_run=True)
    assert snapshot_tree(tmp_path) == before

    assert main(["push", str(run), "--repo", "user/x"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


class FakeApi:
    """Records calls; ``upload_folder`` snapshots the folder's files (it is deleted after the push)."""

    calls: ClassVar[list] = []
    fail_upload = False

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def whoami(self):
        return {"name": "user"}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, ignore_patterns=None, **k):
        if FakeApi.fail_upload:
            raise RuntimeError("HTTP 500")
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        FakeApi.calls.append(("upload_folder", repo_id, files, ignore_patterns))
        return type("Info", (), {"repo_url": f"https://huggingface.co/{repo_id}"})()


def test_push_mocked(tmp_path, monkeypatch, capsys):
    setup_logging()
    run = make_fake_run(tmp_path)
    FakeApi.calls, FakeApi.fail_upload = [], False
    monkeypatch.setattr(hub.hf, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    plan = hub.push(run, "user/my-run", private=True)
    assert FakeApi.calls[0] == ("init", "hf_env")
    assert FakeApi.calls[1] == ("create_repo", "user/my-run", True, True)
    assert FakeApi.calls[2][2] == sorted(f.path for f in plan)
    assert "pushed" in capsys.readouterr().out

    FakeApi.fail_upload = True
    with pytest.raises(hub.HubError, match="failed .*HTTP 500.*nothing was uploaded"):
        hub.push(run, "user/my-run")

    # Checkpoints: the whole run folder, hidden temp files ignored; a failure does not stop training.
    FakeApi.calls, FakeApi.fail_upload = [], False
    assert transport.push_checkpoint(run, "user/ckpt") is True
    _, repo, files, ignore = FakeApi.calls[-1]
    assert repo == "user/ckpt" and "fold_2/checkpoint/state.pt" in files and ignore == transport.HIDDEN_PATTERNS
    assert FakeApi.calls[1] == ("create_repo", "user/ckpt", True, True)
    FakeApi.fail_upload = True
    assert transport.push_checkpoint(run, "user/ckpt") is False
    assert "warning: pushing checkpoints to user/ckpt failed" in capsys.readouterr().out
    with pytest.raises(hub.HubError):
        transport.push_checkpoint(run, "user/ckpt", strict=True)
    monkeypatch.delenv("HF_TOKEN")
    assert transport.push_checkpoint(run, "user/ckpt") is False  # no token: warning only


def _fake_hf_cache(cache: Path, repo: str, files_from: Path, ignore_checkpoints: bool = True,
                   commit: str = "0" * 40) -> Path:
    """The standard cache layout (refs/main -> snapshots/<commit>/...) as `hf download` leaves it."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    shutil.copytree(files_from, snap, ignore=shutil.ignore_patterns("checkpoint") if ignore_checkpoints else None)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return snap


def test_pull_and_resolve(tmp_path, monkeypatch):
    run = make_fake_run(tmp_path)
    cache = Path(hub.hf.constants.HF_HUB_CACHE)
    with pytest.raises(InputError, match=r"not in the local Hugging Face cache.*python -m infer pull user/my-run"):
        transport.resolve_adapter("user/my-run")
    with pytest.raises(InputError, match="adapter folder not found"):
        transport.resolve_adapter("./missing/folder")
    assert transport.resolve_adapter(str(run)) == run

    snap = _fake_hf_cache(cache, "user/my-run", run)
    assert transport.resolve_adapter("user/my-run") == snap
    assert transport.resolve_adapter("hub:user/my-run/fold_0/last") == snap / "fold_0" / "last"
    with pytest.raises(InputError, match="has no folder 'fold_9'"):
        transport.resolve_adapter("user/my-run/fold_9")

    # pull: offline -> cached copy; not cached -> one clear error.
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", True)
    assert transport.pull("user/my-run") == str(snap)
    with pytest.raises(hub.HubError, match="cannot pull user/other: Hub access is disabled"):
        transport.pull("user/other")
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", False)

    calls = []

    def fake_download(repo, **k):
        calls.append((repo, k))
        if k.get("local_files_only"):
            raise FileNotFoundError("not cached")
        if repo == "user/down":
            raise ConnectionError("no route")
        return "/cache/snap"

    monkeypatch.setattr(hub.hf, "snapshot_download", fake_download)
    assert transport.pull("user/my-run", revision="v1", token="t") == "/cache/snap"
    assert calls[-1][1]["ignore_patterns"] == transport.CHECKPOINT_PATTERNS and calls[-1][1]["revision"] == "v1"
    assert transport.pull("user/my-run", include_checkpoints=True) == "/cache/snap"
    assert calls[-1][1]["ignore_patterns"] is None
    with pytest.raises(hub.HubError, match=r"cannot pull user/down: the Hub could not be used \(ConnectionError"):
        transport.pull("user/down")

    assert main(["pull", "user/my-run"]) == 0


def test_pull_run_restores_checkpoints(tmp_path, monkeypatch, capsys):
    setup_logging()
    run = make_fake_run(tmp_path)
    snap = _fake_hf_cache(Path(hub.hf.constants.HF_HUB_CACHE), "user/ckpt", run, ignore_checkpoints=False)
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", True)  # served from the cache
    out = tmp_path / "restored"
    (out / "fold_0").mkdir(parents=True)
    (out / "fold_0" / "metrics.json").write_text("local")  # local files win
    transport.pull_run("user/ckpt", out)
    assert (out / "fold_2" / "checkpoint" / "state.pt").read_bytes() == b"x" * 100
    assert (out / "fold_0" / "metrics.json").read_text() == "local"
    assert (out / "run_config.yaml").read_text() == (run / "run_config.yaml").read_text()
    assert "restored" in capsys.readouterr().out
    (snap / "run_config.yaml").unlink()
    with pytest.raises(hub.HubError, match="no run_config.yaml"):
        transport.pull_run("user/ckpt", tmp_path / "other")


def test_train_resume_from_hub_uses_pull_run(tmp_path, monkeypatch):
    """`python -m train --resume hub:user/name` restores the run folder through pull_run, then resumes."""
    import train.__main__ as train_main
    import train.run

    seen = {}
    monkeypatch.setattr(transport, "pull_run", lambda repo, out: seen.update(repo=repo, out=out))
    monkeypatch.setattr(train.run, "main", lambda cfg, resume, callbacks=None: seen.update(resume=resume))
    code = train_main.main(["--set", f"output_dir={tmp_path / 'r'}", "--resume", "hub:user/ckpt"])
    assert code == 0 and seen == {"repo": "user/ckpt", "out": str(tmp_path / "r"), "resume": True}


# --------------------------------------------------------------------------------------------------------------
# Round trip with a real (tiny) trained run
# --------------------------------------------------------------------------------------------------------------


def test_round_trip_push_download_predict(tiny_run, tmp_path, monkeypatch):
    from infer.predict import predict

    test_csv = tmp_path / "test.csv"
    pd.read_csv(REPO / "data" / "sample_test.csv").head(12).to_csv(test_csv, index=False)
    predict([str(tiny_run)], test_csv, tmp_path / "orig.csv", progress=False)
    predict([str(tiny_run / "fold_1" / "last")], test_csv, tmp_path / "orig1.csv", progress=False)

    # What push would upload, as a user's download leaves it in the HF cache; the original run is then moved away.
    stage = tmp_path / "stage"
    plan = hub.push(tiny_run, "user/tiny", dry_run=True, stage_dir=stage)
    assert not [f.path for f in plan if "checkpoint" in f.path]
    front = front_matter((stage / "README.md").read_text())
    assert front["library_name"] == "peft" and "model-index" in front
    _fake_hf_cache(Path(hub.hf.constants.HF_HUB_CACHE), "user/tiny", stage)
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_run / "fold_1" / "last", moved / "my-adapter")
    monkeypatch.setattr(hub.hf.constants, "HF_HUB_OFFLINE", True)

    predict(["user/tiny"], test_csv, tmp_path / "hub.csv", progress=False)
    predict(["hub:user/tiny/fold_1/last"], test_csv, tmp_path / "hub1.csv", progress=False)
    predict([str(moved / "my-adapter")], test_csv, tmp_path / "copy1.csv", progress=False)
    a, b = read_probs(tmp_path / "orig.csv"), read_probs(tmp_path / "hub.csv")
    assert list(a[0]) == list(b[0]) and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(read_probs(tmp_path / "orig1.csv")[1], read_probs(tmp_path / "hub1.csv")[1])
    np.testing.assert_array_equal(read_probs(tmp_path / "orig1.csv")[1], read_probs(tmp_path / "copy1.csv")[1])
    meta = json.loads((tmp_path / "hub.csv.meta.json").read_text())
    assert [m["spec"] for m in meta["adapters"]] == ["user/tiny", "user/tiny"]
    assert os.path.isabs(meta["adapters"][0]["folder"])
