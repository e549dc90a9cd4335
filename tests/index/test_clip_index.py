"""clip-index on a real local Ray runtime (one for the session), real ONNX Runtime sessions on the tiny
bundle, a real service (uvicorn) and a real PostgreSQL with pgvector: every target holds the vectors
`/v1/embed` gives for the same inputs, bad files end in the errors file, and a run killed with
SIGKILL goes on where it stopped."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from clipserve.index.cli import main, run_index
from clipserve.service.stores.pgvector import PgVectorStore
from tests.fixtures.indexing import (
    BAD_FILES,
    Corpus,
    add_bad_files,
    index_settings,
    kill_marked,
    loopback_address,
    new_mark,
    read_files,
    write_corpus,
    write_webdataset,
)
from tests.fixtures.service import b64, image_bytes

MIN_COSINE = 0.9999


def served(client: Any, texts: list[str] = (), images: list[bytes] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Vectors from the service's /v1/embed (an ASGI TestClient or an httpx client)."""
    text_vectors, image_vectors = [], []
    for start in range(0, max(len(texts), len(images)), 32):
        body = {
            "texts": list(texts[start : start + 32]),
            "images": [b64(i) for i in images[start : start + 32]],
        }
        response = client.post("/v1/embed", json=body)
        assert response.status_code == 200, response.text
        text_vectors += response.json()["text_embeddings"]
        image_vectors += response.json()["image_embeddings"]
    return np.array(text_vectors, np.float32), np.array(image_vectors, np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def test_three_targets_hold_the_vectors_the_service_gives(
    ray_address, corpus: Corpus, tiny_repo, live_server, postgres_schema_dsn, tmp_path
):
    base = live_server()
    output = tmp_path / "files"
    summary = run_index(
        index_settings(
            source=corpus.path,
            model="tiny",
            models_dir=tiny_repo,
            collection="photos",
            server=base,
            postgres_dsn=postgres_schema_dsn,
            output=output,
            shard_size=6,
            state_dir=tmp_path / "state",
            errors_file=tmp_path / "errors.jsonl",
        )
    )
    ids = sorted(corpus.images)
    assert (summary.items, summary.indexed, summary.errors, summary.shards) == (20, 20, 0, 4)
    with httpx.Client(base_url=base, timeout=60) as client:
        _, expected = served(client, images=[corpus.images[i] for i in ids])
        caption_ids = sorted(corpus.captions)
        expected_captions, _ = served(client, texts=[corpus.captions[i] for i in caption_ids])
        # the service: vectors, sources (the image bytes, by sha256), metadata; found by itself
        held = []
        for item_id in ids:
            item = client.get(f"/v1/collections/photos/items/{item_id}").json()
            held.append(item["vector"])
            digest = hashlib.sha256(corpus.images[item_id]).hexdigest()
            assert item["source"] == {"kind": "image", "value": f"sha256:{digest}"}
            assert item["metadata"]["path"] == item_id
            assert item["metadata"].get("caption") == corpus.captions.get(item_id)
        assert cosines(np.array(held, np.float32), expected).min() >= MIN_COSINE
        for item_id in ids[::4]:
            hits = client.post(
                "/v1/collections/photos/search", json={"image": b64(corpus.images[item_id]), "top_k": 1}
            )
            assert [hit["id"] for hit in hits.json()["results"]] == [item_id]
    # PostgreSQL, written directly, as the service writes it
    store = PgVectorStore(postgres_schema_dsn)
    try:
        stored = [store.get("photos", item_id) for item_id in ids]
        assert cosines(np.array([s.vector for s in stored]), expected).min() >= MIN_COSINE
        assert stored[0].source.stored_image == hashlib.sha256(corpus.images[ids[0]]).hexdigest()
        assert store.images("photos", [stored[0].source.stored_image])
        assert store.describe("photos").binding.model == "tiny"
    finally:
        store.close()
    # clip-retrieval's files: image vectors for every item, caption vectors beside them
    file_ids, file_vectors = read_files(output, "img_emb")
    order = [file_ids.index(i) for i in ids]
    assert cosines(file_vectors[order], expected).min() >= MIN_COSINE
    _, caption_vectors = read_files(output, "text_emb")
    order = [file_ids.index(i) for i in caption_ids]
    assert cosines(caption_vectors[order], expected_captions).min() >= MIN_COSINE
    assert (tmp_path / "errors.jsonl").read_text() == ""


def test_bad_files_end_in_the_errors_file_and_the_rest_is_indexed(
    ray_address, tiny_repo, bomb_png, tmp_path, capsys
):
    corpus = write_corpus(tmp_path / "corpus", 8, seed=40)
    add_bad_files(corpus.path, bomb_png)
    output = tmp_path / "out"
    status = main(
        [
            str(corpus.path),
            "--model",
            "tiny@1",
            "--models-dir",
            str(tiny_repo),
            "--output",
            str(output),
            "--shard-size",
            "5",
            "--progress",
            "off",
            "--threads-per-actor",
            "1",
        ]
    )
    assert status == 3  # finished, with errors
    records = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]
    assert {record["id"]: record["code"] for record in records} == BAD_FILES
    assert all(record["reason"] and record["source"].endswith(record["id"]) for record in records)
    ids, vectors = read_files(output, "img_emb")
    assert sorted(ids) == sorted(corpus.images) and len(vectors) == 8
    out = capsys.readouterr().out
    assert "12 items in 3 shards" in out and "8 indexed, 4 errors" in out and "errors.jsonl" in out


