"""Running the app under uvicorn with limits for slow and idle clients.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for a request whose
headers never finish: 1,000 such connections stayed open against finegrain 0.1. :class:`DeadlineH11Protocol`
gives every request ``header_timeout`` seconds from its first byte (or from the connection's start) to complete
its headers, then closes the connection; the app's :class:`finegrain.serve.app.BodyTimeout` does the same for a
body that stops arriving. ``limit_concurrency`` bounds open connections (uvicorn answers 503 past it).
"""

from __future__ import annotations

import asyncio

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for receiving a complete request head."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head:
            self._arm()  # a new request started arriving on a kept-alive connection
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # its head is complete: the request runs

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def run(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout: float = 10.0,
    keep_alive: float = 5.0,
    max_connections: int = 256,
) -> None:
    protocol = type("FinegrainH11", (DeadlineH11Protocol,), {"header_timeout": header_timeout})
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
        timeout_keep_alive=keep_alive, limit_concurrency=max_connections,
    )  # fmt: skip
