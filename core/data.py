"""Data: CSV reading and validation, the one prompt formatter (training, prediction, serving), tokenisation,
padding into batches."""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    """A validated CSV: ids, prompts and (for labelled data) an N x L 0/1 label matrix."""

    path: str
    ids: np.ndarray
    texts: list[str]
    labels: np.ndarray | None
    label_names: list[str]
    field_kinds: dict[str, str] | None = None
    """How the template's fields read (:func:`field_kinds`): this CSV's own, or the ``kinds`` it was read with."""


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


FIELD_KINDS = ("int", "float", "str")
"""What a template field holds, as pandas read it from the training CSV (:func:`field_kinds`)."""


def field_kinds(df: pd.DataFrame, fields: Sequence[str]) -> dict[str, str]:
    """``{field: "int" | "float" | "str"}`` as pandas typed each of ``df``'s template fields: a numeric column with a
    missing value (or any fraction) reads as floats and formats as ``4.0``, a whole one as ``4``. Booleans are text."""
    out = {}
    for f in fields:
        col = df[f] if f in df.columns else None
        if col is None or pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
            out[f] = "str"
        else:
            out[f] = "int" if pd.api.types.is_integer_dtype(col) else "float"
    return out


_KINDS_CACHE: dict[tuple, dict[str, str]] = {}


def csv_field_kinds(path: str | Path, template: str) -> dict[str, str] | None:
    """:func:`field_kinds` of a CSV's template columns (read once per file version); None when it is unreadable."""
    path = Path(path)
    try:
        key = (str(path.resolve()), path.stat().st_mtime_ns, template)
    except OSError:
        return None
    if key not in _KINDS_CACHE:
        fields = template_fields(template)
        try:
            header = list(pd.read_csv(path, nrows=0).columns)
            df = pd.read_csv(path, usecols=[f for f in fields if f in header])
        except Exception:  # noqa: BLE001 - pandas raises many kinds; an unreadable CSV just has no kinds
            return None
        _KINDS_CACHE[key] = field_kinds(df, fields)
    return dict(_KINDS_CACHE[key])


