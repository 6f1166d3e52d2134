"""RefShapes: a procedural referring-segmentation dataset written in the refer format.

`make_refshapes(root, num_images, seed)` writes::

    <root>/refshapes/refs(unc).p        refs (plain pickle, protocol 2), read by `load_refer`
    <root>/refshapes/instances.json     COCO: images, annotations, categories (one per shape,
                                        supercategory "shape")
    <root>/images/refshapes_<id>.png    lossless RGB images

Annotations are written as RefCOCO's own (COCO's non-crowd form): `iscrowd` 0, `segmentation` a
list holding one polygon `[[x1, y1, x2, y2, ...]]` (vertices rounded to 2 decimals), `area` the
pixel count of that polygon's pycocotools rasterisation (`pycocotools.mask.area`), `bbox` its
COCO xywh box (`pycocotools.mask.toBbox`), plus `attributes` {color, rgb}. So the original REFER
API (`getMask`), `pycocotools.coco.COCO.annToMask` and `refseg.data.load_refer` all decode the
same mask.

Visible masks: the image shows exactly that mask. Each shape is painted as the pixels of the
pycocotools rasterisation of the very polygon written to the file, and shapes never overlap (a
placement is rejected unless it stays 2 px clear of every earlier shape), so no object is
occluded and every polygon is the object's visible region. (Earlier versions let shapes occlude
each other and wrote the visible region as compressed RLE; a visible region with a hole or a
traced pixel outline is no RefCOCO-like polygon, so occlusion was given up instead.)

Design (see also `refshapes_lang` and `refshapes_scene`):
- Shapes: circle, ellipse, square, triangle, star, hexagon (circles and ellipses as 64-gons).
  Colours: red, green, blue, yellow, purple, orange. Images of 2-6 shapes, width and height each
  in [min_size, max_size], on noise, stripe, gradient or checker backgrounds; flat colours, no
  anti-aliasing.
- Expressions: attribute, size, position, ordinal and relation kinds; 1-3 per ref, 1-3 refs per
  image, each ref a different object. An expression is kept only when `resolve_expression`
  applied to `parse_expression(sentence)` returns exactly its referent.
- Splits (images are partitioned, like RefCOCO unc): `train`, `val`, `testA`, `testB`,
  `unseen`. Colour-shape pairs in `UNSEEN_PAIRS` appear only in `unseen` images, where every
  referent is such a pair (the seen/unseen protocol of Prompt-RIS, on colour-shape pairs instead
  of categories). Mirroring RefCOCO's people/objects split, testA referents are round shapes
  (circle, ellipse) and testB referents angular ones (square, triangle, star, hexagon); val and
  train referents are any seen pair.
- Deterministic: image i is drawn from `numpy.random.default_rng([seed, i])`; PNGs, the JSON
  (sorted keys) and the pickle are written byte-identically for a seed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .refshapes_lang import (
    ANGULAR_SHAPES, COLORS, DIRECTIONS, EXPRESSION_KINDS, KINDS, ORDINALS, RELATION_WORDS, ROUND_SHAPES, SEEN_PAIRS,
    SHAPES, SIZE_WORDS, UNSEEN_PAIRS, LogicalForm, NounPhrase, Scene, SceneObject, expression_kind, parse_expression,
    resolve_expression, surface_forms,
)
from .refshapes_general import DEFAULT_MULTI_TARGET_SHARE, DEFAULT_NO_TARGET_SHARE, check_shares, extra_refs
from .refshapes_scene import DrawnObject, background, compose, mask_bbox, place_objects

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "testA", "testB", "unseen")
DEFAULT_FRACTIONS = {"val": 0.10, "testA": 0.07, "testB": 0.07, "unseen": 0.06}  # train: the rest
CATEGORIES = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
_CATEGORY_ID = {s: k + 1 for k, s in enumerate(SHAPES)}
_ALL_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_COMPARATIVES = {"big", "large", "bigger", "larger", "small", "little", "smaller"}


def split_counts(num_images: int, fractions: Mapping[str, float] | None = None) -> dict[str, int]:
    """Images per split: each non-train split gets round(fraction * num_images), at least 1."""
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    unknown = set(fractions) - set(SPLITS[1:])
    if unknown or any(not 0 < f < 1 for f in fractions.values()):
        raise ValueError(f"fractions: expected values in (0, 1) for splits {SPLITS[1:]}, got {fractions}")
    counts = {s: max(1, round(fractions.get(s, DEFAULT_FRACTIONS[s]) * num_images)) for s in SPLITS[1:]}
    counts = {"train": num_images - sum(counts.values()), **counts}
    if counts["train"] < 1:
        raise ValueError(f"num_images: {num_images} is too small to give every split an image ({counts})")
    return counts


def _referent_ok(split: str, color: str, shape: str) -> bool:
    if split == "unseen":
        return (color, shape) in UNSEEN_PAIRS
    if split == "testA":
        return shape in ROUND_SHAPES
    if split == "testB":
        return shape in ANGULAR_SHAPES
    return True


def _split_pairs(split: str) -> list[tuple[str, str]]:
    """The colour-shape pairs a split's referents may be (no-target expressions name only these)."""
    pool = UNSEEN_PAIRS if split == "unseen" else SEEN_PAIRS
    return [p for p in pool if _referent_ok(split, *p)]


