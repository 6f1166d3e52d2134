"""The referring_iou metric on hand-computed cases, through refseg and through evaluate.load."""

import threading

import evaluate
import numpy as np
import pytest
import torch

from refseg.metrics import REFERRING_IOU_PATH, ReferringIoU, intersection_union, summarize_counts

KEYS = ["oIoU", "mIoU", "precision@0.5", "precision@0.6", "precision@0.7", "precision@0.8", "precision@0.9",
        "num_samples"]


def _mask(shape, on):
    """Bool mask of `shape` with the flat indices in `on` set."""
    mask = np.zeros(shape, dtype=bool)
    mask.flat[list(on)] = True
    return mask


def _pair(inter, union, shape=(4, 5)):
    """(prediction, reference) with exactly `inter` shared pixels and `union` pixels in total."""
    pred = _mask(shape, range(union))
    ref = _mask(shape, range(inter))
    return pred, ref


@pytest.fixture
def metric(tmp_path):
    return ReferringIoU(cache_dir=str(tmp_path))


def test_identical_masks_score_one(metric):
    masks = [_mask((3, 4), [0, 5, 6]), _mask((2, 7), range(14))]
    result = metric.compute(predictions=masks, references=[m.copy() for m in masks])
    assert list(result) == KEYS
    assert result == {**{k: 1.0 for k in KEYS[:-1]}, "num_samples": 2}


def test_disjoint_masks_score_zero(metric):
    result = metric.compute(predictions=[_mask((2, 2), [0])], references=[_mask((2, 2), [3])])
    assert result == {**{k: 0.0 for k in KEYS[:-1]}, "num_samples": 1}


def test_empty_masks(metric):
    # empty prediction & empty reference: IoU 1; empty prediction & non-empty reference: IoU 0
    empty = np.zeros((3, 3), dtype=bool)
    result = metric.compute(predictions=[empty, empty], references=[empty, _mask((3, 3), [4])])
    assert result["mIoU"] == 0.5
    assert result["oIoU"] == 0.0  # 0 / 1
    assert result["precision@0.5"] == 0.5
    only_empty = summarize_counts([[0, 0]])
    assert only_empty["oIoU"] == 1.0 and only_empty["mIoU"] == 1.0 and only_empty["precision@0.9"] == 1.0


