"""Shared processor behaviour: image/text/mask validation, pairing, resizing and post-processing."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from refseg.modeling_outputs import ReferringSegmentationOutput
from refseg.processing_utils import (
    ReferringSegmentationProcessorMixin,
    get_original_sizes,
    load_image,
    load_mask,
    pair_images_and_texts,
    post_process_masks,
    resize_longest_side_shape,
    resize_masks_to_input,
    validate_masks,
    validate_text,
)

# ---- images --------------------------------------------------------------------------------


def _rgb_at(image, xy=(0, 0)):
    assert image.mode == "RGB"
    return image.getpixel(xy)


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white background
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half transparent black over white
        ("LA", (50, 255), (50, 50, 50)),
        ("LA", (50, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("I", 257 * 40, (40, 40, 40)),
        ("F", 0.5, (128, 128, 128)),
    ],
)
def test_load_image_pil_modes(mode, value, expected):
    image = Image.new(mode, (3, 2), value)
    out = load_image(image)
    assert out.size == (3, 2)
    assert _rgb_at(out) == expected


def test_load_image_palette_with_and_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 1 = green
    image.putpixel((0, 0), 1)
    assert _rgb_at(load_image(image), (0, 0)) == (0, 200, 0)
    assert _rgb_at(load_image(image), (1, 0)) == (0, 0, 0)
    image.info["transparency"] = 0  # index 0 transparent -> white
    assert _rgb_at(load_image(image), (1, 0)) == (255, 255, 255)
    assert _rgb_at(load_image(image), (0, 0)) == (0, 200, 0)


def _rotated_jpeg(path):
    image = Image.new("RGB", (30, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = _rotated_jpeg(tmp_path / "rotated.jpg")
    assert load_image(path).size == (20, 30)
    assert load_image(str(path)).size == (20, 30)
    with Image.open(path) as opened:
        assert opened.size == (30, 20)
        assert load_image(opened).size == (20, 30)


def test_load_image_numpy_layouts_and_dtypes():
    hwc = np.zeros((4, 5, 3), dtype=np.uint8)
    hwc[..., 0] = 200
    assert load_image(hwc).size == (5, 4) and _rgb_at(load_image(hwc)) == (200, 0, 0)
    chw = np.moveaxis(hwc, -1, 0).copy()  # (3, 4, 5): only the first axis can be channels
    assert load_image(chw).size == (5, 4) and _rgb_at(load_image(chw)) == (200, 0, 0)
    assert _rgb_at(load_image(np.full((4, 5), 7, dtype=np.uint8))) == (7, 7, 7)
    assert _rgb_at(load_image(np.full((4, 5, 1), 9, dtype=np.uint8))) == (9, 9, 9)
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)  # transparent -> white
    assert _rgb_at(load_image(rgba)) == (255, 255, 255)
    assert _rgb_at(load_image(np.full((4, 5, 3), 0.5))) == (128, 128, 128)
    assert _rgb_at(load_image(np.ones((4, 5), dtype=bool))) == (255, 255, 255)
    assert _rgb_at(load_image(np.full((4, 5), 65535, dtype=np.uint16))) == (255, 255, 255)


def test_load_image_torch_layouts():
    chw = torch.zeros(3, 6, 8)
    chw[1] = 1.0
    image = load_image(chw)
    assert image.size == (8, 6) and _rgb_at(image) == (0, 255, 0)
    hwc = torch.full((6, 8, 3), 30, dtype=torch.uint8)
    assert load_image(hwc).size == (8, 6) and _rgb_at(load_image(hwc)) == (30, 30, 30)


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (123, "int"),
        ([[1, 2], [3, 4]], "list"),
        (np.zeros((2, 4, 5, 3)), "shape"),
        (np.zeros((5, 6, 7)), "channels"),
        (np.full((4, 5), 2.0), "[0, 1]"),
        (np.full((4, 5), 300, dtype=np.int32), "[0, 255]"),
        ("/no/such/image.png", "/no/such/image.png"),
    ],
)
def test_load_image_rejects_non_images(bad, fragment):
    with pytest.raises(ValueError, match="images") as info:
        load_image(bad)
    assert fragment in str(info.value)


# ---- text and pairing ------------------------------------------------------------------------


def test_validate_text():
    assert validate_text("the red circle") == ["the red circle"]
    assert validate_text(("a", "b")) == ["a", "b"]
    for bad in ("", "   ", [], ["ok", " "], [1], None):
        with pytest.raises(ValueError, match="text"):
            validate_text(bad)


def test_pairing_one_image_many_texts():
    image = Image.new("RGB", (4, 3))
    images, texts, indices = pair_images_and_texts(image, ["a", "b", "c"])
    assert texts == ["a", "b", "c"] and indices == [0, 0, 0]
    assert len(images) == 3 and images[0] is images[2] and images[0].size == (4, 3)
    assert pair_images_and_texts([image], "only one")[1:] == (["only one"], [0])


def test_pairing_one_to_one_and_nested():
    first, second = Image.new("RGB", (4, 3)), Image.new("L", (2, 5))
    images, texts, indices = pair_images_and_texts([first, second], ["a", "b"])
    assert texts == ["a", "b"] and indices == [0, 1]
    assert [im.size for im in images] == [(4, 3), (2, 5)]
    images, texts, indices = pair_images_and_texts([first, second], [["a", "b"], ["c"]])
    assert texts == ["a", "b", "c"] and indices == [0, 0, 1]
    assert [im.size for im in images] == [(4, 3), (4, 3), (2, 5)]


@pytest.mark.parametrize(
    "n_images,text", [(2, ["a", "b", "c"]), (3, "a"), (2, [["a"], ["b"], ["c"]]), (1, [["a"], ["b"]])]
)
def test_pairing_mismatch_names_both(n_images, text):
    images = [Image.new("RGB", (4, 3))] * n_images
    with pytest.raises(ValueError) as info:
        pair_images_and_texts(images, text)
    message = str(info.value)
    assert "`images`" in message and "`text`" in message and f"{n_images} images" in message


def test_pairing_rejects_empty_images():
    with pytest.raises(ValueError, match="images"):
        pair_images_and_texts([], ["a"])


# ---- masks -------------------------------------------------------------------------------------


def test_load_mask_sources():
    array = np.array([[0, 255], [3, 0]], dtype=np.uint8)
    expected = np.array([[False, True], [True, False]])
    assert np.array_equal(load_mask(Image.fromarray(array, mode="L")), expected)
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 1, 2] = 1  # dark blue still counts as foreground
    rgb[1, 0, 0] = 9
    assert np.array_equal(load_mask(Image.fromarray(rgb, mode="RGB")), expected)
    assert np.array_equal(load_mask(np.array([[0.0, 0.9], [0.6, 0.4]])), expected)
    assert np.array_equal(load_mask(torch.tensor([[[0, 1], [1, 0]]])), expected)
    assert np.array_equal(load_mask(expected[..., None]), expected)
    assert load_mask(Image.new("1", (3, 2), 1)).shape == (2, 3)
    with pytest.raises(ValueError, match="masks"):
        load_mask("mask.png")
    with pytest.raises(ValueError, match="masks"):
        load_mask(np.zeros((2, 2, 2)))


def test_validate_masks_count_and_size():
    images = [Image.new("RGB", (4, 3)), Image.new("RGB", (4, 3))]
    masks = validate_masks([np.ones((3, 4)), Image.new("L", (4, 3))], images)
    assert [m.dtype for m in masks] == [np.bool_, np.bool_] and masks[0].all() and not masks[1].any()
    assert len(validate_masks([[np.ones((3, 4))], [np.ones((3, 4))]], images)) == 2  # nested flattened
    with pytest.raises(ValueError, match="masks") as info:
        validate_masks([np.ones((3, 4))], images)
    assert "1 masks" in str(info.value) and "2 image-text pairs" in str(info.value)
    with pytest.raises(ValueError, match=r"masks`\[1\]") as info:
        validate_masks([np.ones((3, 4)), np.ones((4, 3))], images)
    assert "(4, 3)" in str(info.value) and "(3, 4)" in str(info.value)


def test_get_original_sizes():
    sizes = get_original_sizes([Image.new("RGB", (4, 3)), Image.new("RGB", (7, 9))])
    assert sizes.dtype == torch.long and sizes.tolist() == [[3, 4], [9, 7]]


def test_resize_masks_to_input_stretch_and_longest_side():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    out = resize_masks_to_input([mask], 4)
    assert out.shape == (1, 4, 4) and out.dtype == torch.float32
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(out[0], expected)
    wide = np.zeros((2, 4), dtype=bool)
    wide[:, :2] = True  # left half
    padded = resize_masks_to_input([wide, mask], (8, 8), longest_side=True)
    assert padded.shape == (2, 8, 8)
    assert padded[0, :4, :4].eq(1).all() and padded[0, :4, 4:].eq(0).all() and padded[0, 4:].eq(0).all()
    assert torch.equal(padded[1], torch.kron(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(4, 4)))


def test_resize_longest_side_shape():
    assert resize_longest_side_shape(50, 100, 8) == (4, 8)
    assert resize_longest_side_shape(480, 640, 1024) == (768, 1024)
    assert resize_longest_side_shape(3, 1000, 256) == (1, 256)  # 0.768 rounds half up to 1


# ---- post-processing -------------------------------------------------------------------------------


def _box_logits():
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :2, :2] = 10.0
    return logits


def test_post_process_without_padding():
    # 4x4 -> 8x8 bilinear: output row/col i reads input (i + 0.5) / 2 - 0.5; rows 0..3 stay > 0
    (mask,) = post_process_masks(_box_logits(), [(8, 8)])
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    (same,) = post_process_masks(_box_logits(), torch.tensor([[8, 8]]))
    assert torch.equal(same, expected)


def test_post_process_with_padding_crops_valid_region():
    # Original 50x100 image, SAM-style input 8x8: resized to 4x8 and padded (rows 4..7).
    # Logits 4x4 over the padded input are positive on the left half of the valid rows (0..1)
    # and of the first padding row (2): upsampled to 8x8 and cropped to 4x8, the left 4 columns
    # are positive on every row; resized to 50x100 the boundary falls between columns 49 and 50.
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :3, :2] = 10.0
    (mask,) = post_process_masks(logits, [(50, 100)], input_size=8, valid_sizes=[(4, 8)])
    expected = torch.zeros(50, 100, dtype=torch.bool)
    expected[:, :50] = True
    assert mask.shape == (50, 100) and torch.equal(mask, expected)
    # ignoring the padding would squeeze the object into the top rows instead
    (naive,) = post_process_masks(logits, [(50, 100)])
    assert not naive[-1].any()


def test_post_process_threshold_and_errors():
    logits = torch.full((2, 2, 2), math.log(0.4 / 0.6))  # sigmoid = 0.4
    assert not post_process_masks(logits, [(2, 2), (3, 3)])[0].any()
    low = post_process_masks(logits, [(2, 2), (3, 3)], threshold=0.35)
    assert low[0].all() and low[1].shape == (3, 3)
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_masks(logits, [(2, 2)])
    with pytest.raises(ValueError, match="input_size"):
        post_process_masks(logits, [(2, 2), (2, 2)], valid_sizes=[(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="logits"):
        post_process_masks(torch.zeros(2, 2), [(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="threshold"):
        post_process_masks(logits, [(2, 2), (2, 2)], threshold=1.5)


class _DemoProcessor(ReferringSegmentationProcessorMixin, ProcessorMixin):
    def __init__(self, image_processor=None, threshold=0.5, **kwargs):
        self.threshold = threshold
        super().__init__(image_processor, **kwargs)


class _PaddedProcessor(ReferringSegmentationProcessorMixin):
    padded_input_size = 8


def test_mixin_prepare_and_post_process():
    processor = _DemoProcessor(CLIPImageProcessorPil(), threshold=0.35)
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_referring_segmentation(torch.zeros(1, 2, 2))
    image = Image.new("RGB", (6, 4))
    inputs = processor.prepare_referring_inputs(image, ["a", "b"], masks=[np.ones((4, 6)), np.zeros((4, 6))])
    assert inputs.texts == ["a", "b"] and inputs.image_indices == [0, 0]
    assert inputs.original_sizes.tolist() == [[4, 6], [4, 6]]
    assert inputs.masks[0].all() and not inputs.masks[1].any()

    logits = torch.full((2, 2, 2), math.log(0.4 / 0.6))  # sigmoid 0.4: above 0.35, below 0.5
    for outputs in (logits, ReferringSegmentationOutput(logits=logits), {"logits": logits}):
        with pytest.raises(ValueError, match="target_sizes"):  # the processor keeps no sizes between calls
            processor.post_process_referring_segmentation(outputs)
        masks = processor.post_process_referring_segmentation(outputs, inputs.original_sizes)
        assert [m.shape for m in masks] == [(4, 6), (4, 6)] and all(m.all() for m in masks)
    masks = processor.post_process_referring_segmentation(logits, target_sizes=[(3, 3), (5, 5)], threshold=0.5)
    assert [m.shape for m in masks] == [(3, 3), (5, 5)] and not any(m.any() for m in masks)
    with pytest.raises(ValueError, match="outputs"):
        processor.post_process_referring_segmentation(ReferringSegmentationOutput())
    with pytest.raises(ValueError, match="text"):
        processor.prepare_referring_inputs(image, "")
    with pytest.raises(ValueError, match="masks"):
        processor.prepare_referring_inputs(image, ["a", "b"], masks=[np.ones((4, 6))])


def test_mixin_padded_geometry():
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :3, :2] = 10.0
    (mask,) = _PaddedProcessor().post_process_referring_segmentation(logits, target_sizes=[(50, 100)])
    assert mask[:, :50].all() and not mask[:, 50:].any()


def test_mixin_threshold_round_trips_through_save(tmp_path):
    processor = _DemoProcessor(CLIPImageProcessorPil(), threshold=0.35)
    processor.prepare_referring_inputs(Image.new("RGB", (3, 3)), "a")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["threshold"] == 0.35 and "_last_original_sizes" not in saved
    assert _DemoProcessor.from_pretrained(tmp_path).threshold == 0.35
