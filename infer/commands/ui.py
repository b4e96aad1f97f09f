"""``python -m infer ui``: the web UI (Streamlit) for one adapter: ``streamlit run infer/ui_app.py -- ARGS`` (the
app and its logic: :mod:`infer.ui`)."""

from __future__ import annotations

import argparse
import os
import sys

from core.cli import add_verbose_argument
from core.extras import require_extra
from infer.predict import collect
from infer.ui import APP, DEFAULT_MAX_CHARS, load_spec, parse_app_args


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line the ``ui`` command starts."""
    app_args = ["--adapter", args.adapter, "--max-text-chars", str(args.max_text_chars),
                "--batch-size", str(args.batch_size)]
    for flag, value in (("--api", args.api), ("--thresholds", args.thresholds), ("--base-model", args.base_model),
                        ("--device", args.device)):
        if value is not None:
            app_args += [flag, value]
    if args.allow_empty:
        app_args.append("--allow-empty")
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", args.host,
            "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer",
            "--", *app_args]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ui", help="web UI (Streamlit): a form built from the adapter's template, and a CSV tab",
        description="Start a Streamlit app for one adapter: a form (fields from data.text_template) with a bar chart "
                    "of every class's probability, and a tab that scores an uploaded CSV.")
    p.add_argument("--adapter", required=True, help="adapter folder, run folder (all folds averaged) or Hub id")
    p.add_argument("--api", help="URL of a running `python -m infer serve` (default: the model runs in the UI)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--thresholds", help="thresholds.json from `python -m infer tune` (default: the cascade)")
    p.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help=f"longest text field value accepted (default {DEFAULT_MAX_CHARS})")
    p.add_argument("--allow-empty", action="store_true", help="accept empty text fields")
    p.add_argument("--batch-size", type=int, default=32, help="rows per request in the CSV tab")
    p.add_argument("--base-model", help="local folder of the base model (overrides the adapter's run_config)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run(args: argparse.Namespace) -> int:
    require_extra("ui", "python -m infer ui", "streamlit")
    refs = collect([args.adapter])  # bad adapters fail here, before a server starts
    load_spec(refs[0], args.thresholds)
    cmd = streamlit_command(args)
    parse_app_args(cmd[cmd.index("--") + 1:])  # --max-text-chars / --batch-size checked here, not in the app
    if args.host not in LOOPBACK:
        print(f"warning: the UI on {args.host} has no key: anyone who can reach it can use the model; put it behind "
              f"`infer serve --api-key-env` (docs/serving.md)", file=sys.stderr, flush=True)
    print(f"starting the UI on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    # Become the Streamlit server (no child process): a signal to this process (Ctrl+C, a supervisor's SIGTERM, a
    # test's terminate()) then stops the server itself instead of leaving it running as an orphan.
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
