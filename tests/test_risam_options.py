"""RISAM's loading, options and checks that mutation testing of `modeling_risam.py` found unheld: `from_backbones`
keeps the checkpoints' weights (a random tower happened to equal the tiny test checkpoint, seed for seed), their
attention implementation (read before building the config resets it) and dtype; the decoder's feed-forward width
and the BatchNorm momentum reach their modules; an encoder made trainable gets gradients; the label message."""

import pytest
import torch
from torch import nn
from transformers import AutoModel, CLIPModel, SamModel

from refseg import RisamModel
from refseg.presets import get_config


@pytest.fixture(scope="module")
def perturbed_backbones(tiny_backbones, tmp_path_factory):
    """The tiny SAM and CLIP with every weight moved off its seeded initial value, saved apart."""
    root = tmp_path_factory.mktemp("perturbed")
    generator = torch.Generator().manual_seed(11)
    out = {}
    for name, cls in (("sam", SamModel), ("clip", CLIPModel)):
        model = cls.from_pretrained(tiny_backbones[name])
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_from_backbones_keeps_the_checkpoints_weights_and_names(perturbed_backbones):
    model = RisamModel.from_backbones(sam=str(perturbed_backbones["sam"]), clip=str(perturbed_backbones["clip"]))
    sam = SamModel.from_pretrained(perturbed_backbones["sam"]).vision_encoder
    clip = CLIPModel.from_pretrained(perturbed_backbones["clip"]).text_model
    for mine, stock in ((model.sam.vision_encoder, sam), (model.clip, clip)):
        theirs = stock.state_dict()
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)
    assert model.config.sam_config._name_or_path == str(perturbed_backbones["sam"])
    assert model.config.clip_config._name_or_path == str(perturbed_backbones["clip"])


def test_from_backbones_honours_the_attention_implementation_and_dtype(tiny_backbones, single_thread):
    model = RisamModel.from_backbones(sam=str(tiny_backbones["sam"]), clip=str(tiny_backbones["clip"]),
                                      attn_implementation="eager", dtype=torch.float64).eval()
    assert model.config._attn_implementation == "eager"
    assert model.sam.config._attn_implementation == model.clip.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.float64}  # the heads too
    size = model.config.image_size
    outputs = model(pixel_values=torch.randn(1, 3, size, size, dtype=torch.float64),
                    input_ids=torch.randint(1, 400, (1, 5)), output_attentions=True)
    assert len(outputs.vision_attentions) == len(model.sam.vision_encoder.layers)
    assert len(outputs.text_attentions) == len(model.clip.encoder.layers)


def test_decoder_width_and_batch_norm_momentum_reach_their_modules():
    torch.manual_seed(0)
    model = AutoModel.from_config(get_config("risam-tiny", decoder_mlp_dim=24, batch_norm_momentum=0.3))
    assert all(layer.mlp is not None and layer.mlp[0].out_features == 24 for layer in model.mask_decoder.layers)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.3 for m in norms)


def test_an_encoder_made_trainable_gets_gradients(single_thread):
    torch.manual_seed(0)
    model = AutoModel.from_config(get_config("risam-tiny")).train()
    model.clip.requires_grad_(True)  # the paper freezes it; a user may not
    size = model.config.image_size
    inputs = {"pixel_values": torch.randn(2, 3, size, size), "input_ids": torch.randint(1, 400, (2, 5))}
    labels = torch.zeros(2, size, size)
    labels[:, : size // 2] = 1
    model(**inputs, labels=labels).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.clip.parameters())
    assert all(p.grad is None for p in model.sam.parameters())  # still frozen: no graph kept through it


def test_label_message_names_the_batch_and_input_size():
    torch.manual_seed(0)
    model = AutoModel.from_config(get_config("risam-tiny")).train()
    size = model.config.image_size
    inputs = {"pixel_values": torch.randn(3, 3, size, size), "input_ids": torch.randint(1, 400, (3, 5))}
    with pytest.raises(ValueError, match=rf"`labels` must be \(B, H, W\) = \(3, {size}, {size}\)"):
        model(**inputs, labels=torch.zeros(3, 7, 7))
