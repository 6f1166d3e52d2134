"""`referring_iou`: the referring image segmentation metrics (oIoU, mIoU, Precision@X).

Self-contained (numpy, datasets, evaluate only) so that `evaluate.load(<this file or its folder>)`
works without `refseg` installed; `refseg.metrics` re-exports its names.

Definitions, per sample i with intersection I_i and union U_i counted at the sample's own
(original image) size:

- oIoU (overall IoU) = sum_i I_i / sum_i U_i (the "oIoU" of RISCLIP and Prompt-RIS; RISAM's paper
  describes its "IoU" this way). If every union is 0 it is the empty-sample IoU below.
- mIoU (mean IoU) = mean_i I_i / U_i. CRIS's "IoU" is this mean: its public code averages
  per-sample IoUs (`engine.py`), as its author confirmed (CRIS.pytorch issue #12).
- precision@X = share of samples whose IoU is above X.

Two conventions differ between public codebases; both are options (`summarize_counts`,
`ReferringIoU`), with refseg's choice as the default:

- `empty_iou` (default 1): the IoU of a sample whose prediction and reference are both empty
  (U_i = 0). refseg counts it 1: the model predicted exactly the (empty) target, and IoU(A, A) = 1
  for every other A. CRIS's code (`I / (U + 1e-6)`) and LAVT's code (`0.0 if U == 0`) count it 0;
  pass `empty_iou=0` to match them. RefCOCO-family targets are never empty (refseg's readers
  reject empty masks), so the choice only matters for other data.
- `precision_comparison` (default `">"`): IoU strictly above X (CRIS's `iou > thr`, and the
  CRIS and RISAM papers' "higher than"), or `">="`, IoU at least X (LAVT's `this_iou >= eval_seg_iou`). The two
  differ only for an IoU exactly on a threshold, e.g. I = 1, U = 2 at X = 0.5. The comparison is
  exact in integers: `I * den > num * U` (or `>=`) with X = num / den as a decimal fraction.

Generalized referring segmentation (gRefCOCO: an expression may name no object, or several) is
`ReferringIoU(generalized=True)` / `summarize_generalized_counts`. A sample has "no target" when its
reference mask is empty, and a prediction says "no target" when its mask is empty. Per sample, with
P_i = |prediction| and G_i = |reference|:

- gIoU = mean_i IoU_i, where IoU_i = I_i / U_i for a target sample (G_i > 0) and, for a no-target
  sample, 1 if P_i = 0 else 0;
- cIoU = sum_i I_i / sum_i U_i over every sample (a no-target sample predicted non-empty adds P_i to
  the unions; one predicted empty adds nothing);
- N-acc = #{no target, P_i = 0} / #{no target}; T-acc = #{target, P_i > 0} / #{target};
- precision@X over the target samples only.

These are GSVA's definitions (`accuracy_convention="gsva"`, the default). ReLA's released evaluation
(GRES, CVPR 2023) differs in the two accuracies: with TP = #{no target, P_i = 0}, FN = #{no target,
P_i > 0} and FP = #{target, P_i = 0}, it reports N-acc = TP / (TP + FN + 1) and "T-acc" =
TP / (TP + FP + 1) (a precision of the no-target predictions, each denominator plus one), and both 0
when the split has no no-target sample; `accuracy_convention="rela"` reproduces that. For example,
3 no-target samples of which 2 are predicted empty, and 5 target samples of which 1 is predicted
empty: GSVA N-acc = 2/3, T-acc = 4/5; ReLA N-acc = 2/4, T-acc = 2/4.

Predictions and references are boolean masks (h, w); non-boolean arrays count non-zero as
foreground (threshold probabilities before passing them). Inside the metric each mask is stored
bit-packed (`np.packbits`), so variable mask sizes cost one bit per pixel in evaluate's cache and
distributed evaluation works as for any `evaluate` metric.
"""

import numbers
from fractions import Fraction

import datasets
import evaluate
import numpy as np

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
# `precision_comparison` values: ">" (IoU strictly above X; CRIS's code) and ">=" (at least X; LAVT's code).
PRECISION_COMPARISONS = (">", ">=")

