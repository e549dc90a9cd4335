"""The training loop on tiny models: learning, exact resume, checkpoints, distillation with a live or
stored teacher, weight inheritance, and the errors a user can run into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipserve.training.data import build_dataset
from clipserve.training.losses import LossConfigError, LossWeights
from clipserve.training.models import ModelSpecError, inherit_weights, load_clip, load_teacher
from clipserve.training.objective import Distiller, LossSettings
from clipserve.training.targets import OfflineTargets, store_targets
from clipserve.training.train import CheckpointError, TrainConfig, load_checkpoint, train
from tests.fixtures.training import TINY_DATA

pytestmark = pytest.mark.usefixtures("torch_one_thread")
QUIET = {"log": lambda _: None}


def _config(**overrides) -> TrainConfig:
    values = {"steps": 6, "batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "progress": False}
    return TrainConfig(**{**values, **overrides})


def _dataset(spec: str = TINY_DATA):
    return build_dataset(spec, log=lambda _: None)


def test_a_few_steps_reduce_the_loss(tiny_student_config: Path, tmp_path: Path) -> None:
    student = load_clip(str(tiny_student_config))
    result = train(
        student,
        _dataset("synthetic:shapes?size=16&image_size=32"),
        tmp_path / "run",
        _config(steps=30, batch_size=16, lr=3e-3, warmup_steps=3),
        LossSettings(),
        **QUIET,
    )
    assert len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    reloaded = load_clip(str(tmp_path / "run"))
    for key, value in student.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value)
    assert reloaded.checkpoint_sha256 == result.checkpoint_sha256


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(
    tiny_student_config: Path, tmp_path: Path
) -> None:
    dataset = _dataset()
    config = _config(steps=8, checkpoint_every=2)
    straight = train(
        load_clip(str(tiny_student_config)), dataset, tmp_path / "a", config, LossSettings(), **QUIET
    )

    first = train(
        load_clip(str(tiny_student_config)),
        dataset,
        tmp_path / "b",
        _config(steps=8, stop_at=5),
        LossSettings(),
        **QUIET,
    )
    assert len(first.losses) == 5 and not (tmp_path / "b" / "final").exists()
    # a fresh process would rebuild the student with a different init: the checkpoint must win
    resumed = train(
        load_clip(str(tiny_student_config), seed=99),
        dataset,
        tmp_path / "b",
        config,
        LossSettings(),
        resume="auto",
        **QUIET,
    )
    assert len(resumed.losses) == 3
    assert first.losses + resumed.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    assert resumed.run_id == first.run_id
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_from_an_incompatible_checkpoint_is_refused(
    tiny_student_config: Path, tiny_teacher_config: Path, tmp_path: Path
) -> None:
    dataset = _dataset()
    train(
        load_clip(str(tiny_student_config)),
        dataset,
        tmp_path / "a",
        _config(steps=2),
        LossSettings(),
        **QUIET,
    )
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000002.pt"
    assert checkpoint.is_file()
    with pytest.raises(CheckpointError, match="does not match this run: model_cfg"):
        train(
            load_clip(str(tiny_teacher_config)),
            dataset,
            tmp_path / "c",
            _config(steps=2),
            LossSettings(),
            resume=checkpoint,
            **QUIET,
        )
    with pytest.raises(CheckpointError, match="batch_size: checkpoint 8 vs now 16"):
        train(
            load_clip(str(tiny_student_config)),
            dataset,
            tmp_path / "c",
            _config(steps=2, batch_size=16),
            LossSettings(),
            resume=checkpoint,
            **QUIET,
        )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train(
            load_clip(str(tiny_student_config)),
            dataset,
            tmp_path / "c",
            _config(steps=2),
            LossSettings(),
            resume=tmp_path / "junk.pt",
            **QUIET,
        )


def test_resume_reads_tensors_and_plain_values_only_and_never_runs_code(tmp_path: Path) -> None:
    """A checkpoint is read with torch.load(weights_only=True): one that would run code when
    unpickled is refused before anything of it runs."""
    ran = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self) -> tuple:
            return (Path.touch, (ran,))

    torch.save({"fingerprint": {}, "step": 1, "payload": RunsCode()}, tmp_path / "hostile.pt")
    with pytest.raises(CheckpointError, match="holds more than tensors and plain values"):
        load_checkpoint(tmp_path / "hostile.pt", {})
    assert not ran.exists()


def test_distillation_with_every_loss_leaves_the_teacher_untouched(
    tiny_student_config: Path, tiny_teacher_run: Path, tmp_path: Path
) -> None:
    teacher = load_teacher([str(tiny_teacher_run)])
    before = {k: v.clone() for k, v in teacher.members[0].model.state_dict().items()}
    dataset = _dataset()
    classes = dataset.classes
    vectors = teacher.class_vectors(classes, ["a {}."], torch.device("cpu"))
    settings = LossSettings(
        weights=LossWeights.parse("clip,logit_kd,feature,icl,class_kd"),
        feature_kind="cosine",
        label_head=True,
    )
    result = train(
        load_clip(str(tiny_student_config)),
        dataset,
        tmp_path / "kd",
        _config(steps=3),
        settings,
        teacher=teacher,
        class_vectors=vectors,
        **QUIET,
    )
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["parts"]) == {"clip", "logit_kd", "feature", "icl", "class_kd"}
    assert all(torch.isfinite(torch.tensor(result.losses)))
    for key, value in teacher.members[0].model.state_dict().items():
        assert torch.equal(before[key], value), key


def test_stored_teacher_targets_train_exactly_like_the_live_teacher(
    tiny_student_config: Path, tiny_teacher_run: Path, tmp_path: Path
) -> None:
    teacher = load_teacher([str(tiny_teacher_run)])
    dataset = _dataset()
    settings = LossSettings(weights=LossWeights.parse("clip,logit_kd,feature"))
    live = train(
        load_clip(str(tiny_student_config)),
        dataset,
        tmp_path / "live",
        _config(steps=4),
        settings,
        teacher=teacher,
        **QUIET,
    )
    store_targets(teacher, dataset, tmp_path / "targets", TINY_DATA, views=1, shard_size=50, progress=False)
    targets = OfflineTargets.open(tmp_path / "targets")
    assert len(targets.manifest["shards"]) == 3 and targets.embed_dims == [48]
    offline = train(
        load_clip(str(tiny_student_config)),
        dataset,
        tmp_path / "offline",
        _config(steps=4),
        settings,
        targets=targets,
        teacher_dims=targets.embed_dims,
        **QUIET,
    )
    assert offline.losses == pytest.approx(live.losses, rel=1e-4)


def test_stored_targets_with_augmented_views_and_coverage_check(
    tiny_teacher_run: Path, tmp_path: Path
) -> None:
    teacher = load_teacher([str(tiny_teacher_run)])
    small = _dataset("synthetic:shapes?size=20&image_size=32")
    store_targets(teacher, small, tmp_path / "t", "small", views=3, shard_size=64, progress=False)
    targets = OfflineTargets.open(tmp_path / "t")
    assert targets.tensors["image_0"].shape == (20, 3, 48)
    assert targets.params(4, 0).as_list() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert targets.params(4, 1) != targets.params(4, 2)
    assert {targets.choose(4, epoch) for epoch in range(20)} == {0, 1, 2}
    with pytest.raises(Exception, match="lack 108 samples"):
        targets.check_covers(_dataset())


def test_weight_inheritance_keeps_every_kth_layer_and_leading_channels(
    tiny_student_config: Path, tiny_teacher_run: Path
) -> None:
    teacher = load_teacher([str(tiny_teacher_run)]).members[0]
    student = load_clip(str(tiny_student_config))
    report = inherit_weights(student, teacher)
    s, t = student.model.state_dict(), teacher.model.state_dict()
    # 1 student layer from 2 teacher layers: the teacher's last layer
    assert torch.equal(
        s["visual.transformer.resblocks.0.mlp.c_fc.weight"],
        t["visual.transformer.resblocks.1.mlp.c_fc.weight"][:128, :32],
    )
    in_proj = t["transformer.resblocks.1.attn.in_proj_weight"]
    expected = torch.cat([in_proj[0:32, :32], in_proj[64:96, :32], in_proj[128:160, :32]])
    assert torch.equal(s["transformer.resblocks.0.attn.in_proj_weight"], expected)
    assert torch.equal(s["token_embedding.weight"], t["token_embedding.weight"][:, :32])
    assert (
        "visual.positional_embedding" in report.interpolated and "visual.conv1.weight" in report.interpolated
    )
    assert s["visual.positional_embedding"].shape == (17, 32)


def test_weight_inheritance_refuses_a_deeper_student(
    tiny_student_config: Path, tiny_teacher_config: Path, tiny_teacher_run: Path
) -> None:
    deeper = load_clip(str(tiny_teacher_config))
    shallow = load_clip(str(tiny_student_config))
    with pytest.raises(ModelSpecError, match="student has 2 layers, the teacher only 1"):
        inherit_weights(deeper, shallow)


def test_objective_errors_name_what_is_wrong(tiny_student_config: Path) -> None:
    student = load_clip(str(tiny_student_config))
    with pytest.raises(LossConfigError, match="need a teacher"):
        Distiller(student, LossSettings(weights=LossWeights.parse("clip,logit_kd")))
    with pytest.raises(LossConfigError, match="class_kd loss needs class names"):
        Distiller(student, LossSettings(weights=LossWeights.parse("class_kd")), teacher_dims=[32])
    with pytest.raises(LossConfigError, match="student embed dim 32 differs from teacher 0's 48"):
        Distiller(
            student, LossSettings(weights=LossWeights.parse("feature"), projection=False), teacher_dims=[48]
        )
    # logit KD compares probabilities, not vectors: any teacher dim works without projection
    Distiller(
        student, LossSettings(weights=LossWeights.parse("logit_kd"), projection=False), teacher_dims=[48]
    )


def test_ensemble_teacher_with_its_own_preprocessing(
    tiny_student_config: Path, tiny_teacher_run: Path, tmp_path: Path
) -> None:
    from tests.fixtures.training import TINY_TEACHER

    wide = {**TINY_TEACHER, "vision": {**TINY_TEACHER["vision"], "image_size": 48, "patch_size": 8}}
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    teacher = load_teacher([str(tiny_teacher_run), str(tmp_path / "wide.json")])
    student = load_clip(str(tiny_student_config))
    assert len({m.image_key for m in teacher.members} | {student.image_key}) == 2
    from clipserve.training.train import build_collator

    batch = build_collator(student, teacher, _config(), None)([_dataset()[i] for i in range(4)])
    assert sorted(tuple(v.shape[-2:]) for v in batch.images.values()) == [(32, 32), (48, 48)]
    settings = LossSettings(weights=LossWeights.parse("clip,logit_kd,feature"))
    result = train(
        student, _dataset(), tmp_path / "ens", _config(steps=2), settings, teacher=teacher, **QUIET
    )
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_weight_inheritance_between_resnet_towers_keeps_leading_channels(tmp_path: Path) -> None:
    text = {"width": 32, "layers": 2, "heads": 2, "context_length": 32, "vocab_size": 49408}

    def resnet(width: int, layers: list[int], text_layers: int) -> Path:
        path = tmp_path / f"rn{width}-{len(layers)}-{text_layers}.json"
        config = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "head_width": 16},
            "text_cfg": {**text, "layers": text_layers},
        }
        path.write_text(json.dumps(config))
        return path

    teacher = load_clip(str(resnet(16, [1, 1, 1, 1], 2)))
    student = load_clip(str(resnet(8, [1, 1, 1, 1], 1)))
    report = inherit_weights(student, teacher)
    assert not report.skipped
    s, t = student.model.state_dict(), teacher.model.state_dict()
    assert torch.equal(s["visual.layer2.0.conv1.weight"], t["visual.layer2.0.conv1.weight"][:16, :32])
    assert torch.equal(s["visual.attnpool.q_proj.weight"], t["visual.attnpool.q_proj.weight"][:256, :256])
    assert torch.equal(
        s["transformer.resblocks.0.ln_1.weight"], t["transformer.resblocks.1.ln_1.weight"][:32]
    )
    with pytest.raises(ModelSpecError, match="same blocks per stage"):
        inherit_weights(load_clip(str(resnet(8, [1, 1, 2, 1], 1))), teacher)


def test_a_locked_text_tower_stays_as_it_started_while_the_image_tower_learns(
    tiny_student_config: Path, tmp_path: Path
) -> None:
    student = load_clip(str(tiny_student_config))
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    train(student, _dataset(), tmp_path / "run", _config(lock_text=True), LossSettings(), **QUIET)
    after = student.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    text_keys = {k for k in before if not k.startswith("visual.") and k != "logit_scale"}
    assert text_keys and not changed & text_keys
    assert any(k.startswith("visual.") for k in changed) and "logit_scale" in changed
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["lock_text"] is True


UNLABELED_DATA = "synthetic:shapes?size=48&image_size=32&seed=7&held_out=none"


def test_unlabeled_images_feed_the_image_side_losses_live_or_stored_alike(
    tiny_student_config: Path, tiny_teacher_run: Path, tmp_path: Path
) -> None:
    teacher = load_teacher([str(tiny_teacher_run)])
    dataset, unlabeled = _dataset(), _dataset(UNLABELED_DATA)
    vectors = teacher.class_vectors(dataset.classes, ["a {}."], torch.device("cpu"))
    settings = LossSettings(weights=LossWeights.parse("clip,class_kd,feature"))
    config = _config(steps=4, unlabeled_batch_size=6)

    def run(name: str, **sources) -> list[float]:
        result = train(
            load_clip(str(tiny_student_config)),
            dataset,
            tmp_path / name,
            config,
            settings,
            class_vectors=vectors,
            **sources,
            **QUIET,
        )
        return result.losses

    live = run("live", teacher=teacher, unlabeled=unlabeled)
    without = run("without", teacher=teacher)
    store_targets(teacher, dataset, tmp_path / "t", TINY_DATA, views=1, progress=False)
    store_targets(teacher, unlabeled, tmp_path / "u", UNLABELED_DATA, views=1, progress=False)
    targets, unlabeled_targets = OfflineTargets.open(tmp_path / "t"), OfflineTargets.open(tmp_path / "u")
    stored = run(
        "stored",
        targets=targets,
        teacher_dims=targets.embed_dims,
        unlabeled=unlabeled,
        unlabeled_targets=unlabeled_targets,
    )
    assert stored == pytest.approx(live, rel=1e-4)
    assert live[0] != pytest.approx(without[0], rel=1e-3)  # the losses saw other images
    fingerprint = torch.load(next((tmp_path / "live" / "checkpoints").glob("*.pt")), weights_only=True)
    assert fingerprint["fingerprint"]["unlabeled"] == [48, 6]


def test_image_side_losses_learn_from_the_unlabeled_images_when_given(tiny_student_config: Path) -> None:
    """With unlabeled images, class_kd and feature compare the student's and the teacher's embeddings
    of those images: equal embeddings there give zero, whatever the captioned pairs show."""
    from clipserve.training.data import Batch
    from clipserve.training.models import TowerOutputs

    student = load_clip(str(tiny_student_config))
    vectors = [torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)]
    distiller = Distiller(student, LossSettings(weights=LossWeights.parse("class_kd,feature")), [32], vectors)
    distiller.eval()
    images = {student.image_key: torch.randn(4, 3, 32, 32)}
    tokens = {student.text_key: student.tokenizer(["a red circle", "a cat", "a dog", "two squares"])}
    labels = torch.full((4,), -1)
    pairs = Batch(images, tokens, labels, torch.arange(4))
    unlabeled = Batch({student.image_key: torch.randn(3, 3, 32, 32)}, {}, labels[:3], torch.arange(3))
    with torch.no_grad():
        own_text = student.model.encode_text(tokens[student.text_key], normalize=True)
        own_unlabeled = student.model.encode_image(unlabeled.images[student.image_key], normalize=True)
    unrelated_images = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    teacher = [TowerOutputs(unrelated_images, own_text, torch.tensor(20.0))]
    on_unlabeled = [TowerOutputs(own_unlabeled, own_unlabeled, torch.tensor(20.0))]
    with torch.no_grad():
        _, parts = distiller(pairs, teacher, unlabeled, on_unlabeled)
        _, pairs_only = distiller(pairs, teacher)
    assert parts["class_kd"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["feature"].item() == pytest.approx(0.0, abs=1e-5)
    assert pairs_only["class_kd"].item() > 1e-3 and pairs_only["feature"].item() > 1e-3
