"""The written documentation: README.md stays a short door, and the pages under docs/ (with
training/README.md) hold together: every relative link and `#anchor` resolves, every page is in
the index and linked from the README, every repository path, `clipserve.*` module and `make`
target they name exists, and "what CI proves" is told on one page.

Other tests run what the pages say: the README's tour (tests/deploy/test_first_run.py), the install,
start and image commands (tests/deploy/test_docker.py), the compose commands (tests/deploy/test_container_smoke.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README_MAX_LINES = 200
# Where the repository's own paths start, and the folder of each `clipserve.<room>` package.
TOP_FOLDERS = ("clipserve/", "service/", "export/", "training/", "tests/", "bench/", "scripts/")
TOP_FOLDERS += ("docker/", "deploy/", "docs/", ".ci/")
ROOMS = {"service": "service", "export": "export", "training": "training", "contract": "clipserve/contract"}

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)
MODULE = re.compile(r"clipserve\.(service|export|training|contract)(\.\w+)*")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "training" / "README.md"]


def name(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text a reader sees as text: fenced blocks left out (their `#` lines are shell comments)."""
    return FENCE.sub("", text)


def code(text: str) -> list[str]:
    """What a reader may copy: fenced blocks and inline code spans."""
    return [block.group(0) for block in FENCE.finditer(text)] + INLINE_CODE.findall(prose(text))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and GitLab make it: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def relative_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(page.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def linked_pages(page: Path) -> set[str]:
    return {name(page.parent / target.partition("#")[0]) for target in relative_links(page)}


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))


def is_module(dotted: str) -> bool:
    """`clipserve.<room>.<module>[.<attribute>]`: the room's folder holds that module or package."""
    room, *parts = dotted.split(".")[1:]
    folder = ROOT / ROOMS[room]
    if not parts:
        return True
    prefixes = [folder.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]
    return any(
        prefix.with_suffix(".py").is_file() or (prefix / "__init__.py").is_file() for prefix in prefixes
    )


def test_the_readme_is_a_door_of_at_most_200_lines() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into a page under docs/ and link to it"
    )


def test_the_readme_opens_with_the_two_commands_and_they_are_make_targets() -> None:
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert first_block is not None
    commands = [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make serve", "make test"]
    assert {"serve", "test"} <= make_targets()


@pytest.mark.parametrize("page", pages(), ids=name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not destination.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not destination.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target} (no heading #{fragment} in {name(destination)})")
    assert broken == [], f"{name(page)} links to what is not there: {broken}"


def test_the_index_lists_every_page_and_the_readme_links_them() -> None:
    on_disk = {name(path) for path in DOCS.glob("*.md")}
    index = DOCS / "README.md"
    assert on_disk - {name(index)} - linked_pages(index) == set(), "docs/README.md does not list these"
    assert "training/README.md" in linked_pages(index)
    assert on_disk - linked_pages(ROOT / "README.md") == set(), "README.md does not link these"


@pytest.mark.parametrize("page", pages(), ids=name)
def test_every_repository_path_and_module_named_exists(page: Path) -> None:
    words = {
        word.rstrip(".,:;")
        for snippet in code(page.read_text())
        for word in re.findall(r"[\w./*-]+", snippet)
    }
    missing = []
    for word in sorted(words):
        if word.startswith(TOP_FOLDERS):
            exists = any(ROOT.glob(word)) if "*" in word else (ROOT / word).exists()
            if not exists:
                missing.append(word)
        elif MODULE.fullmatch(word) and not is_module(word):
            missing.append(word)
    assert missing == [], f"{name(page)} names paths or modules that are not in the repository: {missing}"


@pytest.mark.parametrize("page", pages(), ids=name)
def test_every_make_target_named_exists(page: Path) -> None:
    named = {
        target
        for snippet in code(page.read_text())
        for target in re.findall(r"(?:^|[\s`;&|])make\s+([a-z][\w-]*)", snippet, flags=re.M)
    }
    assert named - make_targets() == set(), f"{name(page)} names make targets the Makefile lacks"


def test_what_ci_proves_is_told_on_one_page() -> None:
    telling = {
        name(page)
        for page in pages()
        for heading in HEADING.findall(prose(page.read_text()))
        if re.search(r"what ci (proves|cannot|does not)", heading, flags=re.I)
    }
    assert telling == {"docs/ci.md"}, "what CI proves belongs in docs/ci.md alone; link to it"


def test_slugs_follow_the_forges_rules() -> None:
    assert slug("First run: `make serve`") == "first-run-make-serve"
    assert slug("A 5-minute tour") == "a-5-minute-tour"
    assert slug("The GPU image, without a GPU") == "the-gpu-image-without-a-gpu"
    assert slug("Collections: retrieval, and how it scales") == "collections-retrieval-and-how-it-scales"


def test_every_setting_of_clip_serve_is_in_the_configuration_page() -> None:
    from clipserve.service.settings import Settings

    text = (DOCS / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if Settings.flag(name) not in text]
    assert missing == [], f"docs/configuration.md does not name {missing}"
