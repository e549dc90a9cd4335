"""Container health probe: exit 0 when the service answers 200 on /readyz, 1 otherwise.

Standard library only, so the slim images need no curl. The port comes from CLIPSERVE_PORT
(the same variable the service reads), defaulting to 8000.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("CLIPSERVE_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(
            url, timeout=float(os.environ.get("CLIPSERVE_HEALTH_TIMEOUT_S", "3"))
        ) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
