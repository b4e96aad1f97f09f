"""Audit a labelled CSV (``python -m infer audit``): duplicates, conflicting labels, likely label errors, empty rows.

Every row is looked at through one text: by default the template's text field (``{text}`` of
``data.text_template``, :func:`core.data.text_field`), formatted by :mod:`core.data`'s one formatter; ``on="prompt"``
uses the whole prompt the model sees instead (for DLS: the assessment and the tags too). The reasons a row is
flagged (docs/audit.md):

* ``empty_text`` / ``punctuation_only``: the text field holds nothing, or only punctuation and white space (emoji
  count as content). These rows take no part in the duplicate checks.
* ``exact_duplicate``: another labelled row has the same text after :func:`normalise_text` (Unicode NFKC, case
  folded, runs of white space made one space, trimmed).
* ``near_duplicate``: another labelled row's text is not the same after normalising but has a cosine similarity
  >= ``near_threshold`` (TF-IDF of character 3-5-grams within word boundaries, scikit-learn's ``NearestNeighbors``)
  on their letters and digits (:func:`near_text`).
* ``exact_conflict`` / ``near_conflict``: such a duplicate carries other labels.
* ``label_issue``: cleanlab's confident learning (``find_label_issues(multi_label=True)``) on out-of-fold
  probabilities says the given labels are likely wrong; ``label_quality`` (cleanlab's multi-label self-confidence
  score, low = suspect) and ``suspect_labels`` (``-name``: given but likely absent, ``+name``: likely missing) say why.
* ``test_exact_in_train`` / ``test_near_in_train``: a row of the unlabelled test CSV duplicates labelled rows.

Two training-label files follow from the flags (``data.train_labels_csv`` of ``python -m train``, which trains on
them and still scores the original labels): ``train_labels_dropped.csv``, the labelled CSV without the rows flagged
for one of ``drop`` (:data:`DROP_REASONS` by default), and ``train_labels_majority.csv``, every row, those of an
exact-duplicate group given the group's per-class majority (:func:`majority_fix`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import RunConfig
from core.data import Dataset, read_csv, template_fields, text_field
from core.errors import InputError
from core.io import align_ids, atomic_dir, atomic_path, optimistic_reason, read_oof, versions, write_json

logger = logging.getLogger(__name__)

NEAR_THRESHOLD = 0.9
"""Default cosine similarity from which two different texts are near duplicates (docs/audit.md: on the DLS reviews,
pairs above it differ by punctuation, emoji, word order or an intensifier, and negation; from 0.85 to 0.9 one text
starts to be one topic of a longer one)."""
NGRAM_RANGE = (3, 5)
HIST_FLOOR = 0.5
"""Nearest-neighbour similarities below this are not looked up (the plot's histogram starts here)."""
ON_CHOICES = ("text", "prompt")
REASONS = ("empty_text", "punctuation_only", "exact_duplicate", "near_duplicate", "exact_conflict", "near_conflict",
           "label_issue", "test_exact_in_train", "test_near_in_train")
DROP_REASONS = ("empty_text", "punctuation_only", "exact_conflict", "near_conflict", "label_issue")
"""The reasons that leave a row out of ``train_labels_dropped.csv`` by default: duplicates whose labels agree stay."""
DROPPED_FILE, MAJORITY_FILE = "train_labels_dropped.csv", "train_labels_majority.csv"
OUTPUTS = ("flagged.csv", "summary.json", "audit.png", DROPPED_FILE, MAJORITY_FILE)
_BLANK_CATEGORIES = ("P", "Z", "C")  # punctuation, separators (spaces), control / format characters


def _is_variation_selector(ch: str) -> bool:
    """U+FE00..FE0F, U+E0100..E01EF: the marks that pick an emoji's presentation (``❤️`` = ``❤`` + U+FE0F)."""
    return 0xFE00 <= ord(ch) <= 0xFE0F or 0xE0100 <= ord(ch) <= 0xE01EF


# ------------------------------------------------------------------------------------------------- pure functions
def normalise_text(text: str) -> str:
    """The key of the exact-duplicate check: NFKC, case folded, white space collapsed to one space and trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def near_text(text: str) -> str:
    """What the near-duplicate check compares: the normalised text with everything but letters, digits and combining
    marks made spaces (``очень долгая доставка.`` and ``очень долгая доставка 🚚`` read ``очень долгая доставка``);
    '' when no letter or digit is left (an emoji-only text is compared exactly, never nearly)."""
    kept = "".join(ch if unicodedata.category(ch)[0] in "LNM" and not _is_variation_selector(ch) else " "
                   for ch in normalise_text(text))
    if not any(unicodedata.category(ch)[0] in "LN" for ch in kept):
        return ""
    return " ".join(kept.split())


def empty_reason(text: str) -> str | None:
    """``empty_text`` (nothing but white space), ``punctuation_only`` (only punctuation / white space / control
    characters; letters, digits, symbols and emoji are content) or None."""
    if not text.strip():
        return "empty_text"
    if all(unicodedata.category(ch)[0] in _BLANK_CATEGORIES for ch in text):
        return "punctuation_only"
    return None


def exact_groups(keys: Sequence[str | None]) -> np.ndarray:
    """Group number of each row whose key occurs more than once (numbered by first row), -1 otherwise; a None key
    (a row left out) is never grouped."""
    counts: dict[str, int] = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    number: dict[str, int] = {}
    out = np.full(len(keys), -1, dtype=np.int64)
    for i, k in enumerate(keys):
        if k is not None and counts[k] > 1:
            out[i] = number.setdefault(k, len(number))
    return out


def near_pairs(texts: Sequence[str], queries: Sequence[str] | None = None, floor: float = HIST_FLOOR,
               ngram_range: tuple[int, int] = NGRAM_RANGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of texts with a TF-IDF character n-gram cosine similarity >= ``floor``.

    Within ``texts`` (``queries`` None): pairs ``i < j``. Otherwise ``i`` indexes ``queries`` and ``j`` ``texts``.
    The vocabulary and idf are fitted on both. Returns (i, j, similarity) arrays.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if not texts or (queries is not None and not queries):
        return empty
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=ngram_range, sublinear_tf=True, lowercase=False,
                          dtype=np.float32)
    vec.fit(list(texts) + list(queries or []))
    x = vec.transform(texts)
    q = x if queries is None else vec.transform(queries)
    nn = NearestNeighbors(radius=1.0 - floor + 1e-6, metric="cosine", algorithm="brute").fit(x)
    dist, idx = nn.radius_neighbors(q, return_distance=True)
    rows = np.repeat(np.arange(len(idx)), [len(a) for a in idx])
    cols = np.concatenate(idx).astype(np.int64) if len(idx) else np.zeros(0, np.int64)
    sims = 1.0 - np.concatenate(dist).astype(np.float64) if len(dist) else np.zeros(0)
    keep = rows < cols if queries is None else np.ones(len(rows), dtype=bool)
    return rows[keep], cols[keep], np.clip(sims[keep], 0.0, 1.0)


def conflicts(pairs: Sequence[tuple[int, int]], labels: np.ndarray) -> dict[int, list[int]]:
    """For each row of a duplicate pair whose label vectors differ, the rows it conflicts with (pure)."""
    out: dict[int, list[int]] = {}
    for i, j in pairs:
        if not np.array_equal(labels[i], labels[j]):
            out.setdefault(int(i), []).append(int(j))
            out.setdefault(int(j), []).append(int(i))
    return out


def group_pairs(groups: np.ndarray) -> list[tuple[int, int]]:
    """Every pair of rows sharing a group number (>= 0)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0:
            members.setdefault(int(g), []).append(i)
    return [(a, b) for rows in members.values() for k, a in enumerate(rows) for b in rows[k + 1:]]


def majority(labels: np.ndarray) -> np.ndarray:
    """The classes more than half of the rows hold (0/1 vector): the majority vote of a duplicate group."""
    labels = np.asarray(labels)
    return (2 * labels.sum(axis=0) > len(labels)).astype(np.int8)


def majority_fix(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Labels with each exact-duplicate group's rows (``groups`` >= 0, :func:`exact_groups`) given the group's
    per-class majority vote; a tie keeps the row's own label, a row in no group (-1) keeps its labels (pure)."""
    labels = np.asarray(labels)
    out = labels.copy()
    for g in np.unique(groups[groups >= 0]):
        rows = np.flatnonzero(groups == g)
        decided = 2 * labels[rows].sum(axis=0) != len(rows)  # a tie decides nothing
        out[np.ix_(rows, decided)] = majority(labels[rows])[decided]
    return out


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Confident learning on out-of-fold probabilities (cleanlab, multi-label).

    Returns:
        (issue mask per row from ``cleanlab.filter.find_label_issues(multi_label=True)``, label-quality score per
        row (``cleanlab.multilabel_classification.get_label_quality_scores``, self-confidence, low = suspect),
        N x L mask of the classes that look mislabelled (``find_multilabel_issues_per_class``), number of cleanlab
        warnings about classes too small to judge).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class

    present = int((np.asarray(labels).sum(axis=0) > 0).sum())
    if present < 2:
        raise ValueError(f"label issues need at least two classes among the rows' given labels, found {present}")
    given = [list(np.flatnonzero(row)) for row in np.asarray(labels)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # n_jobs=1: cleanlab's process pool costs more than it saves on a few thousand rows, and would compete
        # for the cores with training runs.
        mask = find_label_issues(given, probs, multi_label=True, n_jobs=1)
        per_class = np.asarray(find_multilabel_issues_per_class(given, probs, n_jobs=1), dtype=bool)
        quality = get_label_quality_scores(given, probs)
    for w in caught:
        logger.debug(f"cleanlab: {w.message}")
    return np.asarray(mask, dtype=bool), np.asarray(quality, dtype=np.float64), per_class, len(caught)


# ---------------------------------------------------------------------------------------------------------- audit
@dataclasses.dataclass
class Audit:
    """What :func:`audit` found: the flagged rows (one per file and id), the summary, and what the plot draws."""

    flagged: pd.DataFrame
    summary: dict
    nearest: np.ndarray
    """Each labelled row's highest similarity to a different text (NaN below :data:`HIST_FLOOR`)."""
    quality: np.ndarray | None
    exact_group: np.ndarray | None = None
    """Each labelled row's exact-duplicate group (:func:`exact_groups`; -1: none)."""
    row_reasons: list[list[str]] | None = None
    """Each labelled row's reasons (empty: not flagged)."""


def _rows_by_key(keys: Sequence[str | None]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            out.setdefault(k, []).append(i)
    return out


def _expand(u, v, sim, keys_u, keys_v, rows_u, rows_v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of distinct texts -> pairs of rows (every row of the one text with every row of the other)."""
    a, b, s = [], [], []
    for x, w, z in zip(u, v, sim):
        for i in rows_u[keys_u[x]]:
            for j in rows_v[keys_v[w]]:
                a.append(i)
                b.append(j)
                s.append(z)
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64), np.asarray(s, dtype=np.float64)


def _names(vector: np.ndarray, label_names: Sequence[str]) -> str:
    return " ".join(label_names[k] for k in np.flatnonzero(vector))


def _ids(ids: np.ndarray, rows) -> str:
    return " ".join(str(ids[r].item() if isinstance(ids[r], np.generic) else ids[r]) for r in sorted(set(rows)))


def read_texts(path: str | Path, data, on: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(ids, the texts compared, the raw text field) of a CSV, through :func:`core.data.read_csv`'s formatter."""
    tf = text_field(template_fields(data.text_template))
    own = read_csv(path, dataclasses.replace(data, text_template="{" + tf + "}"), labelled=False)
    if on == "text":
        return own.ids, own.texts, own.texts
    return own.ids, read_csv(path, data, labelled=False).texts, own.texts


def audit(train: Dataset, train_raw: Sequence[str], compared: Sequence[str], *, test_ids: np.ndarray | None = None,
          test_compared: Sequence[str] | None = None, test_raw: Sequence[str] | None = None,
          oof_rows: np.ndarray | None = None, oof_probs: np.ndarray | None = None,
          near_threshold: float = NEAR_THRESHOLD, oof_source: str = "the out-of-fold probabilities") -> Audit:
    """Flag the rows of a labelled data set (and of a test set against it); see the module docstring for the reasons.

    Args:
        train: the labelled rows (ids, labels, label names).
        train_raw: each row's text field (the empty check); ``compared``: the text the duplicate checks compare.
        test_ids, test_compared, test_raw: the unlabelled rows, if any.
        oof_rows, oof_probs: positions in ``train`` of the out-of-fold rows, and their probabilities (L columns in
            ``train.label_names`` order), for the label-issue check.
        near_threshold: cosine similarity from which two different texts are near duplicates.
        oof_source: what the out-of-fold probabilities are called in errors (their file).

    Raises:
        InputError: a threshold outside (0, 1]; labels cleanlab cannot judge (fewer than two classes present).
    """
    if not 0.0 < near_threshold <= 1.0:
        raise InputError(f"--near-threshold must be in (0, 1], got {near_threshold}")
    ids, y, names = train.ids, train.labels, train.label_names
    n = len(ids)
    reasons: list[list[str]] = [[] for _ in range(n)]
    cols: dict[str, dict[int, object]] = {c: {} for c in ("label_quality", "suspect_labels", "exact_group",
                                                         "exact_group_size", "near_similarity", "duplicate_ids",
                                                         "conflict_ids", "majority_labels")}
    # Empty rows first: they are left out of the duplicate checks (all empty texts would be one big group).
    blank = [empty_reason(t) for t in train_raw]
    for i, r in enumerate(blank):
        if r:
            reasons[i].append(r)
    keys = [None if blank[i] else normalise_text(t) for i, t in enumerate(compared)]

    groups = exact_groups(keys)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0:
            members.setdefault(int(g), []).append(i)
    for g, rows in members.items():
        vote = _names(majority(y[rows]), names)
        for i in rows:
            reasons[i].append("exact_duplicate")
            cols["exact_group"][i], cols["exact_group_size"][i] = g, len(rows)
            cols["duplicate_ids"][i] = _ids(ids, [r for r in rows if r != i])
            cols["majority_labels"][i] = vote
    exact_conf = conflicts(group_pairs(groups), y)

    # Near duplicates: pairs of different normalised texts, found among the distinct texts and expanded to rows.
    rows_of = _rows_by_key(keys)
    distinct = [k for k in rows_of if near_text(k)]  # an emoji-only text has nothing to compare
    u, v, sim = near_pairs([near_text(k) for k in distinct])
    a, b, s = _expand(u, v, sim, distinct, distinct, rows_of, rows_of)
    nearest = np.full(n, np.nan)
    np.fmax.at(nearest, a, s)
    np.fmax.at(nearest, b, s)
    hit = s >= near_threshold
    near_partners: dict[int, list[int]] = {}
    for i, j in zip(a[hit], b[hit]):
        near_partners.setdefault(int(i), []).append(int(j))
        near_partners.setdefault(int(j), []).append(int(i))
    for i, partners in near_partners.items():
        reasons[i].append("near_duplicate")
        cols["near_similarity"][i] = round(float(nearest[i]), 4)
        cols["duplicate_ids"][i] = " ".join(filter(None, [cols["duplicate_ids"].get(i), _ids(ids, partners)]))
    near_conf = conflicts(list(zip(a[hit], b[hit])), y)
    for reason, found in (("exact_conflict", exact_conf), ("near_conflict", near_conf)):
        for i, others in found.items():
            reasons[i].append(reason)
            cols["conflict_ids"][i] = " ".join(filter(None, [cols["conflict_ids"].get(i), _ids(ids, others)]))

    quality_all = None
    warned = 0
    if oof_probs is not None:
        try:
            mask, quality, per_class, warned = label_issues(y[oof_rows], oof_probs)
        except ValueError as e:  # cleanlab's own checks of its inputs
            raise InputError(f"{oof_source}: cleanlab cannot judge these labels: {e}") from None
        quality_all = quality
        for k, i in enumerate(oof_rows):
            i = int(i)
            cols["label_quality"][i] = round(float(quality[k]), 4)
            if mask[k]:
                reasons[i].append("label_issue")
                cols["suspect_labels"][i] = " ".join(("-" if y[i, c] else "+") + names[c]
                                                     for c in np.flatnonzero(per_class[k]))

    records = []
    for i in range(n):
        if reasons[i]:
            records.append({"file": "train", "id": ids[i], "reasons": " ".join(reasons[i]), "text": train_raw[i],
                            "labels": _names(y[i], names), **{c: v.get(i) for c, v in cols.items()}})
    test_counts = {}
    if test_ids is not None:
        test_records, test_counts = _audit_test(ids, y, names, keys, test_ids, test_compared, test_raw,
                                                near_threshold)
        records += test_records
    flagged = pd.DataFrame.from_records(records, columns=["file", "id", "reasons", "text", "labels", *cols])
    flagged = flagged.astype({"exact_group": "Int64", "exact_group_size": "Int64", "label_quality": "Float64",
                              "near_similarity": "Float64"})
    summary = {
        "rows": n, "flagged_rows": int((flagged["file"] == "train").sum()),
        "counts": {k: v for k, v in reason_counts(flagged, "train").items()
                   if k != "label_issue" or oof_probs is not None},
        "exact_groups": len(members), "exact_conflict_groups": len({int(groups[i]) for i in exact_conf}),
        "oof_rows": None if oof_rows is None else len(oof_rows), "cleanlab_warnings": warned,
        **test_counts,
    }
    if test_ids is not None:
        summary["test_counts"] = reason_counts(flagged, "test")
    return Audit(flagged=flagged, summary=summary, nearest=nearest, quality=quality_all, exact_group=groups,
                 row_reasons=reasons)


def reason_counts(flagged: pd.DataFrame, file: str) -> dict[str, int]:
    """Rows of one file (``train`` / ``test``) flagged for each reason that can apply to it."""
    reasons = flagged.loc[flagged["file"] == file, "reasons"].str.split()
    names = [r for r in REASONS if r.startswith("test_") == (file == "test") or r in ("empty_text", "punctuation_only")]
    return {r: int(reasons.apply(lambda rs, r=r: r in rs).sum()) for r in names}


def _audit_test(ids, y, names, keys, test_ids, test_compared, test_raw, near_threshold):
    """Test rows that duplicate labelled rows (exact or near), with those rows' ids and majority labels."""
    records = []
    by_key = _rows_by_key(keys)
    blank = [empty_reason(t) for t in test_raw]
    tkeys = [None if blank[i] else normalise_text(t) for i, t in enumerate(test_compared)]
    t_rows = _rows_by_key(tkeys)
    distinct, t_distinct = [k for k in by_key if near_text(k)], [k for k in t_rows if near_text(k)]
    u, v, sim = near_pairs([near_text(k) for k in distinct], [near_text(k) for k in t_distinct])
    qs, ts, s = _expand(u, v, sim, t_distinct, distinct, t_rows, by_key)
    near: dict[int, list[tuple[int, float]]] = {}
    for q, t, z in zip(qs, ts, s):
        if z >= near_threshold and tkeys[q] != keys[t]:
            near.setdefault(int(q), []).append((int(t), float(z)))
    train_rows_hit = set()
    for q in range(len(test_ids)):
        rs, row = [], {}
        if blank[q]:
            rs.append(blank[q])
        exact = by_key.get(tkeys[q], []) if tkeys[q] is not None else []
        partners = [t for t, _ in near.get(q, [])]
        if exact:
            rs.append("test_exact_in_train")
        if partners:
            rs.append("test_near_in_train")
            row["near_similarity"] = round(max(sim for _, sim in near[q]), 4)
        if not rs:
            continue
        hit = exact or partners  # the majority of the exact duplicates, else of the near ones
        train_rows_hit.update(exact + partners)
        row["duplicate_ids"] = _ids(ids, exact + partners) or None
        row["majority_labels"] = _names(majority(y[hit]), names) if hit else None
        records.append({"file": "test", "id": test_ids[q], "reasons": " ".join(rs), "text": test_raw[q], **row})
    counts = {"test_rows": len(test_ids), "test_flagged_rows": len(records),
              "train_rows_duplicated_in_test": len(train_rows_hit)}  # reason counts: reason_counts(..., "test")
    return records, counts


# ---------------------------------------------------------------------------------------------------- file level
def check_out_folder(out: str | Path) -> None:
    """The output folder must be new, empty, or an earlier audit's (only :data:`OUTPUTS` in it): it is replaced."""
    out = Path(out)
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if other:
            raise InputError(f"--out {out}: folder holds other files ({', '.join(other[:5])}); give a new folder")


def plot(result: Audit, path: Path, near_threshold: float) -> None:
    """Counts per reason, the nearest-neighbour similarity histogram and (with OOF) the label-quality histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if result.quality is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.6))
    counts = result.summary["counts"]
    axes[0].barh(list(counts), list(counts.values()), color="tab:blue")
    axes[0].invert_yaxis()
    for k, v in enumerate(counts.values()):
        axes[0].text(v, k, f" {v}", va="center", fontsize=8)
    axes[0].set_title(f"flagged rows per reason ({result.summary['rows']} labelled rows)")
    near = result.nearest[np.isfinite(result.nearest)]
    axes[1].hist(near, bins=np.linspace(HIST_FLOOR, 1.0, 51), color="tab:gray")
    axes[1].axvline(near_threshold, color="tab:red", label=f"near threshold {near_threshold}")
    axes[1].set_yscale("log")
    axes[1].set_title("each labelled row's most similar other text")
    axes[1].set_xlabel("cosine similarity (char 3-5-gram TF-IDF)")
    axes[1].legend()
    if result.quality is not None:
        issue = result.flagged.loc[result.flagged["reasons"].str.contains("label_issue"), "label_quality"]
        bins = np.linspace(0, 1, 41)
        axes[2].hist(result.quality, bins=bins, color="tab:gray", label="all out-of-fold rows")
        axes[2].hist(issue.astype(float), bins=bins, color="tab:red", label="label_issue")
        axes[2].set_yscale("log")
        axes[2].set_title("cleanlab label quality (low = suspect)")
        axes[2].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def check_drop(drop: Sequence[str]) -> list[str]:
    """The reasons of ``--drop``, checked: each must be one a labelled row can have."""
    known = [r for r in REASONS if not r.startswith("test_")]
    bad = [r for r in drop if r not in known]
    if bad:
        raise InputError(f"--drop: unknown reason(s) {bad} (a labelled row's reasons: {', '.join(known)})")
    return list(drop)


def training_label_files(path: str | Path, train: Dataset, result: Audit,
                         drop: Sequence[str] = DROP_REASONS) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The two training-label files for ``data.train_labels_csv`` (every column of the labelled CSV, cells verbatim):
    the rows flagged for none of ``drop``, and every row with each exact-duplicate group's majority labels
    (:func:`majority_fix`; only the label cells of the rows it changes are rewritten, as 0/1); and what the summary
    says of them."""
    df = pd.read_csv(path, keep_default_na=False, dtype=str)  # verbatim: no float or NaN rewriting
    df.columns = ["" if re.fullmatch(r"Unnamed: \d+", c) else c for c in df.columns]  # a nameless column stays so
    dropped = np.array([any(r in drop for r in rs) for rs in result.row_reasons], dtype=bool)
    fixed = majority_fix(train.labels, result.exact_group)
    changed = (fixed != train.labels).any(axis=1)
    majority_df = df.copy()
    majority_df.loc[changed, train.label_names] = fixed[changed].astype(str)
    info = {"drop_reasons": list(drop), "dropped_rows": int(dropped.sum()), "kept_rows": int((~dropped).sum()),
            "majority_rows_changed": int(changed.sum()), "majority_labels_changed": int((fixed != train.labels).sum()),
            "majority_of": "exact-duplicate groups, per class; a tie keeps the row's own label"}
    return df[~dropped], majority_df, info


def run_audit(labels: str | Path, out: str | Path, cfg: RunConfig, config_source: str, *,
              oof: str | Path | None = None, test: str | Path | None = None, on: str = "text",
              near_threshold: float = NEAR_THRESHOLD, drop: Sequence[str] = DROP_REASONS) -> Audit:
    """Read the inputs, audit them and write ``flagged.csv``, ``summary.json``, ``audit.png`` and the training-label
    files (:func:`training_label_files`) into ``out`` (all or nothing)."""
    if on not in ON_CHOICES:
        raise InputError(f"--on must be one of {ON_CHOICES}, got {on!r}")
    drop = check_drop(drop)
    start = time.perf_counter()
    data = cfg.data
    train = read_csv(labels, data)
    raw = read_texts(labels, data, "text")[2]
    compared = train.texts if on == "prompt" else raw
    kw = {}
    if test is not None:
        kw["test_ids"], kw["test_compared"], kw["test_raw"] = read_texts(test, data, on)
    note = None
    if oof is not None:
        oof_ids, probs, _, _ = read_oof(oof, train.label_names)  # a fold column is allowed
        kw["oof_rows"] = align_ids(oof, oof_ids, labels, train.ids)
        kw["oof_probs"] = probs
        note = optimistic_reason(oof)
        if note:
            logger.info(f"note: {oof}: {note}; its label issues are understated")
    result = audit(train, raw, compared, near_threshold=near_threshold, oof_source=str(oof), **kw)
    dropped, majority_df, label_files = training_label_files(labels, train, result, drop)
    elapsed = time.perf_counter() - start
    result.summary = {
        "kind": "data audit", **result.summary,
        "inputs": {"labels": str(labels), "oof": None if oof is None else str(oof),
                   "test": None if test is None else str(test), "config": config_source},
        "settings": {"on": on, "text_field": text_field(template_fields(data.text_template)),
                     "normalisation": "NFKC, casefold, white space collapsed", "near_threshold": near_threshold,
                     "near_method": f"TF-IDF char_wb {NGRAM_RANGE[0]}-{NGRAM_RANGE[1]}-grams, cosine, sklearn "
                                    "NearestNeighbors (brute)",
                     "label_issues": "cleanlab.filter.find_label_issues(multi_label=True, "
                                     "filter_by='prune_by_noise_rate')" if oof is not None else None,
                     "label_quality": "cleanlab.multilabel_classification.get_label_quality_scores "
                                      "(self_confidence)" if oof is not None else None},
        "training_labels": label_files, "oof_note": note, "data": dataclasses.asdict(data),
        "label_names": list(train.label_names),
        "elapsed_s": round(elapsed, 2), "versions": versions(("numpy", "pandas", "scikit-learn", "cleanlab")),
    }
    with atomic_dir(out) as tmp:
        result.flagged.to_csv(tmp / "flagged.csv", index=False)
        write_json(tmp / "summary.json", result.summary)
        plot(result, tmp / "audit.png", near_threshold)
        dropped.to_csv(tmp / DROPPED_FILE, index=False)
        majority_df.to_csv(tmp / MAJORITY_FILE, index=False)
    return result


def summary_lines(result: Audit, out: str | Path) -> list[str]:
    """The console summary: rows flagged per reason (labelled, and test when given), and where the files are."""
    s = result.summary
    test = s.get("test_counts")
    lines = [f"audit of {s['rows']} labelled rows" + (f" and {s['test_rows']} test rows" if test is not None else "")
             + f" ({s['elapsed_s']:.1f} s); rows flagged per reason (a row may have several):",
             f"  {'reason':<20} {'labelled':>9}" + (f" {'test':>7}" if test is not None else "")]
    for reason in REASONS:
        if reason not in s["counts"] and (test is None or reason not in test):
            continue
        own = s["counts"].get(reason)
        lines.append(f"  {reason:<20} {'' if own is None else own:>9}"
                     + (f" {test.get(reason, ''):>7}" if test is not None else ""))
    lines.append(f"  {'any':<20} {s['flagged_rows']:>9}" + (f" {s['test_flagged_rows']:>7}" if test is not None else ""))
    lines.append(f"  {s['exact_groups']} groups of exact duplicates, {s['exact_conflict_groups']} with conflicting "
                 f"labels")
    if s["oof_rows"] is None:
        lines.append("  label_issue: not checked (pass --oof)")
    t = s["training_labels"]
    lines.append(f"  training labels (data.train_labels_csv): {DROPPED_FILE} keeps {t['kept_rows']} rows "
                 f"({t['dropped_rows']} dropped for {' '.join(t['drop_reasons']) or 'no reason'}); {MAJORITY_FILE} "
                 f"changes the labels of {t['majority_rows_changed']} rows (exact-duplicate majority)")
    lines.append(f"wrote {Path(out) / 'flagged.csv'}, summary.json, audit.png, {DROPPED_FILE}, {MAJORITY_FILE}")
    return lines
