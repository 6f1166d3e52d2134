"""Tests written to kill mutants of `refseg.data.augment` that survived
`bash scripts/mutation_test.sh augment`.

tests/test_augment.py checks the geometry of fixed parameters thoroughly; these pin what it left
open: that `__call__` really draws parameters, the ranges they are drawn from, the argument checks
and their messages, the fill colour, bilinear resampling, and non-RGB / 0-1 / palette inputs.
"""

import numpy as np
import pytest
from PIL import Image

from refseg.data import AffineParams, RandomAffineSaturation

from test_augment import RED, square_scene


def test_call_with_p_one_transforms_the_pair():
    image, mask = square_scene()
    aug = RandomAffineSaturation(degrees=(30, 40), translate=(0, 0), scale=(1, 1), saturation=0, p=1.0)
    out_image, out_mask = aug(image, mask, rng=np.random.default_rng(0))
    assert not np.array_equal(np.asarray(out_mask), np.asarray(mask))
    assert not np.array_equal(np.asarray(out_image), np.asarray(image))


def test_sampled_parameters_cover_their_ranges():
    aug = RandomAffineSaturation(degrees=10, translate=(0.1, 0.2), scale=(0.9, 1.1), shear=5, saturation=0.3, p=1.0)
    rng = np.random.default_rng(0)
    draws = [aug.sample_params(40, 30, rng=rng) for _ in range(300)]
    columns = {
        "angle": ([d.angle for d in draws], -10, 10),
        "tx": ([d.translate[0] for d in draws], -4, 4),  # 0.1 * width
        "ty": ([d.translate[1] for d in draws], -6, 6),  # 0.2 * height
        "scale": ([d.scale for d in draws], 0.9, 1.1),
        "shear": ([d.shear for d in draws], -5, 5),
        "saturation": ([d.saturation for d in draws], 0.7, 1.3),
    }
    for name, (values, low, high) in columns.items():
        values = np.asarray(values)
        assert values.min() >= low and values.max() <= high, name
        centre, half = (low + high) / 2, (high - low) / 2
        # both halves of the range are used, well away from the centre
        assert values.min() < centre - half / 2 and values.max() > centre + half / 2, name


def test_a_low_high_pair_is_used_as_given():
    aug = RandomAffineSaturation(degrees=(-5, 15), p=1.0)
    assert aug.degrees == (-5.0, 15.0)
    angles = np.asarray([aug.sample_params(40, 30, rng=np.random.default_rng(s)).angle for s in range(100)])
    assert angles.min() >= -5 and angles.max() <= 15 and (angles < 0).any() and (angles > 10).any()


def test_default_ranges():
    aug = RandomAffineSaturation()
    assert aug.degrees == (-10.0, 10.0)
    assert aug.translate == (0.1, 0.1)
    assert aug.scale == (0.9, 1.1)
    assert aug.shear == (0.0, 0.0)
    assert aug.saturation == (0.7, 1.3)
    assert aug.p == 0.5 and aug.fill == 0 and aug.interpolation == "bilinear"
    assert RandomAffineSaturation(translate=(0.1, 0.2)).translate == (0.1, 0.2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"degrees": -1}, r"^degrees: expected a non-negative number"),
        ({"shear": -1}, r"^shear: expected a non-negative number"),
        ({"scale": (0.0, 1.0)}, r"^scale: range \(0\.0, 1\.0\) goes below 0\.001"),
        ({"saturation": 1.5}, r"^saturation: range \(-0\.5, 2\.5\) goes below 0\.0"),
        ({"translate": (0.1, 0.1, 0.1)}, r"^translate: expected a pair of fractions in \[0, 1\]"),
        ({"translate": (1.5, 0.0)}, r"^translate: expected a pair"),
        ({"shear": (-80.5, 0)}, r"^shear: expected degrees within \(-80, 80\)"),
        ({"shear": (-80, 0)}, r"^shear: expected degrees within"),
        ({"shear": (-85, 0)}, r"^shear: expected degrees within"),
        ({"shear": (0, 80)}, r"^shear: expected degrees within"),
        ({"shear": (0, 80.5)}, r"^shear: expected degrees within"),
    ],
)
def test_bad_ranges_are_rejected_with_their_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomAffineSaturation(**kwargs)


