import warnings

import numpy as np
import pytest
import torch

from slca_peft.method import ClassStatistics
from slca_peft.method.statistics import STATISTICS_FILE


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


# ---------------------------------------------------------------------------- compact storage
def _class_data(n, d, seed, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=gen, dtype=torch.float64) * 2
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale + offset).float()


def _reference_cov(x, ridge):
    x = x.double().numpy()
    d = x.shape[1]
    cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((d, d))
    return cov + ridge * np.eye(d)


@pytest.mark.parametrize("form", ["exact", "low_rank"])
def test_low_rank_factor_reproduces_the_full_covariance_when_n_le_d(form):
    d = 48
    sizes = [2, 5, 20, 24, 40, 48]  # all n_c <= d; exact switches to the Cholesky factor above (d+1)/2
    stats = ClassStatistics(d, ridge=1e-4, covariance_form=form)
    data = {c: _class_data(n, d, seed=c) for c, n in enumerate(sizes)}
    for c, x in data.items():
        stats.update(x, torch.full((len(x),), c))
    stats.finalize(task_id=0)
    for c, x in data.items():
        n = len(x)
        low_rank = form == "low_rank" or (n - 1) * d < d * (d + 1) // 2
        assert stats.ranks[c] == (n - 1 if low_rank else d)
        np.testing.assert_allclose(stats.covariances[c].numpy(), _reference_cov(x, 1e-4), rtol=0, atol=1e-10)
        if low_rank:
            factor = stats._factors[c]
            assert factor.shape == (d, n - 1) and factor.dtype == torch.float64
            torch.testing.assert_close(stats._noise[c], torch.full((d,), 1e-4, dtype=torch.float64))


def test_exact_form_is_smaller_and_equal_to_the_full_form():
    d = 64
    exact, full = ClassStatistics(d), ClassStatistics(d, covariance_form="full")
    for stats in (exact, full):
        for c in range(4):
            stats.update(_class_data(10, d, seed=c), torch.full((10,), c))
        stats.finalize(0)
    for c in range(4):
        torch.testing.assert_close(exact.covariances[c], full.covariances[c], rtol=0, atol=1e-10)
    # 4 x (d x 9) factors versus 4 packed d x d triangles.
    assert exact.memory_bytes()["statistics"] * 3 < full.memory_bytes()["statistics"]


def test_truncated_low_rank_and_diagonal_forms():
    d, n, k = 32, 200, 6  # 6 latent directions plus isotropic noise: what PPCA models
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(d, 6, generator=gen)
    x = torch.randn(n, 6, generator=gen) @ basis.T * 2 + 0.3 * torch.randn(n, d, generator=gen)
    ref = torch.tensor(_reference_cov(x, 1e-4))
    low = ClassStatistics(d, covariance_form="low_rank", covariance_rank=k)
    diag = ClassStatistics(d, covariance_form="diagonal")
    for stats in (low, diag):
        stats.update(x, torch.zeros(n, dtype=torch.long))
        stats.finalize(0)
    assert low.ranks[0] == k and diag.ranks[0] == 0
    cov = low.covariances[0]
    # Probabilistic PCA keeps the total variance and the top directions' variance.
    torch.testing.assert_close(cov.trace(), ref.trace(), rtol=1e-10, atol=0)
    top_ref = torch.linalg.eigvalsh(ref).flip(0)[:k]
    top = torch.linalg.eigvalsh(cov).flip(0)[:k]
    torch.testing.assert_close(top, top_ref, rtol=1e-8, atol=0)
    assert torch.linalg.eigvalsh(cov).min() > 0
    rel = (cov - ref).norm() / ref.norm()
    assert 0 < rel < 0.1
    torch.testing.assert_close(diag.covariances[0], torch.diag(ref.diagonal()), rtol=1e-10, atol=1e-12)
    # A rank above the data's rank is exact.
    exact = ClassStatistics(d, covariance_form="low_rank", covariance_rank=30)
    exact.update(x[:10], torch.zeros(10, dtype=torch.long))
    exact.finalize(0)
    assert exact.ranks[0] == 9
    np.testing.assert_allclose(exact.covariances[0].numpy(), _reference_cov(x[:10], 1e-4), rtol=0, atol=1e-10)


