"""Whether the server could listen on an address, told before any long work (loading models).

The probe binds as the server does: with SO_REUSEADDR, which uvicorn (asyncio's create_server)
sets on every listening socket. Without it a port that was just released still has TIME-WAIT
connections for about a minute and a bare bind fails, although the server itself would bind fine.
"""

from __future__ import annotations

import errno
import socket


class PortUnavailable(Exception):
    """The address cannot be listened on; the message says what to do."""


def check_port(host: str, port: int, hint: str) -> None:
    """Raise PortUnavailable when `host:port` cannot be listened on. `hint` is how to pick another
    port, e.g. `CLIPSERVE_PORT={port} make serve` (`{port}` is filled with the next port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise PortUnavailable(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortUnavailable(
                    f"port {port} on {host} is already in use (is clipserve already running?). "
                    f"Stop what uses it, or pick another port: {hint.format(port=port + 1)}"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortUnavailable(
                    f"cannot listen on {host}:{port}: {host} is not an address of this machine"
                ) from None
            if exc.errno == errno.EACCES:
                raise PortUnavailable(
                    f"cannot listen on {host}:{port}: ports below 1024 need root; pick another: "
                    f"{hint.format(port=8000)}"
                ) from None
            raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
