"""Hugging Face Hub: push a trained run, pull it back, resume training from pushed checkpoints.

This is the only module of the toolkit that talks to the Hub. Nothing here runs implicitly: prediction resolves
Hub ids from the local cache only (:func:`resolve_adapter`); downloads happen in :func:`pull` / :func:`pull_run`.

Usage:
    python -m infer push adapters/gemma-3-270m --repo user/dls-gemma-270m [--private] [--dry-run]
    python -m infer pull user/dls-gemma-270m            # prints the local folder (in the standard HF cache)
    python -m infer predict --adapter user/dls-gemma-270m --input test.csv --out probs.csv
    python -m train --config ... --resume hub:user/dls-gemma-270m-ckpt   # restore a run, then continue it

Token: ``token=``, else ``HF_TOKEN``, else the standard login (``hf auth login``; ``huggingface_hub.get_token()``).
On Kaggle, store it as a secret (Add-ons -> Secrets, name ``HF_TOKEN``) and export it before pushing::

    from kaggle_secrets import UserSecretsClient
    import os
    os.environ["HF_TOKEN"] = UserSecretsClient().get_secret("HF_TOKEN")

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

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub as hf
import yaml

from infer.io import InputError, atomic_path

RUN_FILES = ("run_config.yaml", "label_names.json", "folds.csv", "oof.csv", "oof.csv.meta.json", "summary.json",
             "thresholds.json", "thresholds.json.meta.json")
CHECKPOINT_PATTERNS = ["fold_*/checkpoint/*"]
"""Repo files ``pull`` skips (only ``pull_run`` needs the resumable training state)."""
HIDDEN_PATTERNS = [".*", "*/.*", "*.tmp"]
"""Temporary files of atomic writes (``.name.XXXX.tmp``, ``.name.old``) are never uploaded."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


class HubError(InputError):
    """The Hub cannot be used right now (offline, no token, network, unknown repo); nothing was changed."""


# ---------------------------------------------------------------------------------------------------------------
# Token, offline mode, repo ids
# ---------------------------------------------------------------------------------------------------------------


def get_token(token: str | None = None) -> str | None:
    """``token``, else ``HF_TOKEN``, else the token saved by ``hf auth login`` (None if there is none)."""
    return token or os.environ.get("HF_TOKEN") or hf.get_token()


def require_online(action: str) -> None:
    if hf.is_offline_mode():
        raise HubError(f"cannot {action}: Hugging Face Hub access is disabled (HF_HUB_OFFLINE=1)")


def require_token(token: str | None, action: str) -> str:
    token = get_token(token)
    if not token:
        raise HubError(f"cannot {action}: no Hugging Face token (set HF_TOKEN, run `hf auth login`, or on Kaggle "
                       f"add a secret HF_TOKEN and read it with kaggle_secrets.UserSecretsClient)")
    return token


def check_repo_id(repo: str) -> str:
    repo = repo.removeprefix("hub:")
    if not _REPO_ID.match(repo):
        raise InputError(f"not a Hub repo id (user/name): {repo!r}")
    return repo


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Pull / resolve
# ---------------------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """``[hub:]user/name[@revision][/sub/folder]`` -> (repo id, revision, subfolder)."""
    s = spec.removeprefix("hub:").strip("/")
    parts = s.split("/")
    if len(parts) < 2:
        raise InputError(f"not a Hub repo id (user/name): {spec!r}")
    name, _, revision = parts[1].partition("@")
    repo = check_repo_id(f"{parts[0]}/{name}")
    return repo, revision or None, "/".join(parts[2:])


def looks_like_hub_id(spec: str) -> bool:
    if spec.startswith("hub:"):
        return True
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return False
    try:
        parse_spec(spec)
    except InputError:
        return False
    return True


