"""Container health probe: exit 0 when the service answers 200 on /readyz, 1 otherwise.

It runs with the image's Python, beside the installed service, so the slim images need no curl. Its
options follow clip-serve's settings convention and prefix (clipserve/contract/cli_settings.py):
`--port` is CLIPSERVE_PORT, the variable the service listens by (the images set it), and
`--health-timeout-s` is CLIPSERVE_HEALTH_TIMEOUT_S; `--help` lists both.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from clipserve.contract.cli_settings import CliSettings, SettingsError, load_settings

PROG = "healthcheck.py"


class HealthcheckSettings(CliSettings):
    """Exit 0 when the service on this host answers 200 on /readyz, 1 otherwise."""

    model_config = SettingsConfigDict(env_prefix="CLIPSERVE_")

    port: int = Field(
        8000, ge=1, le=65535, description="the port the service listens on (clip-serve's --port)"
    )
    health_timeout_s: float = Field(3.0, gt=0, description="seconds to wait for /readyz's answer")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(HealthcheckSettings, argv, PROG, description=HealthcheckSettings.__doc__)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{settings.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=settings.health_timeout_s) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
