"""Web UI for one adapter (``python -m infer ui``): a Streamlit form built from the adapter's prompt template, and a
CSV tab that scores an uploaded file in batches.

Form fields come from ``data.text_template`` (:func:`core.data.template_fields`), typed from the adapter's training
CSV (``data.train_csv`` of its ``run_config.yaml``) where that file is readable here:

* a numeric column: a number input with the training range (and the same int/float type, so that the prompt reads
  ``2.0`` exactly as in training);
* a column of set literals like ``{DELIVERY,PRICE}``: a multiselect over the training data's tag set;
* anything else (and every field when the training CSV is not readable): a text area, at most ``--max-text-chars``
  characters, not empty unless ``--allow-empty`` or the training data has empty values in it.

Every prompt is built with :func:`core.data.format_prompt` (the one formatter of training and prediction).
Decoding: ``--thresholds`` (``python -m infer tune``'s thresholds.json), else :func:`default_spec`.

The model runs in the UI process (``infer.predict.load_predictor``) or, with ``--api URL``, in a running
``python -m infer serve`` (``POST /predict`` with ``{"rows": [{field: value}]}``; see :func:`api_predict`).

Usage:
    python -m infer ui --adapter RUN/fold_0/last [--api http://127.0.0.1:8000] [--port 8501]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.adapter import AdapterRef
from core.data import format_prompt, template_fields
from core.decoding import adapter_default_spec, adapter_spec, own_thresholds
from core.errors import InputError
from core.sets import SetDecoder, cascade_of
from core.thresholds import ThresholdSpec

APP = Path(__file__).with_name("ui_app.py")
ARGS_ENV = "QLML_UI_ARGS"
"""Environment variable with the app's arguments (a shell-quoted string), read when ``sys.argv`` has none."""
DEFAULT_MAX_CHARS = 250
API_KEY_ENV = "QLML_API_KEY"
"""The key the UI sends to its ``--api`` server (``Authorization: Bearer``), when set."""


@dataclass
class FormField:
    """One input of the form (one template field)."""

    name: str
    kind: str
    """``number``, ``multiselect`` or ``text``."""
    options: list[str] = field(default_factory=list)
    min_value: float | int | None = None
    max_value: float | int | None = None
    default: object = None
    step: float | int | None = None
    integer: bool = False
    required: bool = True
    """Text fields only: an empty value is refused."""


@dataclass
class UIConfig:
    """What the app needs, parsed from its command line (:func:`parse_app_args`)."""

    adapter: str
    api: str | None = None
    thresholds: str | None = None
    max_text_chars: int = DEFAULT_MAX_CHARS
    allow_empty: bool = False
    batch_size: int = 32
    base_model: str | None = None
    device: str | None = None


