"""A TF-IDF + logistic-regression baseline with the same folds as a run: out-of-fold and test probabilities in the
toolkit's probability-file format, ready for ``python -m infer blend`` (an LLM + TF-IDF blend) or ``evaluate``.

Usage:
    python -m train tfidf --config configs/gemma-3-270m/qlora.yaml --set data.train_csv=train.csv \\
        [--folds RUN/folds.csv] [--test test.csv] --out RUN_TFIDF

The text is the config's prompt (``data.text_template``), so the baseline sees what the LLM sees. Features: word
1-2-grams + character 2-5-grams within word boundaries (sublinear TF, terms in at least 2 rows); one L2 logistic
regression per class. Folds: ``--folds`` (e.g. the LLM run's ``folds.csv``: blends need the same folds), else the
config's (``cv.n_folds``, ``cv.seed`` else ``train.seed``: the split ``python -m train`` makes); ``cv.folds`` fits
only those folds (``oof.csv`` then holds their rows). Writes into ``--out`` (atomically):
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

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from core.config import ConfigError, RunConfig, add_config_arguments
from core.data import read_csv
from core.io import InputError, atomic_dir, versions, write_json, write_probs
from core.metrics import scores
from core.thresholds import ThresholdSpec
from train import distill
from train.data import make_folds
from train.distill import add_teacher_arguments, teacher_overrides
from train.loop import DistEnv, evaluate, fold_decoding


def build_model(c: float = 4.0, seed: int = 0):
    """TF-IDF word + char n-grams -> one-vs-rest logistic regression (scikit-learn pipeline)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, lowercase=True))
    return make_pipeline(features, OneVsRestClassifier(LogisticRegression(C=c, max_iter=1000, random_state=seed)))


def fit_predict(train_texts, train_labels: np.ndarray, texts, c: float, seed: int) -> np.ndarray:
    """Fit on the training rows, return probabilities (rows x classes) for ``texts``.

    A class that is constant in the training rows (a rare class absent from a fold) gets that constant.
    """
    labels = np.asarray(train_labels)
    probs = np.zeros((len(texts), labels.shape[1]))
    varying = np.flatnonzero(labels.min(axis=0) != labels.max(axis=0))
    probs[:, labels.min(axis=0) == 1] = 1.0
    if len(varying):
        model = build_model(c, seed).fit(list(train_texts), labels[:, varying])
        probs[:, varying] = model.predict_proba(list(texts))
    return probs


