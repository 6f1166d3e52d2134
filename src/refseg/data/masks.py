"""COCO segmentation decoding (pycocotools) and mask encoding for the `mask` feature."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def decode_segmentation(segmentation: Any, height: int, width: int, *, where: str = "annotation") -> np.ndarray:
    """Decode a COCO segmentation to a boolean mask of shape (height, width).

    Accepts a list of polygons (`[[x1, y1, x2, y2, ...], ...]`), an uncompressed RLE
    (`{"size": [h, w], "counts": [int, ...]}`) or a compressed RLE (`counts` as str or bytes).

    Raises:
        ValueError: the segmentation has none of these forms or its size is not (height, width);
            the message starts with `where`.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError(f"{where}: segmentation is an empty polygon list")
        polygons = []
        for poly in segmentation:
            if not isinstance(poly, (list, tuple)) or len(poly) < 2 or len(poly) % 2:
                raise ValueError(
                    f"{where}: polygon must be a flat list of an even number of coordinates, got {poly!r:.80}"
                )
            poly = [float(v) for v in poly]
            while len(poly) < 6:  # pycocotools reads 4 numbers as a box: pad degenerate polygons
                poly.extend(poly[-2:])
            polygons.append(poly)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError(f"{where}: RLE segmentation needs 'counts' and 'size', got keys {sorted(segmentation)}")
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE size {size} differs from the image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"{where}: RLE counts must be a list, str or bytes, got {type(counts).__name__}")
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
