"""Reader for gRefCOCO (generalized referring expressions: no target, one target or several).

Layout read by `load_grefer(root, "grefcoco", "unc", split)` (the files of GRES, CVPR 2023)::

    <root>/<dataset>/grefs(<split_by>).json   list of refs (or `grefs(<split_by>).p`, read with the
                                              restricted unpickler): ref_id, image_id, split, sentences,
                                              ann_id (a list; [-1] for no target), category_id (a list),
                                              no_target (bool)
    <root>/<dataset>/instances.json           COCO: images, annotations, categories
    <image_root>/<file_name>                  COCO train2014 images (default <root>/images)

One row per ref with the features of `load_refer` plus `ann_ids` (every referent, empty for no target) and
`no_target`. `mask` is the union of the referents' masks (crowd annotations left out, as the G_REFER API's
`getMaskByRef(merge=True)` does) and all zeros for a no-target ref; `ann_id` / `category_id` are the first
referent's (-1 for no target), `bbox` the box around the referents of the mask ([0, 0, 0, 0] for no target).
A ref is "no target" when it says so (`no_target: true`) or its `ann_id` is `[-1]`; the two must agree.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np

from .masks import decode_segmentation, mask_to_png
from .refer import (
    REFER_FEATURES, _index_instances, check_image, dataset_from_generator, files_fingerprint, selected_refs,
)
from .unpickle import load_refs_pickle

logger = logging.getLogger(__name__)

GREFER_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {("grefcoco", "unc"): ("train", "val", "testA", "testB")}

GREFER_FEATURES = datasets.Features(
    {**REFER_FEATURES, "ann_ids": datasets.List(datasets.Value("int64")), "no_target": datasets.Value("bool")}
)


@dataclass
class _GRowSpec:
    image_path: str
    segmentations: list  # one COCO segmentation per referent (empty for no target)
    height: int
    width: int
    sentences: list
    sent_ids: list
    ref_id: int
    ann_ids: list
    image_id: int
    category_id: int
    bbox: list
    split: str
    where: str


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_grefs(folder: Path, split_by: str) -> tuple[Any, str]:
    json_path, pickle_path = folder / f"grefs({split_by}).json", folder / f"grefs({split_by}).p"
    if json_path.is_file():
        try:
            with open(json_path, encoding="utf-8") as handle:
                return json.load(handle), str(json_path)
        except ValueError as err:
            raise ValueError(f"{json_path}: not a valid JSON file (cut short or damaged?): {err}") from err
    if pickle_path.is_file():
        return load_refs_pickle(pickle_path), str(pickle_path)
    raise FileNotFoundError(f"annotation file not found: {json_path} (or {pickle_path.name})")


def _union_box(boxes: list) -> list[float]:
    if not boxes:
        return [0.0, 0.0, 0.0, 0.0]
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def load_grefer(
    root: str | os.PathLike,
    dataset: str = "grefcoco",
    split_by: str = "unc",
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    *,
    verify_images: bool = True,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load one split of a gRefCOCO-format dataset as a `datasets.Dataset` (one row per ref).

    Args:
        root: folder holding `<dataset>/grefs(<split_by>).json` (or `.p`) and `<dataset>/instances.json`.
        dataset: "grefcoco", or "grefshapes" (generalized RefShapes, `make_refshapes(generalized=True)`).
        split_by: "unc".
        split: "train", "val", "testA", "testB" (grefshapes also "unseen"), or None for every ref.
        image_root: folder of the images (default `<root>/images`).

    Returns:
        `datasets.Dataset` with `GREFER_FEATURES` (module docstring).

    Raises:
        ValueError: unknown dataset/split, a malformed ref, a referent absent from instances.json, a ref whose
            `no_target` disagrees with its `ann_id`, an empty mask for a ref with referents (messages name the
            file and the ref).
        FileNotFoundError: a missing annotation file or image.
    """
    valid = {**GREFER_SPLITS, ("grefshapes", "unc"): ("train", "val", "testA", "testB", "unseen")}
    if (dataset, split_by) not in valid:
        raise ValueError(f"dataset/split_by: unknown combination {dataset!r}/{split_by!r}; expected one of "
                         f"{', '.join(f'{d}/{s}' for d, s in valid)}")
    if split is not None and split not in valid[(dataset, split_by)]:
        raise ValueError(f"split: unknown split {split!r} for {dataset}/{split_by}; expected one of "
                         f"{list(valid[(dataset, split_by)])} or None")
    folder = Path(root) / dataset
    instances_path = folder / "instances.json"
    if not instances_path.is_file():
        raise FileNotFoundError(f"{dataset}/{split_by}: annotation file not found: {instances_path}")
    image_root = Path(os.path.abspath(image_root if image_root is not None else Path(root) / "images"))
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_root: image folder not found: {image_root}")
    refs, refs_path = _read_grefs(folder, split_by)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    try:
        with open(instances_path, encoding="utf-8") as handle:
            instances = json.load(handle)
    except ValueError as err:
        raise ValueError(f"{instances_path}: not a valid JSON file (cut short or damaged?): {err}") from err
    images, anns = _index_instances(instances, str(instances_path))

    specs, checked = [], {}
    for ref, where, sentences, sent_ids in selected_refs(refs, refs_path, split):
        ann_ids = [int(a) for a in _as_list(ref["ann_id"])]
        empty = ann_ids == [-1]
        no_target = bool(ref.get("no_target", empty))
        if no_target != empty:
            raise ValueError(f"{where}: no_target={ref.get('no_target')} but ann_id={ref['ann_id']}")
        if not empty and (not ann_ids or -1 in ann_ids):
            raise ValueError(f"{where}: ann_id must list the referents or be [-1], got {ref['ann_id']}")
        info = images.get(int(ref["image_id"]))
        if info is None:
            raise ValueError(f"{where}: image_id={ref['image_id']} is absent from {instances_path}")
        referents = []
        for ann_id in [] if empty else ann_ids:
            ann = anns.get(ann_id)
            if ann is None:
                raise ValueError(f"{where}: ann_id={ann_id} is absent from {instances_path}")
            if int(ann["image_id"]) != int(ref["image_id"]):
                raise ValueError(f"{where}: image_id={ref['image_id']} but its annotation {ann_id} is on image "
                                 f"{ann['image_id']}")
            referents.append(ann)
        image_path = os.path.join(str(image_root), info["file_name"])
        if info["id"] not in checked:
            checked[info["id"]] = check_image(image_path, int(info["height"]), int(info["width"]),
                                              verify=verify_images, where=where)
        categories = [int(c) for c in _as_list(ref.get("category_id", [a.get("category_id", -1) for a in referents]))]
        specs.append(_GRowSpec(
            image_path=image_path,
            segmentations=[a["segmentation"] for a in referents if not a.get("iscrowd", 0)],
            height=int(info["height"]), width=int(info["width"]), sentences=sentences, sent_ids=sent_ids,
            ref_id=int(ref["ref_id"]), ann_ids=[] if empty else ann_ids, image_id=int(ref["image_id"]),
            category_id=-1 if empty else (categories[0] if categories else -1),
            bbox=_union_box([a["bbox"] for a in referents if not a.get("iscrowd", 0)]), split=str(ref["split"]), where=where,
        ))
    if not specs:
        raise ValueError(f"{refs_path}: no refs with split {split!r}")
    logger.info("%s/%s %s: %d refs (%d without a target, %d with several)", dataset, split_by, split, len(specs),
                sum(not s.ann_ids for s in specs), sum(len(s.ann_ids) > 1 for s in specs))

    def generate() -> Iterator[dict[str, Any]]:
        for spec in specs:
            mask = np.zeros((spec.height, spec.width), dtype=bool)
            for segmentation in spec.segmentations:
                mask |= decode_segmentation(segmentation, spec.height, spec.width, where=spec.where)
            if spec.ann_ids and not mask.any():
                raise ValueError(f"{spec.where}: the referents' mask is empty")
            yield {
                "image": {"path": spec.image_path, "bytes": None},
                "mask": {"path": None, "bytes": mask_to_png(mask)},
                "sentences": spec.sentences, "sent_ids": spec.sent_ids, "ref_id": spec.ref_id,
                "ann_id": spec.ann_ids[0] if spec.ann_ids else -1, "image_id": spec.image_id,
                "category_id": spec.category_id, "bbox": spec.bbox, "split": spec.split,
                "ann_ids": spec.ann_ids, "no_target": not spec.ann_ids,
            }

    fingerprint = files_fingerprint("grefer", dataset, split_by, split, str(image_root), verify_images,
                                    files=(refs_path, str(instances_path)))
    return dataset_from_generator(generate, GREFER_FEATURES, fingerprint=fingerprint, split=split, cache_dir=cache_dir)


__all__ = ["GREFER_FEATURES", "GREFER_SPLITS", "load_grefer"]
