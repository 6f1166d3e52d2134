"""A freshly built RISCLIP is CLIP's MaskCLIP: every fusion branch starts at zero (paper, Appendix A)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from refseg import RisclipModel, RisclipProcessor
from refseg.adapters.fusion import PostFusionLayer, PreFusionAdapter

pytestmark = pytest.mark.usefixtures("single_thread")


def maskclip_map(clip: CLIPModel, pixel_values, input_ids, attention_mask, scale: float, bias: float):
    """`scale * cos(MaskCLIP patch tokens, [EOS]) + bias` from the stock modules alone, (B, h, w).

    MaskCLIP's dense path: the last image layer's attention is replaced by `out_proj(v_proj(LN1(x)))`,
    so every patch token keeps its own value; then CLIP's final LN and projection.
    """
    vision = clip.vision_model
    hidden = vision(pixel_values=pixel_values, output_hidden_states=True,
                    interpolate_pos_encoding=True).hidden_states[-2]  # input of the last layer
    last = vision.encoder.layers[-1]
    x = hidden + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden)))
    x = x + last.mlp(last.layer_norm2(x))
    patches = clip.visual_projection(vision.post_layernorm(x))[:, 1:]
    text = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    eos = clip.text_projection(text[torch.arange(len(text)), attention_mask.sum(-1) - 1])
    cosine = F.cosine_similarity(patches, eos[:, None], dim=-1)
    side = math.isqrt(patches.shape[1])
    return (scale * cosine + bias).view(-1, side, side)


@pytest.mark.parametrize("techniques", [False, True], ids=["plain", "temperature+scalers"])
def test_fresh_risclip_map_is_the_maskclip_map_of_the_stock_clip(tiny_backbones, make_scene, techniques):
    clip_dir = tiny_backbones["clip"]
    options = dict(learnable_attention_temperature=techniques, adapter_channel_scale=techniques)
    torch.manual_seed(0)
    model = RisclipModel.from_backbones(clip=clip_dir, image_size=64, **options).eval()
    processor = RisclipProcessor.from_backbones(clip=clip_dir, image_size=64)
    inputs = processor(images=[make_scene(), make_scene(40, 70)],
                       text=["the red circle", "the blue square on the right"], return_tensors="pt")
    inputs.pop("original_sizes")
    stock = CLIPModel.from_pretrained(clip_dir).eval()
    config = model.config
    with torch.no_grad():
        coarse = model(**inputs).coarse_logits
        expected = maskclip_map(stock, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                                config.locator_logit_scale_init, config.locator_logit_bias_init)
    assert coarse.shape == expected.shape == (2, 8, 8)
    assert torch.allclose(coarse, expected, atol=1e-5), (coarse - expected).abs().max()
    # the map depends on the text, so equality above is not two constant maps agreeing
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)


def test_every_fusion_branch_starts_at_zero_and_scalers_exist():
    torch.manual_seed(0)
    post = PostFusionLayer(16, 4, channel_scale=True, scale_init=0.5, learnable_temperature=True)
    pre = PreFusionAdapter(24, 20, 16, 4, channel_scale=True)
    v, t = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out_v, out_t = post(v, t, mask)
    assert torch.equal(out_v, v) and torch.equal(out_t, t)
    vv, tt = torch.randn(2, 9, 24), torch.randn(2, 5, 20)
    out_vv, out_tt = pre(vv, tt, mask)
    assert torch.equal(out_vv, vv) and torch.equal(out_tt, tt)
    # six channel scalers, one per residual branch, at the configured value
    assert sorted(post.scales) == sorted(PostFusionLayer.BRANCHES)
    assert all(torch.equal(s, torch.full((16,), 0.5)) for s in post.scales.values())
    # the scalers act: once the branches are non-zero, halving a scaler halves its branch
    with torch.no_grad():
        for mlp in (post.vision_mlp, post.text_mlp):
            torch.nn.init.normal_(mlp.fc2.weight)
        branch = post(v, t, mask)[0] - v
        post.scales["mlp_vision"].mul_(0.5)
        halved = post(v, t, mask)[0] - v
    assert torch.allclose(halved, branch * 0.5, atol=1e-5)
