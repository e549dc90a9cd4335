"""The zero-shot rules shared by the service and training: prompts, class vectors, scores, top-k."""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.contract.scoring import Scoring, class_vectors, fill_template, prompts, top_k


def test_fill_template_replaces_only_the_placeholder() -> None:
    assert fill_template("a photo of a {}.", "dog") == "a photo of a dog."
    # str.format would fail on the braces of the template or reinterpret those of the label
    assert fill_template("{} in {curly} braces {0}", "x{y}") == "x{y} in {curly} braces {0}"
    assert prompts(["a", "b"], ["{}!", "<{}>"]) == ["a!", "<a>", "b!", "<b>"]


def test_class_vectors_are_renormalized_means_of_normalized_prompts() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(6, 4)).astype(np.float32) * rng.uniform(0.5, 3, size=(6, 1))
    got = class_vectors(embeddings, templates=3)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    for label in range(2):
        mean = unit[3 * label : 3 * label + 3].mean(axis=0)
        np.testing.assert_allclose(got[label], mean / np.linalg.norm(mean), rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        class_vectors(embeddings, templates=4)


def test_softmax_rows_sum_to_one_and_sigmoid_labels_are_independent() -> None:
    similarity = np.array([[0.1, 0.3, 0.2], [0.9, -0.9, 0.0]])
    soft = Scoring("softmax", logit_scale=10.0).probabilities(similarity)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    logits = 10.0 * similarity[0]
    np.testing.assert_allclose(soft[0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)
    sig = Scoring("sigmoid", logit_scale=10.0, logit_bias=-2.0).probabilities(similarity)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-(10.0 * similarity - 2.0))), rtol=1e-6)
    # one label's score does not depend on the others
    alone = Scoring("sigmoid", logit_scale=10.0, logit_bias=-2.0).probabilities(similarity[:, :1])
    np.testing.assert_allclose(alone[:, 0], sig[:, 0])
    # no overflow warnings at extreme logits
    extreme = Scoring("sigmoid", logit_scale=1e4).probabilities(np.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(extreme, [[1.0, 0.0]])


def test_top_k_is_highest_first_with_ties_in_index_order() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(top_k(scores, 2), [[1, 2], [0, 1]])
    np.testing.assert_array_equal(top_k(scores, 10), [[1, 2, 3, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(top_k(scores[0], 1), [[1]])
    rng = np.random.default_rng(1)
    many = rng.normal(size=(5, 1000))
    np.testing.assert_array_equal(top_k(many, 7), np.argsort(-many, axis=1)[:, :7])
