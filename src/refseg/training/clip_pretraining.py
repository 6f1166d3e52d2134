"""Contrastive pretraining of a tiny CLIP on RefShapes object crops.

The quickstart cannot download a pretrained CLIP, and RISCLIP's Locator scores patch tokens against
the expression's [EOS] token in CLIP's joint image-text space, which a random CLIP has not aligned.
So before the quickstart trains RISCLIP (with CLIP frozen, as in the paper), it gives the tiny CLIP
what real CLIP brings: image-text alignment (docs/refshapes-notes.md says what it changes on
RefShapes). Each pair is a crop around one object of a *training* image and the caption
"a <colour> <shape>"; a batch holds distinct colour-shape pairs only, so CLIP's contrastive targets
(`CLIPModel(..., return_loss=True)`) are never contradicted by duplicate captions. Pairs held out
of RefShapes' training images (the `unseen` split's) are therefore never seen by CLIP either.
"""

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _train_image_ids(data_root, dataset: str, split_by: str) -> set:
    from ..data import load_refs_pickle

    refs = load_refs_pickle(Path(data_root) / dataset / f"refs({split_by}).p")
    return {ref["image_id"] for ref in refs if ref["split"] == "train"}


def load_crop_pairs(data_root, *, image_size: int, dataset: str = "refshapes", split_by: str = "unc",
                    image_root=None, context: float = 1.6):
    """Crops around every object of the training images and their captions.

    Returns `(crops, captions)`: uint8 tensor (N, 3, image_size, image_size) and N strings
    "a <colour> <shape>" (colour from the annotation's `attributes`, shape from its category).
    `context` scales the square crop around the object's box, so neighbours show at the edges.
    """
    data_root = Path(data_root)
    image_root = Path(image_root) if image_root else data_root / "images"
    with open(data_root / dataset / "instances.json") as f:
        coco = json.load(f)
    keep = _train_image_ids(data_root, dataset, split_by)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        if ann["image_id"] in keep and "color" in ann.get("attributes", {}):
            by_image[ann["image_id"]].append(ann)
    crops, captions = [], []
    for image_id in sorted(by_image):
        image = Image.open(image_root / files[image_id]).convert("RGB")
        for ann in by_image[image_id]:
            x, y, w, h = ann["bbox"]
            side = max(w, h) * context
            cx, cy = x + w / 2, y + h / 2
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            crop = image.crop(tuple(int(round(v)) for v in box)).resize((image_size, image_size), Image.BILINEAR)
            crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
            captions.append(f"a {ann['attributes']['color']} {names[ann['category_id']]}")
    if not crops:
        raise ValueError(f"no annotated objects with a colour attribute in the training images of {data_root}")
    return torch.stack(crops), captions


def pretrain_clip(clip_dir, data_root, output_dir, *, steps: int = 600, learning_rate: float = 5e-4,
                  weight_decay: float = 0.05, seed: int = 0, progress: bool = True, **crop_kwargs):
    """Train every CLIP parameter contrastively on crop/caption pairs; save model, tokenizer, image processor.

    Returns `output_dir`. Deterministic for `seed` on a given machine and thread count.
    """
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    image_processor = AutoImageProcessor.from_pretrained(clip_dir)
    size = model.config.vision_config.image_size
    crops, captions = load_crop_pairs(data_root, image_size=size, **crop_kwargs)
    groups = defaultdict(list)
    for i, caption in enumerate(captions):
        groups[caption].append(i)
    keys = sorted(groups)
    logger.info("CLIP pretraining on %d crops of %d colour-shape pairs", len(captions), len(keys))
    text = tokenizer(keys, padding=True, return_tensors="pt")
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    model.train()
    bar = tqdm(range(steps), desc="CLIP pretraining", disable=not progress)
    for _ in bar:
        # one random crop of every colour-shape pair: distinct captions, so no false negatives
        picks = [groups[k][rng.integers(len(groups[k]))] for k in keys]
        pixels = (crops[picks].float() / 255.0 - mean) / std
        loss = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                     pixel_values=pixels, return_loss=True).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    output_dir = Path(output_dir)
    model.eval().save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    return output_dir
