"""The bundle contract on its own: manifest schema, publish, verified load, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from clipserve.contract.bundle import (
    FORMAT_VERSION,
    BundleError,
    BundleIntegrityError,
    BundleNotFoundError,
    ImagePreprocess,
    Manifest,
    ModelRepository,
    ModelSource,
    RepositoryNotWritableError,
    TextGraph,
    TokenizerSpec,
    VersionExistsError,
    load_bundle,
    parse_model_ref,
    read_manifest,
)


def make_manifest(name: str = "m", files=()) -> Manifest:
    return Manifest(
        name=name,
        embed_dim=8,
        logit_scale=100.0,
        image=ImagePreprocess(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        tokenizer=TokenizerSpec(vocab_file="vocab.txt.gz", sot_token_id=49406, eot_token_id=49407),
        text=TextGraph(dynamic_length=True),
        files=list(files),
        source=ModelSource(architecture="tiny", pretrained="none"),
    )


def publish_fake(repo: ModelRepository, name: str = "m", payload: bytes = b"weights", version=None):
    with repo.stage(name) as staging:
        (staging.path / "image.onnx").write_bytes(b"image-" + payload)
        (staging.path / "text.onnx").write_bytes(b"text-" + payload)
        (staging.path / "vocab.txt.gz").write_bytes(b"vocab")
        files = [
            staging.describe("image.onnx", "image", "fp32"),
            staging.describe("text.onnx", "text", "fp32"),
            staging.describe("vocab.txt.gz", "tokenizer"),
        ]
        return staging.publish(make_manifest(name, files), version=version)


def test_manifest_round_trip_and_content_hash(tmp_path: Path) -> None:
    bundle = publish_fake(ModelRepository(tmp_path))
    again = read_manifest(bundle.path)
    assert again == bundle.manifest
    assert again.format_version == FORMAT_VERSION
    assert again.version == 1
    assert (
        json.loads((bundle.path / "manifest.json").read_text())["files"][0]["sha256"] == again.files[0].sha256
    )
    # Same weights under another name and version: same embedding space, same hash.
    other = publish_fake(ModelRepository(tmp_path), name="copy")
    assert other.manifest.content_hash == bundle.manifest.content_hash
    changed = publish_fake(ModelRepository(tmp_path), payload=b"other weights")
    assert changed.manifest.content_hash != bundle.manifest.content_hash


def test_versions_are_monotonic_and_never_overwritten(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    assert [publish_fake(repo).manifest.version for _ in range(3)] == [1, 2, 3]
    assert repo.versions("m") == [1, 2, 3]
    assert repo.latest("m") == 3
    assert repo.models() == ["m"]
    with pytest.raises(VersionExistsError, match="version 2 already exists"):
        publish_fake(repo, payload=b"new", version=2)
    assert load_bundle(repo.bundle_dir("m", 2)).manifest.files[0].size == len(b"image-weights")
    assert not list((tmp_path / "m").glob(".staging-*")), "a refused publish must leave nothing behind"


def test_failure_inside_stage_leaves_nothing(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    with pytest.raises(RuntimeError), repo.stage("m") as staging:
        (staging.path / "image.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert repo.versions("m") == []
    assert not list((tmp_path / "m").glob(".staging-*"))


def test_publish_refuses_unlisted_or_missing_files(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    with repo.stage("m") as staging:
        (staging.path / "image.onnx").write_bytes(b"i")
        (staging.path / "text.onnx").write_bytes(b"t")
        (staging.path / "stray.bin").write_bytes(b"?")
        files = [
            staging.describe("image.onnx", "image", "fp32"),
            staging.describe("text.onnx", "text", "fp32"),
        ]
        with pytest.raises(BundleError, match=r"stray\.bin"):
            staging.publish(make_manifest("m", files))
    with repo.stage("m") as staging:
        (staging.path / "image.onnx").write_bytes(b"i")
        files = [staging.describe("image.onnx", "image", "fp32")]
        with pytest.raises(BundleError, match="image and a text"):
            staging.publish(make_manifest("m", files))
    assert repo.versions("m") == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_load_names_the_corrupted_file(tmp_path: Path, damage: str) -> None:
    bundle = publish_fake(ModelRepository(tmp_path))
    target = bundle.path / "text.onnx"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[0] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    else:
        target.unlink()
    with pytest.raises(BundleIntegrityError, match=r"m@1: file text\.onnx"):
        ModelRepository(tmp_path).load("m")
    # Without verification the manifest still reads, so tools can inspect a damaged bundle.
    assert ModelRepository(tmp_path).load("m", verify=False).manifest.name == "m"


@pytest.mark.parametrize("escape", ["../../outside.txt", "/etc/hostname", "sub/../../outside.txt"])
@pytest.mark.parametrize("field", ["vocab_file", "path"])
def test_every_file_a_manifest_names_stays_inside_the_bundle(tmp_path: Path, field: str, escape: str) -> None:
    """Written as a manifest an attacker would write: the tokenizer's file or a listed file outside."""
    bundle = publish_fake(ModelRepository(tmp_path))
    raw = json.loads((bundle.path / "manifest.json").read_text())
    if field == "vocab_file":
        raw["tokenizer"]["vocab_file"] = escape
    else:
        raw["files"][2]["path"] = escape
    (bundle.path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="must be relative and inside the bundle"):
        ModelRepository(tmp_path).load("m")


