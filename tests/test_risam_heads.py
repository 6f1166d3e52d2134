"""RISAM's heads beyond the paper's equations, where mutation testing (`scripts/mutation_test.sh risam_heads`)
found nothing held them: the decoder's optional feed-forward block (`decoder_mlp_dim` > 0, off in the presets)
and the error for an unknown eq. 4 reading."""

import math

import pytest
import torch

from refseg.models.risam.modeling_risam_heads import RisamDecoderLayer, relevance_masks

from conftest import randomise_parameters


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def test_the_optional_feed_forward_block_follows_eq9():
    """With `mlp_dim` > 0 a block ends with pixels <- LN(pixels + W2 GELU(W1 pixels + b1) + b2); the attention
    part (eqs. 6-9) is the same as without it."""
    torch.manual_seed(0)
    with_mlp = randomise_parameters(RisamDecoderLayer(8, 2, mlp_dim=12).double(), seed=1, std=0.4)
    without = RisamDecoderLayer(8, 2, mlp_dim=0).double()
    without.load_state_dict({k: v for k, v in with_mlp.state_dict().items() if not k.startswith("mlp")})
    pixels, tokens = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    token_pos = torch.randn(1, 4, 8, dtype=torch.float64)
    token_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    attended, tokens_out = without(pixels, tokens, token_pos, token_mask)
    out, tokens_with = with_mlp(pixels, tokens, token_pos, token_mask)
    first, _, second = with_mlp.mlp
    hidden = attended @ first.weight.T + first.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected = _layer_norm(attended + hidden @ second.weight.T + second.bias, with_mlp.mlp_norm)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens_with, tokens_out, rtol=0, atol=0)  # the block changes the pixels only
    assert (out - attended).abs().max() > 1e-3


def test_an_unknown_reading_of_eq4_is_named():
    scores = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="unknown relevance mask reading 'sideways'"):
        relevance_masks(scores, torch.ones(1, 3, dtype=torch.bool), 0.35, reading="sideways")


def test_the_decoder_hands_its_feed_forward_width_to_every_block():
    from refseg.models.risam.modeling_risam_heads import RisamMaskDecoder

    decoder = RisamMaskDecoder(8, 2, 2, 12, (8, 4))
    assert all(layer.mlp is not None and layer.mlp[0].out_features == 12 for layer in decoder.layers)
    assert all(layer.mlp is None for layer in RisamMaskDecoder(8, 2, 2, 0, (8, 4)).layers)
