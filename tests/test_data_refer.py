"""The refer-format reader on a small hand-made COCO file, its error messages, and the
restricted unpickler (a malicious refs pickle is refused and never executed)."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data import decode_segmentation, explode_sentences, load_refer, load_refs_pickle, restricted_loads

H, W = 12, 14


def rectangle(x0, y0, x1, y1, height=H, width=W):
    """Expected mask: columns x0..x1-1 and rows y0..y1-1 set."""
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(x0, y0, x1, y1, height=H, width=W):
    """Column-major run lengths of `rectangle(...)`, written out by hand (zeros first)."""
    inside = y1 - y0
    counts = [x0 * height + y0]
    for _ in range(x0, x1 - 1):
        counts += [inside, height - inside]
    counts += [inside, height - y1 + (width - x1) * height]
    return {"size": [height, width], "counts": counts}


def make_refer_root(tmp_path, refs=None, segmentations=None, images=None):
    """refcoco/unc layout: ann 1 polygon, ann 2 uncompressed RLE, ann 3 compressed RLE.

    `segmentations` ({ann_id: segmentation}) replaces annotations' segmentations."""
    root = tmp_path / "data"
    (root / "refcoco").mkdir(parents=True)
    (root / "images").mkdir()
    compressed = mask_utils.encode(np.asfortranarray(rectangle(5, 6, 12, 11).astype(np.uint8)))
    default_anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [2.0, 3.0, 8.0, 5.0], "iscrowd": 0,
         "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 10, "category_id": 2, "bbox": [0.0, 0.0, 3.0, 4.0], "iscrowd": 1,
         "segmentation": uncompressed_rle(0, 0, 3, 4)},
        {"id": 3, "image_id": 11, "category_id": 1, "bbox": [5.0, 6.0, 7.0, 5.0], "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
    ]
    for ann in default_anns:
        ann["segmentation"] = (segmentations or {}).get(ann["id"], ann["segmentation"])
    default_images = [{"id": 10, "file_name": "a.png", "height": H, "width": W},
                      {"id": 11, "file_name": "b.png", "height": H, "width": W}]
    for info in images or default_images:
        Image.new("RGB", (info["width"], info["height"]), (info["id"], 0, 0)).save(root / "images" / info["file_name"])
    default_refs = [
        {"ref_id": 0, "ann_id": 1, "image_id": 10, "split": "train", "category_id": 1, "sent_ids": [0, 1],
         "sentences": [{"sent_id": 0, "sent": "left box", "raw": "Left box", "tokens": ["left", "box"]},
                       {"sent_id": 1, "sent": "the wide one", "raw": "the wide one",
                        "tokens": ["the", "wide", "one"]}]},
        {"ref_id": 1, "ann_id": 2, "image_id": 10, "split": "train", "category_id": 2, "sent_ids": [2],
         "sentences": [{"sent_id": 2, "sent": "corner", "raw": "corner", "tokens": ["corner"]}]},
        {"ref_id": 2, "ann_id": 3, "image_id": 11, "split": "testA", "category_id": 1, "sent_ids": [3, 4, 5],
         "sentences": [{"sent_id": k, "sent": f"thing {k}", "raw": f"thing {k}", "tokens": ["thing", str(k)]}
                       for k in (3, 4, 5)]},
    ]
    instances = {"images": images or default_images, "annotations": default_anns,
                 "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs if refs is not None else default_refs, protocol=2))
    return root


def as_array(pil_mask):
    return np.asarray(pil_mask)


def test_polygon_and_rle_masks_decode_exactly(tmp_path):
    root = make_refer_root(tmp_path)
    ds = load_refer(root, "refcoco", "unc", "train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 2
    assert set(ds.column_names) == {"image", "mask", "sentences", "sent_ids", "ref_id", "ann_id", "image_id",
                                    "category_id", "bbox", "split"}
    first, second = ds[0], ds[1]
    assert first["mask"].mode == "L" and first["mask"].size == (W, H)
    np.testing.assert_array_equal(as_array(first["mask"]), rectangle(2, 3, 10, 8).astype(np.uint8) * 255)
    np.testing.assert_array_equal(as_array(second["mask"]), rectangle(0, 0, 3, 4).astype(np.uint8) * 255)
    assert first["sentences"] == ["left box", "the wide one"] and first["sent_ids"] == [0, 1]
    assert (first["ref_id"], first["ann_id"], first["image_id"], first["category_id"]) == (0, 1, 10, 1)
    assert first["bbox"] == [2.0, 3.0, 8.0, 5.0] and first["split"] == "train"
    assert first["image"].size == (W, H) and first["image"].getpixel((0, 0)) == (10, 0, 0)

    test = load_refer(root, "refcoco", "unc", "testA", cache_dir=str(tmp_path / "cache"))
    assert test.num_rows == 1
    np.testing.assert_array_equal(as_array(test[0]["mask"]) > 0, rectangle(5, 6, 12, 11))
    assert test[0]["image"].getpixel((0, 0)) == (11, 0, 0)
    assert load_refer(root, "refcoco", "unc", None, cache_dir=str(tmp_path / "cache")).num_rows == 3


def test_decode_segmentation_forms():
    rle = mask_utils.encode(np.asfortranarray(rectangle(1, 2, 4, 9).astype(np.uint8)))
    assert isinstance(rle["counts"], bytes)
    np.testing.assert_array_equal(decode_segmentation(rle, H, W), rectangle(1, 2, 4, 9))
    np.testing.assert_array_equal(decode_segmentation(uncompressed_rle(6, 1, 13, 12), H, W), rectangle(6, 1, 13, 12))
    # two polygons are merged; a 4-number polygon is not read as a box
    two = decode_segmentation([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 7, 5, 7, 7, 5, 7]], H, W)
    np.testing.assert_array_equal(two, rectangle(0, 0, 2, 2) | rectangle(5, 5, 7, 7))
    assert decode_segmentation([[3, 3, 9, 3]], H, W).sum() < 10
    with pytest.raises(ValueError, match="differs from the image size"):
        decode_segmentation(uncompressed_rle(0, 0, 2, 2, height=5, width=5), H, W, where="ann 7")
    with pytest.raises(ValueError, match="ann 7: polygon"):
        decode_segmentation([[1, 2, 3]], H, W, where="ann 7")


def compressed_rle(x0, y0, x1, y1):
    rle = mask_utils.encode(np.asfortranarray(rectangle(x0, y0, x1, y1).astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# Every layout COCO files use for `segmentation`, with the mask it stands for.
COCO_LAYOUTS = {
    "polygons": ([[1, 1, 4, 1, 4, 3, 1, 3], [6, 7, 9, 7, 9, 11, 6, 11]],
                 rectangle(1, 1, 4, 3) | rectangle(6, 7, 9, 11)),
    "one_polygon": ([[2.0, 3.0, 10.0, 3.0, 10.0, 8.0, 2.0, 8.0]], rectangle(2, 3, 10, 8)),
    "compressed_rle": (compressed_rle(5, 6, 12, 11), rectangle(5, 6, 12, 11)),
    "uncompressed_rle": (uncompressed_rle(0, 0, 3, 4), rectangle(0, 0, 3, 4)),
    "list_of_compressed_rles": ([compressed_rle(0, 0, 2, 2), compressed_rle(10, 8, 14, 12)],
                                rectangle(0, 0, 2, 2) | rectangle(10, 8, 14, 12)),
    "list_of_uncompressed_rles": ([uncompressed_rle(1, 1, 5, 5), uncompressed_rle(3, 3, 8, 6)],
                                  rectangle(1, 1, 5, 5) | rectangle(3, 3, 8, 6)),
}


def write_layouts_root(tmp_path):
    """refcoco/unc root with one image and one annotation (and ref) per entry of COCO_LAYOUTS."""
    root = tmp_path / "layouts"
    (root / "refcoco").mkdir(parents=True)
    (root / "images").mkdir()
    Image.new("RGB", (W, H), (7, 8, 9)).save(root / "images" / "x.png")
    anns, refs = [], []
    for k, (name, (segmentation, expected)) in enumerate(COCO_LAYOUTS.items(), start=1):
        crowd = isinstance(segmentation, dict) and isinstance(segmentation["counts"], list)
        anns.append({"id": k, "image_id": 1, "category_id": 1, "iscrowd": int(crowd), "segmentation": segmentation,
                     "area": float(expected.sum()), "bbox": [0.0, 0.0, 1.0, 1.0]})
        refs.append({"ref_id": k, "ann_id": k, "image_id": 1, "split": "train", "category_id": 1, "sent_ids": [k],
                     "sentences": [{"sent_id": k, "sent": name, "raw": name, "tokens": [name]}]})
    instances = {"images": [{"id": 1, "file_name": "x.png", "height": H, "width": W}], "annotations": anns,
                 "categories": [{"id": 1, "name": "a"}]}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def test_load_refer_reads_every_coco_segmentation_layout(tmp_path):
    from pycocotools.coco import COCO

    root = write_layouts_root(tmp_path)
    rows = load_refer(root, "refcoco", "unc", "train", cache_dir=str(tmp_path / "cache"))
    assert rows["sentences"] == [[name] for name in COCO_LAYOUTS]
    coco = COCO(str(root / "refcoco" / "instances.json"))
    for row, (name, (segmentation, expected)) in zip(rows, COCO_LAYOUTS.items(), strict=True):
        np.testing.assert_array_equal(as_array(row["mask"]) > 0, expected, err_msg=name)
        np.testing.assert_array_equal(decode_segmentation(segmentation, H, W), expected, err_msg=name)
        if name != "list_of_compressed_rles":  # pycocotools' annToMask reads lists of uncompressed RLEs only
            np.testing.assert_array_equal(coco.annToMask(coco.anns[row["ann_id"]]) > 0, expected, err_msg=name)


def test_decode_segmentation_rejects_malformed_layouts():
    with pytest.raises(ValueError, match="ann 3: segmentation list mixes"):
        decode_segmentation([[0, 0, 2, 0, 2, 2], compressed_rle(0, 0, 2, 2)], H, W, where="ann 3")
    with pytest.raises(ValueError, match="ann 3: uncompressed RLE counts sum to 5"):
        decode_segmentation({"size": [H, W], "counts": [2, 3]}, H, W, where="ann 3")
    with pytest.raises(ValueError, match="differs from the image size"):
        decode_segmentation([compressed_rle(0, 0, 2, 2), {"size": [3, 3], "counts": [9]}], H, W)
    with pytest.raises(ValueError, match="empty list"):
        decode_segmentation([], H, W)
    with pytest.raises(ValueError, match="coordinates must be numbers"):
        decode_segmentation([[0, 0, "a", 0, 2, 2]], H, W)


def test_explode_sentences_one_row_per_sentence(tmp_path):
    ds = load_refer(make_refer_root(tmp_path), "refcoco", "unc", None, cache_dir=str(tmp_path / "cache"))
    rows = explode_sentences(ds)
    assert rows.num_rows == 6
    assert "sentences" not in rows.column_names and "sent_ids" not in rows.column_names
    assert rows["sentence"] == ["left box", "the wide one", "corner", "thing 3", "thing 4", "thing 5"]
    assert rows["sent_id"] == [0, 1, 2, 3, 4, 5]
    assert rows["ref_id"] == [0, 0, 1, 2, 2, 2]
    np.testing.assert_array_equal(as_array(rows[1]["mask"]) > 0, rectangle(2, 3, 10, 8))
    assert rows[5]["image"].getpixel((0, 0)) == (11, 0, 0)


def _refs_without_sentences():
    return [{"ref_id": 7, "ann_id": 1, "image_id": 10, "split": "train", "category_id": 1}]


def _refs_with_absent_ann():
    return [{"ref_id": 8, "ann_id": 999, "image_id": 10, "split": "train", "category_id": 1,
             "sentences": [{"sent_id": 0, "sent": "x"}]}]




@pytest.mark.parametrize(
    "case, error, fragments",
    [
        ("missing_refs", FileNotFoundError, ["refs(unc).p"]),
        ("missing_instances", FileNotFoundError, ["instances.json"]),
        ("missing_sentences", ValueError, ["refs(unc).p", "ref #0 (ref_id=7)", "'sentences'"]),
        ("absent_ann", ValueError, ["ref_id=8", "ann_id=999", "instances.json"]),
        ("missing_image", FileNotFoundError, ["ref_id=0", "a.png"]),
        ("broken_image", ValueError, ["ref_id=0", "cannot open image", "a.png"]),
        ("wrong_image_size", ValueError, ["a.png", "annotations say 12x14"]),
        ("empty_mask", ValueError, ["ref_id=0", "ann_id=1", "mask is empty"]),
    ],
)
def test_errors_name_the_file_and_record(tmp_path, case, error, fragments):
    refs = {"missing_sentences": _refs_without_sentences(), "absent_ann": _refs_with_absent_ann()}.get(case)
    root = make_refer_root(tmp_path, refs=refs,
                           segmentations={1: {"size": [H, W], "counts": [H * W]}} if case == "empty_mask" else None)
    if case == "missing_refs":
        os.remove(root / "refcoco" / "refs(unc).p")
    elif case == "missing_instances":
        os.remove(root / "refcoco" / "instances.json")
    elif case == "missing_image":
        os.remove(root / "images" / "a.png")
    elif case == "broken_image":
        (root / "images" / "a.png").write_bytes(b"not an image at all")
    elif case == "wrong_image_size":
        Image.new("RGB", (5, 5)).save(root / "images" / "a.png")
    with pytest.raises(error) as info:
        load_refer(root, "refcoco", "unc", "train", cache_dir=str(tmp_path / "cache"))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unverified_images_are_not_opened_at_load(tmp_path):
    root = make_refer_root(tmp_path)
    (root / "images" / "a.png").write_bytes(b"garbage")
    ds = load_refer(root, "refcoco", "unc", "train", verify_images=False, cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 2


def test_unknown_dataset_split_by_and_split(tmp_path):
    root = make_refer_root(tmp_path)
    with pytest.raises(ValueError, match=r"refcoco/unc.*refcocog/umd"):
        load_refer(root, "refclef", "unc", "train")
    with pytest.raises(ValueError, match="refcocog/google"):
        load_refer(root, "refcocog", "berkeley", "train")
    with pytest.raises(ValueError, match=r"'testC'.*\['train', 'val', 'testA', 'testB'\]"):
        load_refer(root, "refcoco", "unc", "testC")
    with pytest.raises(ValueError, match=r"no refs with split 'val'"):
        load_refer(root, "refcoco", "unc", "val", cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- restricted unpickler


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _RunsCommand(marker)}], protocol=protocol))
    with pytest.raises(pickle.UnpicklingError) as info:
        load_refs_pickle(path)
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()

    path.write_bytes(pickle.dumps({"obj": _Plain()}, protocol=protocol))
    # protocols 0-1 name copyreg._reconstructor first, 2+ the class itself
    with pytest.raises(pickle.UnpicklingError, match=r"refused global '(copy_?reg\._reconstructor|.*_Plain)'"):
        load_refs_pickle(path)


def test_malicious_refs_file_refused_by_load_refer(tmp_path):
    root = make_refer_root(tmp_path)
    marker = tmp_path / "pwned"
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_RunsCommand(marker)], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refs\\(unc\\).p"):
        load_refer(root, "refcoco", "unc", "train")
    assert not marker.exists()
    eval_payload = b"cbuiltins\neval\n(Vprint('hi')\ntR."
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_loads(eval_payload)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_containers_load(tmp_path, protocol):
    data = [{"a": (1, 2.5, None, True), "b": {3, 4}, "c": frozenset({"x"}), "d": b"\x00\xffbytes", "e": "é"}, [], -7]
    path = tmp_path / "plain.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_refs_pickle(path) == data


def test_python2_pickle_strings_decode():
    # py2 protocol 2: [{'sent': 'caf\xe9'}] with a latin-1 byte string (SHORT_BINSTRING), as refer wrote them
    py2 = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x04caf\xe9q\x03sa."
    assert restricted_loads(py2) == [{"sent": "café"}]
    # and UTF-8 byte strings are read as UTF-8
    py2_utf8 = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."
    assert restricted_loads(py2_utf8) == ["café"]
    with pytest.raises(pickle.UnpicklingError, match="<bytes>: not a valid pickle"):
        restricted_loads(b"\x80\x02]q\x00")
