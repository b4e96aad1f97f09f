"""The Kaggle notebooks, executed headless on CPU (nbclient, the venv's python3 kernel) with injected parameters:
the real embedded Gemma 3 270M, 2 optimizer steps on a 60-row slice of data/sample_train.csv, fold 0, push in
--dry-run mode; then predict / tune / submit from the trained run folder. Both call ``python -m train pipeline``
(the train notebook its trim-vocab / DAPT / CV steps, the submit notebook predict .. submit from finished runs).
Also: the committed notebooks are what notebooks/build_notebooks.py generates."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

pytestmark = pytest.mark.slow

def run_notebook(name: str, params: dict, cwd: Path) -> nbformat.NotebookNode:
    """Execute ``notebooks/NAME`` with ``params`` injected after its parameters cell; saves the executed copy."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "# Injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    assert nb.metadata.kernelspec.name == "python3"
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, cwd / f"executed-{name}")
    return nb


def text_of(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_notebooks_are_generated_from_build_script(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, nb in [("kaggle_train.ipynb", mod.train_notebook()), ("kaggle_submit.ipynb", mod.submit_notebook())]:
        assert (NOTEBOOKS / name).read_text(encoding="utf-8") == nbformat.writes(nb) + "\n", \
            f"{name} is stale: run python notebooks/build_notebooks.py"
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(committed)
        assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")
        assert "parameters" in committed.cells[1].metadata.tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run kaggle_train.ipynb twice (train, then resume = nothing left to do) on the embedded 270M."""
    work = tmp_path_factory.mktemp("nb_train")
    train_csv = work / "train60.csv"
    pd.read_csv(ROOT / "data" / "sample_train.csv").head(60).to_csv(train_csv, index=False)
    params = {
        "TOOLKIT": str(ROOT), "CONFIG": "configs/gemma-3-270m/qlora.yaml", "TRAIN_CSV": str(train_csv),
        "LABEL_NAMES_CSV": str(ROOT / "data" / "sample_trends.csv"), "OUTPUT_DIR": str(work / "run"),
        "FOLDS": [0], "TINY": True, "HUB_REPO": "user/qlml-notebook-test", "DRY_RUN": True, "FINAL_MODEL": True,
        "INFER": None,
    }
    nb = run_notebook("kaggle_train.ipynb", params, work)
    nb2 = run_notebook("kaggle_train.ipynb", params, work)
    return work, train_csv, nb, nb2, params


def test_train_notebook(trained):
    work, _, nb, nb2, _ = trained
    run = work / "run" / "cv"
    assert (run / "fold_0" / "last" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["folds"] == [0] and summary["config"]["train"]["max_steps"] == 2
    assert summary["config"]["data"]["train_csv"] == str(work / "train60.csv")
    out = text_of(nb)
    assert "GPU(s); launcher python" in out or "launcher torchrun" in out or "launcher split" in out
    assert "[1/1] cv: python -m train --config" in out   # the pipeline ran the CV alone (no trim-vocab / DAPT)
    assert "qlora-multilabel is already importable" in out
    assert "dry run: would upload to https://huggingface.co/user/qlml-notebook-test" in out
    assert "fold_0/last/adapter_model.safetensors" in out and "README.md" in out
    assert (run / "final" / "last" / "adapter_config.json").is_file()   # FINAL_MODEL: cv.final
    assert "final/last/adapter_model.safetensors" in out   # pushed with the folds
    out2 = text_of(nb2)
    assert "[1/1] cv: done, skipped" in out2   # the second run: the pipeline finds the CV finished


@pytest.mark.parametrize("blend", [False, True], ids=["llm folds+final", "llm+tfidf,sets"])
def test_submit_notebook(trained, tmp_path, blend):
    work, train_csv, _, _, params = trained
    test_csv = tmp_path / "test20.csv"
    pd.read_csv(ROOT / "data" / "sample_test.csv").head(20).to_csv(test_csv, index=False)
    nb = run_notebook("kaggle_submit.ipynb", {
        "TOOLKIT": str(ROOT), "ADAPTERS": str(work / "run" / "cv"), "TEST_CSV": str(test_csv),
        "TRAIN_CSV": str(train_csv), "WORK_DIR": str(tmp_path), "BATCH_SIZE": 8, "INFER": params["INFER"],
        "TFIDF_BLEND": blend, "STRATEGY": "sets" if blend else "cascade",
        "PREDICT_MODEL": "folds" if blend else "folds+final"}, tmp_path)
    probs_csv = tmp_path / "probs" / ("run.csv" if blend else "run+final.csv")
    probs = pd.read_csv(probs_csv)
    used = json.loads(probs_csv.with_suffix(".csv.meta.json").read_text())["adapters"]
    assert [(a["name"], a["weight"]) for a in used] == ([("fold_0/last", 1.0)] if blend else
                                                          [("fold_0/last", 0.5), ("last", 0.5)])
    assert list(probs["index"]) == list(pd.read_csv(test_csv)["index"])
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert len(sub) == 20
    out = text_of(nb)
    assert "rows/s" in out
    if blend:  # TF-IDF on the run's folds, blended on its OOF, the decoding tuned on the blend
        assert (tmp_path / "tfidf" / "test_probs.csv").is_file()
        meta = json.loads((tmp_path / "blend.csv.meta.json").read_text())
        assert meta["inputs"] == [str(tmp_path / "probs" / "run.csv"), str(tmp_path / "tfidf" / "test_probs.csv")]
        assert "blend + sets (nested)" in out and thresholds["strategy"] == "sets"
        assert thresholds["meta"]["oof"] == str(tmp_path / "blend_oof.csv")
    else:
        assert "strategy" not in thresholds and not (tmp_path / "tfidf").exists()


def test_train_notebook_dapt_first_then_submit_with_moved_base(tmp_path):
    """TRIM_VOCAB + DAPT_CORPUS: the vocabulary trimmed to train + unlabelled text, DAPT on the trimmed model, the CV
    started from both; then the submit notebook predicts with the trimmed base attached elsewhere (BASE_MODEL)."""
    import shutil

    train_csv, test_csv = tmp_path / "train60.csv", tmp_path / "test20.csv"
    pd.read_csv(ROOT / "data" / "sample_train.csv").head(60).to_csv(train_csv, index=False)
    pd.read_csv(ROOT / "data" / "sample_test.csv").head(20).to_csv(test_csv, index=False)
    run = tmp_path / "run"
    nb = run_notebook("kaggle_train.ipynb", {
        "TOOLKIT": str(ROOT), "CONFIG": "configs/gemma-3-270m/qlora.yaml", "TRAIN_CSV": str(train_csv),
        "LABEL_NAMES_CSV": str(ROOT / "data" / "sample_trends.csv"), "OUTPUT_DIR": str(run), "FOLDS": [0], "TINY": True,
        "TRIM_VOCAB": True, "DAPT_CORPUS": str(test_csv),
        "INFER": None}, tmp_path)
    base, dapt = run / "base", run / "dapt"
    trim = json.loads((base / "trim_report.json").read_text())
    assert trim["kept_rows"] < trim["original_rows"]
    info = json.loads((dapt / "dapt_info.json").read_text())
    assert info["steps"] == 2 and info["model"] == str(base)
    summary = json.loads((run / "cv" / "summary.json").read_text())
    assert summary["config"]["model"]["name_or_path"] == str(base)
    assert summary["config"]["lora"]["init_adapter"] == str(dapt)
    assert "[1/3] trim-vocab: python -m train trim-vocab" in text_of(nb) and "[3/3] cv: " in text_of(nb)

    moved = tmp_path / "attached" / "run-base"   # as a Kaggle dataset: the recorded path no longer exists
    moved.parent.mkdir()
    shutil.move(base, moved)
    sub_dir = tmp_path / "submit"
    sub_dir.mkdir()
    run_notebook("kaggle_submit.ipynb", {
        "TOOLKIT": str(ROOT), "ADAPTERS": str(run / "cv"), "BASE_MODEL": str(moved), "TEST_CSV": str(test_csv),
        "TRAIN_CSV": str(train_csv), "WORK_DIR": str(sub_dir), "BATCH_SIZE": 8, "INFER": None}, sub_dir)
    assert len(pd.read_csv(sub_dir / "submission.csv")) == 20


@pytest.fixture()
def read_only_tree(tmp_path):
    """The repo's tracked files in a read-only tree, as /kaggle/input/... is: a read-only bind mount when we are root
    (root ignores permission bits), else a tree without write permission."""
    import os
    import shutil
    import subprocess

    src = tmp_path / "src" / "qlora-multilabel"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    if os.geteuid() == 0:
        ro = tmp_path / "ro" / "qlora-multilabel"
        ro.mkdir(parents=True)
        mounted = subprocess.run(["mount", "--bind", str(src), str(ro)], check=False).returncode == 0 and subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(ro)], check=False).returncode == 0
        if not mounted:
            pytest.skip("cannot make a read-only tree here (root without mount)")
        yield ro
        subprocess.run(["umount", str(ro)], check=False)
    else:
        for p in [src, *src.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        yield src
        for p in [src, *src.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_install_from_a_read_only_tree(read_only_tree, tmp_path):
    """Kaggle mounts a dataset read-only and setuptools builds inside the source tree: the notebook's install step
    copies such a tree first (writable_source), and the install then works."""
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(NOTEBOOKS))
    from build_notebooks import writable_source

    assert not os.access(read_only_tree, os.W_OK)
    src = writable_source(str(read_only_tree))
    assert src != str(read_only_tree) and os.access(src, os.W_OK)
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), src], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (site / "core" / "model.py").is_file() and (site / "train" / "run.py").is_file()
    assert (site / "infer" / "predict.py").is_file()
