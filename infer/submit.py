"""Write a competition submission from a probability file (``python -m infer submit``).

The first column is the probability file's id column (the run's ``data.id_column``); then, by ``--format`` or the
run's ``data.submission_format``: ``ids`` (``target``: the space-separated class ids of a row, ascending, may be
empty; the DLS configs choose it), ``names`` (``labels``: space-separated label names) or ``onehot`` (one 0/1
column per label). Class id = the label's integer suffix when all labels are one prefix + an integer (``label7``
-> 7), else its column position. Rows keep the probability file's ids and order.

Decoding: the tuned ``--thresholds`` (thresholds.json from ``python -m infer tune``: a cascade, or a set decoding
with ``--strategy sets``), else the run's cascade (its ``decode`` section).

Usage:
    python -m infer submit --probs probs.csv [--thresholds thresholds.json] [--ids test.csv] --out submission.csv
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError
from core.io import align_ids, read_ids, read_probs, write_csv
from core.sets import SOURCES, SetDecoder, cascade_of, is_sets
from core.thresholds import ThresholdSpec, class_ids, fallback_name

logger = logging.getLogger(__name__)


def targets(preds: np.ndarray, label_names: Sequence[str]) -> list[str]:
    """0/1 predictions (N x L, columns in ``label_names`` order) -> space-separated ascending class ids per row."""
    cid = np.asarray(class_ids(label_names))
    order = np.argsort(cid, kind="stable")
    preds = np.asarray(preds)[:, order]
    sorted_ids = cid[order]
    return [" ".join(str(i) for i in sorted_ids[np.flatnonzero(row)]) for row in preds]


FORMATS = ("ids", "names", "onehot")
"""Submission formats (``data.submission_format``, ``infer submit --format``)."""


def submission_frame(id_column: str, row_ids, preds: np.ndarray, names: Sequence[str], fmt: str) -> pd.DataFrame:
    """The submission: the id column, then ``target`` (space-separated class ids), ``labels`` (space-separated label
    names) or one 0/1 column per label (``onehot``)."""
    if fmt == "ids":
        return pd.DataFrame({id_column: row_ids, "target": targets(preds, names)})
    if fmt == "names":
        return pd.DataFrame({id_column: row_ids,
                             "labels": [" ".join(names[j] for j in np.flatnonzero(row)) for row in preds]})
    if fmt == "onehot":
        frame = pd.DataFrame(np.asarray(preds, dtype=np.int8), columns=list(names))
        frame.insert(0, id_column, list(row_ids))
        return frame
    raise InputError(f"unknown submission format {fmt!r} (choose from {', '.join(FORMATS)})")


def submission_format(probs_path, given: str | None = None) -> str:
    """``given``, else the producing run's ``data.submission_format``, else ``ids``."""
    if given is not None:
        return given
    from core.decoding import run_config_of

    cfg, _ = run_config_of(probs_path)
    return cfg.data.submission_format if cfg is not None else "ids"


def load_decoding(probs_path, label_names: Sequence[str], thresholds=None,
                  fallback=None) -> ThresholdSpec | SetDecoder:
    """The decoding for a probability file: its thresholds file (checked against its labels; a cascade or a set
    decoding) or the cascade of the run that wrote it (``decode`` section, see :func:`core.decoding.default_spec`).

    ``fallback`` (a label name, class id, 'argmax', 'none'; None = keep the thresholds' / the run's) overrides it
    (for a set decoding: the fallback of its cascade candidate).
    """
    from core.decoding import check_spec_labels, default_spec, read_thresholds, resolve_fallback

    if thresholds is not None:
        spec = read_thresholds(thresholds)
        check_spec_labels(spec, thresholds, label_names, probs_path)
        if fallback is not None:
            fb = resolve_fallback(spec.label_names, fallback, probs_path, True)
            if fb != spec.fallback:
                logger.info(f"--fallback {fallback} overrides the fallback stored in {thresholds}")
                c = cascade_of(spec)
                c = ThresholdSpec(c.label_names, c.start, c.stop, c.step, fb, c.class_offsets, c.meta)
                spec = spec.with_cascade(c) if is_sets(spec) else c
        return spec
    return default_spec(probs_path, label_names, fallback)


def submit(probs: str | Path, out: str | Path, thresholds: str | Path | None = None, fallback=None,
           ids: str | Path | None = None, id_column: str | None = None, fmt: str | None = None) -> pd.DataFrame:
    """Validate everything, decode, then write ``out`` atomically. Returns the submission frame: the probability
    file's id column (the run's ``data.id_column``) and ``fmt`` (:func:`submission_format`)."""
    row_ids, p, names = read_probs(probs)
    fmt = submission_format(probs, fmt)
    if fmt not in FORMATS:
        raise InputError(f"unknown submission format {fmt!r} (choose from {', '.join(FORMATS)})")
    probs_id = str(pd.read_csv(probs, nrows=0).columns[0])
    if thresholds is None:  # probabilities of one final / merged adapter: its own tuned thresholds.json
        from core.decoding import probs_thresholds

        thresholds = probs_thresholds(probs)
    spec = load_decoding(probs, names, thresholds, fallback)
    if list(spec.label_names) != list(names):  # same set (checked), other order: follow the thresholds
        pos = {n: j for j, n in enumerate(names)}
        p = p[:, [pos[n] for n in spec.label_names]]
        names = list(spec.label_names)
    if ids is not None:
        from core.decoding import labels_id_column

        align_ids(probs, row_ids, ids, read_ids(ids, labels_id_column(probs, id_column)), same_order=True)
    preds, source = spec.decode_with_source(p) if is_sets(spec) else (spec.decode(p), None)
    sub = submission_frame(probs_id, row_ids, preds, names, fmt)
    write_csv(out, sub)
    per_row = preds.sum(axis=1)
    counts = np.bincount(per_row, minlength=4)
    dist = ", ".join(f"{k}: {counts[k]}" for k in range(len(counts)) if counts[k])
    how = thresholds if thresholds is not None else "the run's cascade"
    if is_sets(spec):
        won = np.bincount(source, minlength=len(SOURCES))
        what = ", ".join(f"{n}: {won[k]}" for k, n in enumerate(SOURCES))
        logger.info(f"submit: {len(sub)} rows from {probs} set-decoded with {how} (lambda {spec.lam:g}, temperature "
                    f"{spec.temperature:g}); classes per row {dist}; winning candidate per row {what}")
    else:
        fell_back = 0
        if spec.fallback is not None:
            # rows the cascade left to the fallback: nothing above the lowest threshold (offsets included)
            offs = np.zeros(len(names)) if spec.class_offsets is None else np.asarray(spec.class_offsets)
            fell_back = int((~(p > (spec.steps[-1] + offs)).any(axis=1)).sum())
        logger.info(f"submit: {len(sub)} rows from {probs} decoded with {how}; classes per row {dist}; "
                    f"{fell_back} row(s) got the fallback ({fallback_name(names, spec.fallback)})")
    logger.info(f"wrote {out}")
    return sub