_DESCRIPTION = """\
Referring image segmentation metrics: overall IoU (sum of intersections over sum of unions),
mean IoU (mean of per-sample IoUs; a sample whose prediction and reference are both empty counts 1
by default) and precision@X (share of samples with IoU strictly above X by default) for X in 0.5,
0.6, 0.7, 0.8, 0.9. Masks are compared at each sample's own size, which may differ between samples.
`empty_iou=0` matches CRIS's evaluation code; adding `precision_comparison=">="` matches LAVT's.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D boolean arrays): predicted masks (h_i, w_i), numpy or torch.
    references (`list` of 2-D boolean arrays): ground-truth masks of the same sizes.
    thresholds (`tuple` of `float`, *optional*): precision thresholds, default (0.5, ..., 0.9).
    precision_comparison (`str`, *optional*): `">"` (IoU strictly above X) or `">="` (IoU at least X);
        default: the value given to the constructor (`">"` unless set there).
    empty_iou (`int`, *optional*): IoU of a sample whose prediction and reference are both empty,
        1 or 0; default: the value given to the constructor (1 unless set there).
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


def generalized_counts(predictions, references) -> np.ndarray:
    """Per-sample integer (intersection, union, predicted area, reference area), shape `(N, 4)`, int64."""
    pairs = _paired_masks(predictions, references)
    counts = [(np.count_nonzero(pred & ref), np.count_nonzero(pred | ref), np.count_nonzero(pred),
               np.count_nonzero(ref)) for pred, ref in pairs]
    return np.asarray(counts, dtype=np.int64).reshape(-1, 4)


ACCURACY_CONVENTIONS = ("gsva", "rela")


def summarize_generalized_counts(counts, thresholds=DEFAULT_THRESHOLDS, *, precision_comparison=">",
                                 accuracy_convention="gsva") -> dict:
    """gIoU, cIoU, N-acc, T-acc, precision@X (target samples only) and the sample counts from `(N, 4)`
    (intersection, union, predicted area, reference area) counts (module docstring). An accuracy over no
    sample (no no-target sample: N-acc; no target sample: T-acc) is None with `accuracy_convention="gsva"`
    and 0 with `"rela"` (ReLA's code)."""
    if not isinstance(precision_comparison, str) or precision_comparison not in PRECISION_COMPARISONS:
        _check_conventions(precision_comparison, 1)
    if accuracy_convention not in ACCURACY_CONVENTIONS:
        raise ValueError(f"`accuracy_convention` must be 'gsva' (the default) or 'rela' (ReLA's released code), "
                         f"got {accuracy_convention!r}")
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != 4 or counts.shape[0] == 0:
        raise ValueError("`counts` must be a non-empty (N, 4) array of (intersection, union, predicted area, "
                         f"reference area), got shape {counts.shape}")
    if any(not 0.0 <= float(threshold) < 1.0 for threshold in thresholds):
        raise ValueError(f"`thresholds` must lie in [0, 1), got {tuple(thresholds)}")
    inter, union, predicted, reference = counts.T
    if ((inter < 0) | (inter > np.minimum(predicted, reference)) | (union != predicted + reference - inter)).any():
        raise ValueError("`counts` must satisfy 0 <= I <= min(P, G) and U = P + G - I for every sample")
    target, empty_prediction = reference > 0, predicted == 0
    iou = np.where(target, inter / np.maximum(union, 1), empty_prediction.astype(float))
    total_union = int(union.sum())
    results = {"gIoU": float(iou.mean()), "cIoU": float(inter.sum() / total_union) if total_union else 1.0}
    tp = int((~target & empty_prediction).sum())  # no target, predicted empty
    fn = int((~target & ~empty_prediction).sum())  # no target, predicted a mask
    fp = int((target & empty_prediction).sum())  # a target, predicted empty
    hits = int((target & ~empty_prediction).sum())
    if accuracy_convention == "gsva":
        results["N-acc"] = tp / (tp + fn) if tp + fn else None
        results["T-acc"] = hits / (hits + fp) if hits + fp else None
    else:
        no_target = tp + fn > 0
        results["N-acc"] = tp / (tp + fn + 1) if no_target else 0.0
        results["T-acc"] = tp / (tp + fp + 1) if no_target else 0.0
    inclusive = precision_comparison == ">="
    for threshold in thresholds:
        fraction = Fraction(str(threshold))
        scaled_inter, scaled_threshold = inter * fraction.denominator, fraction.numerator * union
        passed = (scaled_inter >= scaled_threshold) if inclusive else (scaled_inter > scaled_threshold)
        results[f"precision@{threshold:g}"] = float(passed[target].mean()) if target.any() else None
    results["num_samples"] = int(counts.shape[0])
    results["num_no_target"] = int((~target).sum())
    return results


def _check_conventions(precision_comparison=">", empty_iou=1) -> None:
    """Raise a `ValueError` naming the argument if a convention is not one of the supported values."""
    if not isinstance(precision_comparison, str) or precision_comparison not in PRECISION_COMPARISONS:
        raise ValueError(
            "`precision_comparison` must be '>' (IoU strictly above X, as CRIS's code) or '>=' "
            f"(IoU at least X, as LAVT's code), got {precision_comparison!r}"
        )
    if isinstance(empty_iou, bool) or not isinstance(empty_iou, numbers.Real) or empty_iou not in (0, 1):
        raise ValueError(
            "`empty_iou` (IoU of a sample whose prediction and reference are both empty) must be 1 "
            f"(refseg's default) or 0 (CRIS's and LAVT's code), got {empty_iou!r}"
        )


def summarize_counts(counts, thresholds=DEFAULT_THRESHOLDS, *, precision_comparison=">", empty_iou=1) -> dict:
    """oIoU, mIoU, precision@X and num_samples from `(N, 2)` (intersection, union) counts.

    The training script gathers these integer counts across processes and calls this once.

    Args:
        counts: `(N, 2)` integer (intersection, union) per sample, N >= 1.
        thresholds: the X of precision@X, each in [0, 1).
        precision_comparison: `">"` (default): a sample counts for precision@X when its IoU is
            strictly above X; `">="`: when it is at least X (LAVT's code).
        empty_iou: IoU of a sample with union 0 (empty prediction and empty reference): 1
            (default) or 0 (CRIS's and LAVT's code). It enters mIoU and precision@X, and is the
            oIoU when every union is 0.
    """
    _check_conventions(precision_comparison, empty_iou)
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
    empty_iou = float(empty_iou)
    inclusive = precision_comparison == ">="
    empty = union == 0
    iou = np.where(empty, empty_iou, inter / np.maximum(union, 1))
    total_union = int(union.sum())
    results = {
        "oIoU": float(inter.sum() / total_union) if total_union else empty_iou,
        "mIoU": float(iou.mean()),
    }
    for threshold in thresholds:
        fraction = Fraction(str(threshold))
        scaled_inter, scaled_threshold = inter * fraction.denominator, fraction.numerator * union
        if inclusive:
            passed = np.where(empty, empty_iou >= threshold, scaled_inter >= scaled_threshold)
        else:
            passed = np.where(empty, empty_iou > threshold, scaled_inter > scaled_threshold)
        results[f"precision@{threshold:g}"] = float(passed.mean())
    results["num_samples"] = int(counts.shape[0])
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringIoU(evaluate.Metric):
    """oIoU / mIoU / precision@X for referring segmentation masks of varying sizes.

    `precision_comparison` (`">"` or `">="`) and `empty_iou` (1 or 0) set the two conventions of
    `summarize_counts` for every `compute` call (each call may override them); the other keyword
    arguments are `evaluate.Metric`'s (`cache_dir`, `num_process`, `process_id`, ...). Also through
    `evaluate.load(<module path>, precision_comparison=">=")`.
    """

    def __init__(self, config_name=None, *, precision_comparison=">", empty_iou=1, generalized=False,
                 accuracy_convention="gsva", **kwargs):
        _check_conventions(precision_comparison, empty_iou)
        if accuracy_convention not in ACCURACY_CONVENTIONS:
            raise ValueError(f"`accuracy_convention` must be 'gsva' or 'rela', got {accuracy_convention!r}")
        self.precision_comparison = precision_comparison
        self.empty_iou = empty_iou
        self.generalized = bool(generalized)
        self.accuracy_convention = accuracy_convention
        super().__init__(config_name, **kwargs)

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

    def _compute(self, predictions, references, thresholds=DEFAULT_THRESHOLDS, precision_comparison=None,
                 empty_iou=None, accuracy_convention=None):
        counts = np.empty((len(predictions), 4), dtype=np.int64)
        for index, (pred, ref) in enumerate(zip(predictions, references)):
            pred = np.frombuffer(pred, dtype=np.uint8)
            ref = np.frombuffer(ref, dtype=np.uint8)
            # packbits pads with zeros, which add to no count
            counts[index] = (_POPCOUNT[pred & ref].sum(), _POPCOUNT[pred | ref].sum(), _POPCOUNT[pred].sum(),
                             _POPCOUNT[ref].sum())
        comparison = self.precision_comparison if precision_comparison is None else precision_comparison
        if self.generalized:
            return summarize_generalized_counts(
                counts, thresholds, precision_comparison=comparison,
                accuracy_convention=self.accuracy_convention if accuracy_convention is None else accuracy_convention)
        counts = counts[:, :2]
        return summarize_counts(
            counts,
            thresholds,
            precision_comparison=comparison,
            empty_iou=self.empty_iou if empty_iou is None else empty_iou,
        )
