"""`load_grefer`: gRefCOCO's own files (multi-target, no-target, polygon and RLE referents, crowd left out),
against masks computed here with pycocotools alone."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data import load_grefer

H, W = 40, 56


def _sentence(sent_id, text):
    return {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()}


@pytest.fixture(scope="module")
def grefcoco(tmp_path_factory):
    root = tmp_path_factory.mktemp("grefcoco")
    (root / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (W, H), (90, 120, 30)).save(root / "images" / name)
    square = np.zeros((H, W), dtype=np.uint8)
    square[5:15, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 16], "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 18, 2, 18]]},                       # polygon
        {"id": 12, "image_id": 1, "category_id": 4, "bbox": [30, 5, 20, 10], "iscrowd": 0,
         "segmentation": rle},                                                # compressed RLE
        {"id": 13, "image_id": 1, "category_id": 4, "bbox": [0, 30, 56, 10], "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [30 * H, 400, H * W - 30 * H - 400]}},  # crowd (left out)
        {"id": 21, "image_id": 2, "category_id": 3, "bbox": [20, 20, 10, 10], "iscrowd": 0,
         "segmentation": [[20, 20, 30, 20, 30, 30, 20, 30]]},
    ]
    instances = {"images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                            {"id": 2, "file_name": "b.jpg", "height": H, "width": W}],
                 "annotations": anns, "categories": [{"id": 3, "name": "thing"}, {"id": 4, "name": "other"}]}
    refs = [
        {"ref_id": 1, "image_id": 1, "split": "val", "ann_id": [11], "category_id": [3], "no_target": False,
         "sentences": [_sentence(1, "the left thing")]},
        {"ref_id": 2, "image_id": 1, "split": "val", "ann_id": [11, 12, 13], "category_id": [3, 4, 4],
         "no_target": False, "sentences": [_sentence(2, "all of them"), _sentence(3, "every object")]},
        {"ref_id": 3, "image_id": 2, "split": "val", "ann_id": [-1], "category_id": [-1], "no_target": True,
         "sentences": [_sentence(4, "the purple giraffe")]},
        {"ref_id": 4, "image_id": 2, "split": "train", "ann_id": 21, "category_id": 3,
         "sentences": [_sentence(5, "the box")]},
    ]
    (root / "grefcoco").mkdir()
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return root, anns, refs


def _expected_mask(anns, ann_ids):
    """The union of the non-crowd referents' masks, with pycocotools alone (G_REFER getMaskByRef(merge=True))."""
    out = np.zeros((H, W), dtype=bool)
    for ann in anns:
        if ann["id"] not in ann_ids or ann["iscrowd"]:
            continue
        seg = ann["segmentation"]
        rles = mask_utils.frPyObjects(seg, H, W) if isinstance(seg, list) else [seg]
        out |= mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    return out


def test_grefcoco_masks_are_the_union_of_the_referents_and_empty_without_target(grefcoco):
    root, anns, _ = grefcoco
    val = load_grefer(root, "grefcoco", "unc", "val")
    assert val["ref_id"] == [1, 2, 3]
    assert val["ann_ids"] == [[11], [11, 12, 13], []]
    assert val["no_target"] == [False, False, True]
    assert val["ann_id"] == [11, 11, -1] and val["category_id"] == [3, 3, -1]
    assert val["sentences"][1] == ["all of them", "every object"]
    for row, ann_ids in zip(val, ([11], [11, 12, 13], [])):
        mask = np.asarray(row["mask"]) > 0
        assert mask.shape == (H, W)
        assert np.array_equal(mask, _expected_mask(anns, ann_ids)), row["ref_id"]
    masks = [np.asarray(m) > 0 for m in val["mask"]]
    assert masks[0].any() and masks[1].sum() > masks[0].sum() and not masks[2].any()
    assert val["bbox"][1] == [2.0, 2.0, 48.0, 16.0]  # the crowd referent is in neither mask nor box
    assert val["bbox"][2] == [0.0, 0.0, 0.0, 0.0]
    train = load_grefer(root, "grefcoco", "unc", "train")  # a scalar ann_id, no `no_target` key
    assert train["ann_ids"] == [[21]] and train["no_target"] == [False]


def test_grefs_pickle_reads_like_the_json(grefcoco, tmp_path):
    root, _, refs = grefcoco
    (tmp_path / "grefcoco").mkdir()
    (tmp_path / "grefcoco" / "instances.json").write_text((root / "grefcoco" / "instances.json").read_text())
    (tmp_path / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps(refs))
    from_pickle = load_grefer(tmp_path, "grefcoco", "unc", "val", image_root=root / "images")
    from_json = load_grefer(root, "grefcoco", "unc", "val")
    assert from_pickle["ann_ids"] == from_json["ann_ids"]
    for a, b in zip(from_pickle["mask"], from_json["mask"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, message", [
    (lambda refs: refs[2].update(no_target=False), "no_target"),
    (lambda refs: refs[0].update(ann_id=[99]), "ann_id=99"),
    (lambda refs: refs[0].update(ann_id=[11, -1]), "ann_id"),
    (lambda refs: refs[0].pop("sentences"), "missing keys"),
])
def test_malformed_refs_are_named(grefcoco, tmp_path, change, message):
    root, _, refs = grefcoco
    refs = json.loads(json.dumps(refs))
    change(refs)
    (tmp_path / "grefcoco").mkdir()
    (tmp_path / "grefcoco" / "instances.json").write_text((root / "grefcoco" / "instances.json").read_text())
    (tmp_path / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(ValueError, match=message) as err:
        load_grefer(tmp_path, "grefcoco", "unc", "val", image_root=root / "images")
    assert "grefs(unc).json" in str(err.value)


def test_unknown_arguments_and_missing_files(grefcoco, tmp_path):
    root, _, _ = grefcoco
    with pytest.raises(ValueError, match="split"):
        load_grefer(root, "grefcoco", "unc", "unseen")
    with pytest.raises(ValueError, match="dataset/split_by"):
        load_grefer(root, "grefcoco", "umd", "val")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_grefer(tmp_path, "grefcoco", "unc", "val", image_root=root / "images")
