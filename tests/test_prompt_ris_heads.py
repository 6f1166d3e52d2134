"""Prompt-RIS heads, what the equation references (`test_prompt_ris_equations.py`) cannot see: they run one
tiny model whose CLIP towers share a width, so a prompt projected back to the wrong width, a layer count other
than the paper's, or a LayerNorm epsilon left at its default would pass them. Found by mutation testing."""

import pytest
import torch

from refseg.models.prompt_ris.modeling_prompt_ris_heads import (
    PromptRisAttention, PromptRisCrossModalPrompting, PromptRisTextPrompter,
)
from refseg.presets import get_config


def test_prompts_cross_between_towers_of_different_widths():
    """V2L prompts are in the text tower's width, L2V prompts in the image tower's (eqs. 5-6), for every layer."""
    vision_dim, text_dim, n = 24, 16, 3
    cmp = PromptRisCrossModalPrompting(vision_dim, text_dim, num_layers=2, num_tokens=n, hidden_size=8, num_heads=2)
    vision, text = torch.randn(2, 1 + 9, vision_dim), torch.randn(2, 5, text_dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for layer in range(2):
        v2l, l2v = cmp(layer, vision, text, mask)
        assert v2l.shape == (2, n, text_dim) and l2v.shape == (2, n, vision_dim)
        assert cmp.vision_to_language[layer].query_tokens.shape == (n, vision_dim)
        assert cmp.language_to_vision[layer].query_tokens.shape == (n, text_dim)


def test_the_key_layernorms_take_the_towers_epsilon():
    cmp = PromptRisCrossModalPrompting(8, 8, num_layers=1, num_tokens=1, hidden_size=8, num_heads=2,
                                       layer_norm_eps=0.25)
    assert cmp.vision_to_language[0].norm.eps == 0.25 and cmp.language_to_vision[0].norm.eps == 0.25


def test_layer_counts_follow_the_config_and_the_paper_preset():
    """Two text-prompt blocks (Sec. 3.1), CMP at every CLIP layer with n = 16 (Sec. 3.2), in `prompt-ris-b`."""
    config = get_config("prompt-ris-b")
    assert config.text_prompt_num_layers == 2 and config.num_prompt_tokens == 16
    assert config.num_cmp_layers == config.clip_config.vision_config.num_hidden_layers == 12
    prompter = PromptRisTextPrompter(text_dim=8, hidden_size=8, num_layers=3, num_heads=2, mlp_dim=16)
    assert len(prompter.layers) == 3


def test_attention_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="num_heads"):
        PromptRisAttention(8, 8, hidden_size=10, num_heads=4)


def test_a_decoder_layer_without_feed_forward_block_is_the_two_cross_attentions():
    """`ffn_dim=0`: eq. 1 alone (both residual cross-attentions), no feed-forward module built or run."""
    from refseg.models.prompt_ris.modeling_prompt_ris_heads import PromptRisDecoderLayer

    torch.manual_seed(0)
    layer = PromptRisDecoderLayer(hidden_size=8, num_heads=2, ffn_dim=0).double()
    assert layer.vision_ffn is None and layer.text_ffn is None
    pixels, words = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    out_pixels, out_words = layer(pixels, words, mask)
    v, t = layer.vision_norm(pixels), layer.text_norm(words)
    torch.testing.assert_close(out_pixels, pixels + layer.vision_cross_attn(v, t, t, mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(out_words, words + layer.text_cross_attn(t, v, v), rtol=0, atol=1e-12)
