"""Vocabulary trimming: shrink a decoder's embedding matrix (and untied LM head) to the tokens a corpus uses.

This module holds the embedding surgery and the pipeline (:func:`trim_vocab`); the tokenizer surgery is
:mod:`train.vocab_tokenizer`, the command line :mod:`train.commands.trim_vocab`.

Usage:
    python -m train trim-vocab --model embedded:gemma-3-270m \\
        --corpus ../shared/data/dls/train.csv,../shared/data/dls/test.csv --out models/gemma-3-270m-dls
    python -m train trim-vocab --config configs/gemma-3-270m/qlora.yaml --corpus a.csv --corpus b.csv --out OUT \\
        [--template "..."] [--eval other.csv] [--no-keep-bytes] [--no-keep-ascii] [--keep-added all] [--overwrite]

then train/predict on it like on any other model folder: ``python -m train --set model.name_or_path=OUT``.

What is kept (old ids, renumbered densely in their original order; ``id_map.json`` lists the old id of every new id):

* every token of the corpus prompts: each CSV row formatted with the prompt template (``--template``, else the
  config's ``data.text_template``, else the default), tokenized exactly as the toolkit does (special tokens added);
* the template's literal text and the tokenizer's special tokens (bos/eos/pad/unk/mask and any additional special
  tokens) plus every token id the model config / generation config refers to;
* added tokens: only the ones above and the ones the corpus uses (``--keep-added used``, the default: Gemma 3 has
  6,242 ``<unusedN>`` placeholders) or all of them (``--keep-added all``);
* BPE: the merge closure (both parts of *every* merge that produces a kept token, recursively), so the kept merges
  include every merge the original tokenizer applied to the corpus and the segmentation of the corpus is unchanged;
  merges are kept only when both parts and the result are kept, in their original order (rank);
* the single-character tokens of printable ASCII (``--keep-ascii``, the default; under 100 rows): digits and Latin
  letters the corpus does not happen to use stay themselves;
* with byte fallback (``--keep-bytes``, the default), the 256 byte tokens ``<0x00>``..``<0xFF>``: any text stays
  representable; a character outside the kept vocabulary becomes its UTF-8 bytes instead of being dropped or mangled.
  Without byte fallback (word-level tokenizers, or ``--no-keep-bytes``) such text maps to the unknown token.

Checks before anything is written (the output folder is written atomically, nothing half-written on failure):

* the trimmed tokenizer, reloaded through ``AutoTokenizer`` like the toolkit loads it, tokenizes every corpus text
  to exactly the original ids (mapped through ``id_map``): coverage must be 100%, else the command fails (exit 1);
* the trimmed model gives the same last hidden states and LM logits (on the kept columns) as the original for a few
  corpus texts (``--check-texts``); the maximum absolute differences go into the report;
* ``--eval`` CSVs (text outside the corpus) are only measured: how many texts tokenize identically, how many tokens
  fell to byte fallback / unknown.

Bad input (exit 2, the message names the file): a corpus file that is missing, unreadable or lacks the template's
columns; an empty corpus (no rows, or every row's template fields empty: a corpus that is only the template is a
mistake, not a vocabulary); a corpus with no overlap with the vocabulary (every corpus token is unknown or byte
fallback); an output folder that exists (without ``--overwrite``) or is the model folder; a missing model; a
tokenizer model other than BPE, WordLevel or Unigram, or a slow-only tokenizer.

Writes ``OUT/``: ``config.json`` (new ``vocab_size``, special token ids remapped), the causal-LM weights
(safetensors), the tokenizer files, ``id_map.json`` and ``trim_report.json`` (printed too).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from core.config import DEFAULT_TEMPLATE
from core.errors import InputError
from core.io import atomic_dir, versions, write_json
from train.data import Corpus
from train.vocab_tokenizer import (
    SUPPORTED_MODELS,
    TrimError,
    byte_and_unk_ids,
    check_overlap,
    compare_tokenizations,
    encode,
    fallback_stats,
    model_special_ids,
    remap_tokenizer_config,
    template_literal,
    trim_tokenizer_json,
)

logger = logging.getLogger(__name__)

TRIM_REPORT = "trim_report.json"
ID_MAP = "id_map.json"


# ---------------------------------------------------------------------------------------------------- model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def trim_model_embeddings(model, kept: Sequence[int], id_map: dict[int, int]) -> dict:
    """Keep rows ``kept`` of the input embedding (and of an untied LM head) in place; update the config's ids.

    Raises:
        TrimError: another vocabulary-sized tensor exists (e.g. per-layer embeddings) that this does not handle.
    """
    import torch

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    rows = emb.weight.shape[0]
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    idx = torch.as_tensor(list(kept), dtype=torch.long, device=emb.weight.device)
    handled = {id(emb.weight)} | ({id(out.weight)} if out is not None else set())
    others = [n for n, p in model.named_parameters() if p.shape and p.shape[0] == rows and id(p) not in handled]
    if others:
        raise TrimError(f"the model has other vocabulary-sized weights trim-vocab does not handle: {others[:3]}")
    emb.weight = torch.nn.Parameter(emb.weight.data.index_select(0, idx).clone(), requires_grad=False)
    emb.num_embeddings = len(kept)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = id_map.get(emb.padding_idx)
    if out is not None:
        if tied:
            out.weight = emb.weight
        else:
            out.weight = torch.nn.Parameter(out.weight.data.index_select(0, idx).clone(), requires_grad=False)
            if getattr(out, "bias", None) is not None:
                out.bias = torch.nn.Parameter(out.bias.data.index_select(0, idx).clone(), requires_grad=False)
        if hasattr(out, "out_features"):
            out.out_features = len(kept)
    gen = getattr(model, "generation_config", None)
    configs = {id(c): c for c in (model.config, model.config.get_text_config(), gen) if c is not None}
    for cfg in configs.values():
        if cfg is not gen and hasattr(cfg, "vocab_size"):
            cfg.vocab_size = len(kept)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
                     "decoder_start_token_id"):
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                setattr(cfg, name, id_map.get(v))
            elif isinstance(v, (list, tuple)):
                setattr(cfg, name, [id_map[x] for x in v if x in id_map])
    return {"tied_lm_head": tied, "rows_before": rows, "rows_after": len(kept)}


def forward_check(model, ids: list[list[int]], kept: Sequence[int] | None = None) -> list:
    """(last hidden state, LM logits) per text, one text at a time (no padding); logits restricted to ``kept``."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for row in ids:
            res = model(input_ids=torch.tensor([row]), output_hidden_states=True)
            logits = res.logits[0]
            if kept is not None:
                logits = logits[:, torch.as_tensor(list(kept))]
            out.append((res.hidden_states[-1][0].float(), logits.float()))
    return out


