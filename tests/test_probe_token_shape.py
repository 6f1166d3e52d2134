"""scripts/probe_token_shape.py: labels sit on the objects, the two probes share the CLIP's token grid."""

import numpy as np
import pytest
import torch

import probe_token_shape as probe
from refseg.data.refshapes_lang import SHAPES


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


@pytest.mark.parametrize("arch", ["clip", "cnn"])
def test_probe_runs_and_scores_held_out_tokens(tiny_backbones, arch):
    result = probe.main(["--arch", arch, "--clip", str(tiny_backbones["clip"]), "--steps", "3",
                         "--eval_every", "2", "--val_scenes", "4", "--batch_size", "2", "--json"])
    assert result["grid"] == result["image_size"] // 8
    assert [h["step"] for h in result["history"]] == [2, 3]
    assert 0.0 <= result["val_token_shape_accuracy"] <= 1.0
    assert result["val_token_shape_accuracy"] == result["history"][-1]["val_token_shape_accuracy"]


def test_bad_arguments_name_the_flag():
    with pytest.raises(ValueError, match="--steps"):
        probe.main(["--steps", "0"])
