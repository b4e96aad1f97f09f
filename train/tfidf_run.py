"""The TF-IDF + logistic-regression baseline (the model: :mod:`train.tfidf`) with the same folds as a run: out-of-fold
and test probabilities in the toolkit's probability-file format, ready for ``python -m infer blend`` (an LLM + TF-IDF
blend) or ``evaluate``.

Usage:
    python -m train tfidf --config configs/gemma-3-270m/qlora.yaml --set data.train_csv=train.csv \\
        [--folds RUN/folds.csv] [--test test.csv] --out RUN_TFIDF

The text is the config's prompt (``data.text_template``), so the baseline sees what the LLM sees. Features: word
1-2-grams + character 2-5-grams within word boundaries (sublinear TF, terms in at least 2 rows); one L2 logistic
regression per class. Folds: ``--folds`` (e.g. the LLM run's ``folds.csv``: blends need the same folds), else the
config's (``cv.n_folds``, ``cv.seed`` else ``train.seed``: the split ``python -m train`` makes); ``cv.folds`` fits
only those folds (``oof.csv`` then holds their rows). ``data.train_labels_csv`` sets the labels and rows the fits
learn, as in ``python -m train``; every figure stays on ``data.train_csv``'s labels. Writes into ``--out`` (atomically):
``oof.csv`` (+ .meta.json), ``folds.csv``, ``summary.json`` and, with ``--test``, ``test_probs.csv``.

The cheapest student (distillation, the ``distill`` config section as in ``python -m train distill``)::

    python -m train tfidf --config CFG --folds RUN/folds.csv --teacher RUN[,RUN2] [--teacher-weights 2,1] \
        [--unlabelled unlabelled.csv] [--set distill.alpha=0.5] [--targets-from STUDENT_RUN/teachers] --out OUT

Fold k fits on the targets of the teachers' fold-k models only (the no-leak rule of :mod:`train.distill`), each
regression minimising the same mix as the LLM student (``alpha`` BCE on the labels + ``1 - alpha`` BCE on the
teachers' probabilities; unlabelled rows the soft term only; the hard term is always BCE here). The teachers'
probabilities go to ``OUT/teachers/``; ``--targets-from`` reuses those of a distilled run with the same teachers and
rows (an LLM teacher scoring thousands of rows is the slow part). ``--test`` fits the test model on the fold-averaged
teachers (every teacher fold must be finished).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from core.config import RunConfig
from core.data import read_csv
from core.errors import ConfigError, InputError
from core.io import atomic_dir, versions, write_json, write_probs
from core.metrics import scores
from core.thresholds import ThresholdSpec
from train.data import TrainingLabels, make_folds, read_training_labels
from train.dist import DistEnv
from train.distill import TEACHER_DIR, Distillation
from train.evaluation import evaluate, fold_decoding
from train.tfidf import fit_predict, fit_predict_soft, soft_fit_targets

logger = logging.getLogger(__name__)


def main(cfg: RunConfig, out: str | Path, folds: str | None = None, test: str | None = None, c: float = 4.0,
         targets_from: str | Path | None = None) -> dict:
    """Out-of-fold (and test) probabilities of the baseline; returns the summary written to ``out/summary.json``.

    With ``cfg.distill.teachers`` it is a distilled student (:mod:`train.distill`'s rules: fold k fits on the
    targets of the teachers' fold-k models, plus ``distill.unlabelled_csv``; the test model on the fold-averaged
    teachers' targets of every row); ``targets_from``: a ``teachers/`` folder of an earlier run to reuse."""
    t0 = time.time()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} already holds files; choose another folder")
    if c <= 0:
        raise InputError(f"--C must be > 0, got {c}")
    ds = read_csv(cfg.data.train_csv, cfg.data)
    test_ds = read_csv(test, cfg.data, labelled=False, label_names=ds.label_names) if test else None
    try:
        decode = ThresholdSpec.from_decode(ds.label_names, cfg.decode)
    except ValueError as e:
        raise ConfigError(f"decode.fallback: {e}") from None
    if folds:
        from core.io import read_folds

        fold_of, source = read_folds(folds, ds.path, ds.ids), str(folds)
    else:
        fold_of = make_folds(ds.labels, cfg.cv.n_folds, cfg.split_seed)
        source = f"cv.n_folds={cfg.cv.n_folds}, split seed {cfg.split_seed}"
    uniq = sorted(set(fold_of.tolist()))
    if len(uniq) < 2:
        raise InputError(f"{folds}: needs at least 2 folds, found {uniq}")
    if cfg.cv.folds is not None:  # some folds only (as python -m train does): oof.csv holds their rows
        unknown = sorted(set(cfg.cv.folds) - set(uniq))
        if unknown:
            raise ConfigError(f"cv.folds: fold(s) {unknown} are not in the split ({source}: folds {uniq})")
        uniq = sorted(set(cfg.cv.folds))
    soft = None
    if cfg.distill.teachers:  # a distilled student: validate the teachers before any work
        if test_ds is not None:  # the test model learns from every teacher fold (fold-averaged targets)
            cfg.cv.final = True
        soft = Distillation.read(cfg, ds, fold_of, uniq)
    train_labels = read_training_labels(cfg.data, ds)  # data.train_labels_csv; scored on data.train_csv's labels
    logger.info(f"tfidf: {len(ds.ids)} rows x {len(ds.label_names)} classes from {ds.path}; {len(uniq)} folds "
                f"({source})" + (f"; distilled from {len(soft.teachers)} teacher(s), alpha {cfg.distill.alpha}, "
                                 f"{soft.n_unlabelled} unlabelled rows" if soft else ""))
    if train_labels is not None:
        logger.info(train_labels.log_line(ds.path))
    with atomic_dir(out) as tmp:
        summary = _fit_folds(cfg, tmp, ds, test_ds, fold_of, uniq, source, decode, c, soft, targets_from,
                             train_labels)
        summary["seconds"] = round(time.time() - t0, 1)
        write_json(tmp / "summary.json", summary)
    metrics = summary["oof_metrics"]
    logger.info(f"out of fold: exact match {metrics['t0.5/exact_match']:.4f} @0.5, "
                f"{metrics['cascade/exact_match']:.4f} cascade; micro-F1 {metrics['cascade/micro_f1']:.4f} cascade")
    logger.info(f"wrote {out} ({summary['seconds']} s)")
    return summary


