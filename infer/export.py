"""Export one adapter as a plain transformers folder (``python -m infer export``): LoRA merged, no peft/bitsandbytes.

The base model is loaded WITHOUT 4-bit quantization, in the requested dtype, as
``AutoModelForSequenceClassification`` with the adapter's label count; the adapter (LoRA + its trained ``score``
head) is applied with peft and merged (``merge_and_unload``). The folder gets ``config.id2label`` / ``label2id``
from the adapter's label names, ``problem_type: multi_label_classification``, ``pad_token_id``, the adapter's
tokenizer, a model card and ``export_info.json`` (adapter, its training config, versions, measured differences).

An adapter trained on a 4-bit base gives slightly different probabilities through the merged folder: the merged
weights are the full-precision base + the LoRA delta, not the 4-bit-rounded base the adapter was trained on. The
export measures that difference (max absolute probability difference on probe rows) and records it.

Checks made on the probe rows (``--probe CSV`` or the first ``--probe-rows`` rows of the adapter's
``data.train_csv``), all in the export dtype:

* ``merged_vs_adapter``: merged model vs base + adapter loaded the same (non-4-bit) way;
* ``reloaded_vs_adapter``: the written folder loaded back with plain ``AutoModelForSequenceClassification``;
* ``merged_vs_4bit``: merged model vs the adapter on its 4-bit base (the training/predict path), when it was 4-bit.

Usage:
    python -m infer export --adapter RUN/fold_0/last --out exported/ [--dtype bf16|fp16|fp32]
    python -m infer export --adapter RUN --fold 0 --out exported/
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import numpy as np

from core.adapter import AdapterRef, base_model_id, card_data, render_card
from core.errors import InputError
from core.io import atomic_dir, versions, write_json, write_text

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 1e-2}
"""Stated max |probability difference| between the merged folder and base + adapter loaded the same way."""
INFO_FILE = "export_info.json"
DEFAULT_PROBE_ROWS = 16

logger = logging.getLogger(__name__)


def pick_ref(spec: str, fold: int | None) -> AdapterRef:
    """The one adapter to export: an adapter folder, or fold ``fold`` of a run folder.

    Raises:
        InputError: a run folder with several folds and no ``fold``, or an unknown ``fold``.
    """
    from core.adapter import FOLD_DIR
    from infer.predict import expand

    refs = expand(spec)

    def fold_of(r: AdapterRef):
        if r.info.get("fold") is not None:
            return int(r.info["fold"])
        m = FOLD_DIR.match(r.folder.parent.name)
        return int(m.group(1)) if m else None

    if fold is not None:
        chosen = [r for r in refs if fold_of(r) == fold]
        if not chosen:
            raise InputError(f"--fold {fold}: {spec} has no finished fold {fold} "
                             f"(folds: {[fold_of(r) for r in refs]})")
        return chosen[0]
    if len(refs) > 1:
        raise InputError(f"--adapter {spec} is a run folder with {len(refs)} fold adapters "
                         f"({', '.join(r.name for r in refs)}); merging cannot average folds: pick one with --fold K")
    return refs[0]


def probe_texts(ref: AdapterRef, probe: str | Path | None, rows: int) -> tuple[list[str], str]:
    """Prompts to measure probability differences on, and where they came from."""
    from core.data import format_prompt, read_csv

    data = ref.cfg.data
    if probe is not None:
        ds = read_csv(probe, data, labelled=False)
        return ds.texts[:rows], str(probe)
    if Path(data.train_csv).is_file():
        try:
            return read_csv(data.train_csv, data, labelled=False).texts[:rows], str(data.train_csv)
        except InputError:
            pass
    return [format_prompt(data.text_template, {})], "the empty prompt (no --probe CSV, data.train_csv not readable)"


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def export(adapter: str, out: str | Path, dtype: str = "bf16", fold: int | None = None,
           probe: str | Path | None = None, probe_rows: int = DEFAULT_PROBE_ROWS, compare_4bit: bool = True,
           device=None, base_model: str | None = None) -> dict:
    """Merge one adapter into its (non-quantized) base and write a plain transformers folder to ``out``.

    Args:
        adapter: adapter folder, run folder (with ``fold``) or Hub id already pulled.
        out: folder to create (must not exist); written atomically.
        dtype: ``bf16``, ``fp16`` or ``fp32``: the dtype the base is loaded, merged and saved in.
        fold: which fold of a run folder.
        probe: CSV whose rows measure the probability differences (default: the adapter's ``data.train_csv``).
        probe_rows: how many rows of it.
        compare_4bit: also measure against the 4-bit adapter path when the adapter was trained 4-bit.

    Returns:
        The provenance dict written to ``out/export_info.json``.

    Raises:
        InputError: existing ``out``, bad dtype, run folder without ``fold``, missing adapter or base model, an
            adapter trained with ``model.pooling: mean``.
    """
    import torch

    from core.offline import no_hub_kernels

    no_hub_kernels()  # before peft imports bitsandbytes: no Hub kernel lookup (library callers skip setup_logging)
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from core.model import load_tokenizer, pick_attention, predict_probs
    from infer.predict import _quiet_loading, load_refs, pick_device, resolve_base

    out = Path(out)
    if out.exists():
        raise InputError(f"--out {out} already exists (the export writes a new folder; remove it or pick another)")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if probe_rows < 1:
        raise InputError(f"--probe-rows must be >= 1, got {probe_rows}")
    t0 = time.perf_counter()
    ref = pick_ref(adapter, fold)
    if ref.cfg.model.pooling != "last":
        raise InputError(f"{ref.folder}: trained with model.pooling={ref.cfg.model.pooling}; the export is a plain "
                         "transformers classifier, which pools the last token (predict and serve the adapter instead)")
    torch_dtype = getattr(torch, DTYPES[dtype])
    device = pick_device(device)
    path = resolve_base(ref, base_model)
    names = list(ref.label_names)
    texts, probe_source = probe_texts(ref, probe, probe_rows)
    tok = load_tokenizer(str(ref.folder)) if (ref.folder / "tokenizer_config.json").is_file() else load_tokenizer(path)
    token_ids = tok(texts, truncation=True, max_length=ref.cfg.data.max_length, padding=False)["input_ids"]
    token_ids = [list(t) for t in token_ids]
    pad_id = tok.pad_token_id

    def probs(model) -> np.ndarray:
        # The model's own dtype: no autocast (predict_probs enables it only for half dtypes, which match here).
        return predict_probs(model, token_ids, pad_id, 16, torch_dtype, progress=False)

    logger.info(f"exporting {ref.folder} on {path} in {dtype} (no 4-bit), merging the LoRA weights")
    attn = pick_attention(ref.cfg.model, AutoConfig.from_pretrained(path).model_type)
    with _quiet_loading():
        base = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(names), problem_type="multi_label_classification", dtype=torch_dtype,
            attn_implementation=attn, pad_token_id=pad_id, device_map={"": device})
        base_tokens = len(load_tokenizer(path))
        if len(tok) != base_tokens:  # e.g. an adapter of a trimmed-vocabulary base on the full base: wrong ids
            raise InputError(f"{ref.folder}: the adapter's tokenizer has {len(tok)} tokens but the base model "
                             f"{path} has {base_tokens}; use the base it was trained on (--base-model)")
        model = PeftModel.from_pretrained(base, str(ref.folder), is_trainable=False)
    model.eval()
    adapter_probs = probs(model)
    merged = model.merge_and_unload()
    merged.eval()
    merged_probs = probs(merged)
    config = merged.config
    config.id2label = {i: n for i, n in enumerate(names)}
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = "multi_label_classification"
    config.pad_token_id = pad_id
    config.use_cache = True
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "label_names.json", {"label_names": names, "descriptions": ref.descriptions})
        merged = model = base = None
        _free()
        with _quiet_loading():
            reloaded = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch_dtype,
                                                                          device_map={"": device})
        reloaded_probs = probs(reloaded)
        if reloaded.config.id2label != config.id2label:
            raise RuntimeError("the written config lost id2label")  # a bug, not user input
        reloaded = None
        _free()
        q4 = None
        was_4bit = bool(ref.cfg.quantization.load_in_4bit)
        if was_4bit and compare_4bit:
            p = load_refs([ref], device=device, base_model=base_model)
            q4 = p.predict_texts(texts, batch_size=16)
            p.close()
        diffs = {"merged_vs_adapter": _max_diff(merged_probs, adapter_probs),
                 "reloaded_vs_adapter": _max_diff(reloaded_probs, adapter_probs),
                 "merged_vs_4bit": None if q4 is None else _max_diff(reloaded_probs, q4)}
        info = {
            "adapter": {"spec": adapter, "folder": str(ref.folder), "fold": ref.info.get("fold"),
                        "epoch": ref.info.get("epoch"), "metrics": ref.info.get("metrics")},
            "base_model": base_model_id(ref.cfg) if base_model is None else base_model,
            "base_model_path": path,
            "dtype": dtype,
            "trained_4bit": was_4bit,
            "num_labels": len(names),
            "probe": {"source": probe_source, "rows": len(texts)},
            "max_abs_prob_diff": diffs,
            "tolerance": {"merged_vs_adapter": TOLERANCE[dtype]},
            "config": ref.cfg.to_dict(),
            "versions": versions(),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        info["within_tolerance"] = diffs["reloaded_vs_adapter"] <= TOLERANCE[dtype]
        if not info["within_tolerance"]:
            logger.warning(f"warning: the merged folder differs from base + adapter by "
                           f"{diffs['reloaded_vs_adapter']:.2e} (more than the {TOLERANCE[dtype]:.0e} stated for {dtype}); try --dtype fp32")
        write_json(tmp / INFO_FILE, info)
        write_text(tmp / "README.md", export_card(ref, info))
    q4_text = "n/a" if diffs["merged_vs_4bit"] is None else f"{diffs['merged_vs_4bit']:.2e}"
    logger.info(f"wrote {out} in {info['seconds']:.0f}s: max |p diff| vs base + adapter "
                f"{diffs['reloaded_vs_adapter']:.2e} ({dtype}, tolerance {TOLERANCE[dtype]:.0e}), vs the 4-bit adapter "
                f"path {q4_text} ({len(texts)} probe rows)")
    return info


def export_card(ref: AdapterRef, info: dict) -> str:
    """Model card of an exported (merged) folder."""
    cfg = ref.cfg
    base = info["base_model"]
    data = card_data(cfg, ref.info.get("metrics") or {}, Path(cfg.output_dir).name, base)
    data.library_name = "transformers"
    data.tags = [t for t in data.tags if t not in ("qlora", "peft")] + ["merged-lora"]
    d = info["max_abs_prob_diff"]
    fmt = (lambda v: "not measured" if v is None else f"{v:.2e}")
    lines = [f"# {Path(cfg.output_dir).name} (merged): multilabel classifier on {base}", "",
             (f"`AutoModelForSequenceClassification` folder with {info['num_labels']} labels "
              f"(`problem_type: multi_label_classification`: apply a sigmoid per class), exported by "
              f"qlora-multilabel from the LoRA adapter `{ref.folder}` (r={cfg.lora.r}, alpha={cfg.lora.alpha}) "
              f"merged into the base in {info['dtype']}. No peft or bitsandbytes is needed to load it."), ""]
    if info["trained_4bit"]:
        lines += [("The adapter was trained on a 4-bit (bitsandbytes "
                   f"{cfg.quantization.quant_type.upper()}) base. The merged weights are the **full-precision base + "
                   "the LoRA delta**, not the 4-bit-rounded base the adapter saw in training, so probabilities differ "
                   "from `python -m infer predict` on the adapter (measured below)."), ""]
    lines += ["## Load", "", "```python", "import torch",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(FOLDER)",
              "model = AutoModelForSequenceClassification.from_pretrained(FOLDER).eval()",
              "probs = torch.sigmoid(model(**tok([prompt], return_tensors='pt')).logits)",
              "```", "",
              ("Prompts must be built exactly as in training: the template is `data.text_template` in "
               "`export_info.json` (`config`)."), "",
              f"## Measured differences ({info['probe']['rows']} probe rows from {info['probe']['source']})", "",
              "| comparison | max abs probability difference |", "|---|---|",
              f"| merged vs base + adapter, both {info['dtype']} without 4-bit | {fmt(d['merged_vs_adapter'])} |",
              (f"| this folder reloaded vs base + adapter | {fmt(d['reloaded_vs_adapter'])} "
               f"(tolerance {info['tolerance']['merged_vs_adapter']:.0e}) |"),
              f"| this folder vs the adapter on its 4-bit base | {fmt(d['merged_vs_4bit'])} |", "",
              "## Labels", ""]
    lines += [f"- `{i}` `{n}`" + (f": {ref.descriptions[n]}" if n in ref.descriptions else "")
              for i, n in enumerate(ref.label_names)]
    lines += ["", "Provenance (adapter, training config, library versions): `export_info.json`.", ""]
    return render_card(data, lines)

