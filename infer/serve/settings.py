"""Everything ``serve`` is configured with: one dataclass, one field per CLI flag, checked before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import InputError


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
    max_field_chars: int = 1000
    """Characters of every other field (as formatted: a list's items joined)."""
    max_body_bytes: int = 1_000_000
    max_request_tokens: int = 16384
    """Rows x longest row (as tokenised and padded, each row at most ``data.max_length`` tokens) of one request;
    more answer 413, so that one request cannot hold the model for long."""
    header_timeout_s: float = 10.0
    """A connection's request line and headers must arrive within this (else it is closed)."""
    keep_alive_s: float = 5.0
    """An idle keep-alive connection is closed after this."""
    body_timeout_s: float = 30.0
    """A request's body must arrive within this (408 otherwise)."""
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
                     "max_field_chars", "max_body_bytes", "max_request_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        for name in ("request_timeout_s", "header_timeout_s", "keep_alive_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
