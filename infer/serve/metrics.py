"""The server's Prometheus metrics (prometheus-client), in a registry of their own (one per app)."""

from __future__ import annotations

ENDPOINTS = ("/predict", "/health", "/ready", "/info", "/metrics")
"""The ``endpoint`` label's values; any other path is counted as ``other``."""


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

    @staticmethod
    def endpoint(path: str) -> str:
        """The ``endpoint`` label of a request path."""
        return path if path in ENDPOINTS else "other"

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
