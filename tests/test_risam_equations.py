"""RISAM pinned to its paper: eqs. 1-9 (Zhang et al., "RISAM: Referring Image Segmentation via Mutual-Aware
Attention Features", Sec. 3) re-written from the paper in plain torch, float64 (`tests/risam_reference.py`), on
small random weights read from the refseg model, and compared tightly (1e-10) with what the model computes:
which SAM blocks are read (Sec. 3.1, decided from SAM's `global_attn_indexes`, not from refseg's config), the
Feature Enhancement (eqs. 1-2), the Mutual-Aware Attention (eqs. 3-5 with the relevance mask of eq. 4, both
readings), the Mutual-Aware Mask Decoder (eqs. 6-9, the query token, mask = MLP(query) . upsampled features,
both places of the word encoding) and the whole model. Documented departures are implemented by the
references and said so there.
"""

import math

import pytest
import torch

from risam_reference import (  # noqa: F401  (`backbones`, `stock_encoders`: module fixtures)
    backbones, stock_encoders,
    PLACES, READINGS, TAU, close, model_inputs, prepared_model, reference_decoder,
    reference_feature_enhancement, reference_forward, reference_irrelevant, reference_mutual_attention,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ Sec. 3.1: which SAM blocks
def test_sam_levels_are_the_2nd_to_4th_global_attention_blocks(backbones, stock_encoders):
    model = prepared_model(backbones)
    sam, _ = stock_encoders
    blocks = sorted(sam.config.global_attn_indexes)[1:4]
    assert blocks == [2, 3, 5]
    outputs = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(sam.layers)]
    pixel_values = model_inputs()["pixel_values"]
    with torch.no_grad():
        sam(pixel_values)
        levels = model.get_visual_levels(pixel_values)
    for hook in hooks:
        hook.remove()
    assert len(levels) == 3
    for level, i in zip(levels, blocks):
        expected = outputs[i][0] if isinstance(outputs[i], tuple) else outputs[i]
        close(level, expected, atol=1e-12)
    # the levels differ from each other and from their neighbours, so a wrong block shows
    for i in range(1, 6):
        a = outputs[i][0] if isinstance(outputs[i], tuple) else outputs[i]
        b = outputs[i - 1][0] if isinstance(outputs[i - 1], tuple) else outputs[i - 1]
        assert (a - b).abs().max() > 1e-2


