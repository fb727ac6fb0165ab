import math

import pytest
import torch
import torch.nn.functional as F

from slca_peft.method import symmetric_cross_entropy


def hand_sce(logits: list[float], label: int, alpha: float, beta: float) -> float:
    exps = [math.exp(z) for z in logits]
    probs = [e / sum(exps) for e in exps]
    ce = -math.log(probs[label])
    rce = -sum(min(max(p, 1e-7), 1.0) * math.log(1.0 if k == label else 1e-4) for k, p in enumerate(probs))
    return alpha * ce + beta * rce


def test_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    expected = (hand_sce([2.0, 0.5, -1.0], 0, 1.0, 0.1) + hand_sce([0.1, 0.2, 0.3], 2, 1.0, 0.1)) / 2
    assert symmetric_cross_entropy(logits, labels, 1.0, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_confident_wrong_prediction_is_bounded_by_the_clamp():
    # Softmax puts ~1 on class 1 while the label is 0: RCE = -log(1e-4) * (1 - p_0) ~ 9.21, not infinity.
    logits = torch.tensor([[-30.0, 30.0]])
    labels = torch.tensor([0])
    rce_only = symmetric_cross_entropy(logits, labels, alpha=0.0, beta=1.0).item()
    assert rce_only == pytest.approx(-math.log(1e-4), rel=1e-5)
    # The CE part is unbounded (60 here), the reverse part is not.
    assert symmetric_cross_entropy(logits, labels, 1.0, 0.0).item() == pytest.approx(60.0, rel=1e-4)


def test_softmax_floor_of_1e_minus_7_enters_the_reverse_term():
    # A confident correct prediction: wrong-class probabilities are ~1e-26, clamped up to 1e-7 each.
    logits = torch.tensor([[30.0, -30.0, -30.0]])
    rce = symmetric_cross_entropy(logits, torch.tensor([0]), 0.0, 1.0).item()
    assert rce == pytest.approx(2 * 1e-7 * -math.log(1e-4), rel=1e-3)
    assert rce == pytest.approx(hand_sce([30.0, -30.0, -30.0], 0, 0.0, 1.0), rel=1e-3)


def test_alpha_beta_weighting_and_gradient_flows():
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    loss = symmetric_cross_entropy(logits, labels, 0.5, 0.5)
    ce = F.cross_entropy(logits, labels)
    rce = symmetric_cross_entropy(logits, labels, 0.0, 1.0)
    assert loss.item() == pytest.approx(0.5 * ce.item() + 0.5 * rce.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match="current task"):
        symmetric_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_a_task_of_one_class_gives_zero_loss_and_zero_gradient():
    # Why the continual loop warns about one-class tasks: over a single logit nothing is learned.
    logits = torch.randn(6, 1, requires_grad=True)
    loss = symmetric_cross_entropy(logits, torch.zeros(6, dtype=torch.long), 1.0, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
