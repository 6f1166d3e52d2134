"""RisamProcessor: SAM's own geometry (resize the longest side, normalise, pad bottom/right), labels in the
padded frame, masks back at the original sizes, the fixed word length, the paper's threshold, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from refseg import RisamModel, RisamProcessor
from refseg.presets import PRESETS, get_config

SIZE = 256  # the tiny SAM's input side (16x16 grid, logits 64x64)
SAM_MEAN = torch.tensor([0.485, 0.456, 0.406])
SAM_STD = torch.tensor([0.229, 0.224, 0.225])

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    return RisamProcessor.from_backbones(sam=tiny_backbones["sam"], clip=tiny_backbones["clip"])


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(0)
    return RisamModel.from_backbones(sam=tiny_backbones["sam"], clip=tiny_backbones["clip"],
                                     **PRESETS["risam-tiny"].config_overrides).eval()


def solid_image(height, width, color=(200, 40, 10)):
    return Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8))


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_defaults_match_the_model_and_the_paper(processor, model):
    assert processor.image_size == processor.padded_input_size == model.config.image_size == SIZE
    assert processor.word_length == model.config.word_length == 17  # RefCOCO's maximum word number
    assert processor.threshold == model.config.threshold == 0.35  # the paper's binarisation threshold
    assert get_config("risam-h").image_size == 1024  # SAM's own input size at paper scale
    bare = RisamProcessor(processor.image_processor, processor.tokenizer)
    assert (bare.image_size, bare.word_length, bare.threshold) == (1024, 17, 0.35)


@pytest.mark.parametrize("height, width", [(47, 61), (300, 200), (256, 256), (1000, 3)])
def test_pixel_values_are_sams_own(processor, tiny_backbones, height, width):
    image = noise_image(height, width)
    sam = AutoImageProcessor.from_pretrained(tiny_backbones["sam"])  # the checkpoint's own SamImageProcessor
    expected = sam(image, return_tensors="pt")
    ours = processor(images=image, text="the red circle")["pixel_values"]
    assert ours.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(ours, expected["pixel_values"])
    # padding bottom/right: the resized image sits top-left, zeros (after normalisation) elsewhere
    resized_h, resized_w = expected["reshaped_input_sizes"][0].tolist()
    assert max(resized_h, resized_w) == SIZE
    assert not ours[0, :, resized_h:, :].any() and not ours[0, :, :, resized_w:].any()
    assert ours[0, :, resized_h - 1, :resized_w].abs().sum() > 0  # the last image row and column are not padding
    assert ours[0, :, :resized_h, resized_w - 1].abs().sum() > 0


def test_solid_colour_is_normalised_with_sams_statistics_and_padded(processor):
    inputs = processor(images=solid_image(30, 50), text="a")  # 30x50 -> 154x256, then rows 154.. padded
    expected = (torch.tensor([200, 40, 10]) / 255.0 - SAM_MEAN) / SAM_STD
    pixel_values = inputs["pixel_values"][0]
    torch.testing.assert_close(pixel_values[:, 5, 5], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(pixel_values[:, 153, 255], expected, atol=1e-4, rtol=0)
    assert not pixel_values[:, 154:].any()


def test_labels_are_in_the_padded_frame(processor):
    mask = np.zeros((30, 50), dtype=bool)
    mask[:15, :25] = True  # the top-left quarter
    mask[29, 49] = True  # the bottom-right pixel
    labels = processor(images=solid_image(30, 50), text="a", masks=[mask])["labels"]
    assert labels.shape == (1, SIZE, SIZE) and labels.dtype == torch.float32
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    # scale 256 / 50 = 5.12: the image covers rows 0..153 and every column; the quarter rows 0..76, columns 0..127
    assert labels[0, :76, :127].min() == 1 and labels[0, 78:148, :].max() == 0 and labels[0, :76, 129:250].max() == 0
    assert labels[0, 150:154, 252:].min() == 1  # the last pixel lands at the bottom-right of the resized image
    assert labels[0, 154:].max() == 0  # the padding rows


def test_one_image_with_several_expressions(processor, model):
    image = solid_image(30, 50)
    mask = np.zeros((30, 50), dtype=bool)
    mask[:15, :25] = True
    texts = ["the red circle", "the square on the far left", "blue thing"]
    inputs = processor(images=image, text=texts, masks=[mask, ~mask, mask])
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask", "labels", "original_sizes"}
    assert inputs["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][1])
    assert torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][2])
    assert inputs["original_sizes"].tolist() == [[30, 50]] * 3
    assert torch.equal(inputs["labels"][1, :154], 1 - inputs["labels"][0, :154])
    # the model runs SAM once for the three expressions
    calls = []
    hook = model.sam.register_forward_hook(lambda _m, _a, kwargs, _o: calls.append(kwargs["pixel_values"].shape[0]),
                                           with_kwargs=True)
    original_sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**inputs)
    hook.remove()
    assert calls == [1]
    assert outputs.logits.shape == (3, 64, 64)  # 4x the 16x16 grid
    assert set(outputs.loss_dict) == {"focal", "dice"}
    masks = processor.post_process_referring_segmentation(outputs, original_sizes)
    assert [tuple(m.shape) for m in masks] == [(30, 50)] * 3 and all(m.dtype == torch.bool for m in masks)


@pytest.mark.parametrize(
    "image",
    [Image.new("L", (37, 23), 128), Image.new("RGBA", (23, 37), (10, 20, 30, 128)), Image.new("I;16", (13, 61)),
     np.zeros((17, 29), dtype=np.uint8), Image.new("RGB", (300, 1), (200, 40, 10)),
     Image.new("RGB", (1, 300), (200, 40, 10)), Image.new("RGB", (600, 1)), Image.new("P", (5, 3))],
    ids=["L", "RGBA", "I16", "numpy-gray", "1x300", "300x1", "1x600", "P"],
)
def test_any_mode_and_size_gives_masks_of_the_original_size(processor, model, image):
    inputs = processor(images=image, text="the red circle")
    original_sizes = inputs.pop("original_sizes")
    height, width = image.shape if isinstance(image, np.ndarray) else (image.height, image.width)
    assert original_sizes.tolist() == [[height, width]]
    assert inputs["pixel_values"].shape == (1, 3, SIZE, SIZE)
    with torch.no_grad():
        masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    assert masks[0].shape == (height, width) and masks[0].dtype == torch.bool


@pytest.mark.parametrize("width", [300, 600])  # 600: 1 x 256 / 600 rounds to 0 rows, kept at one
def test_a_one_pixel_high_image_keeps_one_row(processor, width):
    inputs = processor(images=solid_image(1, width), text="a", masks=[np.ones((1, width), dtype=bool)])
    assert inputs["pixel_values"][0, :, 0].abs().sum() > 0 and not inputs["pixel_values"][0, :, 1:].any()
    assert inputs["labels"][0, 0].min() == 1 and inputs["labels"][0, 1:].max() == 0


def test_post_processing_crops_the_padding_and_uses_the_papers_threshold(processor):
    # a 10x20 image fills rows 0..127 of the 256 input: rows 0..31 of the 64x64 logits
    logits = torch.full((1, 64, 64), -0.5)  # sigmoid(-0.5) = 0.38 > 0.35
    logits[0, :, :32] = -1.0  # sigmoid(-1) = 0.27
    logits[0, 32:] = 10.0  # the padding: would be foreground if it were not cropped
    (mask,) = processor.post_process_referring_segmentation(logits, [[10, 20]])
    assert mask.shape == (10, 20)
    assert mask[:, :9].sum() == 0 and mask[:, 11:].all()
    (strict,) = processor.post_process_referring_segmentation(logits, [[10, 20]], threshold=0.5)
    assert not strict.any()
    (tall,) = processor.post_process_referring_segmentation(logits.transpose(1, 2), [[20, 10]])  # padding at the right
    assert torch.equal(tall, mask.T)


def test_expressions_are_padded_and_truncated_to_the_word_length(processor):
    tokenizer = processor.tokenizer
    long = "the small red circle to the left of the big blue square above the green star on the far right side"
    inputs = processor(images=solid_image(20, 30), text=["red circle", long])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (2, 17)
    assert mask[0].tolist() == [1, 1, 1, 1] + [0] * 13  # [SOS] red circle [EOS], then padding
    assert mask[1].all()  # truncated to 17 tokens
    for row in range(2):
        assert ids[row, 0] == tokenizer.bos_token_id
        assert ids[row, mask[row].sum() - 1] == tokenizer.eos_token_id  # truncation keeps the [EOS]
    refcocog = RisamProcessor(processor.image_processor, tokenizer, image_size=SIZE, word_length=25)
    assert refcocog(images=solid_image(8, 8), text=long)["input_ids"].shape == (1, 25)
    for name, value in (("max_length", 5), ("padding", "longest"), ("truncation", False)):
        with pytest.raises(ValueError, match=name):
            processor(images=solid_image(8, 8), text="a", **{name: value})


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"images": solid_image(8, 8), "text": ""}, "text"),
        ({"images": solid_image(8, 8), "text": ["the circle", "   "]}, "text"),
        ({"images": solid_image(8, 8), "text": None}, "text"),
        ({"images": None, "text": "a"}, "images"),
        ({"images": [solid_image(8, 8), solid_image(8, 8)], "text": ["a", "b", "c"]}, "images"),
        ({"images": solid_image(8, 8), "text": "a", "masks": [np.zeros((8, 9), bool)]}, "masks"),
        ({"images": solid_image(8, 8), "text": ["a", "b"], "masks": [np.zeros((8, 8), bool)]}, "masks"),
        ({"images": {"not": "an image"}, "text": "a"}, "images"),
    ],
    ids=["empty-text", "blank-text", "no-text", "no-images", "unpaired", "mask-size", "mask-count", "not-an-image"],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(processor, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        processor(**kwargs)


def test_settings_validate_save_and_reload(processor, tmp_path):
    for kwargs, name in [({"word_length": 2}, "word_length"), ({"image_size": 0}, "image_size"),
                         ({"threshold": 1.5}, "threshold"), ({"threshold": 0.0}, "threshold")]:
        with pytest.raises(ValueError, match=name):
            RisamProcessor(processor.image_processor, processor.tokenizer, **kwargs)
    custom = RisamProcessor(processor.image_processor, processor.tokenizer, image_size=SIZE, word_length=25,
                            threshold=0.4)
    custom.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RisamProcessor)
    assert (loaded.image_size, loaded.padded_input_size, loaded.word_length, loaded.threshold) == (SIZE, SIZE, 25, 0.4)
    image = noise_image(33, 47)
    mask = np.zeros((33, 47), dtype=bool)
    mask[3:20, 10:30] = True
    texts = ["the blue hexagon", "the third thing from the left"]
    a = custom(images=image, text=texts, masks=[mask, mask])
    b = loaded(images=image, text=texts, masks=[mask, mask])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    logits = torch.randn(2, 64, 64)
    ours = custom.post_process_referring_segmentation(logits, a["original_sizes"])
    theirs = loaded.post_process_referring_segmentation(logits, b["original_sizes"])
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs))
