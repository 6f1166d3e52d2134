"""COCO segmentation decoding (pycocotools) and mask encoding for the `mask` feature."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def _polygon(poly: Any, where: str) -> list[float]:
    if not isinstance(poly, (list, tuple)) or len(poly) < 2 or len(poly) % 2:
        raise ValueError(f"{where}: polygon must be a flat list of an even number of coordinates, got {poly!r:.80}")
    try:
        poly = [float(v) for v in poly]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: polygon coordinates must be numbers, got {poly!r:.80}") from None
    while len(poly) < 6:  # pycocotools reads 4 numbers as a box: pad degenerate polygons
        poly.extend(poly[-2:])
    return poly


def _rle(segmentation: dict, height: int, width: int, where: str) -> dict:
    """A compressed RLE (counts as bytes) from a compressed or uncompressed RLE dict."""
    if "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"{where}: RLE segmentation needs 'counts' and 'size', got keys {sorted(segmentation)}")
    size = [int(v) for v in segmentation["size"]]
    if size != [height, width]:
        raise ValueError(f"{where}: RLE size {size} differs from the image size [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed (COCO's iscrowd=1 form)
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
            raise ValueError(f"{where}: uncompressed RLE counts must be non-negative ints")
        if sum(counts) != height * width:
            raise ValueError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, expected {height} * {width}")
        return mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
    if isinstance(counts, (str, bytes)):
        return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise ValueError(f"{where}: RLE counts must be a list, str or bytes, got {type(counts).__name__}")


def decode_segmentation(segmentation: Any, height: int, width: int, *, where: str = "annotation") -> np.ndarray:
    """Decode a COCO segmentation to a boolean mask of shape (height, width).

    Accepts every layout COCO files use:
    - a list of polygons `[[x1, y1, x2, y2, ...], ...]` (RefCOCO, COCO iscrowd=0);
    - an uncompressed RLE `{"size": [h, w], "counts": [int, ...]}` (COCO iscrowd=1);
    - a compressed RLE `{"size": [h, w], "counts": str | bytes}`;
    - a list of RLE dicts, compressed or uncompressed.
    A list of several parts gives their union (REFER's `getMask` sums them; binarised, the same).

    Raises:
        ValueError: the segmentation has none of these forms, mixes polygons and RLEs, or its size
            is not (height, width); the message starts with `where`.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError(f"{where}: segmentation is an empty list")
        if all(isinstance(part, dict) for part in segmentation):
            rles = [_rle(part, height, width, where) for part in segmentation]
        elif any(isinstance(part, dict) for part in segmentation):
            raise ValueError(f"{where}: segmentation list mixes RLE dicts and polygons")
        else:
            polygons = [_polygon(poly, where) for poly in segmentation]
            rles = mask_utils.frPyObjects(polygons, height, width)
        rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    elif isinstance(segmentation, dict):
        rle = _rle(segmentation, height, width, where)
    else:
        kind = type(segmentation).__name__
        raise ValueError(f"{where}: segmentation must be a polygon list or an RLE dict, got {kind}")
    mask = mask_utils.decode(rle)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask.astype(bool)


def mask_to_png(mask: np.ndarray) -> bytes:
    """Encode a boolean (H, W) mask as a 1-bit PNG.

    The `mask` feature is `datasets.Image(mode="L")`, so rows decode it as mode "L" with values
    0/255; the 1-bit file is about 5x faster to write than an 8-bit one (RefCOCO has ~50k masks).
    """
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


__all__ = ["decode_segmentation", "mask_to_png"]
