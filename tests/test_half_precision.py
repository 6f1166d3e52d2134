"""RisclipModel in bfloat16 for inference: loaded with `dtype=`, cast with `.to`, or under CPU autocast.

The processor gives float32 `pixel_values`; each bf16 model must take them as they are and give finite
logits close to the float32 model's, and `post_process_referring_segmentation` masks that agree with
its masks on nearly every pixel, and everywhere the float32 logit is clear of the threshold.

Tolerances, from the deviation measured on the tiny RISCLIP trained on the two-referent scenes
(`tiny_trained_risclip`; its logits span about +-13, its coarse logits +-8), on these scenes and six
held-out sets of them (`make_two_referent_scenes(num_images=4, seed=10 ... 15)`), single thread, with
two versions of the Refiner (before and after its feature projections' fan-in init):

| output | measured max / mean abs deviation | asserted max / mean |
| --- | --- | --- |
| `logits` | 0.35 / 0.018 | 0.75 / 0.05 |
| `coarse_logits` | 0.93 / 0.041 | 1.5 / 0.1 |
| masks, share of pixels that agree | >= 98.12 % per mask | >= 97 % per mask |

A mask pixel can flip only where the float32 logit, resized as `post_process_masks` resizes it, lies
within the `logits` deviation of the threshold's logit (bilinear resizing is a convex combination), so
that is asserted too. `coarse_logits` deviate most: the Locator's cosine and `exp(logit_scale)` are
computed in bf16. The agreement depends on how many pixels the model leaves near the threshold.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import scene_batch

from refseg import RisclipModel
from refseg.presets import PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(PRESETS["risclip-tiny"].config_overrides)
TOLERANCES = {"logits": (0.75, 0.05), "coarse_logits": (1.5, 0.1)}  # max, mean abs deviation from float32
MIN_AGREEMENT = 0.97  # share of the pixels of each mask where bf16 and float32 agree


@pytest.fixture(scope="module")
def batch(tiny_trained_risclip, two_referent_scenes):
    _, processor, _ = tiny_trained_risclip
    inputs = scene_batch(processor, two_referent_scenes, with_masks=False)
    original_sizes = inputs.pop("original_sizes")
    assert inputs["pixel_values"].dtype == torch.float32  # what every bf16 model below is given
    return dict(inputs), original_sizes


@pytest.fixture(scope="module")
def reference(tiny_trained_risclip, batch):
    with torch.no_grad():
        return tiny_trained_risclip[0](**batch[0])


def bf16_from_backbones(model, backbones, _folder):
    half = RisclipModel.from_backbones(clip=backbones["clip"], dtype=torch.bfloat16, **TINY).eval()
    half.load_trainable_state_dict(model.trainable_state_dict())
    return half


def bf16_from_pretrained(_model, _backbones, folder):
    return RisclipModel.from_pretrained(folder, dtype=torch.bfloat16).eval()


def bf16_to(model, _backbones, _folder):
    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("make", [bf16_from_backbones, bf16_from_pretrained, bf16_to, None],
                         ids=["from_backbones(dtype=)", "from_pretrained(dtype=)", ".to", "autocast"])
def test_bfloat16_matches_float32(make, tiny_trained_risclip, tiny_backbones, batch, reference):
    model, processor, folder = tiny_trained_risclip
    inputs, original_sizes = batch
    if make is None:  # the float32 model under CPU autocast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
        assert model.dtype == torch.float32
    else:
        half = make(model, tiny_backbones, folder)
        floats = [t for t in (*half.parameters(), *half.buffers()) if t.is_floating_point()]
        assert {t.dtype for t in floats} == {torch.bfloat16}  # CLIP, adapters, fusion, Locator, Refiner
        with torch.no_grad():
            out = half(**inputs)
    for name, (max_tolerance, mean_tolerance) in TOLERANCES.items():
        value, expected = getattr(out, name), getattr(reference, name)
        assert value.dtype == torch.bfloat16 and value.shape == expected.shape, name
        assert torch.isfinite(value).all(), name
        deviation = (value.float() - expected).abs()
        assert deviation.max() <= max_tolerance and deviation.mean() <= mean_tolerance, (
            f"{name}: max {deviation.max():.4f}, mean {deviation.mean():.4f}")
    masks = processor.post_process_referring_segmentation(out, original_sizes)
    expected_masks = processor.post_process_referring_segmentation(reference, original_sizes)
    cut = math.log(processor.threshold / (1 - processor.threshold))
    for mask, expected_mask, logits, size in zip(masks, expected_masks, reference.logits, original_sizes.tolist(),
                                                 strict=True):
        assert mask.dtype == torch.bool and mask.shape == expected_mask.shape == tuple(size)
        flipped = mask != expected_mask
        assert 1 - flipped.float().mean() >= MIN_AGREEMENT
        resized = F.interpolate(logits[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        assert ((resized - cut).abs()[flipped] <= TOLERANCES["logits"][0]).all()  # flips only near the cut


def test_post_processing_reads_bfloat16_logits_as_float32(tiny_trained_risclip, batch, reference):
    processor, original_sizes = tiny_trained_risclip[1], batch[1]
    logits = reference.logits.to(torch.bfloat16)
    masks = processor.post_process_referring_segmentation(logits, original_sizes)
    upcast = processor.post_process_referring_segmentation(logits.float(), original_sizes)
    assert all(torch.equal(a, b) for a, b in zip(masks, upcast))


@pytest.mark.parametrize("method", ["risclip", "cris", "risam", "prompt_ris"])
def test_every_method_loads_whole_in_bfloat16(method, tiny_backbones, two_referent_scenes):
    """`from_backbones(..., dtype=torch.bfloat16)` gives a bf16 model, the modules the method adds included
    (not bf16 backbones with fp32 heads, which fails at the first fused layer), and it runs on the
    processor's fp32 inputs."""
    from conftest import tiny_preset

    from refseg.training import get_method

    spec = get_method(method)
    model_cls, processor_cls = spec.load_classes()
    sources = {name: str(tiny_backbones[name]) for name in spec.backbones}
    overrides = dict(PRESETS[tiny_preset(method)].config_overrides)
    model = model_cls.from_backbones(**sources, **overrides, dtype=torch.bfloat16).eval()
    wrong = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_floating_point() and t.dtype != torch.bfloat16]
    assert not wrong, wrong[:5]
    settings = {"image_size": model.config.image_size}
    settings.update({name: getattr(model.config, name) for name in getattr(processor_cls, "config_fields", ())})
    processor = processor_cls.from_backbones(**sources, **settings)
    inputs = scene_batch(processor, two_referent_scenes[:1], with_masks=False)
    sizes = inputs.pop("original_sizes")
    if "end_to_end" in spec.stages:
        model.set_training_stage("end_to_end")  # Prompt-RIS: run SAM too
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    masks = processor.post_process_referring_segmentation(logits, sizes)
    assert [tuple(m.shape) for m in masks] == [tuple(s.tolist()) for s in sizes]
