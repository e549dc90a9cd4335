"""The official `openai` client against /v1/embeddings on a real uvicorn."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from tests.fixtures.service import b64, image_bytes


def test_official_openai_client_embeds_texts_and_images(live_server) -> None:
    base = live_server()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    texts = ["a photo of a cat", "a dog"]
    result = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 by default
    assert [d.index for d in result.data] == [0, 1] and result.model == "tiny"
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 32)
    assert result.usage.prompt_tokens == result.usage.total_tokens > 4
    as_floats = client.embeddings.create(model="tiny", input="a dog", encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, vectors[1], atol=1e-6)

    image = image_bytes(seed=4)
    images = client.embeddings.create(
        model="tiny", input=[f"data:image/png;base64,{b64(image)}"], extra_body={"modality": "image"}
    )
    direct = openai.OpenAI(base_url=base, api_key="unused").post(
        "/v1/embed", body={"images": [b64(image)]}, cast_to=object
    )
    np.testing.assert_allclose(images.data[0].embedding, direct["image_embeddings"][0], atol=1e-6)
    assert images.usage.prompt_tokens == 0


def test_openai_client_sees_clear_errors(live_server) -> None:
    client = openai.OpenAI(base_url=f"{live_server()}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "not served" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.embeddings.create(model="tiny", input="x", dimensions=64)
    assert "use 1 to 32" in str(err.value)


def test_openai_client_with_api_keys(live_server) -> None:
    base = live_server(api_keys=["k-123"])
    good = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0)
    assert len(good.embeddings.create(model="tiny", input="x").data) == 1
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="tiny", input="x")


def test_the_official_client_lists_models_whose_ids_it_can_embed_with(live_server) -> None:
    client = openai.OpenAI(base_url=f"{live_server()}/v1", api_key="unused", max_retries=0)
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("tiny", "model", "clipserve")]
    assert isinstance(models[0].created, int) and models[0].created > 1_700_000_000
    extra = models[0].model_extra
    assert extra["version"] == 1 and extra["dim"] == 32 and extra["scoring"] == "softmax"
    embedded = client.embeddings.create(model=models[0].id, input="a cat", encoding_format="float")
    pinned = client.embeddings.create(model=f"{models[0].id}@1", input="a cat", encoding_format="float")
    np.testing.assert_allclose(embedded.data[0].embedding, pinned.data[0].embedding, atol=1e-6)


def test_dimensions_keep_the_first_components_renormalized(live_server) -> None:
    client = openai.OpenAI(base_url=f"{live_server()}/v1", api_key="unused", max_retries=0)
    full = np.array(
        client.embeddings.create(model="tiny", input="a cat", encoding_format="float").data[0].embedding
    )
    short = client.embeddings.create(model="tiny", input="a cat", dimensions=8, encoding_format="float")
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (8,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    np.testing.assert_allclose(vector, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)
