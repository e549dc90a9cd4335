"""Offline teacher targets (MobileCLIP-style): run the teacher once over a dataset, store its image
embeddings for several augmented views (with each view's augmentation parameters) and its text
embeddings in shards; training then reads them back with no teacher in the loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clipserve.training.data import AugmentParams, DataError, PairDataset, sample_augment
from clipserve.training.models import Teacher
from clipserve.training.progress import progress_bar

MANIFEST = "targets.json"
CLASS_VECTORS = "class_vectors.pt"


def _view_params(index: int, view: int, seed: int, augment: bool) -> AugmentParams:
    """View 0 is always the whole image; the others are seeded random crops and flips."""
    if view == 0 or not augment:
        return AugmentParams()
    return sample_augment(seed, view, index)


@torch.no_grad()
def _encode_chunk(
    teacher: Teacher, dataset: PairDataset, positions: list[int], views: int, seed: int, augment: bool, device
) -> dict[str, torch.Tensor]:
    samples = [dataset[p] for p in positions]
    indices = [s.index for s in samples]
    params = torch.tensor(
        [[_view_params(i, v, seed, augment).as_list() for v in range(views)] for i in indices]
    )
    shard: dict[str, torch.Tensor] = {"indices": torch.tensor(indices), "params": params}
    for m, member in enumerate(teacher.members):
        cfg = open_clip.transform.PreprocessCfg(**member.preprocess_cfg)
        transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
        per_view = []
        for v in range(views):
            pixels = torch.stack(
                [
                    transform(AugmentParams.from_list(params[k, v].tolist()).apply(s.image))
                    for k, s in enumerate(samples)
                ]
            ).to(device)
            per_view.append(member.model.encode_image(pixels, normalize=True).float().cpu())
        shard[f"image_{m}"] = torch.stack(per_view, dim=1)
        tokens = member.tokenizer([s.caption for s in samples]).to(device)
        shard[f"text_{m}"] = member.model.encode_text(tokens, normalize=True).float().cpu()
    return shard


def store_targets(
    teacher: Teacher,
    dataset: PairDataset,
    out_dir: Path,
    data_spec: str,
    views: int = 4,
    augment: bool = True,
    seed: int = 0,
    shard_size: int = 2048,
    batch_size: int = 128,
    class_vectors: list[torch.Tensor] | None = None,
    class_names: list[str] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Write `targets-NNNNN.pt` shards and a `targets.json` manifest into `out_dir`."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.to(torch.device(device))
    shards = []
    bar = progress_bar(total=len(dataset), disable=not progress, desc="teacher targets", unit="img")
    for shard_no, start in enumerate(range(0, len(dataset), shard_size)):
        positions = list(range(start, min(start + shard_size, len(dataset))))
        chunks = []
        for i in range(0, len(positions), batch_size):
            batch = positions[i : i + batch_size]
            chunks.append(_encode_chunk(teacher, dataset, batch, views, seed, augment, device))
            bar.update(len(batch))
        shard = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
        name = f"targets-{shard_no:05d}.pt"
        torch.save(shard, out_dir / name)
        shards.append(name)
    bar.close()
    if class_vectors is not None:
        torch.save(class_vectors, out_dir / CLASS_VECTORS)
    manifest = {
        "data": data_spec,
        "samples": len(dataset),
        "views": views,
        "augment": augment,
        "seed": seed,
        "shards": shards,
        "class_names": class_names,
        "teachers": [
            {
                "architecture": m.architecture,
                "pretrained": m.pretrained,
                "checkpoint_sha256": m.checkpoint_sha256,
                "embed_dim": m.embed_dim,
                "logit_scale": float(m.model.logit_scale.exp()),
            }
            for m in teacher.members
        ],
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


@dataclass
class OfflineTargets:
    """Stored targets, held in memory and looked up by source index; implements data.TargetLookup."""

    manifest: dict[str, Any]
    rows: dict[int, int]
    tensors: dict[str, torch.Tensor]
    class_vectors: list[torch.Tensor] | None

    @classmethod
    def open(cls, directory: Path | str) -> OfflineTargets:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError as exc:
            raise DataError(f"{directory} holds no stored teacher targets ({MANIFEST} missing)") from exc
        shards = [torch.load(directory / name, weights_only=True) for name in manifest["shards"]]
        tensors = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
        rows = {int(i): row for row, i in enumerate(tensors["indices"].tolist())}
        vectors_path = directory / CLASS_VECTORS
        vectors = torch.load(vectors_path, weights_only=True) if vectors_path.is_file() else None
        return cls(manifest, rows, tensors, vectors)

    @property
    def embed_dims(self) -> list[int]:
        return [t["embed_dim"] for t in self.manifest["teachers"]]

    def check_covers(self, dataset: PairDataset) -> None:
        missing = [i for i in dataset.indices if i not in self.rows]
        if missing:
            raise DataError(
                f"stored targets (for {self.manifest['data']}, {self.manifest['samples']} samples) lack "
                f"{len(missing)} samples of this dataset, e.g. indices {missing[:5]}: recompute them for this data"
            )

    def choose(self, index: int, epoch: int) -> int:
        views = int(self.manifest["views"])
        return (
            0
            if views == 1
            else int(np.random.default_rng([self.manifest["seed"], epoch, index, 11]).integers(views))
        )

    def params(self, index: int, view: int) -> AugmentParams:
        return AugmentParams.from_list(self.tensors["params"][self.rows[index], view].tolist())

    def gather(self, indices: list[int], views: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.tensor([self.rows[i] for i in indices])
        picked = torch.tensor(views)
        out = {}
        for m, teacher in enumerate(self.manifest["teachers"]):
            out[f"image_{m}"] = self.tensors[f"image_{m}"][rows, picked]
            out[f"text_{m}"] = self.tensors[f"text_{m}"][rows]
            out[f"scale_{m}"] = torch.full((len(indices),), float(teacher["logit_scale"]))
        return out
