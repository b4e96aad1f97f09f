"""Training data and its order: multilabel-stratified folds, the labels trained on (``data.train_labels_csv``),
length-grouped batches, each rank's optimizer steps, token-budget pieces, unlabelled corpora."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import DEFAULT_TEMPLATE, DataArgs
from core.data import Dataset, binary_labels, format_value, label_columns, read_table, template_fields, unique_ids
from core.errors import InputError
from core.io import align_ids


def make_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Deterministic multilabel-stratified K-fold assignment (fold index per row)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if len(labels) < n_folds:
        raise InputError(f"{len(labels)} labelled rows cannot be split into {n_folds} folds (cv.n_folds)")
    fold = np.full(len(labels), -1, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.shape[1] == 1:  # binary: iterative stratification needs >= 2 columns; plain stratified K-fold
        from sklearn.model_selection import StratifiedKFold

        splitter, target = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed), labels[:, 0]
    else:
        splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        target = labels
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), target)):
        fold[val] = k
    return fold


def holdout_split(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Deterministic multilabel-stratified hold-out: True for the rows held out (about ``frac`` of them: iterative
    stratification trades exact size for label balance, e.g. 729 of 3,700 rows at 0.2 on the DLS data)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if not 0 < frac < 1:
        raise InputError(f"the hold-out fraction must be between 0 and 1, got {frac}")
    labels = np.asarray(labels)
    n_out = round(len(labels) * frac)
    if n_out < 1 or n_out >= len(labels):
        raise InputError(f"{len(labels)} labelled rows cannot give a hold-out of {frac:.0%} (need >= 1 row each side)")
    if labels.shape[1] == 1:  # binary: iterative stratification needs >= 2 columns
        from sklearn.model_selection import StratifiedShuffleSplit

        splitter, target = StratifiedShuffleSplit(n_splits=1, test_size=n_out, random_state=seed), labels[:, 0]
    else:
        splitter, target = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=frac, random_state=seed), labels
    _, out = next(splitter.split(np.zeros(len(labels)), target))
    held = np.zeros(len(labels), dtype=bool)
    held[out] = True
    return held


@dataclass
class TrainingLabels:
    """``data.train_labels_csv`` over the rows of ``data.train_csv``: what the models train on (the folds and every
    score stay ``data.train_csv``'s)."""

    path: str
    labels: np.ndarray
    """rows x classes 0/1 in ``data.train_csv``'s row order: the file's labels (``data.train_csv``'s on the rows it
    lacks, which are not trained on)."""
    trained: np.ndarray
    """False on the rows of ``data.train_csv`` the file lacks: not trained on in any fold, nor in the final model."""
    relabelled: int
    """Rows trained on with other labels than ``data.train_csv``'s."""

    def describe(self) -> dict:
        """What ``summary.json`` records about it."""
        return {"csv": self.path, "rows": len(self.trained), "rows_not_trained": int((~self.trained).sum()),
                "rows_relabelled": self.relabelled}

    def log_line(self, scored_on: str) -> str:
        """What a run logs when it starts: the rows it does not train on and those it trains on changed labels."""
        t = self.describe()
        return (f"training labels from {t['csv']}: {t['rows_not_trained']} of {t['rows']} rows not trained on, "
                f"{t['rows_relabelled']} trained on changed labels (scored on {scored_on}'s labels)")


def read_training_labels(args: DataArgs, ds: Dataset) -> TrainingLabels | None:
    """``args.train_labels_csv`` (None when unset) matched by id to ``ds`` (``data.train_csv`` read by
    :func:`core.data.read_csv`).

    Raises:
        InputError: the file is missing or unreadable, has no rows, no id column, an empty or duplicate id, an id
            not in ``data.train_csv``, other label columns than ``data.train_csv``'s, or a label other than 0/1
            (each message names the file, and the row, id or column).
    """
    if args.train_labels_csv is None:
        return None
    path = str(args.train_labels_csv)
    where = f"{path} (data.train_labels_csv)"
    df = read_table(path, where, "no rows: nothing to train on")
    if args.id_column not in df.columns:
        raise InputError(f"{where}: no id column {args.id_column!r} (data.id_column; columns: "
                         f"{list(df.columns)[:12]})")
    ids = unique_ids(df, args.id_column, where)
    cols = label_columns(df, args, where)
    if args.label_columns is None and args.label_prefix is None:  # detected: not one where data.train_csv has it
        others = {str(c) for c in pd.read_csv(ds.path, nrows=0).columns} - set(ds.label_names)
        cols = [c for c in cols if c not in others]
    missing = [c for c in ds.label_names if c not in cols]
    extra = [c for c in cols if c not in ds.label_names]
    if missing or extra:
        raise InputError(f"{where}: the label columns must be those of {ds.path} (data.train_csv): " + "; ".join(
            ([f"missing {missing[:10]}"] if missing else []) + ([f"extra {extra[:10]}"] if extra else [])))
    given = binary_labels(df, ds.label_names, ids, where)
    pos = align_ids(where, ids.to_numpy(), ds.path, ds.ids)  # an id not in data.train_csv names its row
    labels = ds.labels.copy()
    labels[pos] = given
    trained = np.zeros(len(ds.ids), dtype=bool)
    trained[pos] = True
    return TrainingLabels(path, labels, trained, int((labels != ds.labels).any(axis=1).sum()))


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True,
                mega: int = 50) -> list[list[int]]:
    """Batches of row positions for one epoch, deterministic in ``seed``.

    With ``group_by_length``, rows are shuffled, cut into mega-batches of ``mega * batch_size`` rows, each sorted
    by length and cut into batches, and the batches shuffled: batches hold rows of similar length (little padding)
    while their order stays random (as transformers' LengthGroupedSampler).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    if group_by_length:
        lengths = np.asarray(lengths)
        chunks = [perm[i:i + mega * batch_size] for i in range(0, len(perm), mega * batch_size)]
        perm = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else perm
    batches = [perm[i:i + batch_size].tolist() for i in range(0, len(perm), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def rank_steps(batches: Sequence[Sequence[int]], grad_accum_steps: int, rank: int,
               world_size: int) -> tuple[list[list], list[int]]:
    """One epoch's micro-batches as this rank's optimizer steps, and the rows of each step over all ranks.

    Optimizer step g uses micro-batches ``batches[g*span:(g+1)*span]`` of all ranks together (rank r takes every
    world_size-th), ``span = grad_accum_steps * world_size``: the same steps as one process with
    ``grad_accum_steps * world_size``.
    """
    span = grad_accum_steps * world_size
    step_rows = [sum(len(b) for b in batches[i:i + span]) for i in range(0, len(batches), span)]
    mine = list(batches[rank::world_size])
    return [mine[i:i + grad_accum_steps] for i in range(0, len(mine), grad_accum_steps)], step_rows


def split_by_tokens(rows: Sequence[int], lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Cut one micro-batch into pieces whose padded size (rows x longest row) is at most ``max_tokens``.

    Rows are taken longest first, so each piece is padded to its own first row; a row longer than ``max_tokens``
    is a piece of its own. ``None`` keeps the micro-batch whole. Every row lands in exactly one piece.
    """
    rows = list(rows)
    if max_tokens is None or not rows:
        return [rows] if rows else []
    rows.sort(key=lambda i: -lengths[i])
    pieces: list[list[int]] = []
    for i in rows:
        if pieces and (len(pieces[-1]) + 1) * lengths[pieces[-1][0]] <= max_tokens:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return pieces


