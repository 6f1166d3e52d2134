"""Shared fixtures: tiny local backbones and a small RefShapes dataset, built once per session.

Nothing here touches the network: `HF_HUB_OFFLINE=1` is forced before transformers is imported.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
