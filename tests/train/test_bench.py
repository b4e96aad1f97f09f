"""The training benchmark runs end to end on the CPU (tiny Gemma-2 shape): GPU sessions are rare, so the script
they run must not rot in between. Figures are not asserted (a benchmark prints them; it is not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SAMPLE_DATA
from trainkit import ROOT, SAMPLE_TRAIN

pytestmark = pytest.mark.slow


def test_bench_reference_toolkit_and_split_run_on_a_tiny_shape(tmp_path):
    out = tmp_path / "bench.json"
    # --split-gib 0.0348: two "GPUs" small enough that the tiny shape's 4 layers are placed 2 + 2 (the embedding,
    # 32 MiB, fills most of the first); LoRA from layer 1, so both parts train LoRA layers.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.runner", "--models", "tiny-gemma2", "--profiles",
         "reference,toolkit,toolkit-split",
         "--steps", "2", "--warmup", "1", "--data", str(SAMPLE_TRAIN), "--shapes-dir", str(tmp_path / "shapes"),
         "--split-gib", "0.0348", "--out", str(out), "--set", "train.max_tokens_per_micro_batch=256",
         "--set", "lora.layers_from=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["recipe"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"reference", "toolkit", "split-0", "split-1"}
    assert results["split-0"]["layers"] == [0, 2] and results["split-1"]["layers"] == [2, 4]
    assert results["split-0"]["dtype"] == "torch.float16"  # the T4 profile
    assert "split over 2 GPUs, T4 profile: peak GPU 0 (layers 0-1 + embedding)" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "shapes").iterdir()) == ["tiny-gemma2"]  # parts removed after use
    for r in results.values():
        assert "error" not in r, r
        assert r["steps_timed"] == 2 and r["samples_per_s"] > 0 and 0 <= r["padding_fraction"] < 1
    assert results["toolkit"]["micro_batch_size"] == 8 and results["toolkit"]["grad_accum_steps"] == 2
    assert "tiny-gemma2  toolkit" in proc.stdout and "x ref" in proc.stdout


def test_split_plan_is_what_device_map_auto_gives_the_27b_on_two_t4s():
    from benchmarks.shapes import part_lora_layers, split_plan

    # transformers' balanced placement in 4-bit: embedding (2.4 GB) + 24 layers on GPU 0, 22 layers + head on GPU 1.
    assert split_plan("gemma-2-27b", 2, 15.0) == [(0, 24), (24, 46)]
    assert split_plan("tiny-gemma2", 2, 1.0) == [(0, 4)]  # fits the first device: nothing to split
    # The config's LoRA layers (16..45) renumbered inside each part.
    assert part_lora_layers("gemma-2-27b", [], (0, 24)) == list(range(16, 24))
    assert part_lora_layers("gemma-2-27b", [], (24, 46)) == list(range(22))
    assert part_lora_layers("gemma-2-27b", ["lora.layers_from=30"], (0, 24)) == []


def test_bench_quality_scores_reference_and_toolkit_out_of_fold(tmp_path):
    import numpy as np
    import pandas as pd

    from core.config import DataArgs
    from core.data import read_csv
    from train.data import make_folds

    cmd = [sys.executable, "-m", "benchmarks.runner", "--quality", "--models", "tiny-gemma2", "--folds", "0,1",
           "--data", str(SAMPLE_TRAIN), "--shapes-dir", str(tmp_path / "shapes"), "--out-oof", str(tmp_path / "oof")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = read_csv(str(SAMPLE_TRAIN), DataArgs(train_csv=str(SAMPLE_TRAIN), **SAMPLE_DATA))
    held_out = ds.ids[np.isin(make_folds(ds.labels, 5, 42), [0, 1])]
    for recipe in ("reference", "toolkit"):
        oof = pd.read_csv(tmp_path / "oof" / f"tiny-gemma2_{recipe}_oof.csv")
        assert sorted(oof["index"]) == sorted(held_out) and list(oof.columns[1:]) == ds.label_names
        assert oof.iloc[:, 1:].to_numpy().min() >= 0 and oof.iloc[:, 1:].to_numpy().max() <= 1
        meta = json.loads((tmp_path / "oof" / f"tiny-gemma2_{recipe}_oof.csv.meta.json").read_text())
        assert meta["folds"] == [0, 1] and meta["recipe"] == recipe
        assert f"tiny-gemma2  {recipe:<11} {len(held_out)} rows: exact match" in proc.stdout
    folds = pd.read_csv(tmp_path / "oof" / "folds.csv")
    assert list(folds["index"]) == list(ds.ids) and list(folds["fold"]) == list(make_folds(ds.labels, 5, 42))

    # Run again after losing one fold (as if cut short there): only that fold trains, the others are kept.
    reference = (tmp_path / "oof" / "tiny-gemma2_reference_oof.csv").read_bytes()
    (tmp_path / "oof" / "folds" / "tiny-gemma2_toolkit_fold1.json").unlink()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(": kept from ") == 3 and "== tiny-gemma2 / toolkit / fold 1\n" in again.stderr
    assert (tmp_path / "oof" / "tiny-gemma2_reference_oof.csv").read_bytes() == reference
    assert (tmp_path / "oof" / "folds" / "tiny-gemma2_toolkit_fold1.json").is_file()
    # kept folds made with other settings are not mixed in
    other = subprocess.run(cmd + ["--epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert other.returncode != 0 and "was made with other settings" in other.stderr