def pull(repo: str, revision: str | None = None, token: str | None = None, include_checkpoints: bool = False,
         cache_dir: str | None = None, log=print) -> str:
    """Download a pushed run (or adapter) into the standard Hugging Face cache; returns its local folder.

    Offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, an already cached snapshot is returned;
    otherwise :class:`HubError` explains what to do. Training checkpoints are skipped unless asked for.
    """
    repo = check_repo_id(repo)
    ignore = None if include_checkpoints else CHECKPOINT_PATTERNS
    if not hf.is_offline_mode():
        try:
            return hf.snapshot_download(repo, revision=revision, token=get_token(token), ignore_patterns=ignore,
                                        cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - network, auth, unknown repo: fall back to the cache below
            online_error = e
    else:
        online_error = None
    try:
        path = hf.snapshot_download(repo, revision=revision, ignore_patterns=ignore, cache_dir=cache_dir,
                                    local_files_only=True)
    except Exception:  # noqa: BLE001
        why = ("Hub access is disabled (HF_HUB_OFFLINE=1)" if online_error is None
               else f"the Hub could not be used ({_one_line(online_error)})")
        raise HubError(f"cannot pull {repo}: {why}, and it is not in the local Hugging Face cache") from None
    if online_error is not None:
        log(f"warning: {repo}: the Hub could not be used ({_one_line(online_error)}); using the cached copy")
    return path


def resolve_adapter(spec: str | Path, cache_dir: str | None = None) -> Path:
    """Local folder for ``spec``: an existing path as is, a Hub id from the local cache only (never downloads).

    Hub forms: ``user/name``, ``hub:user/name``, ``user/name@revision``, ``user/name/fold_0/last``.

    Raises:
        InputError: neither an existing folder nor a cached Hub snapshot (names ``python -m infer pull``).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if not spec.startswith("hub:") and path.exists():
        return path
    if not looks_like_hub_id(spec):
        raise InputError(f"adapter folder not found: {spec}")
    repo, revision, sub = parse_spec(spec)
    try:
        root = hf.snapshot_download(repo, revision=revision, ignore_patterns=CHECKPOINT_PATTERNS,
                                    cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001
        raise InputError(f"{spec}: not a local folder and not in the local Hugging Face cache; download it once "
                         f"with `python -m infer pull {repo}" + (f" --revision {revision}" if revision else "")
                         + "`") from None
    folder = Path(root) / sub if sub else Path(root)
    if not folder.exists():
        raise InputError(f"{spec}: the cached snapshot of {repo} has no folder {sub!r}")
    return folder


def pull_run(repo: str, output_dir: str | Path, revision: str | None = None, token: str | None = None,
             log=print) -> Path:
    """Restore a run folder (checkpoints included) pushed by :func:`push_checkpoint` / :func:`push`.

    Files already in ``output_dir`` are kept (a local file is never older than what this machine pushed); the
    others are copied from the downloaded snapshot. Used by ``python -m train --resume hub:user/name``.
    """
    repo = check_repo_id(repo)
    snapshot = Path(pull(repo, revision=revision, token=token, include_checkpoints=True, log=log))
    if not (snapshot / "run_config.yaml").is_file():
        raise HubError(f"{repo}: not a run pushed by this toolkit (no run_config.yaml at the repo root)")
    out = Path(output_dir)
    copied = kept = 0
    for src in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = src.relative_to(snapshot)
        if rel.name in (".gitattributes", "README.md") and len(rel.parts) == 1:
            continue
        dest = out / rel
        if dest.exists():
            kept += 1
            continue
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        copied += 1
    log(f"restored {copied} file(s) of {repo} into {out}" + (f" ({kept} already there, kept)" if kept else ""))
    return out


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
    from train.config import ConfigError, RunConfig

    try:
        return RunConfig.from_yaml(run_dir / "run_config.yaml")
    except ConfigError as e:
        raise InputError(str(e)) from None


def finished_folds(run_dir: Path, keep: str) -> list[tuple[int, Path]]:
    """(fold, fold_dir) of folds with a ``metrics.json`` and a ``<keep>`` adapter, in fold order."""
    out = []
    for p in run_dir.iterdir():
        m = _FOLD_DIR.match(p.name)
        if m and p.is_dir() and (p / "metrics.json").is_file() and (p / keep / "adapter_config.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def upload_plan(run_dir: str | Path, repo: str, base_model: str | None = None,
                thresholds: str | Path | None = None) -> list[UploadFile]:
    """Every file :func:`push` uploads (a generated model card at the root), validated; nothing is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
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
        adapter = fold_dir / keep
        for f in sorted(adapter.rglob("*")):
            rel = f.relative_to(adapter)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                files.append(UploadFile(f"fold_{k}/{keep}/{rel.as_posix()}", f))
    card = run_card(run_dir, repo, cfg, [k for k, _ in folds], thresholds, base_model=base_model)
    return [UploadFile("README.md", content=card.encode("utf-8"))] + files


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
         base_model: str | None = None, thresholds: str | Path | None = None, stage_dir: str | Path | None = None,
         log=print) -> list[UploadFile]:
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
        log(f"dry run: would upload to https://huggingface.co/{repo} ({'private' if private else 'public'}):")
        log(format_plan(plan))
        return plan
    require_online(f"push to {repo}")
    token = require_token(token, f"push to {repo}")
    api = hf.HfApi(token=token)
    try:
        api.whoami()
    except Exception as e:  # noqa: BLE001
        raise HubError(f"cannot push to {repo}: the Hub refused the token or cannot be reached ({_one_line(e)}); "
                       f"nothing was uploaded") from None
    with tempfile.TemporaryDirectory(prefix="qlml-push-") as tmp:
        folder = build_upload_folder(plan, stage_dir or tmp)
        try:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                     commit_message=f"Upload run {Path(run_dir).name} (qlora-multilabel)")
        except Exception as e:  # noqa: BLE001
            raise HubError(f"push to {repo} failed ({_one_line(e)}); nothing was uploaded (the upload is a "
                           f"single commit)") from None
    log(f"pushed {len(plan)} files ({sum(f.size for f in plan) / 1e6:.1f} MB) to "
        f"{getattr(info, 'repo_url', None) or f'https://huggingface.co/{repo}'}")
    return plan


