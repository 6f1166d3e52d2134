"""The "referring-image-segmentation" pipeline on a tiny trained RISCLIP (no network)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import refseg  # noqa: F401  (registers the task)
from refseg.pipelines import TASK, ReferringImageSegmentationPipeline, load_pipeline


@pytest.fixture(scope="module")
def model_dir(tiny_trained_risclip):
    return tiny_trained_risclip[2]


@pytest.fixture(scope="module")
def segmenter(model_dir):
    from transformers import pipeline

    return pipeline(TASK, model=str(model_dir))


@pytest.fixture(scope="module")
def reference(model_dir):
    """The model and processor loaded from the folder on their own, outside the pipeline."""
    from refseg import RisclipModel, RisclipProcessor

    return RisclipModel.from_pretrained(model_dir).eval(), RisclipProcessor.from_pretrained(model_dir)


def expected(reference, image, texts, threshold=None):
    """Masks and scores worked out here, without the pipeline or `post_process_*`.

    The documented post-processing (`processing_utils.post_process_masks`): logits bilinearly resized
    (align_corners=False) to the original (height, width), then `sigmoid > threshold`; done here with
    `F.interpolate` and the equivalent `logit > log(t / (1 - t))`. Also returns the resized logits'
    distance to that cut, so a comparison can excuse pixels within rounding of it."""
    model, processor = reference
    inputs = processor(images=image, text=texts, return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        logits = model(**inputs).logits.float()  # (B, h, w) at the model's output resolution
    threshold = model.config.threshold if threshold is None else threshold
    cut = math.log(threshold / (1 - threshold))
    size = (image.height, image.width)
    resized = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    masks = [(r > cut).numpy() for r in resized]
    margins = [(r - cut).abs().numpy() for r in resized]
    probabilities = logits.sigmoid()
    scores = []
    for probability in probabilities:
        foreground = probability > threshold
        scores.append(float(probability[foreground].mean()) if foreground.any() else 0.0)
    return masks, scores, probabilities, margins


def assert_same_mask(got, mask, margin):
    """Equal, except where the resized logit is within float rounding of the threshold."""
    differ = got != mask
    assert not (differ & (margin > 1e-4)).any(), f"{int(differ.sum())} pixels differ"
    assert differ.sum() <= 3


def test_task_is_registered_and_built_from_a_folder(segmenter):
    from transformers.pipelines import PIPELINE_REGISTRY

    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    assert isinstance(segmenter, ReferringImageSegmentationPipeline)
    assert type(segmenter.model).__name__ == "RisclipModel"


def test_outputs_match_model_and_processor(segmenter, reference, make_scene):
    image = make_scene()
    texts = ["the red circle", "the blue square"]
    results = segmenter(image, text=texts)
    masks, scores, _, margins = expected(reference, image, texts)
    assert [r["text"] for r in results] == texts
    assert 0 < sum(int(m.sum()) for m in masks) < sum(m.size for m in masks)  # not all one value
    for result, mask, score, margin in zip(results, masks, scores, margins):
        assert result["mask"].mode == "L"
        assert result["mask"].size == image.size
        pixels = np.asarray(result["mask"])
        assert set(np.unique(pixels)) <= {0, 255}
        assert_same_mask(pixels > 0, mask, margin)
        assert result["score"] == pytest.approx(score, abs=1e-6)
        assert 0.0 <= result["score"] <= 1.0


def test_each_expression_gets_its_own_referent(segmenter, reference, two_referent_scenes):
    """The fixture's model reads the text: one image, two expressions, two different objects."""
    for image, referents in two_referent_scenes[:4]:
        texts = [text for text, _ in referents]
        results = segmenter(image, texts)
        masks, *_ = expected(reference, image, texts)
        for result, mask, (_, own), (_, other) in zip(results, masks, referents, referents[::-1]):
            got = np.asarray(result["mask"]) > 127
            assert (got == mask).mean() > 0.99
            assert (got & own).sum() / (got | own).sum() > 0.35
            assert (got & other).sum() / max((got | other).sum(), 1) < 0.15


def test_single_expression_gives_a_one_element_list(segmenter, make_scene):
    results = segmenter(make_scene(), text="the red circle")
    assert len(results) == 1 and results[0]["text"] == "the red circle"


def test_threshold_argument_is_used(segmenter, reference, make_scene):
    image = make_scene()
    _, _, probabilities, _ = expected(reference, image, ["the red circle"])
    threshold = float(probabilities.flatten().median().clamp(0.01, 0.99))
    masks, scores, _, margins = expected(reference, image, ["the red circle"], threshold=threshold)
    assert 0 < masks[0].sum() < masks[0].size  # a non-trivial mask, so the comparison means something
    (result,) = segmenter(image, text="the red circle", threshold=threshold)
    assert_same_mask(np.asarray(result["mask"]) > 0, masks[0], margins[0])
    assert result["score"] == pytest.approx(scores[0], abs=1e-6)


def test_image_as_path_array_dict_and_list(segmenter, tmp_path, make_scene):
    image = make_scene()
    path = tmp_path / "scene.png"
    image.save(path)
    reference = [np.asarray(r["mask"]) for r in segmenter(image, text=["the red circle", "the blue square"])]
    variants = [
        segmenter(str(path), text=["the red circle", "the blue square"]),
        segmenter(np.asarray(image), text=["the red circle", "the blue square"]),
        segmenter({"image": image, "text": ["the red circle", "the blue square"]}),
    ]
    for results in variants:
        for result, mask in zip(results, reference):
            np.testing.assert_array_equal(np.asarray(result["mask"]), mask)
    batched = segmenter([image, make_scene(33, 70)], text="the red circle")
    assert len(batched) == 2 and batched[1][0]["mask"].size == (33, 70)
    np.testing.assert_array_equal(np.asarray(batched[0][0]["mask"]), reference[0])


def test_exif_orientation_gives_masks_of_the_displayed_size(segmenter, tmp_path, make_scene):
    image = make_scene(60, 40)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    (result,) = segmenter(str(path), text="the red circle")
    assert result["mask"].size == (40, 60)


def test_load_pipeline_names_the_class(model_dir):
    segmenter = load_pipeline(str(model_dir))
    assert isinstance(segmenter, ReferringImageSegmentationPipeline)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda pipe, image: pipe(image), "`text` is required"),
        (lambda pipe, image: pipe(image, text=""), "text"),
        (lambda pipe, image: pipe(image, text=["ok", "  "]), "text"),
        (lambda pipe, image: pipe(image, text=3), "text"),
        (lambda pipe, image: pipe(12345, text="the red circle"), "images"),
        (lambda pipe, image: pipe(image, text="the red circle", threshold=1.5), "threshold"),
        (lambda pipe, image: pipe(image, text="the red circle", thresold=0.3), "unexpected"),
    ],
)
def test_bad_input_raises_value_error(segmenter, make_scene, call, match):
    with pytest.raises(ValueError, match=match):
        call(segmenter, make_scene())
