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


@pytest.fixture(scope="session")
def tiny_trained_risclip(tiny_backbones, tmp_path_factory):
    """`(model, processor, folder)`: a tiny RISCLIP (64 px, 8x8 tokens) a few optimizer steps past
    its initialisation in both stages, so no weight is at its initial value, saved to `folder`."""
    import numpy as np
    import torch
    from PIL import Image

    from refseg import RisclipModel, RisclipProcessor

    clip_dir = tiny_backbones["clip"]
    torch.manual_seed(0)
    model = RisclipModel.from_backbones(clip=clip_dir, image_size=64)
    processor = RisclipProcessor.from_backbones(clip=clip_dir, image_size=64)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(2)]
    masks = [rng.random((40, 52)) > 0.5 for _ in range(2)]
    batch = processor(images=images, text=["the red circle", "the blue square"], masks=masks, return_tensors="pt")
    batch.pop("original_sizes")
    for stage in ("locator", "refiner"):
        model.set_training_stage(stage)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("risclip-trained")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


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
