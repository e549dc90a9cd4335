"""The Ray Data job: shards in, encoded shards out, as they finish.

    shards --map (tasks: read, decode, preprocess, tokenize)--> decoded shards
           --map_batches (actor pool: each actor loads the bundle once)--> encoded shards --> driver

A row is one shard, so a shard is never split across actors and the driver records it as done once
it has written all of it. Decode tasks reserve a fraction of a CPU (`decode_cpus`) and run beside the
inference actors, which reserve half their threads' worth (`actor_cpus`); on a cluster with GPUs and
a bundle with an fp16 variant, the actors take one GPU each instead. Both stages reuse the service's
code: `BulkInputs` (the `ImagePreprocessor`, the bundle's tokenizer), the service's `ImageFetcher`
for URLs, and `BulkEncoder` (loading, runtimes, batches). A task or actor that dies is retried by
Ray; the driver's own death ends the job, and the next run starts from the shards recorded as done.
"""

from __future__ import annotations

import functools
import logging
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipserve.contract.bundle import Bundle, ModelRepository, parse_model_ref
from clipserve.index.sources import Item, read_images
from clipserve.service.inference.bulk import (
    BulkEncoder,
    BulkInputs,
    ItemError,
    PreparedImages,
    PreparedTexts,
    bulk_settings,
)
from clipserve.service.inference.inputs import ImageFetcher

log = logging.getLogger("clipserve.index")
ACTORS_START_S = 600
"""How long the inference actors may take to start (each loads the bundle) before the job fails."""


@dataclass(frozen=True)
class JobSpec:
    """What every task and actor of a job needs to know, small enough to ship with each."""

    models_dir: str
    model: str  # name@version: the exact bundle the driver chose
    service_settings: dict[str, Any]
    embed_captions: bool  # an image item's caption gets a text vector too (clip-retrieval's text_emb)
    require_images: bool  # an item without an image is an error (clip-retrieval's aligned files)
    keep_image_bytes: bool  # the target keeps local images' bytes as the items' sources
    max_file_bytes: int
    batch_size: int


@dataclass
class DecodedShard:
    """A shard's model inputs; `errors` by item position."""

    number: int
    items: list[Item]
    images: PreparedImages
    texts: PreparedTexts
    text_positions: list[int]  # item position of each text prepared (texts.positions index into it)
    image_bytes: list[bytes | None]
    errors: dict[int, ItemError] = field(default_factory=dict)
    decode_s: float = 0.0


@dataclass
class EncodedShard:
    """A shard's vectors: `vectors[i]` is item i's (its image's, or its text's without an image),
    `caption_vectors[i]` its caption's when asked for; rows of failed items are zero."""

    number: int
    items: list[Item]
    vectors: np.ndarray
    caption_vectors: np.ndarray | None
    errors: dict[int, ItemError]
    image_bytes: list[bytes | None]
    node: str
    decode_s: float
    encode_s: float

    @property
    def ok(self) -> list[int]:
        return [i for i in range(len(self.items)) if i not in self.errors]


@functools.lru_cache(maxsize=4)
def _bundle(models_dir: str, model: str) -> Bundle:
    name, version = parse_model_ref(model)
    return ModelRepository(models_dir).load(name, version, verify=False)


@functools.lru_cache(maxsize=4)
def _inputs(models_dir: str, model: str, settings_json: str) -> BulkInputs:
    """One per worker process and job: the tokenizer's vocabulary is read once, not per shard."""
    import json

    return BulkInputs(_bundle(models_dir, model), bulk_settings(**json.loads(settings_json)))


def decode_shard(number: int, items: Sequence[Item], job: JobSpec) -> DecodedShard:
    """Read, decode and preprocess the images, tokenize the texts; every failure kept per item."""
    import json

    started = time.perf_counter()
    inputs = _inputs(job.models_dir, job.model, json.dumps(job.service_settings, sort_keys=True))
    settings = bulk_settings(**job.service_settings)
    errors: dict[int, ItemError] = {}
    for position, item in enumerate(items):
        if item.text_error is not None and (item.image is None or job.embed_captions):
            errors[position] = ItemError(position, "invalid_request", item.text_error)
        elif job.require_images and item.image is None:
            errors[position] = ItemError(position, "invalid_request", "the item has no image")
    raw = read_images(items, ImageFetcher(settings), job.max_file_bytes)
    # a text item's empty bytes fail at once; only items with an image have their failure recorded
    images = inputs.prepare_images([b"" if data is None else data for data in raw])
    for error in images.errors:
        if items[error.index].image is not None:
            message = error.message.replace(f"image {error.index}", "the image", 1)
            errors.setdefault(error.index, ItemError(error.index, error.code, message))
    text_positions = [
        p
        for p, item in enumerate(items)
        if item.text is not None and p not in errors and (item.image is None or job.embed_captions)
    ]
    texts = inputs.prepare_texts([items[p].text or "" for p in text_positions])
    for error in texts.errors:
        position = text_positions[error.index]
        message = error.message.replace(f"text {error.index}", "the text", 1)
        errors.setdefault(position, ItemError(position, error.code, message))
    image_bytes = [
        data if job.keep_image_bytes and isinstance(data, bytes) and position not in errors else None
        for position, data in enumerate(raw)
    ]
    return DecodedShard(
        number, list(items), images, texts, text_positions, image_bytes, errors, time.perf_counter() - started
    )


