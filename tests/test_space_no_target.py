"""The Space's "no match": an expression the pipeline reports as having no referent (`no_target`) is shown as a
label, with nothing drawn over the image, in the annotated image, the summary and the session history. Called
as Gradio calls the Segment button (`click.fn`), without a browser."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, pipeline

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import refseg  # noqa: E402,F401  (registers the task)
from refseg import RisclipProcessor  # noqa: E402
from refseg.pipelines import TASK  # noqa: E402
from refseg.presets import get_config  # noqa: E402

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "refseg-demo"
TEXTS = ["the red circle", "the blue square"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("refseg_demo_app_no_target", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def segmenter(tiny_backbones):
    """A tiny untrained RISCLIP with the presence head; `fc2` zeroed, so its bias is every row's no-target logit."""
    torch.manual_seed(0)
    model = AutoModel.from_config(get_config("risclip-tiny", no_target_head=True)).eval()
    with torch.no_grad():
        model.no_target_head.fc2.weight.zero_()
    processor = RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=64)
    return pipeline(TASK, model=model, processor=processor)


@pytest.fixture(scope="module")
def click(app, segmenter, tmp_path_factory):
    """The function the Segment button calls, as Gradio holds it, on `segmenter`."""
    app.load_segmenter.cache_clear()
    original = app.load_segmenter
    app.load_segmenter = lambda path, dtype=None: segmenter
    try:
        demo = app.build_demo("tiny/risclip-with-head", examples_dir=tmp_path_factory.mktemp("no-target-examples"))
        (handler,) = [f for f in demo.fns.values() if f.api_name == "segment"]
        yield handler.fn
    finally:
        app.load_segmenter = original


def set_no_target_logit(segmenter, value):
    with torch.no_grad():
        segmenter.model.no_target_head.fc2.bias.fill_(value)


def test_no_target_shows_no_match_and_no_mask_over_the_visible_image(click, segmenter, make_scene):
    image = make_scene()
    set_no_target_logit(segmenter, 20.0)
    (shown, annotations), summary, history, history_text = click(image, "\n".join(TEXTS), 0.5, [])
    assert shown.size == image.size
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(image))  # the image itself, not blanked
    assert [label for _, label in annotations] == [f"{text}: no match (0.00)" for text in TEXTS]
    assert all(not mask.any() and mask.shape == (image.height, image.width) for mask, _ in annotations)
    for text in TEXTS:
        assert f"| {text} | **no match** |" in summary
        assert f"- {text} (no match, score 0.00)" in history_text
    assert [row[3] for row in history] == [True, True]


def test_a_referent_found_keeps_its_mask_and_score_label(click, segmenter, make_scene):
    image = make_scene()
    set_no_target_logit(segmenter, -20.0)
    (shown, annotations), summary, _, history_text = click(image, TEXTS[0], 0.05, [])  # a low mask threshold
    ((mask, label),) = annotations
    assert label == f"{TEXTS[0]} (1.00)" and mask.any()
    assert "no match" not in summary and "no match" not in history_text
    assert f"| {TEXTS[0]} | match | 1.000 |" in summary


def test_one_request_mixes_match_and_no_match(app, make_scene):
    """`segment_image` on a stand-in pipeline whose first result has a referent and second none."""
    image = make_scene()

    def fake_segmenter(image, text, threshold=None):
        full = Image.fromarray(np.full((image.height, image.width), 255, dtype=np.uint8))
        empty = Image.fromarray(np.zeros((image.height, image.width), dtype=np.uint8))
        return [{"text": text[0], "label": text[0], "mask": full, "score": 0.9, "no_target": False},
                {"text": text[1], "label": text[1], "mask": empty, "score": 0.2, "no_target": True}]

    (_, annotations), summary, history = app.segment_image(fake_segmenter, image, "\n".join(TEXTS))
    assert [label for _, label in annotations] == [f"{TEXTS[0]} (0.90)", f"{TEXTS[1]}: no match (0.20)"]
    assert annotations[0][0].all() and not annotations[1][0].any()
    assert f"| {TEXTS[0]} | match | 0.900 |" in summary and f"| {TEXTS[1]} | **no match** | 0.200 | 0 |" in summary
    text = app.format_history(history)
    assert f"- {TEXTS[0]} (score 0.90, {image.width * image.height} px)" in text
    assert f"- {TEXTS[1]} (no match, score 0.20)" in text
