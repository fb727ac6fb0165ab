import numpy as np
import pytest
import torch

from slca_peft import ClassStatistics


def test_mean_and_covariance_match_numpy_over_uneven_batches():
    rng = np.random.RandomState(0)
    feats = rng.randn(103, 6) * rng.rand(6) * 3 + rng.randn(6)
    labels = rng.randint(0, 3, size=103)
    stats = ClassStatistics(6, ridge=1e-4)
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        stats.update(torch.tensor(feats[lo:hi], dtype=torch.float32), torch.tensor(labels[lo:hi]))
    stats.finalize(task_id=0)
    feats32 = feats.astype(np.float32).astype(np.float64)
    for c in range(3):
        x = feats32[labels == c]
        np.testing.assert_allclose(stats.means[c].numpy(), x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.covariances[c].numpy(), np.cov(x, rowvar=False) + 1e-4 * np.eye(6),
                                   rtol=1e-9, atol=1e-12)
        assert stats.covariances[c].dtype == torch.float64
        assert stats.task_of_class[c] == 0


def test_single_image_class_gets_ridge_only_with_a_warning():
    stats = ClassStatistics(4, ridge=1e-4)
    stats.update(torch.ones(1, 4), torch.tensor([5]))
    with pytest.warns(UserWarning, match="single training image"):
        stats.finalize(task_id=2)
    torch.testing.assert_close(stats.covariances[5], 1e-4 * torch.eye(4, dtype=torch.float64))


def test_old_classes_are_never_recomputed():
    stats = ClassStatistics(3)
    stats.update(torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 1]))
    stats.finalize(task_id=0)
    with pytest.raises(ValueError, match="never recomputed"):
        stats.update(torch.randn(2, 3), torch.tensor([1, 2]))


def test_class_without_samples_is_an_error():
    stats = ClassStatistics(3)
    stats.update(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="class 2 of task 0 has no training sample"):
        stats.finalize(task_id=0, classes=[0, 1, 2])


def test_non_finite_features_are_refused_with_the_class():
    stats = ClassStatistics(2)
    with pytest.raises(ValueError, match=r"class\(es\) \[7\]"):
        stats.update(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), torch.tensor([7, 8]))


def test_save_and_load_round_trip(tmp_path):
    stats = ClassStatistics(4)
    stats.update(torch.randn(10, 4), torch.tensor([0] * 5 + [1] * 5))
    stats.finalize(task_id=0)
    stats.update(torch.randn(6, 4), torch.tensor([2] * 6))
    stats.finalize(task_id=1)
    stats.save(tmp_path)
    loaded = ClassStatistics.load(tmp_path, feature_dim=4)
    assert loaded.classes == [0, 1, 2]
    assert loaded.task_of_class == {0: 0, 1: 0, 2: 1}
    for c in range(3):
        torch.testing.assert_close(loaded.covariances[c], stats.covariances[c], rtol=0, atol=0)
    with pytest.raises(ValueError, match="4-d statistics"):
        ClassStatistics.load(tmp_path, feature_dim=8)


def test_cholesky_factor_reproduces_covariance():
    stats = ClassStatistics(5)
    stats.update(torch.randn(50, 5), torch.zeros(50, dtype=torch.long))
    stats.finalize(task_id=0)
    factor = stats.cholesky(0)
    torch.testing.assert_close(factor @ factor.T, stats.covariances[0], rtol=1e-10, atol=1e-12)
