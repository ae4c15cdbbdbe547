"""Running the app under uvicorn with limits for slow and idle clients.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for a request whose
headers never finish: 1,000 such connections stayed open against finegrain 0.1. :class:`DeadlineH11Protocol`
gives every request ``header_timeout`` seconds from its first byte (or from the connection's start) to complete
its headers, then closes the connection; the app's :class:`finegrain.serve.app.BodyTimeout` does the same for a
body that stops arriving. ``limit_concurrency`` bounds open connections (uvicorn answers 503 past it).

The deadline alone did not keep the service up: 300 connections that send a partial request line, reopened as soon
as they were cut, kept the open-connection count at uvicorn's limit, and 221 of 222 ordinary requests got 503 over
45 s (the hostile-files issue). So connections still sending their head are also capped, all clients together
(``max_waiting``) and per client address (``max_waiting_per_client``); past a cap the oldest slow ones are closed
(:class:`WaitingRoom`): an ordinary request completes its head in milliseconds and leaves the waiting set at once,
so it is admitted ahead of the slow ones. ``limit_concurrency`` (``--max-connections``, 1,024) counts only
connections that have sent a request (:class:`AdmittedConnections`): with it at 256 and counting every socket,
connections the cap had closed but the event loop had not yet released still counted, and under 1,000 slow clients
reopening at once a few ordinary requests got uvicorn's own 503, which the app never sees and /metrics cannot count.
"""

from __future__ import annotations

import asyncio
import resource
import select

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol


class WaitingRoom:
    """One server's connections still sending a request head, oldest first, and the caps on them.

    The caps are enforced by one sweep per event-loop turn in which someone entered or sent part of a head, not once
    per arrival: 1,000 slow clients reopening at once arrive in bursts, and a scan per arrival made each burst cost
    its square. A connection is closed as slow only if it was read and stopped, or sent nothing for ``grace`` s; one
    whose bytes wait in its socket is only not read yet. Closing such ones (an ordinary request accepted in the same
    burst as 8 slow ones from its address) cut 1-4 of 20 ordinary requests in 5 of 8 runs of
    ``test_slow_clients_reopened_at_once_cannot_crowd_out_ordinary_requests`` on a busy 2-core machine, and 2 of 20
    in CI (2026-12-06).
    """

    def __init__(self, max_waiting: int = 128, max_per_client: int = 64, grace: float = 0.25) -> None:
        self.max_waiting, self.max_per_client, self.grace = max_waiting, max_per_client, grace
        self.queue: dict[DeadlineH11Protocol, None] = {}
        self.unadmitted: set[DeadlineH11Protocol] = set()  # connections that never completed a head
        self.sweep_due = False

    def enter(self, connection: DeadlineH11Protocol) -> None:
        self.queue[connection] = None
        self.ask_sweep(connection.loop)

    def ask_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.sweep_due and len(self.queue) > min(self.max_waiting, self.max_per_client):
            self.sweep_due = True
            loop.call_soon(self.sweep, loop)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Past a cap, the oldest slow connections are closed: first each client's, then anyone's."""
        self.sweep_due = False
        now, by_client = loop.time(), {}
        for c in self.queue:
            by_client.setdefault(c.host, []).append(c)
        for mine in by_client.values():
            self.close_oldest(mine, self.max_per_client, now)
        self.close_oldest(list(self.queue), self.max_waiting, now)

    def close_oldest(self, queue: list[DeadlineH11Protocol], cap: int, now: float) -> None:
        excess = len(queue) - cap
        for oldest in queue:
            if excess <= 0:
                break
            if (oldest.read or now - oldest.since >= self.grace) and not oldest.unread_bytes():
                oldest.too_slow()
                excess -= 1


class AdmittedConnections:
    """uvicorn's set of open connections as its ``limit_concurrency`` 503 counts them: those still sending their
    first head are left out (the waiting room bounds them), so a burst of slow connections that the sweep has not
    yet reached cannot push an ordinary request over the limit."""

    def __init__(self, everyone: set, unadmitted: set) -> None:
        self.everyone, self.unadmitted = everyone, unadmitted

    def add(self, connection: object) -> None:
        self.everyone.add(connection)

    def discard(self, connection: object) -> None:
        self.everyone.discard(connection)

    def __len__(self) -> int:
        return len(self.everyone) - len(self.unadmitted)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for receiving a complete request head and a waiting room."""

    header_timeout: float = 10.0
    #: one per server: :func:`run` gives each its own
    room: WaitingRoom = WaitingRoom()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connections = AdmittedConnections(self.server_state.connections, self.room.unadmitted)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.host = (self.client or ("",))[0]  # (host, port): the host alone is the client
        self.room.unadmitted.add(self)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.read = False
        self.arm()

    def arm(self) -> None:
        if self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.header_timeout, self.too_slow)
            self.since = self.loop.time()
            self.room.enter(self)

    def disarm(self) -> None:
        self.room.queue.pop(self, None)
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def too_slow(self) -> None:
        self.disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def unread_bytes(self) -> bool:
        sock = self.transport.get_extra_info("socket")
        if sock is None or not hasattr(select, "poll"):
            return False
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        return bool(poll.poll(0))

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.arm()  # a new request started arriving on a kept-alive connection
        self.read = True
        super().data_received(data)
        if self.cycle is not None:
            self.room.unadmitted.discard(self)  # it has sent a request: uvicorn's limit counts it from now on
            if not self.cycle.response_complete:
                self.disarm()  # its head is complete: the request runs
        if self in self.room.queue:
            self.room.ask_sweep(self.loop)  # still incomplete: a candidate now

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.room.unadmitted.discard(self)
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
    room = WaitingRoom(max_waiting, max_waiting_per_client)
    protocol = type("FinegrainH11", (DeadlineH11Protocol,), {"header_timeout": header_timeout, "room": room})
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
        timeout_keep_alive=keep_alive, limit_concurrency=max_connections,
    )  # fmt: skip