def encode_shard(encoder: BulkEncoder, decoded: DecodedShard, job: JobSpec, node: str) -> EncodedShard:
    started = time.perf_counter()
    count = len(decoded.items)
    errors = dict(decoded.errors)
    image_vectors = encoder.encode_prepared_images(decoded.images).vectors
    text_vectors = encoder.encode_prepared_texts(decoded.texts).vectors  # [len(text_positions), D]
    vectors = np.zeros((count, encoder.dim), dtype=np.float32)
    captions = np.zeros((count, encoder.dim), dtype=np.float32) if job.embed_captions else None
    with_image = [p for p, item in enumerate(decoded.items) if item.image is not None]
    vectors[with_image] = image_vectors[with_image]
    for row, position in enumerate(decoded.text_positions):
        if decoded.items[position].image is None:
            vectors[position] = text_vectors[row]
        elif captions is not None:
            captions[position] = text_vectors[row]
    for position in errors:
        vectors[position] = 0
        if captions is not None:
            captions[position] = 0
    return EncodedShard(
        decoded.number,
        decoded.items,
        vectors,
        captions,
        errors,
        decoded.image_bytes,
        node,
        decoded.decode_s,
        time.perf_counter() - started,
    )


def _decode_row(row: dict[str, Any], job: JobSpec) -> dict[str, Any]:
    """Ray Data row function (a task): one shard's JSON listing -> its pickled `DecodedShard`."""
    import json

    items = [Item.from_json(entry) for entry in json.loads(row["items"])]
    decoded = decode_shard(int(row["number"]), items, job)
    return {"number": decoded.number, "payload": pickle.dumps(decoded, protocol=5)}


class EncodeActor:
    """An inference actor: loads the bundle once, then encodes whole shards."""

    def __init__(self, job: JobSpec, threads: int, service_settings: dict[str, Any]):
        import ray

        _quiet_libraries()
        self.job = job
        self.encoder = BulkEncoder.load(
            job.models_dir,
            job.model,
            threads=threads,
            batch_size=job.batch_size,
            settings=bulk_settings(**service_settings),
        )
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        payloads = []
        for payload in batch["payload"]:
            encoded = encode_shard(self.encoder, pickle.loads(payload), self.job, self.node)
            payloads.append(pickle.dumps(encoded, protocol=5))
        return {"number": list(batch["number"]), "payload": payloads}


@dataclass(frozen=True)
class Placement:
    """How the inference stage is laid out on the cluster."""

    actors: int
    threads: int
    actor_cpus: float
    decode_cpus: float
    gpus_per_actor: float
    service_settings: dict[str, Any]

    def describe(self) -> str:
        device = f"{self.gpus_per_actor:g} GPU" if self.gpus_per_actor else f"{self.threads} threads"
        return f"{self.actors} inference actor(s) x {device}, decode tasks {self.decode_cpus:g} CPU each"


def _quiet_libraries() -> None:
    """Ray Data's own progress bars and execution reports are not ours to show."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def start_ray(address: str | None, num_cpus: int, object_store_mb: int) -> str:
    """Join the cluster at `address`, or start a quiet local one (no dashboard). Returns a description."""
    import ray

    if ray.is_initialized():
        return "the Ray runtime of this process"
    # Ray's own notices (its token authentication, Ray Data's progress bars) are not the job's output
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if address is None:
        # a local runtime serves this process alone: it listens on the loopback interface only
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            **options,
        )
        return f"a local Ray ({num_cpus} CPUs)"
    ray.init(address=address, **options)
    return f"the Ray cluster at {address}"


def plan_placement(
    bundle: Bundle,
    gpu: str,
    actors: int | None,
    threads: int,
    actor_cpus: float | None,
    decode_cpus: float,
    service_settings: dict[str, Any],
) -> Placement:
    """GPU actors when asked, or (auto) when the cluster has GPUs and the bundle an fp16 variant;
    otherwise CPU actors, as many as the cluster's CPUs allow at `threads` each."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    has_fp16 = bundle.manifest.file("image", "fp16") is not None
    if gpu == "on" and not gpus:
        raise RuntimeError("--gpu on, but the Ray cluster has no GPU")
    if gpu == "on" or (gpu == "auto" and gpus and has_fp16):
        settings = {**service_settings, "providers": ["cuda"], "precision": "fp16" if has_fp16 else "fp32"}
        return Placement(actors or gpus, threads, actor_cpus or 1.0, decode_cpus, 1.0, settings)
    cpus = float(resources.get("CPU", 1))
    # half the actor's threads: decoding needs the other half when the model is small (a student
    # decodes for longer than it infers), and takes little of it when the model is large
    reserve = actor_cpus if actor_cpus is not None else max(0.5, threads / 2)
    count = actors or max(1, int(cpus // max(threads, 1)))
    return Placement(count, threads, reserve, decode_cpus, 0.0, service_settings)


def run_shards(
    shards: Sequence[tuple[int, Sequence[Item]]], job: JobSpec, placement: Placement
) -> Iterator[EncodedShard]:
    """Encode `shards` on the cluster; each is yielded as soon as it is done (in no set order)."""
    import json

    import ray.data

    _quiet_libraries()
    # The pool starts whole: every actor has loaded the bundle before the first shard is handed out, so
    # shards spread over every actor (and node) from the start instead of going to the first one up.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTORS_START_S
    rows = [
        {"number": number, "items": json.dumps([item.to_json() for item in items])}
        for number, items in shards
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    decoded = dataset.map(_decode_row, fn_kwargs={"job": job}, num_cpus=placement.decode_cpus)
    encoded = decoded.map_batches(
        EncodeActor,
        fn_constructor_kwargs={
            "job": job,
            "threads": placement.threads,
            "service_settings": placement.service_settings,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=placement.actors),
        num_cpus=placement.actor_cpus,
        num_gpus=placement.gpus_per_actor or None,
    )
    for row in encoded.iter_rows():
        yield pickle.loads(row["payload"])
