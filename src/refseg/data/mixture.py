"""Training on several refer-format datasets at once, with every held-out image removed.

Prompt-RIS trains one model on RefCOCO, RefCOCO+ and G-Ref together "with all images in validation or
test sets removed" (Sec. 4.1), and RISCLIP's Table 2 trains on the combined RefCOCO family. The three
datasets draw on the same COCO train2014 images, and their splits were made independently: an image in
RefCOCO's testA can hold G-Ref training refs. Concatenating the three train splits as they are would
train on test images; `load_refer_mixture` concatenates them and drops every training ref whose image
appears in any held-out split of any dataset of the mixture.

    from refseg.data import load_refer_mixture
    train = load_refer_mixture("data", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import datasets

from .refer import _validate_args, load_refer
from .unpickle import load_refs_pickle

logger = logging.getLogger(__name__)


def held_out_image_ids(root: str | os.PathLike, dataset: str, split_by: str, *, train_split: str = "train") -> set[int]:
    """The `image_id`s of every ref of `<root>/<dataset>/refs(<split_by>).p` whose split is not
    `train_split` (read from the refs pickle alone: no mask is decoded, no image opened)."""
    _validate_args(dataset, split_by, None)
    path = Path(root) / dataset / f"refs({split_by}).p"
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}/{split_by}: annotation file not found: {path}")
    refs = load_refs_pickle(str(path))
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    held_out = set()
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict) or "split" not in ref or "image_id" not in ref:
            raise ValueError(f"{path}: ref #{k} has no `split` or `image_id`")
        if ref["split"] != train_split:
            held_out.add(int(ref["image_id"]))
    return held_out


def load_refer_mixture(
    root: str | os.PathLike,
    sources: Sequence[tuple[str, str]],
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    *,
    remove_held_out_images: bool = True,
    verify_images: bool = True,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """`split` of each `(dataset, split_by)` in `sources`, concatenated (one row per ref, the features of
    `load_refer`), without the refs whose image is in a non-`split` split of any source.

    Args:
        root: folder holding `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json` per source.
        sources: e.g. `[("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")]`; at least one, no
            repeats.
        split: the split taken from each source (every source must have it).
        image_root: folder of the images (default `<root>/images`); shared by the sources (COCO train2014).
        remove_held_out_images: drop refs whose `image_id` is in any other split of any source (the
            protocol of Prompt-RIS); False concatenates the splits as they are.

    A ref keeps its own `ref_id` (ids of different sources may coincide) and its `ann_id` (the COCO
    annotation: the same object in RefCOCO and RefCOCO+ has the same `ann_id`, so instance-level losses
    see it as one instance).
    """
    sources = [tuple(source) for source in sources]
    if not sources:
        raise ValueError("sources: give at least one (dataset, split_by) pair")
    if len(set(sources)) != len(sources):
        raise ValueError(f"sources: repeated entries in {sources}")
    for dataset, split_by in sources:
        _validate_args(dataset, split_by, split)
    parts = [load_refer(root, dataset, split_by, split, image_root=image_root, verify_images=verify_images,
                        cache_dir=cache_dir) for dataset, split_by in sources]
    combined = datasets.concatenate_datasets(parts)
    if not remove_held_out_images:
        return combined
    held_out = set()
    for dataset, split_by in sources:
        held_out |= held_out_image_ids(root, dataset, split_by, train_split=split)
    keep = [i for i, image_id in enumerate(combined["image_id"]) if int(image_id) not in held_out]
    logger.info("mixture of %s: %d %s refs, %d removed for images in held-out splits", sources, len(keep), split,
                len(combined) - len(keep))
    if not keep:
        raise ValueError(f"every {split} ref of {sources} is on an image of a held-out split")
    return combined.select(keep)


__all__ = ["held_out_image_ids", "load_refer_mixture"]