def _scene_pairs(rng: np.random.Generator, split: str) -> list[tuple[str, str]]:
    """Colour-shape pairs of one image, in drawing order (the first one satisfies the split)."""
    pool = _ALL_PAIRS if split == "unseen" else list(SEEN_PAIRS)
    first_pool = [p for p in pool if _referent_ok(split, *p)]
    n = int(rng.integers(2, 7))
    pairs = [first_pool[int(rng.integers(len(first_pool)))]]
    pairs += [pool[int(rng.integers(len(pool)))] for _ in range(n - 1)]
    return pairs


def _candidate_forms(obj: SceneObject, scene: Scene) -> dict[str, list[LogicalForm]]:
    """All logical forms that could describe `obj` (validity is checked later), by kind."""
    targets = [NounPhrase(obj.color, obj.shape), NounPhrase(None, obj.shape), NounPhrase(obj.color, None),
               NounPhrase(None, None)]
    forms: dict[str, list[LogicalForm]] = {k: [] for k in KINDS}
    for np_ in targets:
        n_match = sum(np_.matches(o) for o in scene.objects)
        if np_.color or np_.shape:
            forms["attribute"].append(LogicalForm(np_))
        if n_match >= 2:
            forms["size"] += [LogicalForm(np_, "size", a) for a in SIZE_WORDS]
            forms["position"] += [LogicalForm(np_, "position", d) for d in DIRECTIONS]
            ranks = range(min(n_match - 1, len(ORDINALS)))  # "second" needs a third match after it
            forms["ordinal"] += [LogicalForm(np_, "ordinal", d, k) for d in DIRECTIONS for k in ranks]
        for anchor in scene.objects:
            if anchor is obj:
                continue
            anchor_nps = (NounPhrase(anchor.color, anchor.shape), NounPhrase(None, anchor.shape),
                          NounPhrase(anchor.color, None))
            for a_np in anchor_nps:
                forms["relation"] += [LogicalForm(np_, "relation", r, anchor=a_np) for r in RELATION_WORDS]
    return forms


def _pick_sentence(form: LogicalForm, scene: Scene, rng: np.random.Generator) -> str:
    options = surface_forms(form)
    if form.op == "size":  # comparatives for two candidates, superlatives for more
        two = sum(form.target.matches(o) for o in scene.objects) == 2
        options = [s for s in options if (s.split()[1] in _COMPARATIVES) == two]
    return options[int(rng.integers(len(options)))]


