"""What a ``/predict`` request holds and what its answer says (pydantic), and the JSON errors.

A request is ``{"rows": [...]}``, each row an object with exactly the fields of the adapters' ``data.text_template``
(:func:`build_request_model`, built per app from those fields); :func:`parse_rows` applies the limits of
:class:`~infer.serve.settings.Settings` too. Every error is a :class:`ServeError`: ``{"error": message, "field":
..., "row": ...}`` with its HTTP status, naming the first bad field (``rows.3.text``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, create_model

from core.adapter import AdapterRef, base_model_id, is_hub_model_id
from core.data import format_value, template_fields, text_field
from core.errors import InputError
from core.thresholds import class_ids
from infer.serve.settings import Settings


class ServeError(Exception):
    """An error answered as JSON: ``{"error": message, "field": ..., "row": ...}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None, row: int | None = None,
                 details: list | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.row, self.details = status, message, field, row, details
        self.headers = headers
        """Sent with the answer (``WWW-Authenticate`` of a 401)."""

    def body(self) -> dict:
        out = {"error": strip_paths(self.message)}
        if self.field is not None:
            out["field"] = self.field
        if self.row is not None:
            out["row"] = self.row
        if self.details:
            out["details"] = self.details
        return out


MAX_JSON_DEPTH = 6
"""Nesting of a ``/predict`` body: the deepest valid one is 4 (``{"rows": [{"tags": ["A"]}]}``)."""

