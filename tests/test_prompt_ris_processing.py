"""PromptRisProcessor: two pixel tensors in one letterboxed frame (SAM's own processing, CLIP's processing at its
size), labels in SAM's padded frame, masks back at the original sizes, the fixed word length, errors, round trip."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from refseg import PromptRisModel, PromptRisProcessor
from refseg.presets import PRESETS, get_config
from refseg.processing_utils import resize_longest_side_shape

CLIP_SIZE = 64  # the tiny preset's CLIP input (8x8 tokens)
SAM_SIZE = 256  # the tiny SAM's input side (16x16 grid, mask frame 64x64)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    return PromptRisProcessor.from_backbones(clip=tiny_backbones["clip"], sam=tiny_backbones["sam"],
                                             image_size=CLIP_SIZE)


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(0)
    model = PromptRisModel.from_backbones(clip=tiny_backbones["clip"], sam=tiny_backbones["sam"],
                                          **PRESETS["prompt-ris-tiny"].config_overrides)
    model.set_training_stage("end_to_end")
    return model.eval()


def solid_image(height, width, color=(200, 40, 10)):
    return Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8))


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_defaults_match_the_model_and_the_paper(processor, model, tiny_backbones):
    assert processor.image_size == model.config.image_size == CLIP_SIZE
    assert processor.sam_image_size == processor.padded_input_size == model.config.sam_image_size == SAM_SIZE
    assert processor.word_length == model.config.word_length == 20
    assert processor.threshold == model.config.threshold == 0.5
    default = PromptRisProcessor.from_backbones(clip=tiny_backbones["clip"], sam=tiny_backbones["sam"])
    assert default.image_size == 30 * 8  # 30 x the patch size, the paper's 30x30 grid
    paper = get_config("prompt-ris-b")
    assert (paper.image_size, paper.grid_size, paper.sam_image_size, paper.mask_size) == (480, 30, 1024, 256)
    bare = PromptRisProcessor(processor.image_processor, processor.sam_image_processor, processor.tokenizer)
    assert (bare.image_size, bare.sam_image_size, bare.word_length, bare.threshold) == (480, 1024, 20, 0.5)
    assert processor.model_input_names == ["pixel_values", "sam_pixel_values", "input_ids", "attention_mask"]


@pytest.mark.parametrize("height, width", [(47, 61), (300, 200), (256, 256), (1000, 3)])
def test_sam_pixel_values_are_sams_own(processor, tiny_backbones, height, width):
    image = noise_image(height, width)
    expected = AutoImageProcessor.from_pretrained(tiny_backbones["sam"])(image, return_tensors="pt")
    ours = processor(images=image, text="the red circle")["sam_pixel_values"]
    assert ours.shape == (1, 3, SAM_SIZE, SAM_SIZE)
    assert torch.equal(ours, expected["pixel_values"])


@pytest.mark.parametrize("height, width", [(47, 61), (300, 200), (64, 64), (1000, 3)])
def test_clip_pixel_values_are_clips_processing_letterboxed_like_sam(processor, tiny_backbones, height, width):
    image = noise_image(height, width)
    inputs = processor(images=image, text="the red circle")
    ours, sam = inputs["pixel_values"][0], inputs["sam_pixel_values"][0]
    assert ours.shape == (3, CLIP_SIZE, CLIP_SIZE)
    h, w = resize_longest_side_shape(height, width, CLIP_SIZE)
    clip = AutoImageProcessor.from_pretrained(tiny_backbones["clip"])  # the checkpoint's own CLIP processing
    expected = clip(image, size={"height": h, "width": w}, do_center_crop=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours[:, :h, :w], expected[0])  # top-left: CLIP's own resize and normalisation
    assert not ours[:, h:].any() and not ours[:, :, w:].any()  # bottom/right: zeros (CLIP's mean colour)
    # the same frame as SAM's: the image covers the same share of both squares (to a pixel of either)
    sam_h, sam_w = resize_longest_side_shape(height, width, SAM_SIZE)
    assert sam[:, sam_h - 1, :sam_w].abs().sum() > 0 and not sam[:, sam_h:].any() and not sam[:, :, sam_w:].any()
    assert abs(h / CLIP_SIZE - sam_h / SAM_SIZE) <= 1 / CLIP_SIZE and abs(w / CLIP_SIZE - sam_w / SAM_SIZE) <= 1 / CLIP_SIZE


def test_solid_colour_uses_clips_statistics(processor):
    pixel_values = processor(images=solid_image(30, 50), text="a")["pixel_values"][0]  # 30x50 -> 38x64
    expected = (torch.tensor([200, 40, 10]) / 255.0 - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(pixel_values[:, 5, 5], expected, atol=2e-2, rtol=0)
    assert not pixel_values[:, 38:].any() and pixel_values[:, 37].abs().sum() > 0


def test_labels_are_in_sams_padded_frame(processor):
    mask = np.zeros((30, 50), dtype=bool)
    mask[:15, :25] = True  # the top-left quarter
    mask[29, 49] = True  # the bottom-right pixel
    labels = processor(images=solid_image(30, 50), text="a", masks=[mask])["labels"]
    assert labels.shape == (1, SAM_SIZE, SAM_SIZE) and labels.dtype == torch.float32
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    # scale 256 / 50 = 5.12: the image covers rows 0..153; the quarter rows 0..76, columns 0..127
    assert labels[0, :76, :127].min() == 1 and labels[0, 78:148, :].max() == 0 and labels[0, :76, 129:250].max() == 0
    assert labels[0, 150:154, 252:].min() == 1
    assert labels[0, 154:].max() == 0  # the padding rows


def test_one_image_with_several_expressions_gives_repeated_rows(processor, model):
    image = noise_image(30, 50)
    mask = np.zeros((30, 50), dtype=bool)
    mask[:15, :25] = True
    texts = ["the red circle", "the square on the far left", "blue thing"]
    inputs = processor(images=image, text=texts, masks=[mask, ~mask, mask])
    assert set(inputs) == {"pixel_values", "sam_pixel_values", "input_ids", "attention_mask", "labels",
                           "original_sizes"}
    for name in ("pixel_values", "sam_pixel_values"):
        assert inputs[name].shape[0] == 3
        assert torch.equal(inputs[name][0], inputs[name][1]) and torch.equal(inputs[name][0], inputs[name][2])
    assert inputs["original_sizes"].tolist() == [[30, 50]] * 3
    # N images with lists of expressions: each row holds its own image, in both tensors
    nested = processor(images=[image, noise_image(40, 20, 3)], text=[texts[:2], texts[2:]])
    for name in ("pixel_values", "sam_pixel_values"):
        rows = nested[name]
        assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])
        assert torch.equal(rows[0], inputs[name][0])
    assert nested["original_sizes"].tolist() == [[30, 50], [30, 50], [40, 20]]
    original_sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (3, 64, 64) and outputs.coarse_logits.shape == (3, 8, 8)
    masks = processor.post_process_referring_segmentation(outputs, original_sizes)
    assert [tuple(m.shape) for m in masks] == [(30, 50)] * 3 and all(m.dtype == torch.bool for m in masks)


@pytest.mark.parametrize(
    "image",
    [Image.new("L", (37, 23), 128), Image.new("RGBA", (23, 37), (10, 20, 30, 128)), Image.new("I;16", (13, 61)),
     np.zeros((17, 29), dtype=np.uint8), Image.new("RGB", (300, 1), (200, 40, 10)), Image.new("P", (5, 3))],
    ids=["L", "RGBA", "I16", "numpy-gray", "300x1", "P"],
)
def test_any_mode_and_size_gives_masks_of_the_original_size(processor, model, image):
    inputs = processor(images=image, text="the red circle")
    original_sizes = inputs.pop("original_sizes")
    height, width = image.shape if isinstance(image, np.ndarray) else (image.height, image.width)
    assert original_sizes.tolist() == [[height, width]]
    with torch.no_grad():
        masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    assert masks[0].shape == (height, width) and masks[0].dtype == torch.bool


def test_post_processing_crops_sams_padding_and_thresholds_at_one_half(processor):
    # a 10x20 image fills rows 0..127 of the 256 input: rows 0..31 of the 64x64 logits
    logits = torch.full((1, 64, 64), 0.2)  # sigmoid(0.2) = 0.55 > 0.5
    logits[0, :, :32] = -0.2  # sigmoid(-0.2) = 0.45
    logits[0, 32:] = -10.0  # the padding: would pull the bottom rows to background if it were not cropped
    (mask,) = processor.post_process_referring_segmentation(logits, [[10, 20]])
    assert mask.shape == (10, 20)
    assert mask[:, :9].sum() == 0 and mask[:, 11:].all()
    (strict,) = processor.post_process_referring_segmentation(logits, [[10, 20]], threshold=0.6)
    assert not strict.any()
    (tall,) = processor.post_process_referring_segmentation(logits.transpose(1, 2), [[20, 10]])  # padding at the right
    assert torch.equal(tall, mask.T)


def test_expressions_are_padded_and_truncated_to_the_word_length(processor):
    tokenizer = processor.tokenizer
    long = "the small red circle to the left of the big blue square above the green star on the far right side"
    inputs = processor(images=solid_image(20, 30), text=["red circle", long])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (2, 20)
    assert mask[0].tolist() == [1, 1, 1, 1] + [0] * 16  # [SOS] red circle [EOS], then padding
    assert mask[1].all()
    for row in range(2):
        assert ids[row, 0] == tokenizer.bos_token_id
        assert ids[row, mask[row].sum() - 1] == tokenizer.eos_token_id  # truncation keeps the [EOS]
    assert processor(images=solid_image(8, 8), text="red circle")["input_ids"].shape == (1, 20)  # padded alone too
    for name, value in (("max_length", 5), ("padding", "longest"), ("truncation", False)):
        with pytest.raises(ValueError, match=name):
            processor(images=solid_image(8, 8), text="a", **{name: value})


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"images": solid_image(8, 8), "text": ""}, "text"),
        ({"images": solid_image(8, 8), "text": None}, "text"),
        ({"images": None, "text": "a"}, "images"),
        ({"images": [solid_image(8, 8), solid_image(8, 8)], "text": ["a", "b", "c"]}, "images"),
        ({"images": solid_image(8, 8), "text": "a", "masks": [np.zeros((8, 9), bool)]}, "masks"),
        ({"images": {"not": "an image"}, "text": "a"}, "images"),
    ],
    ids=["empty-text", "no-text", "no-images", "unpaired", "mask-size", "not-an-image"],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(processor, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        processor(**kwargs)


def test_settings_validate_save_and_reload(processor, tmp_path):
    parts = (processor.image_processor, processor.sam_image_processor, processor.tokenizer)
    for kwargs, name in [({"word_length": 2}, "word_length"), ({"image_size": 0}, "image_size"),
                         ({"sam_image_size": 0}, "sam_image_size"), ({"threshold": 1.0}, "threshold")]:
        with pytest.raises(ValueError, match=name):
            PromptRisProcessor(*parts, **kwargs)
    custom = PromptRisProcessor(*parts, image_size=CLIP_SIZE, sam_image_size=SAM_SIZE, word_length=25, threshold=0.4)
    custom.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, PromptRisProcessor)
    assert (loaded.image_size, loaded.sam_image_size, loaded.padded_input_size, loaded.word_length,
            loaded.threshold) == (CLIP_SIZE, SAM_SIZE, SAM_SIZE, 25, 0.4)
    image = noise_image(33, 47)
    mask = np.zeros((33, 47), dtype=bool)
    mask[3:20, 10:30] = True
    texts = ["the blue hexagon", "the third thing from the left"]
    a = custom(images=image, text=texts, masks=[mask, mask])
    b = loaded(images=image, text=texts, masks=[mask, mask])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
