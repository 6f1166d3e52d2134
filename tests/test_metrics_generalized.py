"""Generalized referring segmentation metrics (gIoU, cIoU, N-acc, T-acc, precision@X on target samples),
against a hand computation on eight samples, with GSVA's accuracies (default) and ReLA's released ones."""

import numpy as np
import pytest

from refseg.metrics import ReferringIoU, generalized_counts, summarize_generalized_counts


def _mask(pixels, shape=(4, 5)):
    mask = np.zeros(shape, dtype=bool)
    mask.flat[list(pixels)] = True
    return mask


# (prediction pixels, reference pixels); 3 no-target samples (empty reference), 5 with a target
SAMPLES = [
    ([], []),                    # no target, predicted empty          -> IoU 1, N hit
    ([], []),                    # no target, predicted empty          -> IoU 1, N hit
    ([0, 1, 2], []),             # no target, predicted 3 pixels       -> IoU 0, U += 3
    ([4, 5, 6, 7], [4, 5, 6, 7]),  # target, exact                     -> I 4, U 4, IoU 1
    ([4, 5], [4, 5, 6, 7]),      # target, half                        -> I 2, U 4, IoU 0.5
    ([], [8, 9]),                # target, predicted empty             -> I 0, U 2, IoU 0, T miss
    ([10, 11, 12], [11, 12, 13]),  # target                            -> I 2, U 4, IoU 0.5
    ([14, 15, 16, 17, 18], [14, 15, 16, 17]),  # target                -> I 4, U 5, IoU 0.8
]


def _hand():
    ious = [1, 1, 0, 1, 0.5, 0, 0.5, 0.8]
    inter = 0 + 0 + 0 + 4 + 2 + 0 + 2 + 4
    union = 0 + 0 + 3 + 4 + 4 + 2 + 4 + 5
    target_ious = [1, 0.5, 0, 0.5, 0.8]
    return {
        "gIoU": sum(ious) / 8,
        "cIoU": inter / union,
        "N-acc": 2 / 3,          # no-target samples predicted empty
        "T-acc": 4 / 5,          # target samples predicted non-empty
        "precision@0.5": sum(i > 0.5 for i in target_ious) / 5,   # strictly above: 1, 0.8
        "precision@0.8": sum(i > 0.8 for i in target_ious) / 5,
        "precision@0.5>=": sum(i >= 0.5 for i in target_ious) / 5,  # at least: 1, 0.5, 0.5, 0.8
    }


def test_generalized_metrics_equal_the_hand_computation():
    predictions = [_mask(p) for p, _ in SAMPLES]
    references = [_mask(r) for _, r in SAMPLES]
    hand = _hand()
    metric = ReferringIoU(generalized=True)
    metric.add_batch(predictions=predictions, references=references)
    result = metric.compute()
    for key in ("gIoU", "cIoU", "N-acc", "T-acc", "precision@0.5", "precision@0.8"):
        assert result[key] == pytest.approx(hand[key]), key
    assert result["num_samples"] == 8 and result["num_no_target"] == 3
    inclusive = summarize_generalized_counts(generalized_counts(predictions, references), precision_comparison=">=")
    assert inclusive["precision@0.5"] == pytest.approx(hand["precision@0.5>="])
    # ReLA's released code: TP = 2 (no target, empty), FN = 1, FP = 1 (target predicted empty), each +1
    rela = ReferringIoU(generalized=True, accuracy_convention="rela").compute(predictions=predictions,
                                                                               references=references)
    assert rela["N-acc"] == pytest.approx(2 / (2 + 1 + 1)) and rela["T-acc"] == pytest.approx(2 / (2 + 1 + 1))
    assert rela["gIoU"] == result["gIoU"] and rela["cIoU"] == result["cIoU"]


def test_the_plain_metric_is_unchanged_and_the_generalized_one_treats_empty_targets_apart():
    predictions = [_mask(p) for p, _ in SAMPLES]
    references = [_mask(r) for _, r in SAMPLES]
    plain = ReferringIoU().compute(predictions=predictions, references=references)
    assert "gIoU" not in plain and plain["mIoU"] == pytest.approx(_hand()["gIoU"])  # empty/empty counts 1 there too
    assert plain["precision@0.5"] == pytest.approx(4 / 8)  # over every sample, no-target ones included


def test_accuracies_without_samples_of_a_kind():
    targets_only = generalized_counts([_mask([1])], [_mask([1])])
    assert summarize_generalized_counts(targets_only)["N-acc"] is None
    assert summarize_generalized_counts(targets_only, accuracy_convention="rela")["N-acc"] == 0.0
    no_targets = generalized_counts([_mask([])], [_mask([])])
    result = summarize_generalized_counts(no_targets)
    assert result["T-acc"] is None and result["precision@0.5"] is None and result["gIoU"] == 1.0
    with pytest.raises(ValueError, match="accuracy_convention"):
        ReferringIoU(generalized=True, accuracy_convention="gres")
    with pytest.raises(ValueError, match="U = P \\+ G - I"):
        summarize_generalized_counts([[1, 1, 1, 2]])
