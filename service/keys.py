"""API keys and their scopes: which key may call which route, and the key file, re-read on change.

Scopes (docs/security.md):

- `read`: embed, classify, rank, OpenAI embeddings, collection searches, every GET of the API;
- `write`: collections and their items, label sets (every PUT, POST and DELETE under
  `/v1/collections` and `/v1/labelsets`, but searches), re-embedding;
- `admin`: `/v1/admin/*`;
- `metrics`: `/metrics` (or none, with `metrics_open`).

Keys come from `api_keys` (read and write), `admin_key` (admin only) and `api_keys_file`, whose
format is one key a line:

    # comment lines and blank lines are skipped
    <key> <scope>[,<scope>...]      [# a comment after the scopes]

A key in the file is at least 16 characters of printable ASCII, no spaces, not starting with `#`;
the same key listed twice is a mistake. A key given in several places has the union of its scopes.
The file is checked at most once a second (its size, mtime and inode); when they change it is read
again. A file that no longer reads or parses leaves the previous keys in force, and says why in the
log once.

Keys are held as their SHA-256, so a look-up is one dict access: no timing of a string comparison
tells how much of a key was right, and the process keeps no key in clear after loading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Scope = Literal["read", "write", "admin", "metrics"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
DATA_SCOPES: frozenset[Scope] = frozenset({"read", "write"})
MIN_FILE_KEY_CHARS = 16
MAX_KEY_FILE_BYTES = 1 << 20
WRITE_PREFIXES = ("/v1/collections", "/v1/labelsets", "/v1/jobs")
ADMIN_PREFIX = "/v1/admin/"
CHECK_EVERY_S = 1.0

log = logging.getLogger("clipserve.keys")


class KeyFileError(Exception):
    """The key file cannot be used; the message is one line saying where and why."""


def route_scope(method: str, path: str) -> Scope:
    """The scope a request needs, from its method and path (a route's template gives the same)."""
    if path.startswith(ADMIN_PREFIX):
        return "admin"
    if path == "/metrics":
        return "metrics"
    if method in ("GET", "HEAD"):
        return "read"
    searching = method == "POST" and path.endswith("/search")
    if path.startswith(WRITE_PREFIXES) and not searching:
        return "write"
    return "read"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def _file_key_problem(key: str) -> str | None:
    if len(key) < MIN_FILE_KEY_CHARS:
        return (
            f"the key has {len(key)} characters, at least {MIN_FILE_KEY_CHARS} are needed "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not key.isascii() or not key.isprintable():
        return "the key must be printable ASCII"
    return None


def parse_key_file(text: str, source: str) -> dict[bytes, frozenset[Scope]]:
    """The keys of a key file (as their digests) with their scopes; KeyFileError names the line."""
    keys: dict[bytes, frozenset[Scope]] = {}
    first_line: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise KeyFileError(
                f"{where}: expected '<key> <scope>[,<scope>...]', got {len(fields)} fields "
                "(scopes are separated by commas, without spaces)"
            )
        key, scope_list = fields
        problem = _file_key_problem(key)
        if problem is not None:
            raise KeyFileError(f"{where}: {problem}")
        scopes = [scope.strip() for scope in scope_list.split(",") if scope.strip()]
        unknown = [scope for scope in scopes if scope not in SCOPES]
        if unknown or not scopes:
            raise KeyFileError(
                f"{where}: unknown scope {', '.join(map(repr, unknown)) or 'list'}; "
                f"use {', '.join(SCOPES)}, comma-separated"
            )
        digest = _digest(key)
        if digest in keys:
            raise KeyFileError(f"{where}: the same key as line {first_line[digest]}; list each key once")
        keys[digest] = frozenset(scopes)  # type: ignore[arg-type]
        first_line[digest] = number
    return keys


def read_key_file(path: Path) -> dict[bytes, frozenset[Scope]]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"the API keys file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"the API keys file {path} is not UTF-8 text") from None
    return parse_key_file(text, str(path))


def _merged(*sources: Iterable[tuple[bytes, frozenset[Scope]]]) -> dict[bytes, frozenset[Scope]]:
    merged: dict[bytes, frozenset[Scope]] = {}
    for source in sources:
        for digest, scopes in source:
            merged[digest] = merged.get(digest, frozenset()) | scopes
    return merged


@dataclass(frozen=True)
class _FileState:
    """What identifies one version of the key file: a change to any of these reads it again."""

    size: int
    mtime_ns: int
    inode: int


class KeyRing:
    """The keys in force and their scopes; `refresh()` (cheap, called per request) picks up a
    changed key file at most once per `check_every_s`."""

    def __init__(
        self,
        api_keys: Iterable[str] = (),
        admin_key: str | None = None,
        keys_file: Path | None = None,
        *,
        check_every_s: float = CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fixed = _merged(
            ((_digest(key), DATA_SCOPES) for key in api_keys),
            [(_digest(admin_key), frozenset({"admin"}))] if admin_key else [],
        )
        self.keys_file = keys_file
        self._check_every_s, self._clock = check_every_s, clock
        self._next_check = 0.0
        self._file_state: _FileState | None = None
        self._failing: str | None = None
        self._use(dict(self._fixed))
        if keys_file is not None:
            self._load(self._stat_or_raise(), raise_errors=True)
            self._next_check = clock() + check_every_s

    # In force ---------------------------------------------------------------------------------------

    def scopes_of(self, token: str | bytes | None) -> frozenset[Scope] | None:
        """The scopes of a Bearer token, or None when it is no key of ours."""
        return None if not token else self._keys.get(_digest(token))

    def _use(self, keys: dict[bytes, frozenset[Scope]]) -> None:
        """Put `keys` in force; what every request asks of them is worked out here, once."""
        self._keys = keys
        # the data routes need a key as soon as one key has read or write
        self.auth_on = any(scopes & DATA_SCOPES for scopes in keys.values())
        self.admin_on = any("admin" in scopes for scopes in keys.values())

    def counts(self) -> dict[Scope, int]:
        """Keys per scope, for the start-up summary and the log."""
        return {scope: sum(scope in s for s in self._keys.values()) for scope in SCOPES}

    # The file -----------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the key file again when it changed; checked at most once per `check_every_s`."""
        if self.keys_file is None:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._check_every_s
        try:
            state = self._stat_or_raise()
        except KeyFileError as exc:
            self._report(str(exc))
            return
        if state != self._file_state:
            self._load(state, raise_errors=False)

    def _stat_or_raise(self) -> _FileState:
        assert self.keys_file is not None
        try:
            found = os.stat(self.keys_file)
        except OSError as exc:
            raise KeyFileError(f"cannot read the API keys file {self.keys_file}: {exc.strerror}") from None
        return _FileState(found.st_size, found.st_mtime_ns, found.st_ino)

    def _load(self, state: _FileState, raise_errors: bool) -> None:
        assert self.keys_file is not None
        try:
            from_file = read_key_file(self.keys_file)
        except KeyFileError as exc:
            if raise_errors:
                raise
            self._report(str(exc))
            return
        first = self._file_state is None
        self._use(_merged(self._fixed.items(), from_file.items()))
        self._file_state, self._failing = state, None
        counts = ", ".join(f"{scope} {count}" for scope, count in self.counts().items())
        log.info(
            "API keys %s %s: %d keys (%s)",
            "read from" if first else "re-read from",
            self.keys_file,
            len(from_file),
            counts,
        )

    def _report(self, problem: str) -> None:
        if problem != self._failing:
            log.error("%s; the keys read before stay in force", problem)
            self._failing = problem