def coerce_number(value: object, kind: str) -> int | float | None:
    """A value for a numeric field (a number, or text that reads as one, as pandas would) as ``kind``; None when
    missing.

    Raises:
        ValueError: not a finite number (``"abc"``, ``True``, NaN text, infinity) or a fraction for an ``int`` field.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_, list, tuple, dict)):
        raise ValueError(f"must be a number, got {type(value).__name__}")  # noqa: TRY004 - one error kind for callers
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {value[:40]!r}") from None
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {value!r}")
    if kind == "int":
        if number != int(number):
            raise ValueError(f"must be a whole number (the training data's column holds integers), got {value!r}")
        return int(number)
    return number


def format_value(value: object, kind: str | None = None) -> str:
    """Cell -> text: missing is '', a set literal like ``{DELIVERY,PRICE}`` loses its braces, and a list/tuple
    (e.g. a UI multiselect) is joined like the set literal: ``["DELIVERY", "PRICE"]`` -> ``DELIVERY,PRICE``.

    With ``kind`` (the field's :data:`FIELD_KINDS` entry in the training data) a numeric field formats exactly as
    the training CSV did: ``4``, ``4.0`` and ``"4"`` all read ``4.0`` for a ``float`` column (pandas' floats print as
    Python's), ``4`` for an ``int`` one; anything else raises ValueError (:func:`coerce_number`)."""
    if kind in ("int", "float"):
        number = coerce_number(value, kind)
        return "" if number is None else str(number)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(x) for x in value)
    s = str(value)
    m = _SET_LITERAL.match(s)
    return m.group(1) if m else s


def format_prompt(template: str, row: dict, kinds: dict[str, str] | None = None) -> str:
    """Fill the template with a row's values (pure; see :func:`format_value`). ``kinds``: the training data's
    :func:`field_kinds`, so that every caller (training, predict, serve, ui) formats a value as training did.

    Raises:
        ValueError: a value that does not fit its numeric field (names the field).
    """
    kinds = kinds or {}
    values = {}
    for k in template_fields(template):
        try:
            values[k] = format_value(row.get(k), kinds.get(k))
        except ValueError as e:
            raise ValueError(f"{k}: {e}") from None
    return template.format(**values)


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


def text_field(fields: Sequence[str]) -> str:
    """The field that holds the text: ``text`` where the template has one, else its last field."""
    return "text" if "text" in fields else fields[-1]


def read_table(path: str, where: str, empty: str) -> pd.DataFrame:
    """The CSV at ``path`` (``where`` names it in errors, e.g. with its config key), refusing a missing, unreadable
    or empty file (``empty``: that message)."""
    if not Path(path).is_file():
        raise InputError(f"{where}: file not found")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        raise InputError(f"{where}: cannot read CSV: {e}") from None
    if len(df) == 0:
        raise InputError(f"{where}: {empty}")
    return df


def unique_ids(df: pd.DataFrame, id_column: str, where: str) -> pd.Series:
    """``df``'s id column (present), refusing an empty or duplicate id (the message names its CSV row)."""
    ids = df[id_column]
    if ids.isna().any():
        raise InputError(f"{where}: empty id in column {id_column!r} at row {int(ids.isna().idxmax()) + 2}")
    dup = ids.duplicated()
    if dup.any():
        raise InputError(f"{where}: duplicate id {py_scalar(ids[dup].iloc[0])!r} in column {id_column!r} "
                         f"at row {int(dup.idxmax()) + 2}")
    return ids


def binary_labels(df: pd.DataFrame, cols: Sequence[str], ids: pd.Series, where: str) -> np.ndarray:
    """rows x ``cols`` as int8 0/1, refusing any other value (the message names the row, its id and the column).
    One stray string makes pandas read a whole column as text ('0', '1', 'yes'): values compare as numbers."""
    raw = df[list(cols)]
    numeric = raw.apply(pd.to_numeric, errors="coerce")
    ok = (numeric.isin([0, 1]) & numeric.notna()).to_numpy()
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise InputError(f"{where}: row {r + 2} (id {py_scalar(ids.iloc[r])!r}) column {cols[c]!r}: label value "
                         f"{py_scalar(raw.iloc[r, c])!r} is not 0 or 1")
    return numeric.to_numpy(dtype=np.int8)


def read_csv(path: str | Path, args: DataArgs, labelled: bool = True,
             label_names: Sequence[str] | None = None, kinds: dict[str, str] | None = None) -> Dataset:
    """Read and validate a CSV in the competition format (or any CSV with configured columns).

    ``kinds``: the training data's :func:`field_kinds` (an adapter's), so that a numeric field formats as in training
    whatever dtype pandas gives it here (``4`` in this CSV, ``4.0`` in training's). Labelled data whose text field
    (:func:`text_field`) is empty in every row is refused; empty rows among others are counted in the log.

    Raises:
        InputError: missing file, missing columns, duplicate ids, labels other than 0/1, empty data set, a text
            column with no text, a value that does not fit ``kinds``.
    """
    path = str(path)
    df = read_table(path, path, "the data set is empty (no rows)")
    need = [args.id_column, *template_fields(args.text_template)]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (data.id_column / data.text_template); "
                         f"found {list(df.columns)[:12]}")
    ids = unique_ids(df, args.id_column, path)
    fields = template_fields(args.text_template)
    own = field_kinds(df, fields)
    use = {**own, **(kinds or {})}
    records = df[fields].to_dict("records")
    texts = []
    for i, r in enumerate(records):
        try:
            texts.append(format_prompt(args.text_template, r, use))
        except ValueError as e:
            raise InputError(f"{path}: row {i + 2} (id {py_scalar(ids.iloc[i])!r}): {e}") from None
    if fields:
        tf = text_field(fields)
        empty = int(sum(1 for r in records if not format_value(r.get(tf)).strip()))
        if empty == len(records) and labelled:
            raise InputError(f"{path}: the text column {tf!r} is empty in every row ({empty} rows): nothing to learn "
                             f"from (check data.text_template and the CSV's columns)")
        if empty:
            logger.info(f"{path}: {empty} of {len(records)} rows have an empty {tf!r}")
    labels = None
    if labelled:
        cols = label_columns(df, args, path) if label_names is None else list(label_names)
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise InputError(f"{path}: label column(s) not found: {missing}")
        labels = binary_labels(df, cols, ids, path)
        names = cols
    else:
        names = list(label_names or [])
    return Dataset(path=path, ids=ids.to_numpy(), texts=texts, labels=labels, label_names=names, field_kinds=use)


def read_label_descriptions(path: str | Path | None, label_names: Sequence[str]) -> dict[str, str]:
    """Human-readable class names from a CSV of (class id, name) rows (data.label_names_csv)."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: label names file not found (data.label_names_csv)")
    df = pd.read_csv(path)
    if df.shape[1] < 2:
        raise InputError(f"{path}: needs at least two columns (class id, name)")
    # An empty name cell reads as NaN: that class has no description (not the text "nan").
    by_id = {str(k): str(v).strip() for k, v in zip(df.iloc[:, 0], df.iloc[:, 1]) if pd.notna(v) and str(v).strip()}
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
