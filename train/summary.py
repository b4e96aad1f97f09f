"""The summary of a cross-validation run: the out-of-fold probabilities of its trained folds (``oof.csv``) and
``summary.json`` (metrics, throughput, provenance), written by :func:`train.run.train_cv` when its folds are done."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.data import Dataset
from core.io import OPTIMISTIC_KEY, keep_best_reason, versions, write_json, write_probs
from core.metrics import scores
from core.thresholds import ThresholdSpec, threshold
from train.evaluation import fold_decoding

logger = logging.getLogger(__name__)


def write_summary(cfg: RunConfig, run_dir: Path, ds: Dataset, label_names: list[str], results: list,
                  seconds: float, decode: ThresholdSpec, extra: dict | None = None,
                  trained_on=None) -> dict:
    """Out-of-fold probabilities of the trained folds + a summary JSON (metrics, throughput, provenance), scored on
    ``ds``'s labels. ``results``: the folds' :class:`train.run.FoldResult`; ``trained_on``: the rows the folds trained
    on (:class:`train.run.Rows`, set decoding's priors); None: all of ``ds``. (Typed loosely: train.run imports this
    module, not the other way round.)"""
    idx = np.concatenate([r.val_index for r in results])
    probs = np.concatenate([np.asarray(r.probs) for r in results])
    order = np.argsort(idx)
    idx, probs = idx[order], probs[order]
    folds = [r.fold for r in results]
    optimistic = keep_best_reason(cfg.train.keep)
    meta = {"kind": "out-of-fold probabilities", "folds": folds, "adapter": cfg.train.keep,
            "config": cfg.to_dict(), "source": ds.path, **({OPTIMISTIC_KEY: optimistic} if optimistic else {})}
    write_probs(run_dir / "oof.csv", ds.ids[idx], probs, label_names, meta=meta)
    y = ds.labels[idx]
    oof = {f"t0.5/{k}": v for k, v in scores(y, threshold(probs, 0.5)).items()}
    oof.update({f"cascade/{k}": v for k, v in scores(y, decode.decode(probs)).items()})
    if cfg.decode.strategy == "sets":  # each fold's rows with its own decoder (priors from its training rows)
        n = len(ds.labels)
        train_y, trained = (ds.labels, np.arange(n)) if trained_on is None else \
            (trained_on.labels[:n], np.flatnonzero(trained_on.trained[:n]))
        pred = np.zeros(probs.shape, dtype=np.int8)
        for r in results:
            val = np.asarray(r.val_index)
            rows = np.searchsorted(idx, val)  # idx: the sorted, distinct out-of-fold rows
            train_rows = np.setdiff1d(trained, val)
            pred[rows] = fold_decoding(cfg, decode, train_y, train_rows).decode(probs[rows])
        oof.update({f"sets/{k}": v for k, v in scores(y, pred).items()})
    per_fold = [r.history[-1] if cfg.train.keep == "last" else r.best for r in results]
    keys = [k for k in per_fold[0] if "/" in k]
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in keys}
    samples = sum(r.samples for r in results)
    secs = sum(r.train_seconds for r in results)
    real, padded = sum(r.real_tokens for r in results), sum(r.padded_tokens for r in results)
    summary = {
        "folds": folds, "rows": len(idx), "oof_metrics": oof, "mean_fold_metrics": mean,
        "per_fold": [{"fold": r.fold, **m} for r, m in zip(results, per_fold)],
        "throughput": {"train_samples": samples, "train_seconds": round(secs, 2),
                       "samples_per_s": round(samples / secs, 2) if secs else None,
                       "padding_fraction": round(1 - real / padded, 4) if padded else None},
        "wall_seconds": round(seconds, 1), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else "cpu", "config": cfg.to_dict(), "label_names": label_names, "versions": versions(), **(extra or {}),
        **({OPTIMISTIC_KEY: optimistic} if optimistic else {}),
    }
    write_json(run_dir / "summary.json", summary)
    logger.info("out-of-fold (" + ", ".join(map(str, folds)) + f"), {len(idx)} rows: exact-match "
                f"{oof['t0.5/exact_match']:.4f} @0.5, {oof['cascade/exact_match']:.4f} cascade"
                + (f", {oof['sets/exact_match']:.4f} sets" if "sets/exact_match" in oof else "") + "; micro-F1 "
                f"{oof['t0.5/micro_f1']:.4f} @0.5, {oof['cascade/micro_f1']:.4f} cascade")
    if optimistic:
        logger.info(f"note: {optimistic}; for an honest estimate train with train.keep=last")
    logger.info(f"wrote {run_dir / 'oof.csv'} and {run_dir / 'summary.json'}")
    return summary
