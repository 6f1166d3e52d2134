"""The pipeline and the Space in bfloat16: `pipeline(TASK, model=..., dtype=torch.bfloat16)` and the
Space's `REFSEG_DTYPE`, on the tiny trained RISCLIP (how far bf16 strays from float32:
tests/test_half_precision.py)."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

import refseg  # noqa: F401  (registers the task)
from refseg.pipelines import TASK

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "refseg-demo"
MIN_AGREEMENT = 0.97  # share of pixels where a bf16 mask equals the float32 one (measured: >= 99.3 % here)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_trained_risclip):
    return str(tiny_trained_risclip[2])


@pytest.fixture(scope="module")
def scene(two_referent_scenes):
    """An image of odd size (61 x 47) and its two expressions."""
    image, referents = two_referent_scenes[1]
    return image.resize((61, 47)), [text for text, _ in referents]


def test_bfloat16_pipeline_casts_its_inputs_and_returns_masks_at_the_image_size(model_dir, scene):
    image, texts = scene
    full = pipeline(TASK, model=model_dir)
    half = pipeline(TASK, model=model_dir, dtype=torch.bfloat16)
    assert full.model.dtype == torch.float32 and half.model.dtype == torch.bfloat16
    seen = []
    hook = half.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["pixel_values"].dtype), with_kwargs=True)
    try:
        results = half(image, text=texts)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16]  # the processor's float32 pixel_values, cast to the model's dtype
    for got, want in zip(results, full(image, text=texts), strict=True):
        assert got["text"] == want["text"]
        assert got["mask"].mode == "L" and got["mask"].size == image.size
        assert (np.asarray(got["mask"]) == np.asarray(want["mask"])).mean() >= MIN_AGREEMENT
        assert got["score"] == pytest.approx(want["score"], abs=0.02)  # measured: within 0.006


def load_app():
    spec = importlib.util.spec_from_file_location("refseg_demo_app_dtype", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_space_runs_in_the_dtype_named_by_REFSEG_DTYPE(model_dir, scene, monkeypatch, tmp_path):
    app = load_app()
    assert app.parse_dtype(None) is None and app.parse_dtype(" ") is None  # unset: the checkpoint's dtype
    assert app.parse_dtype(" BFloat16 ") == "bfloat16"

    # main(): the variable reaches build_demo; a wrong value stops the app before any model loads
    class FakeDemo:
        def launch(self, **kwargs):
            pass

    calls = []
    monkeypatch.setattr(app, "build_demo", lambda path, **kwargs: calls.append((path, kwargs)) or FakeDemo())
    monkeypatch.setenv("REFSEG_MODEL", model_dir)
    monkeypatch.setenv("REFSEG_DTYPE", "bfloat16")
    app.main()
    assert calls == [(model_dir, {"dtype": "bfloat16"})]
    monkeypatch.setenv("REFSEG_DTYPE", "half")
    with pytest.raises(ValueError, match=r"REFSEG_DTYPE='half'.*float32, bfloat16, float16"):
        app.main()
    assert len(calls) == 1
    monkeypatch.undo()

    # the app itself: the model it serves is bf16, and its masks have the image's size
    demo = app.build_demo(model_dir, examples_dir=tmp_path, dtype="bfloat16")
    assert any("(bfloat16)" in str(getattr(block, "value", "")) for block in demo.blocks.values())
    segmenter = app.load_segmenter(model_dir, "bfloat16")  # the pipeline build_demo loaded (cached)
    assert app.load_segmenter.cache_info().currsize == 1 and segmenter.model.dtype == torch.bfloat16
    image, texts = scene
    (shown, annotations), summary, _ = app.segment_image(segmenter, image, "\n".join(texts))
    assert shown.size == image.size and len(annotations) == 2
    for (mask, label), text in zip(annotations, texts, strict=True):
        assert label.startswith(text) and mask.shape == (image.height, image.width)
