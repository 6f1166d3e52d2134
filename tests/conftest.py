"""Shared fixtures: tiny local backbones and a small RefShapes dataset, built once per session.

Nothing here touches the network: `HF_HUB_OFFLINE=1` is forced before transformers is imported.
"""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Tests import the scripts (`train`, `_scripts_path`, ...). Appended, never prepended: the folder's
# evaluate.py must not shadow the `evaluate` package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """Folders holding a tiny `CLIPModel` (+ tokenizer, image processor) and a tiny `SamModel`."""
    from refseg.backbones import save_tiny_backbones

    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"), seed=0)


@pytest.fixture(scope="session")
def refshapes_root(tmp_path_factory):
    """A small RefShapes dataset in the refer format (`<root>/refshapes/...`, `<root>/images/`)."""
    from refseg.data import make_refshapes

    root = tmp_path_factory.mktemp("refshapes")
    make_refshapes(root, num_images=60, seed=0)
    return root


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread, and then do not fight other processes for cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomise_parameters(module, seed=0, std=0.5):
    """Every parameter of `module` drawn from N(0, std^2) (seeded): adapters and fusion blocks start with
    zero branches, so a test of the equations must move them off their initial values first."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


# ------------------------------------------------------------------ models that read the text
TWO_REFERENT_SIZE = 64


def make_two_referent_scenes(num_images=8, size=TWO_REFERENT_SIZE, seed=0):
    """RefShapes-like scenes with two referents each: a red and a blue object (square or circle, the
    shapes and the two diagonal corners they sit in drawn at random) on a random flat background.

    Returns `[(image, [(expression, mask), (expression, mask)])]`, masks boolean (size, size). Which
    object an expression names is visible only through the text: both colours are in every image.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    def draw(canvas, shape, box, fill):
        (canvas.rectangle if shape == "square" else canvas.ellipse)(box, fill=fill)

    rng = np.random.default_rng(seed)
    side, scenes = size * 3 // 8, []
    for _ in range(num_images):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
        far = size - side - 8
        corners = [(2, 2), (far, far)] if rng.random() < 0.5 else [(far, 2), (2, far)]
        if rng.random() < 0.5:
            corners.reverse()
        shapes = rng.permutation(["square", "circle"])
        referents = []
        for (colour, rgb), (x, y), shape in zip((("red", (220, 30, 30)), ("blue", (30, 30, 220))), corners, shapes):
            x, y = x + int(rng.integers(0, 6)), y + int(rng.integers(0, 6))
            box = (x, y, x + side - 1, y + side - 1)
            draw(ImageDraw.Draw(image), shape, box, rgb)
            mask = Image.new("L", (size, size), 0)
            draw(ImageDraw.Draw(mask), shape, box, 255)
            referents.append((f"the {colour} {shape}", np.array(mask) > 0))
        scenes.append((image, referents))
    return scenes


def scene_batch(processor, scenes, with_masks=True, model=None):
    """Processor inputs pairing each scene's image with each of its expressions (row 2i + k).

    With `model`, also the grouping inputs its `forward` names (`group_ids`: the scene of each row,
    `instance_ids`: its referent), as the `grouped_by_image` training sampler gives them."""
    import torch

    from refseg.training.samples import forward_input_names

    images = [image for image, referents in scenes for _ in referents]
    texts = [text for _, referents in scenes for text, _ in referents]
    masks = [mask for _, referents in scenes for _, mask in referents] if with_masks else None
    batch = processor(images=images, text=texts, masks=masks, return_tensors="pt")
    names = forward_input_names(model) if model is not None else ()
    if "group_ids" in names:
        batch["group_ids"] = torch.tensor([i for i, (_, referents) in enumerate(scenes) for _ in referents])
    if "instance_ids" in names:
        batch["instance_ids"] = torch.arange(len(texts))  # every expression names a referent of its own
    return batch


def tiny_preset(method):
    """The tiny preset of `method`: `prompt_ris` -> `prompt-ris-tiny` (preset names use hyphens)."""
    return f"{method.replace('_', '-')}-tiny"


