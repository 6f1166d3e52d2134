"""RefShapes scenes: shape geometry, textured backgrounds, placement with limited occlusion.

An image is a textured, nearly grey background with 2-6 flat-coloured shapes drawn in order.
Shapes are rasterised without anti-aliasing, so an object's pixels are exactly its colour and its
visible mask (its own shape minus every shape drawn after it) equals the set of pixels that
have its RGB value. The background is kept desaturated (channel spread < 60) and every object
colour is saturated (spread > 90), and the objects of one image get distinct RGB values, so no
background or other-object pixel can take an object's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .refshapes_lang import COLORS

COLOR_JITTER = 10  # per-channel jitter of an object's RGB around its colour's base value
MIN_VISIBLE = 0.8  # an object keeps at least this share of its own area visible
MIN_PIXELS = 40
RADIUS_RANGE = (0.10, 0.21)  # shape radius as a fraction of the shorter image side
BACKGROUNDS = ("noise", "stripes", "gradient", "checker")


@dataclass
class DrawnObject:
    """One drawn shape: geometry, colour and (after `compose`) its visible mask (H, W) bool."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float
    angle: float
    full: np.ndarray
    visible: np.ndarray | None = None


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


def rasterise(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """Fill a polygon without anti-aliasing; returns a (height, width) bool mask."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


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
    rng: np.random.Generator, width: int, height: int, pairs: list[tuple[str, str]], *, attempts: int = 30
) -> list[DrawnObject]:
    """Place shapes for the (colour, shape) `pairs` in drawing order, with limited occlusion.

    Each new shape is drawn over the earlier ones; a placement is kept only when every earlier
    object keeps `MIN_VISIBLE` of its area and `MIN_PIXELS` pixels. A pair that finds no place in
    `attempts` tries is dropped. Returns the placed objects with `visible` masks set.
    """
    placed: list[DrawnObject] = []
    taken: set[tuple[int, int, int]] = set()
    short = min(width, height)
    for color, shape in pairs:
        for _ in range(attempts):
            radius = rng.uniform(*RADIUS_RANGE) * short
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
            full = rasterise(shape_polygon(shape, cx, cy, radius, angle), width, height)
            if full.sum() < MIN_PIXELS:
                continue
            if all(
                (vis := (o.visible & ~full).sum()) >= MIN_VISIBLE * o.full.sum() and vis >= MIN_PIXELS
                for o in placed
            ):
                for o in placed:
                    o.visible = o.visible & ~full
                rgb = object_rgb(rng, color, taken)
                taken.add(rgb)
                placed.append(DrawnObject(shape, color, rgb, cx, cy, radius, angle, full, full.copy()))
                break
    return placed


def compose(canvas: np.ndarray, objects: list[DrawnObject]) -> np.ndarray:
    """Paint `objects` in order onto a copy of `canvas` (H, W, 3) uint8."""
    image = canvas.copy()
    for obj in objects:
        image[obj.full] = obj.rgb
    return image


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO xywh box of a non-empty (H, W) mask (same convention as `pycocotools.mask.toBbox`)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


__all__ = ["DrawnObject", "background", "compose", "mask_bbox", "object_rgb", "place_objects", "shape_polygon"]
