"""Data: CSV reading and validation, the one prompt formatter (training, prediction, serving), tokenisation,
padding into batches."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import DataArgs
from core.errors import InputError
from core.io import py_scalar


@dataclass
class Dataset:
    """A validated CSV: ids, prompts and (for labelled data) an N x L 0/1 label matrix."""

    path: str
    ids: np.ndarray
    texts: list[str]
    labels: np.ndarray | None
    label_names: list[str]


def template_fields(template: str) -> list[str]:
    """Column names a format template refers to, in order of first use."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise InputError(f"data.text_template is not a valid format string: {e}") from None
    if any(n == "" or n.isdigit() for n in names):
        raise InputError("data.text_template must use named fields such as {text}, not {} or {0}")
    return list(dict.fromkeys(names))


_SET_LITERAL = re.compile(r"^\{(.*)\}$", re.DOTALL)


def format_value(value: object) -> str:
    """Cell -> text: missing is '', a set literal like ``{DELIVERY,PRICE}`` loses its braces, and a list/tuple
    (e.g. a UI multiselect) is joined like the set literal: ``["DELIVERY", "PRICE"]`` -> ``DELIVERY,PRICE``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(x) for x in value)
    s = str(value)
    m = _SET_LITERAL.match(s)
    return m.group(1) if m else s


def format_prompt(template: str, row: dict) -> str:
    """Fill the template with a row's values (pure; see :func:`format_value`)."""
    return template.format(**{k: format_value(row.get(k)) for k in template_fields(template)})


def label_columns(df: pd.DataFrame, args: DataArgs, path: str) -> list[str]:
    """Resolve the label columns of a CSV: ``data.label_columns``, else every column with ``data.label_prefix``
    ordered by numeric suffix, else detected (:func:`detect_label_columns`). ``df`` may be a list of column names
    when no detection is needed."""
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(columns=list(df))
    columns = [str(c) for c in df.columns]
    if args.label_columns:
        missing = [c for c in args.label_columns if c not in columns]
        if missing:
            raise InputError(f"{path}: label column(s) not found: {missing} (data.label_columns; columns: "
                             f"{columns[:12]}...)")
        return list(args.label_columns)
    if args.label_prefix is None:
        return detect_label_columns(df, args, path)
    prefix = args.label_prefix
    cols = [c for c in columns if c.startswith(prefix)]
    if not cols:
        raise InputError(f"{path}: no label columns starting with {prefix!r} (data.label_prefix)")

    def key(c: str):
        suffix = c[len(prefix):]
        return (0, int(suffix), c) if suffix.isdigit() else (1, 0, c)

    return sorted(cols, key=key)


def detect_label_columns(df: pd.DataFrame, args: DataArgs, path: str) -> list[str]:
    """Every column other than the id and the template's fields whose values are all 0 or 1, in file order.

    Raises:
        InputError: no such column (names the keys to set instead).
    """
    skip = {args.id_column, *template_fields(args.text_template)}
    cols = []
    for c in df.columns:
        if str(c) in skip:
            continue
        values = pd.to_numeric(df[c], errors="coerce")
        if values.notna().all() and values.isin([0, 1]).all():
            cols.append(str(c))
    if not cols:
        raise InputError(f"{path}: no label columns found (no column other than the id and the template's fields "
                         f"holds only 0/1); set data.label_columns or data.label_prefix")
    return cols


def read_csv(path: str | Path, args: DataArgs, labelled: bool = True,
             label_names: Sequence[str] | None = None) -> Dataset:
    """Read and validate a CSV in the competition format (or any CSV with configured columns).

    Raises:
        InputError: missing file, missing columns, duplicate ids, labels other than 0/1, empty data set.
    """
    path = str(path)
    if not Path(path).is_file():
        raise InputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        raise InputError(f"{path}: cannot read CSV: {e}") from None
    if len(df) == 0:
        raise InputError(f"{path}: the data set is empty (no rows)")
    need = [args.id_column, *template_fields(args.text_template)]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (data.id_column / data.text_template); "
                         f"found {list(df.columns)[:12]}")
    ids = df[args.id_column]
    if ids.isna().any():
        raise InputError(f"{path}: empty id in column {args.id_column!r} at row {int(ids.isna().idxmax()) + 2}")
    dup = ids.duplicated()
    if dup.any():
        raise InputError(f"{path}: duplicate id {py_scalar(ids[dup].iloc[0])!r} in column {args.id_column!r} "
                         f"at row {int(dup.idxmax()) + 2}")
    fields = template_fields(args.text_template)
    records = df[fields].to_dict("records")
    texts = [format_prompt(args.text_template, r) for r in records]
    labels = None
    if labelled:
        cols = label_columns(df, args, path) if label_names is None else list(label_names)
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise InputError(f"{path}: label column(s) not found: {missing}")
        raw = df[cols]
        # One stray string makes pandas read the whole column as text ('0', '1', 'yes'): compare as numbers.
        numeric = raw.apply(pd.to_numeric, errors="coerce")
        ok = numeric.isin([0, 1]) & numeric.notna()
        if not ok.all().all():
            r, c = np.argwhere(~ok.to_numpy())[0]
            raise InputError(f"{path}: row {r + 2} (id {py_scalar(ids.iloc[r])!r}) column {cols[c]!r}: label value "
                             f"{py_scalar(raw.iloc[r, c])!r} is not 0 or 1")
        labels = numeric.to_numpy(dtype=np.int8)
        names = cols
    else:
        names = list(label_names or [])
    return Dataset(path=path, ids=ids.to_numpy(), texts=texts, labels=labels, label_names=names)


def read_label_descriptions(path: str | Path | None, label_names: Sequence[str]) -> dict[str, str]:
    """Human-readable class names from a CSV like trends_description.csv (first column id, second name)."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: label names file not found (data.label_names_csv)")
    df = pd.read_csv(path)
    if df.shape[1] < 2:
        raise InputError(f"{path}: needs at least two columns (class id, name)")
    by_id = {str(k): str(v) for k, v in zip(df.iloc[:, 0], df.iloc[:, 1])}
    out = {}
    for i, name in enumerate(label_names):
        suffix = re.search(r"(\d+)$", name)
        key = suffix.group(1) if suffix else str(i)
        if key in by_id:
            out[name] = by_id[key]
    return out


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Tokenise every text once, up front (no padding; batches are padded dynamically)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(x) for x in enc["input_ids"]]


def collate(token_ids: Sequence[Sequence[int]], pad_id: int, labels: np.ndarray | None = None):
    """Right-pad a batch to its longest row. Returns dict of torch tensors."""
    import torch

    width = max(len(t) for t in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(token_ids), width), dtype=torch.long)
    for i, t in enumerate(token_ids):
        input_ids[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
        attention[i, :len(t)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention}
    if labels is not None:
        out["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    return out
