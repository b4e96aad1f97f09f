"""Hugging Face Hub commands: push a trained run (adapters + model card), pull it back.

The transport (tokens, cached snapshots, training checkpoints) is ``core.hub``; nothing runs implicitly.

Usage:
    python -m infer push adapters/gemma-3-270m --repo user/dls-gemma-270m [--private] [--dry-run]
    python -m infer push RUN/final/last --repo user/dls-final        # one adapter folder (final, merged) at the root
    python -m infer pull user/dls-gemma-270m            # prints the local folder (in the standard HF cache)
    python -m infer predict --adapter user/dls-gemma-270m --input test.csv --out probs.csv
    python -m train --config ... --resume hub:user/dls-gemma-270m-ckpt   # restore a run, then continue it

Token: see ``core.hub`` (``HF_TOKEN`` or ``hf auth login``; on Kaggle a secret named ``HF_TOKEN``).

Pushed repo layout (``push``) - the run folder without its training checkpoints::

    README.md                  model card (front matter: base_model, library_name: peft, license, metrics)
    run_config.yaml  label_names.json  folds.csv  oof.csv  oof.csv.meta.json  summary.json  [thresholds.json]
    fold_K/metrics.json  fold_K/val_probs_<keep>.npy
    fold_K/<keep>/             adapter folder: adapter_model.safetensors (LoRA + score head), adapter_config.json,
                               tokenizer, run_config.yaml, label_names.json, adapter_info.json, README.md

``push_checkpoint`` uploads the whole run folder, ``fold_K/checkpoint/state.pt`` included, so that
``pull_run`` (``python -m train --resume hub:user/name``) can continue training in a new session.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub as hf

from core.adapter import (
    FINAL_ADAPTER,
    FINAL_DIR,
    base_model_id,
    card_data,
    final_adapter,
    finished_folds,
    is_adapter_folder,
    read_adapter,
    render_card,
)
from core.config import RunConfig
from core.decoding import THRESHOLDS_FILE
from core.errors import ConfigError, InputError
from core.hub import HubError, check_repo_id, one_line, require_online, require_token

logger = logging.getLogger(__name__)

RUN_FILES = ("run_config.yaml", "label_names.json", "folds.csv", "oof.csv", "oof.csv.meta.json", "summary.json",
             "thresholds.json", "thresholds.json.meta.json")


# ---------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UploadFile:
    path: str
    """Path inside the repo (POSIX)."""
    source: Path | None = None
    content: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.source.stat().st_size


def _read_yaml_config(run_dir: Path):
    try:
        return RunConfig.from_yaml(run_dir / "run_config.yaml")
    except ConfigError as e:
        raise InputError(str(e)) from None


def upload_plan(run_dir: str | Path, repo: str, base_model: str | None = None,
                thresholds: str | Path | None = None) -> list[UploadFile]:
    """Every file :func:`push` uploads (a generated model card at the root), validated; nothing is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    if is_adapter_folder(run_dir):
        return adapter_upload_plan(run_dir, base_model, thresholds)
    for name in ("run_config.yaml", "label_names.json"):
        if not (run_dir / name).is_file():
            raise InputError(f"{run_dir}: not a run folder (missing {name})")
    cfg = _read_yaml_config(run_dir)
    keep = cfg.train.keep
    folds = finished_folds(run_dir, keep)
    if not folds:
        raise InputError(f"{run_dir}: no finished fold to push (need fold_K/metrics.json and "
                         f"fold_K/{keep}/adapter_config.json; is training still running?)")
    files = [UploadFile(n, run_dir / n) for n in RUN_FILES if (run_dir / n).is_file() and n != "thresholds.json"]
    if thresholds is not None:
        thresholds = Path(thresholds)
        if not thresholds.is_file():
            raise InputError(f"{thresholds}: thresholds file not found")
    elif (run_dir / "thresholds.json").is_file():
        thresholds = run_dir / "thresholds.json"
    if thresholds is not None:
        files.append(UploadFile("thresholds.json", thresholds))
    for k, fold_dir in folds:
        for name in ("metrics.json", f"val_probs_{keep}.npy"):
            if (fold_dir / name).is_file():
                files.append(UploadFile(f"fold_{k}/{name}", fold_dir / name))
        files += _folder_files(fold_dir / keep, f"fold_{k}/{keep}")
    final = final_adapter(run_dir)  # cv.final: the model trained on every row, at the same place in the repo
    if final is not None:
        files += [UploadFile(f"{FINAL_DIR}/metrics.json", final.parent / "metrics.json"),
                  *_folder_files(final, FINAL_ADAPTER)]
    card = run_card(run_dir, repo, cfg, [k for k, _ in folds], thresholds, base_model=base_model,
                    final=final is not None)
    return [UploadFile("README.md", content=card.encode("utf-8"))] + files


