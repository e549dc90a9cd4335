"""API image strings to bytes: base64, `data:` URIs and (when enabled) http(s) URLs; uploaded files
are bytes already.

`ImageFetcher(settings).load(items)` returns one `bytes` per item, in order, or raises `InvalidImage`
naming the bad item's index. URL rules, all from settings: fetching is off unless
`url_fetch_enabled`; only hosts in `url_allowed_hosts` ('*' for any); every address the host
resolves to must be public unless `url_allow_private`, and the connection goes to the address
that was checked; connect and read timeouts; a byte cap while streaming; at most
`url_max_redirects` redirects, each checked by the same rules.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from clipserve.service.errors import InvalidImage
from clipserve.service.settings import Settings

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def _bad(message: str, index: int) -> InvalidImage:
    return InvalidImage(message, index=index)


def decode_base64(text: str, index: int) -> bytes:
    """Standard or URL-safe base64, whitespace allowed, padding optional."""
    if text:  # the common case, checked and decoded in one pass in C: standard alphabet, padded, no spaces
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            pass
    compact = "".join(text.split())
    if not compact:
        raise _bad(f"image {index} is an empty string", index)
    if not _B64_CHARS.match(compact):
        raise _bad(f"image {index} is not valid base64 (nor a data URI or URL)", index)
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"image {index} is not valid base64: {exc}", index) from exc


def is_url(text: str | bytes) -> bool:
    """An http(s) URL (leading whitespace ignored), as opposed to base64, a data URI or bytes."""
    return isinstance(text, str) and text.lstrip()[:8].lower().startswith(("http://", "https://"))


class ImageFetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def load(self, items: list[str | bytes]) -> list[bytes]:
        """The bytes of each image: API strings decoded or fetched, uploaded bytes as they are."""
        for index, item in enumerate(items):
            if is_url(item) and not self.settings.url_fetch_enabled:
                raise _bad(
                    f"image {index} is a URL, but fetching URLs is turned off on this server "
                    "(send base64 or a data URI instead)",
                    index,
                )
        return list(await asyncio.gather(*(self._one(item, i) for i, item in enumerate(items))))

    async def load_each(self, items: list[str | bytes]) -> list[bytes | InvalidImage]:
        """Like `load`, for bulk work: an item that cannot be had is its `InvalidImage`, in its place,
        and the others are still loaded."""
        return list(await asyncio.gather(*(self._or_error(item, i) for i, item in enumerate(items))))

    async def _or_error(self, item: str | bytes, index: int) -> bytes | InvalidImage:
        try:
            if is_url(item) and not self.settings.url_fetch_enabled:
                raise _bad(f"image {index} is a URL, but fetching URLs is turned off", index)
            return await self._one(item, index)
        except InvalidImage as exc:
            return exc

    async def _one(self, item: str | bytes, index: int) -> bytes:
        if isinstance(item, bytes):
            if not item:
                raise _bad(f"image {index} is an empty file", index)
            return item
        text = item.strip()
        if is_url(text):
            return await self._fetch(text, index)
        if text[:5].lower() == "data:":
            match = _DATA_URI.match(text)
            if match is None:
                raise _bad(f"image {index} is a data URI that is not base64-encoded", index)
            return decode_base64(match.group("data"), index)
        return decode_base64(text, index)

    def _client_for_fetch(self) -> httpx.AsyncClient:
        if self._client is None:
            s = self.settings
            timeout = httpx.Timeout(s.url_read_timeout_s, connect=s.url_connect_timeout_s)
            self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        return self._client

    async def _fetch(self, url: str, index: int) -> bytes:
        client = self._client_for_fetch()
        for _hop in range(self.settings.url_max_redirects + 1):
            pinned, headers, sni = await self._pin(url, index)
            try:
                async with client.stream(
                    "GET", pinned, headers=headers, extensions={"sni_hostname": sni}
                ) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise _bad(f"image {index}: redirect without a Location header", index)
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise _bad(f"image {index}: fetching the URL gave HTTP {response.status_code}", index)
                    return await self._read_capped(response, index)
            except httpx.TimeoutException as exc:
                raise _bad(f"image {index}: fetching the URL timed out", index) from exc
            except httpx.HTTPError as exc:
                raise _bad(f"image {index}: fetching the URL failed ({type(exc).__name__})", index) from exc
        raise _bad(f"image {index}: more than {self.settings.url_max_redirects} redirects", index)

    async def _read_capped(self, response: httpx.Response, index: int) -> bytes:
        cap = self.settings.url_max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise _bad(f"image {index}: the URL's content is larger than the {cap}-byte limit", index)
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > cap:
                raise _bad(f"image {index}: the URL's content is larger than the {cap}-byte limit", index)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _pin(self, url: str, index: int) -> tuple[str, dict[str, str], str]:
        """Check the URL against the rules and return it aimed at the address that was checked.

        Connecting to the checked address (with the original Host header and TLS server name)
        leaves no window for DNS to answer differently between the check and the connection.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad(f"image {index}: only http(s) URLs with a host are accepted", index)
        if "@" in parts.netloc:
            raise _bad(f"image {index}: URLs with credentials are not accepted", index)
        host = parts.hostname.lower()
        allowed = [h.lower() for h in self.settings.url_allowed_hosts]
        if "*" not in allowed and host not in allowed:
            raise _bad(f"image {index}: host {host!r} is not in this server's allowed hosts", index)
        addresses = await _resolve(host, parts.port or (443 if parts.scheme == "https" else 80), index)
        if not self.settings.url_allow_private and not all(a.is_global for a in addresses):
            raise _bad(f"image {index}: host {host!r} resolves to a private or loopback address", index)
        address = min(addresses, key=lambda a: a.version)  # IPv4 first: IPv6 routes are more often broken
        netloc = f"[{address}]" if address.version == 6 else str(address)
        if parts.port:
            netloc += f":{parts.port}"
        return parts._replace(netloc=netloc).geturl(), {"Host": parts.netloc}, host


async def _resolve(host: str, port: int, index: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _bad(f"image {index}: cannot resolve host {host!r}", index) from exc
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
