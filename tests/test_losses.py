"""refseg.losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from refseg.losses import bce_loss, dice_loss, instance_contrastive_loss, sigmoid_focal_loss

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# Two 2x2 samples: probabilities [[0.5, 0.5], [0.75, 0.25]] and all 0.5.
LOGITS = torch.tensor([[[0.0, 0.0], [LN3, -LN3]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
TARGETS = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)


def _focal_by_hand(x, t, alpha, gamma):
    p = _sigmoid(x)
    p_t = p if t == 1 else 1 - p
    a_t = 1.0 if alpha is None else (alpha if t == 1 else 1 - alpha)
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def _bce_by_hand(x, t, pos_weight=1.0):
    p = _sigmoid(x)
    return -(pos_weight * t * math.log(p) + (1 - t) * math.log(1 - p))


def _per_element(fn):
    return [[fn(x, t) for x, t in zip(lx.flatten().tolist(), lt.flatten().tolist())] for lx, lt in zip(LOGITS, TARGETS)]


def test_dice_loss_by_hand():
    # sample 0: sum(p t) = 0.5 + 0.75 = 1.25, sum(p) = 2, sum(t) = 2 -> 1 - 3.5 / 5 = 0.3
    # sample 1: sum(p t) = 0, sum(p) = 2, sum(t) = 0 -> 1 - 1 / 3 = 2/3
    per_sample = dice_loss(LOGITS, TARGETS, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([0.3, 2 / 3], dtype=torch.float64))
    assert dice_loss(LOGITS, TARGETS).item() == pytest.approx((0.3 + 2 / 3) / 2, rel=1e-12)
    assert dice_loss(LOGITS, TARGETS, reduction="sum").item() == pytest.approx(0.3 + 2 / 3, rel=1e-12)
    # eps = 0 on sample 0: 1 - 2.5 / 4
    assert dice_loss(LOGITS[:1], TARGETS[:1], eps=0.0).item() == pytest.approx(1 - 2.5 / 4, rel=1e-12)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.65, 2.0), (None, 2.0), (0.5, 0.0)])
def test_sigmoid_focal_loss_by_hand(alpha, gamma):
    values = _per_element(lambda x, t: _focal_by_hand(x, t, alpha, gamma))
    flat = [v for row in values for v in row]
    got = sigmoid_focal_loss(LOGITS, TARGETS, alpha=alpha, gamma=gamma)
    assert got.item() == pytest.approx(sum(flat) / len(flat), rel=1e-12)
    got_sum = sigmoid_focal_loss(LOGITS, TARGETS, alpha=alpha, gamma=gamma, reduction="sum")
    assert got_sum.item() == pytest.approx(sum(flat), rel=1e-12)
    got_none = sigmoid_focal_loss(LOGITS, TARGETS, alpha=alpha, gamma=gamma, reduction="none")
    assert got_none.shape == (2,)
    assert got_none.tolist() == pytest.approx([sum(row) / 4 for row in values], rel=1e-12)


def _soft_focal_by_hand(x, t, alpha, gamma):
    """The documented soft-target generalisation, element by element: p_t = p t + (1 - p)(1 - t),
    alpha_t = alpha t + (1 - alpha)(1 - t), and -log p_t replaced by the soft cross-entropy
    -(t log p + (1 - t) log(1 - p))."""
    p = _sigmoid(x)
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return a_t * (1 - p_t) ** gamma * ce


@pytest.mark.parametrize("alpha,gamma", [(0.65, 2.0), (None, 2.0), (0.25, 1.0)])
def test_sigmoid_focal_loss_on_soft_targets_by_hand(alpha, gamma):
    # soft targets as RISCLIP's token-level target gives them (covered fractions), on both sides of 0.5
    logits = torch.tensor([[[0.0, LN3], [-LN3, 2.0]], [[-1.0, 0.5], [LN3, -2.0]]], dtype=torch.float64)
    targets = torch.tensor([[[0.3, 0.3], [0.75, 0.5]], [[0.25, 0.6], [0.1, 0.9]]], dtype=torch.float64)
    values = [
        [_soft_focal_by_hand(x, t, alpha, gamma) for x, t in zip(lx.flatten().tolist(), lt.flatten().tolist())]
        for lx, lt in zip(logits, targets)
    ]
    # one element worked out in full: p = 0.5, t = 0.3 -> p_t = 0.5, ce = ln 2, alpha_t = 0.3 alpha + 0.7 (1 - alpha)
    a_t = 1.0 if alpha is None else 0.3 * alpha + 0.7 * (1 - alpha)
    assert values[0][0] == pytest.approx(a_t * 0.5**gamma * math.log(2.0), rel=1e-12)
    got = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    assert got.tolist() == pytest.approx([sum(row) / 4 for row in values], rel=1e-12)
    flat = [v for row in values for v in row]
    got_mean = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert got_mean.item() == pytest.approx(sum(flat) / len(flat), rel=1e-12)


def test_focal_gamma_zero_no_alpha_is_bce():
    torch.testing.assert_close(
        sigmoid_focal_loss(LOGITS, TARGETS, alpha=None, gamma=0.0), bce_loss(LOGITS, TARGETS)
    )


def test_focal_is_stable_for_large_logits():
    logits = torch.tensor([[200.0, -200.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0]])
    loss = sigmoid_focal_loss(logits, targets, alpha=None, gamma=2.0, reduction="sum")
    # (1 - p_t)^2 = 1 and -log p_t = 200 for each element
    assert loss.item() == pytest.approx(400.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_bce_loss_by_hand():
    values = _per_element(_bce_by_hand)
    flat = [v for row in values for v in row]
    assert bce_loss(LOGITS, TARGETS).item() == pytest.approx(sum(flat) / 8, rel=1e-12)
    assert bce_loss(LOGITS, TARGETS, reduction="sum").item() == pytest.approx(sum(flat), rel=1e-12)
    assert bce_loss(LOGITS, TARGETS, reduction="none").tolist() == pytest.approx([sum(r) / 4 for r in values])
    weighted = [v for row in _per_element(lambda x, t: _bce_by_hand(x, t, 3.0)) for v in row]
    assert bce_loss(LOGITS, TARGETS, pos_weight=3.0).item() == pytest.approx(sum(weighted) / 8, rel=1e-12)


@pytest.mark.parametrize("loss_fn", [dice_loss, sigmoid_focal_loss, bce_loss, instance_contrastive_loss])
def test_gradients_flow(loss_fn):
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = (torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    # make predictions agree with targets enough that the ICL IoU weights are non-zero
    logits_data = logits.detach() + 4 * (targets - 0.5)
    logits = logits_data.clone().requires_grad_(True)
    loss = loss_fn(logits, targets)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_fn", [dice_loss, sigmoid_focal_loss, bce_loss, instance_contrastive_loss])
def test_bad_arguments(loss_fn):
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(LOGITS, TARGETS, reduction="avg")
    with pytest.raises(ValueError, match="targets"):
        loss_fn(LOGITS, TARGETS[:, :1])
    with pytest.raises(ValueError, match="logits"):
        loss_fn(LOGITS.tolist(), TARGETS)


def test_focal_rejects_bad_alpha_gamma():
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(LOGITS, TARGETS, alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(LOGITS, TARGETS, gamma=-1.0)


# ---- instance contrastive loss (Prompt-RIS eqs. 7-8) ------------------------------------------

# Two sentences, 1x2 masks: S_0 = [0.75, 0.25], S_1 = [0.25, 0.75].
# eq. 7: O_01 = 2 (0.1875 + 0.1875) / (0.625 + 0.625) = 0.6, O_00 = O_11 = 1.
# Both predictions binarise to their targets, so w_0 = w_1 = 1.
ICL_LOGITS = torch.tensor([[LN3, -LN3], [-LN3, LN3]], dtype=torch.float64)


def test_icl_different_instances_by_hand():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # eq. 8: -(1/4) [log O_00 + log(1 - O_01) + log(1 - O_10) + log O_11] = -(1/2) log 0.4
    loss = instance_contrastive_loss(ICL_LOGITS, targets)
    assert loss.item() == pytest.approx(-0.5 * math.log(0.4), rel=1e-12)


def test_icl_same_instance_by_hand():
    # Same object for both sentences -> Y_01 = 1: -(1/4) * 2 log 0.6.  Target [1, 0] for both:
    # w_0 = 1, prediction 1 binarises to [0, 1] -> IoU with [1, 0] is 0, so w_1 = 0:
    # -(1/4) [1 * (log 1 + log 0.6) + 0 * (...)] = -(1/4) log 0.6
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    loss = instance_contrastive_loss(ICL_LOGITS, targets)
    assert loss.item() == pytest.approx(-0.25 * math.log(0.6), rel=1e-12)
    # instance_ids override the target-derived Y: call them the same instance while targets differ
    targets_diff = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss_ids = instance_contrastive_loss(ICL_LOGITS, targets_diff, instance_ids=torch.tensor([7, 7]))
    assert loss_ids.item() == pytest.approx(-0.5 * math.log(0.6), rel=1e-12)


def test_icl_three_sentences_general_formula():
    # 2x2 masks; sentences 0 and 1 describe the same object, sentence 2 another one.
    logits = torch.tensor(
        [[[LN3, LN3], [-LN3, -LN3]], [[LN3, 0.0], [-LN3, -LN3]], [[-LN3, -LN3], [LN3, 0.0]]], dtype=torch.float64
    )
    targets = torch.tensor([[[1, 1], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [1, 1]]], dtype=torch.float64)
    probs = [[_sigmoid(v) for v in row.flatten().tolist()] for row in logits]
    # binarised predictions (p > 0.5): [1,1,0,0], [1,0,0,0], [0,0,1,0] -> IoU 1, 1/2, 1/2
    weights = [1.0, 0.5, 0.5]
    same = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    total = 0.0
    for i in range(3):
        for j in range(3):
            dot = sum(a * b for a, b in zip(probs[i], probs[j]))
            o = 2 * dot / (sum(a * a for a in probs[i]) + sum(b * b for b in probs[j]))
            term = math.log(o) if same[i][j] else math.log(1 - o)
            total += weights[i] * term
    expected = -total / 9
    assert instance_contrastive_loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)


def test_icl_groups_and_reduction():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # group 0 = the two-sentence case above, group 5 = one sentence alone (contributes exactly 0)
    logits = torch.cat([ICL_LOGITS, ICL_LOGITS[:1]])
    all_targets = torch.cat([targets, targets[:1]])
    group_ids = torch.tensor([0, 0, 5])
    per_group = instance_contrastive_loss(logits, all_targets, group_ids, reduction="none")
    assert per_group.shape == (2,)
    assert per_group.tolist() == pytest.approx([-0.5 * math.log(0.4), 0.0], abs=1e-12)
    mean = instance_contrastive_loss(logits, all_targets, group_ids)
    assert mean.item() == pytest.approx(-0.25 * math.log(0.4), rel=1e-12)
    total = instance_contrastive_loss(logits, all_targets, group_ids, reduction="sum")
    assert total.item() == pytest.approx(-0.5 * math.log(0.4), rel=1e-12)
    # pairs never cross images: interleaving the samples of two images changes nothing
    interleaved = instance_contrastive_loss(
        torch.stack([ICL_LOGITS[0], ICL_LOGITS[0], ICL_LOGITS[1]]),
        torch.stack([targets[0], targets[0], targets[1]]),
        torch.tensor([1, 2, 1]),
        reduction="none",
    )
    assert interleaved.tolist() == pytest.approx([-0.5 * math.log(0.4), 0.0], abs=1e-12)


def test_icl_rejects_bad_group_ids():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="group_ids"):
        instance_contrastive_loss(ICL_LOGITS.float(), targets, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="instance_ids"):
        instance_contrastive_loss(ICL_LOGITS.float(), targets, instance_ids=[1, 2])


# ------------------------------------------------------------------ empty targets (generalized RIS: no referent)
def test_losses_on_an_empty_target_push_every_pixel_down_and_stay_finite():
    """docs/generalized.md: dice on an empty target is S / (S + 1) (S the sum of the probabilities), with gradient
    1 / (S + 1)^2 per probability; BCE and focal are their per-pixel background terms, averaged; all finite."""
    logits = torch.tensor([[[0.5, -1.0], [2.0, -3.0]]], requires_grad=True)
    empty = torch.zeros(1, 2, 2)
    p = logits.detach().sigmoid()
    total = p.sum()
    dice = dice_loss(logits, empty)
    torch.testing.assert_close(dice, total / (total + 1))
    dice.backward()
    torch.testing.assert_close(logits.grad, (p * (1 - p)) / (total + 1) ** 2)  # d/dlogit = dS/dp * p(1 - p)
    assert (logits.grad > 0).all()  # every logit pushed down
    torch.testing.assert_close(bce_loss(logits, empty), -torch.log(1 - p).mean())
    focal = sigmoid_focal_loss(logits, empty, alpha=0.65, gamma=2.0)
    torch.testing.assert_close(focal, (0.35 * p**2 * -torch.log(1 - p)).mean())
    for loss in (dice, bce_loss(logits, empty), focal):
        assert torch.isfinite(loss)


def test_contrastive_loss_treats_each_no_target_row_as_its_own_instance():
    """Two rows of one image with empty targets are two instances (Y = 0 between them), so their predictions are
    pushed apart, not together; a row with a target and a no-target row likewise."""
    # rows 0 and 1: predicted empty at 0.5 (so w_i = 1), the same faint blob in both
    logits = torch.tensor([[-1.0, -1.0, -3.0, -3.0], [-1.0, -1.0, -3.0, -3.0], [-2.0, -2.0, 2.0, 2.0]])
    targets = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    apart = instance_contrastive_loss(logits, targets, iou_threshold=0.5)
    together = instance_contrastive_loss(logits, targets, instance_ids=torch.tensor([7, 7, 8]), iou_threshold=0.5)
    explicit = instance_contrastive_loss(logits, targets, instance_ids=torch.tensor([-1, -2, 8]), iou_threshold=0.5)
    torch.testing.assert_close(apart, explicit)  # derived from the targets = one instance per no-target row
    assert apart > together + 1.0  # rows 0 and 1 share a blob: costly as two instances, free as one