_ABS_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?[/\\](?:[^/\\\s'\"]+[/\\])+([^/\\\s'\"]*)")


def strip_paths(message: str) -> str:
    """``message`` with every absolute file-system path cut to its last part (``.../fold_0``): answers and /info
    reveal nothing about the server's disk."""
    return _ABS_PATH.sub(lambda m: f".../{m.group(1)}", message)


def public_name(name: str) -> str:
    """A Hub id as it is; a local path (absolute or not) as its last part."""
    return name if is_hub_model_id(name) else Path(name).name or name


def json_depth(obj, limit: int) -> int:
    """Nesting depth of parsed JSON, counted without recursion and only up to ``limit + 1``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class Schema:
    """What the adapters expect of a row (template fields) and say about their labels; no model needed."""

    def __init__(self, refs: Sequence[AdapterRef], settings: Settings):
        first = refs[0]
        keys = {(r.cfg.data.text_template, r.cfg.data.max_length) for r in refs}
        if len(keys) > 1:
            raise InputError(f"serve needs adapters that share data.text_template and data.max_length; "
                             f"{first.folder} and another adapter differ")
        self.refs = list(refs)
        self.template = first.cfg.data.text_template
        self.max_length = first.cfg.data.max_length
        self.fields = template_fields(self.template)
        if not self.fields:
            raise InputError(f"{first.folder}: data.text_template uses no field")
        if settings.text_field is not None and settings.text_field not in self.fields:
            raise InputError(f"--text-field {settings.text_field!r} is not a field of the adapter's "
                             f"data.text_template (fields: {self.fields})")
        self.text_field = settings.text_field or text_field(self.fields)
        self.kinds = dict(first.field_kinds or {})
        """How the training data typed each field (``AdapterRef.field_kinds``): numbers format as in training."""
        self.label_names = list(first.label_names)
        self.descriptions = dict(first.descriptions)
        self.class_ids = class_ids(self.label_names)
        self.base_model = public_name(first.info.get("base_model") or base_model_id(first.cfg))
        self.request_model = build_request_model(self.fields)


def build_request_model(fields: Sequence[str]):
    """The pydantic model of a ``/predict`` body: ``rows``, a non-empty list of objects with exactly ``fields``."""
    value = StrictStr | StrictInt | StrictFloat | list[StrictStr] | None
    # Python-safe attribute names; the JSON keys are the template's field names (aliases).
    row = create_model("Row", __config__=ConfigDict(extra="forbid"),
                       **{f"f{i}": (value, Field(..., alias=name)) for i, name in enumerate(fields)})
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"),
                        rows=(list[row], Field(..., min_length=1)))


def _field_path(loc: Sequence) -> str:
    return ".".join(str(x) for x in loc)


def validation_error(e, fields: Sequence[str]) -> ServeError:
    """A pydantic ValidationError -> 422 naming the first bad field (``rows.3.text``) and row."""
    errors = e.errors(include_url=False, include_input=False)
    details: dict[str, str] = {}
    for err in errors:
        loc = list(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        # The union of value types reports each alternative (rows.0.text.str, ...): one message for the field.
        if len(loc) >= 4 and loc[0] == "rows" and isinstance(loc[1], int):
            loc, msg = loc[:3], "must be a string, a number, a list of strings or null"
        details.setdefault(_field_path(loc), msg)
        if len(details) >= 20:
            break
    details = [{"field": k, "message": v} for k, v in details.items()]
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    if not first["field"]:
        first["field"] = "body"
    loc = errors[0].get("loc", ()) if errors else ()
    row = loc[1] if len(loc) >= 2 and loc[0] == "rows" and isinstance(loc[1], int) else None
    msg = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    if row is not None and len(loc) >= 3 and errors[0].get("type") == "extra_forbidden":
        msg += f" (row fields are the template's: {list(fields)})"
    return ServeError(422, msg, first["field"], row, details if len(details) > 1 else None)


def parse_rows(body: bytes, schema: Schema, settings: Settings) -> list[dict]:
    """A ``/predict`` body -> its rows (dicts keyed by the template's fields), within ``settings``' limits.

    Every string is valid Unicode (a lone surrogate cannot be tokenised), no longer than ``--max-text-chars`` (the
    text field) or ``--max-field-chars`` (any other, as formatted); a numeric field of the training data holds a
    number (or text that reads as one).

    Raises:
        ServeError: 422 for a body that is not a valid request (naming the row and field), 413 for too many rows.
    """
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ServeError(422, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", "body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(422, f"body is not JSON: {e}", "body") from None
    if json_depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ServeError(422, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", "body")
    rows = obj.get("rows") if isinstance(obj, dict) else None
    if isinstance(rows, list) and len(rows) > settings.max_rows:
        raise ServeError(413, f"{len(rows)} rows is over the limit of {settings.max_rows} (--max-rows)", "rows")
    try:
        req = schema.request_model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e, schema.fields) from None
    out = [r.model_dump(by_alias=True) for r in req.rows]
    tf = schema.text_field
    for i, row in enumerate(out):
        for name in schema.fields:
            check_value(row.get(name), f"rows.{i}.{name}", i, schema.kinds.get(name),
                        settings.max_text_chars if name == tf else settings.max_field_chars,
                        "--max-text-chars" if name == tf else "--max-field-chars")
        text = format_value(row.get(tf))
        if settings.no_empty_text and not text.strip():
            raise ServeError(422, f"rows.{i}.{tf}: empty text (--no-empty-text)", f"rows.{i}.{tf}", i)
    return out


def check_value(value, where: str, row: int, kind: str | None, limit: int, flag: str) -> None:
    """One field of one row: encodable text, a number where the training data had numbers, at most ``limit``
    characters as formatted. Raises ServeError 422 naming ``where``."""
    for s in value if isinstance(value, list) else [value]:
        if isinstance(s, str):
            if len(s) > limit:  # before encoding it: bounded work for any size
                raise ServeError(422, f"{where}: {len(s)} characters is over the limit of {limit} ({flag})", where,
                                 row)
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ServeError(422, f"{where}: not valid Unicode text (a lone surrogate at character {e.start}); "
                                      f"the tokenizer cannot encode it", where, row) from None
    try:
        text = format_value(value, kind)
    except ValueError as e:
        raise ServeError(422, f"{where}: {e} (the training data's column is numeric)", where, row) from None
    if len(text) > limit:
        raise ServeError(422, f"{where}: {len(text)} characters is over the limit of {limit} ({flag})", where, row)


# ---------------------------------------------------------------------------------------------------------------
# The answer
# ---------------------------------------------------------------------------------------------------------------


class LabelProbability(BaseModel):
    id: str
    """The label (a probability column's name)."""
    class_id: int
    """As written in a submission (:func:`core.thresholds.class_ids`)."""
    name: str | None
    """The label's description, where the adapter has one."""
    probability: float


class RowPrediction(BaseModel):
    labels: list[str]
    """The decoded label set (the thresholds file's decoding, else the adapter's ``decode`` section)."""
    class_ids: list[int]
    probabilities: list[LabelProbability]
    """Every label, in the adapters' label order."""


class PredictResponse(BaseModel):
    model: str
    """The base model."""
    adapters: list[str]
    rows: list[RowPrediction]
    """One per request row, in order."""


def predict_response(probs: np.ndarray, schema: Schema, spec, order: Sequence[int],
                     adapters: Sequence[AdapterRef]) -> dict:
    """The answer to a ``/predict`` (a :class:`PredictResponse` as plain dicts: the route validates and serialises
    it through the model, faster than building the models here): ``probs`` (rows x the adapters' labels) decoded
    with ``spec`` (a cascade or a set decoding) in its own label order, ``order`` (the position of each of its
    labels among the adapters')."""
    preds = np.zeros(probs.shape, dtype=np.int8)
    preds[:, order] = spec.decode(probs[:, order])
    names, cids = schema.label_names, schema.class_ids
    described = [schema.descriptions.get(n) for n in names]
    out = []
    for p, y in zip(probs.tolist(), preds):
        out.append({
            "labels": [names[j] for j in np.flatnonzero(y)],
            "class_ids": [cids[j] for j in np.flatnonzero(y)],
            "probabilities": [{"id": n, "class_id": c, "name": d, "probability": v}
                              for n, c, d, v in zip(names, cids, described, p)],
        })
    return {"model": schema.base_model, "adapters": [r.name for r in adapters], "rows": out}
