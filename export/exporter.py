"""Export an in-memory open_clip model to a verified, published model bundle.

`export_bundle` is the one entry point: the CLI calls it after loading a model, training calls it
to publish a student. Everything is written into a staging directory of the repository, checked
against the torch model, and only then published; on any failure nothing is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnx
import open_clip
import torch
from open_clip import tokenizer as open_clip_tokenizer
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg
from open_clip.utils import to_2tuple
from pydantic import ValidationError
from timm.utils import reparameterize_model
from torch import nn

from clipserve.contract.bundle import (
    Bundle,
    BundleFile,
    ImagePreprocess,
    Manifest,
    ModelRepository,
    ModelSource,
    ParityReport,
    Precision,
    Staging,
    TextGraph,
    TokenizerSpec,
    Tower,
    VersionExistsError,
    validate_name,
)
from clipserve.contract.scoring import Scoring
from clipserve.contract.tokenizer import VOCAB_FILENAME, load_tokenizer
from clipserve.export.errors import ExportError, ParityError, SourceError
from clipserve.export.fusion import TRANSLATIONS, fused_attention, graph_fusions, optimize_fused
from clipserve.export.logs import quiet_logs
from clipserve.export.quantize import convert_fp16, quantize_int8
from clipserve.export.sources import check_tokenizer_vocab, hf_tokenizer_name, load_hf_tokenizer
from clipserve.export.tensorrt import build_engines, require_tensorrt, run_engine
from clipserve.export.towers import (
    CLIP_BPE_VOCAB_SIZE,
    ImageTower,
    TextTowerPlan,
    plan_text_tower,
    text_vocab_size,
)
from clipserve.export.verify import (
    TOKENIZER_CHECK_TEXTS,
    cosine_threshold,
    fixed_images,
    fixed_token_ids,
    image_outputs,
    make_session,
    providers_for,
    report,
    runtime_name,
    text_outputs,
    token_counts,
    torch_embeddings,
)

ONNX_OPSET = 18
# An example batch of 1 lets the exporter specialize the batch axis to 1.
EXAMPLE_BATCH = 2
MAX_BATCH = 4096
VOCAB_SOURCE = Path(open_clip.__file__).parent / VOCAB_FILENAME
HF_TOKENIZER_FILE = "tokenizer.json"
IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"


class Progress:
    """One line per step on stderr, with the time it took."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        print(f"  {what} ...", end="", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    # The fused fast path of nn.MultiheadAttention is not exportable; the plain path computes the same.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_graph(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str | Sequence[str],
    dynamic_axes: Mapping[int, torch.export.Dim],
) -> None:
    """torch.export-based ONNX export (the legacy tracer bakes the sequence length into reshapes).
    Several output names: a module returning a tuple (a task model's probabilities)."""
    with _mha_fastpath_disabled(), torch.no_grad(), quiet_logs():
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name] if isinstance(output_name, str) else list(output_name),
                dynamo=True,
                dynamic_shapes={input_name: dict(dynamic_axes)},
                opset_version=ONNX_OPSET,
                external_data=False,
                optimize=True,
                verbose=False,
                custom_translation_table=TRANSLATIONS,
            )
        except Exception as exc:
            raise ExportError(f"ONNX export of {path.name} failed: {type(exc).__name__}: {exc}") from exc


def dynamic_input_axes(path: Path, input_name: str) -> set[int]:
    """Axes of an input that the saved graph leaves symbolic."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            return {axis for axis, dim in enumerate(dims) if dim.dim_param or not dim.HasField("dim_value")}
    raise ExportError(f"{path.name} has no input named {input_name!r}")


def export_image_graph(tower: nn.Module, images: np.ndarray, path: Path, fuse: bool = True) -> None:
    """The image tower as a bundle holds it: any batch size; with `fuse`, attention, LayerNorm and
    GELU as ONNX Runtime's fused ops (see clipserve.export.fusion)."""
    example = torch.from_numpy(images[:EXAMPLE_BATCH])
    axes = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    # Only the image encoder's layers: the tower holds the whole model.
    encoder = getattr(getattr(tower, "model", None), "visual", tower)
    with fused_attention(encoder) if fuse else contextlib.nullcontext():
        export_graph(tower, example, path, IMAGE_INPUT, IMAGE_OUTPUT, axes)
    if fuse:
        optimize_fused(path)


