"""The Gradio Space: `/segment` through gradio_client against the app on localhost, and its files."""

import ast
import importlib.util
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from huggingface_hub import SpaceCard  # noqa: E402
from PIL import Image  # noqa: E402

from refseg.data import load_refs_pickle  # noqa: E402
from refseg.hub.space import render_space_readme  # noqa: E402
from refseg.training import METHODS  # noqa: E402

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "refseg-demo"


def load_app():
    spec = importlib.util.spec_from_file_location("refseg_demo_app", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def model_dir(tiny_trained_risclip):
    """The tiny RISCLIP trained on two-referent scenes: its masks follow the expression."""
    return tiny_trained_risclip[2]


@pytest.fixture(scope="module")
def server(app, model_dir, tmp_path_factory):
    demo = app.build_demo(str(model_dir), examples_dir=tmp_path_factory.mktemp("space-examples"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def refshapes_example(refshapes_root):
    """(image path, [two expressions of that image]) from the RefShapes fixture."""
    refs = load_refs_pickle(Path(refshapes_root) / "refshapes" / "refs(unc).p")
    image_id = refs[0]["image_id"]
    texts = [ref["sentences"][0]["sent"] for ref in refs if ref["image_id"] == image_id][:2]
    return Path(refshapes_root) / "images" / f"refshapes_{image_id:06d}.png", texts


def test_segment_endpoint_returns_one_mask_per_expression(server, refshapes_example):
    image_path, texts = refshapes_example
    assert len(texts) == 2
    client = Client(server, verbose=False)
    annotated, summary, session = client.predict(handle_file(str(image_path)), "\n".join(texts), api_name="/segment")
    size = Image.open(image_path).size
    assert Image.open(annotated["image"]).size == size
    assert [a["label"].rsplit(" (", 1)[0] for a in annotated["annotations"]] == texts
    for annotation in annotated["annotations"]:
        score = float(annotation["label"].rsplit(" (", 1)[1].rstrip(")"))
        assert 0.0 <= score <= 1.0
        assert Image.open(annotation["image"]).size == size
    assert all(text in summary for text in texts)
    assert all(text in session for text in texts)


def _mask_of(annotation_image):
    """Gradio stores an annotation as an image whose alpha (or grey level) is the mask."""
    band = annotation_image.getchannel("A") if "A" in annotation_image.getbands() else annotation_image.convert("L")
    return np.array(band) > 127


def test_each_expression_gets_its_own_referent_through_the_space(server, two_referent_scenes, tmp_path):
    image, referents = two_referent_scenes[0]
    image_path = tmp_path / "scene.png"
    image.save(image_path)
    texts = [text for text, _ in referents]
    annotated, *_ = Client(server, verbose=False).predict(handle_file(str(image_path)), "\n".join(texts),
                                                          api_name="/segment")
    masks = [_mask_of(Image.open(a["image"])) for a in annotated["annotations"]]
    for mask, (_, own), (_, other) in zip(masks, referents, referents[::-1]):
        assert (mask & own).sum() / (mask | own).sum() > 0.35  # IoU with the named object
        assert (mask & other).sum() / max((mask | other).sum(), 1) < 0.15


def test_history_is_per_session(server, refshapes_example):
    image_path, texts = refshapes_example
    first = Client(server, verbose=False)
    first.predict(handle_file(str(image_path)), texts[0], api_name="/segment")
    *_, session = first.predict(handle_file(str(image_path)), texts[1], 0.7, api_name="/segment")
    assert texts[0] in session and texts[1] in session
    other = Client(server, verbose=False)
    *_, fresh = other.predict(handle_file(str(image_path)), texts[1], api_name="/segment")
    assert texts[1] in fresh and texts[0] not in fresh


def test_api_takes_image_and_text_with_optional_threshold(server):
    info = Client(server, verbose=False).view_api(print_info=False, return_format="dict")
    parameters = info["named_endpoints"]["/segment"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == ["image", "text", "threshold"]
    assert [p["parameter_has_default"] for p in parameters] == [False, False, True]


def test_empty_text_and_oversized_image_get_clear_errors(server, app, refshapes_example, monkeypatch):
    image_path, _ = refshapes_example
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="referring expression"):
        client.predict(handle_file(str(image_path)), " \n  ", api_name="/segment")
    monkeypatch.setattr(app, "MAX_IMAGE_PIXELS", 100)  # the running app reads the module constant per call
    with pytest.raises(AppError, match="at most 100 pixels"):
        client.predict(handle_file(str(image_path)), "the red circle", api_name="/segment")


def test_main_reads_model_and_port_from_the_environment(app, monkeypatch):
    calls = {}

    class FakeDemo:
        def launch(self, **kwargs):
            calls["launch"] = kwargs

    def fake_build_demo(path):
        calls["model"] = path
        return FakeDemo()

    monkeypatch.setattr(app, "build_demo", fake_build_demo)
    monkeypatch.setenv("REFSEG_MODEL", "some/model")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    app.main()
    assert calls == {"model": "some/model", "launch": {"server_port": 7999}}
    monkeypatch.delenv("REFSEG_MODEL")
    calls.clear()
    app.main()
    assert calls["model"] == app.DEFAULT_MODEL == "refseg-quickstart/model"


def test_space_readme_front_matter():
    readme = SPACE_DIR / "README.md"
    assert readme.read_text(encoding="utf-8") == render_space_readme(), "regenerate it with write_space_readme"
    data = SpaceCard.load(readme).data
    assert data.sdk == "gradio"
    assert data.sdk_version == gradio.__version__
    assert data.app_file == "app.py" and (SPACE_DIR / data.app_file).is_file()
    assert data.license == "apache-2.0"
    assert data.models and all(m.count("/") == 1 for m in data.models)
    assert "refseg" in (SPACE_DIR / "requirements.txt").read_text()


def _imported(nodes) -> set:
    modules = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_app_imports_only_refseg_gradio_pil_numpy_torch():
    """What the Space installs (refseg[demo], which brings torch): nothing else is required. ZeroGPU's
    `spaces` is imported only where an ImportError is caught."""
    tree = ast.parse((SPACE_DIR / "app.py").read_text(encoding="utf-8"))
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            optional |= _imported(node.body)
    assert optional == {"spaces"}
    required = _imported(ast.walk(tree)) - optional
    assert required - set(sys.stdlib_module_names) == {"refseg", "gradio", "PIL", "numpy", "torch"}


# baselines (`MethodSpec.baseline`: stock CLIPSeg) are not held to the trained bounds; see the registry
@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].baseline))
def test_space_serves_every_method_unchanged(app, method, trained_on_two_referents, two_referent_scenes):
    """The Space's own loading and segmenting code on each method's trained tiny model folder."""
    folder = trained_on_two_referents(method)[2]
    segmenter = app.load_segmenter(str(folder))
    image, referents = two_referent_scenes[1]
    (shown, annotations), summary, history = app.segment_image(segmenter, image, "\n".join(t for t, _ in referents))
    assert shown.size == image.size and len(annotations) == len(history) == 2
    for (mask, label), (text, own), (_, other) in zip(annotations, referents, referents[::-1]):
        assert label.startswith(text) and text in summary
        mask = mask > 0.5
        assert (mask & own).sum() / (mask | own).sum() > 0.35
        assert (mask & other).sum() / max((mask | other).sum(), 1) < 0.15