def _fit_folds(cfg, tmp: Path, ds, test_ds, fold_of, uniq, source, decode, c, soft: Distillation | None,
               targets_from, train_labels: TrainingLabels | None) -> dict:
    """The fold fits (and the test fit) of :func:`main`, written into ``tmp``; returns the summary. The fits learn
    ``train_labels``' labels on its rows (``data.train_labels_csv``), every score is on ``ds.labels``."""
    texts = np.asarray(ds.texts, dtype=object)
    labels = ds.labels if train_labels is None else train_labels.labels    # what the fits learn
    trained = np.ones(len(ds.ids), dtype=bool) if train_labels is None else train_labels.trained
    targets, extra = {}, {}
    if soft:
        if targets_from:
            soft.copy_cached(targets_from, tmp / TEACHER_DIR)
        targets = soft.fold_targets(tmp, uniq, DistEnv())
        texts_all = np.concatenate([texts, np.asarray(soft.unlabelled.texts, dtype=object)]) \
            if soft.n_unlabelled else texts
        labels_all, keep = soft.labels_all.copy(), np.ones(len(soft.labels_all), dtype=bool)
        labels_all[:len(ds.ids)], keep[:len(ds.ids)] = labels, trained  # the labelled rows come first
        extra = {"distill": soft.provenance(uniq, tmp)}
    oof = np.zeros(ds.labels.shape)
    pred_sets = np.zeros(ds.labels.shape, dtype=np.int8) if cfg.decode.strategy == "sets" else None
    per_fold = []
    for f in tqdm(uniq, desc="tfidf folds", file=sys.stderr, leave=False):
        val = fold_of == f
        if soft:
            st = targets[f]
            rows = np.flatnonzero(~np.isnan(st.soft[:, 0]) & keep)  # the fold's training rows + the unlabelled rows
            t, w = soft_fit_targets(labels_all[rows], st.soft[rows], st.labelled[rows], st.alpha)
            oof[val] = fit_predict_soft(texts_all[rows], t, w, texts[val], c, cfg.train.seed)
        else:
            fit = ~val & trained
            oof[val] = fit_predict(texts[fit], labels[fit], texts[val], c, cfg.train.seed)
        fold_decode = fold_decoding(cfg, decode, labels, np.flatnonzero(~val & trained))  # priors: the fold's fit rows
        if pred_sets is not None:
            pred_sets[val] = fold_decode.decode(oof[val])
        per_fold.append({"fold": int(f), "rows": int(val.sum()), **evaluate(oof[val], ds.labels[val], fold_decode)})
        logger.info(f"fold {f}: exact match {per_fold[-1]['t0.5/exact_match']:.4f} @0.5, "
                    f"{per_fold[-1]['cascade/exact_match']:.4f} cascade")
    done = np.isin(fold_of, uniq)
    metrics = evaluate(oof[done], ds.labels[done], decode)
    if pred_sets is not None:
        metrics.update({f"sets/{k}": v for k, v in scores(ds.labels[done], pred_sets[done]).items()})
    meta = {"kind": "out-of-fold", "produced_by": "python -m train tfidf", "model": "tfidf word 1-2 + char_wb 2-5, "
            f"logistic regression C={c}", "train_csv": ds.path, "folds_source": source, "versions": versions(),
            "config": cfg.to_dict(), **extra}  # config: infer tune / evaluate / blend read its decode section
    summary = {**meta, "C": c, "rows": int(done.sum()), "folds": uniq, "oof_metrics": metrics, "per_fold": per_fold,
               **({"train_labels": train_labels.describe()} if train_labels is not None else {})}
    write_probs(tmp / "oof.csv", ds.ids[done], oof[done], ds.label_names, meta=meta, id_column=cfg.data.id_column)
    pd.DataFrame({"index": ds.ids, "fold": fold_of}).to_csv(tmp / "folds.csv", index=False)
    if test_ds is not None:
        if soft:
            st = soft.final_targets(tmp, DistEnv())
            t, w = soft_fit_targets(labels_all[keep], st.soft[keep], st.labelled[keep], st.alpha)
            probs = fit_predict_soft(texts_all[keep], t, w, test_ds.texts, c, cfg.train.seed)
        else:
            probs = fit_predict(texts[trained], labels[trained], test_ds.texts, c, cfg.train.seed)
        write_probs(tmp / "test_probs.csv", test_ds.ids, probs, ds.label_names,
                    meta={**meta, "kind": "test", "test_csv": test_ds.path}, id_column=cfg.data.id_column)
    return summary