def export_text_graph(plan: TextTowerPlan, token_ids: np.ndarray, path: Path, fuse: bool = True) -> bool:
    """The text tower as a bundle holds it; True when the saved graph takes any length up to the
    context (the service then pads a batch only to its longest text)."""
    ids = token_ids[:EXAMPLE_BATCH]
    axes = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if plan.length_free:
        ids = ids[:, : max(3, int(token_counts(ids).max()))]
        axes[1] = torch.export.Dim("sequence", min=2, max=plan.context_length)
    example = torch.from_numpy(np.ascontiguousarray(ids))
    with fused_attention(plan.module, plan.causal_mask) if fuse else contextlib.nullcontext():
        export_graph(plan.module, example, path, TEXT_INPUT, TEXT_OUTPUT, axes)
    if fuse:
        optimize_fused(path)
    return plan.length_free and 1 in dynamic_input_axes(path, TEXT_INPUT)


@dataclass(frozen=True)
class TowerGraphs:
    image: Path
    text: Path
    text_length_free: bool


def export_tower_graphs(
    model: nn.Module,
    folder: Path,
    preprocess: ImagePreprocess | None = None,
    tokenizer: TokenizerCall | None = None,
    fuse: bool = True,
) -> TowerGraphs:
    """The fp32 image.onnx and text.onnx that a bundle of `model` would hold, written to `folder`
    without checks or a manifest: for measuring the served graphs (`clip-distill eval`). `tokenizer`:
    the model's open_clip tokenizer when it is not CLIP BPE; `fuse`: with ONNX Runtime's fused ops."""
    was_training = model.training
    folder = Path(folder)
    try:
        exported = cpu_float32(model.eval())
        preprocess = preprocess or preprocess_from_model(exported)
        deployed = inference_copy(exported)
        plan = plan_text_tower(deployed, getattr(tokenizer, "context_length", None))
        images = fixed_images(*preprocess.size)
        export_image_graph(ImageTower(deployed).eval(), images, folder / "image.onnx", fuse)
        ids = fixed_token_ids(plan.context_length, tokenizer=tokenizer)
        length_free = export_text_graph(plan, ids, folder / "text.onnx", fuse)
    finally:
        model.train(was_training)
    return TowerGraphs(folder / "image.onnx", folder / "text.onnx", length_free)


def preprocess_from_model(model: nn.Module) -> ImagePreprocess:
    """The image preprocessing the model was built with (open_clip keeps it on model.visual); what it
    leaves out (interpolation, resize mode, fill) takes open_clip's own defaults."""
    config = dict(open_clip.get_model_preprocess_cfg(model))
    missing = [key for key in ("size", "mean", "std") if key not in config]
    if missing:
        raise ExportError(
            f"the model carries no image preprocess {', '.join(missing)} (models built by open_clip.create_model "
            "do); pass preprocess= to export_bundle"
        )
    known = {field.name for field in fields(PreprocessCfg)}
    resolved = PreprocessCfg(**{key: value for key, value in config.items() if key in known})
    try:
        return ImagePreprocess(
            size=to_2tuple(resolved.size),
            mean=tuple(resolved.mean),
            std=tuple(resolved.std),
            interpolation=resolved.interpolation,
            resize_mode=resolved.resize_mode,
            fill_color=resolved.fill_color,
        )
    except ValidationError as exc:
        raise ExportError(f"unsupported image preprocess config {config}: {exc}") from exc


TokenizerCall = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class BundleTokenizer:
    """The tokenizer a bundle carries: its manifest entry, the file to write, and open_clip's own
    tokenizer of the model (what the parity ids and the tokenizer check are made with)."""

    spec: TokenizerSpec
    reference: TokenizerCall
    write: Callable[[Path], None]
    origin: str | None = None

    @property
    def file(self) -> str:
        return self.spec.vocab_file


