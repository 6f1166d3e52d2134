"""RefShapes annotations in RefCOCO's own (COCO non-crowd) form: the original REFER `getMask`,
`pycocotools.coco.COCO.annToMask` and `load_refer` give one mask, and it is what the image shows."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from refseg.data import load_refer, load_refs_pickle
from refseg.data.refshapes import _generate_image
from refseg.data.refshapes_lang import SEEN_PAIRS
from refseg.data.refshapes_scene import GAP, background, compose, dilate, place_objects, rasterise


def read(root):
    instances = json.loads((root / "refshapes" / "instances.json").read_text())
    return instances, load_refs_pickle(root / "refshapes" / "refs(unc).p")


class Refer:
    """The parts of the original REFER API (refer.py, `createIndex` and `getMask`) that CRIS's and
    LAVT's data tools call, written out again here so that nothing outside this repo is imported."""

    def __init__(self, instances, refs):
        self.Anns = {ann["id"]: ann for ann in instances["annotations"]}
        self.Imgs = {img["id"]: img for img in instances["images"]}
        self.refToAnn = {ref["ref_id"]: self.Anns[ref["ann_id"]] for ref in refs}

    def getMask(self, ref):  # noqa: N802 (REFER's name)
        ann = self.refToAnn[ref["ref_id"]]
        image = self.Imgs[ref["image_id"]]
        if type(ann["segmentation"][0]) == list:  # polygon  # noqa: E721
            rle = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
        else:
            rle = ann["segmentation"]
        m = mask_utils.decode(rle)
        m = np.sum(m, axis=2)  # sometimes there are multiple binary map (corresponding to multiple segs)
        m = m.astype(np.uint8)  # convert to np.uint8
        area = sum(mask_utils.area(rle))  # should be close to ann['area']
        return {"mask": m, "area": area}


def polygon_mask(ann, height, width):
    """REFER-style decoding of one annotation: `frPyObjects` + `decode`, parts summed, then binarised."""
    return mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], height, width)).sum(axis=2) > 0


def test_refer_getmask_annToMask_and_load_refer_agree_on_every_ref(refshapes_root):
    instances, refs = read(refshapes_root)
    refer = Refer(instances, refs)
    coco = COCO(str(refshapes_root / "refshapes" / "instances.json"))
    for ann in instances["annotations"]:
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
        assert all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
    rows = {row["ref_id"]: row for row in load_refer(refshapes_root, "refshapes", "unc", None)}
    assert rows.keys() == {ref["ref_id"] for ref in refs}
    for ref in refs:
        got = refer.getMask(ref)
        ann = refer.refToAnn[ref["ref_id"]]
        assert got["mask"].max() == 1  # the parts of one object never overlap
        assert got["area"] == ann["area"]
        expected = got["mask"] > 0
        np.testing.assert_array_equal(np.asarray(rows[ref["ref_id"]]["mask"]) > 0, expected)
        np.testing.assert_array_equal(coco.annToMask(coco.anns[ann["id"]]) > 0, expected)
        assert coco.annToMask(coco.anns[ann["id"]]).dtype == np.uint8


def test_every_mask_is_the_pixels_the_image_shows(refshapes_root):
    """Per object: the image shows exactly its polygon's pixels, in one flat colour not found in a
    1-pixel ring around it; and the mask equals the generator's own per-object visible mask."""
    instances, _ = read(refshapes_root)
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for info in instances["images"]:
        image = np.asarray(Image.open(refshapes_root / "images" / info["file_name"]).convert("RGB"))
        h, w = info["height"], info["width"]
        drawn = _generate_image(0, info["id"], info["split"], 112, 176)["drawn"]  # the fixture's seed and sizes
        anns = by_image[info["id"]]
        assert 2 <= len(anns) == len(drawn) <= 6
        masks = []
        for ann, obj in zip(anns, drawn, strict=True):
            mask = polygon_mask(ann, h, w)
            np.testing.assert_array_equal(mask, obj.visible)
            rgb = np.array(ann["attributes"]["rgb"])
            assert (image[mask] == rgb).all()  # every mask pixel shows the object...
            np.testing.assert_array_equal((image == rgb).all(axis=-1), mask)  # ...and no other pixel has its colour
            ring = dilate(mask, 1) & ~mask
            assert ring.any() and not (image[ring] == rgb).all(axis=-1).any()
            masks.append(mask)
        for i, a in enumerate(masks):  # no occlusion: masks GAP pixels apart
            for b in masks[i + 1:]:
                assert not (dilate(a, GAP) & b).any()


def test_area_and_bbox_follow_the_polygon(refshapes_root):
    instances, _ = read(refshapes_root)
    sizes = {im["id"]: (im["height"], im["width"]) for im in instances["images"]}
    for ann in instances["annotations"]:
        h, w = sizes[ann["image_id"]]
        mask = polygon_mask(ann, h, w)
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        assert ann["area"] == mask.sum() == mask_utils.area(rle) >= 40
        assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert ann["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        xs, ys = np.array(ann["segmentation"][0][0::2]), np.array(ann["segmentation"][0][1::2])
        x, y, bw, bh = ann["bbox"]
        # the box hugs the polygon: within a pixel outside it, within 2 inside (a star's thin tip covers no pixel)
        assert xs.min() - 1 <= x <= xs.min() + 2 and xs.max() - 2 <= x + bw <= xs.max() + 1
        assert ys.min() - 1 <= y <= ys.min() + 2 and ys.max() - 2 <= y + bh <= ys.max() + 1
        assert 0 <= xs.min() and xs.max() <= w and 0 <= ys.min() and ys.max() <= h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_placed_shapes_are_painted_as_their_polygons_and_never_overlap(seed):
    rng = np.random.default_rng(seed)
    counts = []
    for _ in range(20):
        width, height = (int(v) for v in rng.integers(112, 177, size=2))
        pairs = [SEEN_PAIRS[int(k)] for k in rng.integers(len(SEEN_PAIRS), size=6)]
        drawn = place_objects(rng, width, height, pairs)
        counts.append(len(drawn))
        image = compose(background(rng, width, height), drawn)
        union = np.zeros((height, width), int)
        for obj in drawn:
            mask = rasterise([obj.polygon], width, height)
            np.testing.assert_array_equal(mask, obj.full)
            np.testing.assert_array_equal(obj.visible, obj.full)
            assert (image[mask] == obj.rgb).all()
            union += dilate(mask, GAP // 2)  # GAP background pixels apart: grown masks still do not meet
        assert union.max() == 1
    assert np.mean(counts) >= 5  # six requested shapes nearly always fit


def test_scene_character_is_kept(refshapes_root):
    instances, refs = read(refshapes_root)
    per_image = np.bincount([a["image_id"] for a in instances["annotations"]])[1:]
    assert per_image.min() >= 2 and per_image.max() <= 6 and len(set(per_image)) == 5
    assert {im["split"] for im in instances["images"]} == {"train", "val", "testA", "testB", "unseen"}
