"""RefShapes: generate -> load_refer round trip, expression uniqueness re-checked from the files,
split protocol, determinism, the language (parser/resolver) and the CLI script."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.data import decode_segmentation, explode_sentences, load_refer, load_refs_pickle, make_refshapes
from refseg.data.refshapes import (
    ANGULAR_SHAPES, COLORS, ROUND_SHAPES, SHAPES, SPLITS, UNSEEN_PAIRS, expression_corpus, load_scenes, split_counts,
)
from refseg.data.refshapes_lang import (
    EXPRESSION_KINDS, KINDS, LogicalForm, NounPhrase, Scene, SceneObject, expression_kind, parse_expression,
    resolve_expression, surface_forms,
)

REPO = Path(__file__).resolve().parents[1]


def read_files(root):
    instances = json.loads((root / "refshapes" / "instances.json").read_text())
    refs = load_refs_pickle(root / "refshapes" / "refs(unc).p")
    return instances, refs


def test_every_split_round_trips_masks_pixels_and_sentences(refshapes_root):
    instances, refs = read_files(refshapes_root)
    anns = {a["id"]: a for a in instances["annotations"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in instances["images"]}
    refs_by_id = {r["ref_id"]: r for r in refs}
    total = 0
    for split in SPLITS:
        ds = load_refer(refshapes_root, "refshapes", "unc", split)
        assert ds.num_rows > 0, split
        total += ds.num_rows
        for row in ds:
            ann, ref = anns[row["ann_id"]], refs_by_id[row["ref_id"]]
            mask = np.asarray(row["mask"]) > 0
            image = np.asarray(row["image"])
            h, w = sizes[ann["image_id"]]
            assert mask.shape == image.shape[:2] == (h, w) and 112 <= h <= 176 and 112 <= w <= 176
            # RefCOCO's own form: non-crowd, one polygon of float vertices
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list) and len(ann["segmentation"]) == 1
            assert all(isinstance(v, float) for v in ann["segmentation"][0]) and len(ann["segmentation"][0]) >= 6
            np.testing.assert_array_equal(mask, decode_segmentation(ann["segmentation"], h, w))
            # the mask is exactly the set of pixels painted in the object's own colour
            np.testing.assert_array_equal(mask, (image == np.array(ann["attributes"]["rgb"])).all(axis=-1))
            assert mask.sum() == ann["area"]
            assert row["sentences"] == [s["sent"] for s in ref["sentences"]]
            assert row["sent_ids"] == ref["sent_ids"] and row["split"] == split == ref["split"]
            assert row["bbox"] == ann["bbox"] and row["category_id"] == ann["category_id"]
    assert total == len(refs)
    assert explode_sentences(load_refer(refshapes_root, "refshapes", "unc", "val")).num_rows == sum(
        len(r["sentences"]) for r in refs if r["split"] == "val"
    )


def test_every_expression_denotes_exactly_its_referent(refshapes_root):
    _, refs = read_files(refshapes_root)
    scenes = load_scenes(refshapes_root)
    kinds = set()
    for ref in refs:
        assert 1 <= len(ref["sentences"]) <= 3
        for sent in ref["sentences"]:
            form = parse_expression(sent["sent"])
            kinds.add(form.op)
            found = resolve_expression(form, scenes[ref["image_id"]])
            assert found is not None and found.ann_id == ref["ann_id"], sent["sent"]
    assert kinds == set(KINDS)
    per_image = {}
    for ref in refs:
        per_image.setdefault(ref["image_id"], []).append(ref["ann_id"])
    assert all(1 <= len(v) <= 3 and len(set(v)) == len(v) for v in per_image.values())


def test_split_protocol(refshapes_root):
    instances, refs = read_files(refshapes_root)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    assert sorted(names.values()) == sorted(SHAPES)
    split_of = {im["id"]: im["split"] for im in instances["images"]}
    assert {s: list(split_of.values()).count(s) for s in SPLITS} == split_counts(60) == {
        "train": 42, "val": 6, "testA": 4, "testB": 4, "unseen": 4}
    for ann in instances["annotations"]:  # held-out pairs appear in unseen images only
        pair = (ann["attributes"]["color"], names[ann["category_id"]])
        if split_of[ann["image_id"]] != "unseen":
            assert pair not in UNSEEN_PAIRS, ann
    anns = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        assert ref["split"] == split_of[ref["image_id"]]
        pair = (anns[ref["ann_id"]]["attributes"]["color"], names[ref["category_id"]])
        if ref["split"] == "unseen":
            assert pair in UNSEEN_PAIRS
        elif ref["split"] == "testA":
            assert pair[1] in ROUND_SHAPES
        elif ref["split"] == "testB":
            assert pair[1] in ANGULAR_SHAPES


def _contents(root):
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_gives_identical_files(tmp_path):
    summary = make_refshapes(tmp_path / "a", num_images=8, seed=3)
    make_refshapes(tmp_path / "b", num_images=8, seed=3)
    make_refshapes(tmp_path / "c", num_images=8, seed=4)
    a, b, c = _contents(tmp_path / "a"), _contents(tmp_path / "b"), _contents(tmp_path / "c")
    assert len(a) == 8 + 2 and a.keys() == b.keys()
    for name in a:  # byte for byte, every PNG, instances.json and the refs pickle
        assert a[name] == b[name], name
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    polygons = json.loads(a["refshapes/instances.json"])["annotations"][0]["segmentation"]
    assert isinstance(polygons, list) and isinstance(polygons[0], list)
    assert summary["num_images"] == 8 and sum(s["images"] for s in summary["splits"].values()) == 8
    assert summary["num_refs"] == sum(s["refs"] for s in summary["splits"].values()) == len(
        load_refs_pickle(tmp_path / "a" / "refshapes" / "refs(unc).p"))


def test_size_arguments_and_bad_input(tmp_path):
    make_refshapes(tmp_path, num_images=6, seed=1, min_size=96, max_size=100)
    instances, _ = read_files(tmp_path)
    for im in instances["images"]:
        assert 96 <= im["width"] <= 100 and 96 <= im["height"] <= 100
        assert Image.open(tmp_path / "images" / im["file_name"]).size == (im["width"], im["height"])
    with pytest.raises(ValueError, match="num_images"):
        make_refshapes(tmp_path, num_images=3)
    with pytest.raises(ValueError, match="min_size"):
        make_refshapes(tmp_path, num_images=6, min_size=150, max_size=120)


# ----------------------------------------------------------------------------- language


def obj(ann_id, shape, color, x, y, size=20.0, area=None):
    return SceneObject(ann_id, shape, color, (x - size / 2, y - size / 2, size, size), area or size * size)


def test_parse_expression_examples():
    red_circle = NounPhrase("red", "circle")
    assert parse_expression("The red circle.") == LogicalForm(red_circle)
    assert parse_expression("blue oval") == LogicalForm(NounPhrase("blue", "ellipse"))
    assert parse_expression("the square on the left") == LogicalForm(NounPhrase(None, "square"), "position", "left")
    assert parse_expression("the leftmost circle") == LogicalForm(NounPhrase(None, "circle"), "position", "left")
    assert parse_expression("the top shape") == LogicalForm(NounPhrase(None, None), "position", "top")
    assert parse_expression("the star above the blue triangle") == LogicalForm(
        NounPhrase(None, "star"), "relation", "above", anchor=NounPhrase("blue", "triangle"))
    assert parse_expression("the second circle from the left") == LogicalForm(
        NounPhrase(None, "circle"), "ordinal", "left", 1)
    assert parse_expression("the big red square") == LogicalForm(NounPhrase("red", "square"), "size", "max")
    assert parse_expression("the smaller star") == LogicalForm(NounPhrase(None, "star"), "size", "min")
    with pytest.raises(ValueError, match="not a RefShapes expression"):
        parse_expression("the dog")


def test_expression_kind(refshapes_root):
    assert expression_kind("the green shape") == "colour"
    assert expression_kind("The star.") == "shape"
    assert expression_kind("blue oval") == "colour+shape"
    assert expression_kind("the big red square") == "size"
    assert expression_kind("the leftmost circle") == "position"
    assert expression_kind("the second circle from the left") == "ordinal"
    assert expression_kind("the star above the blue triangle") == "relation"
    with pytest.raises(ValueError, match="not a RefShapes expression"):
        expression_kind("the giraffe looking up")
    with pytest.raises(ValueError, match="neither a colour nor a shape"):
        expression_kind("the shape")
    # Every generated sentence gets a kind, and the attribute kind splits into exactly three.
    sentences = [s for split in ("train", "val") for s in explode_sentences(
        load_refer(refshapes_root, "refshapes", "unc", split))["sentence"]]
    kinds = {s: expression_kind(s) for s in sentences}
    assert set(kinds.values()) <= set(EXPRESSION_KINDS)
    for sentence, kind in kinds.items():
        op = parse_expression(sentence).op
        assert (kind in ("colour", "shape", "colour+shape")) == (op == "attribute") and (op == "attribute" or kind == op)


def test_resolver_rules():
    scene = Scene(200, 100, (
        obj(1, "circle", "red", 20, 50), obj(2, "circle", "red", 100, 50, size=30),
        obj(3, "circle", "blue", 180, 50), obj(4, "star", "blue", 100, 15),
    ))
    resolve = lambda s: getattr(resolve_expression(parse_expression(s), scene), "ann_id", None)  # noqa: E731
    assert resolve("the red circle") is None  # two red circles
    assert resolve("the blue circle") == 3
    assert resolve("the left red circle") == 1 and resolve("the rightmost circle") == 3
    assert resolve("the second circle from the left") == 2 and resolve("the third circle from the left") == 3
    assert resolve("the bigger red circle") == 2  # 900 vs 400 area
    assert resolve("the red circle below the star") == 2
    assert resolve("the circle below the star") == 2
    assert resolve("the circle above the star") is None
    assert resolve("the blue thing below the star") is None  # blue circle is far more right than below
    close = Scene(200, 100, (obj(1, "square", "red", 50, 50), obj(2, "square", "red", 60, 50)))
    assert resolve_expression(parse_expression("the square on the left"), close) is None  # 10 px < 16 px margin
    similar = Scene(200, 100, (obj(1, "square", "red", 50, 50, area=400), obj(2, "square", "red", 150, 50, area=500)))
    assert resolve_expression(parse_expression("the bigger square"), similar) is None  # ratio 1.25 < 1.5


def test_expression_corpus_covers_vocabulary():
    corpus = expression_corpus(seed=0)
    assert corpus == expression_corpus(seed=0) and corpus != expression_corpus(seed=1)
    assert len(corpus) == len(set(corpus)) > 1000
    words = {w for s in corpus for w in s.split()}
    assert set(COLORS) | set(SHAPES) | {"oval", "shape", "object", "thing", "second", "third", "leftmost",
                                        "beneath", "biggest", "smallest", "far"} <= words
    assert {parse_expression(s).op for s in corpus} == set(KINDS)
    form = LogicalForm(NounPhrase("red", None), "relation", "left", anchor=NounPhrase(None, "star"))
    assert all(parse_expression(s) == form for s in surface_forms(form))


def test_make_refshapes_script(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_refshapes.py"), "--root", str(tmp_path),
         "--num_images", "6", "--seed", "2"],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(out.stdout)
    assert summary["num_images"] == 6 and (tmp_path / "refshapes" / "refs(unc).p").is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 6
