"""Scoring held-out probabilities during training: metrics at 0.5, with the run's cascade and with set decoding, and
the decoder of one fold (set priors from its training rows only). numpy only, no torch: the TF-IDF baseline uses it."""

from __future__ import annotations

import numpy as np

from core.config import RunConfig
from core.metrics import scores
from core.sets import SetDecoder, cascade_of, is_sets
from core.thresholds import ThresholdSpec, threshold


def evaluate(probs: np.ndarray, labels: np.ndarray, decode: ThresholdSpec | SetDecoder) -> dict[str, float]:
    """Metrics at 0.5 (plain threshold), with the run's cascade (``decode``: the config's ``decode`` section) and,
    when ``decode`` is a :class:`core.sets.SetDecoder`, with set decoding (its cascade candidate is the cascade);
    flat keys like ``cascade/exact_match``, ``sets/exact_match``."""
    decodings = [("t0.5", threshold(probs, 0.5)), ("cascade", cascade_of(decode).decode(probs))]
    if is_sets(decode):
        decodings.append(("sets", decode.decode(probs)))
    out = {}
    for name, preds in decodings:
        for k, v in scores(labels, preds).items():
            out[f"{name}/{k}"] = v
    return out


def fold_decoding(cfg: RunConfig, decode: ThresholdSpec, labels: np.ndarray,
                  train_idx: np.ndarray) -> ThresholdSpec | SetDecoder:
    """The per-epoch decoding of a fold: the cascade, or with ``decode.strategy: sets`` a set decoder whose priors
    come from the fold's training rows only (default lambda / temperature / candidates)."""
    if cfg.decode.strategy == "sets":
        return SetDecoder.fit(labels[train_idx], decode.label_names, decode)
    return decode


def selection_key(cfg: RunConfig) -> str:
    """The metric ``keep: best`` maximises: exact match of the configured strategy."""
    return f"{'sets' if cfg.decode.strategy == 'sets' else 'cascade'}/exact_match"
