"""The Space on Hub hardware: ZeroGPU's `spaces.GPU` around the request handler where `spaces` imports (a
fake module here), no wrapper elsewhere, and the model on the GPU when PyTorch sees one."""

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "refseg-demo"


def load_app(name="refseg_demo_app_hardware"):
    spec = importlib.util.spec_from_file_location(name, SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_spaces_module():
    """A stand-in for the `spaces` package: `GPU(function)` returns a wrapper that counts its calls."""
    module = types.ModuleType("spaces")
    module.decorated, module.calls = [], []

    def GPU(function):
        def on_gpu(*args, **kwargs):
            module.calls.append(function.__name__)
            return function(*args, **kwargs)

        module.decorated.append(function.__name__)
        on_gpu.__wrapped__ = function
        return on_gpu

    module.GPU = GPU
    return module


class FakeSegmenter:
    """What `segment_image` reads of a pipeline: a call giving one result per expression, `model.config`."""

    def __init__(self):
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(threshold=0.5), dtype="torch.float32")

    def __call__(self, image, text, threshold=None):
        mask = Image.fromarray(np.full((image.height, image.width), 255, dtype=np.uint8))
        return [{"text": t, "mask": mask, "score": 0.75, "no_target": False} for t in text]


@pytest.fixture
def without_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError, as off ZeroGPU
    return load_app()


@pytest.fixture
def with_spaces(monkeypatch):
    fake = fake_spaces_module()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    return load_app(), fake


def test_without_spaces_the_handler_is_not_wrapped(without_spaces):
    app = without_spaces
    assert app.zero_gpu is None
    handler = lambda: None  # noqa: E731
    assert app.gpu_decorator(handler) is handler
    assert not hasattr(app.segment_request, "__wrapped__") and app.segment_request.__name__ == "segment_request"


def test_with_spaces_the_request_handler_runs_through_spaces_gpu(with_spaces, monkeypatch, tmp_path):
    app, fake = with_spaces
    assert app.zero_gpu is fake.GPU and fake.decorated == ["segment_request"]
    segmenter = FakeSegmenter()
    monkeypatch.setattr(app, "load_segmenter", lambda path, dtype=None: segmenter)
    demo = app.build_demo("some/model", examples_dir=tmp_path)
    # the function the Segment button calls, as Gradio holds it
    (click,) = [f for f in demo.fns.values() if f.api_name == "segment"]
    annotated, summary, history, history_text = click.fn(Image.new("RGB", (9, 7)), "the red circle\nthe square", 0.5, [])
    assert fake.calls == ["segment_request"]
    assert [label for _, label in annotated[1]] == ["the red circle (0.75)", "the square (0.75)"]
    assert len(history) == 2 and "the square" in history_text


@pytest.mark.parametrize("cuda", [True, False])
def test_model_goes_to_the_gpu_when_torch_sees_one(without_spaces, monkeypatch, cuda):
    app = without_spaces
    monkeypatch.setattr(app.torch.cuda, "is_available", lambda: cuda)
    assert app.inference_device() == ("cuda" if cuda else "cpu")
    calls = []
    monkeypatch.setattr(app, "load_pipeline", lambda path, **kwargs: calls.append((path, kwargs)) or "pipe")
    app.load_segmenter.cache_clear()
    assert app.load_segmenter("some/model", "bfloat16") == "pipe"
    assert calls == [("some/model", {"device": "cuda" if cuda else "cpu", "dtype": "bfloat16"})]
