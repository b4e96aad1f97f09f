"""The run folder of cross-validated training (``output_dir``): when it may be used, what a resume may change, the
files a resumed run checks (config, labels, fold assignment, world size) or keeps (compute dtype), where the final
model goes, and the Hub pushes of its checkpoints."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import RunConfig
from core.data import Dataset
from core.errors import ConfigError, InputError
from core.io import write_json, write_text
from train import checkpoint

logger = logging.getLogger(__name__)

LAUNCH_FILE = "launch.json"
"""How the run was launched: the world size (a resume must use the same) and the compute dtype ``model.dtype``
resolved to (a resume keeps it)."""

# Keys added after classification checkpoints existed (DAPT's fingerprint has always held decode.strategy).
LATER_DEFAULTS = {**checkpoint.LATER_DEFAULTS, "decode.strategy": "cascade", "data.train_labels_csv": None}


def check_run_dir(run_dir: Path, resume: bool, label_names: list[str]) -> None:
    """Refuse to mix runs: a used output_dir needs --resume, and a resumed run must have the same labels."""
    used = run_dir.exists() and any(run_dir.iterdir())
    if used and not resume:
        raise InputError(f"output_dir {run_dir} already holds a run; pass --resume to continue it, "
                         f"or choose another with --set output_dir=...")
    if resume and (run_dir / "label_names.json").is_file():
        saved = json.loads((run_dir / "label_names.json").read_text())["label_names"]
        if saved != label_names:
            raise InputError(f"{run_dir / 'label_names.json'}: the run was trained on {len(saved)} labels "
                             f"({saved[:3]}...), the data has {len(label_names)} ({label_names[:3]}...)")


def launch_info(cfg: RunConfig, env, run_dir: Path, resume: bool) -> dict:
    """What :data:`LAUNCH_FILE` records: the world size and the compute dtype (:func:`train.checkpoint.kept_dtype`:
    a resumed run keeps the dtype it started with)."""
    launch_file = run_dir / LAUNCH_FILE
    saved = json.loads(launch_file.read_text()) if resume and launch_file.is_file() else None
    dtype = checkpoint.kept_dtype(cfg.model, env.device, saved)
    return {"world_size": env.world_size, "dtype": dtype}


def check_resume(run_dir: Path, cfg: RunConfig, world_size: int) -> list:
    """A resumed run must compute what the run in ``run_dir`` computes: refuse every changed setting that changes the
    result (naming each, old -> new); return the allowed changes (:data:`train.checkpoint.RESUME_FREE`)."""
    saved_path = run_dir / "run_config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = RunConfig.from_yaml(saved_path).to_dict()
    except ConfigError as e:
        raise InputError(f"cannot --resume: {e}") from None
    refused, allowed = checkpoint.changes(saved, cfg.to_dict())
    launch = run_dir / LAUNCH_FILE
    if launch.is_file():
        was = json.loads(launch.read_text()).get("world_size")
        if was != world_size:
            refused.append(("world size", was, world_size))
    if refused:
        raise InputError(f"{run_dir}: cannot --resume: these settings change what the run computes: "
                         f"{checkpoint.describe(refused)} (put them back, or start a new run with "
                         f"--set output_dir=...)")
    return allowed


def record_resume(run_dir: Path, allowed: list) -> None:
    """Append the allowed changes of a resume to ``run_dir/resume_log.json``."""
    path = run_dir / "resume_log.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "changed": {k: {"old": old, "new": new} for k, old, new in allowed}})
    write_json(path, entries)


def run_fingerprint(cfg: RunConfig) -> str:
    """What every checkpoint of this run must agree on: the settings a resume may not change."""
    return checkpoint.fingerprint(checkpoint.result_settings(cfg.to_dict(), later=LATER_DEFAULTS))


def write_run_files(run_dir: Path, cfg: RunConfig, ds: Dataset, fold_of_row: np.ndarray, descriptions: dict,
                    allowed: list, launch: dict) -> None:
    """The files a resumed run checks, written before the first fold trains: the fold assignment (``folds.csv``;
    a resume refuses other data or cv settings), the config, the launch (world size) and the labels; the allowed
    changes of a resume go to ``resume_log.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    folds_csv = run_dir / "folds.csv"
    if folds_csv.is_file():
        saved = pd.read_csv(folds_csv)
        if not (np.array_equal(saved["fold"].to_numpy(), fold_of_row)
                and np.array_equal(saved["index"].astype(str).to_numpy(), ds.ids.astype(str))):
            raise InputError(f"{folds_csv}: the data or cv settings changed since this run started")
    else:
        with_folds = pd.DataFrame({"index": ds.ids, "fold": fold_of_row})
        write_text(folds_csv, with_folds.to_csv(index=False))
    if allowed:
        logger.info(f"resume: allowed changes (recorded in resume_log.json): {checkpoint.describe(allowed)}")
        record_resume(run_dir, allowed)
    write_text(run_dir / "run_config.yaml", cfg.to_yaml())
    write_json(run_dir / LAUNCH_FILE, launch)
    write_json(run_dir / "label_names.json", {"label_names": ds.label_names, "descriptions": descriptions})


class BackgroundPush:
    """Hub checkpoint pushes on a worker thread, so a slow upload cannot stall the ranks past their collective
    timeout. A push asked for while one is still running is skipped (the next one carries the newer state); a
    failed push is reported by :func:`core.hub.push_checkpoint` and training goes on; :meth:`close` waits for the
    last one."""

    def __init__(self, push):
        from concurrent.futures import ThreadPoolExecutor

        self._push = push
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._running = None

    def __call__(self) -> bool:
        if self._running is not None and not self._running.done():
            logger.info("hub: the previous checkpoint push is still running; this one is skipped")
            return False
        self._running = self._pool.submit(self._guarded)
        return True

    def _guarded(self):
        try:
            return self._push()
        except Exception as e:  # noqa: BLE001 - never let an upload kill training
            logger.warning(f"warning: checkpoint push failed ({type(e).__name__}: {e}); training goes on")
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=True)
