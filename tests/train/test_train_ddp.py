"""DDP on CPU: two processes (torchrun, gloo) on a tiny 4-bit model.

Rank r takes every 2nd micro-batch and the gradients are averaged, weighted by rows, so a 2-rank run with
``grad_accum_steps=1`` makes the same optimizer steps as one process with ``grad_accum_steps=2`` (LoRA dropout off:
its random masks are per rank). The fold's 39 training rows in micro-batches of 10 give 3 full batches and a short
one, which checks the row weighting too.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import as_set_args, run_cli, tiny_overrides

from core.config import RunConfig
from train.run import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]


def overrides(model, csv, out, accum):
    return tiny_overrides(model, csv, out, train__micro_batch_size=10, train__grad_accum_steps=accum,
                          train__save_every_steps=1, lora__dropout=0.0)


@pytest.fixture(scope="module")
def ddp_run(tiny_models, small_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = run_cli(as_set_args(overrides(tiny_models["gemma2"], small_csv, out, accum=1)), launcher=TORCHRUN,
                  env={"OMP_NUM_THREADS": "1"}, timeout=600)
    return out, res


def test_ddp_completes_with_one_set_of_artifacts(ddp_run):
    out, res = ddp_run
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    assert "world size 2 on cpu" in res.stdout
    wrote = [line for line in res.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 2 and "summary.json" in wrote[0] and wrote[1].endswith("curves.png")  # rank 0 only, once
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "curves.png", "fold_0", "folds.csv", "label_names.json", "launch.json", "oof.csv", "oof.csv.meta.json",
        "run_config.yaml", "summary.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0] and 0 <= summary["oof_metrics"]["cascade/micro_f1"] <= 1
    metrics = json.loads((out / "fold_0" / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 2                             # 4 micro-batches / 2 ranks per epoch, 2 epochs
    assert metrics["samples"] == 2 * 39                          # rows of both ranks
    assert (out / "fold_0" / "last" / "adapter_model.safetensors").is_file()


def test_ddp_equals_single_process_with_accumulation(ddp_run, tiny_models, small_csv, tmp_path):
    out, res = ddp_run
    assert res.returncode == 0, res.stderr[-5000:]
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as torchrun's ranks (OMP_NUM_THREADS=1): same summation order in matmuls
    try:
        main(RunConfig.from_dict(overrides(tiny_models["gemma2"], small_csv, single, accum=2)))
    finally:
        torch.set_num_threads(threads)
    wd = load_file(out / "fold_0" / "last" / "adapter_model.safetensors")
    ws = load_file(single / "fold_0" / "last" / "adapter_model.safetensors")
    assert wd.keys() == ws.keys()
    moved = 0
    for k in wd:
        assert torch.allclose(wd[k], ws[k], atol=1e-5, rtol=1e-4), (k, (wd[k] - ws[k]).abs().max())
        moved += "lora_B" in k and wd[k].abs().max() > 0
    assert moved                                                  # the adapters did train
    np.testing.assert_allclose(np.load(out / "fold_0" / "val_probs_last.npy"),
                               np.load(single / "fold_0" / "val_probs_last.npy"), atol=1e-5)
    md = json.loads((out / "fold_0" / "metrics.json").read_text())
    ms = json.loads((single / "fold_0" / "metrics.json").read_text())
    assert md["steps"] == ms["steps"] and md["samples"] == ms["samples"]


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_message(tiny_models, small_csv, tmp_path):
    """Rank 1's loss is NaN: the collective guard stops both ranks at once (no rank left waiting in an all-reduce
    until the process-group timeout), each with the same message, exit status non-zero."""
    import time
    from pathlib import Path

    out = tmp_path / "run"
    script = Path(__file__).with_name("nan_on_rank.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                "1"]
    t0 = time.perf_counter()
    res = run_cli(as_set_args(overrides(tiny_models["gemma2"], small_csv, out, accum=1)), launcher=launcher,
                  env={"OMP_NUM_THREADS": "1"}, timeout=300)
    seconds = time.perf_counter() - t0
    message = "error: fold 0: loss is not finite on rank(s) [1] at optimizer step 1"
    assert res.returncode != 0
    assert res.stderr.count(message) == 2, res.stderr[-3000:]   # rank 0 and rank 1, the same line
    assert seconds < 240, seconds                                 # not a collective timeout (30 min by default)
    print(f"DDP NaN stop: both ranks exited in {seconds:.1f} s (start-up and model load included)")
