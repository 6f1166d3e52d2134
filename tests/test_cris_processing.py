"""CrisProcessor: CLIP preprocessing at the model size, fixed word length, pairing, post-processing, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from refseg import CrisModel, CrisProcessor
from refseg.presets import PRESETS

SIZE = 64
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    return CrisProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=SIZE)


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(0)
    return CrisModel.from_backbones(clip=tiny_backbones["clip"], **PRESETS["cris-tiny"].config_overrides).eval()


def solid_image(height, width, color=(200, 40, 10)):
    return Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8))


def test_defaults_match_the_model_and_the_paper(tiny_backbones):
    processor = CrisProcessor.from_backbones(clip=tiny_backbones["clip"])
    model = CrisModel.from_backbones(clip=tiny_backbones["clip"])
    assert processor.image_size == model.config.image_size == 26 * 8
    assert processor.word_length == model.config.word_length == 17
    assert processor.threshold == model.config.threshold == 0.35


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
    refseg = CrisProcessor(processor.image_processor, tokenizer, image_size=SIZE, word_length=22)
    assert refseg(images=solid_image(8, 8), text=long)["input_ids"].shape == (1, 22)
    with pytest.raises(ValueError, match="max_length"):
        processor(images=solid_image(8, 8), text="a", max_length=5)


def test_one_image_with_several_expressions(processor, model):
    image = solid_image(30, 50)
    mask = np.zeros((30, 50), dtype=bool)
    mask[:15, :25] = True
    texts = ["the red circle", "the square on the far left", "blue thing"]
    inputs = processor(images=image, text=texts, masks=[mask, ~mask, mask])
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask", "labels", "original_sizes"}
    assert inputs["pixel_values"].shape == (3, 3, SIZE, SIZE)
    expected = (torch.tensor([200, 40, 10]) / 255.0 - CLIP_MEAN) / CLIP_STD  # resized, not cropped
    assert torch.allclose(inputs["pixel_values"][0, :, 5, 5], expected, atol=0.02)
    assert torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][2])
    assert inputs["original_sizes"].tolist() == [[30, 50]] * 3
    labels = inputs["labels"]
    assert labels.shape == (3, SIZE, SIZE) and labels[0, :32, :32].min() == 1 and labels[0, 32:].max() == 0
    # the model runs its image tower once for the three expressions
    calls = []
    hook = model.clip.vision_model.register_forward_hook(
        lambda _m, _a, kwargs, _o: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    original_sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**inputs)
    hook.remove()
    assert calls == [1]
    assert outputs.logits.shape == (3, 32, 32)  # 4x the 8x8 grid
    masks = processor.post_process_referring_segmentation(outputs, original_sizes)
    assert [tuple(m.shape) for m in masks] == [(30, 50)] * 3 and all(m.dtype == torch.bool for m in masks)


@pytest.mark.parametrize(
    "image",
    [Image.new("L", (37, 23), 128), Image.new("RGBA", (23, 37), (10, 20, 30, 128)), Image.new("I;16", (13, 61)),
     np.zeros((17, 29), dtype=np.uint8)],
    ids=["L", "RGBA", "I16", "numpy-gray"],
)
def test_any_mode_and_size_gives_masks_of_the_original_size(processor, model, image):
    inputs = processor(images=image, text="the red circle")
    original_sizes = inputs.pop("original_sizes")
    height, width = image.shape if isinstance(image, np.ndarray) else (image.height, image.width)
    with torch.no_grad():
        masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    assert masks[0].shape == (height, width) and masks[0].dtype == torch.bool


def test_post_processing_uses_the_papers_threshold(processor):
    logits = torch.full((1, 32, 32), -0.5)  # sigmoid(-0.5) = 0.38 > 0.35
    logits[0, :, :16] = -1.0  # sigmoid(-1) = 0.27
    (mask,) = processor.post_process_referring_segmentation(logits, [[10, 20]])
    assert mask[:, :9].sum() == 0 and mask[:, 11:].all()
    (strict,) = processor.post_process_referring_segmentation(logits, [[10, 20]], threshold=0.5)
    assert not strict.any()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"images": solid_image(8, 8), "text": ""}, "text"),
        ({"images": solid_image(8, 8), "text": ["the circle", "   "]}, "text"),
        ({"images": [solid_image(8, 8), solid_image(8, 8)], "text": ["a", "b", "c"]}, "images"),
        ({"images": solid_image(8, 8), "text": "a", "masks": [np.zeros((8, 9), bool)]}, "masks"),
        ({"images": solid_image(8, 8), "text": ["a", "b"], "masks": [np.zeros((8, 8), bool)]}, "masks"),
        ({"images": {"not": "an image"}, "text": "a"}, "images"),
    ],
    ids=["empty-text", "blank-text", "unpaired", "mask-size", "mask-count", "not-an-image"],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(processor, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        processor(**kwargs)


def test_settings_validate_save_and_reload(processor, tmp_path):
    for kwargs, name in [({"word_length": 2}, "word_length"), ({"image_size": 0}, "image_size"),
                         ({"threshold": 1.5}, "threshold")]:
        with pytest.raises(ValueError, match=name):
            CrisProcessor(processor.image_processor, processor.tokenizer, **kwargs)
    custom = CrisProcessor(processor.image_processor, processor.tokenizer, image_size=SIZE, word_length=22,
                           threshold=0.4)
    custom.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CrisProcessor)
    assert (loaded.image_size, loaded.word_length, loaded.threshold) == (SIZE, 22, 0.4)
    image = solid_image(33, 47, (5, 100, 250))
    a = custom(images=image, text=["the blue hexagon", "the third thing from the left"])
    b = loaded(images=image, text=["the blue hexagon", "the third thing from the left"])
    assert all(torch.equal(a[k], b[k]) for k in a)