class _Images(http.server.BaseHTTPRequestHandler):
    body = image_bytes(77)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_url() -> Any:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/picture.png"
    server.shutdown()


def test_tables_of_paths_urls_and_texts(
    ray_address, corpus: Corpus, tiny_repo, client, postgres_schema_dsn, image_url, tmp_path
):
    image_ids = sorted(corpus.images)[:5]
    rows = [
        {"id": f"img-{n}", "path": str(corpus.path / i), "text": None, "label": n}
        for n, i in enumerate(image_ids)
    ]
    texts = ["a quiet harbour", "two red kites", "y" * 2001]
    rows += [{"id": f"txt-{n}", "path": None, "text": t, "label": 10 + n} for n, t in enumerate(texts)]
    rows.append({"id": "remote", "path": image_url, "text": None, "label": 99})
    table = pa.Table.from_pylist(rows)
    pacsv.write_csv(table, tmp_path / "items.csv")
    pq.write_table(table, tmp_path / "items.parquet")

    summary = run_index(
        index_settings(
            source=tmp_path / "items.csv", model="tiny", models_dir=tiny_repo, collection="mixed",
            postgres_dsn=postgres_schema_dsn, shard_size=4, errors_file=tmp_path / "errors.jsonl",
        )
    )  # fmt: skip
    assert (summary.items, summary.errors) == (9, 2)
    errors = {r["id"]: r for r in map(json.loads, (tmp_path / "errors.jsonl").read_text().splitlines())}
    assert errors["txt-2"]["code"] == "text_too_long"
    assert errors["remote"]["code"] == "invalid_image" and "private or loopback" in errors["remote"]["reason"]
    text_vectors, image_vectors = served(
        client, texts=texts[:2], images=[corpus.images[i] for i in image_ids]
    )
    store = PgVectorStore(postgres_schema_dsn)
    try:
        images = [store.get("mixed", f"img-{n}") for n in range(5)]
        assert cosines(np.array([i.vector for i in images]), image_vectors).min() >= MIN_COSINE
        assert images[3].metadata["label"] == 3
        stored_texts = [store.get("mixed", f"txt-{n}") for n in range(2)]
        assert cosines(np.array([t.vector for t in stored_texts]), text_vectors).min() >= MIN_COSINE
        assert stored_texts[1].source.value == "two red kites"
        assert store.count("mixed") == 7
    finally:
        store.close()

    # the same table as parquet, into files, URLs from private addresses allowed this time
    output = tmp_path / "files"
    summary = run_index(
        index_settings(
            source=tmp_path / "items.parquet",
            model="tiny",
            models_dir=tiny_repo,
            output=output,
            url_allow_private=True,
        )
    )
    errors = {r["id"] for r in map(json.loads, (output / "errors.jsonl").read_text().splitlines())}
    assert errors == {"txt-0", "txt-1", "txt-2"}  # files of an image corpus: an item needs its image
    ids, vectors = read_files(output, "img_emb")
    assert ids == [*(f"img-{n}" for n in range(5)), "remote"]
    _, fetched = served(client, images=[_Images.body])
    assert float(vectors[-1] @ fetched[0]) >= MIN_COSINE
    metadata = pq.read_table(output / "metadata" / "metadata_0.parquet").to_pylist()
    assert json.loads(metadata[2]["metadata"])["label"] == 2


