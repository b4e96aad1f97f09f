"""Artifact I/O: atomic writes and the probability-file format.

A probability file is a CSV whose first column is ``index`` (row id) followed by one column per class,
named as the labels it was trained on, values in [0, 1]. Each CSV artifact may carry a sidecar
``<name>.meta.json`` describing what produced it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import InputError
from core.thresholds import numbered

ID_COLUMN = "index"


def check_out_file(path: str | Path | None, flag: str = "--out") -> None:
    """Check, before any work, that ``path`` can be written as a file: not a folder, no part of its parent a file,
    the nearest existing parent writable. Nothing is created.

    Raises:
        InputError: naming ``flag`` and the path.
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give a file name")
    _check_parent(path, flag)


def check_out_dir(path: str | Path | None, flag: str = "--out-dir", must_not_exist: bool = False) -> None:
    """Check, before any work, that ``path`` can be (or is) a folder to write into.

    Raises:
        InputError: naming ``flag`` and the path.
    """
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder")
    if must_not_exist and path.exists():
        raise InputError(f"{flag} {path}: already exists")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: folder is not writable")
        return
    _check_parent(path, flag)


def _check_parent(path: Path, flag: str) -> None:
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {parent}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the artifact gets the usual permissions
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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
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


def write_csv(path: str | Path, df: pd.DataFrame, **to_csv: Any) -> None:
    """Write ``df`` to ``path`` atomically, compressed as its name says (``.gz``, ``.bz2``, ``.xz``, ``.zip``,
    ``.zst``: the suffixes ``pd.read_csv`` infers when it reads the file back).

    The temporary file's name ends in ``.tmp``, from which pandas would infer no compression: a ``probs.csv.gz``
    written as plain text cannot be read back. A gzip header names the file, not the temporary file, and carries
    no time: the same rows give the same bytes.
    """
    compression: Any = _COMPRESSION.get(Path(path).suffix.lower())
    if compression == "zip":  # the member is named after the file, not after the temporary file
        compression = {"method": "zip", "archive_name": Path(path).with_suffix("").name}
    with atomic_path(path) as tmp:
        if compression == "gzip":  # pandas' gzip takes the header's name from the (temporary) path it opens
            with open(tmp, "wb") as raw, gzip.GzipFile(Path(path).name, "wb", fileobj=raw, mtime=0) as gz, \
                    io.TextIOWrapper(gz, encoding="utf-8", newline="") as text:
                df.to_csv(text, index=False, **to_csv)
        else:
            df.to_csv(tmp, index=False, compression=compression, **to_csv)


_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip", ".zst": "zstd"}


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


def versions(names: Sequence[str] = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy",
                                      "pandas", "optuna", "scikit-learn")) -> dict[str, str]:
    """Versions of the libraries that shape predictions, for provenance (from package metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out["sklearn" if name == "scikit-learn" else name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


OPTIMISTIC_KEY = "optimistic"
"""Key of a probability file's ``.meta.json`` that says why scores on its rows are optimistic by construction."""


def keep_best_reason(keep: str) -> str | None:
    """Why the out-of-fold file of a run with ``train.keep=keep`` is optimistic (None for ``last``)."""
    if keep != "best":
        return None
    return ("train.keep=best chose each fold's epoch on the very rows of this out-of-fold file, so scores on it "
            "(and thresholds tuned on it) are optimistic")


def optimistic_reason(path: str | Path) -> str | None:
    """Why scores on the probability file ``path`` are optimistic by construction, from its ``.meta.json``
    (:data:`OPTIMISTIC_KEY`, or an out-of-fold file of a ``train.keep=best`` run written before the key existed);
    None if they are not, or nothing says so."""
    mp = meta_path(path)
    try:
        meta = json.loads(mp.read_text(encoding="utf-8")) if mp.is_file() else {}
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get(OPTIMISTIC_KEY):
        return str(meta[OPTIMISTIC_KEY])
    if meta.get("kind") == "out-of-fold probabilities" and meta.get("adapter") == "best":
        return keep_best_reason("best")
    return None