def app_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer/ui_app.py", add_help=False)
    p.add_argument("--adapter", required=True)
    p.add_argument("--api")
    p.add_argument("--thresholds")
    p.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_CHARS)
    p.add_argument("--allow-empty", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--base-model")
    p.add_argument("--device")
    return p


def parse_app_args(argv: Sequence[str] | None = None) -> UIConfig:
    """The app's arguments: ``argv``, else ``$QLML_UI_ARGS`` if set, else ``sys.argv[1:]``."""
    if argv is None:
        argv = shlex.split(os.environ[ARGS_ENV]) if os.environ.get(ARGS_ENV) else sys.argv[1:]
    a, _ = app_parser().parse_known_args(list(argv))
    if a.max_text_chars < 1:
        raise InputError(f"--max-text-chars must be >= 1, got {a.max_text_chars}")
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {a.batch_size}")
    return UIConfig(adapter=a.adapter, api=a.api, thresholds=a.thresholds, max_text_chars=a.max_text_chars,
                    allow_empty=a.allow_empty, batch_size=a.batch_size, base_model=a.base_model, device=a.device)


# ---------------------------------------------------------------------------------------------------------------
# Form fields from the template and the training data
# ---------------------------------------------------------------------------------------------------------------


def _set_items(value: str) -> list[str]:
    inner = value.strip()[1:-1]
    return [t.strip() for t in inner.split(",") if t.strip()]


def _is_set_literal(value) -> bool:
    return isinstance(value, str) and value.strip().startswith("{") and value.strip().endswith("}")


def form_fields(ref: AdapterRef, allow_empty: bool = False) -> list[FormField]:
    """The form's inputs: one per template field, typed from the adapter's training CSV when it is readable."""
    import pandas as pd

    names = template_fields(ref.cfg.data.text_template)
    df = None
    train_csv = Path(ref.cfg.data.train_csv)
    if train_csv.is_file():
        try:
            header = list(pd.read_csv(train_csv, nrows=0).columns)
            df = pd.read_csv(train_csv, usecols=[n for n in names if n in header])
        except Exception:  # noqa: BLE001 - an unreadable training CSV just means untyped fields
            df = None
    out = []
    for name in names:
        col = df[name] if df is not None and name in df.columns else None
        present = col.dropna() if col is not None else None
        if present is not None and len(present) and pd.api.types.is_numeric_dtype(col) \
                and not pd.api.types.is_bool_dtype(col):
            integer = pd.api.types.is_integer_dtype(col)
            lo, hi = present.min(), present.max()
            whole = bool(np.all(np.asarray(present) == np.round(np.asarray(present))))
            cast = int if integer else float
            out.append(FormField(name, "number", min_value=cast(lo), max_value=cast(hi),
                                 default=cast(present.median() if not integer else round(present.median())),
                                 step=cast(1) if whole else (hi - lo) / 100 or 0.1, integer=integer))
        elif present is not None and len(present) and present.map(_is_set_literal).all():
            tags = sorted({t for v in present for t in _set_items(v)})
            out.append(FormField(name, "multiselect", options=tags, required=False))
        else:
            has_empty = col is not None and (col.isna().any() or (col.astype(str).str.strip() == "").any())
            out.append(FormField(name, "text", required=not (allow_empty or has_empty)))
    return out


def validate(fields: Sequence[FormField], values: dict, max_chars: int) -> list[str]:
    """Messages for text fields that are empty (when required) or longer than ``max_chars``."""
    msgs = []
    for f in fields:
        if f.kind != "text":
            continue
        v = values.get(f.name)
        s = "" if v is None else str(v)
        if f.required and not s.strip():
            msgs.append(f"{f.name}: may not be empty")
        elif len(s) > max_chars:
            msgs.append(f"{f.name}: at most {max_chars} characters ({len(s)} given)")
    return msgs


def row_prompt(template: str, values: dict, kinds: dict[str, str] | None = None) -> str:
    """The prompt of one form row: :func:`core.data.format_prompt` (a multiselect list reads like ``{A,B}``), with
    the training data's field ``kinds`` (``AdapterRef.field_kinds``) so that numbers format as in training.

    Raises:
        InputError: a value that does not fit its numeric field."""
    try:
        return format_prompt(template, values, kinds)
    except ValueError as e:
        raise InputError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# Decoding and the result shown
# ---------------------------------------------------------------------------------------------------------------


default_spec = adapter_default_spec
load_spec = adapter_spec


def threshold_lines(spec: ThresholdSpec | SetDecoder) -> list[tuple[float, str]]:
    """(value, caption) of the thresholds drawn on the chart: the cascade's first and lowest step (of a set
    decoding: its cascade candidate's)."""
    steps = cascade_of(spec).steps
    lines = [(steps[0], f"cascade start {steps[0]:g}")]
    if steps[-1] != steps[0]:
        lines.append((steps[-1], f"lowest step {steps[-1]:g}"))
    return lines


def result_frame(probs: np.ndarray, pred: np.ndarray, spec: ThresholdSpec | SetDecoder, descriptions: dict[str, str]):
    """One row's classes sorted by probability: label, name, probability, predicted, own threshold (offsets)."""
    import pandas as pd

    names = list(spec.label_names)
    casc = cascade_of(spec)
    offsets = np.zeros(len(names)) if casc.class_offsets is None else np.asarray(casc.class_offsets)
    df = pd.DataFrame({"label": names, "name": [descriptions.get(n, n) for n in names],
                       "probability": np.asarray(probs, dtype=float), "predicted": np.asarray(pred).astype(bool),
                       "start_threshold": casc.steps[0] + offsets})
    return df.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)