def _clip_bpe_tokenizer(context_length: int, source: ModelSource) -> BundleTokenizer:
    clean = (source.config or {}).get("text_cfg", {}).get("tokenizer_kwargs", {}).get("clean", "lower")
    bpe = SimpleTokenizer(context_length=context_length, clean=clean)
    spec = TokenizerSpec(
        context_length=context_length,
        vocab_file=VOCAB_SOURCE.name,
        lowercase=clean != "whitespace",
        clean=clean,
        sot_token_id=bpe.sot_token_id,
        eot_token_id=bpe.eot_token_id,
    )
    return BundleTokenizer(
        spec, bpe, lambda folder: shutil.copyfile(VOCAB_SOURCE, folder / VOCAB_SOURCE.name)
    )


_CLEAN_MODES = {
    open_clip_tokenizer._clean_lower: "lower",
    open_clip_tokenizer._clean_whitespace: "whitespace",
    open_clip_tokenizer._clean_canonicalize: "canonicalize",
}


def hf_tokenizer_spec(hf: HFTokenizer) -> TokenizerSpec:
    """The manifest entry reproducing an open_clip HFTokenizer with the `tokenizers` library."""
    if getattr(hf, "tokenizer_mode", "") not in ("", None):
        raise ExportError(
            f"open_clip tokenizer mode {hf.tokenizer_mode!r} is not supported by clipserve bundles"
        )
    clean = _CLEAN_MODES.get(hf.clean_fn)
    if clean is None:
        raise ExportError(f"the tokenizer's cleaning function {hf.clean_fn!r} is not one of open_clip's")
    inner = hf.tokenizer
    if getattr(inner, "backend_tokenizer", None) is None:
        raise ExportError(
            f"the tokenizer {type(inner).__name__} has no Hugging Face fast (tokenizers) backend to save as "
            "tokenizer.json"
        )
    if inner.pad_token_id is None:
        raise ExportError("the tokenizer has no pad token, so it cannot pad to the context length")
    strip = inner.sep_token_id if hf.strip_sep_token else None
    return TokenizerSpec(
        kind="hf",
        context_length=int(hf.context_length),
        vocab_file=HF_TOKENIZER_FILE,
        lowercase=clean != "whitespace",
        clean=clean,
        pad_token_id=int(inner.pad_token_id),
        padding="max_length",
        padding_side=inner.padding_side,
        truncation_side=inner.truncation_side,
        vocab_size=len(inner),
        strip_sep_token_id=strip,
    )


def _write_tokenizer_json(hf: HFTokenizer, folder: Path) -> None:
    # The backend as transformers runs it, without the truncation and padding left from its last
    # call: the manifest says how to truncate and pad.
    document = json.loads(hf.tokenizer.backend_tokenizer.to_str())
    document["truncation"] = None
    document["padding"] = None
    (folder / HF_TOKENIZER_FILE).write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")


def _hf_bundle_tokenizer(hf: HFTokenizer, origin: str | None) -> BundleTokenizer:
    return BundleTokenizer(
        hf_tokenizer_spec(hf), hf, lambda folder: _write_tokenizer_json(hf, folder), origin
    )


def bundle_tokenizer(
    model: nn.Module, source: ModelSource, tokenizer: str | Path | HFTokenizer | None = None
) -> BundleTokenizer:
    """The model's tokenizer for its bundle: CLIP BPE, or the Hugging Face tokenizer its config names
    (or `tokenizer`: an open_clip HFTokenizer, a folder or a hub name), checked against the text
    tower's vocabulary."""
    config = source.config or {}
    vocab = text_vocab_size(model)
    try:
        if isinstance(tokenizer, HFTokenizer):
            hf, origin = tokenizer, getattr(tokenizer.tokenizer, "name_or_path", None)
        else:
            hf = load_hf_tokenizer(source.architecture, config, tokenizer)
            origin = str(tokenizer or hf_tokenizer_name(config)) if hf is not None else None
        if hf is not None:
            check_tokenizer_vocab(source.architecture, hf, vocab, origin or "given")
    except SourceError as exc:
        raise ExportError(str(exc)) from exc
    if hf is not None:
        return _hf_bundle_tokenizer(hf, origin)
    if vocab != CLIP_BPE_VOCAB_SIZE:
        raise ExportError(
            f"{source.architecture}'s text tower has a vocabulary of {vocab} tokens, not CLIP-BPE's "
            f"{CLIP_BPE_VOCAB_SIZE}, and its config names no Hugging Face tokenizer: pass the tokenizer "
            "(clip-export --tokenizer DIR_OR_HUB_NAME)"
        )
    return _clip_bpe_tokenizer(plan_text_tower(model).context_length, source)


