import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slca_peft.method import AlignmentSettings, ClassifierAligner, ClassStatistics
from slca_peft.method.alignment import normalized_logits
from slca_peft.models import ContinualClassifier
from slca_peft.utils.errors import UserError


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


# ---------------------------------------------------------------------------- fast sampling
def _mixed_statistics(dim=24, **kw):
    """Classes stored in every way the exact form uses: rank 0, low rank, full Cholesky."""
    gen = torch.Generator().manual_seed(5)
    stats = ClassStatistics(dim, ridge=1e-3, **kw)
    for c, n in enumerate([1, 4, 9, 60, 300]):
        mix = torch.randn(dim, dim, generator=gen) / dim**0.5
        x = torch.randn(n, dim, generator=gen) @ mix.T * (1 + c) + torch.randn(dim, generator=gen) * 2
        stats.update(x, torch.full((n,), c))
    with pytest.warns(UserWarning, match="single training image"):
        stats.finalize(0)
    return stats


def _assert_moments(samples, mean, cov, sigmas=5.0):
    """Sample mean and covariance within `sigmas` standard errors of the target, entry by entry."""
    n = samples.shape[0]
    s = samples.double()
    var = cov.diagonal()
    mean_err = (s.mean(0) - mean).abs()
    assert (mean_err <= sigmas * (var / n).sqrt() + 1e-6).all(), mean_err.max()
    cov_err = (torch.cov(s.T) - cov).abs()
    cov_se = ((cov.square() + var[:, None] * var[None, :]) / n).sqrt()
    assert (cov_err <= sigmas * cov_se + 1e-6).all(), (cov_err / cov_se).max()


@pytest.mark.parametrize(("form", "rank"), [("exact", None), ("full", None), ("low_rank", 3), ("diagonal", None)])
def test_fast_sampler_draws_the_covariance_each_class_stores(form, rank):
    stats = _mixed_statistics(covariance_form=form, covariance_rank=rank)
    if form == "exact":
        assert [stats.ranks[c] for c in range(5)] == [0, 3, 8, 24, 24]
    aligner = ClassifierAligner(AlignmentSettings(samples_per_class=40000, fc_scale_mu=0.0))
    feats, labels = aligner.sample(stats, task_id=0, generator=torch.Generator().manual_seed(0))
    assert feats.dtype == torch.float32 and feats.shape == (5 * 40000, 24)
    for c in range(5):
        _assert_moments(feats[labels == c], stats.means[c], stats.covariances[c])


def test_sampling_plan_is_built_once_and_rebuilt_after_finalize():
    stats = _mixed_statistics()
    plan = stats.sampling_plan("cpu")
    assert stats.sampling_plan("cpu") is plan
    assert stats.memory_bytes()["sampling_plan"] == plan.nbytes > 0
    stats.update(torch.randn(5, 24), torch.full((5,), 7))
    stats.finalize(1)
    new = stats.sampling_plan("cpu")
    assert new is not plan and sorted(new.classes.tolist()) == [0, 1, 2, 3, 4, 7]


