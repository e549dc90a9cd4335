"""Bundles of the families with Hugging Face tokenizers, served: a SigLIP2 bundle classifies with its
own sigmoid scoring (each label's sigmoid(logit_scale * cos + logit_bias), equal to torch's within
1e-5), through inline labels, a label set and /v1/rank; its text and image vectors equal torch's (the
service's own tokenizer and squash preprocessing); a multilingual xlm-roberta bundle scores with
softmax."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from clipserve.contract.scoring import class_vectors, prompts
from tests.fixtures.service import b64, image_bytes

LABELS = ["a red circle", "a blue square", "ein grüner Hund", "一只猫"]
TEMPLATES = ["a photo of {}.", "{}"]
PICTURES = [image_bytes(seed=seed, size=size) for seed, size in enumerate([(48, 40), (90, 41), (160, 160)])]


def _torch_reference(made, labels: list[str], templates: list[str]):
    """Cosines and scores as torch computes them with open_clip's tokenizer and transform."""
    import open_clip
    import torch

    manifest = made.bundle.manifest
    pre = manifest.image
    transform = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(
            size=pre.size,
            mean=pre.mean,
            std=pre.std,
            interpolation=pre.interpolation,
            resize_mode=pre.resize_mode,
        ),
        is_train=False,
    )
    tokenizer = open_clip.tokenizer.HFTokenizer(
        manifest.source.tokenizer,
        context_length=manifest.tokenizer.context_length,
        clean=manifest.tokenizer.clean,
    )
    model = made.model
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.open(io.BytesIO(p)).convert("RGB")) for p in PICTURES])
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokenizer(prompts(labels, templates)), normalize=True)
        classes = torch.from_numpy(class_vectors(text.numpy(), len(templates)))
        cosine = image @ classes.T
        logits = model.logit_scale.exp() * cosine
        if model.logit_bias is not None:
            scores = torch.sigmoid(logits + model.logit_bias)
        else:
            scores = logits.softmax(dim=-1)
    return image.numpy(), cosine.numpy(), scores.numpy()


def _served_scores(result: dict, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    by_label = {entry["label"]: entry for entry in result["labels"]}
    return (
        np.array([by_label[label]["score"] for label in labels]),
        np.array([by_label[label]["similarity"] for label in labels]),
    )


@pytest.fixture(scope="module")
def siglip(family_bundle):
    return family_bundle("siglip2")


def test_siglip_bundle_classifies_with_its_sigmoid_scoring(siglip, make_client) -> None:
    client = make_client(models_dir=siglip.repo, models=["siglip2"])
    info = client.get("/v1/models").json()["data"][0]
    assert (info["id"], info["scoring"], info["context_length"]) == ("siglip2", "sigmoid", 16)
    assert info["logit_bias"] == pytest.approx(-10.0)

    image, cosine, scores = _torch_reference(siglip, LABELS, TEMPLATES)
    body = {"images": [b64(p) for p in PICTURES], "labels": LABELS, "templates": TEMPLATES, "top_k": 4}
    response = client.post("/v1/classify", json={**body, "model": "siglip2"})
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["scoring"] == "sigmoid" and served["model"] == "siglip2"
    for index, result in enumerate(served["results"]):
        got_scores, got_cosine = _served_scores(result, LABELS)
        np.testing.assert_allclose(got_scores, scores[index], atol=1e-5)
        np.testing.assert_allclose(got_cosine, cosine[index], atol=1e-5)
        listed = [entry["score"] for entry in result["labels"]]
        assert listed == sorted(listed, reverse=True)

    # each label on its own: a label's score does not change with the others asked for
    alone = client.post(
        "/v1/classify", json={**body, "labels": LABELS[:1], "top_k": 1, "model": "siglip2"}
    ).json()
    np.testing.assert_allclose([r["labels"][0]["score"] for r in alone["results"]], scores[:, 0], atol=1e-5)

    # served image vectors (the service's squash resize and 0.5 mean/std) against torch's
    vectors = client.post("/v1/embed", json={"images": body["images"], "model": "siglip2"}).json()
    served_image = np.array(vectors["image_embeddings"])
    assert (served_image * image).sum(axis=1).min() >= 0.9999


def test_siglip_label_set_and_rank_use_the_same_scoring(siglip, make_client) -> None:
    client = make_client(models_dir=siglip.repo, models=["siglip2"])
    _, _, scores = _torch_reference(siglip, LABELS, TEMPLATES)
    name = f"siglip-{uuid.uuid4().hex[:8]}"
    put = client.put(
        f"/v1/labelsets/{name}", json={"labels": LABELS, "templates": TEMPLATES, "model": "siglip2"}
    )
    assert put.status_code in (200, 201, 202), put.text
    for _ in range(200):
        if client.get(f"/v1/labelsets/{name}").json()["status"] == "ready":
            break
    served = client.post(
        "/v1/classify",
        json={"images": [b64(p) for p in PICTURES], "labelset": name, "top_k": 4, "model": "siglip2"},
    ).json()
    assert served["scoring"] == "sigmoid"
    for index, result in enumerate(served["results"]):
        np.testing.assert_allclose(_served_scores(result, LABELS)[0], scores[index], atol=1e-5)

    ranked = client.post(
        "/v1/rank",
        json={
            "model": "siglip2",
            "query": {"image": b64(PICTURES[0])},
            "candidates": [{"text": label} for label in LABELS],
            "probabilities": True,
        },
    ).json()
    assert ranked["scoring"] == "sigmoid"
    # a query against one candidate is one label: sigmoid(scale * cos + bias) of it
    _, _, single = _torch_reference(siglip, LABELS, ["{}"])
    by_index = {r["index"]: r["probability"] for r in ranked["results"]}
    np.testing.assert_allclose([by_index[i] for i in range(len(LABELS))], single[0], atol=1e-5)


def test_multilingual_bundle_serves_texts_and_softmax_scores(family_bundle, make_client) -> None:
    made = family_bundle("xlm-roberta")
    client = make_client(models_dir=made.repo, models=["xlm-roberta"])
    _, _, scores = _torch_reference(made, LABELS, TEMPLATES)
    served = client.post(
        "/v1/classify",
        json={
            "images": [b64(p) for p in PICTURES],
            "labels": LABELS,
            "templates": TEMPLATES,
            "top_k": 4,
            "model": "xlm-roberta",
        },
    ).json()
    assert served["scoring"] == "softmax"
    for index, result in enumerate(served["results"]):
        got_scores, _ = _served_scores(result, LABELS)
        np.testing.assert_allclose(got_scores, scores[index], atol=1e-5)
        assert got_scores.sum() == pytest.approx(1.0, abs=1e-5)

    openai = client.post(
        "/v1/embeddings", json={"model": "xlm-roberta", "input": ["ein grüner Hund", "一只猫"]}
    ).json()
    assert len(openai["data"]) == 2 and len(openai["data"][0]["embedding"]) == made.bundle.manifest.embed_dim
