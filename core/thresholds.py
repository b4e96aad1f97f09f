"""Decoding multilabel probabilities into label sets. numpy only: no torch, pandas, I/O or globals.

The default is the reference solution's cascade: for each row, try thresholds 0.55, 0.50, ..., 0.20 in
order and take every class with probability strictly greater than the first threshold that selects at
least one class; if none does, predict the fallback: a fixed class (a data set's "no meaning" class), the row's
most probable class (``"argmax"``, the default) or nothing (``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import numpy as np

ARGMAX = "argmax"
DEFAULT_START, DEFAULT_STOP, DEFAULT_STEP, DEFAULT_FALLBACK = 0.55, 0.20, 0.05, ARGMAX
Fallback = int | str | None
"""A class position, :data:`ARGMAX` (each row's most probable class) or None (empty)."""


def check_fallback(fallback: Fallback, n_labels: int) -> None:
    if fallback is None or fallback == ARGMAX:
        return
    if isinstance(fallback, bool) or not isinstance(fallback, (int, np.integer)) or not 0 <= fallback < n_labels:
        raise ValueError(f"fallback class {fallback!r} is out of range for {n_labels} classes "
                         f"(a class position, {ARGMAX!r} or None)")


def apply_fallback(preds: np.ndarray, probs: np.ndarray, empty: np.ndarray, fallback: Fallback) -> None:
    """Set the fallback class on the rows ``empty`` (boolean mask) of ``preds`` in place."""
    if fallback is None or not empty.any():
        return
    rows = np.flatnonzero(empty)
    cols = probs[rows].argmax(axis=1) if fallback == ARGMAX else fallback
    preds[rows, cols] = 1


def resolve_fallback(label_names: Sequence[str], value) -> Fallback:
    """A fallback as a user writes it -> as :func:`cascade` takes it.

    ``value``: a label name (``label12``), a class id as written in submissions (``12``, see
    :func:`class_ids`), ``"argmax"``, or ``"none"`` / None.

    Raises:
        ValueError: no such label or class id (the message lists what is valid).
    """
    if value is None or str(value).strip().lower() == "none":
        return None
    text = str(value).strip()
    if text.lower() == ARGMAX:
        return ARGMAX
    names = [str(n) for n in label_names]
    if text in names:
        return names.index(text)
    ids = class_ids(label_names)
    if text.lstrip("-").isdigit() and int(text) in ids:
        return ids.index(int(text))
    shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    raise ValueError(f"fallback {text!r} is neither a label ({shown}), a class id ({min(ids)}..{max(ids)}), "
                     f"'argmax' nor 'none'")


def fallback_name(label_names: Sequence[str], fallback: Fallback) -> str:
    """How a resolved fallback is written back into configs and reports."""
    return "none" if fallback is None else ARGMAX if fallback == ARGMAX else str(label_names[fallback])


MAX_CLASS_OFFSET = 0.5
"""Largest |class offset| a thresholds file may hold (``infer tune`` searches -0.30 .. 0.30)."""
MAX_STEPS = 1000
"""Most thresholds a cascade may have ((start - stop) / step + 1)."""


def check_cascade(start, stop, step, class_offsets=None) -> None:
    """A cascade's numbers: ``0 <= stop <= start <= 1``, ``step > 0`` with at most :data:`MAX_STEPS` thresholds,
    every class offset finite with ``|offset| <= MAX_CLASS_OFFSET``.

    Raises:
        ValueError: naming the first value out of range.
    """
    for name, v in (("start", start), ("stop", stop), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    for name, v in (("start", start), ("stop", stop)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if stop > start:
        raise ValueError(f"stop ({stop}) must be <= start ({start})")
    if (start - stop) / step + 1 > MAX_STEPS:
        raise ValueError(f"step {step} gives more than {MAX_STEPS} thresholds from {start} to {stop}")
    for i, v in enumerate(class_offsets or ()):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) \
                or abs(v) > MAX_CLASS_OFFSET:
            raise ValueError(f"class_offsets[{i}] must be a number in [-{MAX_CLASS_OFFSET}, {MAX_CLASS_OFFSET}], "
                             f"got {v!r}")


def cascade_steps(start: float = DEFAULT_START, stop: float = DEFAULT_STOP, step: float = DEFAULT_STEP) -> tuple:
    """Thresholds start, start-step, ... down to stop (inclusive, to within rounding)."""
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if stop > start:
        raise ValueError(f"stop ({stop}) must be <= start ({start})")
    n = int(np.floor((start - stop) / step + 1e-9)) + 1
    # Round so that 0.55 - 7 * 0.05 is 0.2, as in the reference loop's literal values.
    return tuple(round(start - i * step, 10) for i in range(n))


def cascade(probs: np.ndarray, steps: Sequence[float] | None = None, fallback: Fallback = DEFAULT_FALLBACK,
            class_offsets: np.ndarray | None = None) -> np.ndarray:
    """Vectorised cascade decoding.

    Args:
        probs: N x L probabilities.
        steps: strictly decreasing thresholds (default 0.55 .. 0.20 by 0.05).
        fallback: for rows that no threshold selects: a class position, ``"argmax"`` (the row's most probable
            class) or ``None`` (left empty).
        class_offsets: optional per-class additive offsets to every threshold (length L), e.g. tuned ones.

    Returns:
        N x L int8 array of 0/1 predictions.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (rows x classes), got shape {probs.shape}")
    steps = cascade_steps() if steps is None else tuple(float(s) for s in steps)
    if not steps or any(b >= a for a, b in pairwise(steps)):
        raise ValueError(f"steps must be a non-empty strictly decreasing sequence, got {steps}")
    n, n_labels = probs.shape
    check_fallback(fallback, n_labels)
    offsets = np.zeros(n_labels) if class_offsets is None else np.asarray(class_offsets, dtype=np.float64)
    if offsets.shape != (n_labels,):
        raise ValueError(f"class_offsets must have length {n_labels}, got shape {offsets.shape}")
    preds = np.zeros((n, n_labels), dtype=np.int8)
    undecided = np.ones(n, dtype=bool)
    for t in steps:
        hit = probs > (t + offsets)  # S x L over all rows; cheap for the few steps of a cascade
        chosen = undecided & hit.any(axis=1)
        preds[chosen] = hit[chosen]
        undecided &= ~chosen
        if not undecided.any():
            break
    apply_fallback(preds, probs, undecided, fallback)
    return preds


def decode_global(probs: np.ndarray, steps: Sequence[float], fallback: Fallback,
                  rowmax: np.ndarray | None = None) -> np.ndarray:
    """``cascade(probs, steps, fallback)`` without class offsets, in one pass (same comparisons, same result).

    A row's level is the first threshold below its maximum probability; ``rowmax`` may be precomputed.
    """
    probs = np.asarray(probs, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    m = probs.max(axis=1) if rowmax is None else rowmax
    hit = m[:, None] > s[None, :]
    has = hit.any(axis=1)
    t = s[hit.argmax(axis=1)]
    preds = probs > t[:, None]
    preds[~has] = False
    preds = preds.astype(np.int8)
    apply_fallback(preds, probs, ~has, fallback)
    return preds


def threshold(probs: np.ndarray, t: float = 0.5) -> np.ndarray:
    """Plain thresholding (probability strictly greater than ``t``), no fallback."""
    return (np.asarray(probs) > t).astype(np.int8)


@dataclass(frozen=True)
class ThresholdSpec:
    """A decoding rule that travels with predictions (saved as ``thresholds.json``)."""

    label_names: tuple[str, ...]
    start: float = DEFAULT_START
    stop: float = DEFAULT_STOP
    step: float = DEFAULT_STEP
    fallback: Fallback = DEFAULT_FALLBACK
    class_offsets: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_cascade(self.start, self.stop, self.step, self.class_offsets)

    @classmethod
    def from_decode(cls, label_names: Sequence[str], decode) -> ThresholdSpec:
        """The cascade of a config's ``decode`` section (any object with start / stop / step / fallback).

        Raises:
            ValueError: a fallback that is not a label of ``label_names`` (see :func:`resolve_fallback`).
        """
        return cls(tuple(label_names), float(decode.start), float(decode.stop), float(decode.step),
                   resolve_fallback(label_names, decode.fallback))

    @property
    def steps(self) -> tuple:
        return cascade_steps(self.start, self.stop, self.step)

    def decode(self, probs: np.ndarray) -> np.ndarray:
        offsets = None if self.class_offsets is None else np.asarray(self.class_offsets)
        return cascade(probs, self.steps, self.fallback, offsets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label_names"] = list(self.label_names)
        d["class_offsets"] = None if self.class_offsets is None else list(self.class_offsets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ThresholdSpec:
        d = dict(d)
        d["label_names"] = tuple(d["label_names"])
        if d.get("class_offsets") is not None:
            d["class_offsets"] = tuple(float(x) for x in d["class_offsets"])
        return cls(**d)


def numbered(label_names: Sequence[str]) -> tuple[str, list[int]] | None:
    """(prefix, integers) when every label is one shared prefix + an integer (``label7``), else None."""
    import re

    matches = [re.match(r"^(.*?)(\d+)$", str(n)) for n in label_names]
    if not matches or not all(matches) or len({m.group(1) for m in matches}) != 1:
        return None
    return matches[0].group(1), [int(m.group(2)) for m in matches]


def class_ids(label_names: Sequence[str]) -> list[int]:
    """The class id of each label as written in a submission: the integer suffix when every label is one prefix +
    a distinct integer (``label7`` -> 7), else the column position."""
    parts = numbered(label_names)
    if parts is not None and len(set(parts[1])) == len(parts[1]):
        return parts[1]
    return list(range(len(label_names)))
