"""Property-based checks of the class statistics over random class counts and batch sizes."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slca_peft.method import ClassStatistics


@settings(max_examples=30, deadline=None)
@given(
    dim=st.integers(1, 6),
    counts=st.lists(st.integers(2, 20), min_size=1, max_size=5),
    batch=st.integers(1, 17),
    seed=st.integers(0, 1000),
)
def test_statistics_do_not_depend_on_batching(dim, counts, batch, seed):
    rng = np.random.RandomState(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    rng.shuffle(labels)
    feats = rng.randn(len(labels), dim) * 2 + 1
    stats = ClassStatistics(dim)
    for lo in range(0, len(labels), batch):
        stats.update(torch.tensor(feats[lo : lo + batch]), torch.tensor(labels[lo : lo + batch]))
    stats.finalize(0)
    for c, n in enumerate(counts):
        x = feats[labels == c]
        assert stats.counts[c] == n
        np.testing.assert_allclose(stats.means[c].numpy(), x.mean(0), atol=1e-9)
        cov = np.atleast_2d(np.cov(x, rowvar=False)) + 1e-4 * np.eye(dim)
        np.testing.assert_allclose(stats.covariances[c].numpy(), cov, atol=1e-8)
