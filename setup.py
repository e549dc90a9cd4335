"""The package map: the repository keeps its rooms at the top level (service/, export/, training/)
beside the contract (clipserve/contract/), and the wheel installs them all as one import package,
`clipserve`: `clipserve.service`, `clipserve.export`, `clipserve.training`, `clipserve.index`,
`clipserve.contract`.

A room absent from a build context (the serving image copies no training/) is left out, so one
pyproject.toml builds every image. Everything else about the distribution is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup

ROOMS = {
    "clipserve": "clipserve",
    "clipserve.service": "service",
    "clipserve.export": "export",
    "clipserve.training": "training",
    "clipserve.index": "index",
}


def packages(rooms: dict[str, str]) -> list[str]:
    """Every folder with an __init__.py under each room, as a dotted name under its package."""
    return [
        ".".join([package, *init.parent.relative_to(folder).parts])
        for package, folder in rooms.items()
        for init in sorted(Path(folder).rglob("__init__.py"))
    ]


present = {package: folder for package, folder in ROOMS.items() if Path(folder, "__init__.py").is_file()}
setup(packages=packages(present), package_dir=present)
