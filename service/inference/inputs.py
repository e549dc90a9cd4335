"""API image strings to bytes: base64, `data:` URIs and (when enabled) http(s) URLs; uploaded files
are bytes already.

`ImageFetcher(settings).load(items)` returns one `bytes` per item, in order, or raises `InvalidImage`
naming the bad item's index. URL rules, all from settings: fetching is off unless
`url_fetch_enabled`; only hosts in `url_allowed_hosts` ('*' for any); every address the host
resolves to must be public unless `url_allow_private` (an IPv6 address that carries an IPv4 one,
NAT64, 6to4, Teredo or IPv4-mapped, is as public as that IPv4 address), and the connection goes to
the address that was checked; connect and read timeouts, and `url_fetch_timeout_s` for the whole
fetch, redirects included, so a server that drips its bytes cannot hold a request; a byte cap while
streaming; at most `url_max_redirects` redirects, each checked by the same rules. Each request
fetches through its own connection pool of `url_fetch_connections`, closed when its images are in:
slow URLs hold up the request that sent them, never the fetches of others. A URL that cannot be
parsed (a port out of range, a broken IPv6 literal) is the caller's mistake, a 400 like the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urljoin, urlsplit

import httpx

from clipserve.service.errors import InvalidImage
from clipserve.service.settings import Settings

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 prefixes whose last 32 bits are an IPv4 address that the packets reach: NAT64's well-known
# prefix (RFC 6052) and the deprecated IPv4-compatible form
_CARRIES_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
# local-use NAT64 (RFC 8215): a site's own translator, so any IPv4 address of that site behind it
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def is_public(address: IPAddress) -> bool:
    """Whether an address is globally reachable, and so is any IPv4 address it carries."""
    if not address.is_global:
        return False
    if address.version == 4:
        return True
    assert isinstance(address, ipaddress.IPv6Address)
    if address in _LOCAL_NAT64:
        return False
    carried: list[ipaddress.IPv4Address | None] = [address.ipv4_mapped, address.sixtofour]
    carried += list(address.teredo or ())
    if any(address in network for network in _CARRIES_IPV4):
        carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(inner.is_global for inner in carried if inner is not None)


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
        self._tls: ssl.SSLContext | None = None  # loading the CA bundle costs ms: once, shared

    async def aclose(self) -> None:
        """Nothing outlives a request: each one's connections are closed with it."""

    async def load(self, items: list[str | bytes]) -> list[bytes]:
        """The bytes of each image: API strings decoded or fetched, uploaded bytes as they are."""
        urls = [index for index, item in enumerate(items) if is_url(item)]
        if urls and not self.settings.url_fetch_enabled:
            raise _bad(
                f"image {urls[0]} is a URL, but fetching URLs is turned off on this server "
                "(send base64 or a data URI instead)",
                urls[0],
            )
        async with self._client(bool(urls)) as client:
            if client is None:
                return [await self._one(item, i, None) for i, item in enumerate(items)]
            loop = asyncio.get_running_loop()
            fetches = [loop.create_task(self._one(item, i, client)) for i, item in enumerate(items)]
            try:
                return list(await asyncio.gather(*fetches))
            finally:  # the first failure answers the request: the other fetches stop with it
                for fetch in fetches:
                    fetch.cancel()

    async def load_each(self, items: list[str | bytes]) -> list[bytes | InvalidImage]:
        """Like `load`, for bulk work: an item that cannot be had is its `InvalidImage`, in its place,
        and the others are still loaded."""
        fetching = self.settings.url_fetch_enabled and any(is_url(item) for item in items)
        async with self._client(fetching) as client:
            return list(
                await asyncio.gather(*(self._or_error(item, i, client) for i, item in enumerate(items)))
            )

    async def _or_error(
        self, item: str | bytes, index: int, client: httpx.AsyncClient | None
    ) -> bytes | InvalidImage:
        try:
            if is_url(item) and not self.settings.url_fetch_enabled:
                raise _bad(f"image {index} is a URL, but fetching URLs is turned off", index)
            return await self._one(item, index, client)
        except InvalidImage as exc:
            return exc

    @contextlib.asynccontextmanager
    async def _client(self, needed: bool) -> AsyncIterator[httpx.AsyncClient | None]:
        """This request's own connection pool (none when it has no URL), closed when it is done."""
        if not needed:
            yield None
            return
        s = self.settings
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(s.url_read_timeout_s, connect=s.url_connect_timeout_s),
            limits=httpx.Limits(max_connections=s.url_fetch_connections),
            follow_redirects=False,
            trust_env=False,
            verify=self._tls,
        ) as client:
            yield client

    async def _one(self, item: str | bytes, index: int, client: httpx.AsyncClient | None) -> bytes:
        if isinstance(item, bytes):
            if not item:
                raise _bad(f"image {index} is an empty file", index)
            return item
        text = item.strip()
        if is_url(text):
            assert client is not None
            deadline = self.settings.url_fetch_timeout_s
            try:
                async with asyncio.timeout(deadline):
                    return await self._fetch(client, text, index)
            except TimeoutError as exc:
                raise _bad(
                    f"image {index}: fetching the URL took longer than {deadline:g} s (url_fetch_timeout_s)",
                    index,
                ) from exc
        if text[:5].lower() == "data:":
            match = _DATA_URI.match(text)
            if match is None:
                raise _bad(f"image {index} is a data URI that is not base64-encoded", index)
            return decode_base64(match.group("data"), index)
        return decode_base64(text, index)

    async def _fetch(self, client: httpx.AsyncClient, url: str, index: int) -> bytes:
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
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
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
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:  # a port out of range or not a number, a broken IPv6 literal
            raise _bad(f"image {index}: the URL is malformed ({exc})", index) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad(f"image {index}: only http(s) URLs with a host are accepted", index)
        if "@" in parts.netloc:
            raise _bad(f"image {index}: URLs with credentials are not accepted", index)
        host = parts.hostname.lower()
        allowed = [h.lower() for h in self.settings.url_allowed_hosts]
        if "*" not in allowed and host not in allowed:
            raise _bad(f"image {index}: host {host!r} is not in this server's allowed hosts", index)
        addresses = await _resolve(host, port or (443 if parts.scheme == "https" else 80), index)
        if not self.settings.url_allow_private and not all(is_public(a) for a in addresses):
            raise _bad(f"image {index}: host {host!r} resolves to a private or loopback address", index)
        address = min(addresses, key=lambda a: a.version)  # IPv4 first: IPv6 routes are more often broken
        netloc = f"[{address}]" if address.version == 6 else str(address)
        if port:
            netloc += f":{port}"
        return parts._replace(netloc=netloc).geturl(), {"Host": parts.netloc}, host


async def _resolve(host: str, port: int, index: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a name that is no valid IDNA (a label too long)
        raise _bad(f"image {index}: cannot resolve host {host!r}", index) from exc
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