# ------------------------------------------------------------------ eqs. 1-2: Feature Enhancement
def test_eq1_eq2_feature_enhancement(backbones):
    model = prepared_model(backbones)
    generator = torch.Generator().manual_seed(3)
    width = model.config.sam_config.vision_config.hidden_size
    f_v1, f_v2, f_v3 = (torch.randn(2, 8, 8, width, generator=generator, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        ours = model.feature_enhancement(f_v1, f_v2, f_v3)
    close(ours, reference_feature_enhancement(model.feature_enhancement, f_v1, f_v2, f_v3))
    # each level matters on its own
    with torch.no_grad():
        for swapped in ((f_v1, f_v1, f_v3), (f_v2, f_v2, f_v3), (f_v1, f_v2, f_v2)):
            assert (model.feature_enhancement(*swapped) - ours).abs().max() > 1e-3


# ------------------------------------------------------------------ eqs. 3-5: Mutual-Aware Attention
def mask_statistics(block, f_v, f_l, word_mask, tau, reading):
    z_v, z_l = f_v @ block.vision_proj.weight.T, f_l @ block.text_proj.weight.T
    s = z_v @ z_l.transpose(1, 2) / math.sqrt(z_v.shape[-1])
    irrelevant = reference_irrelevant(s, tau, reading)
    real = word_mask[:, None, :].expand_as(irrelevant)
    pixel_rows_full = (irrelevant | ~real).all(-1)
    word_rows_full = irrelevant.transpose(1, 2).all(-1)
    partial_word_rows = irrelevant.transpose(1, 2).any(-1) & ~word_rows_full
    return pixel_rows_full, word_rows_full, partial_word_rows, irrelevant


@pytest.mark.parametrize("reading", READINGS)
def test_eq3_to_eq5_mutual_aware_attention(backbones, reading):
    model = prepared_model(backbones, relevance_mask_reading=reading)
    block = model.mutual_attention[0]
    generator = torch.Generator().manual_seed(5)
    f_v = torch.randn(2, 30, block.vision_proj.in_features, generator=generator, dtype=torch.float64)
    f_l = torch.randn(2, 7, block.text_proj.in_features, generator=generator, dtype=torch.float64)
    f_v[:, :4] *= 4.0  # some pixels with large scores, so some rows are masked entirely
    word_mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # the case exercises every branch of eq. 4: masked pairs, kept pairs, partly masked word rows (the
    # Language-Guided branch uses the mask) and a fully masked pixel row (the documented fallback)
    pixel_full, _, word_partial, irrelevant = mask_statistics(block, f_v, f_l, word_mask, TAU, reading)
    assert irrelevant.any() and not irrelevant.all()
    assert word_partial[word_mask].any() and pixel_full.any() and not pixel_full.all()
    with torch.no_grad():
        lav, val = block(f_v, f_l, word_mask)
    ref_lav, ref_val = reference_mutual_attention(block, f_v, f_l, word_mask, TAU, reading)
    close(lav, ref_lav)
    close(val, ref_val)
    # the second block (C -> C)
    block2 = model.mutual_attention[1]
    with torch.no_grad():
        lav2, val2 = block2(lav, val, word_mask)
    ref2 = reference_mutual_attention(block2, ref_lav, ref_val, word_mask, TAU, reading)
    close(lav2, ref2[0])
    close(val2, ref2[1])


def test_eq5_without_the_relevance_mask(backbones):
    """Table 3's "w/o attn. mask" (`relevance_threshold=None`): the padding mask alone."""
    model = prepared_model(backbones, relevance_threshold=None)
    block = model.mutual_attention[0]
    generator = torch.Generator().manual_seed(6)
    f_v = torch.randn(2, 12, block.vision_proj.in_features, generator=generator, dtype=torch.float64)
    f_l = torch.randn(2, 7, block.text_proj.in_features, generator=generator, dtype=torch.float64)
    word_mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        lav, val = block(f_v, f_l, word_mask)
    ref_lav, ref_val = reference_mutual_attention(block, f_v, f_l, word_mask, None, "printed")
    close(lav, ref_lav)
    close(val, ref_val)


# ------------------------------------------------------------------ eqs. 6-9: the Mutual-Aware Mask Decoder
@pytest.mark.parametrize("place", PLACES)
def test_eq6_to_eq9_mask_decoder(backbones, place):
    model = prepared_model(backbones, word_position_encoding=place)
    decoder = model.mask_decoder
    generator = torch.Generator().manual_seed(8)
    width = model.config.hidden_size
    f_lav = torch.randn(2, 4 * 5, width, generator=generator, dtype=torch.float64)  # a 4x5 grid
    f_val = torch.randn(2, 7, width, generator=generator, dtype=torch.float64)
    word_mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        logits = decoder(f_lav, f_val, word_mask, (4, 5))
    assert logits.shape == (2, 16, 20)
    close(logits, reference_decoder(decoder, model.config.decoder_num_heads, f_lav, f_val, word_mask, (4, 5),
                                    word_positions=place == "decoder"))


# ------------------------------------------------------------------ the whole model, four variants
@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("place", PLACES)
def test_whole_model_against_the_paper(backbones, stock_encoders, reading, place):
    model = prepared_model(backbones, std=0.2, attention_std=0.7, relevance_mask_reading=reading,
                           word_position_encoding=place)
    inputs = model_inputs()
    with torch.no_grad():
        out = model(**inputs)
    stats = []
    logits, f_lav, f_val = reference_forward(model, stock_encoders, **inputs, stats=stats)
    # in each block, eq. 4 masks some real pairs and keeps others, and masks part of some word's pixels
    # (so the Language-Guided branch depends on the mask)
    assert len(stats) == 2
    for irrelevant, word_mask in stats:
        real = irrelevant.transpose(1, 2)[word_mask]  # (real words, pixels)
        assert real.any() and not real.all()
        assert (real.any(-1) & ~real.all(-1)).any()
    close(out.image_embeds, f_lav)
    close(out.text_embeds, f_val)
    close(out.logits, logits)