# ----------------------------------------------------------------------------------------------- trim-vocab


def folder_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def trim_vocab(model_path: str, corpus: Corpus, out: str | Path, template: str = DEFAULT_TEMPLATE,
               keep_bytes: bool = True, keep_added: str = "used", eval_corpora: Sequence[Corpus] = (),
               overwrite: bool = False, check_texts: int = 8, keep_ascii: bool = True) -> dict:
    """Trim the model folder ``model_path`` to ``corpus``, write ``out`` atomically; returns the report.

    Raises:
        InputError: bad input (see the module docstring). TrimError: a check failed (nothing written).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.time()
    out = Path(out)
    src = Path(model_path)
    if not (src / "config.json").is_file():
        raise InputError(f"{model_path}: not a model folder (no config.json)")
    if out.exists() and out.resolve() == src.resolve():
        raise InputError(f"{out}: the output folder is the model folder; choose another --out")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: output folder already exists (pass --overwrite to replace it)")
    if keep_added not in ("used", "all"):
        raise InputError(f"--keep-added must be 'used' or 'all', got {keep_added!r}")
    files = ", ".join(f["path"] for f in corpus.files) or "corpus"

    tok = AutoTokenizer.from_pretrained(model_path)
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise InputError(f"{model_path}: trim-vocab needs a fast tokenizer (tokenizer.json); "
                         f"got {type(tok).__name__}")
    tj = json.loads(tok.backend_tokenizer.to_str())
    mtype = tj["model"].get("type")
    if mtype not in SUPPORTED_MODELS:
        raise InputError(f"{model_path}: tokenizer model type {mtype!r} is not supported by trim-vocab "
                         f"(supported: {', '.join(SUPPORTED_MODELS)})")

    # 1. What the corpus uses.
    logger.info(f"tokenizing {len(corpus.texts)} corpus texts from {files}")
    orig_ids = encode(tok, corpus.texts)
    literal_ids = encode(tok, [template_literal(template)])[0]
    byte_ids, unk_id = byte_and_unk_ids(tok)
    used = {i for row in orig_ids for i in row}
    special_ids = set(tok.all_special_ids)
    check_overlap(tok, corpus, byte_ids, unk_id, special_ids, f"{files}: the corpus", model_path)
    try:
        gen_cfg = GenerationConfig.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - no generation_config.json
        gen_cfg = None
    mcfg = AutoConfig.from_pretrained(model_path)
    keep = used | set(literal_ids) | special_ids | model_special_ids(mcfg, mcfg.get_text_config(), gen_cfg)
    if keep_added == "all":
        keep |= {a["id"] for a in tj.get("added_tokens", [])}

    # 2. Trim the tokenizer, reload it the way the toolkit does, check the corpus tokenizes identically.
    logger.info(f"loading {model_path}")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    rows = model.get_input_embeddings().weight.shape[0]
    beyond = sorted(i for i in used if i >= rows)
    if beyond:
        raise InputError(f"{files}: the corpus uses token ids {beyond[:5]} beyond the model's {rows} embedding rows")
    trimmed = trim_tokenizer_json(tj, keep, keep_bytes=keep_bytes, rows=rows, source=model_path,
                                  keep_ascii=keep_ascii)
    kept = trimmed.kept
    id_map = {old: new for new, old in enumerate(kept)}
    check_idx = sorted({round(k * (len(orig_ids) - 1) / max(check_texts - 1, 1))
                        for k in range(min(check_texts, len(orig_ids)))}) if check_texts > 0 else []
    params_before = count_params(model)
    before = forward_check(model, [orig_ids[i] for i in check_idx], kept) if check_idx else []

    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
        for name in ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt"):
            (tmp / name).unlink(missing_ok=True)  # only the trimmed tokenizer.json may describe the vocabulary
        (tmp / "tokenizer.json").write_text(json.dumps(trimmed.json, ensure_ascii=False), encoding="utf-8")
        remap_tokenizer_config(tmp / "tokenizer_config.json", id_map)
        new_tok = AutoTokenizer.from_pretrained(tmp)
        if len(new_tok) != len(kept):
            raise TrimError(f"the trimmed tokenizer has {len(new_tok)} tokens, expected {len(kept)}")
        specials = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
            old_id, new_id = getattr(tok, name + "_id", None), getattr(new_tok, name + "_id", None)
            if old_id is None:
                continue
            if old_id not in id_map or new_id != id_map[old_id]:
                raise TrimError(f"{name} {getattr(tok, name)!r}: id {old_id} became {new_id}, expected "
                                f"{id_map.get(old_id)}")
            specials[name] = {"token": getattr(tok, name), "old_id": old_id, "new_id": new_id}
        logger.info("checking the trimmed tokenizer on the corpus")
        new_ids = encode(new_tok, corpus.texts)
        same, bad = compare_tokenizations(orig_ids, new_ids, kept)
        if bad is not None:
            raise TrimError(f"the trimmed tokenizer segments {len(orig_ids) - same} of {len(orig_ids)} corpus "
                            f"texts differently, e.g. text {bad} {corpus.texts[bad][:80]!r}: "
                            f"{orig_ids[bad][:12]} vs {[kept[x] for x in new_ids[bad][:12]]}")
        new_byte_ids, new_unk = byte_and_unk_ids(new_tok)

        # 3. Trim the model, check it computes the same thing.
        model_info = trim_model_embeddings(model, kept, id_map)
        after = forward_check(model, [new_ids[i] for i in check_idx]) if check_idx else []
        diff_h = max((float((a[0] - b[0]).abs().max()) for a, b in zip(before, after)), default=None)
        diff_l = max((float((a[1] - b[1]).abs().max()) for a, b in zip(before, after)), default=None)
        params_after = count_params(model)
        model.save_pretrained(tmp)

        evals = []
        for ev in eval_corpora:
            o, n = encode(tok, ev.texts), encode(new_tok, ev.texts)
            s, _ = compare_tokenizations(o, n, kept)
            so, sn = fallback_stats(o, byte_ids, unk_id), fallback_stats(n, new_byte_ids, new_unk)
            evals.append({"files": ev.files, "texts": len(ev.texts), "identical_texts": s,
                          "coverage": s / len(ev.texts), "tokens_original": so["tokens"], "tokens_trimmed": sn["tokens"],
                          "byte_fallback_tokens": sn["byte_fallback_tokens"], "unk_tokens": sn["unk_tokens"],
                          "byte_fallback_tokens_original": so["byte_fallback_tokens"],
                          "unk_tokens_original": so["unk_tokens"],
                          "texts_with_fallback_or_unk": sn["texts_with_fallback_or_unk"]})

        report = {
            "source_model": str(model_path),
            "model_type": model.config.model_type,
            "tokenizer_model": mtype,
            "byte_fallback": bool(tj["model"].get("byte_fallback")),
            "original_rows": rows,
            "kept_rows": len(kept),
            "kept_fraction": len(kept) / rows,
            "kept_why": {"corpus_template_special": trimmed.counts["requested"],
                         **{k: v for k, v in trimmed.counts.items() if k != "requested"}},
            "merges": trimmed.merges,
            "keep_bytes": keep_bytes,
            "keep_ascii": keep_ascii,
            "keep_added": keep_added,
            "template": template,
            "corpus": {"files": corpus.files, "texts": len(corpus.texts), "distinct_tokens": len(used),
                       "identical_texts": same, "coverage": same / len(corpus.texts),
                       **fallback_stats(orig_ids, byte_ids, unk_id)},
            "eval": evals,
            "special_tokens": specials,
            "parameters": {"before": params_before, "after": params_after,
                           "embedding_before": rows * model.config.get_text_config().hidden_size,
                           "embedding_after": len(kept) * model.config.get_text_config().hidden_size,
                           "tied_lm_head": model_info["tied_lm_head"]},
            "check": {"texts": len(check_idx), "max_abs_diff_hidden": diff_h,
                      "max_abs_diff_lm_logits_kept_columns": diff_l},
            "id_map": ID_MAP,
            "seconds": round(time.time() - t0, 1),
            "versions": versions(),
        }
        if diff_h is not None and not (diff_h <= 1e-4 and diff_l <= 1e-3):
            raise TrimError(f"the trimmed model's outputs differ from the original's: hidden {diff_h}, "
                            f"logits {diff_l}")
        write_json(tmp / ID_MAP, {"kept_old_ids": kept, "note": "new id i is old id kept_old_ids[i]"})
        write_json(tmp / TRIM_REPORT, report)
        report["folder_bytes"] = folder_size(tmp)
        write_json(tmp / TRIM_REPORT, report)
    return report
