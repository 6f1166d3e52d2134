"""`referring_iou`: the referring image segmentation metrics (oIoU, mIoU, Precision@X).

Self-contained (numpy, datasets, evaluate only) so that `evaluate.load(<this file or its folder>)`
works without `refseg` installed; `refseg.metrics` re-exports its names.

Definitions, per sample i with intersection I_i and union U_i counted at the sample's own
(original image) size:

- oIoU (overall IoU) = sum_i I_i / sum_i U_i (CRIS, RISAM, Prompt-RIS "IoU"); 1.0 if every union is 0.
- mIoU (mean IoU) = mean_i I_i / U_i, where a sample with an empty prediction *and* an empty
  reference (U_i = 0) counts as IoU 1.
- precision@X = share of samples whose IoU is strictly above X (DESIGN "above X", as CRIS's
  `iou > thr`; LAVT's code uses `>=`, which differs only for IoUs exactly on a threshold). The
  comparison is exact: `I * den > num * U` with X = num/den as a decimal fraction.

Predictions and references are boolean masks (h, w); non-boolean arrays count non-zero as
foreground (threshold probabilities before passing them). Inside the metric each mask is stored
bit-packed (`np.packbits`), so variable mask sizes cost one bit per pixel in evaluate's cache and
distributed evaluation works as for any `evaluate` metric.
"""

from fractions import Fraction

import datasets
import evaluate
import numpy as np

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

_DESCRIPTION = """\
Referring image segmentation metrics: overall IoU (sum of intersections over sum of unions),
mean IoU (a sample whose prediction and reference are both empty counts 1) and precision@X (share
of samples with IoU strictly above X) for X in 0.5, 0.6, 0.7, 0.8, 0.9. Masks are compared at each
sample's own size, which may differ between samples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D boolean arrays): predicted masks (h_i, w_i), numpy or torch.
    references (`list` of 2-D boolean arrays): ground-truth masks of the same sizes.
    thresholds (`tuple` of `float`, *optional*): precision thresholds, default (0.5, ..., 0.9).
Returns:
    `oIoU`, `mIoU`, `precision@X` for each threshold (fractions in [0, 1]) and `num_samples`.
Example:
    >>> import numpy as np, evaluate
    >>> metric = evaluate.load("src/refseg/metrics/referring_iou")
    >>> pred = np.array([[1, 1], [0, 0]], dtype=bool); ref = np.array([[1, 0], [0, 0]], dtype=bool)
    >>> metric.compute(predictions=[pred], references=[ref])["oIoU"]
    0.5
"""

_CITATION = """\
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C and Berg, Tamara L},
  booktitle={ECCV},
  year={2016}
}
"""

_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.int64)


def _as_mask(mask, name: str, index: int) -> np.ndarray:
    if hasattr(mask, "detach"):  # torch tensor, without importing torch here
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"`{name}`[{index}] must be a 2-D mask (h, w), got shape {array.shape}")
    return array if array.dtype == np.bool_ else array != 0


def _paired_masks(predictions, references):
    if predictions is None or references is None:
        raise ValueError("both `predictions` and `references` are required")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` ({len(predictions)}) and `references` ({len(references)}) must have the same length"
        )
    for index, (pred, ref) in enumerate(zip(predictions, references)):
        pred, ref = _as_mask(pred, "predictions", index), _as_mask(ref, "references", index)
        if pred.shape != ref.shape:
            raise ValueError(
                f"`predictions`[{index}] has shape {pred.shape} but `references`[{index}] has shape {ref.shape}; "
                "compare masks at the same (original image) size"
            )
        yield pred, ref


def intersection_union(predictions, references) -> np.ndarray:
    """Per-sample integer (intersection, union) pixel counts, shape `(N, 2)`, dtype int64."""
    pairs = _paired_masks(predictions, references)
    counts = [(np.count_nonzero(pred & ref), np.count_nonzero(pred | ref)) for pred, ref in pairs]
    return np.asarray(counts, dtype=np.int64).reshape(-1, 2)


def summarize_counts(counts, thresholds=DEFAULT_THRESHOLDS) -> dict:
    """oIoU, mIoU, precision@X and num_samples from `(N, 2)` (intersection, union) counts.

    The training script gathers these integer counts across processes and calls this once.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != 2 or counts.shape[0] == 0:
        raise ValueError(
            f"`counts` must be a non-empty (N, 2) array of (intersection, union), got shape {counts.shape}"
        )
    if any(not 0.0 <= float(threshold) < 1.0 for threshold in thresholds):
        raise ValueError(f"`thresholds` must lie in [0, 1), got {tuple(thresholds)}")
    inter, union = counts[:, 0], counts[:, 1]
    if (inter < 0).any() or (inter > union).any():
        raise ValueError("`counts` must satisfy 0 <= intersection <= union for every sample")
    empty = union == 0
    iou = np.where(empty, 1.0, inter / np.maximum(union, 1))
    total_union = int(union.sum())
    results = {
        "oIoU": float(inter.sum() / total_union) if total_union else 1.0,
        "mIoU": float(iou.mean()),
    }
    for threshold in thresholds:
        fraction = Fraction(str(threshold))
        above = np.where(empty, 1.0 > threshold, inter * fraction.denominator > fraction.numerator * union)
        results[f"precision@{threshold:g}"] = float(above.mean())
    results["num_samples"] = int(counts.shape[0])
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringIoU(evaluate.Metric):
    """oIoU / mIoU / precision@X for referring segmentation masks of varying sizes."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Masks arrive as 2-D arrays and are stored bit-packed (see `add_batch`).
            features=datasets.Features(
                {"predictions": datasets.Value("binary"), "references": datasets.Value("binary")}
            ),
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add masks (lists of 2-D arrays); each pair is checked for equal size, then bit-packed."""
        packed_predictions, packed_references = [], []
        for pred, ref in _paired_masks(predictions, references):
            packed_predictions.append(np.packbits(pred, axis=None).tobytes())
            packed_references.append(np.packbits(ref, axis=None).tobytes())
        return evaluate.Metric.add_batch(
            self, predictions=packed_predictions, references=packed_references, **kwargs
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one (prediction, reference) pair of 2-D masks."""
        return self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def _compute(self, predictions, references, thresholds=DEFAULT_THRESHOLDS):
        counts = np.empty((len(predictions), 2), dtype=np.int64)
        for index, (pred, ref) in enumerate(zip(predictions, references)):
            pred = np.frombuffer(pred, dtype=np.uint8)
            ref = np.frombuffer(ref, dtype=np.uint8)
            # packbits pads with zeros, which add to neither the intersection nor the union
            counts[index] = (_POPCOUNT[pred & ref].sum(), _POPCOUNT[pred | ref].sum())
        return summarize_counts(counts, thresholds)