def test_bad_covariance_options_are_refused():
    with pytest.raises(ValueError, match="covariance_form"):
        ClassStatistics(4, covariance_form="dense")
    with pytest.raises(ValueError, match="covariance_rank applies"):
        ClassStatistics(4, covariance_rank=2)
    with pytest.raises(ValueError, match=">= 1"):
        ClassStatistics(4, covariance_form="low_rank", covariance_rank=0)


def test_update_under_inference_mode_gives_the_same_numbers():
    d = 8
    x = _class_data(30, d, seed=1)
    y = torch.tensor([0, 1, 2] * 10)
    plain, inference = ClassStatistics(d), ClassStatistics(d)
    plain.update(x, y)
    with torch.inference_mode():
        for lo in range(0, 30, 7):
            inference.update(x[lo : lo + 7], y[lo : lo + 7])
    plain.finalize(0)
    inference.finalize(0)
    for c in range(3):
        torch.testing.assert_close(inference.means[c], plain.means[c], rtol=1e-15, atol=1e-13)
        torch.testing.assert_close(inference.covariances[c], plain.covariances[c], rtol=1e-13, atol=1e-13)


def test_sharded_statistics_reduce_to_the_single_process_numbers(monkeypatch):
    """Two shards reduce in the same blocks; the sums stay exact whatever the block size."""
    import slca_peft.method.statistics as module

    monkeypatch.setattr(module, "_FINALIZE_BLOCK_ELEMENTS", 2 * 6 * 6)  # 2 classes per block
    d = 6
    x = _class_data(60, d, seed=2)
    y = torch.arange(60) % 5
    single, shard_a, shard_b = ClassStatistics(d), ClassStatistics(d), ClassStatistics(d)
    single.update(x, y)
    single.finalize(0)
    shard_a.update(x[:25], y[:25])
    shard_b.update(x[25:], y[25:])
    sent = []
    shard_b.finalize(0, classes=list(range(5)), reduce=lambda t: sent.append(t.clone()) or t)
    assert len(sent) == 1 + 3  # the counts, then three blocks of classes
    shard_a.finalize(0, classes=list(range(5)), reduce=lambda t: t + sent.pop(0))
    for c in range(5):
        assert shard_a.counts[c] == single.counts[c] == 12
        torch.testing.assert_close(shard_a.means[c], single.means[c], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(shard_a.covariances[c], single.covariances[c], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    ("form", "rank"), [("exact", None), ("full", None), ("low_rank", 3), ("diagonal", None)]
)
def test_every_form_round_trips_through_safetensors(tmp_path, form, rank):
    d = 12
    stats = ClassStatistics(d, ridge=1e-3, covariance_form=form, covariance_rank=rank)
    for task, sizes in enumerate([[3, 40], [1, 8]]):
        for i, n in enumerate(sizes):
            c = 2 * task + i
            stats.update(_class_data(n, d, seed=c), torch.full((n,), c))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats.finalize(task)
    stats.save(tmp_path)
    loaded = ClassStatistics.load(tmp_path, feature_dim=d)
    assert (loaded.covariance_form, loaded.covariance_rank, loaded.ridge) == (form, rank, 1e-3)
    assert loaded.task_of_class == stats.task_of_class and loaded.counts == stats.counts
    assert loaded.ranks == stats.ranks
    for c in stats.classes:
        torch.testing.assert_close(loaded.means[c], stats.means[c], rtol=0, atol=0)
        torch.testing.assert_close(loaded.covariances[c], stats.covariances[c], rtol=0, atol=0)


def test_damaged_statistics_files_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    stats = ClassStatistics(4)
    stats.update(_class_data(6, 4, seed=0), torch.zeros(6, dtype=torch.long))
    stats.finalize(0)
    path = stats.save(tmp_path)
    state = load_file(str(path))
    save_file({**state, "factors": state["factors"][:-1]}, str(path), metadata=stats.metadata())
    with pytest.raises(ValueError, match="factor entries"):
        ClassStatistics.load(tmp_path)
    save_file({**state, "ranks": state["ranks"] + 9}, str(path), metadata=stats.metadata())
    with pytest.raises(ValueError, match="kinds or ranks"):
        ClassStatistics.load(tmp_path)
    save_file({k: v for k, v in state.items() if k != "noise"}, str(path), metadata=stats.metadata())
    with pytest.raises(ValueError, match="expected"):
        ClassStatistics.load(tmp_path)
    save_file({**state, "means": state["means"] * float("nan")}, str(path), metadata=stats.metadata())
    with pytest.raises(ValueError, match="non-finite"):
        ClassStatistics.load(tmp_path)
    save_file({**state, "ranks": state["ranks"].double()}, str(path), metadata=stats.metadata())
    with pytest.raises(ValueError, match="unexpected dtype"):
        ClassStatistics.load(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        ClassStatistics.load(tmp_path)


def test_a_file_with_other_tensors_is_refused_with_the_expected_layout(tmp_path):
    from safetensors.torch import save_file

    d = 5
    x = _class_data(30, d, seed=3)
    cov = torch.tensor(_reference_cov(x, 1e-4))
    save_file(
        {
            "classes": torch.tensor([4]), "tasks": torch.tensor([1]), "counts": torch.tensor([30]),
            "means": x.double().mean(0, keepdim=True), "covariances": cov[None].contiguous(),
            "ridge": torch.tensor(1e-4, dtype=torch.float64),
        },
        str(tmp_path / STATISTICS_FILE),
    )
    with pytest.raises(ValueError, match=r"holds tensors \['classes', 'counts', 'covariances'.*expected"):
        ClassStatistics.load(tmp_path, feature_dim=d)


def test_covariances_is_a_read_only_view_in_class_order():
    stats = ClassStatistics(3)
    stats.update(torch.randn(9, 3), torch.tensor([5, 5, 5, 1, 1, 1, 3, 3, 3]))
    stats.finalize(0)
    assert list(stats.covariances) == [1, 3, 5] and len(stats.covariances) == 3
    assert 3 in stats.covariances and 2 not in stats.covariances
    with pytest.raises(KeyError):
        stats.covariances[2]
    assert stats.covariances[1].shape == (3, 3) and stats.covariances[1].dtype == torch.float64


def test_outer_sums_in_padded_blocks_match_numpy():
    d = 200  # two 128-wide blocks, the second one padded
    x = _class_data(300, d, seed=4)
    y = torch.arange(300) % 2
    stats = ClassStatistics(d, covariance_form="full")
    for lo in range(0, 300, 64):
        stats.update(x[lo : lo + 64], y[lo : lo + 64])
    stats.finalize(0)
    for c in range(2):
        np.testing.assert_allclose(stats.covariances[c].numpy(), _reference_cov(x[y == c], 1e-4), rtol=0, atol=1e-10)


def test_a_covariance_that_is_not_positive_definite_gets_a_growing_ridge():
    # Class 7's features vary along one direction only: its covariance is singular, and with no
    # ridge the Cholesky factorisation fails until a ridge is added.
    x = torch.zeros(10, 3, dtype=torch.float64)
    x[:, 0] = torch.linspace(-1, 1, 10)
    stats = ClassStatistics(3, ridge=0.0, covariance_form="full")
    stats.update(x, torch.full((10,), 7))
    with pytest.warns(UserWarning, match="class 7 is not positive definite"):
        stats.finalize(0)
    cov = stats.covariances[7]
    assert torch.linalg.eigvalsh(cov).min() > 0
    torch.testing.assert_close(cov, torch.cov(x.T), rtol=0, atol=1e-6)
