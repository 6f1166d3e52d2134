"""CRIS's protocol options taken from the authors' code: letterbox preprocessing and its inverse, soft
(bilinearly resized) loss targets, their optimiser groups; each an option, off by default, on in the `cris-b`
paper configs."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from refseg import CrisModel, CrisProcessor
from refseg.models.cris.processing_cris import letterbox_geometry

SIZE = 64

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def letterbox(tiny_backbones):
    return CrisProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=SIZE, resize_mode="letterbox")


def solid(height, width, color=(200, 40, 10)):
    return Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8))


def test_letterbox_geometry_by_hand():
    assert letterbox_geometry(40, 80, 64) == (32, 64, 16, 0)  # wide: scale 0.8, 16 rows above and below
    assert letterbox_geometry(80, 40, 64) == (64, 32, 0, 16)  # tall: 16 columns left and right
    assert letterbox_geometry(64, 64, 64) == (64, 64, 0, 0)
    assert letterbox_geometry(3, 1000, 64) == (1, 64, 31, 0)  # never below one pixel


def test_letterboxed_inputs_keep_the_aspect_and_pad_with_the_mean(letterbox):
    mask = np.zeros((40, 80), bool)
    mask[10:30, 20:60] = True
    out = letterbox(images=solid(40, 80), text="the thing", masks=[mask])
    pixels, labels = out["pixel_values"][0], out["labels"][0]
    assert pixels.shape == (3, SIZE, SIZE) and labels.shape == (SIZE, SIZE)
    # padding rows are CLIP's mean colour: exactly 0 after normalisation
    assert pixels[:, :16].abs().max() == 0 and pixels[:, 48:].abs().max() == 0
    # the image region is the solid colour, normalised
    mean = torch.tensor(letterbox.image_processor.image_mean)[:, None, None]
    std = torch.tensor(letterbox.image_processor.image_std)[:, None, None]
    expected = (torch.tensor([200, 40, 10])[:, None, None] / 255 - mean) / std
    torch.testing.assert_close(pixels[:, 16:48], expected.expand(3, 32, 64).float(), atol=1e-5, rtol=0)
    # the mask lands where the image does: rows 10:30 x 0.8 = 8:24, + 16 = 24:40; columns 16:48
    want = torch.zeros(SIZE, SIZE)
    want[24:40, 16:48] = 1
    assert torch.equal(labels, want)


def test_inverse_mapping_returns_to_the_image(letterbox):
    """Round trip: the letterboxed mask read as a logit map at the input size comes back as the original mask;
    a map that is 1 on the padding and 0 on the image comes back as zeros (the padding is cropped)."""
    for height, width, box in [(40, 80, (10, 30, 20, 60)), (80, 40, (20, 60, 10, 30))]:
        mask = np.zeros((height, width), bool)
        top, bottom, left, right = box
        mask[top:bottom, left:right] = True
        labels = letterbox(images=solid(height, width), text="x", masks=[mask])["labels"]
        (back,) = letterbox.post_process_referring_segmentation(10 * (2 * labels - 1), [[height, width]])
        assert back.shape == (height, width) and torch.equal(back, torch.from_numpy(mask))
        new_height, new_width, offset_y, offset_x = letterbox_geometry(height, width, SIZE)
        padding = torch.ones(1, SIZE, SIZE)
        padding[0, offset_y:offset_y + new_height, offset_x:offset_x + new_width] = 0
        (mapped,) = letterbox.map_to_original(padding, [[height, width]])
        assert mapped.shape == (height, width) and mapped.abs().max() == 0
    # from the model's output resolution (a quarter of the input): bilinear to the input first
    quarter = torch.zeros(1, SIZE // 4, SIZE // 4)
    quarter[:, :, SIZE // 8:] = 1.0  # right half of the square
    (mapped,) = letterbox.map_to_original(quarter, [[80, 40]])  # tall: columns 16..48 of the square hold it
    assert mapped.shape == (80, 40) and mapped[:, :16].max() < 0.05 and mapped[:, 24:].min() > 0.95
    torch.testing.assert_close(mapped[:, 19] + mapped[:, 20], torch.ones(80))  # the step centred in the image


def test_letterbox_and_soft_targets_save_reload_and_validate(letterbox, tmp_path):
    for kwargs, name in [({"resize_mode": "crop"}, "resize_mode"), ({"mask_resample": "cubic"}, "mask_resample")]:
        with pytest.raises(ValueError, match=name):
            CrisProcessor(letterbox.image_processor, letterbox.tokenizer, **kwargs)
    custom = CrisProcessor(letterbox.image_processor, letterbox.tokenizer, image_size=SIZE, resize_mode="letterbox",
                           mask_resample="bilinear")
    custom.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.resize_mode, loaded.mask_resample) == ("letterbox", "bilinear")


@pytest.mark.parametrize("resize_mode", ["stretch", "letterbox"])
def test_soft_targets_are_the_bilinearly_resized_mask(tiny_backbones, resize_mode):
    hard = CrisProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=SIZE, resize_mode=resize_mode)
    soft = CrisProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=SIZE, resize_mode=resize_mode,
                                        mask_resample="bilinear")
    mask = np.zeros((10, 20), bool)
    mask[3:7, 5:13] = True
    image = solid(10, 20)
    hard_labels = hard(images=image, text="x", masks=[mask])["labels"][0]
    soft_labels = soft(images=image, text="x", masks=[mask])["labels"][0]
    assert set(hard_labels.unique().tolist()) == {0.0, 1.0}
    fractional = (soft_labels > 0) & (soft_labels < 1)
    assert fractional.any() and soft_labels.min() >= 0 and soft_labels.max() <= 1
    # a bilinear resize by hand: the row through the middle of the box, at the centre of output pixel j
    new_height, new_width, top, left = (SIZE, SIZE, 0, 0) if resize_mode == "stretch" else \
        letterbox_geometry(10, 20, SIZE)
    row = top + new_height // 2
    for j in range(left, left + new_width):
        x = (j - left + 0.5) * 20 / new_width - 0.5  # source coordinate (half-pixel centres)
        x0 = min(max(int(np.floor(x)), 0), 19)
        x1, w = min(x0 + 1, 19), min(max(x - x0, 0.0), 1.0)
        value = (1 - w) * mask[5, x0] + w * mask[5, x1] if x >= 0 else float(mask[5, 0])
        assert soft_labels[row, j].item() == pytest.approx(value, abs=1e-6)
    # the model's loss takes the soft target as it is (sampled at the logits size)
    torch.manual_seed(0)
    model = CrisModel.from_backbones(clip=tiny_backbones["clip"], image_size=SIZE, word_length=17).eval()
    inputs = soft(images=image, text="x", masks=[mask])
    inputs.pop("original_sizes")
    with torch.no_grad():
        out = model(**inputs)
    target = soft_labels[None, 1::2, 1::2]  # nearest-exact from 64 to 32: pixel centres 2j + 1
    expected = -(target * torch.nn.functional.logsigmoid(out.logits)
                 + (1 - target) * torch.nn.functional.logsigmoid(-out.logits)).mean()
    torch.testing.assert_close(out.loss, expected)


def test_the_training_processor_follows_the_protocol_fields(tiny_backbones):
    from refseg.training import get_method
    from refseg.training.modeling import build_model_and_processor

    args = SimpleNamespace(preset="cris-tiny", model_name_or_path=None, clip=str(tiny_backbones["clip"]),
                           config_overrides='{"resize_mode": "letterbox", "mask_resample": "bilinear"}')
    model, processor = build_model_and_processor(get_method("cris"), args)
    assert (model.config.resize_mode, model.config.mask_resample) == ("letterbox", "bilinear")
    assert (processor.resize_mode, processor.mask_resample) == ("letterbox", "bilinear")
