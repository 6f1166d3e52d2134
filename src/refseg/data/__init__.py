"""Data: refer-format readers, Hub parquet reader, the RefShapes generator, augmentation.

- `load_refer(root, dataset, split_by, split)`: RefCOCO / RefCOCO+ / RefCOCOg / RefShapes in the
  refer format (refs pickle read with a restricted unpickler, COCO masks via pycocotools).
- `load_refer_parquet(path_or_files, image_root, split=None)`: `jxu124/refcoco`-style parquet.
- `load_refer_mixture(root, [(dataset, split_by), ...], split)`: several datasets' train splits together,
  without the images of their held-out splits (Prompt-RIS's and RISCLIP's combined training).
- `load_grefer(root, "grefcoco", "unc", split)`: gRefCOCO (no-target and multi-target expressions).
- `explode_sentences(ds)`: one row per sentence (evaluation scores every sentence).
- `make_refshapes(root, num_images, seed)`: the procedural RefShapes dataset.
- `RandomAffineSaturation`: joint image/mask training augmentation.
"""

from .augment import AffineParams, RandomAffineSaturation
from .grefer import GREFER_FEATURES, load_grefer
from .parquet import load_refer_parquet
from .masks import decode_segmentation
from .mixture import held_out_image_ids, load_refer_mixture
from .refer import REFER_FEATURES, SUPPORTED_SPLITS, explode_sentences, load_refer
from .refshapes import (
    expression_corpus, expression_kind, load_scenes, make_refshapes, parse_expression, resolve_expression,
)
from .unpickle import RestrictedUnpickler, load_refs_pickle, restricted_loads

__all__ = [
    "AffineParams",
    "GREFER_FEATURES",
    "REFER_FEATURES",
    "RandomAffineSaturation",
    "RestrictedUnpickler",
    "SUPPORTED_SPLITS",
    "decode_segmentation",
    "explode_sentences",
    "held_out_image_ids",
    "expression_corpus",
    "expression_kind",
    "load_grefer",
    "load_refer",
    "load_refer_mixture",
    "load_refer_parquet",
    "load_refs_pickle",
    "load_scenes",
    "make_refshapes",
    "parse_expression",
    "resolve_expression",
    "restricted_loads",
]