def check_tokenizer(
    tokenizer: BundleTokenizer, folder: Path, texts: tuple[str, ...] = TOKENIZER_CHECK_TEXTS
) -> None:
    """The bundle's tokenizer, as the service loads it from `folder`, gives open_clip's ids exactly."""
    served = load_tokenizer(tokenizer.spec, folder).encode(list(texts)).ids
    expected = tokenizer.reference(list(texts)).numpy().astype(np.int64)
    if served.shape != expected.shape:
        raise ExportError(
            f"the bundle's tokenizer gives ids of shape {served.shape}, open_clip's {expected.shape}"
        )
    for text, ours, theirs in zip(texts, served, expected, strict=True):
        if not np.array_equal(ours, theirs):
            at = int(np.flatnonzero(ours != theirs)[0])
            raise ExportError(
                f"the bundle's {tokenizer.file} tokenizes {text[:60]!r} differently from open_clip's tokenizer "
                f"(first at position {at}: {int(ours[at])} vs {int(theirs[at])}); nothing was published"
            )


def _scalar(parameter: torch.Tensor | None) -> float | None:
    if parameter is None:
        return None
    return float(parameter.detach().float().reshape(-1)[0])


def model_scoring(model: nn.Module) -> Scoring:
    """How the model's similarities become zero-shot scores: what its manifest records, and what
    training's evaluation applies to the torch model."""
    scale = _scalar(getattr(model, "logit_scale", None))
    if scale is None:
        raise ExportError(f"a {type(model).__name__} has no logit_scale: cannot tell how it scores labels")
    bias = _scalar(getattr(model, "logit_bias", None))
    # SigLIP-trained models carry a logit_bias: each label's sigmoid(scale * cos + bias) on its own
    if bias is not None:
        return Scoring("sigmoid", float(np.exp(scale)), bias)
    return Scoring("softmax", float(np.exp(scale)))


def inference_copy(model: nn.Module) -> nn.Module:
    """The model with re-parameterizable blocks (MobileCLIP, FastViT, RepVGG) fused for inference."""
    fusable = any(
        hasattr(module, "reparameterize") or hasattr(module, "switch_to_deploy") for module in model.modules()
    )
    return reparameterize_model(model).eval() if fusable else model


@dataclass
class _Towers:
    image: nn.Module
    text: TextTowerPlan
    images: np.ndarray
    token_ids: np.ndarray
    image_reference: np.ndarray
    text_reference: np.ndarray