def describe(obj: SceneObject, scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """Up to `count` distinct expressions that denote `obj` alone, preferring distinct kinds.

    Each sentence is checked as the tests check it: `resolve_expression(parse_expression(s))`
    must return `obj`.
    """
    forms = _candidate_forms(obj, scene)
    kinds = [k for k in KINDS if forms[k]]
    rng.shuffle(kinds)
    sentences: list[str] = []
    for kind in kinds:
        options = forms[kind]
        for index in rng.permutation(len(options)):
            if resolve_expression(options[index], scene) is not obj:
                continue
            sentence = _pick_sentence(options[index], scene, rng)
            if sentence not in sentences and resolve_expression(parse_expression(sentence), scene) is obj:
                sentences.append(sentence)
                break
        if len(sentences) == count:
            break
    return sentences


def _generate_image(seed: int, image_id: int, split: str, min_size: int, max_size: int) -> dict[str, Any]:
    """Draw one image and its refs; retries the layout until a referent can be described."""
    rng = np.random.default_rng([seed, image_id])
    for _ in range(100):
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        drawn = place_objects(rng, width, height, _scene_pairs(rng, split))
        if len(drawn) < 2:
            continue
        objects = tuple(
            SceneObject(k, o.shape, o.color, tuple(mask_bbox(o.visible)), float(o.visible.sum()))
            for k, o in enumerate(drawn)
        )
        scene = Scene(width, height, objects)
        eligible = [k for k, o in enumerate(drawn) if _referent_ok(split, o.color, o.shape)]
        n_refs = int(rng.integers(1, 4))
        refs = []
        for k in rng.permutation(eligible):
            sentences = describe(objects[k], scene, rng, int(rng.integers(1, 4)))
            if sentences:
                refs.append((int(k), sentences))
            if len(refs) == n_refs:
                break
        if refs:
            image = compose(background(rng, width, height), drawn)
            return {"width": width, "height": height, "image": image, "drawn": drawn, "scene": scene, "refs": refs}
    raise RuntimeError(f"RefShapes: could not draw a describable scene for image {image_id} (seed {seed})")


def _annotation(
    ann_id: int, image_id: int, obj: SceneObject, drawn: DrawnObject, height: int, width: int
) -> dict[str, Any]:
    """One COCO non-crowd annotation: the object's polygon, with `area` and `bbox` from pycocotools.

    Checks that the polygon, decoded as REFER's `getMask` decodes it, is exactly the painted
    `visible` mask (so a broken invariant fails at generation, not in some reader downstream).
    """
    segmentation = [list(drawn.polygon)]
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not np.array_equal(mask_utils.decode(rle).astype(bool), drawn.visible):
        raise RuntimeError(f"RefShapes: annotation {ann_id} (image {image_id}): polygon mask differs from the image")
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    area = float(mask_utils.area(rle))
    if bbox != list(obj.bbox) or area != obj.area:
        raise RuntimeError(f"RefShapes: annotation {ann_id} (image {image_id}): bbox/area differ from the scene")
    return {
        "id": ann_id, "image_id": image_id, "category_id": _CATEGORY_ID[obj.shape], "iscrowd": 0,
        "segmentation": segmentation, "bbox": bbox, "area": area,
        "attributes": {"color": obj.color, "rgb": list(drawn.rgb)},
    }


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def make_refshapes(
    root: str | os.PathLike,
    num_images: int = 1000,
    seed: int = 0,
    *,
    min_size: int = 112,
    max_size: int = 176,
    fractions: Mapping[str, float] | None = None,
    generalized: bool = False,
    multi_target_share: float = DEFAULT_MULTI_TARGET_SHARE,
    no_target_share: float = DEFAULT_NO_TARGET_SHARE,
) -> dict[str, Any]:
    """Generate RefShapes under `root` in the refer format (see the module docstring).

    Args:
        root: output root; writes `<root>/refshapes/` and `<root>/images/`.
        num_images: number of images (>= 5, so that every split gets one).
        seed: random seed; the same seed gives byte-identical files.
        min_size, max_size: range of image width and height in pixels (each drawn independently).
        fractions: share of images for "val", "testA", "testB", "unseen" (train gets the rest).
        generalized: also write `<root>/grefshapes/` in gRefCOCO's format, with multi-target and no-target
            refs besides the single-target ones (`refseg.data.refshapes_general`); `refshapes/` and the
            images stay byte-identical to those of `generalized=False`.
        multi_target_share, no_target_share: with `generalized`, the shares of multi-target and no-target
            refs drawn among all refs of `grefshapes/`; fewer multi-target ones land (scenes without a plural
            phrase), so the defaults 0.5 / 0.08 give about gRefCOCO's 29 % and 11.5 %.

    Returns:
        Summary dict: `root`, `num_images`, `num_refs`, `num_sentences`, `splits`
        ({split: {"images", "refs", "sentences"}}) and `kinds` (sentences per expression kind); with
        `generalized`, also `generalized` ({split: {"refs", "multi_target", "no_target"}}).
    """
    if not isinstance(num_images, int) or num_images < 5:
        raise ValueError(f"num_images: expected an int >= 5, got {num_images!r}")
    if not (isinstance(min_size, int) and isinstance(max_size, int) and 64 <= min_size <= max_size):
        raise ValueError(
            f"min_size/max_size: expected ints with 64 <= min_size <= max_size, got {min_size}, {max_size}"
        )
    if generalized:
        check_shares(multi_target_share, no_target_share)
    counts = split_counts(num_images, fractions)
    labels = np.array([s for s in SPLITS for _ in range(counts[s])])
    labels = labels[np.random.default_rng([seed, 0]).permutation(num_images)]

    root = Path(root)
    (root / "refshapes").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    ann_id, sent_id = 1, 0
    stats = {s: Counter() for s in SPLITS}
    kinds: Counter = Counter()
    grefs: list[dict[str, Any]] = []
    general_stats = {s: Counter() for s in SPLITS}
    for image_id in range(1, num_images + 1):
        split = str(labels[image_id - 1])
        item = _generate_image(seed, image_id, split, min_size, max_size)
        file_name = f"refshapes_{image_id:06d}.png"
        (root / "images" / file_name).write_bytes(_png_bytes(item["image"]))
        images.append({"id": image_id, "file_name": file_name, "height": item["height"], "width": item["width"],
                       "split": split})
        first_ann = ann_id
        for obj, drawn in zip(item["scene"].objects, item["drawn"], strict=True):
            annotations.append(_annotation(ann_id, image_id, obj, drawn, item["height"], item["width"]))
            ann_id += 1
        for k, sentences in item["refs"]:
            sents = [{"sent_id": sent_id + j, "sent": s, "raw": s, "tokens": s.split()}
                     for j, s in enumerate(sentences)]
            kinds.update(parse_expression(s).op for s in sentences)
            refs.append({
                "ref_id": len(refs), "ann_id": first_ann + k, "image_id": image_id, "split": split,
                "category_id": _CATEGORY_ID[item["scene"].objects[k].shape],
                "sent_ids": [s["sent_id"] for s in sents], "sentences": sents,
                "file_name": f"refshapes_{image_id:06d}_{first_ann + k}.png",
            })
            sent_id += len(sents)
            stats[split].update(refs=1, sentences=len(sents))
        stats[split].update(images=1)
        if generalized:
            objects = item["scene"].objects
            extras = extra_refs(seed, image_id, objects, len(item["refs"]),
                                lambda o, split=split: _referent_ok(split, o.color, o.shape), _split_pairs(split),
                                multi_target_share, no_target_share)
            for indices, sentences in [([k], s) for k, s in item["refs"]] + extras:
                first_sent = sum(len(r["sentences"]) for r in grefs)
                grefs.append({
                    "ref_id": len(grefs), "image_id": image_id, "split": split,
                    "ann_id": [first_ann + k for k in indices] or [-1],
                    "category_id": [_CATEGORY_ID[objects[k].shape] for k in indices] or [-1],
                    "no_target": not indices,
                    "sent_ids": list(range(first_sent, first_sent + len(sentences))),
                    "sentences": [{"sent_id": first_sent + j, "sent": t, "raw": t, "tokens": t.split()}
                                  for j, t in enumerate(sentences)],
                    "file_name": f"refshapes_{image_id:06d}.png",
                })
                general_stats[split].update(refs=1, multi_target=len(indices) > 1, no_target=not indices)

    instances = {
        "info": {"description": "RefShapes (refseg)", "seed": seed, "unseen_pairs": [list(p) for p in UNSEEN_PAIRS],
                 "round_shapes": list(ROUND_SHAPES), "angular_shapes": list(ANGULAR_SHAPES)},
        "images": images, "annotations": annotations, "categories": CATEGORIES,
    }
    (root / "refshapes" / "instances.json").write_text(json.dumps(instances, sort_keys=True, separators=(",", ":")))
    (root / "refshapes" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    summary = {
        "root": str(root), "num_images": num_images, "num_refs": len(refs), "num_sentences": sent_id,
        "splits": {s: {key: int(stats[s][key]) for key in ("images", "refs", "sentences")} for s in SPLITS},
        "kinds": {k: int(kinds[k]) for k in KINDS},
    }
    if generalized:
        (root / "grefshapes").mkdir(parents=True, exist_ok=True)
        (root / "grefshapes" / "instances.json").write_text((root / "refshapes" / "instances.json").read_text())
        (root / "grefshapes" / "grefs(unc).json").write_text(json.dumps(grefs, sort_keys=True, separators=(",", ":")))
        summary["generalized"] = {s: {key: int(general_stats[s][key]) for key in ("refs", "multi_target", "no_target")}
                                  for s in SPLITS}
    logger.info("RefShapes written to %s: %s", root, summary)
    return summary


def load_scenes(root: str | os.PathLike) -> dict[int, Scene]:
    """Rebuild every image's `Scene` from `<root>/refshapes/instances.json` (for re-checking).

    Objects carry the annotation id as `ann_id`, the category name as `shape`, the
    `attributes.color` field as `color`, and the annotation `bbox` and `area`.
    """
    path = Path(root) / "refshapes" / "instances.json"
    if not path.is_file():
        raise FileNotFoundError(f"RefShapes instances not found: {path}")
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, list[SceneObject]] = {}
    for ann in data["annotations"]:
        objects.setdefault(ann["image_id"], []).append(
            SceneObject(ann["id"], names[ann["category_id"]], ann["attributes"]["color"], tuple(ann["bbox"]),
                        ann["area"])
        )
    return {im["id"]: Scene(im["width"], im["height"], tuple(objects.get(im["id"], ()))) for im in data["images"]}


def expression_corpus(seed: int = 0) -> list[str]:
    """Sentences covering the whole RefShapes vocabulary and every template (shuffled by `seed`).

    Every colour, shape noun (and synonym), size word, position word, ordinal and relation
    phrase occurs; relation anchors are sampled so the list stays a few thousand lines.
    """
    rng = np.random.default_rng(seed)
    targets = [NounPhrase(c, s) for c in (None, *COLORS) for s in (None, *SHAPES)]
    anchors = [t for t in targets if t.color or t.shape]
    sentences: set[str] = set()
    for target in targets:
        forms = [LogicalForm(target, "size", a) for a in SIZE_WORDS]
        forms += [LogicalForm(target, "position", d) for d in DIRECTIONS]
        forms += [LogicalForm(target, "ordinal", d, k) for d in DIRECTIONS for k in range(3)]
        if target.color or target.shape:
            forms.append(LogicalForm(target))
        for relation in RELATION_WORDS:
            for index in rng.choice(len(anchors), size=2, replace=False):
                forms.append(LogicalForm(target, "relation", relation, anchor=anchors[int(index)]))
        for form in forms:
            sentences.update(surface_forms(form))
    ordered = sorted(sentences)
    return [ordered[int(i)] for i in rng.permutation(len(ordered))]


__all__ = [
    "CATEGORIES", "SPLITS", "UNSEEN_PAIRS", "SEEN_PAIRS", "ROUND_SHAPES", "ANGULAR_SHAPES", "COLORS", "SHAPES",
    "LogicalForm", "NounPhrase", "Scene", "SceneObject",
    "EXPRESSION_KINDS", "describe", "expression_corpus", "expression_kind", "load_scenes", "make_refshapes",
    "parse_expression", "resolve_expression", "split_counts", "surface_forms",
]
