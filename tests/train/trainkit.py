"""Helpers for the train tests: tiny-run configs, CLI runs, CSV edits (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import SAMPLE_DATA, SAMPLE_DECODE

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TRAIN = ROOT / "data" / "sample_train.csv"


def write_rows(path: Path, n: int | None = None, source: Path = SAMPLE_TRAIN, **edits) -> Path:
    """Write the first ``n`` rows of ``source`` to ``path``; ``edits`` maps column -> list/callable of new values."""
    df = pd.read_csv(source)
    if n is not None:
        df = df.head(n).copy()
    for col, value in edits.items():
        df[col] = value(df) if callable(value) else value
    df.to_csv(path, index=False)
    return path


def tiny_overrides(model_dir: Path, train_csv: Path, output_dir: Path, **extra) -> dict:
    """Raw config dict for a fast CPU run on a tiny model (fold 0 of 3, 2 epochs, micro-batch 8)."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train_csv": str(train_csv), "max_length": 64, **SAMPLE_DATA},
        "decode": dict(SAMPLE_DECODE),
        "train": {"num_epochs": 2, "lr": 5e-3, "micro_batch_size": 8, "eval_batch_size": 16, "save_every_steps": 0,
                  "warmup_ratio": 0.0},
        "cv": {"n_folds": 3, "folds": [0]},
        "output_dir": str(output_dir),
    }
    for dotted, value in extra.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def tiny_config_for(model_dir: Path, train_csv: Path, output_dir: Path, **extra):
    """A validated RunConfig for :func:`tiny_overrides` (``section__key=value`` keyword overrides)."""
    from core.config import RunConfig

    return RunConfig.from_dict(tiny_overrides(model_dir, train_csv, output_dir, **extra))


def as_set_args(raw: dict, prefix: str = "") -> list[str]:
    """A raw config dict -> ``--set key=value`` CLI arguments."""
    out = []
    for k, v in raw.items():
        if isinstance(v, dict):
            out += as_set_args(v, prefix + k + ".")
        else:
            out += ["--set", f"{prefix}{k}={json.dumps(v)}"]
    return out


def kill_at_launcher(step: int) -> list[str]:
    """A ``run_cli`` launcher: ``python -m train`` killed (exit 137) after its first checkpoint at step >= ``step``."""
    return [sys.executable, str(Path(__file__).with_name("kill_at.py")), str(step)]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300, module: str = "train",
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m train ARGS`` (or a launcher such as torchrun) from the repo root; output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable, "-m"]) + [module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)


class Killed(Exception):
    """Raised by :func:`kill_at`: the in-process stand-in for a killed training."""


def kill_at(step: int):
    """Callbacks that stop a (not resumed) run right after its checkpoint at optimizer step ``step``."""
    from train.callbacks import Callbacks

    def on_checkpoint(progress, resumed):
        if not resumed and progress.step == step:
            raise Killed

    return Callbacks(on_checkpoint=[on_checkpoint])
