"""``python -m infer serve``: an HTTP API over trained adapter(s), with micro-batching.

One process holds the 4-bit base model once and its adapters (the same :class:`infer.predict.Predictor` as
``infer predict``: a run folder's folds are averaged, ``--weights`` weight an ensemble). Concurrent requests go into a
bounded queue; one worker thread runs the model on micro-batches of rows, flushed at ``--max-batch-size`` rows, at
the ``--max-batch-tokens`` budget (rows x longest row, as padded) or after ``--max-wait-ms``. A full queue answers 429.

Endpoints:
    POST /predict   {"rows": [{"assessment": 4, "tags": ["DELIVERY"], "text": "..."}]} -> probabilities + labels
    GET  /health    the process is alive (never needs the API key)
    GET  /ready     200 once the model is loaded and a warm-up batch ran, 503 before (or if loading failed)
    GET  /info      labels, thresholds, adapters, versions, limits
    GET  /metrics   Prometheus text format

The row fields are exactly the fields of the adapter's ``data.text_template``; each row is formatted with
:func:`core.data.format_prompt`, the formatter training used (a list like ``["DELIVERY", "PRICE"]`` formats as the
CSV's ``{DELIVERY,PRICE}`` does). Numbers format as given: the DLS CSV's assessment column reads as floats (``4.0``).

Usage:
    python -m infer serve --adapter adapters/gemma-3-270m --thresholds thresholds.json --port 8000
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
        -d '{"rows": [{"assessment": 4.0, "tags": ["DELIVERY"], "text": "Курьер опоздал"}]}'
"""


import argparse
import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.adapter import AdapterRef, base_model_id
from core.config import ConfigError
from core.data import format_prompt, format_value, template_fields
from core.decoding import adapter_default_spec, adapter_spec
from core.errors import InputError
from core.thresholds import ThresholdSpec, class_ids

log = logging.getLogger("infer.serve")
ENDPOINTS = ("/predict", "/health", "/ready", "/info", "/metrics")


