"""Promptable-segmentation pretraining of a tiny SAM on RefShapes training images.

RISAM keeps SAM's image encoder frozen and reads its global-attention blocks as features, trusting
that a pretrained SAM already tells objects apart: SA-1B taught it where every object begins and
ends. The quickstart cannot download a pretrained SAM, and a *random* tiny SAM's encoder features
are a fixed random projection of the pixels; frozen, they cannot carry the task. So before the
quickstart trains RISAM, it gives the tiny SAM what SA-1B brings, with SAM's own objective: for an
object of a *training* image, a point prompt (a random pixel of its mask) or a box prompt (its box,
jittered), go through the stock `SamProcessor` geometry (longest side resized to the SAM image size,
padding, prompt coordinates scaled alike) and the stock `SamModel(..., multimask_output=False)`;
its low-resolution mask is scored against the object's mask in the same frame (the processor's
`segmentation_maps` path) with focal (gamma 2) + dice losses (`refseg.losses`) and its IoU
prediction against the mask's actual IoU (mean squared error, as in SAM). Every part of SAM trains:
image encoder, prompt encoder and mask decoder. No text is involved, and the images of the val, test
and unseen splits (and so the `unseen` colour-shape pairs) are never read.

Two departures from SAM's recipe, both for a SAM trained from random weights in a few hundred steps:

- Focal and dice weigh 1 : 1, not SAM's 20 : 1. RefShapes objects cover about 3% of the frame, and
  with the focal term twenty times the dice term (alpha 0.25 weighting the positives down) the tiny
  SAM settles on "all background" (IoU 0 after 100 steps) and stays there.
- `positional_embedding_std`: transformers initialises SAM's random Fourier position matrix
  (`shared_image_embedding.positional_embedding`, shared with the prompt encoder) with std
  `vision_config.hidden_size // 2` (16 for the tiny SAM, 384 for ViT-B), where SAM's
  `PositionEmbeddingRandom` draws it with std 1 (in a real checkpoint it is loaded, so this only
  matters from random weights). At std 16 the encodings alias on the 16 x 16 embedding grid: the
  decoder cannot tell where a point is, and SAM learns to segment every object whatever the
  prompt (point-prompt IoU stuck near 0.23 after 600 steps, about one over the objects per image).
  Re-drawn at std 1, the prompts start to count after a few hundred steps (0.39 at 600).

`evaluate_point_prompts` scores a SAM on held-out objects (one random interior point each; masks
post-processed to the image size by the processor), which is how the tests check that the
pretraining taught the encoder something.
"""

import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..losses import dice_loss, sigmoid_focal_loss

logger = logging.getLogger(__name__)


def _split_image_ids(data_root: Path, dataset: str, split_by: str, split: str) -> set:
    from ..data import load_refs_pickle

    refs_path = data_root / dataset / f"refs({split_by}).p"
    if not refs_path.is_file():
        raise ValueError(f"`data_root`: no refs file {refs_path} (dataset={dataset!r}, split_by={split_by!r})")
    refs = load_refs_pickle(refs_path)
    return {ref["image_id"] for ref in refs if ref["split"] == split}