def test_plans_over_the_cache_budget_and_in_many_chunks_draw_the_same_samples(monkeypatch):
    import slca_peft.method.covariance

    stats = _mixed_statistics()
    reference = stats.sample(16, torch.Generator().manual_seed(3))
    monkeypatch.setattr(ClassStatistics, "sampling_cache_bytes", 0)
    stats._changed()
    plan = stats.sampling_plan("cpu")
    assert not plan.cached and plan.nbytes == plan.means.numel() * 4
    torch.testing.assert_close(stats.sample(16, torch.Generator().manual_seed(3)), reference, rtol=0, atol=0)
    # Chunks of one class each, drawn one by one, follow the same Gaussians.
    monkeypatch.setattr(slca_peft.method.covariance, "_PLAN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(slca_peft.method.covariance, "_SAMPLE_STEP_ELEMENTS", 1)
    stats._changed()
    assert len(stats.sampling_plan("cpu").chunks) == 5
    feats = stats.sample(30000, torch.Generator().manual_seed(4))
    for i, c in enumerate(stats.sampling_plan("cpu").classes.tolist()):
        _assert_moments(feats[i], stats.means[c], stats.covariances[c])


def test_fast_sampler_matches_the_per_class_formula_for_the_same_noise():
    """mu + F z1 + sqrt(noise) z2 with z drawn chunk by chunk, written out class by class."""
    stats = _mixed_statistics()
    n = 7
    feats = stats.sample(n, torch.Generator().manual_seed(9))
    plan = stats.sampling_plan("cpu")
    gen = torch.Generator().manual_seed(9)
    expected = {}
    for chunk in plan.chunks:
        k = len(chunk.classes)
        z1 = torch.randn(k, n, chunk.rank, generator=gen) if chunk.rank else None
        z2 = torch.randn(k, n, 24, generator=gen) if chunk.has_noise else None
        for i, c in enumerate(chunk.classes):
            factor = stats.cholesky(c) if stats.ranks[c] == 24 and stats._noise[c].eq(0).all() else stats._factors[c]
            x = stats.means[c].expand(n, 24).clone()
            if factor.shape[1]:
                x += z1[i, :, : factor.shape[1]].double() @ factor.T
            if z2 is not None:
                x += z2[i].double() * stats._noise[c].sqrt()
            expected[c] = x
    for i, c in enumerate(plan.classes.tolist()):
        torch.testing.assert_close(feats[i].double(), expected[c], rtol=1e-5, atol=1e-4)


def _straightforward_align(classifier, settings, task_id, seed, samples):
    """The loop written plainly (shuffled copy, per-batch loss check), fed the given samples."""
    classifier.scales.fill_(1.0)
    params = list(classifier.heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    generator = torch.Generator().manual_seed(seed + task_id)
    offsets = classifier.task_offsets()
    losses = []
    for epoch in range(settings.epochs):
        feats, labels = samples[epoch]
        order = torch.randperm(len(labels), generator=generator)
        feats, labels = feats[order], labels[order]
        total = []
        for start in range(0, len(labels), settings.batch_size):
            x, y = feats[start : start + settings.batch_size], labels[start : start + settings.batch_size]
            logits = classifier(x)
            pairs = zip(offsets[:-1], offsets[1:], strict=True)
            norms = torch.stack([logits[:, a:b].norm(dim=1) + 1e-7 for a, b in pairs], 1)
            loss = F.cross_entropy(logits / norms.mean(1, keepdim=True) / settings.temperature, y)
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total.append(loss.item())
        scheduler.step()
        losses.append(float(np.mean(total)))
    num_old = classifier.num_tasks - 1
    with torch.no_grad():
        for j in range(num_old):
            classifier.scales[j] = 1.0 + settings.fc_scale_mu * (num_old - j)
    return losses


def test_fast_alignment_equals_the_straightforward_loop_given_the_same_samples():
    sizes = [3, 2, 3]
    _, data = gaussian_tasks(sizes)
    clf, stats = sequential_heads(sizes, data)
    reference = ContinualClassifier(16, sizes)
    reference.load_state_dict(clf.state_dict())
    settings = AlignmentSettings(epochs=3, samples_per_class=50, batch_size=64)
    aligner = ClassifierAligner(settings, seed=4)
    drawn = [aligner.sample(stats, 2, torch.Generator().manual_seed(100 + e)) for e in range(3)]
    calls = iter(drawn)
    aligner.sample = lambda stats, task_id, generator, num_labels=None: next(calls)
    losses = aligner.align(clf, stats, task_id=2)
    expected_losses = _straightforward_align(reference, settings, 2, 4, drawn)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(clf.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_non_finite_alignment_loss_restores_the_heads():
    sizes = [2, 2]
    _, data = gaussian_tasks(sizes)
    clf, stats = sequential_heads(sizes, data)
    before = clf.snapshot()
    aligner = ClassifierAligner(AlignmentSettings(epochs=2))
    good = aligner.sample(stats, 1, torch.Generator().manual_seed(0))
    broken = (good[0].clone(), good[1])
    broken[0][5, 3] = float("nan")  # the first epoch trains, the second one diverges
    calls = iter([good, broken])
    aligner.sample = lambda stats, task_id, generator, num_labels=None: next(calls)
    with pytest.raises(UserError, match="restored"):
        aligner.align(clf, stats, task_id=1)
    for key, value in before.items():
        torch.testing.assert_close(clf.state_dict()[key], value, rtol=0, atol=0)
    assert [p.requires_grad for p in clf.heads.parameters()] == [False, False, True, True]


def _per_head_align(aligner, classifier, stats, task_id):
    """The previous implementation: every step loops over the heads and over the task norm slices."""
    s = aligner.settings
    classifier.scales.fill_(1.0)
    params = list(classifier.heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)
    generator = torch.Generator().manual_seed(aligner.seed + task_id)
    offsets = classifier.task_offsets()
    for _ in range(s.epochs):
        feats, labels = aligner.sample(stats, task_id, generator)
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), s.batch_size):
            index = order[start : start + s.batch_size]
            logits = torch.cat([head(feats[index]) for head in classifier.heads], dim=1)
            pairs = zip(offsets[:-1], offsets[1:], strict=True)
            norms = torch.stack([logits[:, a:b].norm(dim=1) + 1e-7 for a, b in pairs], 1)
            loss = F.cross_entropy(logits / norms.mean(1, keepdim=True) / s.temperature, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("sizes", [[3, 2, 4], [3, 3, 3]])
def test_one_matmul_alignment_trains_the_same_heads_as_the_per_head_loop(sizes):
    _, data = gaussian_tasks(sizes, n=40)
    stats = ClassStatistics(16)
    for t, (lo, hi) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True)):
        stats.update(torch.cat([d for d, c in data[lo:hi]]), torch.arange(lo, hi).repeat_interleave(40))
        stats.finalize(t)
    torch.manual_seed(0)
    clf = ContinualClassifier(16, sizes)
    with torch.no_grad():
        clf.scales.copy_(torch.tensor([1.04, 1.02, 1.0]))  # left by a previous alignment: reset to 1 first
        for head in clf.heads:
            head.bias.normal_()
    start = clf.snapshot()
    reference = ContinualClassifier(16, sizes)
    reference.load_state_dict(start)
    settings = AlignmentSettings(epochs=3, samples_per_class=40, batch_size=32, weight_decay=5e-3)
    ClassifierAligner(settings, seed=5).align(clf, stats, task_id=2)
    _per_head_align(ClassifierAligner(settings, seed=5), reference, stats, task_id=2)
    for new, old in zip(clf.heads.parameters(), reference.heads.parameters(), strict=True):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    assert (clf.heads[0].weight - start["heads.0.weight"]).abs().max() > 1e-3  # alignment moved the old heads
    assert clf.scales.tolist() == pytest.approx([1.04, 1.02, 1.0])
    assert all(p.requires_grad == (i == len(sizes) - 1) for i, h in enumerate(clf.heads) for p in h.parameters())


