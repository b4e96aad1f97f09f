"""Cross-validated training: validate everything, then fold by fold fit -> save adapters -> out-of-fold probabilities."""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.adapter import save_adapter
from core.config import ConfigError, RunConfig
from core.data import read_csv, read_label_descriptions, tokenize
from core.io import OPTIMISTIC_KEY, InputError, keep_best_reason, versions, write_json, write_probs, write_text
from core.metrics import scores
from core.model import load_classifier, load_tokenizer, resolve_model_path
from core.thresholds import ThresholdSpec, threshold
from train import checkpoint
from train.data import make_folds
from train.engine import Callbacks
from train.loop import device_map_for, fit_fold, fold_decoding, setup_dist, write_fold_metrics
from train.lora import apply_lora, count_parameters

LAUNCH_FILE = "launch.json"
"""How the run was launched (world size): a resume must use the same."""


def log(msg: str) -> None:
    print(msg, flush=True)


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


# Keys added after classification checkpoints existed (DAPT's fingerprint has always held decode.strategy).
LATER_DEFAULTS = {**checkpoint.LATER_DEFAULTS, "decode.strategy": "cascade"}


def run_fingerprint(cfg: RunConfig) -> str:
    """What every checkpoint of this run must agree on: the settings a resume may not change."""
    return checkpoint.fingerprint(checkpoint.result_settings(cfg.to_dict(), later=LATER_DEFAULTS))


