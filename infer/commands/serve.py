"""``python -m infer serve``: the HTTP API over trained adapter(s), micro-batched (:mod:`infer.serve`).

Usage:
    python -m infer serve --adapter adapters/gemma-3-270m --thresholds thresholds.json --port 8000
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict

from core.cli import add_verbose_argument
from core.extras import require_extra
from infer.serve.settings import Settings

SERVER_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to an ``argparse`` subparsers object; its handler is ``args.func(args) -> exit code``."""
    d = Settings()
    p = subparsers.add_parser(
        "serve", help="HTTP API over trained adapter(s), micro-batched",
        description="Serve POST /predict (+ /health, /ready, /info, /metrics) for one or more adapters held in "
                    "one process (the 4-bit base once). Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--adapter", required=True, action="append", metavar="A[,B,...]",
                   help="adapter folder, run folder or Hub id (comma-separated or repeated for an ensemble)")
    p.add_argument("--weights", help="comma-separated ensemble weights, one per --adapter value (default equal)")
    p.add_argument("--thresholds", help="thresholds.json (python -m infer tune) to decode with (default: the "
                                        "adapter config's decoding)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="rows per model call (1: off)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="rows x longest row per model call")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a batch waits for more rows")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting; more answer 429")
    p.add_argument("--max-rows", type=int, default=d.max_rows, help="rows per request; more answer 413")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars, help="characters of the text field")
    p.add_argument("--max-field-chars", type=int, default=d.max_field_chars,
                   help="characters of every other field (a list's items joined)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                   help="rows x longest row (tokens, as padded) of one request; more answer 413")
    p.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                   help="close a connection whose request headers have not arrived within this")
    p.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s, help="close idle keep-alive connections")
    p.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help="a request body must arrive within this (408 otherwise)")
    p.add_argument("--no-empty-text", action="store_true", help="reject rows whose text is empty or whitespace")
    p.add_argument("--text-field", help="the row field the text checks apply to (default: text, else the "
                                        "template's last field)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="require 'Authorization: Bearer <key>' (the key read from this environment variable) on "
                        "every endpoint but /health")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--base-model", help="local folder of the base model (overrides the adapter's run_config)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_verbose_argument(p)
    p.set_defaults(func=run)
    return p


def settings_from_args(args) -> Settings:
    names = {f for f in asdict(Settings())}
    values = {k: v for k, v in vars(args).items() if k in names and k != "adapters"}
    return Settings(adapters=[a for value in args.adapter for a in value.split(",") if a.strip()], **values)


def server_logging(level: str) -> None:
    """A server's log: timestamped lines on stderr at ``--log-level``, the server's own (``infer.serve``) and its
    libraries' (uvicorn) alike."""
    logging.basicConfig(level=level.upper(), format=SERVER_LOG_FORMAT)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(SERVER_LOG_FORMAT))
    served = logging.getLogger("infer.serve")
    served.handlers[:] = [handler]
    served.setLevel(level.upper())
    served.propagate = False


def run(args) -> int:
    require_extra("serve", "python -m infer serve", "fastapi", "uvicorn", "pydantic", "prometheus_client")
    import uvicorn

    from infer.serve.app import create_app
    from infer.serve.http import server_config

    server_logging(args.log_level)
    settings = settings_from_args(args)
    app = create_app(settings=settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key_env:
        logging.getLogger("infer.serve").warning("serving on %s without --api-key-env: anyone who can reach it can "
                                                 "use it", settings.host)
    uvicorn.Server(server_config(app, settings, settings.host, settings.port, log_level=args.log_level)).run()
    return 0
