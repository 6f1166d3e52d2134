"""scripts/research/probe_token_shape.py: labels sit on the objects, the two probes share the CLIP's
token grid, and the reported accuracy is over the held-out scenes' object tokens only."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoImageProcessor, CLIPConfig

from refseg.data.refshapes_lang import SHAPES

_PROBE = Path(__file__).resolve().parents[2] / "scripts" / "research" / "probe_token_shape.py"
_spec = importlib.util.spec_from_file_location("probe_token_shape", _PROBE)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _saturated(pixels):
    """(3, H, W) in [0, 1] -> (H, W) bool: channel spread of at least 80/255 (objects; backgrounds stay below 60)."""
    return (pixels.max(0).values - pixels.min(0).values) >= 80 / 255


def test_labels_mark_the_cells_the_objects_cover():
    rng = np.random.default_rng(0)
    on, off = [], []
    for _ in range(20):
        pixels, labels = probe.draw_scene(rng, 96, 12)
        assert pixels.shape == (3, 96, 96) and labels.shape == (144,) and labels.dtype == torch.int64
        assert ((labels == -1) | ((labels >= 0) & (labels < len(SHAPES)))).all()
        cells = _saturated(pixels).float().reshape(12, 8, 12, 8).mean((1, 3)).flatten()  # saturated share per cell
        on.append(cells[labels >= 0])
        off.append(cells[labels < 0])
    on, off = torch.cat(on), torch.cat(off)
    assert len(on) > 100  # every scene has objects
    assert on.mean() > 0.8 and off.mean() < 0.3  # a flipped or transposed grid would mix the two


def test_both_probes_predict_on_the_clip_token_grid():
    x = torch.rand(2, 3, 96, 96)
    assert probe.ConvProbe(6, stride=8)(x).shape == (2, 144, 6)
    assert probe.ConvProbe(6, stride=16)(x).shape == (2, 36, 6)
    with pytest.raises(ValueError, match="stride"):
        probe.ConvProbe(6, stride=7)


class _FixedLogits(nn.Module):
    """Returns the same (B, tokens, classes) logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, pixel_values):
        return self.logits


def test_scoring_counts_object_tokens_only():
    # 2 images x 4 tokens; -1 = background. Predictions: right on 3 of the 5 object tokens, and
    # class 0 on every background token (which would count as wrong if background were scored).
    labels = torch.tensor([2, -1, 0, -1, 5, 1, -1, 3])
    predicted = torch.tensor([2, 0, 1, 0, 5, 1, 0, 4])
    model = _FixedLogits(nn.functional.one_hot(predicted, len(SHAPES)).float().view(2, 4, -1))
    assert probe.token_shape_accuracy(model, torch.zeros(2, 3, 8, 8), labels) == {
        "accuracy": pytest.approx(3 / 5), "scored_tokens": 5}
    with pytest.raises(ValueError, match="labels"):
        probe.token_shape_accuracy(model, torch.zeros(2, 3, 8, 8), labels[:4])


class _HeldOutOracle(nn.Module):
    """Recognises the held-out scenes by their pixels: on the even-numbered ones it predicts every
    object token right, on the odd-numbered ones every object token wrong, and class 0 on background.
    Any other image (a training scene) gets class 0 on every token. A trainable bias lets the probe's
    optimizer run; its few small steps cannot overturn the margin of 10."""

    def __init__(self, val_pixels, val_labels, grid):
        super().__init__()
        self.val_pixels = val_pixels.flatten(1)
        labels = val_labels.view(len(val_pixels), grid * grid)
        right_on_even = torch.where(torch.arange(len(labels))[:, None] % 2 == 0, labels, (labels + 1) % len(SHAPES))
        self.val_predictions = torch.where(labels >= 0, right_on_even, torch.zeros_like(labels))
        self.bias = nn.Parameter(torch.zeros(len(SHAPES)))

    def forward(self, pixel_values):
        distance, index = torch.cdist(pixel_values.flatten(1), self.val_pixels).min(1)
        predictions = torch.where((distance < 1e-3)[:, None], self.val_predictions[index], 0)
        return 10 * nn.functional.one_hot(predictions, len(SHAPES)).float() + self.bias


def _held_out_tokens(clip_dir, seed, num_scenes):
    """The held-out scenes as the probe normalises them, their labels and the grid, rebuilt here."""
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    vision = CLIPConfig.from_pretrained(clip_dir).vision_config
    image_size, grid = vision.image_size, vision.image_size // vision.patch_size
    pixels, labels = probe.held_out_scenes(seed, num_scenes, image_size, grid)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std, labels, grid


def test_reported_accuracy_is_over_the_held_out_object_tokens(tiny_backbones, monkeypatch):
    # A probe scored on training scenes, or on background tokens, gets neither number below.
    clip_dir = str(tiny_backbones["clip"])
    val_pixels, val_labels, grid = _held_out_tokens(clip_dir, seed=0, num_scenes=6)
    oracle = _HeldOutOracle(val_pixels, val_labels, grid)
    monkeypatch.setattr(probe, "ConvProbe", lambda num_classes, stride: oracle)
    result = probe.main(["--arch", "cnn", "--clip", clip_dir, "--steps", "2", "--eval_every", "1",
                         "--val_scenes", "6", "--batch_size", "2", "--seed", "0", "--json"])
    per_scene = (val_labels.view(6, grid * grid) >= 0).sum(1)
    assert per_scene.min() > 0
    assert result["val_scored_tokens"] == int(per_scene.sum())
    assert result["val_token_shape_accuracy"] == pytest.approx(per_scene[::2].sum().item() / per_scene.sum().item())
    assert [h["val_scored_tokens"] for h in result["history"]] == [int(per_scene.sum())] * 2


@pytest.mark.parametrize("arch", ["clip", "cnn"])
def test_probe_runs_and_scores_held_out_tokens(tiny_backbones, arch):
    clip_dir = str(tiny_backbones["clip"])
    result = probe.main(["--arch", arch, "--clip", clip_dir, "--steps", "3",
                         "--eval_every", "2", "--val_scenes", "4", "--batch_size", "2", "--json"])
    assert result["grid"] == result["image_size"] // 8
    assert [h["step"] for h in result["history"]] == [2, 3]
    _, val_labels, _ = _held_out_tokens(clip_dir, seed=0, num_scenes=4)
    assert result["val_scored_tokens"] == int((val_labels >= 0).sum()) < len(val_labels)
    assert 0.0 <= result["val_token_shape_accuracy"] <= 1.0
    assert result["val_token_shape_accuracy"] == result["history"][-1]["val_token_shape_accuracy"]


def test_bad_arguments_name_the_flag():
    with pytest.raises(ValueError, match="--steps"):
        probe.main(["--steps", "0"])
