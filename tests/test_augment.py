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
