"""The FastAPI app: routes as plain functions, the API key as a dependency, one middleware for the metrics.

``/health`` is on an open router; every other route is behind :func:`require_api_key` (a FastAPI dependency: with
``--api-key-env``, ``Authorization: Bearer <key>``, compared in constant time). The routes share one
:class:`Service`, built by :func:`create_app` and reached through the :func:`service` dependency. A
:class:`~infer.serve.schema.ServeError` raised anywhere is answered as its JSON body and status; anything else
unexpected is a JSON 500 with an id that the log names.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations (``Annotated[..., Depends]``).

import asyncio
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from core.adapter import AdapterRef
from core.data import format_prompt
from core.decoding import adapter_spec, own_thresholds
from core.errors import InputError
from core.io import versions
from core.sets import SetDecoder
from core.thresholds import ThresholdSpec
from infer.serve.batcher import Engine, Job
from infer.serve.metrics import Metrics
from infer.serve.schema import (
    PredictResponse,
    Schema,
    ServeError,
    parse_rows,
    predict_response,
    public_name,
    strip_paths,
)
from infer.serve.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Service:
    """What the routes share: built once by :func:`create_app`, kept on ``app.state.service``."""

    settings: Settings
    refs: list[AdapterRef]
    schema: Schema
    spec: ThresholdSpec | SetDecoder
    """The decoding: the ``--thresholds`` file (checked against the adapters' labels), else the first adapter's
    ``decode`` section."""
    order: list[int]
    """Where each of ``spec``'s labels sits among the adapters' (it decodes in its own label order)."""
    api_key: str | None
    metrics: Metrics
    engine: Engine


async def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


async def require_api_key(request: Request, svc: ServiceDep) -> None:
    """With ``--api-key-env``: ``Authorization: Bearer <key>`` or a 401 (the key compared in constant time)."""
    if svc.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), svc.api_key.encode()):
        raise ServeError(401, "missing or wrong API key (Authorization: Bearer <key>)", "Authorization",
                         headers={"WWW-Authenticate": "Bearer"})


public = APIRouter()
"""Routes that never need the API key."""
router = APIRouter(dependencies=[Depends(require_api_key)])
"""Every other route."""


@public.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(svc: ServiceDep):
    engine = svc.engine
    if engine.ready.is_set():
        return {"ready": True}
    body = {"ready": False, "error": strip_paths(engine.load_error)} if engine.load_error else {
        "ready": False, "status": "loading"}
    return JSONResponse(body, status_code=503)


@router.get("/info")
async def info(svc: ServiceDep):
    settings, schema = svc.settings, svc.schema
    return {
        "ready": svc.engine.ready.is_set(),
        "base_model": schema.base_model,
        "fields": schema.fields, "text_field": schema.text_field, "template": schema.template,
        "labels": [{"id": n, "class_id": c, "name": schema.descriptions.get(n)}
                   for n, c in zip(schema.label_names, schema.class_ids)],
        "thresholds": {"source": Path(settings.thresholds).name if settings.thresholds else "default",
                       **{k: v for k, v in svc.spec.to_dict().items() if k != "meta"}},
        "adapters": [{**{k: v for k, v in r.describe().items() if k != "folder"}, "spec": public_name(r.spec),
                      "base_model": schema.base_model} for r in svc.refs],
        "limits": {k: getattr(settings, k) for k in ("max_batch_size", "max_batch_tokens", "max_wait_ms",
                                                     "max_queue", "max_rows", "max_text_chars",
                                                     "max_field_chars", "max_body_bytes", "max_request_tokens",
                                                     "header_timeout_s", "keep_alive_s", "body_timeout_s",
                                                     "no_empty_text")},
        "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "fastapi", "pydantic",
                              "uvicorn", "qlora-multilabel")),
    }


@router.get("/metrics")
async def prometheus(svc: ServiceDep):
    body, content_type = svc.metrics.exposition()
    return PlainTextResponse(body, media_type=content_type)


def check_content_type(request: Request) -> None:
    """A body must say it is JSON (415 otherwise): a web page can send ``text/plain`` or a form to a local server
    without a CORS preflight, but not ``application/json``."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ServeError(415, f"Content-Type must be application/json, got {media[:60] or 'none'!r}",
                         "Content-Type")


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused (413) past ``max_bytes`` whether or not a Content-Length says so up front, and
    (408) when it takes longer than ``timeout_s`` to arrive."""
    if timeout_s is not None:
        try:
            return await asyncio.wait_for(read_body(request, max_bytes), timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(408, f"the body did not arrive within {timeout_s}s (--body-timeout-s)",
                             "body") from None
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > max_bytes
        except ValueError:
            raise ServeError(400, "Content-Length is not a number", "Content-Length") from None
        if too_big:
            raise ServeError(413, f"body of {length} bytes is over the limit of {max_bytes} (--max-body-bytes)",
                             "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ServeError(413, f"body is over the limit of {max_bytes} bytes (--max-body-bytes)", "body")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/predict", response_model=PredictResponse)
async def predict(request: Request, svc: ServiceDep):
    settings, engine = svc.settings, svc.engine
    check_content_type(request)
    rows = parse_rows(await read_body(request, settings.max_body_bytes, settings.body_timeout_s), svc.schema,
                      settings)
    if not engine.ready.is_set():
        raise ServeError(503, "model not ready" + (f": {engine.load_error}" if engine.load_error else
                                                   " (loading); see GET /ready"))
    job = Job([format_prompt(svc.schema.template, r, svc.schema.kinds) for r in rows])
    try:
        engine.submit(job)
    except queue.Full:
        raise ServeError(429, f"too many requests waiting ({settings.max_queue}, --max-queue); retry "
                              f"later") from None
    try:
        probs = await asyncio.wait_for(asyncio.wrap_future(job.future), settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise ServeError(504, f"no answer from the model within {settings.request_timeout_s}s") from None
    except ServeError:  # the worker refused it (over the token budget)
        raise
    except Exception:  # a model failure: logged with an id, the next request works
        error_id = uuid.uuid4().hex[:12]
        logger.exception("model error %s (%d rows)", error_id, len(rows))
        return JSONResponse({"error": "the model failed on this batch", "error_id": error_id}, status_code=500)
    return predict_response(np.asarray(probs), svc.schema, svc.spec, svc.order, svc.refs)


class AsciiJSONResponse(JSONResponse):
    """JSON as ASCII: an error naming a field whose name holds a lone surrogate still encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def serve_error(request: Request, e: ServeError) -> JSONResponse:
    return AsciiJSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def observe(request: Request, call_next):
    """Every request counted (by endpoint and status) and timed; an unexpected error is a JSON 500, logged with an
    id, and the server goes on."""
    metrics: Metrics = request.app.state.metrics
    path = request.url.path
    endpoint = metrics.endpoint(path)
    t0 = time.perf_counter()
    metrics.in_flight.inc()
    try:
        try:
            response = await call_next(request)
        except Exception:  # unexpected: logged with an id, the server goes on
            error_id = uuid.uuid4().hex[:12]
            logger.exception("error %s on %s", error_id, path)
            response = JSONResponse({"error": "internal error", "error_id": error_id}, status_code=500)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response
    finally:
        metrics.in_flight.dec()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


