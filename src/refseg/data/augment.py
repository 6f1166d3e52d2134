"""Joint image/mask augmentation for training: random affine + saturation (pure PIL/numpy).

The RISCLIP paper trains with "random affine transformation and saturation" augmentation;
`RandomAffineSaturation` applies one random affine map (rotation, translation, scale, shear
about the image centre) to the image (bilinear by default) and to the mask (nearest, so it stays
0/255), then scales the image's colour saturation. Horizontal flips are deliberately absent:
they would swap "left" and "right" in the expressions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance

_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class AffineParams:
    """One draw: rotation (counter-clockwise) and x-shear in degrees, translation (x, y) in
    pixels, zoom and saturation factors."""

    angle: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    shear: float = 0.0
    saturation: float = 1.0

    @property
    def is_identity_geometry(self) -> bool:
        return self.angle == 0 and self.translate == (0.0, 0.0) and self.scale == 1 and self.shear == 0


def _range(
    value: float | Sequence[float], name: str, *, center: float = 0.0, minimum: float | None = None
) -> tuple[float, float]:
    """A scalar v means [center - v, center + v]; a pair is taken as (low, high)."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative number or a (low, high) pair, got {value}")
        low, high = center - value, center + value
    else:
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(f"{name}: expected a (low, high) pair with low <= high, got {value}")
        low, high = float(value[0]), float(value[1])
    if minimum is not None and low < minimum:
        raise ValueError(f"{name}: range ({low}, {high}) goes below {minimum}")
    return float(low), float(high)


def _uniform(rng: np.random.Generator | random.Random, low: float, high: float) -> float:
    return float(rng.uniform(low, high)) if high > low else float(low)


def inverse_affine_coefficients(params: AffineParams, width: int, height: int) -> tuple[float, ...]:
    """PIL `Image.AFFINE` coefficients (output -> input map) of the forward transform
    x' = T(center + translate) . R(angle) . Shear(shear) . S(scale) . T(-center) x."""
    cx, cy = width / 2, height / 2
    a, s = math.radians(params.angle), math.radians(params.shear)
    # forward linear part: rotation . shear-x . scale; image y points down, so this matrix turns
    # the picture counter-clockwise on screen for a positive angle (torchvision's convention)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    shear = np.array([[1.0, math.tan(s)], [0.0, 1.0]])
    linear = rot @ shear * params.scale
    inv = np.linalg.inv(linear)
    tx, ty = params.translate
    # input = inv @ (output - center - t) + center
    offset = np.array([cx, cy]) - inv @ np.array([cx + tx, cy + ty])
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


class RandomAffineSaturation:
    """Random affine + saturation applied jointly to a PIL image and its PIL mask.

    Args:
        degrees: rotation range in degrees (v -> [-v, v], or a (low, high) pair).
        translate: maximum shift as a fraction of (width, height).
        scale: (low, high) zoom factor range.
        shear: x-shear range in degrees (v -> [-v, v]).
        saturation: saturation factor range (v -> [1 - v, 1 + v]; 1 leaves colours unchanged).
        p: probability of augmenting at all; otherwise the inputs come back unchanged.
        fill: image fill for pixels mapped from outside the image (the mask fills with 0).
        interpolation: image resampling: "bilinear" (default), "bicubic" or "nearest".
        seed: seed of the generator used when `__call__` gets no `rng`.

    Call: `aug(image, mask, rng=None) -> (image, mask)`; image converted to RGB, mask returned as
    mode "L" with values 0/255, both of the input size.
    """

    def __init__(
        self,
        degrees: float | Sequence[float] = 10.0,
        translate: Sequence[float] = (0.1, 0.1),
        scale: Sequence[float] = (0.9, 1.1),
        shear: float | Sequence[float] = 0.0,
        saturation: float | Sequence[float] = 0.3,
        p: float = 0.5,
        fill: int | tuple[int, int, int] = 0,
        interpolation: str = "bilinear",
        seed: int | None = None,
    ):
        self.degrees = _range(degrees, "degrees")
        if len(translate) != 2 or not all(0 <= t <= 1 for t in translate):
            raise ValueError(f"translate: expected a pair of fractions in [0, 1], got {translate}")
        self.translate = (float(translate[0]), float(translate[1]))
        self.scale = _range(scale, "scale", minimum=1e-3)
        self.shear = _range(shear, "shear")
        if not -80 < self.shear[0] <= self.shear[1] < 80:
            raise ValueError(f"shear: expected degrees within (-80, 80), got {shear}")
        self.saturation = _range(saturation, "saturation", center=1.0, minimum=0.0)
        if not 0 <= p <= 1:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        self.p = float(p)
        self.fill = fill
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation: expected one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        self.interpolation = interpolation
        self._rng = np.random.default_rng(seed)

    def sample_params(
        self, width: int, height: int, rng: np.random.Generator | random.Random | None = None
    ) -> AffineParams | None:
        """Draw the parameters of one augmentation (None: this call leaves the inputs as they are)."""
        rng = self._rng if rng is None else rng
        if rng.random() >= self.p:
            return None
        return AffineParams(
            angle=_uniform(rng, *self.degrees),
            translate=(_uniform(rng, -self.translate[0] * width, self.translate[0] * width),
                       _uniform(rng, -self.translate[1] * height, self.translate[1] * height)),
            scale=_uniform(rng, *self.scale),
            shear=_uniform(rng, *self.shear),
            saturation=_uniform(rng, *self.saturation),
        )

    def apply(
        self, image: Image.Image, mask: Image.Image, params: AffineParams | None
    ) -> tuple[Image.Image, Image.Image]:
        """Apply fixed `params` to (image, mask); both keep their size, the mask stays 0/255."""
        image, mask = _check_pair(image, mask)
        if params is None:
            return image, mask
        if not params.is_identity_geometry:
            coeffs = inverse_affine_coefficients(params, *image.size)
            moved = mask.transform(mask.size, Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=0)
            # A referent moved out of the frame entirely would turn the row into a "no target" one (the presence
            # head of generalized RIS reads that from the empty mask): such a draw keeps the geometry as it was.
            if moved.getbbox() is not None or mask.getbbox() is None:
                fill = self.fill if isinstance(self.fill, tuple) else (self.fill,) * 3
                resample = _RESAMPLE[self.interpolation]
                image = image.transform(image.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)
                mask = moved
        if params.saturation != 1:
            image = ImageEnhance.Color(image).enhance(params.saturation)
        return image, mask

    def __call__(
        self, image: Image.Image, mask: Image.Image, rng: np.random.Generator | random.Random | None = None
    ) -> tuple[Image.Image, Image.Image]:
        image, mask = _check_pair(image, mask)
        return self.apply(image, mask, self.sample_params(*image.size, rng=rng))


def _check_pair(image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(mask, Image.Image):
        raise ValueError(f"mask: expected a PIL.Image.Image, got {type(mask).__name__}")
    if image.size != mask.size:
        raise ValueError(f"mask: size {mask.size} differs from the image size {image.size}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    binary = np.asarray(mask.convert("L")) > 0
    return image, Image.fromarray(binary.astype(np.uint8) * 255, mode="L")


__all__ = ["AffineParams", "RandomAffineSaturation", "inverse_affine_coefficients"]
