"""`load_refer_parquet` on the self-contained `lmms-lab/RefCOCO` layout (embedded images) and on jxu124's
`test` split (RefCOCO's testA), both read to what `load_refer` gives for the same refs."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refseg.data import REFER_FEATURES, load_refer, load_refer_parquet, load_refs_pickle
from refseg.data.parquet import parquet_layout

from test_data_parquet import jxu124_rows

PROMPT = "Please carefully observe the area circled in the image and come up with a caption for the area."


def _refer_files(root):
    refs = load_refs_pickle(root / "refshapes" / "refs(unc).p")
    instances = json.loads((root / "refshapes" / "instances.json").read_text())
    return refs, instances


def lmms_rows(root, refs, instances, *, per_sentence=False):
    """Rows as lmms-lab/RefCOCO publishes them: the image's bytes inside, one row per ref (`answer` the list
    of its expressions), or with `per_sentence` one row per expression (`answer` a string)."""
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    rows = []
    for ref in refs:
        ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
        data = (root / "images" / image["file_name"]).read_bytes()
        common = {"image": {"bytes": data, "path": None}, "question": PROMPT,
                  "segmentation": [float(v) for v in ann["segmentation"][0]], "bbox": ann["bbox"], "iscrowd": 0,
                  "file_name": f"COCO_train2014_{ref['image_id']:012d}_{ref['ann_id']}.jpg"}
        sentences = [s["sent"] for s in ref["sentences"]]
        if per_sentence:
            rows += [{"question_id": f"q{ref['ref_id']}_{k}", **common, "answer": s} for k, s in enumerate(sentences)]
        else:
            rows.append({"question_id": str(ref["ref_id"]), **common, "answer": sentences})
    return rows


def _write(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _assert_same_refs(got, expected, *, ids=True):
    assert got.features == expected.features == REFER_FEATURES
    assert got.num_rows == expected.num_rows > 0
    for column in ("sentences", "split") + (("ref_id", "image_id") if ids else ()):
        assert got[column] == expected[column], column
    np.testing.assert_allclose(got["bbox"], expected["bbox"])
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"].convert(a["image"].mode)))


@pytest.fixture(scope="module")
def refer(refshapes_root):
    return _refer_files(refshapes_root)


def test_lmms_layout_reads_to_the_refer_features(refshapes_root, refer, tmp_path):
    refs, instances = refer
    for split in ("val", "testA"):
        chosen = [r for r in refs if r["split"] == split]
        # no `split` column: the split is the file's (`<split>-00000-of-00001.parquet`, as on the Hub)
        _write(lmms_rows(refshapes_root, chosen, instances), tmp_path / f"{split}-00000-of-00001.parquet")
    assert parquet_layout(str(tmp_path / "val-00000-of-00001.parquet")) == "embedded"
    for split in ("val", "testA"):
        expected = load_refer(refshapes_root, "refshapes", "unc", split)
        got = load_refer_parquet(tmp_path, split=split)  # no image_root: the images are inside
        _assert_same_refs(got, expected)
        assert set(got["ann_id"]) == set(got["category_id"]) == {-1}  # not in this layout
        flat = [i for ids in got["sent_ids"] for i in ids]
        assert flat == list(range(len(flat)))
    assert load_refer_parquet(tmp_path).num_rows == sum(r["split"] in ("val", "testA") for r in refs)


def test_lmms_rows_of_one_sentence_are_grouped_back_into_refs(refshapes_root, refer, tmp_path):
    refs, instances = refer
    chosen = [r for r in refs if r["split"] == "val"]
    rows = lmms_rows(refshapes_root, chosen, instances, per_sentence=True)
    assert len(rows) > len(chosen)  # some refs have several expressions
    half = len(rows) // 2
    _write(rows[:half], tmp_path / "val-00000-of-00002.parquet")
    _write(rows[half:] + rows[:1], tmp_path / "val-00001-of-00002.parquet")  # a row published twice
    got = load_refer_parquet(tmp_path, split="val")
    _assert_same_refs(got, load_refer(refshapes_root, "refshapes", "unc", "val"), ids=False)


def test_lmms_split_comes_from_a_column_a_folder_or_the_argument(refshapes_root, refer, tmp_path):
    refs, instances = refer
    rows = lmms_rows(refshapes_root, refs[:3], instances)
    (tmp_path / "testB").mkdir()
    _write(rows, tmp_path / "testB" / "0000.parquet")  # the Hub's converted copies: <split>/<n>.parquet
    assert set(load_refer_parquet(tmp_path / "testB")["split"]) == {"testB"}
    _write([dict(row, split="val") for row in rows], tmp_path / "data.parquet")
    assert set(load_refer_parquet(tmp_path / "data.parquet")["split"]) == {"val"}
    _write(rows, tmp_path / "anything.parquet")
    with pytest.raises(ValueError, match="split"):
        load_refer_parquet(tmp_path / "anything.parquet")
    assert set(load_refer_parquet(tmp_path / "anything.parquet", split="val")["split"]) == {"val"}
    with pytest.raises(ValueError, match="mix layouts"):
        load_refer_parquet([tmp_path / "anything.parquet", _write(jxu124_rows(refs[:2], instances),
                                                                   tmp_path / "jxu.parquet")], split="val")
    _write([{"foo": 1}], tmp_path / "foo.parquet")
    with pytest.raises(ValueError, match="no known layout"):
        load_refer_parquet(tmp_path / "foo.parquet")


def test_jxu124_test_split_is_refcoco_testA(refshapes_root, refer, tmp_path):
    """jxu124/refcoco publishes testA as its `test` split: read as testA for refcoco / refcoco+."""
    refs, instances = refer
    rows = [dict(row, split="test") for row in jxu124_rows([r for r in refs if r["split"] == "testA"], instances)]
    _write(rows, tmp_path / "test-00000-of-00001.parquet")
    expected = load_refer(refshapes_root, "refshapes", "unc", "testA")
    for split in ("testA", "test"):
        got = load_refer_parquet(tmp_path, refshapes_root / "images", split=split, dataset="refcoco")
        _assert_same_refs(got, expected)
        assert got["ann_id"] == expected["ann_id"]
    # RefCOCOg (umd) has a real test split: without `dataset`, `test` stays `test`
    assert set(load_refer_parquet(tmp_path, refshapes_root / "images", split="test")["split"]) == {"test"}
    with pytest.raises(ValueError, match="splits present"):
        load_refer_parquet(tmp_path, refshapes_root / "images", split="testA")
    with pytest.raises(ValueError, match="image_root"):
        load_refer_parquet(tmp_path, split="test")


def test_training_data_passes_the_dataset_so_jxu124_test_reads_as_testA(refshapes_root, refer, tmp_path):
    """`--parquet_files` through the scripts (`refseg.training.data.load_split`) names the dataset, so
    `--dataset refcoco --split testA` finds jxu124's `test` rows."""
    from train_args import DataArguments

    from refseg.training.data import load_split

    refs, instances = refer
    rows = [dict(row, split="test") for row in jxu124_rows([r for r in refs if r["split"] == "testA"], instances)]
    _write(rows, tmp_path / "test-00000-of-00001.parquet")
    args = DataArguments(dataset="refcoco", parquet_files=str(tmp_path / "*.parquet"),
                         image_root=str(refshapes_root / "images"))
    got = load_split(args, "testA")
    _assert_same_refs(got, load_refer(refshapes_root, "refshapes", "unc", "testA"))
