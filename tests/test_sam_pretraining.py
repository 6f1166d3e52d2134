"""`refseg.training.sam_pretraining`: the tiny SAM learns objects, from RefShapes' training images only.

The quickstart pretrains the tiny SAM with SAM's promptable-segmentation objective before RISAM
freezes its image encoder; a val/test/unseen image reaching it would leak evaluation data into the
frozen backbone. The leak checks do not trust the module's bookkeeping: every image file it opens
is recorded, the non-training image files are deleted from the dataset copy it reads, and every
`pixel_values` row that reaches `SamModel` is compared with the training images' processed rows.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.data import load_refs_pickle
from refseg.training import sam_pretraining
from refseg.training.sam_pretraining import evaluate_point_prompts, load_prompt_data, pretrain_sam

# ~9 s on one thread. Measured point-prompt IoU on the val objects: random SAM 0.04, after these 60 steps
# 0.19-0.20 (seeds 0, 1, 2): it segments objects (not yet the prompted one alone: that takes a few hundred
# steps, docs in the module). With learning_rate 0: 0.05.
STEPS = 60
SETTINGS = dict(learning_rate=3e-3, batch_size=2, objects_per_image=4, warmup_steps=5, positional_embedding_std=1.0,
                seed=0, progress=False)


def _split_files(root):
    import json

    refs = load_refs_pickle(Path(root) / "refshapes" / "refs(unc).p")
    coco = json.loads((Path(root) / "refshapes" / "instances.json").read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    by_split = {}
    for ref in refs:
        by_split.setdefault(ref["split"], set()).add(files[ref["image_id"]])
    return by_split


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    from transformers import SamProcessor

    return SamProcessor.from_pretrained(tiny_backbones["sam"])


@pytest.fixture(scope="module")
def val_records(refshapes_root, processor):
    return load_prompt_data(refshapes_root, processor, split="val")


@pytest.fixture(scope="module")
def pretrained(tiny_backbones, refshapes_root, tmp_path_factory):
    """The folder of a short pretraining of the session's tiny SAM on the session's RefShapes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("sam-pretraining") / "sam-pretrained"
        return pretrain_sam(tiny_backbones["sam"], refshapes_root, out, steps=STEPS, **SETTINGS)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def train_images_only(refshapes_root, tmp_path):
    """A copy of the dataset whose val/test/unseen image files are gone: reading one fails."""
    copy = tmp_path / "data"
    shutil.copytree(refshapes_root, copy)
    for split, names in _split_files(refshapes_root).items():
        if split != "train":
            for name in names:
                (copy / "images" / name).unlink()
    return copy


def test_pretrained_sam_segments_held_out_objects_better_than_the_random_one(tiny_backbones, pretrained,
                                                                          processor, val_records, single_thread):
    from transformers import SamModel

    assert sum(len(r["objects"]) for r in val_records) >= 15, "too few val objects to measure anything"
    random_iou = evaluate_point_prompts(SamModel.from_pretrained(tiny_backbones["sam"]), processor, None,
                                        records=val_records)
    pretrained_iou = evaluate_point_prompts(SamModel.from_pretrained(pretrained), processor, None,
                                            records=val_records)
    assert random_iou < 0.08, random_iou
    assert pretrained_iou > max(0.12, 2.5 * random_iou), (random_iou, pretrained_iou)


def test_output_folder_loads_offline_as_a_sam_model_and_processor(pretrained, tiny_backbones, processor):
    from transformers import SamModel, SamProcessor

    assert (pretrained / "model.safetensors").is_file()
    assert not list(pretrained.parent.glob(".*tmp*")), "the temporary folder is renamed, not left behind"
    model = SamModel.from_pretrained(pretrained, local_files_only=True)
    loaded = SamProcessor.from_pretrained(pretrained, local_files_only=True)
    assert model.config.to_dict()["vision_config"] == SamModel.from_pretrained(
        tiny_backbones["sam"]).config.to_dict()["vision_config"]
    image = Image.new("RGB", (150, 120), (40, 90, 200))
    ours, stock = loaded(images=image, return_tensors="pt"), processor(images=image, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], stock["pixel_values"])
    # every part trained: the encoder, the prompt encoder and the mask decoder all moved
    random = SamModel.from_pretrained(tiny_backbones["sam"]).state_dict()
    for part in ("vision_encoder.", "prompt_encoder.", "mask_decoder."):
        moved = [k for k, v in model.state_dict().items() if k.startswith(part) and not torch.equal(v, random[k])]
        assert moved, f"no {part} weight changed"


