"""One epoll loop for many paho clients, with timers.

Workflow: `Loop.attach(client)` sets the client's socket callbacks (paho's external-loop API): a socket that opens
is registered for reading, `register_write` adds writing while paho has bytes queued, `unregister_write` takes it
away, and a socket that closes is unregistered. `run_once(wait_s)` waits on epoll at most `wait_s` (or until the
next timer), calls `loop_read` / `loop_write` on the clients whose sockets are ready, runs the timers that are due
and calls `loop_misc` (pings and keepalive checks) on a slice of the clients, so each gets one every `misc_every_s`.
Clients made this way never start paho's own thread, so they have no wake-up socket pair: one descriptor each.
Everything runs on the thread that calls `run_once`; `later(delay_s, fn)` is the only way to schedule work.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

log = logging.getLogger("slmops.devsim.loop")
IN, OUT = select.EPOLLIN, select.EPOLLOUT
FAULT = select.EPOLLERR | select.EPOLLHUP


class Loop:
    def __init__(self, *, misc_every_s: float = 2.0) -> None:
        self.ep = select.epoll()
        self.fds: dict[int, mqtt.Client] = {}
        self.clients: list[mqtt.Client] = []
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.misc_every_s = misc_every_s
        self._misc_at, self._misc_last = 0, time.monotonic()
        self.errors = 0  # exceptions raised by timers or callbacks (logged)

    # -- clients ------------------------------------------------------------------------------------------------
    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        self.clients.append(client)

    def _opened(self, client: mqtt.Client, _u: object, sock) -> None:
        fd = sock.fileno()
        self.fds[fd] = client
        try:
            self.ep.register(fd, IN)
        except FileExistsError:  # a descriptor number reused before its old registration went away
            self.ep.modify(fd, IN)

    def _closed(self, client: mqtt.Client, _u: object, sock) -> None:
        fd = sock.fileno()
        if self.fds.get(fd) is client:
            del self.fds[fd]
            try:
                self.ep.unregister(fd)
            except (FileNotFoundError, OSError):
                pass

    def _want_write(self, client: mqtt.Client, _u: object, sock) -> None:
        fd = sock.fileno()
        if self.fds.get(fd) is client:
            self.ep.modify(fd, IN | OUT)

    def _no_write(self, client: mqtt.Client, _u: object, sock) -> None:
        fd = sock.fileno()
        if self.fds.get(fd) is client:
            self.ep.modify(fd, IN)

    # -- timers -------------------------------------------------------------------------------------------------
    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + max(0.0, delay_s), next(self._order), fn))

    # -- the loop -----------------------------------------------------------------------------------------------
    def run_once(self, wait_s: float = 0.05) -> None:
        now = time.monotonic()
        if self.timers:
            wait_s = max(0.0, min(wait_s, self.timers[0][0] - now))
        for fd, ev in self.ep.poll(wait_s, 4096):
            client = self.fds.get(fd)
            if client is None:
                continue
            try:
                if ev & (IN | FAULT):
                    client.loop_read()
                if ev & OUT and self.fds.get(fd) is client:
                    client.loop_write()
            except Exception:
                self.errors += 1
                log.exception("a client's read or write failed")
        self._run_timers()
        self._misc()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            try:
                fn()
            except Exception:
                self.errors += 1
                log.exception("a simulator timer failed")

    def _misc(self) -> None:
        now = time.monotonic()
        n = len(self.clients)
        share = int(n * (now - self._misc_last) / self.misc_every_s)
        if share < 1 or n == 0:
            return
        self._misc_last = now
        for _ in range(min(share, n)):
            self._misc_at = (self._misc_at + 1) % n
            try:
                self.clients[self._misc_at].loop_misc()
            except Exception:
                self.errors += 1
                log.exception("loop_misc failed")

    def close(self) -> None:
        self.ep.close()
