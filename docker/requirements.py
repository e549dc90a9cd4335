"""Print the requirements of the project's extras, one a line, read from pyproject.toml alone.

The images install these before they copy the code, so the layer with the libraries (several GB in
the GPU image) is built again only when the pins change, not at every change to the code:

    python docker/requirements.py serve-gpu-cuda > requirements.txt && pip install -r requirements.txt

Self-references (`clipserve[serve-core]`) are expanded; the project's own dependencies come first.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF_REFERENCE = re.compile(r"clipserve\[([a-z0-9,-]+)\]")


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project["optional-dependencies"]
    found: list[str] = list(project["dependencies"])

    def expand(extra: str, seen: tuple[str, ...]) -> None:
        if extra not in optional:
            raise SystemExit(
                f"requirements.py: no extra {extra!r} in pyproject.toml (there are {', '.join(optional)})"
            )
        for requirement in optional[extra]:
            nested = SELF_REFERENCE.fullmatch(requirement)
            if nested is None:
                found.append(requirement)
                continue
            for inner in nested.group(1).split(","):
                if inner not in seen:
                    expand(inner, (*seen, inner))

    for extra in extras:
        expand(extra, (extra,))
    return list(dict.fromkeys(found))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python docker/requirements.py EXTRA[,EXTRA...] [PYPROJECT]", file=sys.stderr)
        return 2
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml"
    for line in requirements(tomllib.loads(path.read_text()), argv[0].split(",")):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