@asynccontextmanager
async def lifespan(app: FastAPI):
    engine: Engine = app.state.engine
    engine.start()  # loads in the worker thread: /health answers meanwhile, /ready says 503
    try:
        yield
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)


def create_app(predictor_factory: Callable | None = None, settings: Settings | None = None,
               refs: Sequence[AdapterRef] | None = None) -> FastAPI:
    """Build the FastAPI app.

    Args:
        predictor_factory: ``factory(refs) -> Predictor`` (anything with ``token_ids``, ``predict_token_ids`` and
            ``weights`` like :class:`infer.predict.Predictor`), called once in the worker thread at startup. Default:
            :func:`infer.predict.load_refs` on ``settings.device`` / ``settings.base_model``.
        settings: the server settings (default :class:`Settings`).
        refs: the adapters (default: ``infer.predict.collect(settings.adapters, settings.weights)``).

    Raises:
        InputError: bad adapters, thresholds or settings (before anything is loaded).
    """
    settings = settings or Settings()
    settings.check()
    if refs is None:
        from infer.predict import collect

        refs = collect(settings.adapters, settings.weights)
    refs = list(refs)
    if settings.thresholds is None:  # one final / merged adapter: its own tuned thresholds.json
        settings.thresholds = own_thresholds([r.folder for r in refs])
    if predictor_factory is None:
        from infer.predict import load_refs

        def predictor_factory(r):
            return load_refs(r, device=settings.device, base_model=settings.base_model)

    schema = Schema(refs, settings)
    spec = adapter_spec(refs[0], settings.thresholds)
    order = [schema.label_names.index(n) for n in spec.label_names]  # decode in the thresholds' label order
    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env, "")
        if not api_key.strip():
            raise InputError(f"--api-key-env {settings.api_key_env}: that environment variable is empty or unset")
    metrics = Metrics()
    engine = Engine(predictor_factory, schema, settings, metrics)

    app = FastAPI(title="qlora-multilabel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = Service(settings, refs, schema, spec, order, api_key, metrics, engine)
    app.state.engine, app.state.metrics, app.state.schema, app.state.spec = engine, metrics, schema, spec
    app.middleware("http")(observe)
    app.add_exception_handler(ServeError, serve_error)
    app.include_router(public)
    app.include_router(router)
    return app


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks); yields its base URL.

    ``port=0`` picks a free port. The app's lifespan runs (the model loads in its worker thread; poll /ready).
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    from infer.serve.http import server_config

    server = uvicorn.Server(server_config(app, app.state.service.settings, host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="qlml-serve-http", daemon=True)
    thread.start()
    t0 = time.perf_counter()
    while not server.started:
        if not thread.is_alive() or time.perf_counter() - t0 > timeout:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