def test_webdataset_shards(ray_address, tiny_repo, client, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_webdataset(shards / "part-00000.tar", 5)
    second = write_webdataset(shards / "part-00001.tar", 3)
    output = tmp_path / "files"
    summary = run_index(
        index_settings(source=shards, model="tiny", models_dir=tiny_repo, output=output, shard_size=3)
    )
    assert (summary.items, summary.errors) == (8, 0)
    ids, vectors = read_files(output, "img_emb")
    assert ids == [f"part-00000.tar/{k}" for k in first] + [f"part-00001.tar/{k}" for k in second]
    samples = [*first.values(), *second.values()]
    captions, images = served(client, texts=[c for _, c in samples], images=[i for i, _ in samples])
    assert cosines(vectors, images).min() >= MIN_COSINE
    assert cosines(read_files(output, "text_emb")[1], captions).min() >= MIN_COSINE
    rows = pq.read_table(output / "metadata" / "metadata_0.parquet").to_pylist()
    assert json.loads(rows[1]["metadata"])["rank"] == 1 and rows[1]["caption"] == "sample caption 1"


def _finished_shards(dsn: str) -> int:
    try:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*) FROM clipserve_index_shards").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


def test_killed_driver_resumes_with_every_item_once(ray_address, tiny_repo, postgres_schema_dsn, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 120, seed=200)
    flags = [
        str(corpus.path), "--model", "tiny", "--models-dir", str(tiny_repo), "--collection", "big",
        "--postgres-dsn", postgres_schema_dsn, "--shard-size", "3", "--threads-per-actor", "1",
    ]  # fmt: skip
    mark = new_mark()
    driver = subprocess.Popen(
        [sys.executable, "-m", "clipserve.index.cli", *flags, "--ray-address", loopback_address(ray_address)],
        env={**os.environ, **mark},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while _finished_shards(postgres_schema_dsn) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard finished in 180 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_marked(mark)
    finished = _finished_shards(postgres_schema_dsn)
    assert 2 <= finished < 40, "the driver was to be killed mid-job"

    # the same command again, in this process
    options = dict(
        zip([f.removeprefix("--").replace("-", "_") for f in flags[1::2]], flags[2::2], strict=True)
    )
    summary = run_index(index_settings(**options, source=flags[0], errors_file=tmp_path / "errors.jsonl"))
    assert summary.shards_before >= finished and summary.shards == 40
    assert sum(items for items, _ in summary.nodes.values()) == 3 * (40 - summary.shards_before)
    store = PgVectorStore(postgres_schema_dsn)
    try:
        assert store.count("big") == 120
        # ids are the store's keys: 120 items, each of the corpus's 120 ids found, is every item once
        assert all(store.get("big", item_id).id == item_id for item_id in corpus.images)
    finally:
        store.close()
    assert _finished_shards(postgres_schema_dsn) == 40
