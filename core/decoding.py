"""Which decoder applies to a probability file or an adapter: one home for the rules that tune, submit, evaluate,
blend, serve and ui share.

- a ``thresholds.json`` (:func:`read_thresholds`): a cascade, or with ``"strategy": "sets"`` a set decoding, checked
  against the labels it decodes (:func:`check_spec_labels`);
- else the ``decode`` section of the run that produced a probability file (:func:`run_config_of`,
  :func:`default_spec`; a file whose run config is not found decodes with the generic default and says so), or of
  an adapter's own config (:func:`adapter_default_spec`, :func:`adapter_spec`).

Errors are :class:`core.errors.InputError` naming the file and, for the fallback, what is valid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from core.config import DecodeArgs, RunConfig
from core.errors import ConfigError, InputError
from core.io import ID_COLUMN, meta_path
from core.sets import SetDecoder, is_sets
from core.thresholds import ARGMAX, Fallback, ThresholdSpec, check_fallback
from core.thresholds import resolve_fallback as core_resolve_fallback

logger = logging.getLogger(__name__)

STRATEGIES = ("cascade", "sets")
"""The decoding strategies a thresholds file holds (``python -m infer tune --strategy``)."""

THRESHOLDS_FILE = "thresholds.json"
"""An adapter folder's own tuned decoding (a final model's, a merged adapter's: tuned on the out-of-fold
probabilities of the folds behind it). ``serve``, ``ui`` and ``submit`` decode that adapter's probabilities with it
unless ``--thresholds`` names another file (:func:`own_thresholds`)."""


def read_thresholds(path: str | Path) -> ThresholdSpec | SetDecoder:
    """Read and validate a ``thresholds.json``: a cascade (``ThresholdSpec.to_dict()`` + meta, files without a
    ``strategy`` key included) or, with ``"strategy": "sets"``, a :class:`core.sets.SetDecoder` (its cascade
    candidate's fields at the top level plus a ``sets`` object). Both have ``.decode(probs)`` and ``.label_names``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: thresholds file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None
    names = d.get("label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: key 'label_names' must be a non-empty list of strings")
    known = {"label_names", "start", "stop", "step", "fallback", "class_offsets", "meta"}
    try:
        spec = ThresholdSpec.from_dict({k: v for k, v in d.items() if k in known})
        spec.steps  # noqa: B018 - validates start/stop/step
        check_fallback(spec.fallback, len(names))
        if spec.class_offsets is not None and len(spec.class_offsets) != len(names):
            raise ValueError(f"class_offsets has {len(spec.class_offsets)} values for {len(names)} labels")
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid thresholds: {e}") from None
    strategy = d.get("strategy", "cascade")
    if strategy == "cascade":
        return spec
    if strategy != "sets":
        raise InputError(f"{path}: unknown decoding strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    try:
        return SetDecoder.from_dict({**d, "meta": spec.meta})
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid set decoding: {type(e).__name__} {e}") from None


def check_spec_labels(spec: ThresholdSpec | SetDecoder, spec_path, label_names: Sequence[str], probs_path) -> None:
    """The thresholds must be for the probability file's label set (the order may differ)."""
    if set(spec.label_names) == set(label_names) and len(spec.label_names) == len(label_names):
        return
    a, b = list(spec.label_names), list(label_names)
    only_spec = [n for n in a if n not in set(b)]
    only_probs = [n for n in b if n not in set(a)]
    raise InputError(f"{spec_path}: thresholds are for a different label set than {probs_path} "
                     f"({len(a)} vs {len(b)} labels; only in the thresholds: {only_spec[:5]}, only in the "
                     f"probability file: {only_probs[:5]})")


def resolve_fallback(label_names: Sequence[str], fallback, path, given: bool = True) -> Fallback:
    """``--fallback`` (a label name, a class id as written in submissions, 'argmax' or 'none') -> what
    :func:`core.thresholds.cascade` takes; errors name ``path`` and the valid values."""
    try:
        return core_resolve_fallback(label_names, fallback)
    except ValueError as e:
        raise InputError(f"{'--fallback' if given else path}: {e}") from None


def adapter_default_spec(ref) -> ThresholdSpec:
    """The cascade of an adapter's config (its ``decode`` section; ``ref`` a :class:`core.adapter.AdapterRef`).

    Raises:
        InputError: its ``decode.fallback`` is not one of its labels.
    """
    try:
        return ThresholdSpec.from_decode(ref.label_names, ref.cfg.decode)
    except ValueError as e:
        raise InputError(f"{ref.folder / 'run_config.yaml'}: decode.fallback: {e}") from None


def adapter_spec(ref, thresholds: str | Path | None = None) -> ThresholdSpec | SetDecoder:
    """An adapter's decoding (serve, ui): ``thresholds`` (a ``thresholds.json``, cascade or sets, checked against its
    labels and put in their order), else its config's ``decode`` section (:func:`adapter_default_spec`)."""
    if thresholds is None:
        return adapter_default_spec(ref)
    spec = read_thresholds(thresholds)
    check_spec_labels(spec, thresholds, ref.label_names, ref.folder / "label_names.json")
    if is_sets(spec):
        return spec.reorder(ref.label_names)
    if list(spec.label_names) != list(ref.label_names):  # same set, other order: reorder the offsets
        if spec.class_offsets is not None:
            pos = {n: i for i, n in enumerate(spec.label_names)}
            offsets = tuple(spec.class_offsets[pos[n]] for n in ref.label_names)
        else:
            offsets = None
        fb = spec.fallback if spec.fallback in (None, ARGMAX) else \
            list(ref.label_names).index(spec.label_names[spec.fallback])
        spec = ThresholdSpec(tuple(ref.label_names), spec.start, spec.stop, spec.step, fb, offsets, spec.meta)
    return spec


def own_thresholds(folders: Sequence[str | Path]) -> str | None:
    """The :data:`THRESHOLDS_FILE` of one adapter folder, or None (several adapters, e.g. a fold average, have no
    decoding of their own)."""
    if len(folders) == 1 and (Path(folders[0]) / THRESHOLDS_FILE).is_file():
        path = str(Path(folders[0]) / THRESHOLDS_FILE)
        logger.info(f"decoding with {path}, the adapter's own tuned thresholds (--thresholds chooses another)")
        return path
    return None


def probs_thresholds(probs_path: str | Path) -> str | None:
    """:func:`own_thresholds` of the adapter that wrote a probability file (its ``.meta.json``'s ``adapters``)."""
    try:
        meta = json.loads(meta_path(probs_path).read_text(encoding="utf-8"))
        folders = [a["folder"] for a in meta["adapters"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return own_thresholds(folders) if folders and all(isinstance(f, str) for f in folders) else None


def run_config_of(probs_path: str | Path) -> tuple[RunConfig | None, str]:
    """The config of the run that produced a probability file, and where it was found (None: not found).

    Looked up in the file's ``.meta.json`` (``config`` of an out-of-fold file, or the ``adapters`` of a
    ``predict`` output), then ``run_config.yaml`` beside the file.
    """
    probs_path = Path(probs_path)
    candidates: list[tuple[dict | Path, str]] = []
    meta_file = meta_path(probs_path)
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            candidates.append((meta["config"], str(meta_file)))
        for a in (meta.get("adapters") or []) if isinstance(meta, dict) else []:
            folder = Path(str(a.get("folder", ""))) if isinstance(a, dict) else None
            if folder is not None and (folder / "run_config.yaml").is_file():
                candidates.append((folder / "run_config.yaml", str(folder / "run_config.yaml")))
                break
    if (probs_path.parent / "run_config.yaml").is_file():
        candidates.append((probs_path.parent / "run_config.yaml", str(probs_path.parent / "run_config.yaml")))
    for raw, source in candidates:
        try:
            return (RunConfig.from_dict(raw, source) if isinstance(raw, dict) else RunConfig.from_yaml(raw)), source
        except ConfigError:
            continue
    return None, "no run config found beside the file"


def labels_id_column(probs_path: str | Path, given: str | None = None) -> str:
    """The id column of the labelled / test CSV that goes with a probability file: ``--id-column`` if given, else
    the producing run's ``data.id_column``, else the probability file's own ``index``."""
    if given:
        return given
    cfg, _ = run_config_of(probs_path)
    return cfg.data.id_column if cfg is not None else ID_COLUMN


def default_spec(probs_path: str | Path, label_names: Sequence[str], fallback=None) -> ThresholdSpec:
    """The cascade of the run that produced ``probs_path`` (its ``decode`` section, :func:`run_config_of`), else
    the generic default (argmax fallback, said in a note); ``--fallback`` overrides the fallback.

    Raises:
        InputError: the configured or given fallback is not one of the file's labels.
    """
    cfg, source = run_config_of(probs_path)
    decode = cfg.decode if cfg is not None else DecodeArgs()
    if fallback is not None:
        fb = resolve_fallback(label_names, fallback, probs_path, True)
    else:
        if cfg is None:  # a file from elsewhere: its run's fallback class is unknown
            logger.info(f"note: {probs_path}: no run config in its .meta.json or beside it: the default cascade "
                        f"falls back to {decode.fallback} (pass --fallback to choose)")
        try:
            fb = core_resolve_fallback(label_names, decode.fallback)
        except ValueError as e:
            raise InputError(f"{probs_path}: decode.fallback of {source}: {e}; pass --fallback") from None
    return ThresholdSpec(tuple(label_names), decode.start, decode.stop, decode.step, fb)
