"""Joint image/mask augmentation: identity, exact geometry, alignment, reproducibility."""

import random

import numpy as np
import pytest
from PIL import Image

from refseg.data import AffineParams, RandomAffineSaturation

RED = (220, 30, 30)


def square_scene(width=40, height=32, box=(10, 8, 22, 18)):
    """Grey image with a red square, and its 0/255 mask."""
    image = np.full((height, width, 3), 120, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = RED
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(image), Image.fromarray(mask, mode="L")


def test_identity_parameters_return_identical_pixels():
    image, mask = square_scene()
    aug = RandomAffineSaturation(degrees=0, translate=(0, 0), scale=(1, 1), shear=0, saturation=0, p=1.0, seed=0)
    out_image, out_mask = aug(image, mask)
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(mask))
    never = RandomAffineSaturation(degrees=30, saturation=0.5, p=0.0)
    out_image, out_mask = never(image, mask)
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image))


def test_translation_and_rotation_are_exact():
    image, mask = square_scene()
    aug = RandomAffineSaturation(interpolation="nearest")
    _, shifted = aug.apply(image, mask, AffineParams(translate=(5.0, 3.0)))
    expected = np.zeros((32, 40), np.uint8)
    expected[11:21, 15:27] = 255
    np.testing.assert_array_equal(np.asarray(shifted), expected)
    square_image, square_mask = square_scene(width=20, height=20, box=(2, 3, 9, 6))
    rot_image, rot_mask = aug.apply(square_image, square_mask, AffineParams(angle=90.0))
    # +90 degrees turns the picture counter-clockwise, like np.rot90
    np.testing.assert_array_equal(np.asarray(rot_mask), np.rot90(np.asarray(square_mask)))
    np.testing.assert_array_equal(np.asarray(rot_image), np.rot90(np.asarray(square_image)))


@pytest.mark.parametrize("seed", range(5))
def test_mask_stays_binary_and_aligned_with_the_square(seed):
    image, mask = square_scene()
    exact = RandomAffineSaturation(degrees=25, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=10, saturation=0,
                                   p=1.0, interpolation="nearest", fill=(120, 120, 120))
    out_image, out_mask = exact(image, mask, rng=np.random.default_rng(seed))
    m = np.asarray(out_mask)
    assert out_mask.mode == "L" and set(np.unique(m)) <= {0, 255} and m.any()
    red = (np.asarray(out_image) == RED).all(axis=-1)
    np.testing.assert_array_equal(red, m > 0)  # same inverse map, nearest for both

    smooth = RandomAffineSaturation(degrees=25, translate=(0.1, 0.1), scale=(0.8, 1.2), saturation=(0.5, 1.5), p=1.0)
    params = smooth.sample_params(*image.size, rng=np.random.default_rng(seed))
    out_image, out_mask = smooth.apply(image, mask, params)
    m = np.asarray(out_mask) > 0
    pixels = np.asarray(out_image).astype(int)
    inside = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]  # eroded mask
    hue_red = pixels[..., 0] - pixels[..., 1:].max(axis=-1)
    assert (hue_red[1:-1, 1:-1][inside] > 60).all()  # still red inside (saturation scaled, not removed)
    near = m.copy()  # the mask grown by 2 px: bilinear blending stays within it
    for _ in range(2):
        grown = near.copy()
        grown[1:] |= near[:-1]
        grown[:-1] |= near[1:]
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        near = grown
    assert (hue_red[~near] == 0).all() and (~near).any()  # grey background and black fill stay grey
    assert set(np.unique(np.asarray(out_mask))) <= {0, 255}


def test_rng_reproducibility_and_saturation():
    image, mask = square_scene()
    aug = RandomAffineSaturation(degrees=20, saturation=0.4, p=1.0)
    a = aug(image, mask, rng=np.random.default_rng(7))
    b = aug(image, mask, rng=np.random.default_rng(7))
    c = aug(image, mask, rng=random.Random(7))
    d = aug(image, mask, rng=random.Random(7))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(c[1]), np.asarray(d[1]))
    first, again = (RandomAffineSaturation(seed=3, p=1.0).sample_params(40, 32) for _ in range(2))
    assert first == again and first != RandomAffineSaturation(seed=4, p=1.0).sample_params(40, 32)
    grey, _ = aug.apply(image, mask, AffineParams(saturation=0.0))
    g = np.asarray(grey).astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 1 and np.abs(g[..., 1] - g[..., 2]).max() <= 1


def test_bad_arguments():
    image, mask = square_scene()
    with pytest.raises(ValueError, match="mask: size"):
        RandomAffineSaturation()(image, mask.resize((10, 10)))
    with pytest.raises(ValueError, match="image: expected a PIL"):
        RandomAffineSaturation()(np.asarray(image), mask)
    with pytest.raises(ValueError, match="p: expected"):
        RandomAffineSaturation(p=1.5)
    with pytest.raises(ValueError, match="scale"):
        RandomAffineSaturation(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="interpolation"):
        RandomAffineSaturation(interpolation="lanczos")


def _expected_nearest(source, inverse, width, height):
    """Output of a nearest-neighbour warp, worked out pixel by pixel: output pixel (i, j) (column,
    row) has its centre at (i + 0.5, j + 0.5) and takes the source pixel containing `inverse` of it."""
    out = np.zeros((height, width), source.dtype)
    for j in range(height):
        for i in range(width):
            x, y = inverse(i + 0.5, j + 0.5)
            col, row = int(np.floor(x)), int(np.floor(y))
            if 0 <= col < width and 0 <= row < height:
                out[j, i] = source[row, col]
    return out


