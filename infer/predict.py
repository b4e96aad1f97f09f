"""Probabilities for an unlabelled CSV from one or more trained adapters (averaged, optionally weighted).

An adapter is any of:

* an adapter folder (``RUN/fold_K/last``): PEFT adapter incl. the ``score`` head, tokenizer, ``run_config.yaml``,
  ``label_names.json``;
* a run folder (``RUN``): all its finished folds' ``fold_K/<train.keep>`` adapters, averaged with equal weight;
* a Hub repo id (``user/name``, ``hub:user/name``, ``user/name/fold_0/last``, ``user/name@revision``) already in the
  local Hugging Face cache (``python -m infer pull user/name`` downloads it; nothing is downloaded here).

The base model is the one named by the adapter's ``run_config.yaml`` (model and quantization sections), loaded once
per distinct base and shared by every adapter on it (PEFT adapter switching). Prompts are built with the adapter's
``data.text_template`` and ``data.id_column``; rows are sorted by length and batched with dynamic padding.

Usage:
    python -m infer predict --adapter adapters/gemma-3-270m --input data/sample_test.csv --out probs.csv
    python -m infer predict --adapter runA/fold_0/last,user/runB --weights 0.7,0.3 --input test.csv --out probs.csv

Python:
    from infer.predict import load_predictor, predict
    p = load_predictor("adapters/gemma-3-270m/fold_0/last")
    probs = p.predict_texts(["Rating: 4\\n\\nfast delivery"])   # N x L, prompts formatted with the run's template
    predict(["adapters/gemma-3-270m"], "test.csv", "probs.csv")                              # writes the file
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.adapter import CONFIG_FILE, LABELS_FILE, AdapterRef, is_adapter_folder, read_adapter, run_adapters
from core.config import DataArgs
from core.errors import InputError
from core.io import check_out_file, write_probs

logger = logging.getLogger(__name__)


def expand(spec: str) -> list[AdapterRef]:
    """Resolve one ``--adapter`` value to its adapter folder(s). See the module docstring for the forms."""
    from core.hub import resolve_adapter

    path = resolve_adapter(spec)
    if is_adapter_folder(path):
        return [read_adapter(path, spec)]
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return run_adapters(path, spec)
    if path.is_dir():
        return [read_adapter(path, spec)]  # names the missing files
    raise InputError(f"adapter not found: {spec}")


def check_labels(refs: Sequence[AdapterRef], labels_like: str | Path | None = None) -> list[str]:
    """All adapters must share label names (and match the label columns of ``labels_like`` when given)."""
    names = refs[0].label_names
    for r in refs[1:]:
        if r.label_names != names:
            diff = next((i for i, (a, b) in enumerate(zip(names, r.label_names)) if a != b), min(
                len(names), len(r.label_names)))
            raise InputError(f"{r.folder / LABELS_FILE}: label names differ from {refs[0].folder / LABELS_FILE} "
                             f"({len(r.label_names)} vs {len(names)} labels, first difference at position {diff})")
    if labels_like is not None:
        import pandas as pd

        from core.data import label_columns

        path = Path(labels_like)
        if not path.is_file():
            raise InputError(f"{path}: file not found (--labels-like)")
        data = refs[0].cfg.data
        detect = data.label_columns is None and data.label_prefix is None  # only detection needs the values
        try:
            frame = pd.read_csv(path, nrows=None if detect else 0)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: cannot read CSV: {e}") from None
        cols = label_columns(frame, data, str(path))
        for r in refs:
            count = r.head_labels if r.head_labels is not None else len(r.label_names)
            if count != len(cols):
                raise InputError(f"{r.folder}: the adapter's head has {count} labels but {path} has {len(cols)} "
                                 f"label columns ({cols[0]} .. {cols[-1]})")
        if cols != names:
            bad = next(i for i, (a, b) in enumerate(zip(names, cols)) if a != b)
            raise InputError(f"{path}: label column {cols[bad]!r} at position {bad} differs from the adapter's "
                             f"{names[bad]!r} ({refs[0].folder / LABELS_FILE})")
    return list(names)


def parse_weights(weights: Sequence[float] | str | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise InputError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise InputError(f"--weights has {len(weights)} values for {n} adapters")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"--weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def collect(adapters: Sequence[str] | str, weights=None, labels_like=None) -> list[AdapterRef]:
    """Expand and validate every adapter spec; each spec's weight is shared equally by its folds."""
    specs = [a.strip() for a in adapters.split(",")] if isinstance(adapters, str) else [str(a) for a in adapters]
    specs = [s for s in specs if s]
    if not specs:
        raise InputError("no adapter given (--adapter)")
    w = parse_weights(weights, len(specs))
    refs = []
    for spec, wi in zip(specs, w):
        group = expand(spec)
        for r in group:
            r.weight = wi / len(group)
        refs += group
    check_labels(refs, labels_like)
    return refs


# ---------------------------------------------------------------------------------------------------------------
# Loaded predictor: one base model, one or more adapters switched in turn
# ---------------------------------------------------------------------------------------------------------------