@dataclass
class Corpus:
    """Unlabelled text (``trim-vocab``, ``dapt``): the formatted prompts of every row with any text."""

    texts: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    """The non-empty template field values themselves."""
    files: list[dict] = field(default_factory=list)
    """One ``{"path", "rows", "rows_with_text"}`` per CSV."""


def split_paths(values: Iterable[str] | None) -> list[str]:
    """``--corpus a.csv,b.csv --corpus c.csv`` -> [a.csv, b.csv, c.csv]."""
    return [p.strip() for v in values or [] for p in str(v).split(",") if p.strip()]


def read_corpus(paths: Sequence[str | Path], template: str = DEFAULT_TEMPLATE, what: str = "corpus",
                template_key: str = "data.text_template") -> Corpus:
    """Every row of every CSV formatted with ``template`` (the prompts the model sees); rows whose template
    columns are all empty are skipped.

    Raises:
        InputError: no file given, a file missing / unreadable / without rows / without the template's columns,
            or a file with no text at all.
    """
    if not paths:
        raise InputError(f"no {what} CSV given (--corpus a.csv[,b.csv])")
    fields = template_fields(template)
    corpus = Corpus()
    for path in map(str, paths):
        if not Path(path).is_file():
            raise InputError(f"{path}: {what} file not found")
        try:
            df = pd.read_csv(path, keep_default_na=True)
        except pd.errors.EmptyDataError:
            raise InputError(f"{path}: the {what} file is empty (no header, no rows)") from None
        except Exception as e:  # noqa: BLE001 - pandas raises many kinds
            raise InputError(f"{path}: cannot read CSV: {e}") from None
        if len(df) == 0:
            raise InputError(f"{path}: the {what} file is empty (no rows)")
        missing = [c for c in fields if c not in df.columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing} used by {template_key} {template!r}; "
                             f"found {list(df.columns)[:12]}")
        kept = 0
        for record in df[fields].to_dict("records"):
            values = {k: format_value(record[k]) for k in fields}
            if any(v.strip() for v in values.values()):
                corpus.texts.append(template.format(**values))
                corpus.values += [v for v in values.values() if v.strip()]
                kept += 1
        if kept == 0:
            raise InputError(f"{path}: the {what} file has no text (columns {fields} are empty in all {len(df)} rows)")
        corpus.files.append({"path": path, "rows": len(df), "rows_with_text": kept})
    return corpus