def load_prompt_data(data_root, processor, *, split: str = "train", dataset: str = "refshapes",
                     split_by: str = "unc", image_root=None) -> list:
    """Every object of the images of `split`, prepared for prompting SAM through `processor`.

    Images of `split` are those of refs whose split is `split`; every annotated object of such an
    image is kept, and no other image file is opened. Returns one dict per image (sorted by image id):

    - `pixel_values`: float tensor (3, S, S), the processor's resized, normalised, padded image;
    - `original_size`, `reshaped_size`: (h, w) before and after the resize;
    - `scale`: (x, y) factors mapping image coordinates to the model's frame (the processor's
      `_normalize_coordinates`: new size / old size per axis);
    - `objects`: per object `{"labels": bool tensor (m, m)` the mask in the low-resolution output
      frame (processor `segmentation_maps`), `"pixels"`: int array (n, 2) of the mask's (x, y)
      pixels in the image, `"box"`: (x1, y1, x2, y2) in the image, inclusive pixel corners,
      `"mask"`: the full-size bool mask (h, w)`}.
    """
    from ..data import decode_segmentation

    data_root = Path(data_root)
    image_root = Path(image_root) if image_root else data_root / "images"
    instances = data_root / dataset / "instances.json"
    if not instances.is_file():
        raise ValueError(f"`data_root`: no COCO instances file {instances}")
    keep = _split_image_ids(data_root, dataset, split_by, split)
    with open(instances) as f:
        coco = json.load(f)
    images = {im["id"]: im for im in coco["images"] if im["id"] in keep}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        if ann["image_id"] in images:
            by_image[ann["image_id"]].append(ann)
    records = []
    for image_id in sorted(by_image):
        info = images[image_id]
        image = Image.open(image_root / info["file_name"]).convert("RGB")
        width, height = image.size
        masks = [decode_segmentation(ann["segmentation"], height, width, where=f"annotation {ann['id']}")
                 for ann in by_image[image_id]]
        keep_masks = [(ann, mask) for ann, mask in zip(by_image[image_id], masks) if mask.any()]
        if not keep_masks:
            continue
        encoding = processor(images=[image], segmentation_maps=[m.astype(np.uint8) for _, m in keep_masks],
                             return_tensors="pt")
        original = tuple(int(v) for v in encoding["original_sizes"][0])
        reshaped = tuple(int(v) for v in encoding["reshaped_input_sizes"][0])
        objects = []
        for (ann, mask), labels in zip(keep_masks, encoding["labels"]):
            ys, xs = np.nonzero(mask)
            objects.append({
                "labels": labels.bool(),
                "pixels": np.stack([xs, ys], axis=1).astype(np.int32),
                "box": (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())),
                "mask": mask,
                "ann_id": ann["id"],
            })
        records.append({
            "image_id": image_id,
            "pixel_values": encoding["pixel_values"][0],
            "original_size": original,
            "reshaped_size": reshaped,
            "scale": (reshaped[1] / original[1], reshaped[0] / original[0]),
            "objects": objects,
        })
    if not records:
        raise ValueError(f"`data_root`: no annotated objects in the {split!r} images of {data_root / dataset}")
    return records


def _prompts(records, picks, kind: str, rng: np.random.Generator, box_jitter: float):
    """Model-frame prompts for the (image, objects) `picks`: points (G, K, 1, 2) or boxes (G, K, 4)."""
    prompts = []
    for r, objects in picks:
        record = records[r]
        sx, sy = record["scale"]
        height, width = record["original_size"]
        row = []
        for o in objects:
            obj = record["objects"][o]
            if kind == "point":
                x, y = obj["pixels"][rng.integers(len(obj["pixels"]))]
                row.append([[x * sx, y * sy]])
            else:
                x1, y1, x2, y2 = obj["box"]
                if box_jitter > 0:
                    side = np.array([x2 - x1 + 1, y2 - y1 + 1, x2 - x1 + 1, y2 - y1 + 1])
                    noise = np.clip(rng.normal(0.0, box_jitter, 4), -2 * box_jitter, 2 * box_jitter) * side
                    x1, y1, x2, y2 = np.array([x1, y1, x2, y2]) + noise
                    x1, x2 = np.clip(sorted((x1, x2)), 0, width - 1)
                    y1, y2 = np.clip(sorted((y1, y2)), 0, height - 1)
                row.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
        prompts.append(row)
    return torch.tensor(prompts, dtype=torch.float32)


