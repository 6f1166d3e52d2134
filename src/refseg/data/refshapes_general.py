"""Generalized RefShapes: expressions with several referents or none, in gRefCOCO's format.

`make_refshapes(root, ..., generalized=True)` draws the same images and single-target refs as RefShapes and
adds, per image, refs of two more kinds, then writes `<root>/grefshapes/grefs(unc).json` (read by
`refseg.data.load_grefer(root, "grefshapes", "unc", split)`) beside a copy of `instances.json`:

- multi-target: a plural noun phrase that every one of at least two objects matches, and nothing else:
  colour ("the red shapes", "all the red objects"), shape ("the circles", "all the stars"), both ("the blue
  squares"), optionally with their exact number ("the two circles", "the three green shapes");
- no-target: a singular noun phrase that no object matches: a colour-shape pair ("the purple star"), a colour
  ("the green shape") or a shape ("the hexagon") absent from the image.

Every referent of a multi-target ref satisfies its split's rule (testA: round shapes, testB: angular ones,
unseen: held-out colour-shape pairs), and the colour-shape pairs no-target refs name come from the split's own
pairs, so held-out pairs never reach the text of the other splits. Expressions are kept only when
`resolve_general(parse_general(sentence), objects)` gives exactly the referents (none for no-target).

`multi_target_share` and `no_target_share` set the shares of refs drawn of each kind (of all refs). A scene
with no plural phrase (no two objects of a colour or shape, or, in testA/testB/unseen, none that all pass the
split's rule) gives no multi-target ref, so fewer land than are drawn: the defaults (0.5, 0.08) gave 28.5 %
multi-target and 11.2 % no-target refs on 400 images (seed 0), near gRefCOCO's shares (about 80k of 278k
expressions with several targets, 32k with none). The extra refs come from a random stream of their own (`default_rng([seed, image_id, 1])`), so the
single-target refs, the images and `refshapes/` are byte-identical to those of `generalized=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .refshapes_lang import COLORS, GENERIC_NOUNS, NOUNS, SHAPES, SceneObject

# Drawn shares; what lands is lower for multi-target refs (a scene often has no plural phrase): measured on
# 400 images (seed 0), 28.5 % multi-target and 11.2 % no-target refs, near gRefCOCO's 29 % and 11.5 %.
DEFAULT_MULTI_TARGET_SHARE = 0.5
DEFAULT_NO_TARGET_SHARE = 0.08
COUNT_WORDS = ("two", "three", "four", "five", "six")
PLURALS = {"circle": "circles", "ellipse": "ellipses", "oval": "ovals", "square": "squares", "triangle": "triangles",
           "star": "stars", "hexagon": "hexagons", "shape": "shapes", "object": "objects", "thing": "things"}
_SINGULAR = {plural: noun for noun, plural in PLURALS.items()}
_NOUN_TO_SHAPE = {n: s for s, ns in NOUNS.items() for n in ns} | {n: None for n in GENERIC_NOUNS}


@dataclass(frozen=True)
class GeneralForm:
    """`color` / `shape` filter (None: any); `plural`: the phrase names every match (several), else the one
    match (none when nothing matches); `count`: the number a plural phrase states, if any."""

    color: str | None
    shape: str | None
    plural: bool
    count: int | None = None


def parse_general(sentence: str) -> GeneralForm:
    """The `GeneralForm` of a generalized RefShapes expression, from its text alone."""
    words = sentence.lower().split()
    if words[:2] == ["all", "the"]:
        words = words[2:]
    elif words[:1] in (["the"], ["all"]):
        words = words[1:]
    count = None
    if words and words[0] in COUNT_WORDS:
        count = COUNT_WORDS.index(words[0]) + 2
        words = words[1:]
    color = None
    if words and words[0] in COLORS:
        color, words = words[0], words[1:]
    if len(words) != 1:
        raise ValueError(f"not a generalized RefShapes expression: {sentence!r}")
    noun = words[0]
    plural = noun in _SINGULAR
    noun = _SINGULAR.get(noun, noun)
    if noun not in _NOUN_TO_SHAPE or (count is not None and not plural):
        raise ValueError(f"not a generalized RefShapes expression: {sentence!r}")
    return GeneralForm(color, _NOUN_TO_SHAPE[noun], plural, count)


def resolve_general(form: GeneralForm, objects: Sequence[SceneObject]) -> list[SceneObject] | None:
    """The objects `form` denotes: every match of a plural phrase (at least two, and exactly `count` when
    stated), the one match of a singular phrase, or [] when a singular phrase matches nothing; None when the
    phrase denotes nothing well-defined (a plural with fewer than two matches, a singular with several)."""
    matches = [o for o in objects if (form.color is None or o.color == form.color)
               and (form.shape is None or o.shape == form.shape)]
    if form.plural:
        if len(matches) < 2 or (form.count is not None and form.count != len(matches)):
            return None
        return matches
    return matches if len(matches) <= 1 else None


def _phrase(color: str | None, shape: str | None, rng: np.random.Generator, *, plural: bool,
            count: int | None = None) -> str:
    noun = rng.choice(NOUNS[shape]) if shape else rng.choice(GENERIC_NOUNS)
    noun = PLURALS[str(noun)] if plural else str(noun)
    words = [color, noun] if color else [noun]
    if count is not None:
        words = [COUNT_WORDS[count - 2], *words]
    prefix = ["all", "the"] if plural and count is None and rng.random() < 0.4 else ["the"]
    return " ".join(prefix + words)


def multi_target_ref(objects: Sequence[SceneObject], eligible, rng: np.random.Generator):
    """`(referents, [sentence])` of a plural phrase whose matches (two or more) all pass `eligible(obj)`, or None."""
    options = []
    for color in [None, *COLORS]:
        for shape in [None, *SHAPES]:
            if color is None and shape is None:
                continue
            form = GeneralForm(color, shape, True)
            found = resolve_general(form, objects)
            if found and all(eligible(o) for o in found):
                options.append((color, shape, found))
    if not options:
        return None
    color, shape, found = options[int(rng.integers(len(options)))]
    count = len(found) if len(found) - 2 < len(COUNT_WORDS) and rng.random() < 0.4 else None
    sentence = _phrase(color, shape, rng, plural=True, count=count)
    if resolve_general(parse_general(sentence), objects) != found:  # the written sentence must say the same
        return None
    return found, [sentence]


def no_target_ref(objects: Sequence[SceneObject], pairs: Sequence[tuple[str, str]], rng: np.random.Generator):
    """`[sentence]` of a singular phrase matching no object (a pair of `pairs`, a colour or a shape absent from
    the image), or None."""
    present_pairs = {(o.color, o.shape) for o in objects}
    colors = {c for c, _ in pairs} - {o.color for o in objects}
    shapes = {s for _, s in pairs} - {o.shape for o in objects}
    options = [(c, s) for c, s in pairs if (c, s) not in present_pairs]
    options += [(c, None) for c in sorted(colors)] + [(None, s) for s in sorted(shapes)]
    if not options:
        return None
    color, shape = options[int(rng.integers(len(options)))]
    sentence = _phrase(color, shape, rng, plural=False)
    if resolve_general(parse_general(sentence), objects) != []:
        return None
    return [sentence]


def check_shares(multi_target_share: float, no_target_share: float) -> None:
    for name, value in (("multi_target_share", multi_target_share), ("no_target_share", no_target_share)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    if multi_target_share + no_target_share >= 1.0:
        raise ValueError(f"multi_target_share + no_target_share must stay below 1 (single-target refs are the "
                         f"rest), got {multi_target_share} + {no_target_share}")


def extra_refs(seed: int, image_id: int, objects: Sequence[SceneObject], n_single: int, eligible,
               pairs: Sequence[tuple[str, str]], multi_target_share: float, no_target_share: float) -> list:
    """The multi-target and no-target refs of one image: `[(referent indices, [sentence])]` (no indices for no
    target). Each single-target ref brings on average `share / single_share` refs of each kind."""
    rng = np.random.default_rng([seed, image_id, 1])
    single_share = 1.0 - multi_target_share - no_target_share
    out = []
    for kind, share in (("multi", multi_target_share), ("none", no_target_share)):
        wanted = int(rng.poisson(n_single * share / single_share)) if share else 0
        found = 0
        for _ in range(3 * wanted):  # a draw can repeat a ref already made: a few more tries
            if found == wanted:
                break
            if kind == "multi":
                ref = multi_target_ref(objects, eligible, rng)
                if ref is not None and all(sorted(o.ann_id for o in ref[0]) != sorted(done) for done, _ in out):
                    out.append(([o.ann_id for o in ref[0]], ref[1]))
                    found += 1
            else:
                sentences = no_target_ref(objects, pairs, rng)
                if sentences is not None and all(s != sentences for _, s in out):
                    out.append(([], sentences))
                    found += 1
    return out


__all__ = ["COUNT_WORDS", "DEFAULT_MULTI_TARGET_SHARE", "DEFAULT_NO_TARGET_SHARE", "GeneralForm", "extra_refs",
           "multi_target_ref", "no_target_ref", "parse_general", "resolve_general"]
