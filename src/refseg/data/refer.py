"""Reader for the refer format (RefCOCO, RefCOCO+, RefCOCOg, RefShapes).

Layout read by `load_refer(root, dataset, split_by, split)`::

    <root>/<dataset>/refs(<split_by>).p   list of refs: ref_id, ann_id, image_id, split,
                                          category_id, sentences [{sent_id, sent, tokens, raw}]
    <root>/<dataset>/instances.json       COCO: images, annotations (segmentation, bbox),
                                          categories
    <image_root>/<file_name>              images named by instances.json (default <root>/images)

Every selected ref becomes one row with the features in `REFER_FEATURES`: `image` (the image
file, stored by path and decoded lazily), `mask` (decoded as mode "L", 0/255), `sentences`,
`sent_ids`, `ref_id`, `ann_id`, `image_id`, `category_id`, `bbox` (COCO xywh of the annotation)
and `split`. Nothing is skipped: a malformed ref, a missing annotation or image, an image whose
size differs from instances.json, or an empty mask raises an error that names the file and the
record. The refs pickle is read with `refseg.data.unpickle.load_refs_pickle` (plain data only).

An annotation's `segmentation` may take any layout COCO files use (`masks.decode_segmentation`):
a list of polygons `[[x1, y1, ...], ...]` (RefCOCO; RefShapes), a compressed-RLE dict, an
uncompressed-RLE dict (`counts` a list of ints, COCO's crowd form) or a list of RLE dicts; the
parts of a list are united.

Decisions: a ref without `category_id` takes its annotation's; polygons shorter than three
points are padded by repeating their last point (so pycocotools never mistakes a 4-number
polygon for a box). The built dataset is cached by `datasets` under a fingerprint made of the
arguments and the size and modification time of the two annotation files, so loading the same
split again is fast; images are always read from disk when accessed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
from PIL import Image

from .masks import decode_segmentation, mask_to_png
from .unpickle import load_refs_pickle

logger = logging.getLogger(__name__)

# (dataset, split_by) -> valid splits.
SUPPORTED_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("refshapes", "unc"): ("train", "val", "testA", "testB", "unseen"),
}

REFER_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.Image(mode="L"),
        "sentences": datasets.List(datasets.Value("string")),
        "sent_ids": datasets.List(datasets.Value("int64")),
        "ref_id": datasets.Value("int64"),
        "ann_id": datasets.Value("int64"),
        "image_id": datasets.Value("int64"),
        "category_id": datasets.Value("int64"),
        "bbox": datasets.List(datasets.Value("float64"), length=4),
        "split": datasets.Value("string"),
    }
)

_REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
_REQUIRED_ANN_KEYS = ("id", "image_id", "segmentation", "bbox")
_CACHE_VERSION = "refseg-refer-2"


@dataclass
class RowSpec:
    """Everything needed to build one row; `where` names the record for error messages."""

    image_path: str
    segmentation: Any
    height: int
    width: int
    sentences: list[str]
    sent_ids: list[int]
    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    bbox: list[float]
    split: str
    where: str


# ----------------------------------------------------------------------------- building


def check_image(path: str, height: int | None, width: int | None, *, verify: bool, where: str) -> tuple[int, int]:
    """Check that the image file exists and (when `verify`) opens with the expected size.

    Returns (height, width) read from the header when `verify`, else the given values.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    if not verify:
        return height, width
    try:
        with Image.open(path) as image:
            w, h = image.size
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: cannot open image {path}: {err}") from err
    if height is not None and width is not None and (h, w) != (height, width):
        raise ValueError(f"{where}: image {path} is {h}x{w} (h x w) but the annotations say {height}x{width}")
    return h, w


