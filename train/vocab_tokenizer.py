"""Tokenizer surgery for trim-vocab (:mod:`train.vocab`): which token ids a corpus needs, and a ``tokenizer.json``
cut down to them (BPE merge closure, byte fallback, renumbered ids), with the checks that the trimmed tokenizer
segments text exactly as the original did."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError, TrainingError
from train.data import Corpus

SUPPORTED_MODELS = ("BPE", "WordLevel", "Unigram")
BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
ASCII_CHARS = [chr(i) for i in range(33, 127)] + ["▁", "Ġ", " "]  # printable ASCII, and space as BPEs write it


class TrimError(TrainingError):
    """The trimmed tokenizer or model failed a check (a bug or an unusual tokenizer); nothing was written."""


# --------------------------------------------------------------------------------------------------- corpus


def template_literal(template: str) -> str:
    """The template's own text (its fields empty)."""
    from core.data import template_fields

    return template.format(**{f: "" for f in template_fields(template)})


# ------------------------------------------------------------------------------------------------ tokenizer


def encode(tokenizer, texts: Sequence[str], batch: int = 2048) -> list[list[int]]:
    """Token ids exactly as the toolkit computes them (special tokens added), without truncation."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out += [list(x) for x in tokenizer(list(texts[i:i + batch]), add_special_tokens=True)["input_ids"]]
    return out


def model_special_ids(*configs) -> set[int]:
    """Token ids a model config / generation config refers to (bos/eos/pad/unk/...; eos may be a list)."""
    ids: set[int] = set()
    for cfg in configs:
        if cfg is None:
            continue
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
                     "decoder_start_token_id"):
            v = getattr(cfg, name, None)
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, int) and x >= 0:
                    ids.add(x)
    return ids


def token_strings(tj: dict) -> dict[int, str]:
    """id -> token of a tokenizer.json (model vocab and added tokens)."""
    model = tj["model"]
    if model["type"] == "Unigram":
        out = {i: piece for i, (piece, _score) in enumerate(model["vocab"])}
    else:
        out = {i: t for t, i in model["vocab"].items()}
    for a in tj.get("added_tokens", []):
        out[a["id"]] = a["content"]
    return out


def parse_merge(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return m[0], m[1]


def merge_closure(keep: set[str], merges: Sequence[tuple[str, str]]) -> set[str]:
    """``keep`` plus both parts of every merge producing a kept token, recursively.

    Any merge the original BPE applied to a corpus word produced a token that is either kept (a final token) or
    merged further into a kept one, so all applied merges end up with kept parts and results; keeping a superset
    of the applied merges in their original rank order reproduces the same segmentation (BPE always applies the
    lowest-ranked applicable merge, and the removed merges never were).
    """
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        producers.setdefault(a + b, []).append((a, b))
    out = set(keep)
    stack = list(keep)
    while stack:
        tok = stack.pop()
        for a, b in producers.get(tok, ()):
            for part in (a, b):
                if part not in out:
                    out.add(part)
                    stack.append(part)
    return out


def _remap_ids(node, id_map: dict[int, int]):
    """Remap token ids inside post_processor-like JSON (TemplateProcessing ``ids``, Bert/Roberta ``sep``/``cls``)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list) and all(isinstance(x, int) for x in v):
                out[k] = [_new_id(x, id_map, "post_processor") for x in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], _new_id(v[1], id_map, "post_processor")]
            else:
                out[k] = _remap_ids(v, id_map)
        return out
    if isinstance(node, list):
        return [_remap_ids(x, id_map) for x in node]
    return node


def _new_id(old: int, id_map: dict[int, int], where: str) -> int:
    if old not in id_map:
        raise TrimError(f"token id {old} used by the tokenizer's {where} was not kept")
    return id_map[old]


@dataclass
class TrimmedTokenizer:
    json: dict
    kept: list[int]                       # old id of each new id
    counts: dict                          # why rows were kept
    merges: dict | None = None            # {"original", "kept"} for BPE


