"""``python -m infer pull``: download a pushed run into the Hugging Face cache and print its local folder (the
transport: :mod:`core.hub`)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from core.cli import add_verbose_argument
from core.hub import pull


def register(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser("pull", help="download a pushed run into the Hugging Face cache",
                              description="Download a pushed run/adapter into the standard Hugging Face cache and "
                                          "print its local folder (predict then finds it by repo id).")
    q.add_argument("repo", help="Hub repo id, user/name")
    q.add_argument("--revision", help="branch, tag or commit")
    q.add_argument("--with-checkpoints", action="store_true", help="also the resumable training checkpoints")
    add_verbose_argument(q)
    q.set_defaults(func=run)
    return q


def run(args: argparse.Namespace) -> int:
    # Messages go to stderr: stdout is only the folder, for `$(python -m infer pull user/name)`.
    with contextlib.redirect_stdout(sys.stderr):
        path = pull(args.repo, revision=args.revision, include_checkpoints=args.with_checkpoints)
    print(path)
    return 0
