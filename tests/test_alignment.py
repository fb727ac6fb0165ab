import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slca_peft import AlignmentSettings, ClassifierAligner, ClassStatistics, ContinualClassifier
from slca_peft.alignment import normalized_logits


def gaussian_tasks(task_sizes, dim=16, seed=0, n=200):
    gen = torch.Generator().manual_seed(seed)
    num = sum(task_sizes)
    means = torch.randn(num, dim, generator=gen) * 1.5
    data = [(means[c] + 0.8 * torch.randn(n, dim, generator=gen), c) for c in range(num)]
    return means, data


def balanced_accuracy(clf, means, n=300, seed=99):
    gen = torch.Generator().manual_seed(seed)
    accs = []
    with torch.no_grad():
        for c in range(len(means)):
            x = means[c] + 0.8 * torch.randn(n, means.shape[1], generator=gen)
            accs.append((clf(x).argmax(1) == c).float().mean().item())
    return float(np.mean(accs))


def sequential_heads(task_sizes, data, dim=16):
    """Train each head on its task's logits only, as the slow learner does: old heads never see new
    classes, and the newest head grows the largest logits."""
    torch.manual_seed(0)
    clf = ContinualClassifier(dim)
    stats = ClassStatistics(dim)
    offset = 0
    for t, size in enumerate(task_sizes):
        clf.grow(size)
        classes = list(range(offset, offset + size))
        x = torch.cat([d for d, c in data if c in classes])
        y = torch.cat([torch.full((len(d),), c) for d, c in data if c in classes])
        opt = torch.optim.SGD(clf.heads[t].parameters(), lr=0.1, momentum=0.9)
        for _ in range(100 + 100 * t):
            loss = F.cross_entropy(clf(x)[:, offset:], y - offset)
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats.update(x, y)
        stats.finalize(t)
        offset += size
    return clf, stats


def test_alignment_fixes_a_head_biased_toward_the_newest_task():
    sizes = [3, 3, 3]
    means, data = gaussian_tasks(sizes)
    clf, stats = sequential_heads(sizes, data)
    with torch.no_grad():
        clf.heads[-1].bias += 8.0  # the recency bias sequential fine-tuning leaves in the newest head
    before = balanced_accuracy(clf, means)
    aligner = ClassifierAligner(AlignmentSettings(epochs=5, lr=0.01, fc_scale_mu=0.02), seed=0)
    losses = aligner.align(clf, stats, task_id=2)
    after = balanced_accuracy(clf, means)
    assert losses[-1] < losses[0]
    assert after > before + 0.15, (before, after)
    # SLCA++ scales of the old heads: 1 + mu * (T_old - j), the newest stays 1.
    assert clf.scales.tolist() == pytest.approx([1.04, 1.02, 1.0])


def test_alignment_is_deterministic_for_a_seed():
    sizes = [2, 2]
    _, data = gaussian_tasks(sizes)
    results = []
    for _ in range(2):
        clf, stats = sequential_heads(sizes, data)
        ClassifierAligner(AlignmentSettings(epochs=2), seed=3).align(clf, stats, task_id=1)
        results.append(clf.snapshot())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=0)


def test_samples_follow_the_class_gaussians():
    dim = 6
    stats = ClassStatistics(dim)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(dim, dim, generator=gen)
    x = torch.randn(4000, dim, generator=gen) @ mix.T + 3.0
    stats.update(x, torch.zeros(4000, dtype=torch.long))
    stats.finalize(0)
    aligner = ClassifierAligner(AlignmentSettings(samples_per_class=20000, fc_scale_mu=0.0))
    feats, labels = aligner.sample(stats, task_id=0, generator=torch.Generator().manual_seed(1))
    assert feats.shape == (20000, dim) and set(labels.tolist()) == {0}
    s = feats.double().numpy()
    np.testing.assert_allclose(s.mean(0), stats.means[0].numpy(), atol=0.1)
    np.testing.assert_allclose(np.cov(s, rowvar=False), stats.covariances[0].numpy(), atol=0.25)


def test_slca_plus_plus_feature_scaling_uses_each_class_real_task():
    # Tasks of unequal size (like Cars-196's last task): class 4 belongs to task 1, class 5 to task 2.
    dim = 3
    stats = ClassStatistics(dim, ridge=1e-12)
    for task, classes in enumerate([[0, 1, 2, 3], [4], [5]]):
        for c in classes:
            x = torch.full((2, dim), 10.0)  # zero covariance: samples equal the mean
            stats.update(x, torch.full((2,), c))
        stats.finalize(task)
    aligner = ClassifierAligner(AlignmentSettings(samples_per_class=500, fc_scale_mu=0.02))
    feats, labels = aligner.sample(stats, task_id=2, generator=torch.Generator().manual_seed(0))
    scale = (feats[:, 0] / 10.0).numpy()
    labels = labels.numpy()
    for c, gap in [(0, 2), (3, 2), (4, 1), (5, 0)]:
        s = scale[labels == c]
        # 1 / (1 + s * gap) with s uniform in [0.01, 0.03]
        assert s.min() >= 1 / (1 + 0.03 * gap) - 1e-5 and s.max() <= 1 / (1 + 0.01 * gap) + 1e-5
        if gap:
            assert s.std() > 0
    np.testing.assert_allclose(scale[labels == 5], 1.0, atol=1e-5)


def test_slca_decays_old_class_means():
    dim = 2
    stats = ClassStatistics(dim, ridge=1e-12)
    for task in range(3):
        stats.update(torch.full((2, dim), 1.0), torch.full((2,), task))
        stats.finalize(task)
    aligner = ClassifierAligner(AlignmentSettings(samples_per_class=4, slca_plus_plus=False))
    feats, labels = aligner.sample(stats, task_id=2, generator=torch.Generator().manual_seed(0))
    for c in range(3):
        expected = 0.9 + 0.1 * (c + 1) / 3
        np.testing.assert_allclose(feats[labels == c].numpy(), expected, atol=1e-4)


def test_logit_normalisation_matches_definition():
    logits = torch.tensor([[3.0, 4.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 6.0, 8.0]])
    out = normalized_logits(logits, [0, 2, 5], temperature=0.1)
    norms = torch.tensor([[(5.0 + 1e-7 + 1.0 + 1e-7) / 2], [(1e-7 + 10.0 + 1e-7) / 2]])
    torch.testing.assert_close(out, logits / norms / 0.1)


def test_alignment_needs_statistics_of_every_class():
    clf = ContinualClassifier(4, [2, 2])
    stats = ClassStatistics(4)
    stats.update(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    stats.finalize(0)
    with pytest.raises(ValueError, match=r"classes \[2, 3\] have no statistics"):
        ClassifierAligner().align(clf, stats, task_id=1)
