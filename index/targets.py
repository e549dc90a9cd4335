"""Where encoded shards go, and where the job remembers which shards are done.

Every target writes a shard's items, then records the shard (with its item errors) as finished, so a
run after a crash skips exactly the recorded shards. Writing a shard twice changes nothing: the
collections upsert by id, and the files of shard N are replaced whole. Each target:

- `PgVectorTarget`: the collection in PostgreSQL through the service's own `PgVectorStore` (schema,
  binding, metadata and sources exactly as the service writes them; created when missing, bound to
  the bundle). Finished shards: table `clipserve_index_shards`, beside the collections (dropped with
  its collection).
- `ServerTarget`: a running clip-serve, through its HTTP API: the collection is created when missing,
  then items are upserted with the vectors computed here together with their sources (text, image
  bytes or URL), ids and metadata, and the bundle's `content_hash`, so the service keeps them
  re-embeddable. Finished shards: a JSON-lines file per job under `--state-dir`.
- `FilesTarget`: clip-retrieval's layout, `img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy` and
  `metadata/metadata_N.parquet` for shard N, each written to a temporary name and renamed. Finished
  shards: `index_state.jsonl` beside them.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from clipserve.index.pipeline import EncodedShard
from clipserve.service.stores import (
    CollectionExistsError,
    CollectionNotFoundError,
    IndexParams,
    ModelBinding,
    Source,
)


class TargetError(RuntimeError):
    """A target that cannot take the job's vectors (another model's collection, a refused write...);
    the message is one line that says what to do."""


@dataclass(frozen=True)
class JobIdentity:
    """What makes two runs the same job: the listing, the shard size and the bundle."""

    key: str
    binding: ModelBinding
    model_ref: str


def error_records(shard: EncodedShard) -> list[dict[str, Any]]:
    """The errors file's lines of one shard."""
    return [
        {
            "id": shard.items[position].id,
            "source": shard.items[position].where,
            "shard": shard.number,
            "code": error.code,
            "reason": error.message,
        }
        for position, error in sorted(shard.errors.items())
    ]


def item_sources(shard: EncodedShard, positions: list[int]) -> list[Source | None]:
    """What each written item keeps as its source: its image's bytes or URL, else its text."""
    sources: list[Source | None] = []
    for position in positions:
        item, data = shard.items[position], shard.image_bytes[position]
        if item.image is not None and item.image.lower().startswith(("http://", "https://")):
            sources.append(Source("image", item.image))
        elif item.image is not None:
            sources.append(Source.inline_image(data) if data is not None else None)
        else:
            sources.append(Source("text", item.text or ""))
    return sources


class Target(Protocol):
    where: str

    def open(self, job: JobIdentity) -> set[int]:
        """Make ready (create the collection when missing, check its binding); the finished shards."""
        ...

    def write(self, shard: EncodedShard) -> None:
        """Write the shard's items, then record it as finished with its errors."""
        ...

    def errors(self) -> Iterator[dict[str, Any]]:
        """The item errors of every finished shard of the job."""
        ...

    def close(self) -> None: ...


def _check_binding(collection: str, bound: ModelBinding, job: JobIdentity) -> None:
    if bound.content_hash != job.binding.content_hash:
        raise TargetError(
            f"collection {collection!r} holds vectors of {bound.model}@{bound.version} (bundle "
            f"{bound.content_hash[:12]}), not of {job.model_ref} (bundle {job.binding.content_hash[:12]}); "
            "index with that model, or into another collection"
        )


class PgVectorTarget:
    """A collection in PostgreSQL, written through the service's `PgVectorStore`."""

    _STATE = """
    CREATE TABLE IF NOT EXISTS clipserve_index_shards (
        collection_id BIGINT NOT NULL REFERENCES clipserve_collections(id) ON DELETE CASCADE,
        job TEXT NOT NULL,
        shard INTEGER NOT NULL,
        items INTEGER NOT NULL,
        errors JSONB NOT NULL,
        finished_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (collection_id, job, shard)
    )
    """

    def __init__(self, dsn: str, collection: str, index_kind: str, max_image_bytes: int):
        from clipserve.service.stores.pgvector import PgVectorStore

        self.dsn, self.collection, self.index_kind = dsn, collection, index_kind
        self.store = PgVectorStore(dsn, max_image_bytes=max_image_bytes)
        self.where = f"collection {collection!r} in PostgreSQL"
        self.job: JobIdentity | None = None
        self._collection_id: int | None = None

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def open(self, job: JobIdentity) -> set[int]:
        self.job = job
        try:
            _check_binding(self.collection, self.store.binding(self.collection), job)
        except CollectionNotFoundError:
            try:
                self.store.create_collection(self.collection, job.binding, IndexParams(kind=self.index_kind))
            except CollectionExistsError:  # created meanwhile by another run
                _check_binding(self.collection, self.store.binding(self.collection), job)
        with self._connect() as conn:
            conn.execute(self._STATE)
            self._collection_id = conn.execute(
                "SELECT id FROM clipserve_collections WHERE name = %s", (self.collection,)
            ).fetchone()[0]
            rows = conn.execute(
                "SELECT shard FROM clipserve_index_shards WHERE collection_id = %s AND job = %s",
                (self._collection_id, job.key),
            ).fetchall()
        return {row[0] for row in rows}

    def write(self, shard: EncodedShard) -> None:
        assert self.job is not None
        positions = shard.ok
        if positions:
            self.store.upsert(
                self.collection,
                [shard.items[p].id for p in positions],
                shard.vectors[positions],
                content_hash=self.job.binding.content_hash,
                metadata=[shard.items[p].metadata for p in positions],
                sources=item_sources(shard, positions),
            )
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO clipserve_index_shards (collection_id, job, shard, items, errors) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (
                    self._collection_id,
                    self.job.key,
                    shard.number,
                    len(shard.items),
                    json.dumps(error_records(shard)),
                ),
            )

    def errors(self) -> Iterator[dict[str, Any]]:
        assert self.job is not None
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT errors FROM clipserve_index_shards WHERE collection_id = %s AND job = %s ORDER BY shard",
                (self._collection_id, self.job.key),
            ).fetchall()
        for (records,) in rows:
            yield from records

    def close(self) -> None:
        self.store.close()