class _BundleWriter:
    """Writes and checks the files of one bundle inside a staging directory."""

    def __init__(
        self,
        staging: Staging,
        towers: _Towers,
        thresholds: Mapping[str, float],
        progress: Progress,
        fuse: bool,
        scratch: Path,
    ):
        self.staging = staging
        self.towers = towers
        self.thresholds = thresholds
        self.progress = progress
        self.fuse = fuse
        # Unfused fp32 graphs, for the fp16 graphs and TensorRT engines (GPU runtimes that are given
        # standard ONNX ops): the bundle's own graphs when they are not fused.
        self.scratch = scratch
        self._plain: Path | None = None
        self.files: list[BundleFile] = []
        self.parity: list[ParityReport] = []
        self.length_free = False

    def describe_graph(self, file: str, tower: Tower, precision: Precision) -> BundleFile:
        return self.staging.describe(file, tower, precision, fusions=graph_fusions(self.staging.path / file))

    def _export_towers(self, folder: Path, fuse: bool) -> bool:
        towers = self.towers
        fused = " with fused attention, LayerNorm and GELU" if fuse else ""
        with self.progress.step(f"exporting image tower to image.onnx{fused}"):
            export_image_graph(towers.image, towers.images, folder / "image.onnx", fuse)
        with self.progress.step(f"exporting text tower to text.onnx{fused}"):
            return export_text_graph(towers.text, towers.token_ids, folder / "text.onnx", fuse)

    def export_fp32(self) -> None:
        if self.fuse:
            try:
                self.length_free = self._export_towers(self.staging.path, fuse=True)
                return
            except ExportError as exc:
                self._note(f"fused export failed ({exc}): exporting unfused")
                self.fuse = False
        self.length_free = self._export_towers(self.staging.path, fuse=False)

    def _note(self, message: str) -> None:
        if self.progress.enabled:
            print(f"  {message}", file=sys.stderr, flush=True)

    def verify_fp32(self) -> None:
        """The fp32 graphs checked against the torch model; fused graphs that miss the threshold are
        exported again unfused (and then checked, and refused, as before)."""
        if self.fuse:
            with self.progress.step("checking fp32 parity of the fused graphs with the torch model"):
                reports = [self._image_report("fp32", "image.onnx"), self._text_report("fp32", "text.onnx")]
            if all(r.passed for r in reports):
                self.parity += reports
                self._describe_fp32()
                return
            worst = min(r.min_cosine for r in reports)
            self._note(f"fused graphs reach min cosine {worst:.6f} only: exporting them unfused")
            self.fuse = False
            self.export_fp32()
        self.verify("fp32", "image.onnx", "text.onnx")
        self._describe_fp32()

    def _describe_fp32(self) -> None:
        self.files += [self.describe_graph("image.onnx", "image", "fp32")]
        self.files += [self.describe_graph("text.onnx", "text", "fp32")]

    def plain_graphs(self) -> Path:
        """The folder holding unfused image.onnx and text.onnx (exported on first use)."""
        if not self.fuse:
            return self.staging.path
        if self._plain is None:
            self._export_towers(self.scratch, fuse=False)
            self._plain = self.scratch
        return self._plain

    def write_tokenizer(self, tokenizer: BundleTokenizer) -> None:
        with self.progress.step(f"writing {tokenizer.file} and checking it against open_clip's tokenizer"):
            tokenizer.write(self.staging.path)
            check_tokenizer(tokenizer, self.staging.path)
        self.files.append(self.staging.describe(tokenizer.file, "tokenizer"))

    def verify(self, precision: Precision, image_file: str, text_file: str) -> None:
        with self.progress.step(f"checking {precision} parity with the torch model"):
            reports = [self._image_report(precision, image_file), self._text_report(precision, text_file)]
        self.parity += reports
        self._refuse_failed(reports, precision)

    @staticmethod
    def _refuse_failed(reports: list[ParityReport], what: str) -> None:
        failed = [r for r in reports if not r.passed]
        if failed:
            details = "; ".join(
                f"{r.file}: min cosine {r.min_cosine:.6f} < {r.threshold} (max abs diff {r.max_abs_diff:.2e})"
                for r in failed
            )
            raise ParityError(f"exported {what} graphs disagree with the torch model: {details}")

    def _image_report(self, precision: Precision, file: str) -> ParityReport:
        towers = self.towers
        session = make_session(self.staging.path / file, providers_for(precision))
        actual = image_outputs(session, towers.images)
        return report(
            "image",
            precision,
            file,
            towers.image_reference,
            actual,
            len(towers.images),
            self.thresholds[precision],
            runtime_name(session),
        )

    def _text_report(self, precision: Precision, file: str) -> ParityReport:
        towers = self.towers
        session = make_session(self.staging.path / file, providers_for(precision))
        actual = text_outputs(session, towers.token_ids, self.length_free)
        return report(
            "text",
            precision,
            file,
            towers.text_reference,
            actual,
            len(towers.token_ids),
            self.thresholds[precision],
            runtime_name(session),
        )

    def add_int8(self) -> None:
        with self.progress.step("quantizing MatMul/Gemm to int8"):
            for tower in ("image", "text"):
                quantize_int8(self.staging.path / f"{tower}.onnx", self.staging.path / f"{tower}.int8.onnx")
        self.files += [
            self.describe_graph(f"{tower}.int8.onnx", tower, "int8") for tower in ("image", "text")
        ]
        self.verify("int8", "image.int8.onnx", "text.int8.onnx")

    def add_fp16(self) -> None:
        plain = self.plain_graphs()
        with self.progress.step("converting to fp16"):
            for tower in ("image", "text"):
                convert_fp16(plain / f"{tower}.onnx", self.staging.path / f"{tower}.fp16.onnx")
        self.files += [
            self.describe_graph(f"{tower}.fp16.onnx", tower, "fp16") for tower in ("image", "text")
        ]
        self.verify("fp16", "image.fp16.onnx", "text.fp16.onnx")

    def add_tensorrt(self, timing_cache_dir: Path | None = None) -> None:
        with self.progress.step("building TensorRT fp16 engines (timing cache reused)"):
            engines = build_engines(
                self.staging.path,
                self.towers.images.shape[2:],
                self.towers.text.context_length,
                self.length_free,
                timing_cache_dir,
                fp32_dir=self.plain_graphs(),
            )
        for engine in engines:
            self.files.append(
                self.staging.describe(
                    engine.path,
                    "engine",
                    "fp16",
                    tower=engine.tower,
                    gpu=engine.gpu,
                    tensorrt_version=engine.tensorrt_version,
                )
            )
        with self.progress.step("checking TensorRT parity with the torch model"):
            for engine in engines:
                self.parity.append(self._engine_report(engine.tower, engine.path))
        self._refuse_failed([r for r in self.parity if r.file in {e.path for e in engines}], "TensorRT")

    def _engine_report(self, tower: Tower, file: str) -> ParityReport:
        towers = self.towers
        path = self.staging.path / file
        if tower == "image":
            actual, reference, inputs = run_engine(path, towers.images), towers.image_reference, towers.images
        else:
            ids = (
                towers.token_ids[:, : int(token_counts(towers.token_ids).max())]
                if self.length_free
                else towers.token_ids
            )
            actual, reference, inputs = run_engine(path, ids), towers.text_reference, towers.token_ids
        return report(
            tower, "fp16", file, reference, actual, len(inputs), self.thresholds["fp16"], "tensorrt"
        )


