"""Generalized RefShapes (`make_refshapes(..., generalized=True)`): gRefCOCO's format, multi-target and
no-target refs checked here against the objects' own attributes in instances.json, read by `load_grefer`."""

import json
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refseg.data import load_grefer, make_refshapes
from refseg.data.refshapes_lang import ANGULAR_SHAPES, ROUND_SHAPES, UNSEEN_PAIRS

NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NOUNS = {"circle": "circle", "circles": "circle", "ellipse": "ellipse", "ellipses": "ellipse", "oval": "ellipse",
         "ovals": "ellipse", "square": "square", "squares": "square", "triangle": "triangle",
         "triangles": "triangle", "star": "star", "stars": "star", "hexagon": "hexagon", "hexagons": "hexagon"}
GENERIC = {"shape", "shapes", "object", "objects", "thing", "things"}


@pytest.fixture(scope="module")
def generalized(tmp_path_factory):
    root = tmp_path_factory.mktemp("grefshapes")
    summary = make_refshapes(root, num_images=80, seed=5, generalized=True)
    grefs = json.loads((root / "grefshapes" / "grefs(unc).json").read_text())
    instances = json.loads((root / "grefshapes" / "instances.json").read_text())
    return root, summary, grefs, instances


def _matches(sentence, objects):
    """The objects a generalized sentence names, read here from its words alone."""
    words = sentence.split()
    words = [w for w in words if w not in ("the", "all")]
    count = NUMBERS.get(words[0]) if words[0] in NUMBERS else None
    words = words[1:] if count else words
    colour = words[0] if words[0] in COLOURS else None
    noun = words[-1]
    shape = None if noun in GENERIC else NOUNS[noun]
    found = [o for o in objects if (colour is None or o["color"] == colour) and (shape is None or o["shape"] == shape)]
    return found, count, noun.endswith("s") and noun not in ("glass",)


def test_multi_and_no_target_refs_name_exactly_their_referents(generalized):
    _, summary, grefs, instances = generalized
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(
            {"id": ann["id"], "color": ann["attributes"]["color"], "shape": categories[ann["category_id"]]})
    kinds = {"single": 0, "multi": 0, "none": 0}
    for ref in grefs:
        objects = by_image[ref["image_id"]]
        if ref["no_target"]:
            assert ref["ann_id"] == [-1] and ref["category_id"] == [-1]
            for sentence in (s["sent"] for s in ref["sentences"]):
                found, count, plural = _matches(sentence, objects)
                assert not plural and found == [], sentence
            kinds["none"] += 1
        elif len(ref["ann_id"]) > 1:
            for sentence in (s["sent"] for s in ref["sentences"]):
                found, count, plural = _matches(sentence, objects)
                assert plural and sorted(o["id"] for o in found) == sorted(ref["ann_id"]), sentence
                assert count in (None, len(found))
            split_ok = {"testA": lambda o: o["shape"] in ROUND_SHAPES, "testB": lambda o: o["shape"] in ANGULAR_SHAPES,
                        "unseen": lambda o: (o["color"], o["shape"]) in UNSEEN_PAIRS}.get(ref["split"], lambda o: True)
            assert all(split_ok(o) for o in objects if o["id"] in ref["ann_id"]), ref
            kinds["multi"] += 1
        else:
            kinds["single"] += 1
    assert min(kinds.values()) > 0, kinds
    assert summary["generalized"]["train"]["multi_target"] + summary["generalized"]["val"]["multi_target"] > 0
    assert sum(v["refs"] for v in summary["generalized"].values()) == len(grefs)
    assert all(summary["generalized"][s]["refs"] > 0 for s in ("train", "val", "testA", "testB", "unseen"))
    # held-out colour-shape pairs stay out of the other splits' text
    for ref in grefs:
        if ref["split"] != "unseen":
            for sentence in (s["sent"] for s in ref["sentences"]):
                assert not any(f"{c} {s}" in sentence for c, s in UNSEEN_PAIRS), sentence


def test_single_target_refs_and_images_are_those_of_plain_refshapes_and_files_repeat_per_seed(generalized, tmp_path):
    root, _, grefs, _ = generalized
    plain = tmp_path / "plain"
    make_refshapes(plain, num_images=80, seed=5)
    assert (plain / "refshapes" / "refs(unc).p").read_bytes() == (root / "refshapes" / "refs(unc).p").read_bytes()
    assert (plain / "refshapes" / "instances.json").read_bytes() == (root / "grefshapes" / "instances.json").read_bytes()
    refs = pickle.loads((plain / "refshapes" / "refs(unc).p").read_bytes())
    singles = [(r["image_id"], r["ann_id"], [s["sent"] for s in r["sentences"]]) for r in refs]
    assert singles == [(g["image_id"], g["ann_id"][0], [s["sent"] for s in g["sentences"]])
                       for g in grefs if len(g["ann_id"]) == 1 and not g["no_target"]]
    again = tmp_path / "again"
    make_refshapes(again, num_images=80, seed=5, generalized=True)
    assert (again / "grefshapes" / "grefs(unc).json").read_bytes() == (root / "grefshapes" / "grefs(unc).json").read_bytes()


def test_load_grefer_reads_grefshapes_with_union_masks(generalized):
    root, _, grefs, instances = generalized
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    val = load_grefer(root, "grefshapes", "unc", "val")
    expected = [g for g in grefs if g["split"] == "val"]
    assert val["ref_id"] == [g["ref_id"] for g in expected]
    for row, ref in zip(val, expected):
        info = images[ref["image_id"]]
        union = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann_id in [] if ref["no_target"] else ref["ann_id"]:
            rles = mask_utils.frPyObjects(anns[ann_id]["segmentation"], info["height"], info["width"])
            union |= mask_utils.decode(mask_utils.merge(rles)).astype(bool)
        assert np.array_equal(np.asarray(row["mask"]) > 0, union)
        assert row["no_target"] == ref["no_target"]
    assert load_grefer(root, "grefshapes", "unc", "unseen").num_rows > 0


@pytest.mark.parametrize("shares", [(1.0, 0.0), (0.6, 0.5), (-0.1, 0.1)])
def test_impossible_shares_are_refused(tmp_path, shares):
    with pytest.raises(ValueError, match="share"):
        make_refshapes(tmp_path, num_images=5, generalized=True, multi_target_share=shares[0],
                       no_target_share=shares[1])
