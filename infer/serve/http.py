"""The HTTP server's configuration: uvicorn on h11 with a header timeout and a keep-alive timeout.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but waits for a request line and headers
forever: a client that opens connections and sends nothing (or a byte at a time) would hold them open.
:class:`TimedH11Protocol` closes a connection whose request line and headers have not all arrived within
``--header-timeout-s`` of its start (or of the end of its previous response). The body has its own limit
(``--body-timeout-s``, :func:`infer.serve.app.read_body`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from infer.serve.settings import Settings


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout (``header_timeout_s``, set by :func:`server_config`)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._waiting_since = self.cycle  # a new request replaces the cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_since and not self.transport.is_closing():
            self.transport.close()  # no (complete) request in time

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._waiting_since:  # a request's headers arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_header_timer()  # before a pipelined request's headers are handled (which disarms it)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def server_config(app, settings: Settings, host: str, port: int, log_level: str = "warning", **kw):
    """The ``uvicorn.Config`` of ``app``: h11 with :class:`TimedH11Protocol` and the settings' timeouts."""
    import uvicorn

    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          http=protocol, timeout_keep_alive=max(1, round(settings.keep_alive_s)),
                          h11_max_incomplete_event_size=32 * 1024, **kw)
