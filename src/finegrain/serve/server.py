"""Running the app under uvicorn with limits for slow and idle clients.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for a request whose
headers never finish: 1,000 such connections stayed open against finegrain 0.1. :class:`DeadlineH11Protocol`
gives every request ``header_timeout`` seconds from its first byte (or from the connection's start) to complete
its headers, then closes the connection; the app's :class:`finegrain.serve.app.BodyTimeout` does the same for a
body that stops arriving. ``limit_concurrency`` bounds open connections (uvicorn answers 503 past it).

The deadline alone did not keep the service up: 300 connections that send a partial request line, reopened as soon
as they were cut, kept the open-connection count at uvicorn's limit, and 221 of 222 ordinary requests got 503 over
45 s (the hostile-files issue). So connections still sending their head are also capped, all clients together
(``max_waiting``) and per client address (``max_waiting_per_client``); a new connection past a cap closes the oldest
waiting one, which is the slowest: an ordinary request completes its head in milliseconds and leaves the waiting
set at once, so it is admitted ahead of the slow ones, and slow clients can never hold more than ``max_waiting`` of
the ``limit_concurrency`` connections. That limit (``--max-connections``) is 1,024: with it at 256, connections
the cap had closed but the event loop had not yet released still counted, and under 1,000 slow clients reopening
at once a few ordinary requests got uvicorn's own 503, which the app never sees and /metrics cannot count.
"""

from __future__ import annotations

import asyncio
import resource

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for receiving a complete request head."""

    header_timeout: float = 10.0
    max_waiting: int = 128
    max_waiting_per_client: int = 64
    #: connections whose head is incomplete, oldest first (one dict per server: :func:`run` gives each its own)
    waiting: dict = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._too_slow)
            self.waiting[self] = None
            self._evict()

    def _evict(self) -> None:
        """Past a cap, the oldest waiting connections (the slowest) are closed: first this client's, then anyone's."""
        address = (self.client or ("",))[0]  # (host, port): the host alone is the client
        mine = [p for p in self.waiting if (p.client or ("",))[0] == address]
        for oldest in mine[: max(0, len(mine) - self.max_waiting_per_client)]:
            oldest._too_slow()
        for oldest in list(self.waiting)[: max(0, len(self.waiting) - self.max_waiting)]:
            oldest._too_slow()

    def _disarm(self) -> None:
        self.waiting.pop(self, None)
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._disarm()
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
    max_connections: int = 1024,
    max_waiting: int = 128,
    max_waiting_per_client: int = 64,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket each, plus the files the server opens
    want = max_connections + 256 if hard == resource.RLIM_INFINITY else min(hard, max_connections + 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    limits = {"header_timeout": header_timeout, "max_waiting": max_waiting,
              "max_waiting_per_client": max_waiting_per_client, "waiting": {}}  # fmt: skip
    protocol = type("FinegrainH11", (DeadlineH11Protocol,), limits)
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
        timeout_keep_alive=keep_alive, limit_concurrency=max_connections,
    )  # fmt: skip