def test_oiou_differs_from_miou_and_boundaries_are_strict(metric):
    # sample A: I=1, U=2 (IoU 0.5 exactly); sample B: I=9, U=10 (IoU 0.9 exactly), different sizes
    a_pred, a_ref = _pair(1, 2, shape=(2, 2))
    b_pred, b_ref = _pair(9, 10, shape=(3, 5))
    result = metric.compute(predictions=[a_pred, b_pred], references=[a_ref, b_ref])
    assert result["oIoU"] == pytest.approx(10 / 12)
    assert result["mIoU"] == pytest.approx(0.7)
    # "above X": A (0.5) is not above 0.5, B (0.9) is above 0.5..0.8 but not above 0.9
    assert [result[f"precision@{x}"] for x in (0.5, 0.6, 0.7, 0.8, 0.9)] == [0.5, 0.5, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("inter,union,threshold", [(3, 5, 0.6), (7, 10, 0.7), (4, 5, 0.8), (1, 2, 0.5)])
def test_iou_exactly_on_each_threshold(inter, union, threshold):
    result = summarize_counts([[inter, union]])
    for x in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert result[f"precision@{x}"] == (1.0 if x < threshold else 0.0)
    assert summarize_counts([[inter + 1, union + 1]])[f"precision@{threshold}"] == 1.0


@pytest.mark.parametrize("inter,union,threshold", [(3, 5, 0.6), (7, 10, 0.7), (4, 5, 0.8), (1, 2, 0.5)])
def test_inclusive_comparison_counts_an_iou_exactly_on_the_threshold(inter, union, threshold, metric):
    # LAVT's `iou >= X`: the tie counts, and only the tie differs from the default `>`
    inclusive = summarize_counts([[inter, union]], precision_comparison=">=")
    strict = summarize_counts([[inter, union]], precision_comparison=">")
    for x in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert inclusive[f"precision@{x}"] == (1.0 if x <= threshold else 0.0)
        assert strict[f"precision@{x}"] == (1.0 if x < threshold else 0.0)
    assert {k: v for k, v in inclusive.items() if not k.startswith("precision")} == {
        k: v for k, v in strict.items() if not k.startswith("precision")}
    pred, ref = _pair(inter, union)
    assert metric.compute(predictions=[pred], references=[ref], precision_comparison=">=")[
        f"precision@{threshold}"] == 1.0
    assert metric.compute(predictions=[pred], references=[ref])[f"precision@{threshold}"] == 0.0


def test_inclusive_comparison_set_in_the_constructor_and_in_evaluate_load(tmp_path):
    pred, ref = _pair(1, 2, shape=(2, 2))  # IoU exactly 0.5
    metric = ReferringIoU(cache_dir=str(tmp_path), precision_comparison=">=")
    assert metric.compute(predictions=[pred], references=[ref])["precision@0.5"] == 1.0
    assert metric.compute(predictions=[pred], references=[ref], precision_comparison=">")["precision@0.5"] == 0.0
    loaded = evaluate.load(str(REFERRING_IOU_PATH), cache_dir=str(tmp_path), precision_comparison=">=")
    assert loaded.compute(predictions=[pred], references=[ref])["precision@0.5"] == 1.0


def test_empty_prediction_and_target_convention():
    # samples: empty/empty, and IoU 1/2 exactly; the empty one adds nothing to oIoU either way
    counts = [[0, 0], [1, 2]]
    ours = summarize_counts(counts)
    assert ours["mIoU"] == 0.75 and ours["precision@0.5"] == 0.5 and ours["precision@0.9"] == 0.5
    cris = summarize_counts(counts, empty_iou=0)  # CRIS's and LAVT's code: the empty sample scores 0
    assert cris["mIoU"] == 0.25 and cris["precision@0.5"] == 0.0 and cris["precision@0.9"] == 0.0
    assert ours["oIoU"] == cris["oIoU"] == 0.5
    lavt = summarize_counts(counts, empty_iou=0, precision_comparison=">=")  # LAVT's protocol, whole
    assert lavt["mIoU"] == 0.25 and lavt["precision@0.5"] == 0.5 and lavt["precision@0.6"] == 0.0
    # only empty samples: oIoU has no pixels to count and takes the empty-sample IoU too
    assert summarize_counts([[0, 0]], empty_iou=0) == {**{k: 0.0 for k in KEYS[:-1]}, "num_samples": 1}
    assert summarize_counts([[0, 0]], empty_iou=1.0) == {**{k: 1.0 for k in KEYS[:-1]}, "num_samples": 1}


def test_empty_convention_through_the_metric(tmp_path):
    empty = np.zeros((3, 3), dtype=bool)
    pred, ref = _pair(9, 10, shape=(3, 5))
    metric = ReferringIoU(cache_dir=str(tmp_path), empty_iou=0)
    assert metric.compute(predictions=[empty, pred], references=[empty, ref])["mIoU"] == pytest.approx(0.45)
    result = metric.compute(predictions=[empty, pred], references=[empty, ref], empty_iou=1)
    assert result["mIoU"] == pytest.approx(0.95)


@pytest.mark.parametrize("bad", [">>", "ge", 1])
def test_bad_precision_comparison_names_the_argument(bad, metric, tmp_path):
    with pytest.raises(ValueError, match=r"`precision_comparison` must be '>' .* or '>='"):
        summarize_counts([[1, 2]], precision_comparison=bad)
    with pytest.raises(ValueError, match="`precision_comparison`"):
        ReferringIoU(cache_dir=str(tmp_path), precision_comparison=bad)
    with pytest.raises(ValueError, match="`precision_comparison`"):
        metric.compute(predictions=[np.ones((2, 2))], references=[np.ones((2, 2))], precision_comparison=bad)
    with pytest.raises(ValueError, match="`precision_comparison`"):
        summarize_counts([[1, 2]], precision_comparison=None)  # None means "the constructor's" in compute only


@pytest.mark.parametrize("bad", [0.5, -1, 2, True, "1", None])
def test_bad_empty_iou_names_the_argument(bad, tmp_path):
    with pytest.raises(ValueError, match="`empty_iou`.* must be 1 .* or 0"):
        summarize_counts([[1, 2]], empty_iou=bad)
    with pytest.raises(ValueError, match="`empty_iou`"):
        ReferringIoU(cache_dir=str(tmp_path), empty_iou=bad)


def test_intersection_union_counts():
    a_pred, a_ref = _pair(3, 7)
    counts = intersection_union(
        [a_pred, torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8)],
        [a_ref, np.array([[0, 1], [0, 0]], dtype=np.uint8)],
    )
    assert counts.dtype == np.int64 and counts.tolist() == [[3, 7], [1, 2]]
    assert intersection_union([], []).shape == (0, 2)