class BackgroundPush:
    """Hub checkpoint pushes on a worker thread, so a slow upload cannot stall the ranks past their collective
    timeout. A push asked for while one is still running is skipped (the next one carries the newer state); a
    failed push is reported by :func:`core.hub.push_checkpoint` and training goes on; :meth:`close` waits for the
    last one."""

    def __init__(self, push, log=print):
        from concurrent.futures import ThreadPoolExecutor

        self._push, self._log = push, log
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._running = None

    def __call__(self) -> bool:
        if self._running is not None and not self._running.done():
            self._log("hub: the previous checkpoint push is still running; this one is skipped")
            return False
        self._running = self._pool.submit(self._guarded)
        return True

    def _guarded(self):
        try:
            return self._push()
        except Exception as e:  # noqa: BLE001 - never let an upload kill training
            self._log(f"warning: checkpoint push failed ({type(e).__name__}: {e}); training goes on")
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def main(cfg: RunConfig, resume: bool = False, callbacks: Callbacks | None = None) -> dict:
    """Train every configured fold; returns the run summary (also written to ``output_dir/summary.json``).

    An input error found after the output folder was created (e.g. ``lora.target_modules`` not in the model)
    removes the folder again if this call created it and no fold finished, so that fixing the input and running
    the same command again works without ``--resume``.
    """
    run_dir = Path(cfg.output_dir)
    existed = run_dir.exists()
    try:
        return _main(cfg, resume, callbacks)
    except (ConfigError, InputError):
        if not existed and run_dir.is_dir() and not any(run_dir.glob("fold_*/metrics.json")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _main(cfg: RunConfig, resume: bool, callbacks: Callbacks | None = None) -> dict:
    t_start = time.time()
    env = setup_dist(cfg.train.parallel)
    # 1. Validate inputs before anything is written.
    ds = read_csv(cfg.data.train_csv, cfg.data)
    label_names = ds.label_names
    if cfg.model.num_labels is not None and cfg.model.num_labels != len(label_names):
        raise ConfigError(f"model.num_labels={cfg.model.num_labels} but {ds.path} has {len(label_names)} label "
                          f"columns ({label_names[0]} .. {label_names[-1]})")
    try:
        decode = ThresholdSpec.from_decode(label_names, cfg.decode)
    except ValueError as e:
        raise ConfigError(f"decode.fallback: {e}") from None
    descriptions = read_label_descriptions(cfg.data.label_names_csv, label_names)
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume, label_names)
    allowed = check_resume(run_dir, cfg, env.world_size) if resume else []
    env.barrier()  # DDP: every rank checks output_dir before rank 0 creates it
    model_path = resolve_model_path(cfg.model, log=log if env.is_main else (lambda m: None))
    tokenizer = load_tokenizer(model_path)
    token_ids = tokenize(ds.texts, tokenizer, cfg.data.max_length)
    fold_of_row = make_folds(ds.labels, cfg.cv.n_folds, cfg.split_seed)
    folds = cfg.cv.folds if cfg.cv.folds is not None else list(range(cfg.cv.n_folds))
    lengths = np.array([len(t) for t in token_ids])
    teachers, unl = None, None
    if cfg.distill.teachers:  # distillation: validate the teachers (folds, labels, fold models) before writing
        from train import distill

        teachers = distill.read_teachers(cfg, ds, fold_of_row, folds)
        unl = distill.read_unlabelled(cfg, ds)
    if env.is_main:
        if cfg.data.label_columns is None and cfg.data.label_prefix is None:
            log(f"label columns detected (only 0/1 values; set data.label_columns to choose): {label_names}")
        log(f"data: {len(ds.ids)} rows x {len(label_names)} labels from {ds.path}; tokens median "
            f"{int(np.median(lengths))}, max {lengths.max()} (max_length {cfg.data.max_length}); "
            f"folds {folds} of {cfg.cv.n_folds}; world size {env.world_size} on {env.device}")
        log(cfg.to_yaml())

    # 2. The run folder: config, labels and fold assignment first, so a resumed run can check them.
    if env.is_main:
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
            log(f"resume: allowed changes (recorded in resume_log.json): {checkpoint.describe(allowed)}")
            record_resume(run_dir, allowed)
        write_text(run_dir / "run_config.yaml", cfg.to_yaml())
        write_json(run_dir / LAUNCH_FILE, {"world_size": env.world_size})
        write_json(run_dir / "label_names.json", {"label_names": label_names, "descriptions": descriptions})
    env.barrier()
    push = None
    if cfg.hub.push_checkpoints_to and env.is_main:  # Kaggle's 12-hour limit: the next session resumes from the Hub
        from core.hub import push_checkpoint

        push = BackgroundPush(lambda: push_checkpoint(run_dir, cfg.hub.push_checkpoints_to, private=cfg.hub.private),
                              log=log)
    fingerprint = run_fingerprint(cfg)
    # The rows fit_fold trains on: the labelled rows, then (distillation) the unlabelled ones in no fold (-1).
    train_ids, train_labels, train_folds, targets, extra = token_ids, ds.labels, fold_of_row, {}, {}
    if teachers is not None:
        pending = [f for f in folds if not (run_dir / f"fold_{f}" / "metrics.json").is_file()]
        targets = distill.prepare_targets(cfg, run_dir, teachers, ds, unl, fold_of_row, pending, env, log=log)
        n_unl = 0 if unl is None else len(unl.ids)
        if n_unl:
            train_ids = token_ids + tokenize(unl.texts, tokenizer, cfg.data.max_length)
            train_labels = np.concatenate([ds.labels, np.zeros((n_unl, len(label_names)), ds.labels.dtype)])
            train_folds = np.concatenate([fold_of_row, np.full(n_unl, -1)])
        extra = {"distill": distill.provenance(cfg, teachers, folds, n_unl, run_dir if env.is_main else None)}

    def fit(fold: int, fold_dir: Path, rows_ids, rows_labels, rows_folds, fold_targets) -> dict:
        """Train one fold (or the final student: ``rows_folds`` all -1, no validation rows) into ``fold_dir``."""
        fold_dir.mkdir(parents=True, exist_ok=True)
        what = f"fold {fold}" if fold < cfg.cv.n_folds else "final student"
        device_map, max_memory = device_map_for(cfg, env)
        model, tok, dtype = load_classifier(model_path, len(label_names), cfg.model, cfg.quantization, env.device,
                                            device_map=device_map, seed=cfg.train.seed + fold, max_memory=max_memory)
        model = apply_lora(model, cfg.lora, cfg.train.grad_checkpointing)
        params = count_parameters(model)
        if env.is_main:
            log(f"{what}: {params['trainable']:,} trainable of {params['total']:,} parameters, "
                f"dtype {str(dtype).removeprefix('torch.')}")

        def saver(m, folder, more, _tok=tok):
            save_adapter(m, _tok, folder, cfg, label_names, descriptions, {**extra, **more, "parameters": params})

        res = fit_fold(cfg, fold, model, tok, dtype, rows_ids, rows_labels, rows_folds, fold_dir, env, saver,
                       log=log, decode=decode, fingerprint=fingerprint, callbacks=callbacks, push=push,
                       targets=fold_targets)
        if env.is_main:
            write_fold_metrics(fold_dir, res)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return res

    results = []
    for fold in folds:
        fold_dir = run_dir / f"fold_{fold}"
        if (fold_dir / "metrics.json").is_file():
            res = json.loads((fold_dir / "metrics.json").read_text())
            res["val_index"] = np.flatnonzero(fold_of_row == fold)
            res["probs"] = np.load(fold_dir / f"val_probs_{cfg.train.keep}.npy")
            log(f"fold {fold}: already done, skipped")
            results.append(res)
            continue
        results.append(fit(fold, fold_dir, train_ids, train_labels, train_folds, targets.get(fold)))

    if teachers is not None and cfg.distill.final:  # the submission student: every row, fold-averaged teachers
        final_dir = run_dir / distill.FINAL_DIR
        if (final_dir / "metrics.json").is_file():
            log("final student: already done, skipped")
        else:
            soft = distill.prepare_final_targets(cfg, run_dir, teachers, ds, unl, fold_of_row, env, log=log)
            fit(cfg.cv.n_folds, final_dir, train_ids, train_labels, np.full(len(train_ids), -1), soft)
        extra = {**extra, "final": {"adapter": str(final_dir / "last"), "rows_labelled": len(ds.ids),
                                    "rows_unlabelled": 0 if unl is None else len(unl.ids),
                                    "targets": "each teacher's fold models averaged (teachers/t{j}_final.csv)"}}

    if push is not None:
        push.close()
    summary = {}
    if env.is_main:
        summary = write_summary(cfg, run_dir, ds, label_names, results, time.time() - t_start, decode, extra)
    env.barrier()
    if env.world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def write_summary(cfg: RunConfig, run_dir: Path, ds, label_names: list[str], results: list[dict],
                  seconds: float, decode: ThresholdSpec, extra: dict | None = None) -> dict:
    """Out-of-fold probabilities of the trained folds + a summary JSON (metrics, throughput, provenance)."""
    idx = np.concatenate([r["val_index"] for r in results])
    probs = np.concatenate([np.asarray(r["probs"]) for r in results])
    order = np.argsort(idx)
    idx, probs = idx[order], probs[order]
    folds = [r["fold"] for r in results]
    optimistic = keep_best_reason(cfg.train.keep)
    meta = {"kind": "out-of-fold probabilities", "folds": folds, "adapter": cfg.train.keep,
            "config": cfg.to_dict(), "source": ds.path, **({OPTIMISTIC_KEY: optimistic} if optimistic else {})}
    write_probs(run_dir / "oof.csv", ds.ids[idx], probs, label_names, meta=meta)
    y = ds.labels[idx]
    oof = {f"t0.5/{k}": v for k, v in scores(y, threshold(probs, 0.5)).items()}
    oof.update({f"cascade/{k}": v for k, v in scores(y, decode.decode(probs)).items()})
    if cfg.decode.strategy == "sets":  # each fold's rows with its own decoder (priors from its training rows)
        pred = np.zeros(probs.shape, dtype=np.int8)
        for r in results:
            val = np.asarray(r["val_index"])
            rows = np.searchsorted(idx, val)  # idx: the sorted, distinct out-of-fold rows
            train_rows = np.setdiff1d(np.arange(len(ds.labels)), val)
            pred[rows] = fold_decoding(cfg, decode, ds.labels, train_rows).decode(probs[rows])
        oof.update({f"sets/{k}": v for k, v in scores(y, pred).items()})
    per_fold = [r["history"][-1] if cfg.train.keep == "last" else r["best"] for r in results]
    keys = [k for k in per_fold[0] if "/" in k]
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in keys}
    samples = sum(r["samples"] for r in results)
    secs = sum(r["train_seconds"] for r in results)
    real, padded = sum(r["real_tokens"] for r in results), sum(r["padded_tokens"] for r in results)
    summary = {
        "folds": folds, "rows": len(idx), "oof_metrics": oof, "mean_fold_metrics": mean,
        "per_fold": [{"fold": r["fold"], **m} for r, m in zip(results, per_fold)],
        "throughput": {"train_samples": samples, "train_seconds": round(secs, 2),
                       "samples_per_s": round(samples / secs, 2) if secs else None,
                       "padding_fraction": round(1 - real / padded, 4) if padded else None},
        "wall_seconds": round(seconds, 1), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else "cpu", "config": cfg.to_dict(), "label_names": label_names, "versions": versions(), **(extra or {}),
        **({OPTIMISTIC_KEY: optimistic} if optimistic else {}),
    }
    write_json(run_dir / "summary.json", summary)
    log("out-of-fold (" + ", ".join(map(str, folds)) + f"), {len(idx)} rows: exact-match "
        f"{oof['t0.5/exact_match']:.4f} @0.5, {oof['cascade/exact_match']:.4f} cascade"
        + (f", {oof['sets/exact_match']:.4f} sets" if "sets/exact_match" in oof else "") + "; micro-F1 "
        f"{oof['t0.5/micro_f1']:.4f} @0.5, {oof['cascade/micro_f1']:.4f} cascade")
    if optimistic:
        log(f"note: {optimistic}; for an honest estimate train with train.keep=last")
    log(f"wrote {run_dir / 'oof.csv'} and {run_dir / 'summary.json'}")
    return summary

