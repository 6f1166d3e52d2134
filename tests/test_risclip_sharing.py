"""RisclipModel at inference: the image layers before the first PreFusion run once per distinct image.

The processor repeats an image in one row of `pixel_values` per expression; `share_image_encoding`
runs the embeddings and the text-free layers on the distinct rows only, then expands them (and the
Refiner features read from them) to every row. The result must be the per-pair path's, bit for bit.
"""

import copy

import pytest
import torch
from PIL import Image, ImageDraw

from refseg import RisclipModel, RisclipProcessor
from refseg.presets import PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

# The tiny CLIP has 4 image layers. Two PreFusion pairs leave layers 1-2 text-free (the prefix); the
# Refiner reads the embeddings (0), both prefix layers (1, 2) and a fused layer (4).
SHARED = dict(PRESETS["risclip-tiny"].config_overrides, num_pre_fusion_layers=2, refiner_feature_layers=[4, 2, 1, 0])
PREFIX = 2
ORDER = [0, 1, 1, 0, 1, 0]  # the image of each row: 2 images x 3 expressions, interleaved
TEXTS = ["the red circle", "the blue square", "the square on the right", "the circle on the left",
         "the small blue one", "the red one"]


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(0)
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **SHARED).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stand-in for training: the prefix's Backbone Adapters must not be zero
        for tensor in model.trainable_state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model


def scene(width, height):
    """A red disc and a blue square in opposite corners of a `width` x `height` RGB image."""
    image = Image.new("RGB", (width, height), (230, 230, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((5, 5, 25, 25), fill=(220, 20, 20))
    draw.rectangle((width - 25, height - 25, width - 5, height - 5), fill=(20, 20, 220))
    return image


@pytest.fixture(scope="module")
def inputs(tiny_backbones):
    processor = RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=SHARED["image_size"])
    images = [scene(61, 47), scene(40, 52)]
    batch = processor(images=[images[i] for i in ORDER], text=TEXTS, return_tensors="pt")
    batch.pop("original_sizes")
    return dict(batch)


def forward(model, inputs, share):
    """Outputs and, per image layer (0-based) and for the embeddings, the rows each call ran on."""
    vision = model.clip.vision_model
    rows = {}
    modules = {"embeddings": vision.embeddings, **dict(enumerate(vision.encoder.layers))}
    hooks = [module.register_forward_hook(
        lambda _m, _a, out, key=key: rows.setdefault(key, []).append((out[0] if isinstance(out, tuple) else out).shape[0]))
        for key, module in modules.items()]
    previous = model.config.share_image_encoding
    model.config.share_image_encoding = share
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        model.config.share_image_encoding = previous
        for hook in hooks:
            hook.remove()
    return out, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharing_gives_the_per_pair_outputs_bit_for_bit(model, inputs, dtype):
    assert len(model.pre_fusion) == 2 and len(model.clip.vision_model.encoder.layers) == 4
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    shared, _ = forward(model, inputs, share=True)
    separate, _ = forward(model, inputs, share=False)
    for name in ("logits", "coarse_logits", "image_embeds", "text_embeds"):
        assert torch.equal(getattr(shared, name), getattr(separate, name)), name
    # the rows of one image differ by their expression: the shared prefix did not collapse them
    assert (shared.logits[0] - shared.logits[3]).abs().max() > 1e-2
    assert (shared.coarse_logits[0] - shared.coarse_logits[5]).abs().max() > 1e-2
    # every row distinct, or a single row: nothing to share, the per-pair path on that batch
    for rows in ([0, 1], [4]):
        batch = {name: value[rows] for name, value in inputs.items()}
        assert torch.equal(forward(model, batch, share=True)[0].logits, forward(model, batch, share=False)[0].logits)


def test_prefix_layers_run_once_per_image_and_fused_layers_once_per_pair(model, inputs):
    _, rows = forward(model, inputs, share=True)
    assert rows["embeddings"] == [2]
    assert [rows[i] for i in range(PREFIX)] == [[2]] * PREFIX  # layers 1-2: once per image
    assert [rows[i] for i in range(PREFIX, 4)] == [[6]] * 2  # layers 3-4 read the text: once per pair
    _, rows = forward(model, inputs, share=False)
    assert rows["embeddings"] == [6] and all(rows[i] == [6] for i in range(4))


@pytest.mark.parametrize("stage", ["locator", "refiner"])
def test_training_keeps_one_row_per_pair(model, inputs, stage):
    model.set_training_stage(stage)
    model.train()
    try:
        _, rows = forward(model, inputs, share=True)
    finally:
        model.set_training_stage("locator")
        model.eval()
    assert rows["embeddings"] == [6] and all(rows[i] == [6] for i in range(4))