class StateFile:
    """Finished shards of one job as JSON lines: a header naming the job, then one line per shard
    (`{"shard": N, "items": n, "errors": [...]}`), each appended and fsynced. A line cut short by a
    crash is ignored (its shard is simply done again)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.done: dict[int, list[dict[str, Any]]] = {}

    def load(self) -> set[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or not self.path.stat().st_size:
            self._append(self.header)
            return set()
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except (IndexError, ValueError):
            header = None
        if header != self.header:
            raise TargetError(
                f"{self.path} records another job ({header.get('job') if isinstance(header, dict) else 'unreadable'}"
                f", not {self.header['job']}): the source, the model or the shard size changed; "
                "choose another --output (or remove that file to start over)"
            )
        for line in lines[1:]:
            try:
                record = json.loads(line)
                self.done[int(record["shard"])] = list(record["errors"])
            except (ValueError, KeyError, TypeError):
                continue
        return set(self.done)

    def record(self, number: int, items: int, errors: list[dict[str, Any]]) -> None:
        self._append({"shard": number, "items": items, "errors": errors})
        self.done[number] = errors

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            if handle.tell():  # a line cut short by a crash must not swallow this one
                handle.write("\n")
            handle.write(json.dumps(record))
            handle.flush()
            os.fsync(handle.fileno())

    def errors(self) -> Iterator[dict[str, Any]]:
        for number in sorted(self.done):
            yield from self.done[number]


def _error_of(response: httpx.Response) -> dict[str, Any]:
    try:
        error = response.json()["error"]
        return error if isinstance(error, dict) else {}
    except (ValueError, KeyError, TypeError):
        return {}


class ServerTarget:
    """A collection of a running clip-serve, written through `POST /v1/collections/{name}/items`."""

    def __init__(
        self,
        url: str,
        collection: str,
        api_key: str | None,
        state_dir: Path,
        index_kind: str,
        batch: int,
        timeout_s: float = 120.0,
        attempts: int = 8,
    ):
        self.url, self.collection, self.index_kind, self.batch = (
            url.rstrip("/"),
            collection,
            index_kind,
            batch,
        )
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, trust_env=False)
        self.state_dir = state_dir
        self.attempts = attempts
        self.where = f"collection {collection!r} of {self.url}"
        self.job: JobIdentity | None = None
        self.state: StateFile | None = None

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, tried again while the server is busy or away (429, 503, no connection)."""
        delay = 0.5
        for attempt in range(self.attempts):
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.attempts - 1:
                    raise TargetError(
                        f"{self.url} cannot be reached ({type(exc).__name__}): is clip-serve running?"
                    ) from None
            else:
                if response.status_code not in (429, 502, 503, 504) or attempt == self.attempts - 1:
                    return response
                delay = float(response.headers.get("retry-after") or delay)
            time.sleep(min(delay, 30.0))
            delay *= 2
        raise AssertionError("unreachable")

    @staticmethod
    def _problem(response: httpx.Response) -> str:
        try:
            error = response.json()["error"]
            return f"{error['type']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            return f"HTTP {response.status_code}: {response.text[:200]}"

    def open(self, job: JobIdentity) -> set[int]:
        self.job = job
        response = self._request("GET", f"/v1/collections/{self.collection}")
        if response.status_code == 404:
            created = self._request(
                "POST",
                "/v1/collections",
                json={"name": self.collection, "model": job.model_ref, "index": self.index_kind},
            )
            if created.status_code not in (201, 409):
                raise TargetError(
                    f"{self.url} refused to create collection {self.collection!r}: {self._problem(created)}"
                )
            response = self._request("GET", f"/v1/collections/{self.collection}")
        if response.status_code != 200:
            raise TargetError(f"{self.url}: collection {self.collection!r}: {self._problem(response)}")
        info = response.json()
        bound = ModelBinding(info["model"], info["version"], info["content_hash"], info["dim"])
        _check_binding(self.collection, bound, job)
        header = {"job": job.key, "server": self.url, "collection": self.collection}
        name = f"{self.collection}-{job.key}.jsonl"
        self.state = StateFile(self.state_dir / name, header)
        return self.state.load()

    def _item(self, shard: EncodedShard, position: int, source: Source | None) -> dict[str, Any]:
        item = shard.items[position]
        body: dict[str, Any] = {
            "id": item.id,
            "vector": shard.vectors[position].tolist(),
            "metadata": item.metadata,
        }
        if source is not None and source.kind == "text":
            body["text"] = source.value
        elif source is not None and source.data is not None:
            body["image"] = base64.b64encode(source.data).decode()
        elif source is not None:
            body["image"] = source.value
        return body

    def write(self, shard: EncodedShard) -> None:
        assert self.job is not None and self.state is not None
        positions = shard.ok
        sources = item_sources(shard, positions)
        bodies = [self._item(shard, p, s) for p, s in zip(positions, sources, strict=True)]
        refused: list[dict[str, Any]] = []
        for start in range(0, len(bodies), self.batch):
            refused += self._post(bodies[start : start + self.batch])
        for record in refused:
            record["shard"] = shard.number
        self.state.record(shard.number, len(shard.items), error_records(shard) + refused)

    def _post(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Upsert `items`; an item the server refuses (its `index` named) becomes an error record and
        the others are sent again; a body over the server's limits goes in two halves."""
        if not items:
            return []
        response = self._request(
            "POST",
            f"/v1/collections/{self.collection}/items",
            json={"items": items, "content_hash": self.job.binding.content_hash if self.job else None},
        )
        if response.status_code == 200:
            return []
        error = _error_of(response)
        index = error.get("index")
        if response.status_code in (400, 413, 422) and isinstance(index, int) and 0 <= index < len(items):
            record = {
                "id": items[index]["id"],
                "source": "server",
                "code": error.get("type"),
                "reason": error.get("message"),
            }
            return [record, *self._post(items[:index] + items[index + 1 :])]
        if (
            response.status_code == 413
            and len(items) > 1
            and error.get("type") != "collection_images_too_large"
        ):
            half = len(items) // 2
            return self._post(items[:half]) + self._post(items[half:])
        raise TargetError(f"{self.url} refused a write: {self._problem(response)}")

    def errors(self) -> Iterator[dict[str, Any]]:
        assert self.state is not None
        return self.state.errors()

    def close(self) -> None:
        self.client.close()


class FilesTarget:
    """clip-retrieval's layout under one folder, with the finished shards recorded beside the files."""

    def __init__(self, output: Path, image_job: bool, embed_captions: bool):
        self.output = output
        self.image_job, self.embed_captions = image_job, embed_captions
        self.where = f"files in {output} (clip-retrieval layout)"
        self.state: StateFile | None = None

    def open(self, job: JobIdentity) -> set[int]:
        for folder in ("img_emb", "text_emb", "metadata"):
            (self.output / folder).mkdir(parents=True, exist_ok=True)
        header = {"job": job.key, "model": job.model_ref, "content_hash": job.binding.content_hash}
        self.state = StateFile(self.output / "index_state.jsonl", header)
        return self.state.load()

    def write(self, shard: EncodedShard) -> None:
        assert self.state is not None
        positions = shard.ok
        if positions:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if self.image_job:
                _save_npy(self.output / "img_emb" / f"img_emb_{shard.number}.npy", shard.vectors[positions])
            texts = shard.caption_vectors if self.image_job else shard.vectors
            if texts is not None and (self.embed_captions or not self.image_job):
                _save_npy(self.output / "text_emb" / f"text_emb_{shard.number}.npy", texts[positions])
            table = pa.Table.from_pylist([self._metadata_row(shard, p) for p in positions])
            path = self.output / "metadata" / f"metadata_{shard.number}.parquet"
            temporary = path.with_name(path.name + ".tmp")
            pq.write_table(table, temporary)
            _fsync_and_rename(temporary, path)
        self.state.record(shard.number, len(shard.items), error_records(shard))

    @staticmethod
    def _metadata_row(shard: EncodedShard, position: int) -> dict[str, Any]:
        item = shard.items[position]
        row: dict[str, Any] = {"id": item.id}
        if item.image is not None:
            row["image_path"] = item.metadata.get("path") or item.metadata.get("url") or item.image
        row["caption"] = item.text
        row["metadata"] = json.dumps(item.metadata, ensure_ascii=False)
        return row

    def errors(self) -> Iterator[dict[str, Any]]:
        assert self.state is not None
        return self.state.errors()

    def close(self) -> None:
        pass


def _save_npy(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
    _fsync_and_rename(temporary, path)


def _fsync_and_rename(temporary: Path, path: Path) -> None:
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