def _prepare_towers(model: nn.Module, preprocess: ImagePreprocess, tokenizer: BundleTokenizer) -> _Towers:
    context = tokenizer.spec.context_length
    reference_image, reference_text = ImageTower(model).eval(), plan_text_tower(model, context)
    deployed = inference_copy(model)
    text_plan = plan_text_tower(deployed, context) if deployed is not model else reference_text
    images = fixed_images(*preprocess.size)
    token_ids = fixed_token_ids(text_plan.context_length, tokenizer=tokenizer.reference)
    return _Towers(
        image=ImageTower(deployed).eval(),
        text=text_plan,
        images=images,
        token_ids=token_ids,
        image_reference=torch_embeddings(reference_image, images),
        text_reference=torch_embeddings(reference_text.module.eval(), token_ids),
    )


def check_can_publish(
    repository: ModelRepository, name: str, version: int | None = None, tensorrt: bool = False
) -> None:
    """Refuse early, before loading or exporting anything, what publishing would refuse at the end."""
    validate_name(name)
    if tensorrt:
        require_tensorrt()
    repository.check_writable()
    if version is not None and version in repository.versions(name):
        raise VersionExistsError(
            f"{name} version {version} already exists in {repository.root}; "
            "versions are immutable: pick another version or leave it out"
        )


