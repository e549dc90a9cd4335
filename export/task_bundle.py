"""Export a task model, an image graph that ends in class probabilities over a fixed label set, as a
verified, published bundle (manifest format 3, `Manifest.task`).

The model is any module mapping pixel_values [B,3,H,W] to the tuple of TASK_OUTPUTS, each [B, labels]
(training/task.py's `TaskStudent`). The graph is exported, checked and quantized with the same
pieces as an embedding bundle (`exporter.export_graph`, `verify`, `quantize`), written into a
staging directory of the repository and published only when every graph agrees with the torch model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from clipserve.contract.bundle import (
    TASK_FORMAT_VERSION,
    TASK_OUTPUTS,
    Bundle,
    ImagePreprocess,
    Manifest,
    ModelRepository,
    ModelSource,
    ParityReport,
    Precision,
    Staging,
    TaskSpec,
)
from clipserve.export.errors import ParityError
from clipserve.export.exporter import (
    EXAMPLE_BATCH,
    IMAGE_INPUT,
    MAX_BATCH,
    Progress,
    check_can_publish,
    cpu_float32,
    export_graph,
    inference_copy,
)
from clipserve.export.quantize import quantize_int8
from clipserve.export.verify import cosine_threshold, fixed_images, make_session, report, runtime_name


def task_outputs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The torch model's outputs side by side: [B, len(TASK_OUTPUTS) * labels]."""
    with torch.inference_mode():
        outputs = model(torch.from_numpy(images))
    return np.concatenate([output.float().numpy() for output in outputs], axis=1)


def onnx_task_outputs(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """An exported task graph's outputs on `images`, side by side as `task_outputs` gives them."""
    outputs = session.run(list(TASK_OUTPUTS), {IMAGE_INPUT: images})
    return np.concatenate([np.asarray(output, dtype=np.float32) for output in outputs], axis=1)


def _parity(
    staging: Staging,
    file: str,
    precision: Precision,
    images: np.ndarray,
    reference: np.ndarray,
    threshold: float,
) -> ParityReport:
    session = make_session(staging.path / file)
    actual = onnx_task_outputs(session, images)
    return report("image", precision, file, reference, actual, len(images), threshold, runtime_name(session))


def _refuse_failed(parity: ParityReport) -> None:
    if not parity.passed:
        raise ParityError(
            f"exported task graph {parity.file} disagrees with the torch model: min cosine "
            f"{parity.min_cosine:.6f} < {parity.threshold} (max abs diff {parity.max_abs_diff:.2e})"
        )


def export_task_bundle(
    model: nn.Module,
    repo: ModelRepository | Path | str,
    name: str,
    *,
    task: TaskSpec,
    source: ModelSource,
    preprocess: ImagePreprocess,
    embed_dim: int,
    logit_scale: float,
    int8: bool = True,
    images: np.ndarray | None = None,
    min_cosine: float | Mapping[str, float] | None = None,
    version: int | None = None,
    progress: bool = True,
) -> Bundle:
    """Export `model` (pixels -> TASK_OUTPUTS), check it against the torch model on fixed images and
    on `images` (preprocessed pixels of the task's own images, if given), add the int8 graph, and
    publish it as `name`. `embed_dim`: the student's image embedding width; `logit_scale`: the
    teacher's, at which the KD head learned its targets."""
    repository = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    check_can_publish(repository, name, version)
    steps = Progress(progress)
    given, was_training = model, model.training
    try:
        model = cpu_float32(given.eval())
        deployed = inference_copy(model)
        probe = fixed_images(*preprocess.size)
        if images is not None and len(images):
            probe = np.ascontiguousarray(np.concatenate([probe, images.astype(np.float32)]))
        with steps.step("computing the torch model's reference probabilities"):
            reference = task_outputs(model, probe)
        with repository.stage(name) as staging:
            with steps.step("exporting the task graph to image.onnx"):
                export_graph(
                    deployed,
                    torch.from_numpy(probe[:EXAMPLE_BATCH]),
                    staging.path / "image.onnx",
                    IMAGE_INPUT,
                    TASK_OUTPUTS,
                    {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},
                )
            files = [staging.describe("image.onnx", "image", "fp32")]
            parity = []
            with steps.step("checking fp32 parity with the torch model"):
                parity.append(
                    _parity(
                        staging, "image.onnx", "fp32", probe, reference, cosine_threshold("fp32", min_cosine)
                    )
                )
            _refuse_failed(parity[-1])
            if int8:
                with steps.step("quantizing MatMul/Gemm to int8"):
                    quantize_int8(staging.path / "image.onnx", staging.path / "image.int8.onnx")
                files.append(staging.describe("image.int8.onnx", "image", "int8"))
                with steps.step("checking int8 parity with the torch model"):
                    parity.append(
                        _parity(
                            staging,
                            "image.int8.onnx",
                            "int8",
                            probe,
                            reference,
                            cosine_threshold("int8", min_cosine),
                        )
                    )
                _refuse_failed(parity[-1])
            manifest = Manifest(
                format_version=TASK_FORMAT_VERSION,
                name=name,
                embed_dim=embed_dim,
                logit_scale=logit_scale,
                scoring="softmax",
                image=preprocess,
                files=files,
                source=source,
                parity=parity,
                task=task,
            )
            with steps.step("publishing"):
                return staging.publish(manifest, version=version)
    finally:
        given.train(was_training)