class Predictor:
    """A base model with one or more LoRA adapters (+ their score heads) loaded; averages their probabilities."""

    def __init__(self, model, tokenizer, dtype, adapters: list[AdapterRef], adapter_names: list[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.adapters = adapters
        self.adapter_names = adapter_names
        self.label_names = adapters[0].label_names
        self._token_cache: dict[tuple, list[list[int]]] = {}

    @property
    def device(self):
        from core.model import input_device

        return input_device(self.model)

    @property
    def data(self) -> DataArgs:
        return self.adapters[0].cfg.data

    def weights(self) -> np.ndarray:
        w = np.array([a.weight for a in self.adapters], dtype=np.float64)
        return w / w.sum()

    def token_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        from core.data import tokenize

        return tokenize(texts, self.tokenizer, max_length or self.data.max_length)

    def predict_token_ids(self, token_ids: list[list[int]], adapter: int = 0, batch_size: int = 64,
                          progress: bool = False) -> np.ndarray:
        """Probabilities of one adapter (by position), batched longest-first with dynamic padding."""
        from core.model import predict_probs

        self.model.set_adapter(self.adapter_names[adapter])
        return predict_probs(self.model, token_ids, self.tokenizer.pad_token_id, batch_size, self.dtype,
                             progress=progress, desc=f"predict {self.adapters[adapter].name}")

    def predict_each(self, texts_by_template, batch_size: int = 64, progress: bool = False) -> list[np.ndarray]:
        """Per-adapter probabilities; ``texts_by_template(adapter_ref) -> list[str]`` gives each adapter's prompts."""
        out = []
        for i, ref in enumerate(self.adapters):
            key = (ref.cfg.data.text_template, ref.cfg.data.max_length)
            if key not in self._token_cache:
                self._token_cache = {key: self.token_ids(texts_by_template(ref), ref.cfg.data.max_length)}
            out.append(self.predict_token_ids(self._token_cache[key], i, batch_size, progress))
        self._token_cache = {}
        return out

    def predict_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Weighted mean probabilities (N x L) for already formatted prompts."""
        each = self.predict_each(lambda ref: list(texts), batch_size, progress)
        return np.tensordot(self.weights(), np.stack(each), axes=1)

    def predict_csv(self, input_csv: str | Path, batch_size: int = 64, progress: bool = False):
        """(ids, weighted mean probabilities N x L) for an unlabelled CSV, prompts built as in training."""
        datasets = read_inputs(input_csv, self.adapters)
        each = self.predict_each(
            lambda ref: datasets[(ref.cfg.data.id_column, ref.cfg.data.text_template)].texts, batch_size, progress)
        return next(iter(datasets.values())).ids, np.tensordot(self.weights(), np.stack(each), axes=1)

    def close(self) -> None:
        """Free the model (GPU memory included)."""
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pick_device(device=None):
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_base(ref: AdapterRef, base_model: str | None = None) -> str:
    """Local folder of the adapter's base model (its config's ``model``; or ``base_model`` if given)."""
    import dataclasses

    from core.model import resolve_model_path

    margs = ref.cfg.model
    if base_model is not None:
        margs = dataclasses.replace(margs, name_or_path=base_model, gguf_file=None)
    try:
        return resolve_model_path(margs)
    except InputError as first:
        hub_id = ref.info.get("base_model")
        if base_model is None and hub_id and hub_id != margs.name_or_path and "/" in hub_id:
            try:
                return resolve_model_path(dataclasses.replace(margs, name_or_path=hub_id, gguf_file=None))
            except InputError:
                pass
        raise InputError(f"{ref.folder / CONFIG_FILE}: base model not available here: {first} "
                         f"(pass --base-model PATH to use a local copy)") from None


@contextlib.contextmanager
def _quiet_loading():
    """No weight-loading progress bars while a base model and its adapters load (unless ``--verbose``).

    The known-harmless load warnings (the fresh head's LOAD REPORT, deprecations) are filtered at their source by
    :mod:`core.quiet` for every command; anything else transformers or peft say while loading still shows.
    """
    from core.quiet import libraries_verbose, quiet_by_default

    if libraries_verbose():
        yield
        return
    quiet_by_default()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_refs(refs: list[AdapterRef], device=None, base_model: str | None = None) -> Predictor:
    """Load the (shared) base model once and every adapter of ``refs`` onto it."""
    import torch

    from core.model import load_classifier, load_tokenizer
    from core.offline import no_hub_kernels

    no_hub_kernels()  # before peft imports bitsandbytes: no Hub kernel lookup (library callers skip setup_logging)
    from peft import PeftModel

    keys = {r.base_key() for r in refs}
    if len(keys) > 1:
        raise InputError(f"adapters on different base models cannot share one predictor: "
                         f"{sorted({r.cfg.model.name_or_path for r in refs})}")
    device = pick_device(device)
    first = refs[0]
    path = resolve_base(first, base_model)
    device_map = "auto" if first.cfg.train.parallel == "split" and torch.cuda.device_count() > 1 else {"": device}
    names = [f"a{i}" for i in range(len(refs))]
    with _quiet_loading():
        # The base gets a throw-away head (transformers reports score.weight as newly initialised); every
        # adapter brings its trained copy of the head (modules_to_save), switched together with its LoRA weights.
        model, base_tok, dtype = load_classifier(path, len(first.label_names), first.cfg.model,
                                                 first.cfg.quantization, device, device_map=device_map)
        tok = load_tokenizer(str(first.folder)) if (first.folder / "tokenizer_config.json").is_file() else base_tok
        if len(tok) != len(base_tok):  # e.g. an adapter of a trimmed-vocabulary base on the full base: wrong ids
            raise InputError(f"{first.folder}: the adapter's tokenizer has {len(tok)} tokens but the base model "
                             f"{path} has {len(base_tok)}; use the base it was trained on (--base-model)")
        model = PeftModel.from_pretrained(model, str(first.folder), adapter_name=names[0], is_trainable=False)
        for ref, name in zip(refs[1:], names[1:]):
            model.load_adapter(str(ref.folder), adapter_name=name, is_trainable=False)
    model.eval()
    return Predictor(model, tok, dtype, list(refs), names)


def load_predictor(adapter: str, device=None, base_model: str | None = None) -> Predictor:
    """Load one adapter (folder or Hub id; a run folder loads all its folds, averaged) on its base model.

    Raises:
        InputError: missing/incomplete adapter, label mismatch, base model not available.
    """
    return load_refs(collect([adapter]), device=device, base_model=base_model)


# ---------------------------------------------------------------------------------------------------------------
# Predicting a CSV: what `python -m infer predict` runs
# ---------------------------------------------------------------------------------------------------------------


def read_inputs(input_csv: str | Path, refs: Sequence[AdapterRef]) -> dict[tuple, object]:
    """Read the input CSV once per distinct (id column, template); ids must agree. Returns key -> Dataset."""
    from core.data import read_csv

    out = {}
    for r in refs:
        key = (r.cfg.data.id_column, r.cfg.data.text_template)
        if key not in out:
            out[key] = read_csv(input_csv, r.cfg.data, labelled=False, kinds=r.field_kinds)
    datasets = list(out.values())
    for ds in datasets[1:]:
        if not np.array_equal(ds.ids.astype(str), datasets[0].ids.astype(str)):
            raise InputError(f"{input_csv}: the adapters use different id columns "
                             f"({sorted({k[0] for k in out})}) whose values differ")
    return out


def predict(adapters: Sequence[str] | str, input_csv: str | Path, out: str | Path, weights=None,
            batch_size: int = 64, progress: bool = True, labels_like: str | Path | None = None,
            device=None, base_model: str | None = None) -> dict:
    """Write the (weighted) mean probabilities of ``adapters`` for ``input_csv`` to ``out`` (+ ``.meta.json``).

    Every input is validated before a model is loaded; on error nothing is written.

    Returns:
        The meta dict written beside the file (adapters, weights, rows, seconds, rows_per_s, ...).

    Raises:
        InputError: see :func:`collect`, :func:`read_inputs` and :func:`resolve_base`.
    """
    import torch

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    check_out_file(out)  # before any model loads
    t0 = time.perf_counter()
    refs = collect(adapters, weights, labels_like)
    datasets = read_inputs(input_csv, refs)
    ids = next(iter(datasets.values())).ids
    label_names = refs[0].label_names
    n = len(ids)

    groups: dict[tuple, list[AdapterRef]] = {}
    for r in refs:
        groups.setdefault(r.base_key(), []).append(r)
    total = np.zeros((n, len(label_names)), dtype=np.float64)
    load_s = predict_s = 0.0
    device_name = None
    for group in groups.values():
        t_load = time.perf_counter()
        predictor = load_refs(group, device=device, base_model=base_model)
        device_name = str(predictor.device)
        load_s += time.perf_counter() - t_load
        t_pred = time.perf_counter()
        each = predictor.predict_each(
            lambda ref: datasets[(ref.cfg.data.id_column, ref.cfg.data.text_template)].texts, batch_size, progress)
        for ref, probs in zip(group, each):
            total += ref.weight * probs
        predict_s += time.perf_counter() - t_pred
        predictor.close()
        del predictor
    total /= sum(r.weight for r in refs)
    rows_per_s = n * len(refs) / predict_s if predict_s > 0 else None
    meta = {
        "kind": "probabilities", "input": str(input_csv), "adapters": [r.describe() for r in refs],
        "weights": [r.weight for r in refs], "batch_size": batch_size, "device": device_name,
        "cuda_device": torch.cuda.get_device_name(0) if device_name and device_name.startswith("cuda") else None,
        "seconds": {"load": round(load_s, 2), "predict": round(predict_s, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "rows_per_s": round(rows_per_s, 2) if rows_per_s else None,
    }
    write_probs(out, ids, total, label_names, meta=meta, id_column=refs[0].cfg.data.id_column)
    logger.info(f"predicted {n} rows x {len(label_names)} labels with {len(refs)} adapter(s) on {device_name} in "
                f"{predict_s:.1f}s ({rows_per_s or 0:.1f} rows/s per adapter; model loading {load_s:.1f}s); wrote {out}")
    return meta