def train_on_scenes(method, backbones, scenes, *, first_stage_steps=80, later_stage_steps=30, learning_rate=3e-3,
                    seed=0, config_overrides=None):
    """A tiny `method` model (its `tiny_preset(method)` on the tiny backbones) trained on `scenes`
    through every training stage of `refseg.training.METHODS[method]`, in eval mode at the end.
    `config_overrides` (a dict of config fields, e.g. `{"no_target_head": True}`) go to the preset's config.

    Built by the training script's own `build_model_and_processor`; the optimizer holds the method's
    parameter groups where it has them (`MethodSpec.param_groups`).
    """
    from types import SimpleNamespace

    import torch

    from refseg.training import get_method
    from refseg.training.modeling import build_model_and_processor

    spec = get_method(method)
    args = SimpleNamespace(preset=tiny_preset(method), model_name_or_path=None, config_overrides=config_overrides,
                           **{name: str(backbones[name]) for name in spec.backbones})
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model, processor = build_model_and_processor(spec, args)
        batch = scene_batch(processor, scenes, model=model)
        batch.pop("original_sizes")
        for i, stage in enumerate(spec.stages):
            model.set_training_stage(stage)
            model.train()
            params = (spec.param_groups(model, learning_rate) if spec.param_groups
                      else [p for p in model.parameters() if p.requires_grad])
            optimizer = torch.optim.AdamW(params, lr=learning_rate)
            for _ in range(first_stage_steps if i == 0 else later_stage_steps):
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(previous)
    return model.eval(), processor


@pytest.fixture(scope="session")
def two_referent_scenes():
    return make_two_referent_scenes()


@pytest.fixture(scope="session")
def trained_on_two_referents(tiny_backbones, two_referent_scenes, tmp_path_factory):
    """`get(method) -> (model, processor, folder)`: `train_on_scenes` on the two-referent scenes, once
    per method and session, saved to `folder` (`save_pretrained` of model and processor)."""
    cache = {}

    def get(method):
        if method not in cache:
            model, processor = train_on_scenes(method, tiny_backbones, two_referent_scenes)
            folder = tmp_path_factory.mktemp(f"{method}-trained")
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            cache[method] = (model, processor, folder)
        return cache[method]

    return get


@pytest.fixture(scope="session")
def tiny_trained_risclip(trained_on_two_referents):
    """`(model, processor, folder)`: the tiny RISCLIP trained through both stages on the two-referent
    scenes, so no weight is at its initial value and its masks follow the expression."""
    return trained_on_two_referents("risclip")


@pytest.fixture
def make_scene():
    """`make_scene(width=61, height=47)`: an odd-sized RGB image with a red disc and a blue square."""
    from PIL import Image, ImageDraw

    def make(width=61, height=47):
        image = Image.new("RGB", (width, height), (230, 230, 230))
        draw = ImageDraw.Draw(image)
        draw.ellipse((5, 5, 25, 25), fill=(220, 20, 20))
        draw.rectangle((35, 20, 55, 40), fill=(20, 20, 220))
        return image

    return make


# ------------------------------------------------------------------ hypothesis (tests/test_reliability_fuzz.py)
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a dev dependency; without it only the fuzz tests fail to import
    settings = None
if settings is not None:
    _HYPOTHESIS_COMMON = dict(deadline=None, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture])
    # CI: few examples, derandomised (the same cases every run), no example database written to disk.
    settings.register_profile("refseg-ci", max_examples=25, derandomize=True, **_HYPOTHESIS_COMMON)
    # By hand: `REFSEG_HYPOTHESIS_PROFILE=refseg-thorough pytest tests/test_reliability_fuzz.py`.
    settings.register_profile("refseg-thorough", max_examples=1000, **_HYPOTHESIS_COMMON)
    settings.load_profile(os.environ.get("REFSEG_HYPOTHESIS_PROFILE", "refseg-ci"))
