"""The micro-batcher: a bounded queue of requests and the one worker thread that loads the model, warms it up and
runs every batch.

A batch is flushed at ``--max-batch-size`` rows, at the ``--max-batch-tokens`` budget (rows x longest row, as padded)
or after ``--max-wait-ms``; a request that would overflow it waits for the next one. Prompts are tokenised in the
worker thread too (HF tokenizers are not thread-safe). A request answers through its :class:`Job`'s future.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from core.data import format_prompt
from infer.serve.metrics import Metrics
from infer.serve.schema import Schema, ServeError
from infer.serve.settings import Settings

logger = logging.getLogger(__name__)


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
            self._predict([format_prompt(self.schema.template, warm, self.schema.kinds)])
        except Exception as e:  # reported by /ready, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            logger.exception("loading the model failed")
            return
        logger.info("model loaded and warmed up in %.1fs; ready", time.perf_counter() - t0)
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
                logger.exception("worker error")

    def _tokenize(self, job: Job) -> bool:
        """Tokenise a job's prompts (here, in the one model thread: HF tokenizers are not thread-safe)."""
        if job.future.cancelled():  # its request timed out while queued
            return False
        try:
            job.token_ids = self.predictor.token_ids(job.texts, self.schema.max_length)
        except Exception as e:  # noqa: BLE001 - a tokenizer failure is a model error of this request only
            self.metrics.model_errors.inc()
            job.resolve(error=e)
            return False
        budget = self.settings.max_request_tokens
        if job.rows * job.longest > budget:
            job.resolve(error=ServeError(413, f"{job.rows} rows x {job.longest} tokens is over the budget of {budget} "
                                              f"tokens per request (--max-request-tokens); send fewer or shorter "
                                              f"rows", "rows"))
            return False
        return True

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

