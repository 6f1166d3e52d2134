"""Reader for the Hub parquet copies of RefCOCO-family refs (schema of `jxu124/refcoco`).

The `jxu124/refcoco` (and `refcocoplus`, `refcocog`) parquet files hold one row per ref with
the columns (from the dataset card): `sent_ids` (list of int), `file_name`, `ann_id`, `ref_id`,
`image_id`, `split`, `sentences` (list of `{raw, sent, sent_id, tokens}`), `category_id`,
`raw_anns` (JSON string of the COCO annotation: `segmentation`, `bbox`, `area`, ...),
`raw_image_info` (JSON string of the COCO image entry), `raw_sentences` (JSON string),
`image_path`, `bbox`, `captions`, `global_image_id`, `anns_id`. The images are not inside: they
are the COCO train2014 files, kept in `image_root`.

What `load_refer_parquet` reads, and the assumptions it makes:
- `sentences` may be the list of dicts or a JSON string of it (older revisions of the copies
  stored a string); when `sentences` is absent, `raw_sentences` is used the same way. Sentence
  ids come from the dicts (`sent_id`), else from the `sent_ids` column.
- `raw_anns` is a JSON object (the referred annotation) or a JSON list of annotations, in which
  case the one whose `id` equals `ann_id` is used. `bbox` and `category_id` come from the
  annotation (as in `load_refer`), falling back to the row's columns.
- The image size comes from `raw_image_info` (`height`, `width`), else from the image header.
- The image file: the first existing of `raw_image_info["file_name"]`; `file_name` with its
  ref suffix stripped (`COCO_train2014_000000581857_16.jpg` -> `COCO_train2014_000000581857.jpg`,
  the refer pickles' naming); `file_name` as is; `image_path` and its base name — each taken
  relative to `image_root`.
- `split` filters on the `split` column; "validation" (the Hub split name) means "val".
`captions`, `global_image_id` and `anns_id` are not needed and are ignored. The output rows
have exactly the features of `load_refer` (`refseg.data.refer.REFER_FEATURES`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import datasets

from .refer import RowSpec, build_dataset, check_image, files_fingerprint, parse_sentences

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {"validation": "val"}
_REF_SUFFIX = re.compile(r"^(?P<stem>.+_\d{12})_\d+(?P<ext>\.\w+)$")
_COLUMNS = (
    "sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "sentences", "raw_sentences",
    "category_id", "raw_anns", "raw_image_info", "image_path", "bbox",
)


def _resolve_files(path_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    items = [path_or_files] if isinstance(path_or_files, (str, os.PathLike)) else list(path_or_files)
    if not items:
        raise ValueError(
            "path_or_files: expected a parquet file, a folder, a glob pattern or a list of them; got an empty list"
        )
    files: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "**", "*.parquet"), recursive=True))
            if not found:
                raise FileNotFoundError(f"path_or_files: no *.parquet file under {item}")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise FileNotFoundError(f"path_or_files: no file matches {item}")
            files.extend(found)
        else:
            raise FileNotFoundError(f"path_or_files: parquet file not found: {item}")
    return files


def _json_field(value: Any, name: str, where: str) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: column {name!r} is not valid JSON ({err})") from err
    return value


def _pick_annotation(raw_anns: Any, ann_id: int, where: str) -> dict:
    anns = _json_field(raw_anns, "raw_anns", where)
    if isinstance(anns, dict):
        anns = [anns]
    if not isinstance(anns, list):
        raise ValueError(f"{where}: 'raw_anns' must hold a COCO annotation object or a list of them")
    for ann in anns:
        if isinstance(ann, dict) and int(ann.get("id", ann_id)) == ann_id:
            if "segmentation" not in ann:
                raise ValueError(f"{where}: the annotation in 'raw_anns' has no 'segmentation'")
            return ann
    raise ValueError(f"{where}: 'raw_anns' holds no annotation with id={ann_id}")


def _image_candidates(row: dict, info: dict | None) -> list[str]:
    names = []
    if info and info.get("file_name"):
        names.append(info["file_name"])
    file_name = row.get("file_name")
    if file_name:
        match = _REF_SUFFIX.match(os.path.basename(file_name))
        if match:
            names.append(match["stem"] + match["ext"])
        names.append(file_name)
    image_path = row.get("image_path")
    if image_path:
        names.extend([image_path, os.path.basename(image_path)])
    return list(dict.fromkeys(names))


def _row_spec(row: dict, image_root: str, where: str, verify_images: bool, size_cache: dict) -> RowSpec:
    missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "raw_anns") if row.get(key) is None]
    if "sentences" not in row and "raw_sentences" not in row:
        missing.append("sentences")
    if missing:
        raise ValueError(f"{where} is missing columns {missing}")
    where = f"{where} (ref_id={row['ref_id']})"
    sentences = _json_field(row.get("sentences", row.get("raw_sentences")), "sentences", where)
    if isinstance(sentences, list) and sentences and isinstance(sentences[0], dict) and "sent_id" not in sentences[0]:
        ids = row.get("sent_ids") or []
        if len(ids) != len(sentences):
            raise ValueError(
                f"{where}: sentences carry no sent_id and 'sent_ids' has {len(ids)} entries "
                f"for {len(sentences)} sentences"
            )
        sentences = [dict(sent, sent_id=sid) for sent, sid in zip(sentences, ids, strict=True)]
    texts, sent_ids = parse_sentences(sentences, where)
    ann = _pick_annotation(row["raw_anns"], int(row["ann_id"]), where)
    info = _json_field(row.get("raw_image_info"), "raw_image_info", where) if row.get("raw_image_info") else None

    candidates = _image_candidates(row, info)
    if not candidates:
        raise ValueError(f"{where}: no 'file_name', 'image_path' or 'raw_image_info' to find the image by")
    paths = [os.path.join(image_root, c) for c in candidates]
    image_path = next((p for p in paths if os.path.isfile(p)), None)
    if image_path is None:
        raise FileNotFoundError(f"{where}: image not found under {image_root}; tried {candidates}")
    height = int(info["height"]) if info and "height" in info else None
    width = int(info["width"]) if info and "width" in info else None
    if image_path not in size_cache:
        verify = verify_images or height is None  # without raw_image_info the header gives the size
        size_cache[image_path] = check_image(image_path, height, width, verify=verify, where=where)
    height, width = size_cache[image_path]

    bbox = ann.get("bbox", row.get("bbox"))
    category_id = ann.get("category_id", row.get("category_id"))
    if bbox is None or category_id is None:
        field = "bbox" if bbox is None else "category_id"
        raise ValueError(f"{where}: neither the annotation nor the row gives {field}")
    split = str(row["split"])
    return RowSpec(
        image_path=image_path, segmentation=ann["segmentation"], height=height, width=width, sentences=texts,
        sent_ids=sent_ids, ref_id=int(row["ref_id"]), ann_id=int(row["ann_id"]), image_id=int(row["image_id"]),
        category_id=int(category_id), bbox=[float(v) for v in bbox], split=split,
        where=f"{where} ann_id={row['ann_id']}",
    )


def load_refer_parquet(
    path_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    split: str | None = None,
    *,
    verify_images: bool = True,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load refs from `jxu124/refcoco`-style parquet files (see the module docstring).

    Args:
        path_or_files: a parquet file, a folder (all `*.parquet` below it), a glob, or a list.
        image_root: folder holding the COCO images (e.g. `.../train2014`).
        split: keep rows whose `split` column equals this ("validation" means "val"); None keeps all.
        verify_images: open every image header once and check its size.
        cache_dir: `datasets` cache folder (default: the `datasets` cache).

    Returns:
        `datasets.Dataset` with the features of `load_refer` (`REFER_FEATURES`).
    """
    import pyarrow.parquet as pq  # datasets depends on pyarrow

    files = _resolve_files(path_or_files)
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root: image folder not found: {image_root}")
    wanted = _SPLIT_ALIASES.get(split, split) if split is not None else None
    specs: list[RowSpec] = []
    seen_splits: set[str] = set()
    size_cache: dict[str, tuple[int, int]] = {}
    for path in files:
        schema_names = set(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in _COLUMNS if c in schema_names])
        for k, row in enumerate(table.to_pylist()):
            seen_splits.add(str(row.get("split")))
            if wanted is not None and row.get("split") != wanted:
                continue
            specs.append(_row_spec(row, image_root, f"{path}: row {k}", verify_images, size_cache))
    if not specs:
        raise ValueError(f"split: no rows with split {split!r} in {files}; splits present: {sorted(seen_splits)}")
    logger.info("parquet %s: %d refs from %d files", split, len(specs), len(files))
    fingerprint = files_fingerprint("parquet", wanted, str(Path(image_root).resolve()), verify_images, files=files)
    return build_dataset(specs, fingerprint=fingerprint, split=wanted, cache_dir=cache_dir)


__all__ = ["load_refer_parquet"]
