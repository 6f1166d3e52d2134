"""RefShapes scenes: shape polygons, textured backgrounds, placement without overlap.

An image is a textured, nearly grey background with 2-6 flat-coloured shapes. Every shape is a
polygon (circles and ellipses with 64 vertices, stars with 10), its vertices rounded to 2
decimals as they are written to instances.json, and the shape is painted as *exactly* the pixels
of that polygon's pycocotools rasterisation (`frPyObjects` + `decode`, no anti-aliasing). Shapes
never overlap: a placement is kept only when at least `GAP` background pixels separate its mask
from every shape placed before it, so nothing is occluded and an object's visible pixels are
its whole polygon mask. This is what makes the annotation polygon, REFER's `getMask`,
`pycocotools.COCO.annToMask`, `refseg.data.load_refer` and the picture agree pixel for pixel.

The background is kept desaturated (channel spread < 60) and every object colour is saturated
(spread > 90), and the objects of one image get distinct RGB values, so an object's mask also
equals the set of pixels that have its RGB value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .refshapes_lang import COLORS

COLOR_JITTER = 10  # per-channel jitter of an object's RGB around its colour's base value
MIN_PIXELS = 40
GAP = 2  # at least this many background pixels between two objects' masks, in every direction
RADIUS_RANGE = (0.10, 0.21)  # shape radius as a fraction of the shorter image side
MIN_RADIUS = 0.07  # lower bound of the radius range after it has shrunk (crowded scenes)
COORD_DECIMALS = 2  # polygon vertices are rounded like RefCOCO's (and rasterised as rounded)
BACKGROUNDS = ("noise", "stripes", "gradient", "checker")


@dataclass
class DrawnObject:
    """One drawn shape: geometry, colour, its polygon and masks.

    `polygon` is the flat vertex list `[x1, y1, x2, y2, ...]` written as the annotation's only
    polygon; `full` is its pycocotools rasterisation, (H, W) bool, and `visible` the pixels the
    image shows for the object. Objects never overlap, so `visible` equals `full`.
    """

    shape: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float
    angle: float
    polygon: list[float]
    full: np.ndarray
    visible: np.ndarray


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy); `radius` sets the size, `angle` (radians) the turn."""
    if shape == "circle":
        n, radii = 64, [radius]
    elif shape == "ellipse":  # aspect 2:1 at `angle`
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x, y = 1.3 * radius * math.cos(t), 0.65 * radius * math.sin(t)
            pts.append((cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)))
        return pts
    elif shape == "square":
        n, radii = 4, [radius * 1.1]
        angle += math.pi / 4
    elif shape == "triangle":
        n, radii = 3, [radius * 1.2]
        angle -= math.pi / 2
    elif shape == "star":
        n, radii = 10, [radius * 1.25, radius * 0.55]
        angle -= math.pi / 2
    elif shape == "hexagon":
        n, radii = 6, [radius * 1.05]
    else:
        raise ValueError(f"shape: unknown shape {shape!r}")
    return [
        (cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
         cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def shape_extent(shape: str, radius: float) -> float:
    """Largest distance of the shape's outline from its centre."""
    factors = {"circle": 1.0, "ellipse": 1.3, "square": 1.1, "triangle": 1.2, "star": 1.25, "hexagon": 1.05}
    return radius * factors[shape]


def flat_polygon(points: list[tuple[float, float]]) -> list[float]:
    """COCO's flat `[x1, y1, x2, y2, ...]` with every coordinate rounded to `COORD_DECIMALS`."""
    return [round(float(v), COORD_DECIMALS) for point in points for v in point]


def rasterise(polygons: list[list[float]], width: int, height: int) -> np.ndarray:
    """COCO polygons (flat lists of >= 6 numbers) as pycocotools rasterises them: (height, width) bool.

    The same `frPyObjects` + `decode` that REFER's `getMask` and `COCO.annToMask` run, so the
    painted pixels are the annotation's mask by construction.
    """
    if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
        raise ValueError("polygons: expected a non-empty list of flat vertex lists of >= 3 points")
    masks = mask_utils.decode(mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width))
    return masks.any(axis=2)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) bool mask by a (2 radius + 1)-pixel square."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured, desaturated background, (height, width, 3) uint8 (channel spread < 60)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "noise":  # smooth noise: a coarse random grid, bilinearly enlarged
        cells = int(rng.integers(3, 12))
        coarse = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32) / 127.5 - 1
    elif kind == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        field = np.sin(2 * math.pi * (xs * math.cos(theta) + ys * math.sin(theta)) / period)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        field = 2 * (proj - proj.min()) / max(float(np.ptp(proj)), 1.0) - 1
    else:  # checker
        cell = rng.uniform(8, 28)
        field = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2) * 2 - 1
    base = rng.uniform(80, 180)
    tint = rng.uniform(-16, 16, size=3)
    amplitude = rng.uniform(15, 45)
    grain = rng.integers(-4, 5, size=(height, width, 3))
    pixels = base + tint[None, None, :] + amplitude * field[..., None] + grain
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def object_rgb(rng: np.random.Generator, color: str, taken: set[tuple[int, int, int]]) -> tuple[int, int, int]:
    """`color`'s base RGB with a small jitter, distinct from the RGBs already `taken`."""
    base = np.array(COLORS[color])
    while True:
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255))
        if rgb not in taken:
            return rgb


