"""The TF-IDF + logistic-regression model: word 1-2-grams + character 2-5-grams within word boundaries (sublinear TF,
terms in at least 2 rows), one L2 logistic regression per class; fitted on hard labels or, for distillation, on
soft targets. The cross-validated baseline built on it is :mod:`train.tfidf_run` (``python -m train tfidf``)."""

from __future__ import annotations

import numpy as np


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
