"""The pipeline's `no_target` and `score` (generalized referring segmentation), on a tiny untrained RISCLIP with
and without the presence head (`config.no_target_head`). The head's output is forced through its last layer
(`fc2`: weight 0, bias b gives `no_target_logits == b` for every row), the mask logits through a forward hook."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModel, pipeline

import refseg  # noqa: F401  (registers the task)
from refseg import RisclipProcessor
from refseg.pipelines import TASK
from refseg.presets import get_config

pytestmark = pytest.mark.usefixtures("single_thread")

KEYS = {"score", "label", "mask", "no_target", "text"}
TEXTS = ["the red circle", "the blue square"]


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    return RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=64)


def tiny_risclip(**overrides):
    torch.manual_seed(0)
    return AutoModel.from_config(get_config("risclip-tiny", **overrides)).eval()


@pytest.fixture
def with_head(processor):
    return pipeline(TASK, model=tiny_risclip(no_target_head=True), processor=processor)


@pytest.fixture
def without_head(processor):
    return pipeline(TASK, model=tiny_risclip(), processor=processor)


def force_no_target_logit(model, value: float) -> None:
    """Every row's `no_target_logits` becomes `value`: the head's last layer reads nothing, its bias is `value`."""
    with torch.no_grad():
        model.no_target_head.fc2.weight.zero_()
        model.no_target_head.fc2.bias.fill_(value)


def force_mask_logits(model, per_row):
    """A forward hook replacing the output's `logits` (B, h, w): row i filled with `per_row[i]` (a number, or a
    (h, w) tensor)."""
    def hook(_module, _args, output):
        logits = output.logits.clone()
        for row, value in enumerate(per_row):
            logits[row] = value
        output.logits = logits
        return output

    return model.register_forward_hook(hook)


def usual_masks(segmenter, image, texts):
    """The masks of the processor's post-processing on the mask logits alone (no presence), at the image size."""
    inputs = segmenter.processor(images=image, text=texts, return_tensors="pt")
    sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        logits = segmenter.model(**inputs).logits
    return [m.numpy() for m in segmenter.processor.post_process_referring_segmentation(logits, target_sizes=sizes)]


def test_results_carry_the_same_keys_with_and_without_the_head(with_head, without_head, make_scene):
    image = make_scene()
    for segmenter in (with_head, without_head):
        results = segmenter(image, text=TEXTS)
        assert [set(r) for r in results] == [KEYS, KEYS]
        assert [r["label"] for r in results] == [r["text"] for r in results] == TEXTS
        assert all(isinstance(r["no_target"], bool) and 0.0 <= r["score"] <= 1.0 for r in results)


def test_the_head_saying_no_target_empties_the_mask_and_scores_near_zero(with_head, make_scene):
    image = make_scene()
    force_no_target_logit(with_head.model, 20.0)
    for result in with_head(image, text=TEXTS):
        assert result["no_target"] is True
        assert not np.asarray(result["mask"]).any() and result["mask"].size == image.size
        assert result["score"] == pytest.approx(0.0, abs=1e-6)  # 1 - sigmoid(20)


def test_the_head_saying_target_keeps_the_usual_mask_and_scores_near_one(with_head, make_scene):
    image = make_scene()
    force_no_target_logit(with_head.model, -20.0)
    expected = usual_masks(with_head, image, TEXTS)
    assert any(m.any() for m in expected)  # a mask that could be emptied, so keeping it means something
    for result, mask in zip(with_head(image, text=TEXTS), expected):
        assert result["no_target"] is False
        np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, mask)
        assert result["score"] == pytest.approx(1.0, abs=1e-6)


def test_with_the_head_no_target_follows_the_head_not_the_mask(with_head, make_scene):
    """An empty predicted mask is not a "no target" answer when the head says the referent is there, and the
    score is the head's, not the mask's."""
    force_no_target_logit(with_head.model, -3.0)
    hook = force_mask_logits(with_head.model, [-20.0, 20.0])  # row 0: nothing predicted; row 1: everything
    try:
        empty, full = with_head(make_scene(), text=TEXTS)
    finally:
        hook.remove()
    assert not np.asarray(empty["mask"]).any() and np.asarray(full["mask"]).all()
    assert empty["no_target"] is False and full["no_target"] is False
    presence = 1.0 - 1.0 / (1.0 + math.exp(3.0))  # 1 - sigmoid(-3)
    assert empty["score"] == pytest.approx(presence, abs=1e-6) and full["score"] == pytest.approx(presence, abs=1e-6)


def test_the_no_target_threshold_is_honoured(with_head, without_head, processor, make_scene):
    """sigmoid(no_target_logits) = 0.4: a target at the default 0.5, none at 0.3 (call argument, constructor
    argument, or the model config's `no_target_threshold`, which post-processing must receive)."""
    image = make_scene()
    model = with_head.model
    force_no_target_logit(model, math.log(0.4 / 0.6))
    hook = force_mask_logits(model, [20.0])  # a full mask, so an emptied one shows
    try:
        (default,) = with_head(image, text=TEXTS[:1])
        (called,) = with_head(image, text=TEXTS[:1], no_target_threshold=0.3)
        (built,) = pipeline(TASK, model=model, processor=processor, no_target_threshold=0.3)(image, text=TEXTS[:1])
        (higher,) = with_head(image, text=TEXTS[:1], no_target_threshold=0.45)
        model.config.no_target_threshold = 0.3
        try:
            (configured,) = with_head(image, text=TEXTS[:1])
        finally:
            model.config.no_target_threshold = 0.5
    finally:
        hook.remove()
    assert default["no_target"] is False and np.asarray(default["mask"]).all()
    assert higher["no_target"] is False and np.asarray(higher["mask"]).all()
    for result in (called, built, configured):
        assert result["no_target"] is True and not np.asarray(result["mask"]).any()
    for result in (default, called, built, higher, configured):
        assert result["score"] == pytest.approx(0.6, abs=1e-6)  # the threshold moves the decision, not the score
    for bad in (0.0, 1.0, 1.5, -0.1):  # refused like `threshold`, with or without a head to apply it to
        for segmenter in (with_head, without_head):
            with pytest.raises(ValueError, match="no_target_threshold"):
                segmenter(image, text=TEXTS[:1], no_target_threshold=bad)


def test_without_the_head_no_target_means_an_empty_mask_and_the_score_keeps_its_meaning(without_head, make_scene):
    image = make_scene()
    inputs = without_head.processor(images=image, text=TEXTS, return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = without_head.model(**inputs)
    assert outputs.no_target_logits is None
    partial = torch.full(outputs.logits.shape[-2:], -20.0)
    partial[: partial.shape[0] // 2] = math.log(0.8 / 0.2)  # the top half at probability 0.8
    hook = force_mask_logits(without_head.model, [partial, -20.0])
    try:
        found, missing = without_head(image, text=TEXTS)
    finally:
        hook.remove()
    assert np.asarray(found["mask"]).any() and found["no_target"] is False
    assert found["score"] == pytest.approx(0.8, abs=1e-5)  # the mean foreground probability, as before
    assert not np.asarray(missing["mask"]).any() and missing["no_target"] is True
    assert missing["score"] == 0.0
