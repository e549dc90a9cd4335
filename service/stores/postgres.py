"""A few reusable autocommit PostgreSQL connections for the stores (psycopg_pool is not a dependency).

Shared by the collections (`pgvector`) and the label sets (`labelset_store`), which both take their
transactions from `ConnectionPool.transaction()`: a connection that fails is closed with the idle
ones (after a server restart they are all dead), and one that cannot be opened raises the store's
own "unavailable" error, so an outage of PostgreSQL reads as 503 + Retry-After in the API.

What a caller is told of an outage is a few words (`outage_words`): PostgreSQL's own message names
the host, the port and the user, so it goes to the log only. A value PostgreSQL refuses
(`psycopg.DataError`) is the caller's mistake: `refused_value` turns it into a 4xx.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

from .collection_store import InvalidInputError

log = logging.getLogger("clipserve.postgres")
# Connection failures have no SQLSTATE in psycopg: libpq's message says what happened.
_OUTAGES = (
    (("password authentication failed", "no pg_hba.conf entry"), "it refused the credentials"),
    (("does not exist",), "the user or the database of the DSN does not exist"),
    (("timeout", "timed out"), "it did not answer in time"),
    (("refused",), "it refuses connections: not running, or another port"),
    (("translate host name", "name or service not known", "nodename"), "its host name does not resolve"),
    (("starting up", "shutting down", "terminating connection"), "it is starting, stopping or restarting"),
    (("too many", "remaining connection slots"), "it has no connection slot left"),
)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def outage_words(exc: BaseException) -> str:
    """What went wrong with PostgreSQL, in words that name no host, port or user."""
    text = str(exc).lower()
    for needles, words in _OUTAGES:
        if any(needle in text for needle in needles):
            return words
    return "the connection failed"


def refused_value(exc: psycopg.DataError) -> InvalidInputError:
    """A value PostgreSQL would not store (a NUL, an invalid escape, a number out of range) as
    the caller's mistake; the request's own checks name the field where they can."""
    return InvalidInputError(f"PostgreSQL refused a value of the request: {first_line(exc)}")


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
            log.warning("cannot connect to PostgreSQL: %s", first_line(exc))
            raise self._unavailable(f"cannot connect to PostgreSQL: {outage_words(exc)}") from exc
        except psycopg.ProgrammingError:  # its message may quote the DSN, password included
            raise self._unavailable(
                "the PostgreSQL DSN cannot be parsed (check CLIPSERVE_POSTGRES_DSN)"
            ) from None

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

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction, rolled back on any error: an outage raises the
        store's "unavailable" error, a value PostgreSQL refuses an InvalidInputError."""
        try:
            with self.connection() as conn, conn.transaction():
                yield conn
        except psycopg.OperationalError as exc:
            log.warning("PostgreSQL failed: %s", first_line(exc))
            raise self._unavailable(f"PostgreSQL failed: {outage_words(exc)}") from exc
        except psycopg.DataError as exc:
            raise refused_value(exc) from exc

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()