def chart(frame, spec: ThresholdSpec | SetDecoder):
    """Horizontal bar chart of every class's probability (sorted), the predicted set highlighted, thresholds drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frame)
    fig, ax = plt.subplots(figsize=(7.0, 0.2 * n + 1.0), dpi=90)
    y = np.arange(n)[::-1]
    colors = ["#d62728" if p else "#9bb7d4" for p in frame["predicted"]]
    ax.barh(y, frame["probability"], color=colors)
    ax.set_yticks(y, [f"{name} ({label})" if name != label else label
                      for name, label in zip(frame["name"], frame["label"])], fontsize=8)
    for (value, caption), style in zip(threshold_lines(spec), ("--", ":")):
        ax.axvline(value, color="black", linestyle=style, linewidth=1, label=caption)
    if cascade_of(spec).class_offsets is not None:
        ax.scatter(frame["start_threshold"], y, marker="|", color="black", s=60, label="tuned start per class")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (red: predicted)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Backends: in-process predictor or a running `python -m infer serve`
# ---------------------------------------------------------------------------------------------------------------


def api_predict(url: str, rows: list[dict], timeout: float = 120.0) -> list[dict]:
    """POST ``{"rows": rows}`` to ``URL/predict``; returns the server's per-row answers (one dict per row).

    The server answers ``{"rows": [...]}`` or a bare list (``predictions`` / ``results`` are accepted too), each
    row with ``probabilities`` (``{label: p}`` or a list in label order) and the decoded set.

    Raises:
        InputError: the server cannot be reached, answers an error, or answers another number of rows.
    """
    import urllib.error
    import urllib.request

    body = json.dumps({"rows": rows}, default=str).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(API_KEY_ENV):  # a server started with --api-key-env
        headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
    req = urllib.request.Request(url.rstrip("/") + "/predict", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        raise InputError(f"--api {url}: POST /predict answered {e.code}: {e.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InputError(f"--api {url}: POST /predict failed: {e}") from None
    if isinstance(answer, dict):
        answer = next((answer[k] for k in ("rows", "predictions", "results") if k in answer), None)
    if not isinstance(answer, list) or len(answer) != len(rows):
        raise InputError(f"--api {url}: expected one answer per row ({len(rows)}), got {str(answer)[:200]}")
    return answer


_SET_KEYS = ("labels", "predicted", "decoded", "set", "classes", "target")


def parse_api_rows(answer: list[dict], label_names: Sequence[str], spec: ThresholdSpec | SetDecoder) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """Server answers -> (probabilities N x L, 0/1 predictions N x L) in ``label_names`` order.

    The decoded set may list label names or class ids (as in submissions); without one, ``spec`` decodes.
    """
    from core.thresholds import class_ids

    names = list(label_names)
    pos = {n: i for i, n in enumerate(names)}
    by_id = {str(c): i for i, c in enumerate(class_ids(names))}
    probs = np.zeros((len(answer), len(names)))
    preds = np.zeros((len(answer), len(names)), dtype=np.int8)
    decoded_all = True
    for r, row in enumerate(answer):
        p = row.get("probabilities") if isinstance(row, dict) else None
        if isinstance(p, dict):
            missing = [n for n in names if n not in p]
            if missing:
                raise InputError(f"--api: row {r} has no probability for {missing[:5]}")
            probs[r] = [float(p[n]) for n in names]
        elif isinstance(p, list) and len(p) == len(names):
            probs[r] = [float(x) for x in p]
        else:
            raise InputError(f"--api: row {r} has no 'probabilities' for the {len(names)} labels: {str(row)[:200]}")
        chosen = next((row[k] for k in _SET_KEYS if k in row), None)
        if chosen is None:
            decoded_all = False
            continue
        if isinstance(chosen, str):
            chosen = chosen.split()
        for item in chosen:
            i = pos.get(item, by_id.get(str(item)))
            if i is None:
                raise InputError(f"--api: row {r}: unknown class {item!r} in the decoded set")
            preds[r, i] = 1
    if not decoded_all:
        preds = spec.decode(probs)
    return probs, preds


class Backend:
    """Scores form rows: ``score(rows) -> (probs N x L, preds N x L)`` with the adapter's template and decoding."""

    def __init__(self, ref: AdapterRef, spec: ThresholdSpec | SetDecoder, api: str | None = None, predictor=None):
        self.ref = ref
        self.spec = spec
        self.api = api
        self.predictor = predictor
        # One predictor serves every browser session (st.cache_resource): adapter switching and its token cache are
        # per-model state, so in-process scoring runs one request at a time.
        self._lock = threading.Lock()

    @classmethod
    def create(cls, cfg: UIConfig) -> Backend:
        from infer.predict import collect, load_refs

        refs = collect([cfg.adapter])
        spec = load_spec(refs[0], cfg.thresholds or own_thresholds([r.folder for r in refs]))
        predictor = None
        if cfg.api is None:
            predictor = load_refs(refs, device=cfg.device, base_model=cfg.base_model)
        return cls(refs[0], spec, cfg.api, predictor)

    @property
    def label_names(self) -> list[str]:
        return list(self.ref.label_names)

    def score(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        if self.api is not None:
            send = [{k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()}
                    for r in rows]
            return parse_api_rows(api_predict(self.api, send), self.label_names, self.spec)
        texts = [row_prompt(self.predictor.data.text_template, r, self.ref.field_kinds) for r in rows]
        with self._lock:
            probs = self.predictor.predict_texts(texts, batch_size=64)
        return probs, self.spec.decode(probs)


def score_csv(backend: Backend, df, batch_size: int, progress=None):
    """Score a DataFrame (id column + template columns) in batches; returns (probs, preds).

    ``progress(done, total)`` is called after every batch.
    """
    data = backend.ref.cfg.data
    need = [data.id_column, *template_fields(data.text_template)]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"the CSV lacks column(s) {missing} (data.id_column / data.text_template); "
                         f"found {list(df.columns)[:12]}")
    rows = df[template_fields(data.text_template)].astype(object).where(df.notna(), None).to_dict("records")
    probs, preds = [], []
    for start in range(0, len(rows), batch_size):
        p, d = backend.score(rows[start:start + batch_size])
        probs.append(p)
        preds.append(d)
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    return np.concatenate(probs), np.concatenate(preds)