def test_range_boundaries_that_are_allowed():
    assert RandomAffineSaturation(saturation=1.0).saturation == (0.0, 2.0)  # low == minimum is fine
    assert RandomAffineSaturation(translate=(1, 1)).translate == (1.0, 1.0)
    assert RandomAffineSaturation(shear=(-79.9, 79.9)).shear == (-79.9, 79.9)


def test_int_fill_is_a_grey_level_for_every_channel():
    image, mask = square_scene()
    aug = RandomAffineSaturation(fill=7, interpolation="nearest")
    out, out_mask = aug.apply(image, mask, AffineParams(translate=(5.0, 0.0)))
    pixels = np.asarray(out)
    assert (pixels[:, :5] == 7).all()  # uncovered on the left, filled with (7, 7, 7)
    assert (np.asarray(out_mask)[:, :5] == 0).all()


def test_default_fill_is_black():
    image, mask = square_scene()
    out, _ = RandomAffineSaturation(interpolation="nearest").apply(image, mask, AffineParams(translate=(5.0, 0.0)))
    assert (np.asarray(out)[:, :5] == 0).all()


def test_bilinear_is_the_default_interpolation():
    image, mask = square_scene()
    params = AffineParams(angle=17.0)
    bilinear, _ = RandomAffineSaturation().apply(image, mask, params)
    nearest, _ = RandomAffineSaturation(interpolation="nearest").apply(image, mask, params)
    colours = {tuple(c) for c in np.asarray(nearest).reshape(-1, 3)}
    assert colours <= {(120, 120, 120), RED, (0, 0, 0)}
    assert not np.array_equal(np.asarray(bilinear), np.asarray(nearest))
    blended = {tuple(c) for c in np.asarray(bilinear).reshape(-1, 3)} - colours
    assert blended  # edges blend two colours


def test_saturation_two_is_applied():
    image, mask = square_scene()
    out, _ = RandomAffineSaturation().apply(image, mask, AffineParams(saturation=2.0))
    red = np.asarray(out)[10, 12].astype(int)
    # more saturated: the red square moves away from its grey level
    assert red[0] >= RED[0] and red[1] < RED[1]


def test_non_pil_inputs_are_named():
    image, mask = square_scene()
    with pytest.raises(ValueError, match=r"^image: expected a PIL.Image.Image, got ndarray"):
        RandomAffineSaturation()(np.asarray(image), mask)
    with pytest.raises(ValueError, match=r"^mask: expected a PIL.Image.Image, got ndarray"):
        RandomAffineSaturation()(image, np.asarray(mask))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_come_back_as_rgb(mode):
    image, mask = square_scene()
    converted = image.convert(mode)
    out, out_mask = RandomAffineSaturation(p=0.0)(converted, mask)
    assert out.mode == "RGB" and out.size == image.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(converted.convert("RGB")))
    out, _ = RandomAffineSaturation().apply(converted, mask, AffineParams(angle=10.0))
    assert out.mode == "RGB"


def test_zero_one_masks_and_palette_masks_are_binarised_to_0_255():
    image, mask = square_scene()
    binary = np.asarray(mask) > 0
    zero_one = Image.fromarray(binary.astype(np.uint8))  # mode "L", values 0/1
    palette = Image.frombytes("P", mask.size, binary.astype(np.uint8).tobytes())
    palette.putpalette([0, 0, 0, 0, 0, 128] + [0] * 762)
    for m in (zero_one, palette):
        _, out = RandomAffineSaturation(p=0.0)(image, m)
        assert out.mode == "L"
        np.testing.assert_array_equal(np.asarray(out), binary.astype(np.uint8) * 255)
