#!/usr/bin/env python
"""Can an image backbone learn, per token, the shape of the object under it? (docs/refshapes-notes.md,
"Why the quickstart stops below 0.6".) A research probe, not a user script.

    python scripts/research/probe_token_shape.py --arch clip [--clip refseg-quickstart/backbones/clip-pretrained]
    python scripts/research/probe_token_shape.py --arch cnn

Every step draws `--batch_size` new RefShapes scenes (training colour–shape pairs only, so no
scene is seen twice) at the CLIP's input size. Each grid cell at least half covered by an object
is labelled with that object's shape (6 classes, chance about 1/6). `--arch clip` trains the CLIP
image tower, every weight, with a linear head on its patch tokens; `--arch cnn` trains a small
convolutional net whose output has the same grid (stride = the CLIP's patch size). Reported: the
share of object tokens of `--val_scenes` fixed held-out scenes whose shape is predicted right
(`token_shape_accuracy`; background cells are never scored, and `val_scored_tokens` reports how
many tokens were).
The RISCLIP Locator reads shape from a *frozen* CLIP's patch tokens; this measures how quickly a
backbone can learn to put it there at all.
"""

import argparse
import json
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, CLIPModel

from refseg.backbones import save_tiny_backbones
from refseg.data.refshapes_lang import SEEN_PAIRS, SHAPES
from refseg.data.refshapes_scene import background, compose, place_objects


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("clip", "cnn"), default="clip")
    p.add_argument("--clip", default=None,
                   help="CLIP folder whose image tower (and input size, patch size) to use "
                        "(default: a fresh tiny CLIP from refseg.backbones)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=None, help="default: 1e-3 (clip), 2e-3 (cnn)")
    p.add_argument("--val_scenes", type=int, default=128)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "val_scenes", "eval_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def draw_scene(rng: np.random.Generator, image_size: int, grid: int):
    """One new scene of 2-6 training colour–shape pairs, resized to `image_size`.

    Returns `(pixels, labels)`: pixels `(3, image_size, image_size)` in [0, 1], labels `(grid * grid,)`
    int64 with the shape index (`SHAPES`) of the object covering at least half of each cell (the
    most-covering one), -1 elsewhere.
    """
    while True:
        width, height = (int(v) for v in rng.integers(112, 177, size=2))
        pairs = [SEEN_PAIRS[int(k)] for k in rng.integers(len(SEEN_PAIRS), size=int(rng.integers(2, 7)))]
        drawn = place_objects(rng, width, height, pairs)
        if len(drawn) >= 2:
            break
    image = torch.from_numpy(compose(background(rng, width, height), drawn)).permute(2, 0, 1).float()
    pixels = F.interpolate(image[None], size=(image_size, image_size), mode="bicubic", align_corners=False)
    pixels = pixels.clamp(0, 255).round()[0] / 255
    masks = torch.stack([torch.from_numpy(o.visible.astype(np.float32)) for o in drawn])
    coverage = F.interpolate(masks[:, None], size=(grid, grid), mode="area").flatten(1)  # (objects, grid**2)
    best, index = coverage.max(0)
    shape_of = torch.tensor([SHAPES.index(o.shape) for o in drawn])
    labels = torch.where(best >= 0.5, shape_of[index], torch.full_like(index, -1))
    return pixels, labels


def held_out_scenes(seed: int, num_scenes: int, image_size: int, grid: int):
    """The fixed held-out scenes of a run: `(pixels, labels)` with pixels `(num_scenes, 3, image_size,
    image_size)` in [0, 1] and labels `(num_scenes * grid * grid,)` (see `draw_scene`). They come from
    the random stream `[seed, 1]`; training scenes come from the independent stream `[seed, 2]`."""
    rng = np.random.default_rng([seed, 1])
    scenes = [draw_scene(rng, image_size, grid) for _ in range(num_scenes)]
    return torch.stack([s[0] for s in scenes]), torch.stack([s[1] for s in scenes]).flatten()


def token_shape_accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict:
    """Share of the object tokens (`labels >= 0`) whose shape `model` predicts right.

    `pixel_values` (B, 3, H, W) normalised, `labels` (B * grid * grid,). Background tokens (-1) are
    never scored. Returns `{"accuracy": float, "scored_tokens": int}`; the model is left in train mode.
    """
    model.eval()
    with torch.no_grad():
        pred = model(pixel_values).flatten(0, 1).argmax(-1)
    model.train()
    if pred.shape != labels.shape:
        raise ValueError(
            f"token_shape_accuracy: the model gives {tuple(pred.shape)} tokens, `labels` has {tuple(labels.shape)}"
        )
    keep = labels >= 0
    return {"accuracy": (pred[keep] == labels[keep]).float().mean().item(), "scored_tokens": int(keep.sum())}


class ConvProbe(nn.Module):
    """Five 3x3 conv + BatchNorm + ReLU blocks (widths 32, 64, 64, 64, 64), the first log2(`stride`)
    of stride 2, then a 1x1 classifier: one output per `stride` x `stride` cell, like a ViT's tokens."""

    def __init__(self, num_classes: int, stride: int = 8):
        super().__init__()
        if stride not in (2, 4, 8, 16):
            raise ValueError(f"ConvProbe: stride must be 2, 4, 8 or 16 (the CLIP patch size), got {stride}")
        downs = int(np.log2(stride))
        blocks, cin = [], 3
        for k, cout in enumerate((32, 64, 64, 64, 64)):
            blocks += [nn.Conv2d(cin, cout, 3, 2 if k < downs else 1, 1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, pixel_values):
        """(B, 3, H, W) -> logits (B, grid * grid, num_classes)."""
        return self.head(self.body(pixel_values)).flatten(2).transpose(1, 2)


class ClipProbe(nn.Module):
    """A CLIP image tower with a linear shape head on its patch tokens."""

    def __init__(self, tower: nn.Module, num_classes: int):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.config.hidden_size, num_classes)

    def forward(self, pixel_values):
        """(B, 3, H, W) -> logits (B, grid * grid, num_classes)."""
        return self.head(self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:])


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or str(save_tiny_backbones(tmp, seed=args.seed)["clip"])
        tower = CLIPModel.from_pretrained(clip).vision_model  # the image tower alone
        image_processor = AutoImageProcessor.from_pretrained(clip)
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    image_size, patch = tower.config.image_size, tower.config.patch_size
    grid = image_size // patch
    model = ClipProbe(tower, len(SHAPES)) if args.arch == "clip" else ConvProbe(len(SHAPES), stride=patch)
    lr = args.learning_rate or (1e-3 if args.arch == "clip" else 2e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / args.steps))
    val_pixels, val_labels = held_out_scenes(args.seed, args.val_scenes, image_size, grid)
    val_pixels = (val_pixels - mean) / std
    train_rng = np.random.default_rng([args.seed, 2])  # disjoint from the held-out stream [seed, 1]

    history, start = [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        batch = [draw_scene(train_rng, image_size, grid) for _ in range(args.batch_size)]
        pixels = (torch.stack([s[0] for s in batch]) - mean) / std
        labels = torch.stack([s[1] for s in batch]).flatten()
        loss = F.cross_entropy(model(pixels).flatten(0, 1), labels, ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            val = token_shape_accuracy(model, val_pixels, val_labels)
            history.append({"step": step, "loss": loss.item(), "val_token_shape_accuracy": val["accuracy"],
                            "val_scored_tokens": val["scored_tokens"], "seconds": time.perf_counter() - start})
            if not args.json:
                h = history[-1]
                print(f"step {step:>5}  loss {h['loss']:.3f}  val token shape accuracy "
                      f"{h['val_token_shape_accuracy']:.3f}  {h['seconds']:.0f} s", flush=True)
    result = {"arch": args.arch, "clip": args.clip, "image_size": image_size, "grid": grid,
              "learning_rate": lr, "steps": args.steps, "chance": 1 / len(SHAPES), "history": history,
              "val_token_shape_accuracy": history[-1]["val_token_shape_accuracy"],
              "val_scored_tokens": history[-1]["val_scored_tokens"]}
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