def soft_fit_targets(labels: np.ndarray, soft: np.ndarray, labelled: np.ndarray,
                     alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row regression target and weight equal to the distillation loss (:func:`train.loss.distill_loss` with a
    plain BCE hard term): BCE is linear in its target, so ``alpha`` BCE(hard) + ``(1 - alpha)`` BCE(soft) on a
    labelled row is BCE against ``alpha * y + (1 - alpha) * s``; an unlabelled row has the soft term only, weight
    ``1 - alpha``. Returns (targets rows x classes, weights rows)."""
    labelled = np.asarray(labelled, dtype=bool)
    y = np.where(labelled[:, None], np.asarray(labels, dtype=np.float64), 0.0)
    s = np.asarray(soft, dtype=np.float64)
    targets = np.where(labelled[:, None], alpha * y + (1 - alpha) * s, s)
    weights = np.where(labelled, 1.0, 1.0 - alpha)
    return targets, weights


def fit_predict_soft(train_texts, targets: np.ndarray, weights: np.ndarray, texts, c: float,
                     seed: int) -> np.ndarray:
    """:func:`fit_predict` with probabilistic targets (distillation): the same features, one L2 logistic regression
    per class minimising the weighted BCE against ``targets`` in [0, 1] (each row enters twice, as a positive with
    weight ``w * t`` and as a negative with weight ``w * (1 - t)``: the same objective, scikit-learn's solver). With
    0/1 targets and unit weights it is the hard-label fit. A class whose targets are constant gets that constant."""
    from scipy.sparse import vstack
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression

    t = np.clip(np.asarray(targets, dtype=np.float64), 0.0, 1.0)
    w = np.asarray(weights, dtype=np.float64)
    features = build_model(c, seed).steps[0][1]
    x = features.fit_transform(list(train_texts))
    x_new = features.transform(list(texts))
    x2 = vstack([x, x]).tocsr()
    y2 = np.concatenate([np.ones(len(t)), np.zeros(len(t))])
    probs = np.zeros((len(texts), t.shape[1]))
    base = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    for j in range(t.shape[1]):
        sw = np.concatenate([w * t[:, j], w * (1 - t[:, j])])
        pos, neg = sw[:len(t)].sum(), sw[len(t):].sum()
        if pos <= 0 or neg <= 0:  # constant target: nothing to fit
            probs[:, j] = float(pos > 0)
            continue
        keep = sw > 0
        probs[:, j] = clone(base).fit(x2[keep], y2[keep], sample_weight=sw[keep]).predict_proba(x_new)[:, 1]
    return probs


def run(cfg: RunConfig, out: str | Path, folds: str | None = None, test: str | None = None, c: float = 4.0,
        log=print, targets_from: str | Path | None = None) -> dict:
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
    teachers, unl = None, None
    if cfg.distill.teachers:  # a distilled student: validate the teachers before any work
        if test_ds is not None:  # the test model learns from every teacher fold (fold-averaged targets)
            cfg.distill.final = True
        teachers = distill.read_teachers(cfg, ds, fold_of, uniq)
        unl = distill.read_unlabelled(cfg, ds)
    log(f"tfidf: {len(ds.ids)} rows x {len(ds.label_names)} classes from {ds.path}; {len(uniq)} folds ({source})"
        + (f"; distilled from {len(teachers)} teacher(s), alpha {cfg.distill.alpha}, "
           f"{0 if unl is None else len(unl.ids)} unlabelled rows" if teachers else ""))
    with atomic_dir(out) as tmp:
        summary = _fit_folds(cfg, tmp, ds, test_ds, fold_of, uniq, source, decode, c, teachers, unl, targets_from,
                             log)
        summary["seconds"] = round(time.time() - t0, 1)
        write_json(tmp / "summary.json", summary)
    metrics = summary["oof_metrics"]
    log(f"out of fold: exact match {metrics['t0.5/exact_match']:.4f} @0.5, {metrics['cascade/exact_match']:.4f} "
        f"cascade; micro-F1 {metrics['cascade/micro_f1']:.4f} cascade")
    log(f"wrote {out} ({summary['seconds']} s)")
    return summary


def _fit_folds(cfg, tmp: Path, ds, test_ds, fold_of, uniq, source, decode, c, teachers, unl, targets_from,
               log) -> dict:
    """The fold fits (and the test fit) of :func:`run`, written into ``tmp``; returns the summary."""
    texts = np.asarray(ds.texts, dtype=object)
    targets, extra = {}, {}
    if teachers:
        if targets_from:
            distill.copy_cached(targets_from, tmp / distill.TEACHER_DIR, teachers, log=log)
        targets = distill.prepare_targets(cfg, tmp, teachers, ds, unl, fold_of, uniq, DistEnv(), log=log)
        n_unl = 0 if unl is None else len(unl.ids)
        texts_all = np.concatenate([texts, np.asarray(unl.texts, dtype=object)]) if n_unl else texts
        labels_all = np.concatenate([ds.labels, np.zeros((n_unl, ds.labels.shape[1]), ds.labels.dtype)])
        extra = {"distill": distill.provenance(cfg, teachers, uniq, n_unl, tmp)}
    oof = np.zeros(ds.labels.shape)
    pred_sets = np.zeros(ds.labels.shape, dtype=np.int8) if cfg.decode.strategy == "sets" else None
    per_fold = []
    for f in tqdm(uniq, desc="tfidf folds", file=sys.stderr, leave=False):
        val = fold_of == f
        if teachers:
            st = targets[f]
            rows = np.flatnonzero(~np.isnan(st.soft[:, 0]))  # the fold's training rows + the unlabelled rows
            t, w = soft_fit_targets(labels_all[rows], st.soft[rows], st.labelled[rows], st.alpha)
            oof[val] = fit_predict_soft(texts_all[rows], t, w, texts[val], c, cfg.train.seed)
        else:
            oof[val] = fit_predict(texts[~val], ds.labels[~val], texts[val], c, cfg.train.seed)
        fold_decode = fold_decoding(cfg, decode, ds.labels, np.flatnonzero(~val))  # priors: this fold's training rows
        if pred_sets is not None:
            pred_sets[val] = fold_decode.decode(oof[val])
        per_fold.append({"fold": int(f), "rows": int(val.sum()), **evaluate(oof[val], ds.labels[val], fold_decode)})
        log(f"fold {f}: exact match {per_fold[-1]['t0.5/exact_match']:.4f} @0.5, "
            f"{per_fold[-1]['cascade/exact_match']:.4f} cascade")
    done = np.isin(fold_of, uniq)
    metrics = evaluate(oof[done], ds.labels[done], decode)
    if pred_sets is not None:
        metrics.update({f"sets/{k}": v for k, v in scores(ds.labels[done], pred_sets[done]).items()})
    meta = {"kind": "out-of-fold", "produced_by": "python -m train tfidf", "model": "tfidf word 1-2 + char_wb 2-5, "
            f"logistic regression C={c}", "train_csv": ds.path, "folds_source": source, "versions": versions(),
            "config": cfg.to_dict(), **extra}  # config: infer tune / evaluate / blend read its decode section
    summary = {**meta, "C": c, "rows": int(done.sum()), "folds": uniq, "oof_metrics": metrics, "per_fold": per_fold}
    write_probs(tmp / "oof.csv", ds.ids[done], oof[done], ds.label_names, meta=meta)
    pd.DataFrame({"index": ds.ids, "fold": fold_of}).to_csv(tmp / "folds.csv", index=False)
    if test_ds is not None:
        if teachers:
            st = distill.prepare_final_targets(cfg, tmp, teachers, ds, unl, fold_of, DistEnv(), log=log)
            t, w = soft_fit_targets(labels_all, st.soft, st.labelled, st.alpha)
            probs = fit_predict_soft(texts_all, t, w, test_ds.texts, c, cfg.train.seed)
        else:
            probs = fit_predict(ds.texts, ds.labels, test_ds.texts, c, cfg.train.seed)
        write_probs(tmp / "test_probs.csv", test_ds.ids, probs, ds.label_names,
                    meta={**meta, "kind": "test", "test_csv": test_ds.path})
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train tfidf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--folds", help="folds CSV (index, fold), e.g. an LLM run's folds.csv; default: the config's split")
    p.add_argument("--test", help="unlabelled CSV to predict with a model fitted on all labelled rows")
    p.add_argument("--C", dest="c", type=float, default=4.0, help="inverse L2 regularisation of the regressions")
    add_teacher_arguments(p)
    p.add_argument("--targets-from", metavar="DIR", help="distillation: reuse the teacher target files of an earlier "
                   "run's teachers/ folder (each checked against its teacher and rows)")
    args = p.parse_args(argv)
    try:
        cfg = RunConfig.from_yaml(args.config, teacher_overrides(args))
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        if args.targets_from and not cfg.distill.teachers:
            raise InputError("--targets-from needs --teacher (a distilled student)")
        run(cfg, args.out, args.folds, args.test, args.c, targets_from=args.targets_from)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
