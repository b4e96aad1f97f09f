"""Artifact I/O shared by ``train`` and ``infer``: atomic writes and the probability-file format.

A probability file is a CSV whose first column is ``index`` (row id) followed by one column per class,
named as the labels it was trained on, values in [0, 1]. Each CSV artifact may carry a sidecar
``<name>.meta.json`` describing what produced it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ID_COLUMN = "index"


class InputError(ValueError):
    """Bad user input (file, column, row); the message names what is wrong."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (old content removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def versions() -> dict[str, str]:
    """Versions of the libraries that shape predictions, for provenance."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "numpy", "pandas", "optuna", "sklearn"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional libraries
            pass
    return out


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def write_probs(path: str | Path, ids: Sequence, probs: np.ndarray, label_names: Sequence[str],
                meta: dict[str, Any] | None = None) -> None:
    """Write a probability file (and its ``.meta.json`` sidecar when ``meta`` is given), atomically."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(label_names)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(ids)} ids x {len(label_names)} labels")
    df = pd.DataFrame(probs, columns=list(label_names))
    df.insert(0, ID_COLUMN, list(ids))
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")
    if meta is not None:
        write_json(meta_path(path), {"label_names": list(label_names), "rows": len(ids), **meta,
                                     "versions": versions()})


def read_probs(path: str | Path, label_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read and validate a probability file.

    Returns:
        (ids, probs N x L float64, label names). If ``label_names`` is given, the file must have exactly
        those class columns (any order; returned in the given order).

    Raises:
        InputError: missing file, missing/extra columns, NaN or values outside [0, 1], duplicate ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: probability file not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot read CSV: {e}") from None
    if df.columns.size == 0 or df.columns[0] != ID_COLUMN:
        raise InputError(f"{path}: first column must be '{ID_COLUMN}', got {list(df.columns[:1])}")
    cols = [c for c in df.columns[1:]]
    if label_names is not None:
        missing = [c for c in label_names if c not in cols]
        extra = [c for c in cols if c not in set(label_names)]
        if missing or extra:
            raise InputError(f"{path}: class columns do not match the labels: missing {missing[:10]}, "
                             f"extra {extra[:10]}")
        cols = list(label_names)
    if not cols:
        raise InputError(f"{path}: no class columns after '{ID_COLUMN}'")
    dup = df[ID_COLUMN].duplicated()
    if dup.any():
        raise InputError(f"{path}: duplicate id {df[ID_COLUMN][dup].iloc[0]!r} at row {int(dup.idxmax()) + 2}")
    values = df[cols]
    non_numeric = [c for c in cols if not pd.api.types.is_numeric_dtype(values[c])]
    if non_numeric:
        c = non_numeric[0]
        bad = pd.to_numeric(values[c], errors="coerce").isna() & values[c].notna()
        row = int(bad.idxmax()) + 2 if bad.any() else "?"
        raise InputError(f"{path}: column {c!r} is not numeric (row {row}: {values[c].iloc[int(bad.idxmax())]!r})")
    arr = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{path}: row {r + 2} (id {df[ID_COLUMN].iloc[r]!r}) column {cols[c]!r}: "
                         f"value {arr[r, c]!r} is not a probability in [0, 1]")
    return df[ID_COLUMN].to_numpy(), arr, cols