def place_objects(
    rng: np.random.Generator, width: int, height: int, pairs: list[tuple[str, str]], *, attempts: int = 40
) -> list[DrawnObject]:
    """Place shapes for the (colour, shape) `pairs` in order, never overlapping.

    A placement is kept only when its polygon mask has `MIN_PIXELS` pixels and misses every
    earlier mask dilated by `GAP` (so at least `GAP` background pixels lie between them). The
    upper end of the radius range shrinks with every failed attempt (its lower end too, down to
    `MIN_RADIUS` at the last), so crowded scenes still fit smaller shapes; a pair that finds no
    place in `attempts` tries is dropped. Returns the placed objects, `visible` equal to `full`.
    """
    placed: list[DrawnObject] = []
    taken: set[tuple[int, int, int]] = set()
    occupied = np.zeros((height, width), bool)  # every placed mask, dilated by GAP
    short = min(width, height)
    lo, hi = RADIUS_RANGE
    for color, shape in pairs:
        for attempt in range(attempts):
            shrink = attempt / max(attempts - 1, 1)
            top = hi - (hi - lo) * shrink
            bottom = min(lo, top) - (lo - MIN_RADIUS) * shrink
            radius = rng.uniform(bottom, top) * short
            extent = shape_extent(shape, radius)
            if 2 * extent + 4 >= short:
                continue
            cx = rng.uniform(extent + 1, width - extent - 2)
            cy = rng.uniform(extent + 1, height - extent - 2)
            if shape in ("square", "triangle"):  # kept nearly upright: a 45-degree square reads as a diamond
                angle = rng.uniform(-math.pi / 12, math.pi / 12)
            else:
                angle = rng.uniform(0, 2 * math.pi)
            if shape == "triangle" and rng.random() < 0.5:
                angle += math.pi  # pointing down
            polygon = flat_polygon(shape_polygon(shape, cx, cy, radius, angle))
            full = rasterise([polygon], width, height)
            if full.sum() < MIN_PIXELS or (full & occupied).any():
                continue
            occupied |= dilate(full, GAP)
            rgb = object_rgb(rng, color, taken)
            taken.add(rgb)
            placed.append(DrawnObject(shape, color, rgb, cx, cy, radius, angle, polygon, full, full.copy()))
            break
    return placed


def compose(canvas: np.ndarray, objects: list[DrawnObject]) -> np.ndarray:
    """Paint every object's `visible` pixels in its flat RGB onto a copy of `canvas` (H, W, 3) uint8."""
    image = canvas.copy()
    for obj in objects:
        image[obj.visible] = obj.rgb
    return image


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO xywh box of a non-empty (H, W) mask (same convention as `pycocotools.mask.toBbox`)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


__all__ = [
    "DrawnObject", "background", "compose", "dilate", "flat_polygon", "mask_bbox", "object_rgb", "place_objects",
    "rasterise", "shape_polygon",
]
