"""A few reusable autocommit PostgreSQL connections for the stores (psycopg_pool is not a dependency).

Shared by the collections (`pgvector`) and the label sets (`labelsets`): a connection that fails
is closed with the idle ones (after a server restart they are all dead), and one that cannot be
opened raises the store's own
"unavailable" error, so an outage of PostgreSQL reads as 503 + Retry-After in the API.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg


class ConnectionPool:
    def __init__(
        self,
        dsn: str,
        size: int,
        unavailable: Callable[[str], Exception],
        configure: Callable[[psycopg.Connection], None] | None = None,
        connect_timeout_s: int = 5,
    ):
        self._dsn = dsn
        self._unavailable = unavailable
        self._configure = configure
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    def open(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._connect_timeout_s)
        except psycopg.OperationalError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self._unavailable(f"cannot connect to PostgreSQL ({first_line})") from exc

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        self._slots.acquire()
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self.open()
                if self._configure is not None:
                    self._configure(conn)
            try:
                yield conn
            except psycopg.OperationalError:
                conn.close()
                self.close()  # the others are most likely dead too (a restart): reconnect them all
                raise
            with self._lock:
                self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()
