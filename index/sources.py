"""What a corpus is made of: the items of a source, listed in a stable order, and their bytes.

Sources (`list_source(path)` tells them apart, or `kind` says which):
- a folder, read recursively: every image file (by extension) is an item, and `NAME.txt` beside
  `NAME.jpg` is its caption; other files are left alone;
- a file list (`.txt`, `.lst`): one path or http(s) URL a line;
- a table, CSV or parquet: columns `path` or `url` (an image), `text` (a caption, or the item itself
  when there is no image), `id`, and any others as metadata;
- webdataset shards: one `.tar`, or a folder of them; members sharing a key (`000123.jpg`,
  `000123.txt`, `000123.json`) are one item.

Each item has an id that stays the same from run to run: the `id` column, else the path relative to
the folder (or as the table gives it), the URL, or `<tar name>/<key>`; an id longer than the stores
accept is replaced by `sha256:<hex of it>`. The listing order is stable (sorted paths, table rows in
order, tars sorted and their members in order), so the same source always cuts into the same shards.

`read_images(items, fetcher, max_file_bytes)` gives each item's image bytes or the reason it has none;
URLs go through the service's `ImageFetcher` (its SSRF rules: allowed hosts, no private addresses
unless allowed, timeouts, byte cap, redirects checked).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clipserve.service.errors import InvalidImage
from clipserve.service.inference.inputs import ImageFetcher, is_url

SourceKind = Literal["auto", "folder", "list", "csv", "parquet", "webdataset"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_IMAGE_COLUMNS = ("path", "url")
MAX_ID_CHARS = 256


class SourceError(ValueError):
    """The source cannot be listed at all (missing, unreadable, a table without the columns it needs);
    the message is one line that says what to do."""


@dataclass(frozen=True)
class Item:
    """One item of a corpus. `image` is a local path, an http(s) URL, or a member of a webdataset tar
    (`tar_path` with `tar_offset`/`tar_size`); `text` is its caption, or the item itself without an image."""

    id: str
    image: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tar_offset: int | None = None
    tar_size: int | None = None
    text_error: str | None = None

    @property
    def where(self) -> str:
        """Where the item came from, for the errors file."""
        if self.tar_offset is not None:
            return f"{self.image} @ {self.tar_offset}"
        return self.image or f"text {self.id}"

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in (None, {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Item:
        return cls(**data)


@dataclass(frozen=True)
class Listing:
    """Every item of a source, in its stable order, and what kind of corpus it is."""

    kind: str
    items: list[Item]

    @property
    def has_images(self) -> bool:
        return any(item.image is not None for item in self.items)

    @property
    def has_captions(self) -> bool:
        return self.has_images and any(item.text is not None for item in self.items)

    def fingerprint(self) -> str:
        """Identity of the listing: its kind and its ids, in order."""
        digest = hashlib.sha256(self.kind.encode())
        for item in self.items:
            digest.update(b"\0" + item.id.encode())
        return digest.hexdigest()


def stable_id(value: str) -> str:
    return value if len(value) <= MAX_ID_CHARS else "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def list_source(source: str, kind: SourceKind = "auto") -> Listing:
    """The items of `source` (a path, see the module docstring), in their stable order."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"source {source} does not exist: give a folder, a file list, a CSV or parquet file, or .tar shards"
        )
    kind = _kind_of(path) if kind == "auto" else kind
    listers = {
        "folder": _list_folder,
        "list": _list_file_list,
        "csv": _list_table,
        "parquet": _list_table,
        "webdataset": _list_webdataset,
    }
    try:
        items = listers[kind](path)
    except OSError as exc:
        raise SourceError(f"cannot read source {source}: {exc.strerror or exc}") from None
    if not items:
        raise SourceError(f"source {source} holds no items ({kind}): nothing to index")
    return Listing(kind, items)


def _kind_of(path: Path) -> str:
    if path.is_dir():
        has_tars = any(path.glob("*.tar"))
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())
        return "webdataset" if has_tars and not has_images else "folder"
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".txt", ".lst"):
        return "list"
    raise SourceError(
        f"source {path}: cannot tell its kind from the name; use --source-kind folder|list|csv|parquet|webdataset"
    )


def _list_folder(root: Path) -> list[Item]:
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(root).as_posix()
        caption_path = path.with_suffix(".txt")
        text = None
        text_error = None
        if caption_path.is_file():
            try:
                text = caption_path.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as exc:
                text_error = f"caption {caption_path.name} cannot be read: {exc}"
        metadata: dict[str, Any] = {"path": relative}
        if text is not None:
            metadata["caption"] = text
        items.append(Item(stable_id(relative), str(path), text, metadata, text_error=text_error))
    return items


def _list_file_list(path: Path) -> list[Item]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        image = entry if is_url(entry) else str((path.parent / entry).resolve())
        items.append(Item(stable_id(entry), image, None, {"url" if is_url(entry) else "path": entry}))
    return items


