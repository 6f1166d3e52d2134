"""`refseg.training.clip_pretraining` must learn from RefShapes' *training* images only.

The quickstart pretrains the tiny CLIP on object crops before it trains and evaluates a method on
the same RefShapes set; a crop from a val/test image, or a colour-shape pair of the `unseen`
split, would leak evaluation data into the frozen backbone. The checks here do not trust the
module's own bookkeeping: every image file it opens is recorded, the non-training image files are
deleted from the dataset copy it reads, and every caption and crop that reaches `CLIPModel` is
compared with the training images' objects (exactly: the module has no crop augmentation; one
added later would have to loosen the crop check, not the image/caption checks).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.data import load_refs_pickle, make_refshapes
from refseg.data.refshapes_lang import UNSEEN_PAIRS
from refseg.training import clip_pretraining
from refseg.training.clip_pretraining import load_crop_pairs, pretrain_clip

FRACTIONS = {"val": 0.2, "testA": 0.1, "testB": 0.1, "unseen": 0.2}


@pytest.fixture(scope="module")
def tiny_refshapes(tmp_path_factory):
    """`(root, info)`: 10 RefShapes images, every split present; `info` lists the image files per
    split and the captions of the training images' objects."""
    root = tmp_path_factory.mktemp("refshapes-clip")
    make_refshapes(root, num_images=10, seed=1, fractions=FRACTIONS)
    refs = load_refs_pickle(root / "refshapes" / "refs(unc).p")
    coco = json.loads((root / "refshapes" / "instances.json").read_text())
    split_of = {ref["image_id"]: ref["split"] for ref in refs}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_split = {}
    for image_id, split in split_of.items():
        by_split.setdefault(split, set()).add(files[image_id])
    assert {"train", "val", "testA", "testB", "unseen"} <= set(by_split), by_split
    train_ids = {i for i, s in split_of.items() if s == "train"}
    train_anns = [a for a in coco["annotations"] if a["image_id"] in train_ids]
    info = {
        "files": by_split,
        "train_captions": {f"a {a['attributes']['color']} {names[a['category_id']]}" for a in train_anns},
        "num_train_objects": len(train_anns),
        "other_captions": {f"a {a['attributes']['color']} {names[a['category_id']]}"
                           for a in coco["annotations"] if a["image_id"] not in train_ids},
    }
    return root, info


@pytest.fixture
def train_images_only(tiny_refshapes, tmp_path):
    """A copy of the dataset whose val/test/unseen image files are gone: reading one fails."""
    root, info = tiny_refshapes
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    for split, names in info["files"].items():
        if split != "train":
            for name in names:
                (copy / "images" / name).unlink()
    return copy


@pytest.fixture
def opened(monkeypatch):
    """Names of the image files `clip_pretraining` opens."""
    names = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        names.append(Path(fp).name)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(clip_pretraining.Image, "open", spy)
    return names


def unseen_captions():
    return {f"a {colour} {shape}" for colour, shape in UNSEEN_PAIRS}


def test_the_fixture_has_something_to_leak(tiny_refshapes):
    """Otherwise the checks below could pass vacuously."""
    _, info = tiny_refshapes
    assert info["other_captions"] & unseen_captions(), "the unseen images hold unseen pairs"
    assert not info["train_captions"] & unseen_captions()


def test_crops_come_from_every_object_of_the_training_images_only(tiny_refshapes, train_images_only, opened):
    _, info = tiny_refshapes
    crops, captions = load_crop_pairs(train_images_only, image_size=16)
    assert set(opened) == info["files"]["train"]
    assert len(opened) == len(set(opened)), "each image is opened once"
    assert crops.shape == (info["num_train_objects"], 3, 16, 16) and crops.dtype == torch.uint8
    assert len(captions) == info["num_train_objects"]
    assert set(captions) == info["train_captions"]
    assert not set(captions) & unseen_captions()


def test_crops_are_the_same_whether_or_not_the_other_splits_exist(tiny_refshapes, train_images_only):
    root, _ = tiny_refshapes
    full_crops, full_captions = load_crop_pairs(root, image_size=16)
    crops, captions = load_crop_pairs(train_images_only, image_size=16)
    assert captions == full_captions
    assert torch.equal(crops, full_crops)


def test_pretrain_clip_trains_on_training_crops_only(tiny_refshapes, train_images_only, tiny_backbones,
                                                     opened, monkeypatch, tmp_path, single_thread):
    from transformers import CLIPModel, CLIPTokenizer

    _, info = tiny_refshapes
    clip_dir = tiny_backbones["clip"]
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    size = CLIPModel.config_class.from_pretrained(clip_dir).vision_config.image_size
    seen = []
    real_forward = CLIPModel.forward

    def record(self, *args, **kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["pixel_values"].detach().clone()))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "forward", record)
    out = pretrain_clip(clip_dir, train_images_only, tmp_path / "clip", steps=3, progress=False)

    assert set(opened) == info["files"]["train"]
    assert len(seen) == 3
    crops, _ = load_crop_pairs(train_images_only, image_size=size)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(clip_dir)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    allowed = ((crops.float() / 255.0 - mean) / std).flatten(1)
    for input_ids, pixels in seen:
        batch_captions = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        batch_captions = [c.strip() for c in batch_captions]
        assert set(batch_captions) <= info["train_captions"], batch_captions
        assert len(set(batch_captions)) == len(batch_captions), "duplicate captions contradict the contrastive targets"
        assert pixels.shape[0] == len(batch_captions)
        distance = torch.cdist(pixels.flatten(1), allowed)
        assert (distance.min(dim=1).values < 1e-4).all(), "a crop that is not a training crop reached CLIP"
    assert (Path(out) / "config.json").is_file()
    assert CLIPModel.from_pretrained(out).config.vision_config.image_size == size