def prompt_loss(model, records, picks, kind: str, rng: np.random.Generator, *, box_jitter: float = 0.1,
                focal_weight: float = 1.0, dice_weight: float = 1.0, iou_weight: float = 1.0):
    """SAM's loss on `picks` = [(record index, [object indices])] (same object count per image),
    each image encoded once for all its objects, every object prompted by a point or a box (`kind`).

    Returns `(loss, num_objects)`: focal (gamma 2) and dice on the low-resolution masks, MSE between
    the predicted and the actual IoU of the thresholded masks.
    """
    pixel_values = torch.stack([records[r]["pixel_values"] for r, _ in picks])
    targets = torch.stack([torch.stack([records[r]["objects"][o]["labels"] for o in objects])
                           for r, objects in picks]).float()  # (G, K, m, m)
    prompts = _prompts(records, picks, kind, rng, box_jitter)
    if kind == "point":
        outputs = model(pixel_values=pixel_values, input_points=prompts,
                        input_labels=torch.ones(prompts.shape[:3], dtype=torch.long), multimask_output=False)
    else:
        outputs = model(pixel_values=pixel_values, input_boxes=prompts, multimask_output=False)
    logits = outputs.pred_masks[:, :, 0]  # (G, K, m, m)
    if logits.shape != targets.shape:
        raise ValueError(f"SAM's low-resolution masks {tuple(logits.shape)} do not match the processor's mask "
                         f"frame {tuple(targets.shape)}: `mask_size`/`mask_pad_size` must be a quarter of the image size")
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten(0, 1)
    loss = (focal_weight * sigmoid_focal_loss(flat_logits, flat_targets, gamma=2.0)
            + dice_weight * dice_loss(flat_logits, flat_targets))
    if iou_weight:
        with torch.no_grad():
            predicted = (flat_logits > 0).flatten(1)
            truth = flat_targets.bool().flatten(1)
            union = (predicted | truth).sum(1).clamp(min=1)
            actual_iou = (predicted & truth).sum(1) / union
        loss = loss + iou_weight * torch.nn.functional.mse_loss(outputs.iou_scores.flatten(), actual_iou)
    return loss, flat_logits.shape[0]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")


