"""Experiment tracking, ``train.report_to`` (transformers' names and meaning): every model a run trains (each fold,
distillation's final student, a DAPT run) is one tracked run that gets, per optimizer step, the training loss,
learning rate, gradient norm and rows/s (``train/...``), after each epoch every metric of the held-out evaluation
(``eval/...``), and the resolved config as hyperparameters.

* ``tensorboard`` (the ``track`` extra): event files in ``RUN/logs/<fold>`` (DAPT: ``OUT/logs``), read with
  ``tensorboard --logdir RUN/logs``; the config as text and in the HParams tab.
* ``wandb``: one W&B run per model, grouped by the run folder's name, in the project ``WANDB_PROJECT`` (default
  ``qlora-multilabel``); wandb's own variables apply as wandb reads them (``WANDB_MODE=offline``, ``WANDB_DIR``,
  default ``RUN/logs``).
* ``mlflow``: one MLflow run per model in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default: the run folder's name)
  at ``MLFLOW_TRACKING_URI`` (a server, a database ...; default: the SQLite file ``RUN/logs/mlflow.db``, opened with
  ``mlflow ui --backend-store-uri sqlite:///RUN/logs/mlflow.db``), the config as flat ``section.key`` parameters.

A resumed model goes on where its checkpoint left off: TensorBoard hides the events the interrupted process wrote
after the checkpoint (SummaryWriter's ``purge_step``), W&B and MLflow continue the same run (the ids are kept in
``<logs>/trackers.json``), and MLflow skips the steps it already holds. Only rank 0 tracks. A tracker that fails
while training (a server gone) is dropped with a warning; training goes on. ``curves.png`` does not depend on any of
this (:mod:`train.curves` draws from the fold's own ``log_history``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from pathlib import Path

from core.config import TRACKERS, RunConfig
from core.extras import require_extra, require_package
from core.io import write_json
from train.checkpoint import flat

logger = logging.getLogger(__name__)

LOGS = "logs"
"""The folder of a run's tracker logs (``RUN/logs``; one sub-folder per model)."""
IDS_FILE = "trackers.json"
WANDB_PROJECT = "qlora-multilabel"
MLFLOW_DB = "mlflow.db"
"""MLflow's store when ``MLFLOW_TRACKING_URI`` is unset: ``sqlite:///RUN/logs/mlflow.db`` (MLflow's own default is
``sqlite:///mlflow.db`` in the working folder; the file store is refused by MLflow 3)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked as sys.modules[module] = None
        return False


def resolve(report_to: list[str]) -> list[str]:
    """The trackers ``train.report_to`` names: ``[]`` / ``[none]``: none; ``[all]``: each of
    :data:`core.config.TRACKERS` that is installed (as transformers does)."""
    if not report_to or report_to == ["none"]:
        return []
    if report_to == ["all"]:
        return [n for n in TRACKERS if _installed(n)]
    return list(dict.fromkeys(report_to))


def check(report_to: list[str]) -> list[str]:
    """Call before any model loads: each tracker's package importable, else an :class:`InputError` (exit 2) naming
    what to install (``tensorboard``: the ``track`` extra). Returns the resolved trackers."""
    names = resolve(report_to)
    for name in names:
        if name == "tensorboard":
            require_extra("track", "train.report_to: [tensorboard]", "tensorboard")
        else:
            require_package(name, f"train.report_to: [{name}]")
    return names


def step_row(step: int, loss: float, lr: float, grad_norm: float, rows: int, seconds: float) -> dict:
    """One optimizer step as the fold's ``log_history`` keeps it (the names of transformers' ``log_history``)."""
    return {"step": step, "loss": round(float(loss), 6), "learning_rate": float(lr),
            "grad_norm": round(float(grad_norm), 6), "rows_per_s": round(rows / seconds, 3) if seconds > 0 else None}


def hparams(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as flat ``section.key`` hyperparameters (lists and None as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat(cfg.to_dict()).items()}


class Tracker:
    """The trackers of one model's training (none: every call does nothing)."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    @classmethod
    def start(cls, cfg: RunConfig, run_dir: Path, sub: str, step: int, enabled: bool = True,
              metrics: tuple[str, ...] = ("eval/cascade/exact_match", "eval/cascade/micro_f1")) -> Tracker:
        """The trackers of the model whose logs go to ``run_dir/logs/sub`` (``sub`` empty: ``run_dir/logs``).

        ``step``: the optimizer steps already done (a resumed model goes on from there); ``enabled``: False on the
        ranks other than 0; ``metrics``: the evaluation tags the HParams tab shows beside the config."""
        names = resolve(cfg.train.report_to) if enabled else []
        if not names:
            return cls()
        root = Path(run_dir) / LOGS
        logs = root / sub if sub else root
        logs.mkdir(parents=True, exist_ok=True)
        ids_path = logs / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        group = Path(run_dir).resolve().name
        name = f"{group}/{sub}" if sub else group
        make = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
        backends = []
        for n in names:
            try:
                backends.append(make[n](cfg, root, logs, group, name, step, ids, metrics))
            except Exception as e:  # noqa: BLE001 - a tracker never stops training (a server gone, no login)
                logger.warning(f"warning: {n} did not start ({type(e).__name__}: {e}); {name} trains without it")
        if ids:
            write_json(ids_path, ids)
        if backends:
            logger.info(f"{name}: tracking with {', '.join(b.NAME for b in backends)} (logs in {logs})")
        return cls(backends)

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                logger.warning(f"warning: {b.NAME} failed ({type(e).__name__}: {e}); it is dropped, training goes on")
                self.backends.remove(b)

    def log_step(self, row: dict) -> None:
        """One optimizer step (a :func:`step_row`) as ``train/<name>`` scalars."""
        if self.backends:
            self._each("log", row["step"], {f"train/{k}": v for k, v in row.items() if k != "step" and v is not None})

    def log_eval(self, step: int, metrics: dict) -> None:
        """An evaluation (after an epoch) at optimizer step ``step``: each numeric metric as ``eval/<name>``."""
        scalars = {f"eval/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}
        if self.backends and scalars:
            self._each("log", step, scalars)

    def flush(self) -> None:
        """Write out what is buffered (at each checkpoint: what a resume keeps is on disk)."""
        self._each("flush")

    def close(self) -> None:
        self._each("close")
        self.backends = []


class _TensorBoard:
    NAME = "tensorboard"

    def __init__(self, cfg, root, logs, group, name, step, ids, metrics):
        from torch.utils.tensorboard import SummaryWriter

        # Events of steps after the checkpoint (written before an interruption) are hidden from the reader.
        self.writer = SummaryWriter(str(logs), purge_step=step + 1)
        if step == 0:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            self.writer.add_text("config", "\n".join("    " + line for line in cfg.to_yaml().splitlines()))
            for summary in hparams_summary(hparams(cfg), dict.fromkeys(metrics, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    NAME = "wandb"

    def __init__(self, cfg, root, logs, group, name, step, ids, metrics):
        import wandb

        ids.setdefault("wandb", uuid.uuid4().hex[:12])
        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(root)}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=group, name=name,
                              id=ids["wandb"], resume="allow", config=cfg.to_dict(), **kwargs)

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    NAME = "mlflow"

    def __init__(self, cfg, root, logs, group, name, step, ids, metrics):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / MLFLOW_DB).resolve()}"
        self.client = client = MlflowClient(tracking_uri=uri)
        saved = ids.get("mlflow") or {}
        self.done: dict[str, int] = {}
        if saved.get("tracking_uri") == uri:  # a resumed model: the same run, the steps it holds kept
            self.run_id = saved["run_id"]
            for key in client.get_run(self.run_id).data.metrics:
                self.done[key] = max(m.step for m in client.get_metric_history(self.run_id, key))
            client.update_run(self.run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or group
        found = client.get_experiment_by_name(experiment)
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").resolve().as_uri()
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, local)
        self.run_id = client.create_run(experiment_id, run_name=name, tags={"output_dir": cfg.output_dir}).info.run_id
        ids["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}
        params = [Param(k, str(v)) for k, v in hparams(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in scalars.items() if step > self.done.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
