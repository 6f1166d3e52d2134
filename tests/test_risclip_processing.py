"""RisclipProcessor: CLIP preprocessing at the model size, pairing, labels, post-processing, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from refseg import RisclipModel, RisclipProcessor
from refseg.presets import PRESETS

SIZE = 64
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    return RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=SIZE)


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(0)
    return RisclipModel.from_backbones(clip=tiny_backbones["clip"], **PRESETS["risclip-tiny"].config_overrides).eval()


def solid_image(height, width, color=(200, 40, 10)):
    return Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8))


def test_default_image_size_matches_the_models(tiny_backbones):
    processor = RisclipProcessor.from_backbones(clip=tiny_backbones["clip"])
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"])
    assert processor.image_size == model.config.image_size == 40 * 8


def test_outputs_for_one_image_with_several_expressions(processor):
    image = solid_image(30, 50)
    mask = np.zeros((30, 50), dtype=bool)
    mask[:15, :25] = True  # the top-left quarter
    texts = ["the red circle", "the square on the far left", "blue thing"]
    inputs = processor(images=image, text=texts, masks=[mask, ~mask, mask])
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask", "labels", "original_sizes"}
    assert inputs["pixel_values"].shape == (3, 3, SIZE, SIZE)
    # resized straight to 64x64 (no crop): a solid image stays solid, normalised with CLIP's mean/std
    expected = (torch.tensor([200, 40, 10]) / 255.0 - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(inputs["pixel_values"][0, :, 5, 5], expected, atol=0.02)
    assert torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][2])
    assert inputs["input_ids"].shape[0] == 3 and inputs["attention_mask"].sum(-1).tolist()[0] < inputs["input_ids"].shape[1]
    assert inputs["original_sizes"].tolist() == [[30, 50]] * 3
    labels = inputs["labels"]
    assert labels.shape == (3, SIZE, SIZE) and labels.dtype == torch.float32
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    assert labels[0, :32, :32].min() == 1 and labels[0, 32:, :].max() == 0
    assert torch.equal(labels[1], 1 - labels[0])


def test_model_runs_on_the_processor_output(processor, model):
    inputs = processor(images=[solid_image(40, 40), solid_image(20, 90)], text=["the red circle", "blue thing"])
    original_sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (2, SIZE, SIZE)
    masks = processor.post_process_referring_segmentation(outputs, original_sizes)
    assert [tuple(m.shape) for m in masks] == [(40, 40), (20, 90)]
    assert all(m.dtype == torch.bool for m in masks)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (37, 23), 128),
        Image.new("RGBA", (23, 37), (10, 20, 30, 128)),
        Image.new("P", (101, 7)),
        Image.new("I;16", (13, 61)),
        Image.new("CMYK", (45, 45)),
        np.zeros((17, 29), dtype=np.uint8),
    ],
    ids=["L", "RGBA", "P", "I16", "CMYK", "numpy-gray"],
)
def test_any_mode_and_size_gives_masks_of_the_original_size(processor, model, image):
    inputs = processor(images=image, text="the red circle")
    original_sizes = inputs.pop("original_sizes")
    height, width = (image.shape if isinstance(image, np.ndarray) else (image.height, image.width))
    assert original_sizes.tolist() == [[height, width]]
    with torch.no_grad():
        masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    assert masks[0].shape == (height, width) and masks[0].dtype == torch.bool


def test_post_processing_threshold(processor):
    logits = torch.full((1, SIZE, SIZE), -1.0)
    logits[0, :, SIZE // 2:] = 1.0  # right half foreground
    (mask,) = processor.post_process_referring_segmentation(logits, [[10, 20]])
    assert mask[:, :9].sum() == 0 and mask[:, 11:].all()
    (lenient,) = processor.post_process_referring_segmentation(logits, [[10, 20]], threshold=0.2)
    assert lenient.all()  # sigmoid(-1) = 0.27 > 0.2


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"images": solid_image(8, 8), "text": ""}, "text"),
        ({"images": solid_image(8, 8), "text": ["the circle", "   "]}, "text"),
        ({"images": [solid_image(8, 8), solid_image(8, 8)], "text": ["a", "b", "c"]}, "images"),
        ({"images": solid_image(8, 8), "text": "a", "masks": [np.zeros((8, 9), bool)]}, "masks"),
        ({"images": solid_image(8, 8), "text": ["a", "b"], "masks": [np.zeros((8, 8), bool)]}, "masks"),
        ({"images": {"not": "an image"}, "text": "a"}, "images"),
        ({"images": None, "text": "a"}, "images"),
    ],
    ids=["empty-text", "blank-text", "unpaired", "mask-size", "mask-count", "not-an-image", "no-image"],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(processor, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        processor(**kwargs)


def test_save_and_reload(processor, tmp_path):
    strict = RisclipProcessor(processor.image_processor, processor.tokenizer, image_size=SIZE, threshold=0.7)
    strict.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RisclipProcessor)
    assert loaded.image_size == SIZE and loaded.threshold == 0.7
    image = solid_image(33, 47, (5, 100, 250))
    a = strict(images=image, text=["the blue hexagon", "the third thing from the left"])
    b = loaded(images=image, text=["the blue hexagon", "the third thing from the left"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_constructor_validates_settings(processor):
    with pytest.raises(ValueError, match="image_size"):
        RisclipProcessor(processor.image_processor, processor.tokenizer, image_size=0)
    with pytest.raises(ValueError, match="threshold"):
        RisclipProcessor(processor.image_processor, processor.tokenizer, threshold=1.5)