def test_same_seed_gives_the_same_weights(tiny_backbones, refshapes_root, tmp_path, single_thread):
    from safetensors.torch import load_file

    def run(name, seed):
        out = pretrain_sam(tiny_backbones["sam"], refshapes_root, tmp_path / name, steps=3,
                           **{**SETTINGS, "seed": seed})
        return load_file(out / "model.safetensors")

    first, second, other = run("a", 0), run("b", 0), run("c", 1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_pretraining_reads_and_feeds_training_images_only(tiny_backbones, refshapes_root, train_images_only,
                                                          processor, monkeypatch, tmp_path, single_thread):
    from transformers import SamModel

    opened, seen = [], []
    real_open, real_forward = Image.open, SamModel.forward

    def spy_open(fp, *args, **kwargs):
        opened.append(Path(fp).name)
        return real_open(fp, *args, **kwargs)

    def spy_forward(self, *args, **kwargs):
        seen.append(kwargs["pixel_values"].detach().clone())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(sam_pretraining.Image, "open", spy_open)
    monkeypatch.setattr(SamModel, "forward", spy_forward)
    pretrain_sam(tiny_backbones["sam"], train_images_only, tmp_path / "sam", steps=4, **SETTINGS)

    files = _split_files(refshapes_root)
    assert set(opened) == files["train"]
    assert len(opened) == len(set(opened)), "each image is opened once"
    allowed = torch.stack([r["pixel_values"] for r in load_prompt_data(train_images_only, processor)]).flatten(1)
    rows = torch.cat(seen).flatten(1)
    assert rows.shape[0] >= 4 * SETTINGS["batch_size"]
    for row in rows:
        assert (row[None] == allowed).all(dim=1).any(), "a non-training image reached SAM"


def test_prompts_follow_the_stock_processor_geometry(refshapes_root, processor):
    """Points and boxes scaled as `SamProcessor(input_points=/input_boxes=)` scales them; targets are the
    processor's `segmentation_maps` labels, in SAM's low-resolution output frame."""
    records = load_prompt_data(refshapes_root, processor)
    record = records[0]
    image_id = record["image_id"]
    import json

    coco = json.loads((Path(refshapes_root) / "refshapes" / "instances.json").read_text())
    name = next(im["file_name"] for im in coco["images"] if im["id"] == image_id)
    image = Image.open(Path(refshapes_root) / "images" / name).convert("RGB")
    objects = list(range(len(record["objects"])))

    class Fixed:  # the pixel drawn for every object is its first mask pixel
        def integers(self, n):
            return 0

    points = sam_pretraining._prompts(records, [(0, objects)], "point", Fixed(), 0.0)
    raw_points = [[[int(v) for v in record["objects"][o]["pixels"][0]]] for o in objects]
    boxes = sam_pretraining._prompts(records, [(0, objects)], "box", None, 0.0)
    raw_boxes = [list(record["objects"][o]["box"]) for o in objects]
    stock = processor(images=image, input_points=[raw_points], input_boxes=[raw_boxes], return_tensors="pt")
    torch.testing.assert_close(points, stock["input_points"].float())
    torch.testing.assert_close(boxes, stock["input_boxes"].float())
    torch.testing.assert_close(record["pixel_values"], stock["pixel_values"][0])
    size = processor.image_processor.mask_pad_size["height"]
    for o in objects:
        obj = record["objects"][o]
        assert obj["labels"].shape == (size, size) and obj["labels"].any()
        assert obj["mask"][obj["pixels"][:, 1], obj["pixels"][:, 0]].all()


def test_each_prompt_is_scored_against_its_own_object(refshapes_root, processor, tiny_backbones, monkeypatch):
    """The loss compares the mask SAM gives for an object's point (or box) with that object's mask: the
    point lies on the target, the box encloses it (a 60-step run cannot tell: it segments every object)."""
    from transformers import SamModel

    records = load_prompt_data(refshapes_root, processor)
    picks = [(r, list(range(len(records[r]["objects"])))[::-1]) for r in range(3)]
    picks = [(r, objects[:2]) for r, objects in picks]
    seen = {}
    real_forward, real_dice = SamModel.forward, sam_pretraining.dice_loss

    def spy_forward(self, *args, **kwargs):
        seen["prompts"] = kwargs.get("input_points", kwargs.get("input_boxes")).detach().clone()
        out = real_forward(self, *args, **kwargs)
        seen["frame"] = out.pred_masks.shape[-1]
        return out

    def spy_dice(logits, targets, **kwargs):
        seen["targets"] = targets.detach().clone()
        return real_dice(logits, targets, **kwargs)

    monkeypatch.setattr(SamModel, "forward", spy_forward)
    monkeypatch.setattr(sam_pretraining, "dice_loss", spy_dice)
    model = SamModel.from_pretrained(tiny_backbones["sam"])
    rng = np.random.default_rng(0)
    for kind in ("point", "box"):
        loss, count = sam_pretraining.prompt_loss(model, records, picks, kind, rng, box_jitter=0.0)
        assert count == 6 and torch.isfinite(loss)
        targets = seen["targets"].reshape(3, 2, seen["frame"], seen["frame"]).bool()
        down = processor.image_processor.pad_size["height"] / seen["frame"]  # model frame -> mask frame
        for g, (r, objects) in enumerate(picks):
            for k, o in enumerate(objects):
                target = targets[g, k]
                assert torch.equal(target, records[r]["objects"][o]["labels"])
                if kind == "point":
                    x, y = (seen["prompts"][g, k, 0] / down).long().tolist()
                    window = target[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                    assert window.any(), f"point {(x, y)} is off its object's target"
                else:
                    ys, xs = torch.nonzero(target, as_tuple=True)
                    x1, y1, x2, y2 = (seen["prompts"][g, k] / down).tolist()
                    assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1


def test_positional_embedding_std_redraws_the_shared_fourier_matrix(pretrained, tiny_backbones):
    """transformers draws it at std hidden_size // 2 = 16; the quickstart's pretraining re-draws it at SAM's 1."""
    from transformers import SamModel

    random = SamModel.from_pretrained(tiny_backbones["sam"])
    model = SamModel.from_pretrained(pretrained)
    assert random.shared_image_embedding.positional_embedding.std() > 8
    table = model.shared_image_embedding.positional_embedding
    assert 0.5 < table.std() < 2
    assert torch.equal(model.prompt_encoder.shared_embedding.positional_embedding, table)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"objects_per_image": 0}, "objects_per_image"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"box_probability": 1.5}, "box_probability"),
        ({"positional_embedding_std": 0.0}, "positional_embedding_std"),
    ],
)
def test_bad_arguments_raise_value_errors(tiny_backbones, refshapes_root, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pretrain_sam(tiny_backbones["sam"], refshapes_root, tmp_path / "out", **{"steps": 1, **kwargs})
    assert not (tmp_path / "out").exists()


def test_missing_data_raises_a_value_error(tiny_backbones, refshapes_root, tmp_path):
    with pytest.raises(ValueError, match="data_root"):
        pretrain_sam(tiny_backbones["sam"], tmp_path / "nowhere", tmp_path / "out", steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data_root"):
        pretrain_sam(tiny_backbones["sam"], tmp_path / "empty", tmp_path / "out", steps=1)
    # a dataset whose refs hold no training split
    copy = tmp_path / "no-train"
    shutil.copytree(refshapes_root, copy)
    import pickle

    refs = load_refs_pickle(copy / "refshapes" / "refs(unc).p")
    with open(copy / "refshapes" / "refs(unc).p", "wb") as f:
        pickle.dump([{**ref, "split": "val"} for ref in refs], f, protocol=2)
    with pytest.raises(ValueError, match="no annotated objects"):
        pretrain_sam(tiny_backbones["sam"], copy, tmp_path / "out", steps=1)
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_no_output_folder(tiny_backbones, refshapes_root, tmp_path, monkeypatch,
                                               single_thread):
    from transformers import SamProcessor

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SamProcessor, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pretrain_sam(tiny_backbones["sam"], refshapes_root, tmp_path / "out", steps=1, **{**SETTINGS})
    assert not (tmp_path / "out").exists(), "a half-written model would be reused by the quickstart"
