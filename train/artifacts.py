"""Self-describing adapter folders: PEFT adapter + score head, tokenizer, config, label names, metrics, card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from infer.io import atomic_dir, versions, write_json, write_text
from train.config import EMBEDDED_MODEL, RunConfig

ADAPTER_INFO = "adapter_info.json"


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
        write_text(tmp / "run_config.yaml", cfg.to_yaml())
        write_json(tmp / "label_names.json", {"label_names": label_names, "descriptions": descriptions})
        info = {"base_model": base_model_id(cfg), "model": cfg.model.name_or_path, "num_labels": len(label_names),
                "versions": versions(), **extra}
        write_json(tmp / ADAPTER_INFO, info)
        write_text(tmp / "README.md", model_card(cfg, label_names, descriptions, info))


def model_card(cfg: RunConfig, label_names: list[str], descriptions: dict[str, str], info: dict) -> str:
    """A Hub model card (YAML front matter + how to load and reproduce predictions)."""
    metrics = info.get("metrics") or info.get("cv_metrics") or {}
    front = {
        "base_model": base_model_id(cfg),
        "library_name": "peft",
        "license": "gemma" if "gemma" in base_model_id(cfg).lower() else "apache-2.0",
        "pipeline_tag": "text-classification",
        "tags": ["qlora", "lora", "multilabel", "text-classification", "qlora-multilabel"],
    }
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", front["base_model"]) or Path(front["base_model"]).exists():
        del front["base_model"]  # a local path is not a valid Hub base_model (the body still names it)
    if metrics:
        front["model-index"] = [{"name": Path(cfg.output_dir).name, "results": [{
            "task": {"type": "text-classification", "name": "multilabel classification"},
            "dataset": {"type": "csv", "name": Path(cfg.data.train_csv).name},
            "metrics": [{"type": k.replace("/", "_"), "value": round(float(v), 4), "name": k}
                        for k, v in metrics.items() if isinstance(v, (int, float))]}]}]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {Path(cfg.output_dir).name}: QLoRA multilabel classifier on {base_model_id(cfg)}", "",
             f"LoRA adapter (r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {', '.join(cfg.lora.target_modules)}) "
             f"plus a trained `score` head for {len(label_names)} labels, trained with "
             f"qlora-multilabel on 4-bit "
             f"{'NF4' if cfg.quantization.quant_type == 'nf4' else 'FP4'} weights.", "",
             "## Reproduce predictions", "", "```bash",
             "pip install qlora-multilabel",
             "python -m infer predict --adapter <this folder or Hub id> --input test.csv --out probs.csv",
             "python -m infer submit --probs probs.csv --out submission.csv"
             + (" --thresholds thresholds.json" if info.get("has_thresholds") else ""),
             "```", "",
             "Everything needed is in this folder: `run_config.yaml` (the training config, including the prompt "
             "template), `label_names.json`, the tokenizer, and `adapter_info.json` (versions, fold, metrics).", ""]
    if metrics:
        lines += ["## Metrics (held-out fold)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {float(v):.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
        lines.append("")
    lines += ["## Labels", ""]
    lines += [f"- `{n}`" + (f": {descriptions[n]}" if n in descriptions else "") for n in label_names]
    lines += ["", "## Versions", "", "```json", json.dumps(info.get("versions", {}), indent=1), "```", ""]
    return "\n".join(lines)
