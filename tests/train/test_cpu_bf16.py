"""bf16 compute on the CPU (``model.dtype: bfloat16``; what ``auto`` picks on CPUs with native bf16): a tiny run
trains with finite losses, a run killed after a checkpoint resumes to the same adapter as an uninterrupted one, and a
resumed run keeps the compute dtype it started with."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import as_set_args, kill_at_launcher, run_cli, tiny_overrides

import core.model
from core.config import RunConfig
from train.run_dir import LAUNCH_FILE, launch_info


def bf16_args(model, csv, out) -> list[str]:
    # 39 training rows in fold 0 -> 5 micro-batches of 8 per epoch; 2 epochs; a checkpoint every 2 steps.
    return as_set_args(tiny_overrides(model, csv, out, model__dtype="bfloat16", train__save_every_steps=2,
                                      lora__dropout=0.1))


def test_cpu_bf16_trains_finite_and_resumes(tiny_models, small_csv, tmp_path):
    whole = tmp_path / "whole"
    done = run_cli(bf16_args(tiny_models["mistral"], small_csv, whole))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dtype bfloat16" in done.stdout
    losses = [float(x) for x in re.findall(r"loss=([^,\]\s]+)", done.stderr)]  # the progress bar's postfix
    assert losses and all(math.isfinite(x) for x in losses), done.stderr[-3000:]
    assert len(json.loads((whole / "fold_0" / "metrics.json").read_text())["history"]) == 2
    probs = np.load(whole / "fold_0" / "val_probs_last.npy")
    assert np.isfinite(probs).all() and probs.std() > 0

    cut = tmp_path / "cut"
    args = bf16_args(tiny_models["mistral"], small_csv, cut)
    killed = run_cli(args, launcher=kill_at_launcher(6))
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fold 0: resumed at epoch" in resumed.stdout
    a = load_file(whole / "fold_0" / "last" / "adapter_model.safetensors")
    b = load_file(cut / "fold_0" / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32, k  # trainable weights stay fp32; only the compute is bf16
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert (whole / "oof.csv").read_text() == (cut / "oof.csv").read_text()


@pytest.mark.parametrize("recorded, resume, expected", [
    ({"world_size": 1, "dtype": "bfloat16"}, True, "bfloat16"),
    ({"world_size": 1, "dtype": "float32"}, True, "float32"),   # started where auto meant fp32: stays fp32
    ({"world_size": 1}, True, "float32"),                        # a run from before bf16 on the CPU
    ({"world_size": 1}, False, "bfloat16"),                      # a new run resolves auto now
])
def test_a_resumed_run_keeps_the_dtype_it_started_with(monkeypatch, tmp_path, recorded, resume, expected):
    monkeypatch.setattr(core.model, "cpu_has_native_bf16", lambda: True)
    (tmp_path / LAUNCH_FILE).write_text(json.dumps(recorded))
    env = SimpleNamespace(world_size=1, device=torch.device("cpu"))
    assert launch_info(RunConfig(), env, tmp_path, resume) == {"world_size": 1, "dtype": expected}
    pinned = RunConfig.from_dict({"model": {"dtype": "float32"}})
    assert launch_info(pinned, env, tmp_path, resume)["dtype"] == "float32"