def write_probs(path: str | Path, ids: Sequence, probs: np.ndarray, label_names: Sequence[str],
                meta: dict[str, Any] | None = None, id_column: str = ID_COLUMN) -> None:
    """Write a probability file (and its ``.meta.json`` sidecar when ``meta`` is given), atomically; its first
    column is ``id_column`` (the run's ``data.id_column`` where known)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(label_names)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(ids)} ids x {len(label_names)} labels")
    df = pd.DataFrame(probs, columns=list(label_names))
    if id_column in df.columns:
        raise ValueError(f"id column {id_column!r} is also a label name")
    df.insert(0, id_column, list(ids))
    write_csv(path, df, float_format="%.6f")
    if meta is not None:
        write_json(meta_path(path), {"label_names": list(label_names), "rows": len(ids), **meta,
                                     "versions": versions()})


def probs_id_column(path: str | Path) -> str:
    """The id column of a probability file (its first column: the run's ``data.id_column``), for files derived from
    it (a blend keeps its inputs' id column)."""
    return str(pd.read_csv(path, nrows=0).columns[0])


def _read_csv_checked(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        raise InputError(f"{path}: cannot read CSV: {e}") from None


def read_probs(path: str | Path, label_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read and validate a probability file.

    Returns:
        (ids, probs N x L float64, label names). If ``label_names`` is given, the file must have exactly
        those class columns (any order; returned in the given order).

    Raises:
        InputError: missing file, missing/extra columns, NaN or values outside [0, 1], duplicate ids.
    """
    path = Path(path)
    return _validate_probs(path, _read_csv_checked(path, "probability file"), label_names)


def read_oof(path: str | Path, label_names: Sequence[str] | None = None,
             fold_column: str = "fold") -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """Like :func:`read_probs`, but a ``fold`` column (fold of each out-of-fold row) is allowed and returned.

    Returns:
        (ids, probs, label names, folds or None).
    """
    path = Path(path)
    df = _read_csv_checked(path, "probability file")
    folds = None
    if fold_column in df.columns[1:]:
        raw = df.pop(fold_column)
        folds = pd.to_numeric(raw, errors="coerce")
        bad = folds.isna() | (folds != folds.round())
        if bad.any():
            r = int(bad.idxmax())
            raise InputError(f"{path}: row {r + 2} column {fold_column!r}: fold {py_scalar(raw.iloc[r])!r} is not an "
                             f"integer")
        folds = folds.to_numpy(dtype=np.int64)
    return (*_validate_probs(path, df, label_names), folds)


def _validate_probs(path: Path, df: pd.DataFrame, label_names: Sequence[str] | None):
    if df.columns.size == 0:
        raise InputError(f"{path}: no columns; the first column must be the row id")
    id_col = str(df.columns[0])  # the run's id column (``index`` in files of older versions)
    if label_names is not None and id_col in set(label_names):
        raise InputError(f"{path}: first column must be the row id, got the label {id_col!r}")
    cols = list(df.columns[1:])
    if label_names is not None:
        missing = [c for c in label_names if c not in cols]
        extra = [c for c in cols if c not in set(label_names)]
        if missing or extra:
            raise InputError(f"{path}: class columns do not match the labels: missing {missing[:10]}, "
                             f"extra {extra[:10]}")
        cols = list(label_names)
    if not cols:
        raise InputError(f"{path}: no class columns after {id_col!r}")
    _check_ids(path, df[id_col], id_col)
    values = df[cols]
    non_numeric = [c for c in cols if not pd.api.types.is_numeric_dtype(values[c])]
    if non_numeric:
        c = non_numeric[0]
        bad = pd.to_numeric(values[c], errors="coerce").isna() & values[c].notna()
        row = int(bad.idxmax())
        raise InputError(f"{path}: column {c!r} is not numeric (row {row + 2}: {values[c].iloc[row]!r})")
    arr = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{path}: row {r + 2} (id {py_scalar(df[id_col].iloc[r])!r}) column {cols[c]!r}: "
                         f"value {py_scalar(arr[r, c])!r} is not a probability in [0, 1]")
    return df[id_col].to_numpy(), arr, cols


# ---------------------------------------------------------------------------------------------------------------
# Labelled CSVs and id alignment (used by ``python -m infer tune / evaluate / blend / submit``)
# ---------------------------------------------------------------------------------------------------------------


def py_scalar(value: Any) -> Any:
    """numpy scalar -> Python scalar, so that messages say 11002 rather than np.int64(11002)."""
    return value.item() if isinstance(value, np.generic) else value


def _check_ids(path: Path, ids: pd.Series, id_column: str) -> None:
    if ids.isna().any():
        raise InputError(f"{path}: empty id in column {id_column!r} at row {int(ids.isna().idxmax()) + 2}")
    dup = ids.duplicated()
    if dup.any():
        v = ids[dup].iloc[0]
        raise InputError(f"{path}: duplicate id {py_scalar(v)!r} in column "
                         f"{id_column!r} at row {int(dup.idxmax()) + 2}")


def read_labels(path: str | Path, label_names: Sequence[str], probs_path: str | Path | None = None,
                id_column: str = ID_COLUMN) -> tuple[np.ndarray, np.ndarray]:
    """The 0/1 labels of a labelled CSV (competition format) for the classes ``label_names``.

    ``label_names`` are a probability file's class columns. The labels file's own label columns are every column
    named like them (same prefix + integer suffix when they are numbered, e.g. ``label0..label9``; otherwise the
    listed names), so that a probability file with missing or extra class columns is reported, naming
    ``probs_path`` and the columns.

    Returns:
        (ids, labels N x L int8 in ``label_names`` order).
    """
    import re

    path = Path(path)
    df = _read_csv_checked(path, "labels file")
    if id_column not in df.columns:
        raise InputError(f"{path}: no id column {id_column!r} (columns: {list(df.columns)[:12]})")
    ids = df[id_column]
    _check_ids(path, ids, id_column)
    prefix = numbered(label_names)
    if prefix is not None:
        pattern = re.compile(rf"^{re.escape(prefix[0])}\d+$")
        file_cols = [c for c in df.columns if isinstance(c, str) and pattern.match(c) and c != id_column]
    else:
        file_cols = [c for c in label_names if c in df.columns]
    missing = [c for c in file_cols if c not in set(label_names)]
    extra = [c for c in label_names if c not in set(file_cols)]
    if missing or extra:
        who = probs_path if probs_path is not None else "the probability file"
        parts = ([f"missing class column(s) {missing[:10]}" + (" ..." if len(missing) > 10 else "")] if missing
                 else []) + ([f"extra class column(s) {extra[:10]}" + (" ..." if len(extra) > 10 else "")]
                             if extra else [])
        raise InputError(f"{who}: {' and '.join(parts)} compared with the label columns of {path}")
    cols = list(label_names)
    raw = df[cols]
    numeric = raw.apply(pd.to_numeric, errors="coerce")
    ok = numeric.isin([0, 1]) & numeric.notna()
    if not ok.all().all():
        r, c = np.argwhere(~ok.to_numpy())[0]
        v = raw.iloc[r, c]
        raise InputError(f"{path}: row {r + 2} (id {py_scalar(ids.iloc[r])!r}) column {cols[c]!r}: label value "
                         f"{py_scalar(v)!r} is not 0 or 1")
    return ids.to_numpy(), numeric.to_numpy(dtype=np.int8)


def read_ids(path: str | Path, id_column: str = ID_COLUMN) -> np.ndarray:
    """The id column of a CSV (e.g. the test CSV a submission is for), validated (present, no empty/duplicate)."""
    path = Path(path)
    df = _read_csv_checked(path, "CSV")
    if id_column not in df.columns:
        raise InputError(f"{path}: no id column {id_column!r} (columns: {list(df.columns)[:12]})")
    _check_ids(path, df[id_column], id_column)
    return df[id_column].to_numpy()


def _id_keys(ids: Sequence) -> list[str]:
    """Ids as comparable strings (1, 1.0 and '1' are the same id; CSV readers differ in how they type them)."""
    out = []
    for v in ids:
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)
        out.append(str(v.item() if isinstance(v, np.generic) else v))
    return out


def align_ids(path: str | Path, ids: Sequence, ref_path: str | Path, ref_ids: Sequence,
              same_order: bool = False, same_set: bool = False) -> np.ndarray:
    """Positions in ``ref_ids`` of each of ``ids`` (a file's rows), checking that they match.

    By default every id of ``path`` must occur in ``ref_path`` (a subset, e.g. the out-of-fold rows of some folds
    of a labelled CSV). ``same_set``: also no id of ``ref_path`` may be missing. ``same_order``: the ids must be
    exactly ``ref_ids`` in the same order. Errors name both files and the first offending row.
    """
    keys, ref_keys = _id_keys(ids), _id_keys(ref_ids)
    if same_order:
        for r, (a, b) in enumerate(zip(keys, ref_keys)):
            if a != b:
                raise InputError(f"{path}: row {r + 2} has id {a} but row {r + 2} of {ref_path} has id {b} "
                                 f"(the ids must be the same, in the same order)")
        if len(keys) != len(ref_keys):
            raise InputError(f"{path}: {len(keys)} rows but {ref_path} has {len(ref_keys)} (the ids must be the "
                             f"same, in the same order)")
        return np.arange(len(keys))
    pos = {k: i for i, k in enumerate(ref_keys)}
    idx = np.empty(len(keys), dtype=np.int64)
    for r, k in enumerate(keys):
        i = pos.get(k)
        if i is None:
            raise InputError(f"{path}: row {r + 2} has id {k}, which is not in {ref_path}")
        idx[r] = i
    if same_set and len(keys) != len(ref_keys):
        have = set(keys)
        r = next(i for i, k in enumerate(ref_keys) if k not in have)
        raise InputError(f"{path}: has no row for id {ref_keys[r]} (row {r + 2} of {ref_path}); "
                         f"{len(ref_keys) - len(keys)} id(s) of {ref_path} are missing")
    return idx


def read_folds(path: str | Path, oof_path, oof_ids) -> np.ndarray:
    """Fold of each OOF row from a ``folds.csv`` (columns index, fold), aligned by id."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: folds file not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot read CSV: {e}") from None
    for col in ("index", "fold"):
        if col not in df.columns:
            raise InputError(f"{path}: no {col!r} column (a folds file has columns index, fold)")
    folds = pd.to_numeric(df["fold"], errors="coerce")
    if folds.isna().any():
        r = int(folds.isna().idxmax())
        raise InputError(f"{path}: row {r + 2} column 'fold': {df['fold'].iloc[r]!r} is not an integer")
    idx = align_ids(oof_path, oof_ids, path, df["index"].to_numpy())
    return folds.to_numpy(dtype=np.int64)[idx]


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar on stderr for ``total`` items of long work (tuning trials, ...); None when ``progress`` is off."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