def files_fingerprint(*parts: Any, files: Sequence[str] = ()) -> str:
    """Hash of `parts` and of the path, size and mtime of each file (the dataset cache key)."""
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    for part in parts:
        digest.update(repr(part).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def build_dataset(
    specs: list[RowSpec], *, fingerprint: str, split: str | None, cache_dir: str | None = None
) -> datasets.Dataset:
    """Decode the masks of `specs` and write them as a `datasets.Dataset` with `REFER_FEATURES`."""

    def generate() -> Iterator[dict[str, Any]]:
        for spec in specs:
            mask = decode_segmentation(spec.segmentation, spec.height, spec.width, where=spec.where)
            if not mask.any():
                raise ValueError(f"{spec.where}: the mask is empty")
            yield {
                "image": {"path": spec.image_path, "bytes": None},
                "mask": {"path": None, "bytes": mask_to_png(mask)},
                "sentences": spec.sentences,
                "sent_ids": spec.sent_ids,
                "ref_id": spec.ref_id,
                "ann_id": spec.ann_id,
                "image_id": spec.image_id,
                "category_id": spec.category_id,
                "bbox": spec.bbox,
                "split": spec.split,
            }

    return dataset_from_generator(generate, REFER_FEATURES, fingerprint=fingerprint, split=split, cache_dir=cache_dir)


def dataset_from_generator(generate, features: datasets.Features, *, fingerprint: str, split: str | None,
                           cache_dir: str | None = None) -> datasets.Dataset:
    """`datasets.Dataset.from_generator`, cached under `fingerprint`, with the generator's own `ValueError` /
    `FileNotFoundError` raised as they are (`datasets` wraps them in a `DatasetGenerationError`)."""
    split_name = datasets.NamedSplit(split) if split and split.isidentifier() else datasets.Split.TRAIN
    try:
        return datasets.Dataset.from_generator(
            generate, features=features, fingerprint=fingerprint, cache_dir=cache_dir, split=split_name
        )
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def parse_sentences(sentences: Any, where: str) -> tuple[list[str], list[int]]:
    """Return (texts, sent_ids) from refer sentence dicts `[{sent_id, sent, raw, tokens}, ...]`."""
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{where}: 'sentences' must be a non-empty list, got {sentences!r:.80}")
    texts, ids = [], []
    for k, sent in enumerate(sentences):
        if not isinstance(sent, dict) or "sent_id" not in sent or not ({"sent", "raw"} & sent.keys()):
            raise ValueError(f"{where}: sentence #{k} must be a dict with 'sent_id' and 'sent', got {sent!r:.80}")
        text = sent.get("sent", sent.get("raw"))
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: sentence #{k} (sent_id={sent['sent_id']}) has empty text")
        texts.append(text)
        ids.append(int(sent["sent_id"]))
    return texts, ids


def _index_instances(instances: Any, path: str) -> tuple[dict[int, dict], dict[int, dict]]:
    if not isinstance(instances, dict) or "images" not in instances or "annotations" not in instances:
        raise ValueError(f"{path}: expected a COCO dict with 'images' and 'annotations'")
    images = {}
    for k, image in enumerate(instances["images"]):
        missing = [key for key in ("id", "file_name", "height", "width") if key not in image]
        if missing:
            raise ValueError(f"{path}: images[{k}] is missing keys {missing}")
        images[int(image["id"])] = image
    anns = {}
    for k, ann in enumerate(instances["annotations"]):
        if "id" not in ann:
            raise ValueError(f"{path}: annotations[{k}] is missing key 'id'")
        anns[int(ann["id"])] = ann
    return images, anns


def _validate_args(dataset: str, split_by: str, split: str | None) -> None:
    if (dataset, split_by) not in SUPPORTED_SPLITS:
        valid = ", ".join(f"{d}/{s}" for d, s in SUPPORTED_SPLITS)
        raise ValueError(f"dataset/split_by: unknown combination {dataset!r}/{split_by!r}; expected one of {valid}")
    valid_splits = SUPPORTED_SPLITS[(dataset, split_by)]
    if split is not None and split not in valid_splits:
        raise ValueError(
            f"split: unknown split {split!r} for {dataset}/{split_by}; expected one of {list(valid_splits)} or None"
        )


def load_refer(
    root: str | os.PathLike,
    dataset: str,
    split_by: str,
    split: str | None,
    image_root: str | os.PathLike | None = None,
    *,
    verify_images: bool = True,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load one split of a refer-format dataset as a `datasets.Dataset` (one row per ref).

    Args:
        root: folder holding `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json`.
        dataset: "refcoco", "refcoco+", "refcocog" or "refshapes".
        split_by: "unc" (refcoco, refcoco+, refshapes), "umd" or "google" (refcocog).
        split: one of `SUPPORTED_SPLITS[(dataset, split_by)]`, or None for every ref.
        image_root: folder of the images named in instances.json (default `<root>/images`).
        verify_images: open every image header once and check its size against instances.json.
        cache_dir: `datasets` cache folder (default: the `datasets` cache).

    Returns:
        `datasets.Dataset` with features `REFER_FEATURES`; `mask` is (H, W) like its image.

    Raises:
        ValueError: unknown dataset/split_by/split, malformed record, absent annotation or image
            entry, unopenable image, empty mask (messages name the file and the ref).
        FileNotFoundError: a missing annotation file or image (the message holds the path).
        pickle.UnpicklingError: the refs pickle holds anything but plain data.
    """
    _validate_args(dataset, split_by, split)
    root = Path(root)
    refs_path = str(root / dataset / f"refs({split_by}).p")
    instances_path = str(root / dataset / "instances.json")
    image_root = Path(os.path.abspath(image_root if image_root is not None else root / "images"))
    for path in (refs_path, instances_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{dataset}/{split_by}: annotation file not found: {path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_root: image folder not found: {image_root}")

    refs = load_refs_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    try:
        with open(instances_path, encoding="utf-8") as handle:
            instances = json.load(handle)
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError: a file cut short or damaged
        raise ValueError(f"{instances_path}: not a valid JSON file (cut short or damaged?): {err}") from err
    images, anns = _index_instances(instances, instances_path)

    specs = _collect_specs(refs, refs_path, instances_path, images, anns, str(image_root), split, verify_images)
    if not specs:
        raise ValueError(f"{refs_path}: no refs with split {split!r}")
    logger.info("%s/%s %s: %d refs", dataset, split_by, split, len(specs))
    fingerprint = files_fingerprint(
        dataset, split_by, split, str(image_root.resolve()), verify_images, files=(refs_path, instances_path)
    )
    return build_dataset(specs, fingerprint=fingerprint, split=split, cache_dir=cache_dir)


def selected_refs(refs, refs_path, split):
    """`(ref, where, sentences, sent_ids)` for each ref of `split` (every ref when None), in file order: a dict
    with the keys every refer-format ref has, its sentences parsed; `where` names the file and the ref for
    errors. `ValueError` for a malformed ref (also one outside `split`)."""
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"{refs_path}: ref #{k} is a {type(ref).__name__}, expected a dict")
        missing = [key for key in _REQUIRED_REF_KEYS if key not in ref]
        if missing:
            raise ValueError(f"{refs_path}: ref #{k} (ref_id={ref.get('ref_id')}) is missing keys {missing}")
        if split is not None and ref["split"] != split:
            continue
        where = f"{refs_path}: ref_id={ref['ref_id']}"
        yield (ref, where, *parse_sentences(ref["sentences"], where))


def _collect_specs(
    refs: list, refs_path: str, instances_path: str, images: dict, anns: dict,
    image_root: str, split: str | None, verify_images: bool,
) -> list[RowSpec]:
    """Validate every selected ref against the annotations and images; build the row specs."""
    checked_images: dict[int, tuple[int, int]] = {}
    specs = []
    for ref, where, sentences, sent_ids in selected_refs(refs, refs_path, split):
        ann = anns.get(int(ref["ann_id"]))
        if ann is None:
            raise ValueError(f"{where}: ann_id={ref['ann_id']} is absent from {instances_path}")
        missing = [key for key in _REQUIRED_ANN_KEYS if key not in ann]
        if missing:
            raise ValueError(
                f"{instances_path}: annotation id={ann['id']} (ref_id={ref['ref_id']}) is missing keys {missing}"
            )
        if int(ann["image_id"]) != int(ref["image_id"]):
            raise ValueError(
                f"{where}: image_id={ref['image_id']} but its annotation {ann['id']} is on image {ann['image_id']}"
            )
        info = images.get(int(ref["image_id"]))
        if info is None:
            raise ValueError(f"{where}: image_id={ref['image_id']} is absent from {instances_path}")
        image_path = os.path.join(image_root, info["file_name"])
        if info["id"] not in checked_images:
            checked_images[info["id"]] = check_image(
                image_path, int(info["height"]), int(info["width"]), verify=verify_images, where=where
            )
        category_id = ref.get("category_id", ann.get("category_id"))
        if category_id is None:
            raise ValueError(f"{where}: no category_id in the ref or its annotation")
        specs.append(
            RowSpec(
                image_path=image_path, segmentation=ann["segmentation"], height=int(info["height"]),
                width=int(info["width"]), sentences=sentences, sent_ids=sent_ids, ref_id=int(ref["ref_id"]),
                ann_id=int(ref["ann_id"]), image_id=int(ref["image_id"]), category_id=int(category_id),
                bbox=[float(v) for v in ann["bbox"]], split=str(ref["split"]),
                where=f"{where} (ann_id={ann['id']} in {instances_path})",
            )
        )
    return specs


def explode_sentences(ds: datasets.Dataset) -> datasets.Dataset:
    """One row per sentence: `sentence` (str) and `sent_id` (int) replace `sentences`/`sent_ids`.

    Images and masks are passed through undecoded, so this is cheap even for large splits.
    """
    missing = [name for name in ("sentences", "sent_ids") if name not in ds.column_names]
    if missing:
        raise ValueError(f"ds: expected columns 'sentences' and 'sent_ids', missing {missing}")
    raw = ds.cast_column("image", datasets.Image(decode=False))
    raw = raw.cast_column("mask", datasets.Image(mode="L", decode=False))
    out_features = {}
    for name, feature in raw.features.items():
        if name == "sentences":
            out_features["sentence"] = datasets.Value("string")
        elif name == "sent_ids":
            out_features["sent_id"] = datasets.Value("int64")
        else:
            out_features[name] = feature
    exploded = raw.map(
        _explode_batch, batched=True, remove_columns=raw.column_names, features=datasets.Features(out_features)
    )
    return exploded.cast_column("image", ds.features["image"]).cast_column("mask", ds.features["mask"])


def _explode_batch(batch: dict[str, list]) -> dict[str, list]:
    renamed = {"sentences": "sentence", "sent_ids": "sent_id"}
    out: dict[str, list] = {renamed.get(k, k): [] for k in batch}
    for i, sentences in enumerate(batch["sentences"]):
        if len(sentences) != len(batch["sent_ids"][i]):
            raise ValueError(f"ds: row with ref_id={batch.get('ref_id', ['?'] * (i + 1))[i]} has "
                             f"{len(sentences)} sentences but {len(batch['sent_ids'][i])} sent_ids")
        for sentence, sent_id in zip(sentences, batch["sent_ids"][i], strict=True):
            out["sentence"].append(sentence)
            out["sent_id"].append(sent_id)
            for key, values in batch.items():
                if key not in ("sentences", "sent_ids"):
                    out[key].append(values[i])
    return out


__all__ = ["REFER_FEATURES", "SUPPORTED_SPLITS", "explode_sentences", "load_refer"]
