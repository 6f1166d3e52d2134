"""RefShapes language: vocabulary, logical forms, rendering, parsing and the resolver.

Every RefShapes expression has a logical form (`LogicalForm`) that `parse_expression` recovers
from the sentence text alone, and `resolve_expression(form, scene)` evaluates it against a scene
description (shape, colour, box and visible area of each object). The generator keeps an
expression only when the resolver, run on the *parsed sentence*, returns exactly its referent;
the tests re-run the same check from the written files.

Kinds of expression (`LogicalForm.op`):
- "attribute": "the red circle", "blue star", "the green shape" — exactly one object matches.
- "size": "the big red square", "the smaller star" — largest/smallest visible area among the
  matches, at least `SIZE_RATIO` times the runner-up.
- "position": "the square on the left", "the leftmost circle", "the top shape" — extreme box
  centre among the matches, at least `margin` pixels ahead of the runner-up.
- "ordinal": "the second circle from the left" — k-th box centre in that direction, at least
  `margin` pixels from both neighbours.
- "relation": "the star above the blue triangle" — the anchor phrase matches exactly one object;
  the referent lies in that direction (offset >= `margin` along the axis and larger than the
  offset across it) and no other match lies even roughly that way (offset > `margin / 2` along
  the axis and more than half the offset across it).
`margin` is `POSITION_MARGIN` times the longer image side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "green": (34, 168, 60),
    "blue": (36, 84, 222),
    "yellow": (238, 214, 36),
    "purple": (150, 52, 200),
    "orange": (250, 136, 16),
}
SHAPES: tuple[str, ...] = ("circle", "ellipse", "square", "triangle", "star", "hexagon")
ROUND_SHAPES: tuple[str, ...] = ("circle", "ellipse")  # testA referents ("people" in RefCOCO)
ANGULAR_SHAPES: tuple[str, ...] = ("square", "triangle", "star", "hexagon")  # testB referents
# Colour-shape pairs held out of train/val/testA/testB entirely (one per colour and per shape).
UNSEEN_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("green", "circle"), ("blue", "hexagon"),
    ("yellow", "triangle"), ("purple", "ellipse"), ("orange", "square"),
)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLORS for s in SHAPES if (c, s) not in UNSEEN_PAIRS
)

NOUNS: dict[str, tuple[str, ...]] = {s: (s,) for s in SHAPES} | {"ellipse": ("ellipse", "oval")}
GENERIC_NOUNS: tuple[str, ...] = ("shape", "object", "thing")
SIZE_WORDS = {"max": ("big", "large", "bigger", "larger", "biggest", "largest"),
              "min": ("small", "little", "smaller", "smallest", "tiny")}
EXTREME_PREFIX = {"left": ("leftmost", "left"), "right": ("rightmost", "right"),
                  "top": ("topmost", "top", "uppermost"), "bottom": ("bottommost", "bottom", "lowest")}
EXTREME_SUFFIX = {"left": ("on the left", "on the far left"), "right": ("on the right", "on the far right"),
                  "top": ("at the top",), "bottom": ("at the bottom",)}
ORDINALS = ("first", "second", "third")
RELATION_WORDS = {"above": ("above", "over"), "below": ("below", "under", "beneath"),
                  "left": ("to the left of", "left of"), "right": ("to the right of", "right of")}
DIRECTIONS = ("left", "right", "top", "bottom")
KINDS = ("attribute", "size", "position", "ordinal", "relation")

SIZE_RATIO = 1.5
POSITION_MARGIN = 0.08


@dataclass(frozen=True)
class NounPhrase:
    """Colour and shape filter; None means "any" (the generic nouns shape/object/thing)."""

    color: str | None = None
    shape: str | None = None

    def matches(self, obj: "SceneObject") -> bool:
        return (self.color is None or obj.color == self.color) and (self.shape is None or obj.shape == self.shape)


@dataclass(frozen=True)
class LogicalForm:
    """`op` in KINDS; `arg`: "max"/"min" (size), a direction (position, ordinal) or a relation
    ("above", "below", "left", "right"); `index`: 0-based ordinal; `anchor`: relation anchor."""

    target: NounPhrase
    op: str = "attribute"
    arg: str | None = None
    index: int = 0
    anchor: NounPhrase | None = None


@dataclass(frozen=True)
class SceneObject:
    """One object: `bbox` is the COCO xywh box of its visible region, `area` its pixel count."""

    ann_id: int
    shape: str
    color: str
    bbox: tuple[float, float, float, float]
    area: float

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...]

    @property
    def margin(self) -> float:
        return POSITION_MARGIN * max(self.width, self.height)


# ----------------------------------------------------------------------------- resolver


def _coordinate(obj: SceneObject, direction: str) -> float:
    """Sort key so that the object furthest towards `direction` comes first."""
    return {"left": obj.cx, "right": -obj.cx, "top": obj.cy, "bottom": -obj.cy}[direction]


def _offset(obj: SceneObject, anchor: SceneObject, relation: str) -> tuple[float, float]:
    """(offset along the relation's direction, absolute offset across it)."""
    dx, dy = obj.cx - anchor.cx, obj.cy - anchor.cy
    return {"above": (-dy, abs(dx)), "below": (dy, abs(dx)), "left": (-dx, abs(dy)), "right": (dx, abs(dy))}[relation]


def resolve_expression(form: LogicalForm, scene: Scene) -> SceneObject | None:
    """Evaluate `form` on `scene`; return the one object it denotes, or None when it denotes
    none or is ambiguous (see the module docstring for each kind's rule)."""
    matches = [o for o in scene.objects if form.target.matches(o)]
    margin = scene.margin
    if form.op == "attribute":
        return matches[0] if len(matches) == 1 else None
    if form.op == "size":
        ranked = sorted(matches, key=lambda o: o.area, reverse=form.arg == "max")
        if len(ranked) == 1:
            return ranked[0]
        if not ranked:
            return None
        big, small = (ranked[0], ranked[1]) if form.arg == "max" else (ranked[1], ranked[0])
        return ranked[0] if big.area >= SIZE_RATIO * small.area else None
    if form.op in ("position", "ordinal"):
        ranked = sorted(matches, key=lambda o: _coordinate(o, form.arg))
        k = form.index if form.op == "ordinal" else 0
        if k >= len(ranked):
            return None
        keys = [_coordinate(o, form.arg) for o in ranked]
        if k > 0 and keys[k] - keys[k - 1] < margin:
            return None
        if k + 1 < len(ranked) and keys[k + 1] - keys[k] < margin:
            return None
        return ranked[k]
    if form.op == "relation":
        anchors = [o for o in scene.objects if form.anchor.matches(o)]
        if len(anchors) != 1:
            return None
        anchor = anchors[0]
        strict, loose = [], 0
        for obj in matches:
            if obj is anchor:
                continue
            along, across = _offset(obj, anchor, form.arg)
            if along >= margin and along > across:
                strict.append(obj)
            if along > margin / 2 and 2 * along > across:
                loose += 1
        return strict[0] if len(strict) == 1 and loose == 1 else None
    raise ValueError(f"form.op: expected one of {KINDS}, got {form.op!r}")


# ----------------------------------------------------------------------------- rendering


def noun_phrase_variants(np_: NounPhrase) -> list[str]:
    """Every surface form of a noun phrase ("red circle", "red oval", "blue shape", "thing")."""
    nouns = NOUNS[np_.shape] if np_.shape is not None else GENERIC_NOUNS
    return [f"{np_.color} {n}" if np_.color else n for n in nouns]


def surface_forms(form: LogicalForm) -> list[str]:
    """Every sentence that `parse_expression` maps back to `form` (all synonyms)."""
    nps = noun_phrase_variants(form.target)
    if form.op == "attribute":
        return [f"the {p}" for p in nps] + nps
    if form.op == "size":
        return [f"the {w} {p}" for w in SIZE_WORDS[form.arg] for p in nps]
    if form.op == "position":
        return [f"the {w} {p}" for w in EXTREME_PREFIX[form.arg] for p in nps] + [
            f"the {p} {w}" for w in EXTREME_SUFFIX[form.arg] for p in nps
        ]
    if form.op == "ordinal":
        return [f"the {ORDINALS[form.index]} {p} from the {form.arg}" for p in nps]
    if form.op == "relation":
        return [f"the {p} {w} the {a}" for p in nps for w in RELATION_WORDS[form.arg]
                for a in noun_phrase_variants(form.anchor)]
    raise ValueError(f"form.op: expected one of {KINDS}, got {form.op!r}")


# ----------------------------------------------------------------------------- parsing


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


def _np_pattern(tag: str) -> str:
    nouns = [n for ns in NOUNS.values() for n in ns] + list(GENERIC_NOUNS)
    return rf"(?:(?P<{tag}c>{_alternation(list(COLORS))}) )?(?P<{tag}n>{_alternation(nouns)})"


_NOUN_TO_SHAPE = {n: s for s, ns in NOUNS.items() for n in ns} | {n: None for n in GENERIC_NOUNS}
_SIZE_TO_ARG = {w: arg for arg, ws in SIZE_WORDS.items() for w in ws}
_PREFIX_TO_DIR = {w: d for d, ws in EXTREME_PREFIX.items() for w in ws}
_SUFFIX_TO_DIR = {w: d for d, ws in EXTREME_SUFFIX.items() for w in ws}
_REL_TO_ARG = {w: arg for arg, ws in RELATION_WORDS.items() for w in ws}
_PATTERNS = [
    ("ordinal", re.compile(
        rf"(?P<ord>{_alternation(ORDINALS)}) {_np_pattern('t')} from the (?P<dir>{_alternation(DIRECTIONS)})")),
    ("relation", re.compile(rf"{_np_pattern('t')} (?P<rel>{_alternation(list(_REL_TO_ARG))}) the {_np_pattern('a')}")),
    ("suffix", re.compile(rf"{_np_pattern('t')} (?P<suf>{_alternation(list(_SUFFIX_TO_DIR))})")),
    ("size", re.compile(rf"(?P<mod>{_alternation(list(_SIZE_TO_ARG))}) {_np_pattern('t')}")),
    ("prefix", re.compile(rf"(?P<mod>{_alternation(list(_PREFIX_TO_DIR))}) {_np_pattern('t')}")),
    ("attribute", re.compile(_np_pattern("t"))),
]


def _np(match: re.Match, tag: str) -> NounPhrase:
    return NounPhrase(color=match[f"{tag}c"], shape=_NOUN_TO_SHAPE[match[f"{tag}n"]])


def parse_expression(sentence: str) -> LogicalForm:
    """Recover the logical form of a RefShapes expression from its text.

    Case, surrounding spaces, repeated spaces and a final period are ignored.

    Raises:
        ValueError: the sentence is not in the RefShapes grammar.
    """
    if not isinstance(sentence, str):
        raise ValueError(f"sentence: expected a str, got {type(sentence).__name__}")
    text = " ".join(sentence.lower().strip().rstrip(".").split())
    body = text[4:] if text.startswith("the ") else text
    for name, pattern in _PATTERNS:
        m = pattern.fullmatch(body)
        if m is None:
            continue
        if name == "ordinal":
            return LogicalForm(_np(m, "t"), "ordinal", m["dir"], ORDINALS.index(m["ord"]))
        if name == "relation":
            return LogicalForm(_np(m, "t"), "relation", _REL_TO_ARG[m["rel"]], anchor=_np(m, "a"))
        if name == "suffix":
            return LogicalForm(_np(m, "t"), "position", _SUFFIX_TO_DIR[m["suf"]])
        if name == "size":
            return LogicalForm(_np(m, "t"), "size", _SIZE_TO_ARG[m["mod"]])
        if name == "prefix":
            return LogicalForm(_np(m, "t"), "position", _PREFIX_TO_DIR[m["mod"]])
        return LogicalForm(_np(m, "t"))
    raise ValueError(f"sentence: {sentence!r} is not a RefShapes expression")


# `expression_kind`'s labels: the attribute kind split by what the expression names, then the others.
EXPRESSION_KINDS: tuple[str, ...] = ("colour", "shape", "colour+shape", "size", "position", "ordinal", "relation")


def expression_kind(sentence: str) -> str:
    """The kind of a RefShapes expression, for results broken down by kind (one of `EXPRESSION_KINDS`).

    Attribute expressions are labelled by what they name: "colour" ("the green shape"), "shape"
    ("the star") or "colour+shape" ("the red circle"); every other expression by its `op`
    ("size", "position", "ordinal", "relation").

    Raises:
        ValueError: the sentence is not in the RefShapes grammar, or names neither colour nor shape.
    """
    form = parse_expression(sentence)
    if form.op != "attribute":
        return form.op
    if form.target.color and form.target.shape:
        return "colour+shape"
    if form.target.color or form.target.shape:
        return "colour" if form.target.color else "shape"
    raise ValueError(f"{sentence!r} names neither a colour nor a shape")


__all__ = [
    "ANGULAR_SHAPES", "COLORS", "EXPRESSION_KINDS", "KINDS", "ROUND_SHAPES", "SEEN_PAIRS", "SHAPES", "UNSEEN_PAIRS",
    "LogicalForm", "NounPhrase", "Scene", "SceneObject",
    "expression_kind", "noun_phrase_variants", "parse_expression", "resolve_expression", "surface_forms",
]
