"""Resumable checkpoints without pickle, and the rule for which config changes a resume may make.

A checkpoint folder holds ``state.safetensors`` (every tensor: trainable weights, optimizer moments) and
``state.json`` (the progress as a typed :class:`Progress`, the optimizer / scheduler / scaler state with tensors
replaced by references, the run's fingerprint and the tensor file's SHA-256). Loading reads tensors with
``safetensors`` and structure with ``json``: a checkpoint pulled from the Hub cannot run code, and one that is
truncated, edited or from another run is refused before anything is restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import InputError
from core.io import atomic_dir

logger = logging.getLogger(__name__)

TENSORS, STATE = "state.safetensors", "state.json"
FORMAT = 1


@dataclass
class Progress:
    """Where a training run is, saved with every checkpoint; each recipe adds its own counters in a subclass
    (:class:`train.run.FoldProgress`, :class:`train.dapt.DaptProgress`)."""

    epoch: int = 0
    batch: int = 0
    """Micro-batches of the current epoch already done."""
    step: int = 0
    """Optimizer steps done."""
    train_seconds: float = 0.0


def kept_dtype(model_args, device: torch.device, saved: dict | None) -> str:
    """The compute dtype of a run: ``model.dtype: auto`` resolves by the hardware once, when the run starts; a resumed
    run keeps the dtype its start recorded (``saved["dtype"]``; a record from before dtypes were kept: fp32 on the
    CPU, which ``auto`` was then), so its checkpoints go on in the same arithmetic. ``saved`` None: a new run."""
    from core.model import pick_dtype

    dtype = str(pick_dtype(model_args, device)).removeprefix("torch.")
    if saved is not None and model_args.dtype == "auto":
        was = saved.get("dtype", "float32" if device.type == "cpu" else dtype)
        if was != dtype:
            logger.info(f"resume: computing in {was} as the run started (model.dtype auto; {dtype} here now)")
        dtype = was
    return dtype


def step_seed(seed: int, fold: int, step: int, rank: int) -> int:
    """A seed per (fold, optimizer step, rank): dropout is reproducible after a resume without saved RNG state."""
    return int(np.random.SeedSequence([seed, fold, step, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------- tensors <-> JSON


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {path}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(folder: Path, payload: dict, progress: Progress, fingerprint: str) -> None:
    """Write a checkpoint folder atomically (it replaces the previous one whole)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(payload, tensors, "p")
    # safetensors refuses tensors that share memory; bitsandbytes' 8-bit optimizers give every parameter's state the
    # same quantization maps (qmap1/qmap2), which stay shared on the CPU (on a GPU .cpu() copies them anyway).
    seen: set[int] = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = t.clone()
        elif t.numel():
            seen.add(ptr)
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        doc = {"format": FORMAT, "fingerprint": fingerprint, "tensors_sha256": _sha256(tmp / TENSORS),
               "progress": dataclasses.asdict(progress), "payload": encoded}
        (tmp / STATE).write_text(json.dumps(doc), encoding="utf-8")


def exists(folder: Path) -> bool:
    return (Path(folder) / STATE).is_file() or (Path(folder) / "state.pt").is_file()


def load(folder: Path, fingerprint: str, progress_type: type[Progress] = Progress) -> tuple[dict, Progress]:
    """Read a checkpoint folder written by :func:`save` for the run ``fingerprint``; the progress comes back as a
    ``progress_type`` (a key of another recipe's progress is left out: checkpoints written before the recipes had
    their own progress types hold every counter of both).

    Raises:
        InputError: an old pickle checkpoint, a missing / truncated / altered file, or a checkpoint of another run
            (other config, data, fold or world size); nothing is restored.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "state.pt").is_file() and not (folder / STATE).is_file():
        raise InputError(f"{folder}: a checkpoint of an older toolkit version (state.pt, a pickle) is never loaded; "
                         f"remove the folder to restart this fold")
    for name in (STATE, TENSORS):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: incomplete checkpoint ({name} missing); remove the folder to restart")
    try:
        doc = json.loads((folder / STATE).read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(progress_type)}
        progress = progress_type(**{k: v for k, v in doc["progress"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{folder / STATE}: unreadable checkpoint state ({e}); remove the folder to "
                         f"restart") from None
    if doc.get("format") != FORMAT:
        raise InputError(f"{folder / STATE}: checkpoint format {doc.get('format')!r}, expected {FORMAT}")
    if doc.get("fingerprint") != fingerprint:
        raise InputError(f"{folder}: the checkpoint belongs to another run (its config, data, fold or world size "
                         f"differ from this one); it is not loaded")
    if _sha256(folder / TENSORS) != doc.get("tensors_sha256"):
        raise InputError(f"{folder / TENSORS}: truncated or altered (SHA-256 differs from {STATE}); it is not "
                         f"loaded; remove the folder to restart this fold")
    try:
        tensors = load_file(str(folder / TENSORS))
        payload = _decode(doc["payload"], tensors)
    except Exception as e:  # noqa: BLE001 - a corrupt file in any way
        raise InputError(f"{folder / TENSORS}: cannot read the checkpoint tensors ({e})") from None
    return payload, progress


def fingerprint(*parts: Any) -> str:
    """A stable hash of what a checkpoint must agree on (JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------- what a resume may change

RESUME_FREE = ("output_dir", "hub.", "cv.folds", "data.label_names_csv", "train.save_every_steps",
               "train.eval_batch_size", "train.nan_guard_steps", "train.keep", "train.max_tokens_per_micro_batch",
               "train.grad_checkpointing", "train.parallel", "train.report_to", "cv.final")
"""Settings that do not change what a run computes (save cadence, Hub, logging, which folds: more folds of the same
split, evaluation batch size, same-gradient memory levers, adding the final model: ``cv.final``): a resumed run may
change them, and the change is recorded. Every other key (model, quantization, lora, data, decode, loss, train.lr /
epochs / micro-batch / accum / seed ..., cv.n_folds) is refused."""


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _free(key: str, free: tuple[str, ...]) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)


LATER_DEFAULTS = {"train.lora_plus_ratio": None, "cv.seed": None, "model.head_init": "random", "model.pooling": "last"}
"""Keys added after checkpoints existed: left out of a checkpoint's fingerprint at their default, so checkpoints
written before the key existed still resume."""


def result_settings(config: dict, free: tuple[str, ...] = RESUME_FREE, later: dict = LATER_DEFAULTS) -> dict:
    """The flat ``section.key -> value`` settings of a config dict that a resume may not change (a key of ``later``
    at its default left out)."""
    return {k: v for k, v in flat(config).items() if not _free(k, free) and not (k in later and v == later[k])}


def changes(saved: dict, now: dict, free: tuple[str, ...] = RESUME_FREE) -> tuple[list, list]:
    """(refused, allowed) changes between two config dicts, each a list of (key, old, new)."""
    a, b = flat(saved), flat(now)
    diff = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [d for d in diff if not _free(d[0], free)], [d for d in diff if _free(d[0], free)]


def describe(diff: list) -> str:
    return "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in diff)