def test_shape_and_length_errors(metric):
    with pytest.raises(ValueError, match=r"`predictions`\[1\].*\(2, 3\).*`references`\[1\].*\(3, 2\)"):
        intersection_union([np.ones((2, 2)), np.ones((2, 3))], [np.ones((2, 2)), np.ones((3, 2))])
    with pytest.raises(ValueError, match="same length"):
        intersection_union([np.ones((2, 2))], [])
    with pytest.raises(ValueError, match=r"`references`\[0\]"):
        intersection_union([np.ones((2, 2))], [np.ones(4)])
    with pytest.raises(ValueError, match=r"predictions`\[0\]"):
        metric.compute(predictions=[np.ones((2, 2))], references=[np.ones((2, 3))])
    with pytest.raises(ValueError, match="counts"):
        summarize_counts(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="counts"):
        summarize_counts([[3, 2]])
    with pytest.raises(ValueError, match="thresholds"):
        summarize_counts([[1, 2]], thresholds=(1.0,))


def test_custom_thresholds(metric):
    result = summarize_counts([[1, 4], [3, 4]], thresholds=(0.25, 0.3))
    assert result["precision@0.25"] == 0.5 and result["precision@0.3"] == 0.5
    assert "precision@0.5" not in result
    result = metric.compute(predictions=[np.ones((1, 4))], references=[_mask((1, 4), [0])], thresholds=(0.2,))
    assert result["precision@0.2"] == 1.0 and result["oIoU"] == 0.25


def _three_samples():
    a_pred, a_ref = _pair(1, 2, shape=(2, 2))
    b_pred, b_ref = _pair(9, 10, shape=(3, 5))
    empty = np.zeros((4, 1), dtype=bool)
    return [a_pred, b_pred, empty], [a_ref, b_ref, empty]


def test_add_batch_twice_and_add(metric):
    predictions, references = _three_samples()
    metric.add_batch(predictions=predictions[:2], references=references[:2])
    metric.add_batch(predictions=[torch.from_numpy(predictions[2])], references=[references[2]])
    result = metric.compute()
    assert result["num_samples"] == 3
    assert result["oIoU"] == pytest.approx(10 / 12)
    assert result["mIoU"] == pytest.approx((0.5 + 0.9 + 1.0) / 3)
    for pred, ref in zip(predictions, references):
        metric.add(prediction=pred, reference=ref)
    assert metric.compute() == result


@pytest.mark.parametrize("path", [REFERRING_IOU_PATH, REFERRING_IOU_PATH / "referring_iou.py"])
def test_evaluate_load_gives_same_numbers(path, tmp_path):
    predictions, references = _three_samples()
    loaded = evaluate.load(str(path), cache_dir=str(tmp_path))
    assert isinstance(loaded, evaluate.Metric)
    expected = summarize_counts(intersection_union(predictions, references))
    assert loaded.compute(predictions=predictions, references=references) == expected
    assert ReferringIoU(cache_dir=str(tmp_path)).compute(predictions=predictions, references=references) == expected


def test_two_processes_share_one_result(tmp_path):
    # evaluate's own multi-process protocol (file locks), with two threads standing in for ranks
    predictions, references = _three_samples()
    shards = {0: (predictions[:2], references[:2]), 1: (predictions[2:], references[2:])}
    results, errors = {}, []

    def run(rank):
        try:
            metric = ReferringIoU(num_process=2, process_id=rank, experiment_id="ranks", cache_dir=str(tmp_path),
                                  timeout=60)
            metric.add_batch(predictions=shards[rank][0], references=shards[rank][1])
            results[rank] = metric.compute()
        except Exception as err:  # surfaced below: a thread cannot fail the test by itself
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert results[1] is None
    assert results[0] == summarize_counts(intersection_union(predictions, references))


def test_summarize_by_group_matches_each_subset_and_the_whole():
    from refseg.training.evaluation import summarize_by_group

    rng = np.random.default_rng(0)
    union = rng.integers(1, 50, size=20)
    rows = np.stack([np.arange(20), rng.integers(0, union + 1), union], axis=1)
    labels = ["a", "b", "c", "b"] * 5
    groups = summarize_by_group(rows[::-1], labels, order=["c", "z", "a"])  # row order does not matter
    assert list(groups) == ["c", "a", "b"]  # `order` first (absent "z" skipped), then the rest sorted
    for name, metrics in groups.items():
        subset = rows[[i for i in range(20) if labels[i] == name]]
        assert metrics == pytest.approx(summarize_counts(subset[:, 1:]), abs=1e-12)
    whole = summarize_counts(rows[:, 1:])
    assert sum(m["num_samples"] for m in groups.values()) == whole["num_samples"] == 20
    weighted = sum(m["mIoU"] * m["num_samples"] for m in groups.values()) / 20
    assert weighted == pytest.approx(whole["mIoU"], abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        summarize_by_group(rows, labels[:10])