def test_a_listed_file_that_links_out_of_the_bundle_is_refused(tmp_path: Path) -> None:
    """A symbolic link inside the bundle to a file outside it, hash and size matching: refused all
    the same, by where it leads."""
    bundle = publish_fake(ModelRepository(tmp_path))
    outside = tmp_path / "outside.txt.gz"
    (bundle.path / "vocab.txt.gz").rename(outside)
    (bundle.path / "vocab.txt.gz").symlink_to(outside)
    with pytest.raises(BundleIntegrityError, match=r"m@1: file vocab\.txt\.gz leads outside the bundle"):
        ModelRepository(tmp_path).load("m")
    # a link that stays inside the bundle is fine
    (bundle.path / "vocab.txt.gz").unlink()
    (bundle.path / "files").mkdir()
    outside.rename(bundle.path / "files" / "vocab.txt.gz")
    (bundle.path / "vocab.txt.gz").symlink_to("files/vocab.txt.gz")
    assert ModelRepository(tmp_path).load("m").manifest.name == "m"


def test_the_tokenizer_file_must_be_among_the_hashed_files(tmp_path: Path) -> None:
    bundle = publish_fake(ModelRepository(tmp_path))
    raw = json.loads((bundle.path / "manifest.json").read_text())
    raw["files"] = [entry for entry in raw["files"] if entry["path"] != "vocab.txt.gz"]
    (bundle.path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(
        BundleIntegrityError, match=r"tokenizer's file vocab\.txt\.gz is not among the manifest's files"
    ):
        ModelRepository(tmp_path).load("m")


def test_unknown_model_and_version(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    publish_fake(repo)
    with pytest.raises(BundleNotFoundError, match=r"no published version of model 'nope'.*models: m"):
        repo.load("nope")
    with pytest.raises(BundleNotFoundError, match="no version 7"):
        repo.load("m", 7)


def test_unwritable_repository_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    repo = ModelRepository(blocker / "models")
    with pytest.raises(RepositoryNotWritableError, match="not writable"), repo.stage("m"):
        pytest.fail("the stage must not be entered")


def test_newer_format_and_bad_names_are_refused(tmp_path: Path) -> None:
    bundle = publish_fake(ModelRepository(tmp_path))
    raw = json.loads((bundle.path / "manifest.json").read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (bundle.path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="newer than this clipserve understands"):
        read_manifest(bundle.path)
    for bad in ["", "../x", "a b", "-lead"]:
        with pytest.raises(BundleError, match="invalid model name"):
            ModelRepository(tmp_path).load(bad)


def test_parse_model_ref() -> None:
    assert parse_model_ref("vitb32") == ("vitb32", None)
    assert parse_model_ref("vitb32@12") == ("vitb32", 12)
    for bad in ["vitb32@", "vitb32@0", "vitb32@x", "@3"]:
        with pytest.raises(BundleError):
            parse_model_ref(bad)


def _publish_many(root: str, worker: int, count: int, queue) -> None:
    repo = ModelRepository(root)
    versions = [publish_fake(repo, payload=f"{worker}-{i}".encode()).manifest.version for i in range(count)]
    queue.put(versions)


def test_concurrent_publishers_never_clash(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_publish_many, args=(str(tmp_path), w, 6, queue)) for w in range(4)]
    for proc in workers:
        proc.start()
    results = [queue.get(timeout=60) for _ in workers]
    for proc in workers:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    versions = sorted(v for batch in results for v in batch)
    assert versions == list(range(1, 25))
    repo = ModelRepository(tmp_path)
    payloads = {load_bundle(repo.bundle_dir("m", v)).manifest.files[0].sha256 for v in versions}
    assert len(payloads) == 24, "every publisher's bundle must survive intact under its own version"
    assert not list((tmp_path / "m").glob(".staging-*"))


def test_bundle_module_imports_neither_torch_nor_onnx() -> None:
    code = (
        "import sys, clipserve.contract.bundle; "
        "bad = [m for m in ('torch', 'onnx', 'open_clip', 'onnxruntime') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