@dataclass
class Settings:
    """Everything ``serve`` is configured with (the CLI flags)."""

    adapters: list[str] = field(default_factory=list)
    weights: str | None = None
    thresholds: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    """Rows per model call (1 turns micro-batching off)."""
    max_batch_tokens: int = 8192
    """Rows x longest row (as padded) per model call; one request bigger than that still runs, alone."""
    max_wait_ms: float = 5.0
    """How long the worker waits for more rows before it runs a batch that is not full."""
    max_queue: int = 256
    """Requests waiting for the model; more answer 429."""
    max_rows: int = 64
    max_text_chars: int = 4000
    max_body_bytes: int = 1_000_000
    no_empty_text: bool = False
    text_field: str | None = None
    """The row field that ``--no-empty-text`` / ``--max-text-chars`` check (default ``text``, else the template's
    last field)."""
    api_key_env: str | None = None
    device: str | None = None
    base_model: str | None = None
    request_timeout_s: float = 120.0

    def check(self) -> None:
        """Raises InputError naming the flag that is out of range."""
        for name in ("max_batch_size", "max_batch_tokens", "max_queue", "max_rows", "max_text_chars",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.request_timeout_s <= 0:
            raise InputError(f"--request-timeout-s must be > 0, got {self.request_timeout_s}")


default_spec = adapter_default_spec


def load_spec(refs: Sequence[AdapterRef], thresholds: str | Path | None) -> ThresholdSpec:
    """The ``--thresholds`` file (checked against the adapters' labels), else the first adapter's ``decode``."""
    return adapter_spec(refs[0], thresholds)


class ServeError(Exception):
    """An error answered as JSON: ``{"error": message, "field": ..., "row": ...}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None, row: int | None = None,
                 details: list | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.row, self.details = status, message, field, row, details

    def body(self) -> dict:
        out = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.row is not None:
            out["row"] = self.row
        if self.details:
            out["details"] = self.details
        return out


# ---------------------------------------------------------------------------------------------------------------
# The model side: prompts, tokens, weighted probabilities
# ---------------------------------------------------------------------------------------------------------------


class Schema:
    """What the adapters expect of a row (template fields) and say about their labels; no model needed."""

    def __init__(self, refs: Sequence[AdapterRef], settings: Settings):
        first = refs[0]
        keys = {(r.cfg.data.text_template, r.cfg.data.max_length) for r in refs}
        if len(keys) > 1:
            raise InputError(f"serve needs adapters that share data.text_template and data.max_length; "
                             f"{first.folder} and another adapter differ")
        self.refs = list(refs)
        self.template = first.cfg.data.text_template
        self.max_length = first.cfg.data.max_length
        self.fields = template_fields(self.template)
        if not self.fields:
            raise InputError(f"{first.folder}: data.text_template uses no field")
        if settings.text_field is not None and settings.text_field not in self.fields:
            raise InputError(f"--text-field {settings.text_field!r} is not a field of the adapter's "
                             f"data.text_template (fields: {self.fields})")
        self.text_field = settings.text_field or ("text" if "text" in self.fields else self.fields[-1])
        self.label_names = list(first.label_names)
        self.descriptions = dict(first.descriptions)
        self.class_ids = class_ids(self.label_names)
        self.base_model = first.info.get("base_model") or base_model_id(first.cfg)
        self.request_model = build_request_model(self.fields)


def build_request_model(fields: Sequence[str]):
    """The pydantic model of a ``/predict`` body: ``rows``, a non-empty list of objects with exactly ``fields``."""
    from pydantic import ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model

    value = StrictStr | StrictInt | StrictFloat | list[StrictStr] | None
    # Python-safe attribute names; the JSON keys are the template's field names (aliases).
    row = create_model("Row", __config__=ConfigDict(extra="forbid"),
                       **{f"f{i}": (value, Field(..., alias=name)) for i, name in enumerate(fields)})
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"),
                        rows=(list[row], Field(..., min_length=1)))


class Job:
    """One request's rows on their way through the queue."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.token_ids: list[list[int]] | None = None
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.enqueued = time.perf_counter()

    @property
    def rows(self) -> int:
        return len(self.texts)

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """Answer the request unless it gave up waiting (its future was cancelled)."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass

    @property
    def longest(self) -> int:
        return max(len(t) for t in self.token_ids)


class Metrics:
    """The server's Prometheus metrics in their own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("qlml_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("qlml_serve_requests_in_flight", "HTTP requests being answered", registry=r)
        self.latency = Histogram("qlml_serve_request_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.queue_wait = Histogram("qlml_serve_queue_wait_seconds", "Time a request waited for its batch",
                                    registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.batch_rows = Histogram("qlml_serve_batch_rows", "Rows per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.rows = Counter("qlml_serve_rows", "Rows predicted", registry=r)
        self.queue_depth = Gauge("qlml_serve_queue_depth", "Requests waiting for the model", registry=r)
        self.load_seconds = Gauge("qlml_serve_model_load_seconds", "Seconds loading the model took", registry=r)
        self.model_errors = Counter("qlml_serve_model_errors", "Batches that failed inside the model", registry=r)


class Engine:
    """The bounded queue and the one worker thread that loads the model, warms it up and runs every batch."""

    def __init__(self, predictor_factory: Callable, schema: Schema, settings: Settings, metrics: Metrics):
        self.factory, self.schema, self.settings, self.metrics = predictor_factory, schema, settings, metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self.predictor = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="qlml-serve-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:  # whatever is still queued gets an answer
            try:
                self.queue.get_nowait().resolve(error=RuntimeError("server shutting down"))
            except queue.Empty:
                break
        close = getattr(self.predictor, "close", None)
        if callable(close):
            close()
        self.predictor = None

    def submit(self, job: Job) -> None:
        """Queue a job; raises ``queue.Full`` when the queue is full."""
        self.queue.put_nowait(job)
        self.metrics.queue_depth.set(self.queue.qsize())

    # -- the worker thread ---------------------------------------------------------------------------------------

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.predictor = self.factory(self.schema.refs)
            self.metrics.load_seconds.set(time.perf_counter() - t0)
            warm = {f: "" for f in self.schema.fields}
            warm[self.schema.text_field] = "warm up"
            self._predict([format_prompt(self.schema.template, warm)])
        except Exception as e:  # reported by /ready, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")
            return
        log.info("model loaded and warmed up in %.1fs; ready", time.perf_counter() - t0)
        self.ready.set()
        pending: Job | None = None
        while not self._stop.is_set():
            try:
                job = pending or self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            pending = None
            try:
                batch, pending = self._gather(job)
                if batch:
                    self._run(batch)
            except Exception:  # never let the worker die
                log.exception("worker error")

    def _tokenize(self, job: Job) -> bool:
        """Tokenise a job's prompts (here, in the one model thread: HF tokenizers are not thread-safe)."""
        if job.future.cancelled():  # its request timed out while queued
            return False
        try:
            job.token_ids = self.predictor.token_ids(job.texts, self.schema.max_length)
            return True
        except Exception as e:  # noqa: BLE001
            job.resolve(error=e)
            return False

    def _gather(self, first: Job) -> tuple[list[Job], Job | None]:
        """``first`` plus whatever fits in the batch within ``max_wait_ms``; returns (batch, carried-over job)."""
        s = self.settings
        if not self._tokenize(first):
            return [], None
        batch, rows, longest = [first], first.rows, first.longest
        deadline = time.perf_counter() + s.max_wait_ms / 1000
        pending = None
        while rows < s.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                nxt = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if not self._tokenize(nxt):
                continue
            n, width = rows + nxt.rows, max(longest, nxt.longest)
            if n > s.max_batch_size or n * width > s.max_batch_tokens:
                pending = nxt
                break
            batch.append(nxt)
            rows, longest = n, width
        self.metrics.queue_depth.set(self.queue.qsize())
        return batch, pending

    def _predict(self, texts: list[str], token_ids: list[list[int]] | None = None) -> np.ndarray:
        """Weighted mean probabilities (N x L) of every adapter, as :meth:`Predictor.predict_texts` computes them."""
        p = self.predictor
        ids = p.token_ids(texts, self.schema.max_length) if token_ids is None else token_ids
        size = max(1, min(len(ids), self.settings.max_batch_size))
        w = p.weights()
        each = [p.predict_token_ids(ids, i, batch_size=size) for i in range(len(w))]
        return np.tensordot(w, np.stack(each), axes=1)

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        for job in batch:
            self.metrics.queue_wait.observe(start - job.enqueued)
        token_ids = [t for job in batch for t in job.token_ids]
        self.metrics.batch_rows.observe(len(token_ids))
        try:
            probs = self._predict([t for job in batch for t in job.texts], token_ids)
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error; the next batch runs
            self.metrics.model_errors.inc()
            for job in batch:
                job.resolve(error=e)
            return
        self.metrics.rows.inc(len(token_ids))
        at = 0
        for job in batch:
            job.resolve(probs[at:at + job.rows])
            at += job.rows


# ---------------------------------------------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------------------------------------------


def _field_path(loc: Sequence) -> str:
    return ".".join(str(x) for x in loc)


def validation_error(e, fields: Sequence[str]) -> ServeError:
    """A pydantic ValidationError -> 422 naming the first bad field (``rows.3.text``) and row."""
    errors = e.errors(include_url=False, include_input=False)
    details: dict[str, str] = {}
    for err in errors:
        loc = list(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        # The union of value types reports each alternative (rows.0.text.str, ...): one message for the field.
        if len(loc) >= 4 and loc[0] == "rows" and isinstance(loc[1], int):
            loc, msg = loc[:3], "must be a string, a number, a list of strings or null"
        details.setdefault(_field_path(loc), msg)
        if len(details) >= 20:
            break
    details = [{"field": k, "message": v} for k, v in details.items()]
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    if not first["field"]:
        first["field"] = "body"
    loc = errors[0].get("loc", ()) if errors else ()
    row = loc[1] if len(loc) >= 2 and loc[0] == "rows" and isinstance(loc[1], int) else None
    msg = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    if row is not None and len(loc) >= 3 and errors[0].get("type") == "extra_forbidden":
        msg += f" (row fields are the template's: {list(fields)})"
    return ServeError(422, msg, first["field"], row, details if len(details) > 1 else None)


def create_app(predictor_factory: Callable | None = None, settings: Settings | None = None,
               refs: Sequence[AdapterRef] | None = None):
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
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import ValidationError

    from core.io import versions

    settings = settings or Settings()
    settings.check()
    if refs is None:
        from infer.predict import collect

        refs = collect(settings.adapters, settings.weights, log=log.info)
    refs = list(refs)
    if predictor_factory is None:
        from infer.predict import load_refs

        def predictor_factory(r):
            return load_refs(r, device=settings.device, base_model=settings.base_model, log=log.info)

    schema = Schema(refs, settings)
    spec = load_spec(refs, settings.thresholds)
    order = [schema.label_names.index(n) for n in spec.label_names]  # decode in the thresholds' label order
    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env, "")
        if not api_key.strip():
            raise InputError(f"--api-key-env {settings.api_key_env}: that environment variable is empty or unset")
    metrics = Metrics()
    engine = Engine(predictor_factory, schema, settings, metrics)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()  # loads in the worker thread: /health answers meanwhile, /ready says 503
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="qlora-multilabel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.schema, app.state.spec = engine, metrics, schema, spec

    def error(e: ServeError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        t0 = time.perf_counter()
        metrics.in_flight.inc()
        try:
            if api_key is not None and path != "/health":
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                    response = JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)",
                                             "field": "Authorization"}, status_code=401,
                                            headers={"WWW-Authenticate": "Bearer"})
                    metrics.requests.labels(endpoint, "401").inc()
                    return response
            try:
                response = await call_next(request)
            except Exception:  # unexpected: logged with an id, the server goes on
                error_id = uuid.uuid4().hex[:12]
                log.exception("error %s on %s", error_id, path)
                response = JSONResponse({"error": "internal error", "error_id": error_id}, status_code=500)
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response
        finally:
            metrics.in_flight.dec()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.ready.is_set():
            return {"ready": True}
        body = {"ready": False, "error": engine.load_error} if engine.load_error else {"ready": False,
                                                                                       "status": "loading"}
        return JSONResponse(body, status_code=503)

    @app.get("/info")
    async def info():
        return {
            "ready": engine.ready.is_set(),
            "base_model": schema.base_model,
            "fields": schema.fields, "text_field": schema.text_field, "template": schema.template,
            "labels": [{"id": n, "class_id": c, "name": schema.descriptions.get(n)}
                       for n, c in zip(schema.label_names, schema.class_ids)],
            "thresholds": {"source": Path(settings.thresholds).name if settings.thresholds else "default",
                           **{k: v for k, v in spec.to_dict().items() if k != "meta"}},
            "adapters": [{k: v for k, v in r.describe().items() if k != "folder"} for r in refs],
            "limits": {k: getattr(settings, k) for k in ("max_batch_size", "max_batch_tokens", "max_wait_ms",
                                                         "max_queue", "max_rows", "max_text_chars",
                                                         "max_body_bytes", "no_empty_text")},
            "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "fastapi", "pydantic",
                                  "uvicorn", "qlora-multilabel")),
        }

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > settings.max_body_bytes
            except ValueError:
                raise ServeError(400, "Content-Length is not a number", "Content-Length") from None
            if too_big:
                raise ServeError(413, f"body of {length} bytes is over the limit of {settings.max_body_bytes} "
                                      f"(--max-body-bytes)", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ServeError(413, f"body is over the limit of {settings.max_body_bytes} bytes (--max-body-bytes)",
                                 "body")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(body: bytes) -> list[dict]:
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ServeError(422, f"body is not JSON: {e}", "body") from None
        rows = obj.get("rows") if isinstance(obj, dict) else None
        if isinstance(rows, list) and len(rows) > settings.max_rows:
            raise ServeError(413, f"{len(rows)} rows is over the limit of {settings.max_rows} (--max-rows)", "rows")
        try:
            req = schema.request_model.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e, schema.fields) from None
        out = [r.model_dump(by_alias=True) for r in req.rows]
        tf = schema.text_field
        for i, row in enumerate(out):
            text = format_value(row.get(tf))
            if settings.no_empty_text and not text.strip():
                raise ServeError(422, f"rows.{i}.{tf}: empty text (--no-empty-text)", f"rows.{i}.{tf}", i)
            if len(text) > settings.max_text_chars:
                raise ServeError(422, f"rows.{i}.{tf}: {len(text)} characters is over the limit of "
                                      f"{settings.max_text_chars} (--max-text-chars)", f"rows.{i}.{tf}", i)
        return out

    @app.post("/predict")
    async def predict(request: Request):
        try:
            rows = parse(await read_body(request))
            if not engine.ready.is_set():
                raise ServeError(503, "model not ready" + (f": {engine.load_error}" if engine.load_error else
                                                           " (loading); see GET /ready"))
            job = Job([format_prompt(schema.template, r) for r in rows])
            try:
                engine.submit(job)
            except queue.Full:
                raise ServeError(429, f"too many requests waiting ({settings.max_queue}, --max-queue); retry "
                                      f"later") from None
            try:
                probs = await asyncio.wait_for(asyncio.wrap_future(job.future), settings.request_timeout_s)
            except asyncio.TimeoutError:
                raise ServeError(504, f"no answer from the model within {settings.request_timeout_s}s") from None
            except Exception:  # a model failure: logged with an id, the next request works
                error_id = uuid.uuid4().hex[:12]
                log.exception("model error %s (%d rows)", error_id, len(rows))
                return JSONResponse({"error": "the model failed on this batch", "error_id": error_id},
                                    status_code=500)
        except ServeError as e:
            return error(e)
        return answer(np.asarray(probs))

    def answer(probs: np.ndarray) -> dict:
        preds = np.zeros(probs.shape, dtype=np.int8)
        preds[:, order] = spec.decode(probs[:, order])
        names, cids = schema.label_names, schema.class_ids
        described = [schema.descriptions.get(n) for n in names]
        out = []
        for p, y in zip(probs.tolist(), preds):
            out.append({
                "labels": [names[j] for j in np.flatnonzero(y)],
                "class_ids": [cids[j] for j in np.flatnonzero(y)],
                "probabilities": [{"id": n, "class_id": c, "name": d, "probability": v}
                                  for n, c, d, v in zip(names, cids, described, p)],
            })
        return {"model": schema.base_model, "adapters": [r.name for r in refs], "rows": out}

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
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="on"))
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


# ---------------------------------------------------------------------------------------------------------------
# The serve command
# ---------------------------------------------------------------------------------------------------------------


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
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
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
    p.set_defaults(func=_cli)
    return p


def settings_from_args(args) -> Settings:
    names = {f for f in asdict(Settings())}
    values = {k: v for k, v in vars(args).items() if k in names and k != "adapters"}
    return Settings(adapters=[a for value in args.adapter for a in value.split(",") if a.strip()], **values)


def _cli(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        app = create_app(settings=settings)
    except (InputError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key_env:
        log.warning("serving on %s without --api-key-env: anyone who can reach it can use it", settings.host)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
