"""Referring segmentation metrics.

`ReferringIoU` is an `evaluate.Metric` (also loadable without refseg through
`evaluate.load(refseg.metrics.REFERRING_IOU_PATH)`); `intersection_union` and `summarize_counts`
are the same computations as plain functions, for loops that gather integer counts across
processes (the training script). Both take the two conventions on which public evaluation code
differs: `precision_comparison` (`">"`, refseg's default, or `">="`, as LAVT's code) and `empty_iou`
(1, refseg's default, or 0, as CRIS's and LAVT's code); see the module docstring of
`referring_iou.py` and docs/metrics.md. `ReferringIoU(generalized=True)`, `generalized_counts` and
`summarize_generalized_counts` give the generalized metrics (gIoU, cIoU, N-acc, T-acc) of gRefCOCO.
"""

from pathlib import Path

from .referring_iou.referring_iou import (
    ACCURACY_CONVENTIONS,
    DEFAULT_THRESHOLDS,
    PRECISION_COMPARISONS,
    ReferringIoU,
    generalized_counts,
    intersection_union,
    summarize_counts,
    summarize_generalized_counts,
)

# Folder of the self-contained evaluate module: `evaluate.load(str(REFERRING_IOU_PATH))`.
REFERRING_IOU_PATH = Path(__file__).parent / "referring_iou"

__all__ = [
    "ACCURACY_CONVENTIONS",
    "DEFAULT_THRESHOLDS",
    "PRECISION_COMPARISONS",
    "REFERRING_IOU_PATH",
    "ReferringIoU",
    "generalized_counts",
    "intersection_union",
    "summarize_counts",
    "summarize_generalized_counts",
]