def export_bundle(
    model: nn.Module,
    repo: ModelRepository | Path | str,
    name: str,
    *,
    source: ModelSource,
    preprocess: ImagePreprocess | None = None,
    int8: bool = False,
    fp16: bool = False,
    tensorrt: bool = False,
    min_cosine: float | Mapping[str, float] | None = None,
    version: int | None = None,
    progress: bool = True,
    tokenizer: str | Path | HFTokenizer | None = None,
    timing_cache_dir: Path | None = None,
    fuse: bool = True,
) -> Bundle:
    """Export both towers of `model`, verify them against it, and publish the bundle as `name`.

    `fuse`: the CPU graphs (fp32, int8) carry ONNX Runtime's fused attention, LayerNorm and GELU
    (clipserve.export.fusion; the manifest lists them per file); graphs that would miss the fp32
    threshold fused are exported unfused. fp16 graphs and TensorRT engines are always made unfused.

    `min_cosine`: a float sets the fp32 parity threshold; a mapping {"fp32"|"int8"|"fp16": value}
    sets any of them. Below its threshold, a graph is refused and nothing is published.
    `tokenizer`: for a model with a Hugging Face tokenizer, where it comes from (an open_clip
    HFTokenizer, a folder or a hub name); by default the one `source.config` names.
    `timing_cache_dir`: with `tensorrt`, where TensorRT's layer timing cache is kept between builds;
    None: the user cache folder.
    """
    repository = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    check_can_publish(repository, name, version, tensorrt)
    was_training = model.training
    try:
        return _export(
            cpu_float32(model.eval()),
            repository,
            name,
            source,
            preprocess,
            int8,
            fp16,
            tensorrt,
            min_cosine,
            version,
            Progress(progress),
            tokenizer,
            timing_cache_dir,
            fuse,
        )
    finally:
        model.train(was_training)


def cpu_float32(model: nn.Module) -> nn.Module:
    """The model itself when it already lives on the CPU in fp32; otherwise a CPU fp32 copy (a student
    published from the GPU at the end of training keeps its place there)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors
    ):
        return model
    return copy.deepcopy(model).cpu().float().eval()


def _export(
    model: nn.Module,
    repository: ModelRepository,
    name: str,
    source: ModelSource,
    preprocess: ImagePreprocess | None,
    int8: bool,
    fp16: bool,
    tensorrt: bool,
    min_cosine: float | Mapping[str, float] | None,
    version: int | None,
    steps: Progress,
    tokenizer_given: str | Path | HFTokenizer | None,
    timing_cache_dir: Path | None,
    fuse: bool = True,
) -> Bundle:
    preprocess = preprocess or preprocess_from_model(model)
    if source.open_clip_version is None:
        source = source.model_copy(update={"open_clip_version": open_clip.__version__})
    tokenizer = bundle_tokenizer(model, source, tokenizer_given)
    if tokenizer.origin and source.tokenizer is None:
        source = source.model_copy(update={"tokenizer": tokenizer.origin})
    with steps.step("preparing towers and reference outputs"):
        towers = _prepare_towers(model, preprocess, tokenizer)
    scoring = model_scoring(model)
    thresholds = {p: cosine_threshold(p, min_cosine) for p in ("fp32", "int8", "fp16")}
    with (
        repository.stage(name) as staging,
        tempfile.TemporaryDirectory(prefix="clipserve-plain-") as scratch,
    ):
        writer = _BundleWriter(staging, towers, thresholds, steps, fuse, Path(scratch))
        writer.export_fp32()
        writer.write_tokenizer(tokenizer)
        writer.verify_fp32()
        if int8:
            writer.add_int8()
        if fp16:
            writer.add_fp16()
        if tensorrt:
            writer.add_tensorrt(timing_cache_dir)
        manifest = Manifest(
            name=name,
            embed_dim=int(towers.image_reference.shape[1]),
            logit_scale=scoring.logit_scale,
            logit_bias=scoring.logit_bias if scoring.kind == "sigmoid" else None,
            scoring=scoring.kind,
            image=preprocess,
            tokenizer=tokenizer.spec,
            text=TextGraph(dynamic_length=writer.length_free, pooling=towers.text.pooling),
            files=writer.files,
            source=source,
            parity=writer.parity,
        )
        with steps.step("publishing"):
            return staging.publish(manifest, version=version)