def _folder_files(folder: Path, prefix: str) -> list[UploadFile]:
    """Every file under ``folder`` (hidden ones left out), at ``prefix/<relative path>`` in the repo."""
    return [UploadFile(f"{prefix}/{f.relative_to(folder).as_posix()}", f) for f in sorted(folder.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def adapter_upload_plan(folder: Path, base_model: str | None = None,
                        thresholds: str | Path | None = None) -> list[UploadFile]:
    """One adapter folder (a final model ``RUN/final/last``, a merged adapter) at the repo root: its files as they are
    (its ``README.md`` is its model card), ``thresholds`` replacing its own ``thresholds.json``."""
    if base_model is not None:
        raise InputError(f"--base-model: {folder} is an adapter folder; its model card (README.md) names its base")
    read_adapter(folder)  # complete and readable, or an InputError naming what is missing
    if thresholds is not None and not Path(thresholds).is_file():
        raise InputError(f"{thresholds}: thresholds file not found")
    files = [UploadFile(f.relative_to(folder).as_posix(), f) for f in sorted(folder.rglob("*"))
             if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)
             and not (thresholds is not None and f.relative_to(folder).as_posix() == THRESHOLDS_FILE)]
    return files + ([UploadFile(THRESHOLDS_FILE, Path(thresholds))] if thresholds is not None else [])


def build_upload_folder(plan: list[UploadFile], dest: str | Path) -> Path:
    """Materialise ``plan`` in ``dest`` (hard links where possible, else copies)."""
    dest = Path(dest)
    for f in plan:
        target = dest / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.content is not None:
            target.write_bytes(f.content)
            continue
        try:
            os.link(f.source, target)
        except OSError:
            shutil.copyfile(f.source, target)
    return dest


def format_plan(plan: list[UploadFile]) -> str:
    lines = [f"{f.size:>14,}  {f.path}" for f in plan]
    lines.append(f"{sum(f.size for f in plan):>14,}  total ({len(plan)} files)")
    return "\n".join(lines)


def push(run_dir: str | Path, repo: str, private: bool = False, dry_run: bool = False, token: str | None = None,
         base_model: str | None = None, thresholds: str | Path | None = None,
         stage_dir: str | Path | None = None) -> list[UploadFile]:
    """Upload a trained run (finished folds' adapters, run files, model card) to ``repo`` in one commit.

    ``dry_run`` prints the file list and sizes without any network access (and writes the upload folder to
    ``stage_dir`` when given). Returns the upload plan.

    Raises:
        InputError: not a run folder / nothing finished to push.
        HubError: offline, no token, or the Hub refused; nothing was changed on the Hub.
    """
    repo = check_repo_id(repo)
    plan = upload_plan(run_dir, repo, base_model=base_model, thresholds=thresholds)
    if dry_run:
        if stage_dir is not None:
            build_upload_folder(plan, stage_dir)
        logger.info(f"dry run: would upload to https://huggingface.co/{repo} ({'private' if private else 'public'}):")
        logger.info(format_plan(plan))
        return plan
    require_online(f"push to {repo}")
    token = require_token(token, f"push to {repo}")
    api = hf.HfApi(token=token)
    try:
        api.whoami()
    except Exception as e:  # noqa: BLE001
        raise HubError(f"cannot push to {repo}: the Hub refused the token or cannot be reached ({one_line(e)}); "
                       f"nothing was uploaded") from None
    with tempfile.TemporaryDirectory(prefix="qlml-push-") as tmp:
        folder = build_upload_folder(plan, stage_dir or tmp)
        try:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                     commit_message=f"Upload run {Path(run_dir).name} (qlora-multilabel)")
        except Exception as e:  # noqa: BLE001
            raise HubError(f"push to {repo} failed ({one_line(e)}); nothing was uploaded (the upload is a "
                           f"single commit)") from None
    logger.info(f"pushed {len(plan)} files ({sum(f.size for f in plan) / 1e6:.1f} MB) to "
                f"{getattr(info, 'repo_url', None) or f'https://huggingface.co/{repo}'}")
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Model card of a pushed run
# ---------------------------------------------------------------------------------------------------------------


