"""`load_refer_parquet` on small parquet files written in the `jxu124/refcoco` schema."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from refseg.data import load_refer, load_refer_parquet, load_refs_pickle


def jxu124_rows(refs, instances, *, sentences_as_json=False):
    """Rows of the Hub copies: one per ref, annotation and image entry as JSON strings."""
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    rows = []
    for ref in refs:
        image = images[ref["image_id"]]
        stem, ext = image["file_name"].rsplit(".", 1)
        sentences = [{"raw": s["raw"], "sent": s["sent"], "sent_id": s["sent_id"], "tokens": s["tokens"]}
                     for s in ref["sentences"]]
        rows.append({
            "sent_ids": ref["sent_ids"],
            "file_name": f"{stem}_{ref['ann_id']}.{ext}",  # ref-suffixed, like the refer pickles
            "ann_id": ref["ann_id"], "ref_id": ref["ref_id"], "image_id": ref["image_id"], "split": ref["split"],
            "sentences": json.dumps(sentences) if sentences_as_json else sentences,
            "category_id": ref["category_id"],
            "raw_anns": json.dumps(anns[ref["ann_id"]]),
            "raw_image_info": json.dumps(image),
            "raw_sentences": json.dumps(sentences),
            "image_path": f"coco/train2014/{image['file_name']}",
            "bbox": anns[ref["ann_id"]]["bbox"],
            "captions": [s["sent"] for s in ref["sentences"]],
            "global_image_id": f"coco.{ref['image_id']}",
            "anns_id": str(ref["ann_id"]),
        })
    return rows


def test_parquet_matches_refer_reader(refshapes_root, tmp_path):
    refs = load_refs_pickle(refshapes_root / "refshapes" / "refs(unc).p")
    instances = json.loads((refshapes_root / "refshapes" / "instances.json").read_text())
    half = len(refs) // 2
    pq.write_table(pa.Table.from_pylist(jxu124_rows(refs[:half], instances)), tmp_path / "part-0.parquet")
    second = jxu124_rows(refs[half:], instances, sentences_as_json=True)
    pq.write_table(pa.Table.from_pylist(second), tmp_path / "part-1.parquet")

    for split in ("train", "testB", "unseen"):
        expected = load_refer(refshapes_root, "refshapes", "unc", split)
        got = load_refer_parquet(tmp_path, refshapes_root / "images", split=split)
        assert got.features == expected.features
        assert got.num_rows == expected.num_rows > 0
        for column in ("sentences", "sent_ids", "ref_id", "ann_id", "image_id", "category_id", "bbox", "split"):
            assert got[column] == expected[column], column
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
            assert a["image"].size == b["image"].size
    both = load_refer_parquet([tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"], refshapes_root / "images")
    assert both.num_rows == len(refs)


def _coco_style(tmp_path, raw_anns, *, image_info=True):
    images = tmp_path / "train2014"
    images.mkdir()
    Image.new("RGB", (14, 12), (3, 2, 1)).save(images / "COCO_train2014_000000000042.jpg")
    ann = {"id": 9, "image_id": 42, "category_id": 5, "bbox": [2.0, 3.0, 8.0, 5.0], "area": 40.0, "iscrowd": 0,
           "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]}
    row = {
        "sent_ids": [100, 101], "file_name": "COCO_train2014_000000000042_9.jpg", "ann_id": 9, "ref_id": 4,
        "image_id": 42, "split": "val",
        "sentences": [{"raw": "The box", "sent": "the box", "sent_id": 100, "tokens": ["the", "box"]},
                      {"raw": "left", "sent": "left", "sent_id": 101, "tokens": ["left"]}],
        "category_id": 5, "raw_anns": json.dumps(raw_anns(ann)),
        "raw_image_info": json.dumps({"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 12,
                                      "width": 14}) if image_info else None,
        "bbox": [2.0, 3.0, 8.0, 5.0],
    }
    path = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    return path, images


@pytest.mark.parametrize("raw_anns", [lambda a: a, lambda a: [dict(a, id=8), a]], ids=["object", "list"])
@pytest.mark.parametrize("image_info", [True, False])
def test_coco_file_name_suffix_and_polygon(tmp_path, raw_anns, image_info):
    path, images = _coco_style(tmp_path, raw_anns, image_info=image_info)
    ds = load_refer_parquet(str(path), images, split="validation")  # the Hub split name means "val"
    assert ds.num_rows == 1
    row = ds[0]
    expected = np.zeros((12, 14), np.uint8)
    expected[3:8, 2:10] = 255
    np.testing.assert_array_equal(np.asarray(row["mask"]), expected)
    assert row["sentences"] == ["the box", "left"] and row["sent_ids"] == [100, 101]
    assert (row["ref_id"], row["ann_id"], row["image_id"], row["category_id"], row["split"]) == (4, 9, 42, 5, "val")
    assert row["image"].size == (14, 12)


def test_parquet_errors(tmp_path):
    path, images = _coco_style(tmp_path, lambda a: a)
    with pytest.raises(ValueError, match=r"no rows with split 'train'.*splits present: \['val'\]"):
        load_refer_parquet(path, images, split="train")
    with pytest.raises(FileNotFoundError, match="parquet file not found"):
        load_refer_parquet(tmp_path / "nope.parquet", images)
    (images / "COCO_train2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 0 \(ref_id=4\): image not found.*COCO_train2014_0+42.jpg"):
        load_refer_parquet(path, images)
    table = pq.read_table(path).drop(["raw_anns"])
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"row 0 is missing columns \['raw_anns'\]"):
        load_refer_parquet(path, images)
    with pytest.raises(ValueError, match="path_or_files"):
        load_refer_parquet([], images)