def push_checkpoint(run_dir: str | Path, repo: str, private: bool = True, token: str | None = None,
                    strict: bool = False, log=print) -> bool:
    """Upload the whole run folder (resumable ``fold_K/checkpoint/state.pt`` included) to ``repo``.

    Meant to be called by the training loop after each checkpoint (``hub.push_checkpoints_to``) so that a new
    session can continue with ``python -m train --resume hub:<repo>``. Unchanged large files are not re-sent.
    With ``strict=False`` (training) a failure is logged and False returned, so a network hiccup does not
    stop training; with ``strict=True`` it raises :class:`HubError`.
    """
    try:
        repo = check_repo_id(repo)
        run_dir = Path(run_dir)
        if not (run_dir / "run_config.yaml").is_file():
            raise InputError(f"{run_dir}: not a run folder (missing run_config.yaml)")
        require_online(f"push checkpoints to {repo}")
        token = require_token(token, f"push checkpoints to {repo}")
        api = hf.HfApi(token=token)
        try:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo, folder_path=str(run_dir), repo_type="model",
                              ignore_patterns=HIDDEN_PATTERNS, commit_message="Training checkpoint (qlora-multilabel)")
        except Exception as e:  # noqa: BLE001
            raise HubError(f"pushing checkpoints to {repo} failed ({_one_line(e)})") from None
    except InputError as e:
        if strict:
            raise
        log(f"warning: {e}; training goes on")
        return False
    log(f"pushed checkpoint of {run_dir} to {repo}")
    return True


# ---------------------------------------------------------------------------------------------------------------
# Model card of a pushed run
# ---------------------------------------------------------------------------------------------------------------


