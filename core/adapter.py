"""The adapter folder: how training writes it, how everything else reads it, and its model card.

An adapter folder (``RUN/fold_K/last``) holds the PEFT adapter (LoRA + the trained ``score`` head), the tokenizer,
``run_config.yaml`` (the training config: prompt template, labels, decoding), ``label_names.json``,
``adapter_info.json`` (fold, epoch, metrics, versions) and ``README.md`` (a Hugging Face model card). A run folder
(``RUN``) holds one per fold; :func:`finished_folds` is the one rule for which of them are done.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.config import EMBEDDED_MODEL, RunConfig
from core.data import FIELD_KINDS, csv_field_kinds
from core.errors import ConfigError, InputError
from core.io import atomic_dir, versions, write_json, write_text

logger = logging.getLogger(__name__)

CONFIG_FILE = "run_config.yaml"
LABELS_FILE = "label_names.json"
INFO_FILE = "adapter_info.json"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FOLD_DIR = re.compile(r"^fold_(\d+)$")
FINAL_DIR = "final"
"""The final model of a run (``cv.final``, trained on every row after the folds): its folder, ``RUN/final``."""
FINAL_ADAPTER = f"{FINAL_DIR}/last"
"""The final model's adapter folder in a run folder (and in a pushed run's repo): ``RUN/final/last``."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(cfg: RunConfig) -> str:
    """The base model as a user would name it (Hub id where known)."""
    if cfg.model.name_or_path == EMBEDDED_MODEL:
        return "google/gemma-3-270m"
    return cfg.model.name_or_path


def save_adapter(model, tokenizer, folder: Path, cfg: RunConfig, label_names: list[str],
                 descriptions: dict[str, str], extra: dict) -> None:
    """Write one adapter folder atomically (replacing an older one)."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_text(tmp / CONFIG_FILE, cfg.to_yaml())
        write_json(tmp / LABELS_FILE, {"label_names": label_names, "descriptions": descriptions})
        info = {"base_model": base_model_id(cfg), "model": cfg.model.name_or_path, "num_labels": len(label_names),
                "versions": versions(), **extra}
        kinds = csv_field_kinds(cfg.data.train_csv, cfg.data.text_template) if cfg.data.train_csv else None
        if kinds and "field_kinds" not in info:
            info["field_kinds"] = kinds  # how serve / predict / ui format each field, as training did
        write_json(tmp / INFO_FILE, info)
        write_text(tmp / "README.md", model_card(cfg, label_names, descriptions, info))


def is_hub_model_id(name: str) -> bool:
    """A Hub ``user/name`` id that is not also a local path (only those are valid ``base_model`` metadata)."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def card_data(cfg: RunConfig, metrics: dict, name: str, base: str | None = None, metric_prefix: str = ""):
    """The model card metadata (``huggingface_hub.ModelCardData``) of an adapter or a run on ``base``."""
    from huggingface_hub import EvalResult, ModelCardData

    base = base or base_model_id(cfg)
    results = [EvalResult(task_type="text-classification", task_name="multilabel classification",
                          dataset_type="csv", dataset_name=Path(cfg.data.train_csv).name,
                          metric_type=k.replace("/", "_"), metric_value=round(float(v), 4),
                          metric_name=f"{metric_prefix}{k}")
               for k, v in metrics.items() if isinstance(v, (int, float))]
    return ModelCardData(base_model=base if is_hub_model_id(base) else None, library_name="peft",
                         license="gemma" if "gemma" in base.lower() else "apache-2.0",
                         pipeline_tag="text-classification",
                         tags=["qlora", "lora", "peft", "multilabel", "text-classification", "qlora-multilabel"],
                         model_name=name if results else None, eval_results=results or None)


def render_card(data, body: list[str]) -> str:
    """Front matter + body as ``huggingface_hub.ModelCard`` writes it."""
    from huggingface_hub import ModelCard

    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)))


