"""Search quality of the ANN indexes: Recall@10 >= 0.95 against numpy brute force on 100,000 512-d vectors.

The vectors are random but clustered (see `clustered_vectors`): on isotropic Gaussian vectors every
cosine is about 0 +- 0.04, there are no neighbourhoods to find, and no index beats a full scan.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.service.stores import IndexParams, ModelBinding
from tests.fixtures.retrieval import RecallData, recall_at_10

HASH = "d" * 64
BINDING = ModelBinding("recall", 1, HASH, 512)
PARAMS = {
    "hnsw": IndexParams(kind="hnsw", m=16, ef_construction=40, ef_search=128),
    "ivf": IndexParams(kind="ivf", nlist=256, nprobe=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_at_10_against_brute_force(store, recall_data: RecallData, kind: str):
    store.create_collection("recall", BINDING, PARAMS[kind])
    ids = [str(i) for i in range(len(recall_data.vectors))]
    assert store.upsert("recall", ids, recall_data.vectors, content_hash=HASH) == 100_000
    found = [
        [hit.id for hit in store.search("recall", query, content_hash=HASH, top_k=10)]
        for query in recall_data.queries
    ]
    assert all(len(row) == 10 for row in found)
    recall = recall_at_10(found, recall_data.truth)
    assert recall >= 0.95, f"{kind} Recall@10 {recall:.3f}"
    # exact scores: the reported cosine is the true one for every hit
    first = [int(i) for i in found[0]]
    expected = recall_data.vectors[first] @ recall_data.queries[0]
    scores = [
        hit.score for hit in store.search("recall", recall_data.queries[0], content_hash=HASH, top_k=10)
    ]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