def _is_hub_model_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def run_card(run_dir: Path, repo: str, cfg, folds: list[int], thresholds: Path | None = None,
             base_model: str | None = None) -> str:
    """README.md for a pushed run: YAML front matter + labels, CV metrics, thresholds, versions, how to use."""
    from train.artifacts import base_model_id

    base = base_model or base_model_id(cfg)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    labels = json.loads((run_dir / "label_names.json").read_text())
    names, desc = labels.get("label_names", []), labels.get("descriptions") or {}
    oof = summary.get("oof_metrics") or {}
    mean = summary.get("mean_fold_metrics") or {}
    keep = cfg.train.keep
    dataset = Path(cfg.data.train_csv).name
    front: dict = {}
    if _is_hub_model_id(base):
        front["base_model"] = base
    front.update({
        "library_name": "peft",
        "license": "gemma" if "gemma" in base.lower() else "apache-2.0",
        "pipeline_tag": "text-classification",
        "tags": ["qlora", "lora", "peft", "multilabel", "text-classification", "qlora-multilabel"],
    })
    if oof:
        front["model-index"] = [{"name": repo.split("/")[-1], "results": [{
            "task": {"type": "text-classification", "name": "multilabel classification"},
            "dataset": {"type": "csv", "name": dataset},
            "metrics": [{"type": k.replace("/", "_"), "value": round(float(v), 4), "name": f"OOF {k}"}
                        for k, v in oof.items() if isinstance(v, (int, float))]}]}]
    th = json.loads(thresholds.read_text()) if thresholds is not None else None
    fold_list = ", ".join(map(str, folds))
    adapter0 = f"fold_{folds[0]}/{keep}"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {repo.split('/')[-1]}: QLoRA multilabel classifier on {base}", "",
        f"Cross-validated LoRA adapters (one per fold: {fold_list} of {cfg.cv.n_folds}) plus trained `score` heads "
        f"for {len(names)} labels, trained with qlora-multilabel on a 4-bit "
        f"{'NF4' if cfg.quantization.quant_type == 'nf4' else 'FP4'} base model "
        f"(LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {', '.join(cfg.lora.target_modules)}).", "",
        f"Base model: `{base}`" + ("" if base == cfg.model.name_or_path else
                                  f" (training config: `{cfg.model.name_or_path}`)") + ".", "",
        "## Use it: reproduce the predictions", "",
        "Predictions average the folds' probabilities; the prompt template, labels and base model are read from "
        "the repo's `run_config.yaml` and `label_names.json`.", "",
        "```bash",
        "pip install qlora-multilabel        # or: pip install git+<toolkit repo>",
        f"python -m infer pull {repo}",
        f"python -m infer predict --adapter {repo} --input test.csv --out probs.csv",
        "python -m infer submit --probs probs.csv --out submission.csv"
        + (" --thresholds thresholds.json" if th is not None else ""),
        "```", "",
        "From Python (one fold, or the whole repo for the fold average):", "",
        "```python",
        "from infer.predict import load_predictor",
        f"p = load_predictor(\"{repo}\")          # after `python -m infer pull {repo}`",
        "probs = p.predict_texts([prompt, ...])  # N x labels, sigmoid probabilities",
        "```", "",
        "Plain transformers + peft (one fold; set the pad token id: the score head reads the last real token):", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig",
        f"tok = AutoTokenizer.from_pretrained(\"{repo}\", subfolder=\"{adapter0}\")",
        f"base = AutoModelForSequenceClassification.from_pretrained(\"{base}\", num_labels={len(names)},",
        "    problem_type=\"multi_label_classification\", pad_token_id=tok.pad_token_id,",
        f"    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{cfg.quantization.quant_type}\","
        f" bnb_4bit_use_double_quant={cfg.quantization.double_quant}))",
        f"model = PeftModel.from_pretrained(base, \"{repo}\", subfolder=\"{adapter0}\").eval()",
        "probs = model(**tok(prompts, return_tensors=\"pt\", padding=True)).logits.sigmoid()",
        "```", "",
        "Prompt template (`data.text_template`; Python `str.format` over the CSV columns, missing values empty, "
        "set literals like `{A,B}` lose their braces):", "",
        "```text", cfg.data.text_template, "```", "",
        "Reproduce the training: `python -m train --config run_config.yaml` (add "
        f"`--set data.train_csv=...` for the data; rows: {summary.get('rows', '?')} out-of-fold).", "",
    ]
    if oof or mean:
        lines += ["## Cross-validation metrics", "",
                  "Out-of-fold = every trained fold's held-out rows predicted by that fold's adapter; "
                  "`t0.5` thresholds at 0.5, `cascade` is the default decoding (0.55 down to 0.20, fallback class).",
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
        lines += ["## Decision thresholds", "", "Tuned on the out-of-fold probabilities (`thresholds.json`, "
                  "used by `python -m infer submit --thresholds thresholds.json`):", "",
                  "```json", json.dumps(th, indent=1, ensure_ascii=False)[:4000], "```", ""]
    lines += ["## Labels", "", "| column | label |", "|---|---|"]
    lines += [f"| `{n}` | {desc.get(n, '')} |" for n in names]
    lines += ["", "## Files", "",
              f"- `fold_K/{keep}/`: adapter folder per fold (`adapter_model.safetensors` = LoRA + score head, "
              "tokenizer, `run_config.yaml`, `label_names.json`, `adapter_info.json`)",
              "- `run_config.yaml`, `label_names.json`, `folds.csv` (fold of every training row), `oof.csv` "
              "(out-of-fold probabilities), `summary.json` (metrics, throughput, versions)"
              + (", `thresholds.json`" if th is not None else ""), ""]
    throughput = summary.get("throughput") or {}
    if throughput:
        lines += [f"Training: {summary.get('device', '?')}, {throughput.get('samples_per_s', '?')} samples/s, "
                  f"wall {summary.get('wall_seconds', '?')} s.", ""]
    lines += ["## Versions", "", "```json", json.dumps(summary.get("versions", {}), indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``push`` and ``pull`` to an ``argparse`` subparsers object (handlers: ``args.func(args) -> code``)."""
    p = subparsers.add_parser("push", help="upload a trained run (adapters + model card) to the Hugging Face Hub",
                              description="Upload a run folder's finished fold adapters, run files and a generated "
                                          "model card to a Hub model repo, in one commit.")
    p.add_argument("run_dir", help="run folder (output_dir of python -m train)")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="print the files and sizes; no network")
    p.add_argument("--stage", help="with --dry-run: also write the upload folder here for inspection")
    p.add_argument("--thresholds", help="thresholds.json to include (default RUN_DIR/thresholds.json if present)")
    p.add_argument("--base-model", help="Hub id of the base model for the card (default from run_config.yaml)")
    p.set_defaults(func=_push_cli)

    q = subparsers.add_parser("pull", help="download a pushed run into the Hugging Face cache",
                              description="Download a pushed run/adapter into the standard Hugging Face cache and "
                                          "print its local folder (predict then finds it by repo id).")
    q.add_argument("repo", help="Hub repo id, user/name")
    q.add_argument("--revision", help="branch, tag or commit")
    q.add_argument("--with-checkpoints", action="store_true", help="also the resumable training checkpoints")
    q.set_defaults(func=_pull_cli)


def _push_cli(args) -> int:
    try:
        push(args.run_dir, args.repo, private=args.private, dry_run=args.dry_run, thresholds=args.thresholds,
             base_model=args.base_model, stage_dir=args.stage)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _pull_cli(args) -> int:
    try:
        path = pull(args.repo, revision=args.revision, include_checkpoints=args.with_checkpoints,
                    log=lambda m: print(m, file=sys.stderr))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.hub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
