"""Tests written to kill mutants of `refseg.adapters.fusion` that survived
`bash scripts/mutation_test.sh fusion`.

tests/test_adapters.py checks the fusion adapters mostly at initialisation, where every residual
branch is exactly zero; sign flips of a residual sum, a dropped padding mask or a wrong attention
scale are invisible there. These tests randomise all parameters first and compare against the
equations written out by hand, and pin the constructor defaults and the options passed down.
"""

import math

import pytest
import torch

from refseg.adapters.fusion import FusionAttention, PostFusionLayer, PreFusionAdapter

from conftest import randomise_parameters as _randomise


def _reference_attention(attn, queries, keys, mask=None):
    """Multi-head attention written out: softmax(q k^T * exp(t_h) / sqrt(d_h)) v."""
    b, nq, d = queries.shape
    h, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(queries).view(b, nq, h, hd).transpose(1, 2)
    k = attn.k_proj(keys).view(b, keys.shape[1], h, hd).transpose(1, 2)
    v = attn.v_proj(keys).view(b, keys.shape[1], h, hd).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if attn.temperature is not None:
        logits = logits * attn.temperature.exp()[None, :, None, None]
    if mask is not None:
        logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ v  # (b, h, nq, hd)
    out = out.permute(0, 2, 1, 3).reshape(b, nq, d)
    return attn.out_proj(out)


def _inputs(seed=1, b=2, nv=5, nt=4, dv=8, dt=8):
    g = torch.Generator().manual_seed(seed)
    vision = torch.randn(b, nv, dv, generator=g)
    text = torch.randn(b, nt, dt, generator=g)
    mask = torch.ones(b, nt, dtype=torch.long)
    mask[0, -2:] = 0  # two padding tokens in the first sample
    text[0, -2:] = 50.0  # garbage in the padding: visible if it is ever attended to
    return vision, text, mask


@pytest.mark.parametrize("learnable_temperature", [False, True])
def test_fusion_attention_matches_the_written_out_equation(learnable_temperature):
    attn = _randomise(FusionAttention(8, 2, learnable_temperature=learnable_temperature)).eval()
    vision, text, mask = _inputs()
    torch.testing.assert_close(attn(vision, text, mask), _reference_attention(attn, vision, text, mask))
    torch.testing.assert_close(attn(text, vision), _reference_attention(attn, text, vision))


def test_fusion_attention_dropout_only_while_training():
    attn = _randomise(FusionAttention(8, 2, dropout=0.5))
    vision, text, mask = _inputs()
    attn.eval()
    torch.testing.assert_close(attn(vision, text, mask), _reference_attention(attn, vision, text, mask))
    attn.train()
    torch.manual_seed(0)
    noisy = attn(vision, text, mask)
    assert not torch.allclose(noisy, _reference_attention(attn, vision, text, mask))


def test_fusion_attention_has_no_temperature_by_default():
    assert FusionAttention(8, 2).temperature is None
    assert FusionAttention(8, 2, learnable_temperature=True).temperature.shape == (2,)


def _reference_prefusion(adapter, vision, text, mask):
    sv = adapter.norm_shared_vision(adapter.v2s(adapter.norm_vision(vision)))
    st = adapter.norm_shared_text(adapter.t2s(adapter.norm_text(text)))
    fused_v = adapter.s2v(_reference_attention(adapter.vision_cross_attn, sv, st, mask))
    fused_t = adapter.s2t(_reference_attention(adapter.text_cross_attn, st, sv))
    if adapter.vision_scale is not None:
        fused_v, fused_t = fused_v * adapter.vision_scale, fused_t * adapter.text_scale
    return vision + fused_v, text + fused_t


@pytest.mark.parametrize("channel_scale", [False, True])
def test_prefusion_adds_both_branches_to_the_residual(channel_scale):
    adapter = _randomise(PreFusionAdapter(8, 8, 8, 2, channel_scale=channel_scale, learnable_temperature=True))
    adapter.eval()
    vision, text, mask = _inputs()
    out_v, out_t = adapter(vision, text, mask)
    ref_v, ref_t = _reference_prefusion(adapter, vision, text, mask)
    torch.testing.assert_close(out_v, ref_v)
    torch.testing.assert_close(out_t, ref_t)


def test_prefusion_defaults_and_options_reach_the_submodules():
    plain = PreFusionAdapter(8, 6, 4, 2)
    assert plain.vision_scale is None and plain.text_scale is None
    assert plain.vision_cross_attn.temperature is None and plain.text_cross_attn.temperature is None
    assert plain.vision_cross_attn.dropout == 0.0 and plain.scale_init == 1.0
    assert all(n.eps == 1e-5 for n in (plain.norm_vision, plain.norm_text, plain.norm_shared_vision,
                                         plain.norm_shared_text))
    full = PreFusionAdapter(8, 6, 4, 2, learnable_temperature=True, channel_scale=True, scale_init=0.5,
                            dropout=0.1, layer_norm_eps=1e-6)
    assert full.vision_cross_attn.temperature is not None and full.text_cross_attn.temperature is not None
    assert full.vision_cross_attn.dropout == 0.1 and full.text_cross_attn.dropout == 0.1
    assert full.vision_scale.shape == (8,) and full.text_scale.shape == (6,)
    torch.testing.assert_close(full.vision_scale.detach(), torch.full((8,), 0.5))
    assert all(n.eps == 1e-6 for n in (full.norm_vision, full.norm_text, full.norm_shared_vision,
                                         full.norm_shared_text))


def _reference_postfusion(layer, vision, text, mask):
    n = layer.norms
    s = (lambda name: layer.scales[name]) if layer.scales is not None else (lambda name: 1.0)
    v_in, t_in = n["cross_vision"](vision), n["cross_text"](text)
    v = vision + s("cross_vision") * _reference_attention(layer.vision_cross_attn, v_in, t_in, mask)
    t = text + s("cross_text") * _reference_attention(layer.text_cross_attn, t_in, v_in)
    v_norm, t_norm = n["self_vision"](v), n["self_text"](t)
    v = v + s("self_vision") * _reference_attention(layer.vision_self_attn, v_norm, v_norm)
    t = t + s("self_text") * _reference_attention(layer.text_self_attn, t_norm, t_norm, mask)
    v = v + s("mlp_vision") * layer.vision_mlp(n["mlp_vision"](v))
    t = t + s("mlp_text") * layer.text_mlp(n["mlp_text"](t))
    return v, t


@pytest.mark.parametrize("channel_scale", [False, True])
def test_postfusion_matches_the_written_out_block(channel_scale):
    layer = _randomise(PostFusionLayer(8, 2, channel_scale=channel_scale, learnable_temperature=True)).eval()
    vision, text, mask = _inputs()
    out_v, out_t = layer(vision, text, mask)
    ref_v, ref_t = _reference_postfusion(layer, vision, text, mask)
    torch.testing.assert_close(out_v, ref_v)
    # padding rows of the text stream carry garbage, compare the real tokens
    torch.testing.assert_close(out_t[mask.bool()], ref_t[mask.bool()])


def test_postfusion_defaults():
    layer = PostFusionLayer(8, 2)
    assert layer.vision_mlp.fc1.out_features == 32 and layer.text_mlp.fc1.out_features == 32  # mlp_ratio 4
    assert layer.scales is None and layer.scale_init == 1.0
    assert all(norm.eps == 1e-5 for norm in layer.norms.values())
    assert layer.vision_cross_attn.temperature is None and layer.vision_cross_attn.dropout == 0.0
    assert PostFusionLayer(8, 2, layer_norm_eps=1e-6).norms["mlp_text"].eps == 1e-6
