"""CRIS's options and input checks that mutation testing of `modeling_cris.py` found unheld: the BatchNorm
momentum and the projector's kernel size reach their modules, the presence head trains in the heads' learning-rate
group, and the shape checks of `pixel_values` and `labels` hold at their boundaries with their messages."""

import pytest
import torch
from torch import nn
from transformers import AutoModel

from refseg.presets import get_config


def tiny(**overrides):
    torch.manual_seed(0)
    return AutoModel.from_config(get_config("cris-tiny", **overrides))


def test_batch_norm_momentum_and_projector_kernel_reach_their_modules():
    model = tiny(batch_norm_momentum=0.3, projector_kernel_size=5)
    norms = [m for m in (*model.neck.modules(), *model.projector.modules()) if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.3 for m in norms)
    assert model.projector.kernel_size == 5


def test_the_presence_head_trains_in_the_heads_group():
    model = tiny(no_target_head=True)
    heads = {id(p) for p in model.head_parameters()}
    assert all(id(p) in heads for p in model.no_target_head.parameters())
    assert not heads & {id(p) for p in model.backbone_parameters()}
    assert len(tiny().head_parameters()) == len(heads) - len(list(model.no_target_head.parameters()))


def test_pixel_value_checks_hold_at_their_boundaries():
    model = tiny().eval()
    patch = model.config.patch_size
    ids = torch.randint(1, 500, (1, 5))
    with pytest.raises(ValueError, match=r"`pixel_values` must be \(B, 3, H, W\), got shape \(1, 4, 64, 64\)"):
        model(pixel_values=torch.zeros(1, 4, 64, 64), input_ids=ids)
    with pytest.raises(ValueError, match=r"got shape \(3, 64, 64\)"):
        model(pixel_values=torch.zeros(3, 64, 64), input_ids=ids)
    for height, width in ((2 * patch, patch), (patch, 2 * patch)):  # one token too few on one side only
        with pytest.raises(ValueError, match=f"at least 2 tokens\\), got {height}x{width}"):
            model(pixel_values=torch.zeros(1, 3, height, width), input_ids=ids)
    with torch.no_grad():  # exactly two tokens a side is allowed
        assert model(pixel_values=torch.zeros(1, 3, 2 * patch, 2 * patch), input_ids=ids).logits.shape[0] == 1


def test_label_checks_name_the_expected_shape():
    model = tiny().train()
    size = model.config.image_size
    inputs = {"pixel_values": torch.zeros(2, 3, size, size), "input_ids": torch.randint(1, 500, (2, 5))}
    with pytest.raises(ValueError, match=rf"`labels` must be \(B, H, W\) = \(2, {size}, {size}\)"):
        model(**inputs, labels=torch.zeros(2, 1, size, size))
    with pytest.raises(ValueError, match="`labels` must be"):
        model(**inputs, labels=torch.zeros(3, size, size))
    logits_size = model(**inputs).logits.shape[-2:]
    # labels at the logits' size are used as they are; at the input size they are resized (nearest-exact)
    small = torch.zeros(2, *logits_size)
    small[:, : logits_size[0] // 2] = 1
    big = small.repeat_interleave(size // logits_size[0], 1).repeat_interleave(size // logits_size[1], 2)
    torch.manual_seed(1)
    first = model(**inputs, labels=small).loss
    torch.manual_seed(1)
    torch.testing.assert_close(model(**inputs, labels=big).loss, first)