def model_card(cfg: RunConfig, label_names: list[str], descriptions: dict[str, str], info: dict) -> str:
    """The model card of one adapter folder: metadata + how to load it and reproduce predictions."""
    metrics = info.get("metrics") or info.get("cv_metrics") or {}
    base = base_model_id(cfg)
    lines = [f"# {Path(cfg.output_dir).name}: QLoRA multilabel classifier on {base}", "",
             (f"LoRA adapter (r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {', '.join(cfg.lora.target_modules)}) "
             f"plus a trained `score` head for {len(label_names)} labels, trained with "
             f"qlora-multilabel on 4-bit "
             f"{'NF4' if cfg.quantization.quant_type == 'nf4' else 'FP4'} weights."), "",
             "## Reproduce predictions", "", "```bash",
             "pip install qlora-multilabel",
             "python -m infer predict --adapter <this folder or Hub id> --input test.csv --out probs.csv",
             "python -m infer submit --probs probs.csv --out submission.csv"
             + (" --thresholds thresholds.json" if info.get("has_thresholds") else ""),
             "```", "",
             ("Everything needed is in this folder: `run_config.yaml` (the training config, including the prompt "
             "template), `label_names.json`, the tokenizer, and `adapter_info.json` (versions, fold, metrics)."), ""]
    if metrics:
        lines += ["## Metrics (held-out fold)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {float(v):.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
        lines.append("")
    lines += ["## Labels", ""]
    lines += [f"- `{n}`" + (f": {descriptions[n]}" if n in descriptions else "") for n in label_names]
    lines += ["", "## Versions", "", "```json", json.dumps(info.get("versions", {}), indent=1), "```", ""]
    return render_card(card_data(cfg, metrics, Path(cfg.output_dir).name, base), lines)


@dataclass
class AdapterRef:
    """One validated adapter folder and what it says about itself."""

    spec: str
    """What the user passed (folder, run folder or Hub id) that led to this adapter."""
    folder: Path
    cfg: RunConfig
    label_names: list[str]
    descriptions: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    head_labels: int | None = None
    """Rows of the saved ``score`` head (None when the weights file cannot be inspected cheaply)."""
    weight: float = 1.0

    @property
    def name(self) -> str:
        parts = self.folder.parts
        return "/".join(parts[-2:]) if len(parts) >= 2 and FOLD_DIR.match(parts[-2]) else self.folder.name

    @property
    def field_kinds(self) -> dict[str, str] | None:
        """How the training data typed each template field (``adapter_info.json``'s ``field_kinds``, else read from
        ``data.train_csv`` where that file is here); None when unknown (values then format as given)."""
        if "_field_kinds" not in self.__dict__:
            kinds = self.info.get("field_kinds")
            if not (isinstance(kinds, dict) and all(v in FIELD_KINDS for v in kinds.values())):
                data = self.cfg.data
                kinds = csv_field_kinds(data.train_csv, data.text_template) if data.train_csv else None
            self.__dict__["_field_kinds"] = kinds
        return self.__dict__["_field_kinds"]

    def base_key(self) -> tuple:
        """Adapters with equal keys share one loaded base model."""
        m, q = self.cfg.model, self.cfg.quantization
        return (m.name_or_path, m.gguf_file, m.attn_implementation, m.dtype, m.cache_dir,
                q.load_in_4bit, q.quant_type, q.double_quant, self.cfg.train.parallel == "split")

    def describe(self) -> dict:
        return {"spec": self.spec, "folder": str(self.folder), "name": self.name, "weight": self.weight,
                "fold": self.info.get("fold"), "epoch": self.info.get("epoch"),
                "base_model": self.info.get("base_model", self.cfg.model.name_or_path)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None


def head_label_count(folder: Path) -> int | None:
    """Number of labels of the saved ``score`` head, read from the safetensors header (no tensor is loaded)."""
    path = folder / WEIGHT_FILES[0]
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            head = re.compile(r"(^|\.)score\.(modules_to_save\.[^.]+\.)?weight$")
            keys = [k for k in f.keys() if head.search(k)]  # noqa: SIM118 - safe_open is not iterable
            if not keys:
                raise InputError(f"{path}: no score head weights in the adapter (was it trained with "
                                 f"modules_to_save=['score']?)")
            return int(f.get_slice(keys[0]).get_shape()[0])
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file
        raise InputError(f"{path}: cannot read the adapter weights: {e}") from None


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter(folder: str | Path, spec: str | None = None) -> AdapterRef:
    """Validate one adapter folder and read its config, labels and head size.

    Raises:
        InputError: the folder or one of its files is missing/unreadable, or the head does not match the labels.
    """
    folder = Path(folder)
    spec = str(folder) if spec is None else spec
    if not folder.is_dir():
        raise InputError(f"adapter folder not found: {folder}")
    missing = [n for n in (ADAPTER_CONFIG, CONFIG_FILE, LABELS_FILE) if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        missing.append(WEIGHT_FILES[0])
    if missing:
        raise InputError(f"{folder}: incomplete adapter folder, missing {', '.join(missing)}")
    try:
        cfg = RunConfig.from_yaml(folder / CONFIG_FILE)
    except ConfigError as e:
        raise InputError(str(e)) from None
    labels = _read_json(folder / LABELS_FILE)
    names = labels.get("label_names") if isinstance(labels, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"{folder / LABELS_FILE}: key 'label_names' must be a non-empty list of strings")
    info = _read_json(folder / INFO_FILE) if (folder / INFO_FILE).is_file() else {}
    head = head_label_count(folder)
    if head is not None and head != len(names):
        raise InputError(f"{folder / WEIGHT_FILES[0]}: the score head has {head} labels but {folder / LABELS_FILE} "
                         f"lists {len(names)}")
    return AdapterRef(spec=spec, folder=folder, cfg=cfg, label_names=list(names),
                      descriptions=dict(labels.get("descriptions") or {}), info=info, head_labels=head)


def finished_folds(run_dir: Path, keep: str) -> list[tuple[int, Path]]:
    """(fold, fold_dir) of the run's finished folds, in fold order.

    The one rule of the toolkit: a fold is finished when training wrote ``fold_K/metrics.json`` (after its last
    epoch) and its ``fold_K/<keep>/`` adapter folder is complete enough to load (``adapter_config.json``).
    """
    out = []
    for p in Path(run_dir).iterdir():
        m = FOLD_DIR.match(p.name)
        if m and p.is_dir() and (p / "metrics.json").is_file() and (p / keep / ADAPTER_CONFIG).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def final_adapter(run_dir: Path) -> Path | None:
    """The run's finished final model (:data:`FINAL_ADAPTER`), or None when it has none (yet)."""
    adapter = Path(run_dir) / FINAL_ADAPTER
    finished = (Path(run_dir) / FINAL_DIR / "metrics.json").is_file() and (adapter / ADAPTER_CONFIG).is_file()
    return adapter if finished else None


def run_adapters(run_dir: Path, spec: str) -> list[AdapterRef]:
    """The finished folds' ``fold_K/<train.keep>`` adapters of a run folder, in fold order."""
    try:
        keep = RunConfig.from_yaml(run_dir / CONFIG_FILE).train.keep
    except ConfigError as e:
        raise InputError(str(e)) from None
    done = finished_folds(run_dir, keep)
    for p in sorted(run_dir.iterdir()):
        if p.is_dir() and FOLD_DIR.match(p.name) and p not in {d for _, d in done}:
            logger.info(f"{run_dir}: {p.name} has no finished {keep!r} adapter, skipped")
    refs = [read_adapter(fold_dir / keep, spec) for _, fold_dir in done]
    if not refs:
        raise InputError(f"{run_dir}: run folder without any finished fold adapter "
                         f"(expected fold_K/metrics.json and fold_K/{keep}/{ADAPTER_CONFIG})")
    return refs