def trim_tokenizer_json(tj: dict, keep_ids: set[int], keep_bytes: bool = True, rows: int | None = None,
                        source: str = "tokenizer", keep_ascii: bool = True) -> TrimmedTokenizer:
    """Trim a ``tokenizer.json`` (as a dict) to ``keep_ids`` plus what its model type needs; ids renumbered densely.

    ``keep_ascii``: also keep the single-character tokens of printable ASCII (under 100 rows), so that a digit or
    a Latin letter the corpus happens not to use (the DLS data has no ``5``) stays itself rather than a byte.

    ``rows``: the model's embedding rows; ids at or beyond it cannot be kept (they have no embedding).

    Raises:
        InputError: a tokenizer model type other than BPE / WordLevel / Unigram.
    """
    model = tj["model"]
    mtype = model.get("type")
    if mtype not in SUPPORTED_MODELS:
        raise InputError(f"{source}: tokenizer model type {mtype!r} is not supported by trim-vocab "
                         f"(supported: {', '.join(SUPPORTED_MODELS)})")
    strings = token_strings(tj)
    ids_of = {}
    for i, t in sorted(strings.items(), reverse=True):
        ids_of[t] = i  # lowest id wins for duplicated strings
    keep = {i for i in keep_ids if i in strings}
    counts = {"requested": len(keep)}
    if keep_ascii:
        before = len(keep)
        keep |= {ids_of[c] for c in ASCII_CHARS if c in ids_of}
        counts["ascii_chars"] = len(keep) - before
    merges_info = None
    byte_fallback = bool(model.get("byte_fallback"))
    if mtype == "BPE":
        merges = [parse_merge(m) for m in model.get("merges", [])]
        closed = merge_closure({strings[i] for i in keep}, merges)
        before = len(keep)
        keep |= {ids_of[t] for t in closed if t in ids_of}
        counts["merge_closure"] = len(keep) - before
    if byte_fallback and keep_bytes:
        before = len(keep)
        keep |= {ids_of[t] for t in BYTE_TOKENS if t in ids_of}
        counts["byte_fallback"] = len(keep) - before
    unk = model.get("unk_token") if mtype != "Unigram" else None
    if mtype == "Unigram" and model.get("unk_id") is not None:
        keep.add(model["unk_id"])
    elif unk is not None and unk in ids_of:
        keep.add(ids_of[unk])
    if rows is not None:
        keep = {i for i in keep if i < rows}
    kept = sorted(keep)
    id_map = {old: new for new, old in enumerate(kept)}
    new = dict(tj)
    new_model = dict(model)
    if mtype == "Unigram":
        new_model["vocab"] = [model["vocab"][i] for i in kept if i < len(model["vocab"])]
        if model.get("unk_id") is not None:
            new_model["unk_id"] = id_map[model["unk_id"]]
    else:
        new_model["vocab"] = {t: id_map[i] for t, i in model["vocab"].items() if i in id_map}
        if mtype == "BPE":
            kept_strings = set(new_model["vocab"])
            new_merges = [m for m, (a, b) in zip(model.get("merges", []), merges)
                          if a in kept_strings and b in kept_strings and a + b in kept_strings]
            new_model["merges"] = new_merges
            merges_info = {"original": len(merges), "kept": len(new_merges)}
        if unk is not None and unk not in new_model["vocab"]:
            raise TrimError(f"{source}: the unknown token {unk!r} has no row in the model")
    new["model"] = new_model
    new["added_tokens"] = [dict(a, id=id_map[a["id"]]) for a in tj.get("added_tokens", []) if a["id"] in id_map]
    if tj.get("post_processor") is not None:
        new["post_processor"] = _remap_ids(tj["post_processor"], id_map)
    if isinstance(tj.get("padding"), dict) and "pad_id" in tj["padding"]:
        new["padding"] = dict(tj["padding"], pad_id=_new_id(tj["padding"]["pad_id"], id_map, "padding"))
    return TrimmedTokenizer(json=new, kept=kept, counts=counts, merges=merges_info)


def byte_and_unk_ids(tokenizer) -> tuple[set[int], int | None]:
    vocab = tokenizer.get_vocab()
    return {i for t, i in vocab.items() if BYTE_TOKEN.match(t)}, tokenizer.unk_token_id


def fallback_stats(ids: list[list[int]], byte_ids: set[int], unk_id: int | None) -> dict:
    n_bytes = sum(1 for row in ids for i in row if i in byte_ids)
    n_unk = sum(1 for row in ids for i in row if i == unk_id)
    texts = sum(1 for row in ids if any(i in byte_ids or i == unk_id for i in row))
    return {"tokens": sum(map(len, ids)), "byte_fallback_tokens": n_bytes, "unk_tokens": n_unk,
            "texts_with_fallback_or_unk": texts}


def check_overlap(tok, corpus: Corpus, byte_ids: set[int], unk_id: int | None, special_ids: set[int], what: str,
                  model_path: str) -> None:
    """The corpus's own text (its template fields, without the template) must use some real vocabulary token.

    Raises:
        InputError: every token of the fields is unknown, byte fallback or whitespace.
    """
    if not corpus.values:
        return
    ids = [list(x) for x in tok(corpus.values, add_special_tokens=False)["input_ids"]]
    ignore = byte_ids | special_ids | {unk_id}
    strings = tok.convert_ids_to_tokens(sorted({i for row in ids for i in row} - ignore))
    if not any(s.replace("▁", "").replace("Ġ", "").strip() for s in strings):
        stats = fallback_stats(ids, byte_ids, unk_id)
        raise InputError(f"{what} has no overlap with the vocabulary of {model_path}: all {stats['tokens']} tokens "
                         f"of its text fields are unknown ({stats['unk_tokens']}), byte fallback "
                         f"({stats['byte_fallback_tokens']}) or whitespace")


def compare_tokenizations(orig: list[list[int]], trimmed: list[list[int]], kept: list[int]) -> tuple[int, int | None]:
    """(texts whose trimmed ids map back to the original ids, index of the first that does not)."""
    same, first_bad = 0, None
    for i, (a, b) in enumerate(zip(orig, trimmed)):
        if [kept[x] for x in b] == a:
            same += 1
        elif first_bad is None:
            first_bad = i
    return same, first_bad


def remap_tokenizer_config(path: Path, id_map: dict[int, int]) -> None:
    """tokenizer_config.json's ``added_tokens_decoder`` is keyed by id (transformers 4.x layout)."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    dec = cfg.get("added_tokens_decoder")
    if isinstance(dec, dict):
        cfg["added_tokens_decoder"] = {str(id_map[int(k)]): v for k, v in dec.items() if int(k) in id_map}
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
