"""`clip-index`: embed a corpus with a served model's bundle, on Ray Data, into a collection (through
a running service, or PostgreSQL/pgvector directly) or clip-retrieval's files. Resumable by shard.

clip-index DIR --model NAME --models-dir MODELS --collection NAME --server URL
clip-index images.parquet --model tiny@1 --collection photos --postgres-dsn postgresql://...
clip-index shards/ --model student --output embeddings/ --ray-address ray-head:6379

Exit status: 0 every item indexed; 3 finished, with items that could not be indexed (see the errors
file); 1 failed (nothing more can be done without a change); 2 a mistake in the options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref
from clipserve.contract.cli_settings import SettingsError, load_settings
from clipserve.index.pipeline import JobSpec, plan_placement, run_shards, start_ray
from clipserve.index.progress import Progress, Tally, duration
from clipserve.index.settings import IndexSettings
from clipserve.index.sources import SourceError, list_source, shards_of
from clipserve.index.targets import (
    FilesTarget,
    JobIdentity,
    PgVectorTarget,
    ServerTarget,
    Target,
    TargetError,
)
from clipserve.service.stores import IndexStoreError, ModelBinding

PROG = "clip-index"
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_WITH_ERRORS = 0, 1, 2, 3


@dataclass
class Summary:
    items: int
    indexed: int
    errors: int
    shards: int
    shards_before: int
    seconds: float
    wall_seconds: float
    where: list[str]
    errors_file: Path
    placement: str
    ray: str
    nodes: dict[str, tuple[int, float]] = field(default_factory=dict)  # node -> (items, encode seconds)
    unit: str = "images"
    first_shard_s: float | None = None  # seconds into the job when the first shard was done
    first_shard_items: int = 0

    @property
    def steady_rate(self) -> float | None:
        """Items/s after the first shard (Ray's workers started, the model loaded), over 2+ shards.
        Shards decoded while the actors were still loading the model come out fast after it, so on a
        short job this reads high; the whole job's rate reads low. A long job's lies between, close
        to both."""
        done_now = sum(items for items, _ in self.nodes.values())
        if self.first_shard_s is None or done_now <= self.first_shard_items:
            return None
        span = self.seconds - self.first_shard_s
        return (done_now - self.first_shard_items) / span if span > 0 else None

    @property
    def rate(self) -> float:
        done_now = sum(items for items, _ in self.nodes.values())
        return done_now / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"{PROG}: done: {self.items} items in {self.shards} shards "
            f"({self.shards - self.shards_before} now, {self.shards_before} done before); "
            f"{self.indexed} indexed, {self.errors} errors",
            f"  rate      {self.rate:.1f} {self.unit}/s over {duration(self.seconds)} "
            f"({duration(self.wall_seconds)} in all, with listing and Ray's start)"
            + (f"; {self.steady_rate:.1f} {self.unit}/s after the first shard" if self.steady_rate else ""),
            f"  ran on    {self.ray}: {self.placement}",
        ]
        for node, (items, encode_s) in sorted(self.nodes.items()):
            busy = f", {items / encode_s:.1f} {self.unit}/s while encoding" if encode_s > 0 else ""
            out.append(f"  node      {node[:12]}: {items} {self.unit}{busy}")
        out += [f"  results   {where}" for where in self.where]
        out.append(f"  errors    {self.errors_file}" + ("" if self.errors else " (none)"))
        return out


def job_key(fingerprint: str, shard_size: int, content_hash: str, embed_captions: bool) -> str:
    text = json.dumps([fingerprint, shard_size, content_hash, embed_captions])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_targets(settings: IndexSettings, image_job: bool, embed_captions: bool) -> list[Target]:
    targets: list[Target] = []
    if settings.postgres_dsn and settings.collection:
        targets.append(
            PgVectorTarget(
                settings.postgres_dsn,
                settings.collection,
                settings.index_kind,
                settings.max_collection_image_bytes,
            )
        )
    if settings.server and settings.collection:
        targets.append(
            ServerTarget(
                settings.server,
                settings.collection,
                settings.api_key,
                settings.state_dir,
                settings.index_kind,
                settings.server_batch,
            )
        )
    if settings.output is not None:
        targets.append(FilesTarget(settings.output, image_job, embed_captions))
    return targets


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run_index(settings: IndexSettings) -> Summary:
    """The whole job: list, skip finished shards, encode the rest on Ray, write, record, summarize."""
    started = time.monotonic()
    listing = list_source(settings.source, settings.source_kind)
    name, version = parse_model_ref(settings.model)
    bundle = ModelRepository(settings.models_dir).load(name, version, verify=True)
    manifest = bundle.manifest
    model_ref = f"{manifest.name}@{manifest.version}"
    binding = ModelBinding(manifest.name, manifest.version, manifest.content_hash, manifest.embed_dim)
    image_job = listing.has_images
    embed_captions = settings.output is not None and listing.has_captions
    job = JobIdentity(
        job_key(listing.fingerprint(), settings.shard_size, binding.content_hash, embed_captions),
        binding,
        model_ref,
    )
    shards = list(shards_of(listing.items, settings.shard_size))
    targets = build_targets(settings, image_job, embed_captions)
    try:
        finished = [target.open(job) for target in targets]
        done_everywhere = set.intersection(*finished) if finished else set()
        pending = [(number, items) for number, items in shards if number not in done_everywhere]
        done_items = sum(len(items) for number, items in shards if number in done_everywhere)
        say(
            f"{len(listing.items)} items ({listing.kind}) in {len(shards)} shards of {settings.shard_size}; "
            f"{len(shards) - len(pending)} done before, {len(pending)} to do; model {model_ref}"
        )
        unit = "images" if image_job else "texts"
        tally = Tally(total=len(listing.items), done_before=done_items)
        ray_description, placement_description = "nothing", "no shard left to encode"
        progress = Progress(tally, settings.progress, settings.log_every_s, unit)
        try:
            if pending:
                ray_description = start_ray(settings.ray_address, settings.num_cpus, settings.object_store_mb)
                placement = plan_placement(
                    bundle,
                    settings.gpu,
                    settings.actors,
                    settings.threads_per_actor,
                    settings.actor_cpus,
                    settings.decode_cpus,
                    settings.service_settings(),
                )
                # more actors than shards would only load the model to wait
                placement = dataclasses.replace(placement, actors=min(placement.actors, len(pending)))
                placement_description = placement.describe()
                spec = JobSpec(
                    models_dir=str(Path(settings.models_dir).resolve()),
                    model=model_ref,
                    service_settings=placement.service_settings,
                    embed_captions=embed_captions,
                    require_images=settings.output is not None and image_job,
                    keep_image_bytes=settings.keep_image_bytes
                    and (settings.server or settings.postgres_dsn) is not None,
                    max_file_bytes=settings.max_file_bytes,
                    batch_size=settings.batch_size,
                )
                progress.started = time.monotonic()
                for shard in run_shards(pending, spec, placement):
                    for target, done in zip(targets, finished, strict=True):
                        if shard.number not in done:
                            target.write(shard)
                    progress.advance(len(shard.items), len(shard.errors), shard.node, shard.encode_s)
        finally:
            seconds = progress.close()
        errors_file = settings.errors_file or (
            settings.output / "errors.jsonl"
            if settings.output is not None
            else Path("clip-index-errors.jsonl")
        )
        records = list(targets[0].errors())
        write_errors(errors_file, records)
        nodes = {node: (tally.items, tally.encode_s) for node, tally in tally.nodes.items()}
        return Summary(
            items=len(listing.items),
            indexed=len(listing.items) - len(records),
            errors=len(records),
            shards=len(shards),
            shards_before=len(shards) - len(pending),
            seconds=seconds,
            wall_seconds=time.monotonic() - started,
            where=[target.where for target in targets],
            errors_file=errors_file,
            placement=placement_description,
            ray=ray_description,
            nodes=nodes,
            unit=unit,
            first_shard_s=tally.first_at,
            first_shard_items=tally.first_items,
        )
    finally:
        for target in targets:
            target.close()


def write_errors(path: Path, records: list[dict]) -> None:
    """The errors file, whole, from the records of every finished shard (written to a temporary name
    and renamed, so it never holds half a run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def _source_first(argv: Sequence[str]) -> list[str]:
    """`clip-index DIR --model ...`: a bare first argument is the source."""
    args = list(argv)
    if args and not args[0].startswith("-"):
        return ["--source", *args]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _source_first(sys.argv[1:] if argv is None else argv)
        settings = load_settings(IndexSettings, args, PROG, description=__doc__)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = run_index(settings)
    except (SourceError, BundleError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TargetError, IndexStoreError) as exc:
        print(f"{PROG}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; finished shards are recorded, run the same command to go on",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # a failed Ray job, a store error: one line, and the status says failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{PROG}: failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(summary.lines()))
    return EXIT_WITH_ERRORS if summary.errors else EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
