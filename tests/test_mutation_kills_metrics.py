"""Tests written to kill mutants of `refseg.metrics.referring_iou` that survived
`bash scripts/mutation_test.sh metrics`: argument errors and their messages, the shape check of
`counts`, the threshold 0 boundary, a union of one pixel, tensors that require grad, and the
metric's card text.
"""

import numpy as np
import pytest
import torch

from refseg.metrics import ReferringIoU, intersection_union, summarize_counts


def test_missing_predictions_or_references_raise_value_error():
    mask = np.ones((2, 2), bool)
    for predictions, references in (([mask], None), (None, [mask])):
        with pytest.raises(ValueError, match=r"^both `predictions` and `references` are required$"):
            intersection_union(predictions, references)


def test_errors_name_the_argument_and_the_index():
    good = np.ones((2, 2), bool)
    with pytest.raises(ValueError, match=r"^`predictions`\[1\] must be a 2-D mask"):
        intersection_union([good, np.ones(3, bool)], [good, good])
    with pytest.raises(ValueError, match=r"^`references`\[0\] must be a 2-D mask"):
        intersection_union([good], [np.ones(3, bool)])
    with pytest.raises(ValueError, match=r"compare masks at the same \(original image\) size$"):
        intersection_union([good], [np.ones((3, 3), bool)])


def test_counts_with_three_columns_are_rejected():
    with pytest.raises(ValueError, match=r"non-empty \(N, 2\) array"):
        summarize_counts([[1, 2, 3], [1, 2, 3]])


def test_convention_and_count_errors_have_their_messages():
    with pytest.raises(ValueError, match=r"^`precision_comparison` must be '>' \(IoU strictly above X"):
        summarize_counts([[1, 2]], precision_comparison="<")
    with pytest.raises(ValueError, match=r"^`empty_iou` \(IoU of a sample whose"):
        summarize_counts([[1, 2]], empty_iou=2)
    with pytest.raises(ValueError, match=r"^`counts` must satisfy 0 <= intersection <= union for every sample$"):
        summarize_counts([[3, 2]])


def test_threshold_zero_is_allowed_and_follows_the_comparison():
    counts = [[0, 0], [0, 4], [1, 4]]  # an empty sample, an IoU of 0, an IoU of 1/4
    strict = summarize_counts(counts, thresholds=(0.0,), empty_iou=0)
    inclusive = summarize_counts(counts, thresholds=(0.0,), empty_iou=0, precision_comparison=">=")
    assert strict["precision@0"] == pytest.approx(1 / 3)  # only 1/4 > 0
    assert inclusive["precision@0"] == 1.0  # every IoU is >= 0, the empty one (0) included


def test_a_single_pixel_union_is_an_iou_of_one():
    result = summarize_counts([[1, 1], [0, 1]])
    assert result["mIoU"] == 0.5 and result["oIoU"] == 0.5
    assert result["precision@0.9"] == 0.5


def test_tensors_that_require_grad_are_accepted():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]], requires_grad=True)
    reference = torch.tensor([[1, 0], [0, 0]])
    np.testing.assert_array_equal(intersection_union([logits], [reference]), [[1, 4]])


def test_metric_card_text(tmp_path):
    metric = ReferringIoU(cache_dir=str(tmp_path))
    assert "overall IoU" in metric.description
    assert "yu2016modeling" in metric.citation
    assert "precision_comparison" in metric.inputs_description
