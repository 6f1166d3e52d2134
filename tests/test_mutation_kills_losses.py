"""Tests written to kill mutants of `refseg.losses` that survived `bash scripts/mutation_test.sh losses`.

Each test pins documented behaviour that tests/test_losses.py left open: error messages, the
(B,) boundary of the input check, per-sample reduction, the focal defaults and the bounds of
`alpha`, the output dtype for non-float targets, and the IoU weights of the contrastive loss.
"""

import pytest
import torch
import torch.nn.functional as F

from refseg.losses import bce_loss, dice_loss, instance_contrastive_loss, sigmoid_focal_loss

LOSSES = (dice_loss, sigmoid_focal_loss, bce_loss, instance_contrastive_loss)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_non_tensor_inputs_are_named_in_the_error(loss_fn):
    with pytest.raises(ValueError, match=r"got list and Tensor"):
        loss_fn([0.0, 1.0], torch.zeros(2))
    with pytest.raises(ValueError, match=r"got Tensor and list"):
        loss_fn(torch.zeros(2), [0.0, 1.0])


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_zero_dim_logits_are_rejected_with_their_shape(loss_fn):
    with pytest.raises(ValueError, match=r"batch dimension \(B, \.\.\.\), got shape \(\)"):
        loss_fn(torch.tensor(0.5), torch.tensor(1.0))


def test_one_dimensional_logits_are_a_batch_of_scalars():
    logits = torch.tensor([2.0, -1.0, 0.5])
    targets = torch.tensor([1.0, 0.0, 1.0])
    p = logits.sigmoid()
    expected_dice = 1 - (2 * p * targets + 1) / (p + targets + 1)
    torch.testing.assert_close(dice_loss(logits, targets, reduction="none"), expected_dice)
    expected_bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(bce_loss(logits, targets, reduction="none"), expected_bce)
    assert sigmoid_focal_loss(logits, targets, reduction="none").shape == (3,)


@pytest.mark.parametrize("loss_fn", (sigmoid_focal_loss, bce_loss))
def test_reduction_none_averages_each_sample_over_its_pixels(loss_fn):
    # B=2 differs from every other dimension, so a reshape on the wrong axis shows.
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = (torch.rand(2, 3, 5) > 0.5).float()
    per_sample = loss_fn(logits, targets, reduction="none")
    assert per_sample.shape == (2,)
    for i in range(2):
        torch.testing.assert_close(per_sample[i], loss_fn(logits[i : i + 1], targets[i : i + 1]))


def test_focal_default_gamma_is_two():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 4) * 3
    targets = (torch.rand(2, 4, 4) > 0.5).float()
    default = sigmoid_focal_loss(logits, targets)
    torch.testing.assert_close(default, sigmoid_focal_loss(logits, targets, gamma=2.0))
    assert not torch.allclose(default, sigmoid_focal_loss(logits, targets, gamma=3.0))


def test_focal_alpha_bounds_are_inclusive():
    logits = torch.tensor([[1.5, -0.5, 0.3, -2.0]])
    positives = torch.ones(1, 4)
    negatives = torch.zeros(1, 4)
    # alpha = 0 weights positives by 0, alpha = 1 weights negatives by 0: both are valid.
    assert sigmoid_focal_loss(logits, positives, alpha=0.0).item() == 0.0
    assert sigmoid_focal_loss(logits, negatives, alpha=1.0).item() == 0.0
    assert sigmoid_focal_loss(logits, negatives, alpha=0.0).item() > 0.0
    assert sigmoid_focal_loss(logits, positives, alpha=1.0).item() > 0.0
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="alpha"):
            sigmoid_focal_loss(logits, positives, alpha=bad)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_targets_of_another_dtype_are_cast_to_the_logits_dtype(loss_fn):
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 4)
    float_targets = (torch.rand(3, 4, 4) > 0.5).float()
    reference = loss_fn(logits, float_targets)
    for targets in (float_targets.bool(), float_targets.double()):
        out = loss_fn(logits, targets)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference)


def _reference_contrastive(probs, same, weights):
    """Eq. 8 for one image, written out with explicit IoU weights w_i."""
    gram = probs @ probs.t()
    sq = torch.diagonal(gram)
    overlap = 2 * gram / (sq[:, None] + sq[None, :])
    terms = same * torch.log(overlap.clamp_min(1e-6)) + (1 - same) * torch.log((1 - overlap).clamp_min(1e-6))
    return -(weights[:, None] * terms).sum() / probs.shape[0] ** 2


def test_contrastive_weight_is_one_when_prediction_and_target_are_both_empty():
    # Sample 0: every probability below the 0.5 threshold and an empty target -> w_0 = 1.
    logits = torch.tensor([[-1.0, -0.5, -1.0, -0.5], [3.0, 3.0, -3.0, -3.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    ids = torch.tensor([0, 1])
    same = torch.eye(2)
    expected = _reference_contrastive(logits.sigmoid(), same, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(instance_contrastive_loss(logits, targets, instance_ids=ids), expected)


def test_contrastive_weight_is_zero_for_a_single_wrong_pixel():
    # Sample 0 predicts one pixel, its target is empty: union 1, intersection 0 -> w_0 = 0.
    logits = torch.tensor([[2.0, -2.0, -2.0, -2.0], [3.0, 3.0, -3.0, -3.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    ids = torch.tensor([0, 1])
    same = torch.eye(2)
    expected = _reference_contrastive(logits.sigmoid(), same, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(instance_contrastive_loss(logits, targets, instance_ids=ids), expected)


def test_targets_of_exactly_one_half_are_background():
    # `targets > 0.5` binarises: 0.5 is background for both Y (same instance) and w_i. Both
    # predictions are empty at the 0.5 threshold, so w_i = 1 when the targets count as empty.
    logits = torch.tensor([[-0.1, -0.1, -3.0, -3.0], [-0.1, -3.0, -0.1, -3.0]])
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 4)
    loss = instance_contrastive_loss(logits, half)
    assert loss.item() > 0
    torch.testing.assert_close(loss, instance_contrastive_loss(logits, zeros))
    # ... and Y of the zero targets is the identity: two rows with no referent are two instances
    # (generalized RIS), not one, although their (empty) masks are identical.
    expected = _reference_contrastive(logits.sigmoid(), torch.eye(2), torch.ones(2))
    torch.testing.assert_close(loss, expected)


def test_contrastive_id_errors_name_the_argument_and_the_shape():
    logits = torch.zeros(3, 4)
    targets = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"`group_ids` must be a tensor of shape \(3,\) .*got \(2,\)"):
        instance_contrastive_loss(logits, targets, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`instance_ids` must be a tensor of shape \(3,\) .*got \(3, 1\)"):
        instance_contrastive_loss(logits, targets, instance_ids=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`group_ids` .*got list"):
        instance_contrastive_loss(logits, targets, [0, 0, 0])