def _list_table(path: Path) -> list[Item]:
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            parse = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            table = pacsv.read_csv(path, parse_options=parse)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"cannot read table {path}: {' '.join(str(exc).split())}") from None
    columns = table.column_names
    image_column = next((c for c in TABLE_IMAGE_COLUMNS if c in columns), None)
    if image_column is None and "text" not in columns:
        raise SourceError(f"table {path} needs a column path or url (images) or text; it has {columns}")
    rows = table.to_pylist()
    items = []
    for row in rows:
        image = row.get(image_column) if image_column else None
        image = str(image).strip() if image not in (None, "") else None
        text = row.get("text")
        text = str(text) if text not in (None, "") else None
        if image is not None and not is_url(image):
            image = str((path.parent / image).resolve()) if not Path(image).is_absolute() else image
        given_id = row.get("id")
        shown = row.get(image_column) if image_column else None
        key = str(given_id) if given_id not in (None, "") else str(shown or text or "")
        metadata = {k: _plain(v) for k, v in row.items() if k not in ("id", "text")}
        if text is not None and image is not None:
            metadata["caption"] = text
        items.append(Item(stable_id(key), image, text, metadata))
    return items


def _plain(value: Any) -> Any:
    """A table cell as plain JSON (the stores keep metadata as JSON): dates and decimals as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _tar_paths(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.tar"))


def _list_webdataset(path: Path) -> list[Item]:
    root = path.parent if path.is_file() else path
    items = []
    for tar_path in _tar_paths(path):
        items += _list_tar(tar_path, tar_path.relative_to(root).as_posix())
    return items


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the member name up to the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + extension).lower()


def _list_tar(tar_path: Path, shown: str) -> list[Item]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile():
                    key, extension = _split_key(member.name)
                    groups.setdefault(key, {})[extension] = member
    except tarfile.TarError as exc:
        raise SourceError(f"webdataset shard {tar_path} is not a readable tar: {exc}") from None
    items = []
    with open(tar_path, "rb") as handle:
        for key, members in groups.items():
            image_member = next((m for ext, m in members.items() if ext in IMAGE_SUFFIXES), None)
            text, text_error, metadata = None, None, {"tar": shown, "key": key}
            if ".txt" in members:
                try:
                    text = _member_bytes(handle, members[".txt"]).decode("utf-8").strip() or None
                except UnicodeDecodeError as exc:
                    text_error = f"caption {key}.txt is not UTF-8: {exc}"
            if ".json" in members:
                try:
                    extra = json.loads(_member_bytes(handle, members[".json"]))
                    if isinstance(extra, dict):
                        metadata.update({str(k): _plain(v) for k, v in extra.items()})
                except ValueError as exc:
                    text_error = f"metadata {key}.json is not JSON: {exc}"
            if image_member is None and text is None:
                continue
            if text is not None and image_member is not None:
                metadata["caption"] = text
            items.append(
                Item(
                    stable_id(f"{shown}/{key}"),
                    str(tar_path) if image_member is not None else None,
                    text,
                    metadata,
                    tar_offset=image_member.offset_data if image_member is not None else None,
                    tar_size=image_member.size if image_member is not None else None,
                    text_error=text_error,
                )
            )
    return items


def _member_bytes(handle: Any, member: tarfile.TarInfo) -> bytes:
    handle.seek(member.offset_data)
    return handle.read(member.size)


def read_images(
    items: Sequence[Item], fetcher: ImageFetcher, max_file_bytes: int
) -> list[bytes | InvalidImage | None]:
    """The image bytes of each item (None for a text item), or why they cannot be had."""
    out: list[bytes | InvalidImage | None] = [None] * len(items)
    urls: dict[int, str] = {}
    for index, item in enumerate(items):
        if item.image is None:
            continue
        if is_url(item.image):
            urls[index] = item.image
        else:
            out[index] = _read_file(item, index, max_file_bytes)
    if urls:
        fetched = asyncio.run(_fetch(fetcher, list(urls.values())))
        for index, result in zip(urls, fetched, strict=True):
            out[index] = _renamed(result, index) if isinstance(result, InvalidImage) else result
    return out


async def _fetch(fetcher: ImageFetcher, urls: list[str]) -> list[bytes | InvalidImage]:
    try:
        return await fetcher.load_each(list(urls))
    finally:
        await fetcher.aclose()


def _renamed(error: InvalidImage, index: int) -> InvalidImage:
    """A fetch error names the image by its place among the URLs; here it is the item's place."""
    message = error.message.split(": ", 1)[-1] if error.message.startswith("image ") else error.message
    return InvalidImage(f"image {index}: {message}", index=index)


def _read_file(item: Item, index: int, max_file_bytes: int) -> bytes | InvalidImage:
    size = item.tar_size
    try:
        if size is None:
            size = Path(item.image or "").stat().st_size
        if size > max_file_bytes:
            return InvalidImage(
                f"image {index} is a {size}-byte file, more than the {max_file_bytes}-byte limit", index=index
            )
        with open(item.image or "", "rb") as handle:
            if item.tar_offset is not None:
                handle.seek(item.tar_offset)
            return handle.read(size)
    except OSError as exc:
        return InvalidImage(f"image {index} cannot be read: {exc.strerror or exc}", index=index)


def shards_of(items: Sequence[Item], size: int) -> Iterable[tuple[int, Sequence[Item]]]:
    """Consecutive runs of `size` items, numbered from 0: the same source always cuts the same way."""
    for number, start in enumerate(range(0, len(items), size)):
        yield number, items[start : start + size]