def test_segment_norms_equal_per_task_norms_for_unequal_tasks():
    logits = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    offsets = [0, 3, 4, 9]
    out = normalized_logits(logits, offsets, temperature=0.2)
    norms = torch.stack([logits[:, a:b].norm(dim=1) + 1e-7 for a, b in zip(offsets[:-1], offsets[1:], strict=True)], 1)
    expected = logits / norms.mean(1, keepdim=True) / 0.2
    torch.testing.assert_close(out, expected)
    weights = torch.randn(7, 9, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_triangular_factors_are_sampled_blockwise_as_the_dense_product():
    dim, n = 264, 16  # above the size where Cholesky factors are multiplied in triangular blocks
    gen = torch.Generator().manual_seed(0)
    stats = ClassStatistics(dim)
    x = torch.randn(2 * (dim + 40), dim, generator=gen, dtype=torch.float64) @ torch.randn(dim, dim, generator=gen,
                                                                                            dtype=torch.float64)
    stats.update(x, torch.arange(2).repeat_interleave(dim + 40))
    stats.finalize(0)
    plan = stats.sampling_plan("cpu")
    assert all(chunk.triangular for chunk in plan.chunks)
    feats = plan.sample(n, torch.Generator().manual_seed(7))
    z = torch.randn(2, n, dim, generator=torch.Generator().manual_seed(7))  # the same draws, one dense product
    expected = torch.baddbmm(plan.means[:, None, :], z, plan.chunks[0].factors.mT)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_samples_per_epoch_caps_the_draws_of_an_epoch_and_leaves_the_default_as_it_was():
    sizes = [3, 3, 3]
    means, data = gaussian_tasks(sizes)
    default = AlignmentSettings(epochs=2, samples_per_class=40, batch_size=32)
    aligner = ClassifierAligner(AlignmentSettings(samples_per_class=256, samples_per_epoch=1000))
    assert [aligner.draws_per_class(c) for c in (1, 3, 100, 1000, 5000)] == [256, 256, 10, 1, 1]
    assert ClassifierAligner(default).draws_per_class(5000) == 40  # no cap: the method's setting
    _, stats = sequential_heads(sizes, data)
    gen = torch.Generator().manual_seed(0)
    feats, labels = ClassifierAligner(AlignmentSettings(samples_per_class=40, samples_per_epoch=90)).sample(
        stats, 2, gen)
    assert feats.shape == (9 * 10, 16) and torch.bincount(labels).tolist() == [10] * 9
    heads = []
    for settings in (default, AlignmentSettings(epochs=2, samples_per_class=40, batch_size=32, samples_per_epoch=360),
                     AlignmentSettings(epochs=2, samples_per_class=40, batch_size=32, samples_per_epoch=90)):
        clf, stats = sequential_heads(sizes, data)
        ClassifierAligner(settings, seed=3).align(clf, stats, task_id=2)
        heads.append(clf.snapshot())
    for key in heads[0]:  # a cap the epoch stays under changes nothing, to the bit
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=0, atol=0)
    assert not torch.equal(heads[2]["heads.0.weight"], heads[0]["heads.0.weight"])


def test_ca_samples_per_epoch_is_a_checked_setting_that_reaches_the_aligner(tmp_path):
    from slca_peft import SLCAConfig
    from slca_peft.utils.errors import UserError

    assert AlignmentSettings.from_config(SLCAConfig(output_dir=str(tmp_path))).samples_per_epoch is None
    args = SLCAConfig(output_dir=str(tmp_path), ca_samples_per_epoch=50_000)
    assert AlignmentSettings.from_config(args).samples_per_epoch == 50_000
    with pytest.raises(UserError, match=r"--ca_samples_per_epoch 0 is out of range"):
        SLCAConfig(output_dir=str(tmp_path), ca_samples_per_epoch=0)
