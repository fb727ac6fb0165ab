import pytest
import torch

from slca_peft.models import ContinualClassifier


def test_grow_initialises_and_freezes_old_heads():
    torch.manual_seed(0)
    clf = ContinualClassifier(64)
    clf.grow(10)
    clf.grow(5)
    assert clf.task_sizes == [10, 5] and clf.num_classes == 15 and clf.task_offsets() == [0, 10, 15]
    assert not clf.heads[0].weight.requires_grad and clf.heads[1].weight.requires_grad
    new = clf.heads[1]
    assert torch.count_nonzero(new.bias) == 0
    # trunc_normal_(std=0.02) with timm's absolute bounds [-2, 2] (the released `convs/linears.py`): N(0, 0.02^2).
    assert 0.016 < new.weight.std().item() < 0.024
    assert clf(torch.randn(3, 64)).shape == (3, 15)


def test_scales_multiply_each_task_input():
    clf = ContinualClassifier(4, [2, 2])
    x = torch.randn(5, 4)
    base = clf(x)
    clf.scales[0] = 1.5
    scaled = clf(x)
    torch.testing.assert_close(scaled[:, :2] - clf.heads[0].bias, 1.5 * (base[:, :2] - clf.heads[0].bias))
    torch.testing.assert_close(scaled[:, 2:], base[:, 2:])


def test_snapshot_restore_round_trip_and_mismatch():
    clf = ContinualClassifier(4, [2])
    snap = clf.snapshot()
    with torch.no_grad():
        clf.heads[0].weight.add_(1.0)
        clf.scales.fill_(2.0)
    clf.restore(snap)
    torch.testing.assert_close(clf.heads[0].weight, snap["heads.0.weight"])
    assert clf.scales.tolist() == [1.0]
    clf.grow(3)
    with pytest.raises(ValueError, match="same number of grow"):
        clf.restore(snap)


def test_one_matmul_forward_equals_scaled_heads():
    torch.manual_seed(0)
    clf = ContinualClassifier(12, [4, 2, 5])
    with torch.no_grad():
        clf.scales.copy_(torch.tensor([1.06, 1.03, 1.0]))
        for head in clf.heads:
            head.bias.normal_()
    x = torch.randn(6, 12)
    per_head = torch.cat([head(x * clf.scales[i]) for i, head in enumerate(clf.heads)], dim=1)
    torch.testing.assert_close(clf(x), per_head, rtol=1e-5, atol=1e-6)
    clf(x).sum().backward()  # the newest head trains through the fused weight, the old ones stay frozen
    assert clf.heads[-1].weight.grad is not None and clf.heads[0].weight.grad is None
