"""The Hugging Face Hub transport: tokens, repo ids, cached snapshots, and the training checkpoints' round trip.

Nothing here runs implicitly: Hub ids resolve from the local cache only (:func:`resolve_adapter`); downloads happen
in :func:`pull` / :func:`pull_run`; uploads in :func:`push_checkpoint` (training, ``hub.push_checkpoints_to``) and
``infer.hub.push`` (a trained run).

Token: ``token=``, else ``HF_TOKEN``, else the standard login (``hf auth login``; ``huggingface_hub.get_token()``).
On Kaggle, store it as a secret (Add-ons -> Secrets, name ``HF_TOKEN``) and export it before pushing::

    from kaggle_secrets import UserSecretsClient
    import os
    os.environ["HF_TOKEN"] = UserSecretsClient().get_secret("HF_TOKEN")
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import huggingface_hub as hf

from core.errors import InputError
from core.io import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = ["fold_*/checkpoint/*"]
"""Repo files ``pull`` skips (only ``pull_run`` needs the resumable training state)."""
HIDDEN_PATTERNS = [".*", "*/.*", "*.tmp"]
"""Temporary files of atomic writes (``.name.XXXX.tmp``, ``.name.old``) are never uploaded."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def one_line(e: Exception) -> str:
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
         cache_dir: str | None = None) -> str:
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
               else f"the Hub could not be used ({one_line(online_error)})")
        raise HubError(f"cannot pull {repo}: {why}, and it is not in the local Hugging Face cache") from None
    if online_error is not None:
        logger.warning(f"warning: {repo}: the Hub could not be used ({one_line(online_error)}); using the cached copy")
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


def pull_run(repo: str, output_dir: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """Restore a run folder (checkpoints included) pushed by :func:`push_checkpoint` / :func:`push`.

    Files already in ``output_dir`` are kept (a local file is never older than what this machine pushed); the
    others are copied from the downloaded snapshot. Used by ``python -m train --resume hub:user/name``.
    """
    repo = check_repo_id(repo)
    snapshot = Path(pull(repo, revision=revision, token=token, include_checkpoints=True))
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
    logger.info(f"restored {copied} file(s) of {repo} into {out}" + (f" ({kept} already there, kept)" if kept else ""))
    return out


def push_checkpoint(run_dir: str | Path, repo: str, private: bool = True, token: str | None = None,
                    strict: bool = False) -> bool:
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
            raise HubError(f"pushing checkpoints to {repo} failed ({one_line(e)})") from None
    except InputError as e:
        if strict:
            raise
        logger.warning(f"warning: {e}; training goes on")
        return False
    logger.info(f"pushed checkpoint of {run_dir} to {repo}")
    return True