def run_card(run_dir: Path, repo: str, cfg, folds: list[int], thresholds: Path | None = None,
             base_model: str | None = None, final: bool = False) -> str:
    """README.md for a pushed run: model card metadata + labels, CV metrics, thresholds, versions, how to use."""
    base = base_model or base_model_id(cfg)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    labels = json.loads((run_dir / "label_names.json").read_text())
    names, desc = labels.get("label_names", []), labels.get("descriptions") or {}
    oof = summary.get("oof_metrics") or {}
    mean = summary.get("mean_fold_metrics") or {}
    keep = cfg.train.keep
    th = json.loads(thresholds.read_text()) if thresholds is not None else None
    fold_list = ", ".join(map(str, folds))
    adapter0 = f"fold_{folds[0]}/{keep}"
    plain = [
        "Plain transformers + peft (one fold; set the pad token id: the score head reads the last real token):", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig",
        f"tok = AutoTokenizer.from_pretrained(\"{repo}\", subfolder=\"{adapter0}\")",
        f"base = AutoModelForSequenceClassification.from_pretrained(\"{base}\", num_labels={len(names)},",
        "    problem_type=\"multi_label_classification\", pad_token_id=tok.pad_token_id,",
        (f"    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{cfg.quantization.quant_type}\","
        f" bnb_4bit_use_double_quant={cfg.quantization.double_quant}))"),
        f"model = PeftModel.from_pretrained(base, \"{repo}\", subfolder=\"{adapter0}\").eval()",
        "probs = model(**tok(prompts, return_tensors=\"pt\", padding=True)).logits.sigmoid()",
        "```", "",
    ] if cfg.model.pooling == "last" else [
        ("The score head reads the mean of the hidden states (`model.pooling: mean`), which a plain transformers "
         "classifier does not: load it with the toolkit, as above."), ""]
    lines = [
        f"# {repo.split('/')[-1]}: QLoRA multilabel classifier on {base}", "",
        (f"Cross-validated LoRA adapters (one per fold: {fold_list} of {cfg.cv.n_folds}) plus trained `score` heads "
        f"for {len(names)} labels, trained with qlora-multilabel on a 4-bit "
        f"{'NF4' if cfg.quantization.quant_type == 'nf4' else 'FP4'} base model "
        f"(LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {', '.join(cfg.lora.target_modules)})."), "",
        f"Base model: `{base}`" + ("" if base == cfg.model.name_or_path else
                                  f" (training config: `{cfg.model.name_or_path}`)") + ".", "",
        "## Use it: reproduce the predictions", "",
        ("Predictions average the folds' probabilities; the prompt template, labels and base model are read from "
        "the repo's `run_config.yaml` and `label_names.json`."), "",
        "```bash",
        "pip install qlora-multilabel        # or: pip install git+<toolkit repo>",
        f"python -m infer pull {repo}",
        f"python -m infer predict --adapter {repo} --input test.csv --out probs.csv",
        "python -m infer submit --probs probs.csv --out submission.csv"
        + (" --thresholds thresholds.json" if th is not None else ""),
        "```", "",
        *([(f"The final model (`{FINAL_ADAPTER}/`, trained on every row after the folds) is predicted alone with "
            f"`--adapter {repo}/{FINAL_ADAPTER}`, or with the folds (each fold 1/{2 * len(folds)}, the final model "
            f"1/2) with `--adapter {repo},{repo}/{FINAL_ADAPTER}`; `python -m train pipeline` does the latter with "
            "`predict.model: folds+final`."), ""] if final else []),
        "From Python (one fold, or the whole repo for the fold average):", "",
        "```python",
        "from infer.predict import load_predictor",
        f"p = load_predictor(\"{repo}\")          # after `python -m infer pull {repo}`",
        "probs = p.predict_texts([prompt, ...])  # N x labels, sigmoid probabilities",
        "```", "",
        *plain,
        ("Prompt template (`data.text_template`; Python `str.format` over the CSV columns, missing values empty, "
        "set literals like `{A,B}` lose their braces):"), "",
        "```text", cfg.data.text_template, "```", "",
        ("Reproduce the training: `python -m train --config run_config.yaml` (add "
        f"`--set data.train_csv=...` for the data; rows: {summary.get('rows', '?')} out-of-fold)."), "",
    ]
    if oof or mean:
        lines += ["## Cross-validation metrics", "",
                  ("Out-of-fold = every trained fold's held-out rows predicted by that fold's adapter; "
                  "`t0.5` thresholds at 0.5, `cascade` is the default decoding (0.55 down to 0.20, fallback class)."),
                  "", "| metric | out-of-fold | mean over folds |", "|---|---|---|"]
        for k in dict.fromkeys([*oof, *mean]):
            o, m = oof.get(k), mean.get(k)
            lines.append(f"| {k} | {'' if o is None else f'{float(o):.4f}'} | "
                         f"{'' if m is None else f'{float(m):.4f}'} |")
        lines.append("")
        per_fold = summary.get("per_fold") or []
        if per_fold:
            lines += ["| fold | epoch | cascade exact match | cascade micro-F1 |", "|---|---|---|---|"]
            for r in per_fold:
                lines.append(f"| {r.get('fold')} | {r.get('epoch', '')} | "
                             f"{float(r.get('cascade/exact_match', float('nan'))):.4f} | "
                             f"{float(r.get('cascade/micro_f1', float('nan'))):.4f} |")
            lines.append("")
    if th is not None:
        shown = th
        if isinstance(th, dict) and th.get("strategy") == "sets" and isinstance(th.get("sets"), dict):
            # set decoding: its parameters, not its hundreds of candidate sets (they are in the file)
            sets = {k: v for k, v in th["sets"].items() if k not in ("candidates", "log_priors")}
            sets["candidates"] = f"{len(th['sets'].get('candidates') or [])} label sets (see thresholds.json)"
            shown = {**{k: v for k, v in th.items() if k not in ("sets", "meta")}, "sets": sets}
        lines += ["## Decision thresholds", "", ("Tuned on the out-of-fold probabilities (`thresholds.json`, "
                  "used by `python -m infer submit --thresholds thresholds.json`):"), "",
                  "```json", json.dumps(shown, indent=1, ensure_ascii=False)[:4000], "```", ""]
    lines += ["## Labels", "", "| column | label |", "|---|---|"]
    lines += [f"| `{n}` | {desc.get(n, '')} |" for n in names]
    lines += ["", "## Files", "",
              (f"- `fold_K/{keep}/`: adapter folder per fold (`adapter_model.safetensors` = LoRA + score head, "
              "tokenizer, `run_config.yaml`, `label_names.json`, `adapter_info.json`)"),
              "- `run_config.yaml`, `label_names.json`, `folds.csv` (fold of every training row), `oof.csv` "
              "(out-of-fold probabilities), `summary.json` (metrics, throughput, versions)"
              + (", `thresholds.json`" if th is not None else ""),
              *([(f"- `{FINAL_ADAPTER}/`: the final model's adapter folder (trained on every row; its own "
                 f"`thresholds.json`, tuned on the out-of-fold probabilities), `{FINAL_DIR}/metrics.json`")]
                if final else []), ""]
    throughput = summary.get("throughput") or {}
    if throughput:
        lines += [(f"Training: {summary.get('device', '?')}, {throughput.get('samples_per_s', '?')} samples/s, "
                  f"wall {summary.get('wall_seconds', '?')} s."), ""]
    lines += ["## Versions", "", "```json", json.dumps(summary.get("versions", {}), indent=1), "```", ""]
    return render_card(card_data(cfg, oof, repo.split("/")[-1], base, metric_prefix="OOF "), lines)

