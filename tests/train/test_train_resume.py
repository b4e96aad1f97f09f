"""Resume after a hard kill gives the same final adapter as an uninterrupted run.

``tests/train/kill_at.py N`` runs ``python -m train`` with a callback injected into the training engine that makes the
process ``os._exit(137)`` right after its first checkpoint at an optimizer step >= N (checkpoints every
``train.save_every_steps``). The killed run is then continued with
``--resume`` and compared with an uninterrupted in-process run of the same config: LoRA dropout is on, batches are
length-grouped and shuffled, so equality needs the per-step seeds, the per-epoch batch order and the optimizer and
scheduler state of the checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import as_set_args, kill_at_launcher, run_cli, tiny_overrides

from core.config import RunConfig
from train.run import main


def overrides(model, csv, out, accum):
    # 39 training rows in fold 0 -> 5 micro-batches of 8 per epoch; 2 epochs; a checkpoint every 2 steps.
    return tiny_overrides(model, csv, out, train__grad_accum_steps=accum, train__save_every_steps=2,
                          train__warmup_ratio=0.2, lora__dropout=0.1)


@pytest.fixture(scope="module")
def baselines(tiny_models, small_csv, tmp_path_factory):
    """Uninterrupted runs, keyed by grad_accum_steps."""
    out = {}
    for accum in (1, 2):
        folder = tmp_path_factory.mktemp(f"uninterrupted{accum}") / "run"
        main(RunConfig.from_dict(overrides(tiny_models["mistral"], small_csv, folder, accum)))
        out[accum] = folder
    return out


def assert_same_run(a, b):
    wa = load_file(a / "fold_0" / "last" / "adapter_model.safetensors")
    wb = load_file(b / "fold_0" / "last" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), (k, (wa[k] - wb[k]).abs().max())
    np.testing.assert_allclose(np.load(a / "fold_0" / "val_probs_last.npy"),
                               np.load(b / "fold_0" / "val_probs_last.npy"), atol=1e-6)
    ma = json.loads((a / "fold_0" / "metrics.json").read_text())
    mb = json.loads((b / "fold_0" / "metrics.json").read_text())
    for key in ("history", "best", "steps", "samples", "real_tokens", "padded_tokens"):
        assert ma[key] == mb[key], key
    assert (a / "oof.csv").read_text() == (b / "oof.csv").read_text()


# (kill at step, grad_accum_steps): steps per epoch are 5 (accum 1) or 3 (accum 2), checkpoints every 2 steps.
@pytest.mark.parametrize("kill_at, accum", [
    (3, 1),    # killed at the step-4 checkpoint, mid epoch 1
    (6, 1),    # killed at step 6, mid epoch 2: epoch 1's history, best and adapters come from disk
    (2, 2),    # gradient accumulation: killed after step 2 = 4 micro-batches into epoch 1
])
def test_resume_after_kill_matches_uninterrupted(tiny_models, small_csv, tmp_path, baselines, kill_at, accum):
    out = tmp_path / "run"
    args = as_set_args(overrides(tiny_models["mistral"], small_csv, out, accum))
    killed = run_cli(args, launcher=kill_at_launcher(kill_at))
    assert killed.returncode == 137, killed.stderr[-3000:]
    fold = out / "fold_0"
    state = json.loads((fold / "checkpoint" / "state.json").read_text())["progress"]
    assert state["step"] == (4 if kill_at == 3 else kill_at)
    assert not (fold / "metrics.json").exists() and not (out / "summary.json").exists()
    assert (fold / "last").is_dir() == (kill_at == 6)             # epoch 1 finished only in the step-6 case

    # Without --resume the folder is refused; with it, training continues from the checkpoint.
    refused = run_cli(args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"fold 0: resumed at epoch {state['epoch']} step {state['step']}/" in resumed.stdout
    assert_same_run(out, baselines[accum])


def test_uninterrupted_runs_differ_by_accumulation(baselines):
    """Sanity check of the comparison itself: different configs give different adapters."""
    wa = load_file(baselines[1] / "fold_0" / "last" / "adapter_model.safetensors")
    wb = load_file(baselines[2] / "fold_0" / "last" / "adapter_model.safetensors")
    assert any(not torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