def _save_atomically(model, processor, output_dir: Path) -> None:
    """Write into a sibling temporary folder, then rename it to `output_dir` (replacing an old one)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_dir.exists():
        output_dir.rename(old)
    tmp.rename(output_dir)
    if old.exists():
        shutil.rmtree(old)


def pretrain_sam(sam_dir, data_root, output_dir, *, steps: int = 800, learning_rate: float = 2e-3,
                 batch_size: int = 4, objects_per_image: int = 4, box_probability: float = 0.5,
                 box_jitter: float = 0.1, weight_decay: float = 0.01, warmup_steps: int = 50,
                 max_grad_norm: float = 1.0, focal_weight: float = 1.0, dice_weight: float = 1.0,
                 iou_weight: float = 1.0, positional_embedding_std: Optional[float] = None, seed: int = 0,
                 dataset: str = "refshapes", split_by: str = "unc", image_root=None,
                 progress: bool = True) -> Path:
    """Fine-tune every part of the `SamModel` in `sam_dir` on point/box prompts of training objects.

    Each step draws `batch_size` training images (without replacement while there are enough), and
    `objects_per_image` of each one's objects (with replacement only when it has fewer); each image
    is prompted by boxes with probability `box_probability`, else by points, and encoded once for
    all its objects. AdamW at `learning_rate` with `warmup_steps` of linear warm-up, then linear decay
    to zero; gradients clipped to `max_grad_norm` (0 disables). Deterministic for `seed` on a given
    machine and thread count.

    Args:
        sam_dir: folder (or Hub id) of a `SamModel` and its `SamProcessor`.
        data_root: refer-format root holding `<dataset>/refs(<split_by>).p`, `<dataset>/instances.json`
            and the images (`image_root`, default `<data_root>/images`); only the images of refs whose
            split is "train" are read.
        output_dir: where the trained `SamModel` (safetensors) and the processor go; written to a
            temporary sibling folder first and renamed, so it is either complete or absent.
        box_jitter: std of the noise added to each box coordinate, as a fraction of the box side
            (clipped at two std), as SAM's training does.
        focal_weight, dice_weight, iou_weight: loss weights (SAM: 20 : 1 : 1; see the module docstring).
        positional_embedding_std: when given, SAM's random Fourier position matrix is re-drawn from
            N(0, std^2) (seeded by `seed`) before training. Pass 1.0 (SAM's own scale) for a randomly
            initialised transformers `SamModel` (see the module docstring); never for a pretrained one.

    Returns:
        `Path`: `output_dir`.
    """
    from transformers import SamModel, SamProcessor

    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("objects_per_image", objects_per_image)
    if not learning_rate >= 0:
        raise ValueError(f"`learning_rate` must be >= 0, got {learning_rate!r}")
    if not 0.0 <= box_probability <= 1.0:
        raise ValueError(f"`box_probability` must be in [0, 1], got {box_probability!r}")
    if not box_jitter >= 0:
        raise ValueError(f"`box_jitter` must be >= 0, got {box_jitter!r}")
    if positional_embedding_std is not None and not positional_embedding_std > 0:
        raise ValueError(f"`positional_embedding_std` must be > 0 or None, got {positional_embedding_std!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ValueError(f"`data_root`: {data_root} is not a folder")

    model = SamModel.from_pretrained(sam_dir)
    processor = SamProcessor.from_pretrained(sam_dir)
    records = load_prompt_data(data_root, processor, split="train", dataset=dataset, split_by=split_by,
                               image_root=image_root)
    logger.info("SAM pretraining on %d objects of %d training images, %d steps of %d images x %d objects",
                sum(len(r["objects"]) for r in records), len(records), steps, batch_size, objects_per_image)

    if positional_embedding_std is not None:
        table = model.shared_image_embedding.positional_embedding  # the prompt encoder's is the same tensor
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            table.copy_(torch.randn(table.shape, generator=generator) * positional_embedding_std)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    model.train()
    bar = tqdm(range(steps), desc="SAM pretraining", disable=not progress)
    for _ in bar:
        images = rng.choice(len(records), size=batch_size, replace=len(records) < batch_size)
        groups = {"point": [], "box": []}
        for r in images:
            n = len(records[r]["objects"])
            objects = rng.choice(n, size=objects_per_image, replace=n < objects_per_image).tolist()
            groups["box" if rng.random() < box_probability else "point"].append((int(r), objects))
        total, count = 0.0, 0
        for kind, picks in groups.items():
            if picks:
                loss, n = prompt_loss(model, records, picks, kind, rng, box_jitter=box_jitter,
                                      focal_weight=focal_weight, dice_weight=dice_weight, iou_weight=iou_weight)
                total, count = total + loss * n, count + n
        loss = total / count
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    logger.info("SAM pretraining: last loss %.4f", loss.item())
    output_dir = Path(output_dir)
    _save_atomically(model.eval(), processor, output_dir)
    logger.info("Saved the pretrained SAM to %s", output_dir)
    return output_dir


@torch.no_grad()
def evaluate_point_prompts(model, processor, data_root, *, split: str = "val", seed: int = 0,
                           dataset: str = "refshapes", split_by: str = "unc", image_root=None,
                           records: Optional[list] = None) -> float:
    """Mean IoU of `model`'s masks for one random interior point per object of the `split` images.

    Masks are the single-mask outputs post-processed to the image size by the processor
    (`post_process_masks`, threshold 0), compared with the full-size object masks. `records`
    (from `load_prompt_data`) skips reading the data again.
    """
    if records is None:
        records = load_prompt_data(data_root, processor, split=split, dataset=dataset, split_by=split_by,
                                   image_root=image_root)
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    ious = []
    for r, record in enumerate(records):
        objects = list(range(len(record["objects"])))
        points = _prompts(records, [(r, objects)], "point", rng, 0.0)
        outputs = model(pixel_values=record["pixel_values"][None], input_points=points,
                        input_labels=torch.ones(points.shape[:3], dtype=torch.long), multimask_output=False)
        masks = processor.image_processor.post_process_masks(
            [outputs.pred_masks[0]], [record["original_size"]], [record["reshaped_size"]])[0][:, 0]
        for o, predicted in zip(objects, masks):
            truth = torch.from_numpy(record["objects"][o]["mask"])
            ious.append(((predicted & truth).sum() / (predicted | truth).sum().clamp(min=1)).item())
    model.train(was_training)
    return float(np.mean(ious))


__all__ = ["evaluate_point_prompts", "load_prompt_data", "pretrain_sam", "prompt_loss"]