def test_zoom_above_one_enlarges_about_the_centre():
    # 40 x 32 image, centre (20, 16). A 2 x 2 square at columns 24-25, rows 18-19, i.e. the area
    # [24, 26) x [18, 20): zoom 2 about the centre sends x -> 20 + 2 (x - 20), y -> 16 + 2 (y - 16),
    # so it becomes the 4 x 4 square [28, 32) x [20, 24).
    image, mask = square_scene(box=(24, 18, 26, 20))
    aug = RandomAffineSaturation(interpolation="nearest")
    out_image, out_mask = aug.apply(image, mask, AffineParams(scale=2.0))
    expected = np.zeros((32, 40), np.uint8)
    expected[20:24, 28:32] = 255
    np.testing.assert_array_equal(np.asarray(out_mask), expected)
    np.testing.assert_array_equal((np.asarray(out_image) == RED).all(axis=-1), expected > 0)
    # zoom 0.5 shrinks towards the centre: [16, 24) x [12, 20) -> [18, 22) x [14, 18)
    _, small = aug.apply(*square_scene(box=(16, 12, 24, 20)), AffineParams(scale=0.5))
    expected = np.zeros((32, 40), np.uint8)
    expected[14:18, 18:22] = 255
    np.testing.assert_array_equal(np.asarray(small), expected)


def test_shear_is_along_x_proportional_to_the_offset_from_the_centre_row():
    # documented forward map (image coordinates, y down, centre c): x' = x + tan(shear) (y - c_y),
    # y' = y. tan = 0.5: rows below the centre move right, rows above move left, no row moves.
    shear = float(np.degrees(np.arctan(0.5)))
    _, mask = square_scene(width=40, height=32, box=(18, 4, 22, 28))  # a vertical bar through the centre row
    source = np.asarray(mask)
    aug = RandomAffineSaturation(interpolation="nearest")
    _, out = aug.apply(mask.convert("RGB"), mask, AffineParams(shear=shear))
    expected = _expected_nearest(source, lambda x, y: (x - 0.5 * (y - 16), y), 40, 32)
    np.testing.assert_array_equal(np.asarray(out), expected)
    rows = np.asarray(out) > 0
    assert rows.any(axis=1).tolist() == (source > 0).any(axis=1).tolist()  # same rows: nothing moved vertically
    # row 5 (centre y = 5.5, 10.5 above c_y) shifts by -5.25: [18, 22) -> [12.75, 16.75), pixel
    # centres 13.5 ... 16.5; row 27 (11.5 below) by +5.75: [23.75, 27.75), centres 24.5 ... 27.5
    assert np.flatnonzero(rows[5]).tolist() == [13, 14, 15, 16]
    assert np.flatnonzero(rows[27]).tolist() == [24, 25, 26, 27]


def test_rotation_is_applied_after_the_shear_and_the_zoom():
    # x' = c + t + R(angle) Shear(shear) zoom (x - c), with R(90) turning (dx, dy) into (dy, -dx)
    # on the image grid (counter-clockwise on screen); inverted here by hand.
    # (quarter-pixel translation: no output pixel centre maps exactly onto a source pixel edge)
    shear, zoom, (tx, ty) = float(np.degrees(np.arctan(0.5))), 1.5, (2.25, -3.25)
    _, mask = square_scene(width=40, height=40, box=(22, 12, 30, 20))
    source = np.asarray(mask)

    def inverse(x, y):
        u, v = x - 20 - tx, y - 20 - ty  # = R Shear zoom (dx, dy) = (v0, -u0) with (u0, v0) = Shear zoom (dx, dy)
        u0, v0 = -v, u
        dy = v0 / zoom
        dx = (u0 - 0.5 * v0) / zoom
        return dx + 20, dy + 20

    _, out = RandomAffineSaturation(interpolation="nearest").apply(
        mask.convert("RGB"), mask, AffineParams(angle=90.0, shear=shear, scale=zoom, translate=(tx, ty))
    )
    expected = _expected_nearest(source, inverse, 40, 40)
    assert expected.any()
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_a_draw_that_moves_the_referent_out_of_the_frame_keeps_the_geometry():
    """An empty augmented mask would read as "no referent" (generalized RIS): such a draw keeps the image and the
    mask where they were (saturation still applies); a draw that keeps part of the referent moves both."""
    image, mask = square_scene(box=(0, 0, 4, 4))
    aug = RandomAffineSaturation(p=1.0)
    away = AffineParams(angle=0.0, translate=(-10.0, -10.0), scale=1.0, shear=0.0, saturation=0.5)
    out_image, out_mask = aug.apply(image, mask, away)
    np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(mask))
    assert np.asarray(out_image)[0, 0].tolist() != list(RED)  # desaturated in place, not moved
    assert np.asarray(out_image)[20, 20].tolist() == np.asarray(image)[20, 20].tolist()
    partly = AffineParams(angle=0.0, translate=(2.0, 0.0), scale=1.0, shear=0.0, saturation=1.0)
    _, moved = aug.apply(image, mask, partly)
    assert np.asarray(moved)[0, 2:6].tolist() == [255] * 4 and np.asarray(moved)[0, :2].tolist() == [0, 0]
    # an empty mask (a no-target expression) is moved as it is: nothing to keep
    empty = Image.fromarray(np.zeros((32, 40), np.uint8), mode="L")
    moved_image, still_empty = aug.apply(image, empty, away)
    assert still_empty.getbbox() is None and np.asarray(moved_image)[31, 39].tolist() == [0, 0, 0]
