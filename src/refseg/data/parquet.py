"""Reader for the Hub parquet copies of RefCOCO-family refs, in two layouts detected from the columns.

- **`jxu124/refcoco` layout** (refer columns: `raw_anns`, `ref_id`, `sentences`; images kept apart, in COCO
  train2014): below.
- **`lmms-lab/RefCOCO` layout** (`lmms-lab/RefCOCO`, `RefCOCOplus`, `RefCOCOg`; an embedded `image`
  column and a `segmentation` column, no `raw_anns`): see "Self-contained layout" below.

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
- The `jxu124/refcoco` and `jxu124/refcocoplus` copies publish RefCOCO's testA split under the Hub
  split name `test` (there is no other test split in RefCOCO/RefCOCO+ unc). With
  `dataset="refcoco"` or `"refcoco+"`, a row whose `split` reads `test` is read as `testA`, and
  `split="test"` asks for testA. RefCOCOg (umd) has a real `test` split, so without `dataset` (or
  with `"refcocog"`) `test` stays `test`.
`captions`, `global_image_id` and `anns_id` are not needed and are ignored. The output rows
have exactly the features of `load_refer` (`refseg.data.refer.REFER_FEATURES`).

Self-contained layout (`lmms-lab/RefCOCO`): columns `question_id` (str), `image` (the embedded
image: `{bytes, path}`), `question` (the evaluation prompt of lmms-eval, not an expression),
`answer` (list of the ref's expressions), `segmentation` (one flattened polygon `[x1, y1, x2, y2,
...]`), `bbox` (COCO xywh), `iscrowd`, `file_name`. What is read, and how:
- The image comes from the row's own bytes; `image_root` is not used. Height and width are the
  image's. The mask is the polygon decoded with pycocotools. An object drawn by several polygons
  in COCO arrives as their coordinates joined into one list: it is decoded as one polygon, which
  adds thin seams between the parts; the layout keeps nothing that would separate them.
- Expressions: `answer` when it is a list of strings (one row per ref, as the lmms-lab copies are
  published); an `answer` string is one expression (a copy with one row per expression); without
  `answer`, `question` is the expression.
- Refs are grouped back from rows: rows with the same `file_name`, `bbox` and `segmentation` are one
  ref, their expressions concatenated in row order; a row whose expression list repeats one already
  taken for that ref is a duplicate and adds nothing. Where those three columns cannot tell refs
  apart (two refs of one object), their sentences end up in one ref; evaluation scores every
  sentence either way.
- IDs the layout does not have: `ref_id` is the first row's `question_id` when it is an integer,
  else the ref's position in the load; `sent_ids` count the load's sentences from 0; `image_id` is
  the 12-digit COCO id in `file_name` (else -1); `ann_id` and `category_id` are -1.
- `split`: a `split` column if there is one, else the file's name (`testA-00000-of-00001.parquet`
  -> `testA`) or its folder (`.../testA/0000.parquet`, the Hub's converted copies), else the `split`
  argument; `ValueError` when none tells.
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

from .masks import decode_segmentation, mask_to_png
from .refer import (
    REFER_FEATURES, RowSpec, build_dataset, check_image, dataset_from_generator, files_fingerprint, parse_sentences,
)

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {"validation": "val"}
# jxu124's RefCOCO / RefCOCO+ copies name their testA split "test" (see the module docstring).
_TEST_IS_TESTA = ("refcoco", "refcoco+")
_KNOWN_SPLITS = ("train", "val", "validation", "test", "testA", "testB", "unseen")
_COCO_ID = re.compile(r"_(\d{12})(?:_\d+)?\.\w+$")
_EMBEDDED_COLUMNS = ("question_id", "question", "answer", "segmentation", "bbox", "file_name", "split")
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


def _canonical_split(value, dataset: str | None) -> str:
    value = _SPLIT_ALIASES.get(value, value)
    if value == "test" and dataset in _TEST_IS_TESTA:
        return "testA"
    return value


def _file_split(path: str) -> str | None:
    """The split a Hub parquet file belongs to, from its name (`testA-00000-of-00001.parquet`) or folder."""
    name = os.path.basename(path).split("-")[0].split(".")[0]
    for candidate in (name, os.path.basename(os.path.dirname(path))):
        if candidate in _KNOWN_SPLITS:
            return candidate
    return None


def _embedded_expressions(row: dict, where: str) -> list[str]:
    answer = row.get("answer")
    if answer is None:
        answer = row.get("question")
    texts = [answer] if isinstance(answer, str) else list(answer or [])
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where}: 'answer' (or 'question') must hold non-empty expressions, got {answer!r:.80}")
    return texts


def _read_schema_names(path: str) -> set[str]:
    """Column names of parquet file `path`; `ValueError` naming the file when it is not readable parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return set(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def _read_table(path: str, columns: list[str]):
    """`columns` of parquet file `path` as a pyarrow table; `ValueError` naming the file when it is damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def _embedded_refs(files: list[str], split: str | None, dataset: str | None) -> tuple[list[dict], set[str]]:
    """Pass 1 over the self-contained layout, images left unread: one dict per ref (module docstring)."""

    refs: dict[tuple, dict] = {}
    seen_splits: set[str] = set()
    for path in files:
        schema_names = _read_schema_names(path)
        table = _read_table(path, [c for c in _EMBEDDED_COLUMNS if c in schema_names])
        file_split = _file_split(path)
        for k, row in enumerate(table.to_pylist()):
            where = f"{path}: row {k}"
            row_split = row.get("split") or file_split or split
            if row_split is None:
                raise ValueError(f"{where}: no 'split' column and the file name names no split; pass `split`")
            row_split = _canonical_split(str(row_split), dataset)
            seen_splits.add(row_split)
            if split is not None and row_split != split:
                continue
            if not row.get("segmentation") or row.get("bbox") is None:
                raise ValueError(f"{where}: 'segmentation' and 'bbox' are required")
            texts = _embedded_expressions(row, where)
            key = (row.get("file_name"), tuple(row["bbox"]), tuple(row["segmentation"]))
            ref = refs.get(key)
            if ref is None:
                question_id = str(row.get("question_id", ""))
                match = _COCO_ID.search(row.get("file_name") or "")
                ref = refs[key] = {
                    "ref_id": int(question_id) if question_id.isdigit() else len(refs),
                    "image_id": int(match[1]) if match else -1, "file": path, "row": k, "split": row_split,
                    "segmentation": [list(row["segmentation"])], "bbox": [float(v) for v in row["bbox"]],
                    "groups": [], "sentences": [], "where": where,
                }
            if texts in ref["groups"]:  # the same ref published twice
                continue
            ref["groups"].append(texts)
            ref["sentences"].extend(texts)
    return list(refs.values()), seen_splits


def _embedded_dataset(refs: list[dict], *, fingerprint: str, split: str | None, cache_dir: str | None):
    """Pass 2: read each ref's image bytes from its first row, decode its mask; `REFER_FEATURES` rows."""
    import io

    from PIL import Image

    by_file: dict[str, dict[int, dict]] = {}
    for ref in refs:
        by_file.setdefault(ref["file"], {})[ref["row"]] = ref

    def generate():
        sent_id = 0
        for path, wanted in by_file.items():
            images = _read_table(path, ["image"]).column("image")
            for row in sorted(wanted):
                ref = wanted[row]
                image = images[row].as_py()
                data = image.get("bytes") if isinstance(image, dict) else None
                if not data:
                    raise ValueError(f"{ref['where']}: the 'image' column holds no image bytes")
                with Image.open(io.BytesIO(data)) as opened:
                    width, height = opened.size
                mask = decode_segmentation(ref["segmentation"], height, width, where=ref["where"])
                if not mask.any():
                    raise ValueError(f"{ref['where']}: the mask is empty")
                ids = list(range(sent_id, sent_id + len(ref["sentences"])))
                sent_id += len(ids)
                yield {
                    "image": {"path": None, "bytes": data}, "mask": {"path": None, "bytes": mask_to_png(mask)},
                    "sentences": ref["sentences"], "sent_ids": ids, "ref_id": ref["ref_id"], "ann_id": -1,
                    "image_id": ref["image_id"], "category_id": -1, "bbox": ref["bbox"], "split": ref["split"],
                }

    return dataset_from_generator(generate, REFER_FEATURES, fingerprint=fingerprint, split=split, cache_dir=cache_dir)


def parquet_layout(path: str) -> str:
    """`"embedded"` (`image` and `segmentation` columns, no `raw_anns`: the lmms-lab copies) or `"jxu124"` (refer
    columns: `raw_anns`, `ref_id`, `sentences`); `ValueError` for any other file."""

    names = _read_schema_names(path)
    if {"image", "segmentation"} <= names and "raw_anns" not in names:
        return "embedded"
    if names & {"raw_anns", "ref_id", "sentences", "raw_sentences"}:
        return "jxu124"  # the per-row checks name any column it lacks
    raise ValueError(f"path_or_files: {path} is in no known layout (columns {sorted(names)}); expected "
                     "jxu124/refcoco's (`raw_anns`, `sentences`, ...) or lmms-lab/RefCOCO's (`image`, "
                     "`segmentation`, `answer`, ...)")


def load_refer_parquet(
    path_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    *,
    dataset: str | None = None,
    verify_images: bool = True,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load refs from Hub parquet copies, `jxu124/refcoco` or `lmms-lab/RefCOCO` layout (module docstring).

    Args:
        path_or_files: a parquet file, a folder (all `*.parquet` below it), a glob, or a list; all in one layout.
        image_root: folder holding the COCO images (e.g. `.../train2014`); required by the `jxu124` layout,
            unused by the self-contained one.
        split: keep rows of this split ("validation" means "val"; "test" means "testA" for `dataset`
            refcoco / refcoco+); None keeps all.
        dataset: `"refcoco"`, `"refcoco+"`, `"refcocog"` or None; only used to read jxu124's `test` as testA.
        verify_images: `jxu124` layout: open every image header once and check its size.
        cache_dir: `datasets` cache folder (default: the `datasets` cache).

    Returns:
        `datasets.Dataset` with the features of `load_refer` (`REFER_FEATURES`).
    """

    files = _resolve_files(path_or_files)
    layouts = {path: parquet_layout(path) for path in files}
    if len(set(layouts.values())) > 1:
        raise ValueError(f"path_or_files: the files mix layouts: {layouts}")
    wanted = _canonical_split(split, dataset) if split is not None else None
    if layouts[files[0]] == "embedded":
        refs, seen_splits = _embedded_refs(files, wanted, dataset)
        if not refs:
            raise ValueError(f"split: no rows with split {split!r} in {files}; splits present: {sorted(seen_splits)}")
        logger.info("parquet (embedded images) %s: %d refs from %d files", split, len(refs), len(files))
        fingerprint = files_fingerprint("parquet-embedded", wanted, dataset, files=files)
        return _embedded_dataset(refs, fingerprint=fingerprint, split=wanted, cache_dir=cache_dir)

    if image_root is None:
        raise ValueError("image_root: the jxu124/refcoco layout keeps images apart; pass the COCO train2014 folder")
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root: image folder not found: {image_root}")
    specs: list[RowSpec] = []
    seen_splits: set[str] = set()
    size_cache: dict[str, tuple[int, int]] = {}
    for path in files:
        schema_names = _read_schema_names(path)
        table = _read_table(path, [c for c in _COLUMNS if c in schema_names])
        for k, row in enumerate(table.to_pylist()):
            if row.get("split") is not None:
                row["split"] = _canonical_split(str(row["split"]), dataset)
            seen_splits.add(str(row.get("split")))
            if wanted is not None and row["split"] != wanted:
                continue
            specs.append(_row_spec(row, image_root, f"{path}: row {k}", verify_images, size_cache))
    if not specs:
        raise ValueError(f"split: no rows with split {split!r} in {files}; splits present: {sorted(seen_splits)}")
    logger.info("parquet %s: %d refs from %d files", split, len(specs), len(files))
    fingerprint = files_fingerprint("parquet", wanted, dataset, str(Path(image_root).resolve()), verify_images,
                                    files=files)
    return build_dataset(specs, fingerprint=fingerprint, split=wanted, cache_dir=cache_dir)


__all__ = ["load_refer_parquet", "parquet_layout"]
