"""RISAM pinned to its paper: eqs. 1-9 re-written here from the paper (Zhang et al., "RISAM: Referring Image
Segmentation via Mutual-Aware Attention Features", Sec. 3) in plain torch, float64, on small random weights
read from the refseg model, and compared tightly with what the model computes.

The references use nothing from refseg but the model under test (built, then only its parameters and buffers
read). The frozen encoders are the stock `transformers` SAM image encoder and CLIP text tower, loaded here
from the same checkpoints: which of SAM's blocks are read (Sec. 3.1: the 2nd-4th global-attention blocks) is
decided here from SAM's `global_attn_indexes`, not from refseg's config.

Where refseg departs from the equations on purpose (docs/risam.md, "Departures and decisions"), the reference
implements the documented departure and says so where it does. Both readings of eq. 4
(`relevance_mask_reading`) and both places of the word positional encoding (`word_position_encoding`) are
written here and tested, each also on a hand-built case.
"""

import math

import pytest
import torch
from conftest import randomise_parameters
from transformers import CLIPModel, SamModel

from refseg import RisamModel
from refseg.backbones import tiny_sam_config

SIZE = 128  # 128 px, patch 16: an 8x8 grid, logits 32x32
GLOBAL_BLOCKS = [0, 2, 3, 5]  # of 6 blocks; blocks 1 and 4 are windowed, so a wrong block index shows
HEADS = dict(hidden_size=32, decoder_num_heads=4, upsample_hidden_sizes=[16, 8], word_length=7)
TAU = 0.35
READINGS = ("printed", "tau_account")
PLACES = ("decoder", "text_features")
ATOL = 1e-10

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ fixtures: the model under test
@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tiny_backbones):
    config = tiny_sam_config(num_layers=6, global_attn_indexes=GLOBAL_BLOCKS, image_size=SIZE, window_size=4)
    config.vision_config.initializer_range = 0.2  # blocks that move the residual stream: levels differ
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = SamModel(config).eval()
    folder = tmp_path_factory.mktemp("sam6-equations")
    sam.save_pretrained(folder)
    return {"sam": folder, "clip": tiny_backbones["clip"]}


@pytest.fixture(scope="module")
def stock_encoders(backbones):
    """The stock encoders, loaded apart from refseg's model: SAM's image encoder, CLIP's text transformer."""
    sam = SamModel.from_pretrained(backbones["sam"]).vision_encoder.double().eval()
    clip = CLIPModel.from_pretrained(backbones["clip"]).text_model.double().eval()
    return sam, clip


def prepared_model(backbones, seed=0, std=0.3, attention_std=None, **overrides):
    """The model under test in float64, eval mode, every head parameter random N(0, std^2) (the decoder's
    query token too; `attention_std` for the Mutual-Aware Attention blocks, which sets how spread their scores
    are around the thresholds of eq. 4) and random BatchNorm running statistics, so that no term is zero or an
    identity."""
    torch.manual_seed(seed)
    model = RisamModel.from_backbones(sam=backbones["sam"], clip=backbones["clip"], **{**HEADS, **overrides})
    model = model.double().eval()
    generator = torch.Generator().manual_seed(seed + 100)
    for i, name in enumerate(("feature_enhancement", "mutual_attention", "mask_decoder")):
        randomise_parameters(getattr(model, name), seed=seed + i,
                             std=attention_std if name == "mutual_attention" and attention_std else std)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 1.5 + 0.5)
    return model


def text_inputs(batch=2, length=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1000, (batch, length), generator=generator)
    input_ids[:, 0] = 1022  # [SOS]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 4:] = 0  # the last row: 3 padding tokens
    input_ids[torch.arange(batch), attention_mask.sum(-1) - 1] = 1023  # [EOS]
    input_ids[-1, 4:] = 1023  # padding (= [EOS], as openai/clip)
    return input_ids, attention_mask


def model_inputs(batch=2, seed=1):
    input_ids, attention_mask = text_inputs(batch, seed=seed)
    generator = torch.Generator().manual_seed(seed + 7)
    pixel_values = torch.randn(batch, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


# ------------------------------------------------------------------ the references, from the paper
def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x, layer):
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def batch_norm_eval(x, bn):  # (B, C, H, W), with the running statistics (eval mode)
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape) + bn.bias.view(shape)


def softmax(x, dim=-1):
    x = x - x.amax(dim, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def mlp(x, seq):
    """MLP of eqs. 1-2 (documented: Linear -> GELU -> Linear), on the last (channel) dimension."""
    first, _, second = seq
    return linear(gelu(linear(x, first)), second)


def cba(x, seq):
    """CBA of eqs. 1-2: 3x3 convolution, BatchNorm, GELU (documented: the convolution has no bias)."""
    conv, bn, _ = seq
    assert conv.bias is None and conv.kernel_size == (3, 3)
    return gelu(batch_norm_eval(torch.nn.functional.conv2d(x, conv.weight, padding=1), bn))


def channels_first(x):  # (B, H, W, C) -> (B, C, H, W)
    return x.permute(0, 3, 1, 2)


def reference_feature_enhancement(fe, f_v1, f_v2, f_v3):
    """Eqs. 1-2 on channels-last levels (B, H, W, C_sam) -> F_v (B, C, H, W)."""
    f_hat = cba(torch.cat([channels_first(mlp(f_v1, fe.shallow_mlp)), channels_first(mlp(f_v2, fe.middle_mlp))],
                          dim=1), fe.early_cba)  # eq. 1
    f_hat = f_hat.permute(0, 2, 3, 1)
    return cba(torch.cat([channels_first(mlp(f_hat, fe.early_mlp)), channels_first(mlp(f_v3, fe.deep_mlp))],
                         dim=1), fe.final_cba)  # eq. 2


def reference_irrelevant(scores, tau, reading):
    """Eq. 4: True where the pair (pixel i, word j) is masked (-inf).

    "printed": the relevance score M = 1 / (1 + e^s) (the paper's formula) and M(i, j) < tau -> 0, otherwise
    -inf, so masked where M >= tau. "tau_account": the relevance is 1 / (1 + e^-s) and a pair is masked where
    it is below tau (the reading under which a small tau lets irrelevant pairs through, Sec. 4.5.1)."""
    if reading == "printed":
        return 1.0 / (1.0 + torch.exp(scores)) >= tau
    assert reading == "tau_account"
    return 1.0 / (1.0 + torch.exp(-scores)) < tau


def reference_masks(scores, word_mask, tau, reading):
    """The masks of both branches: True = -inf. Documented departures (docs/risam.md): text padding is masked
    as a key of every pixel row always; a row eq. 4 would mask entirely falls back to its padding mask only
    (a pixel row: all real words; a word row: all pixels), so no softmax is over nothing."""
    batch, pixels, words = scores.shape
    irrelevant = (torch.zeros_like(scores, dtype=torch.bool) if tau is None
                  else reference_irrelevant(scores, tau, reading))
    vision = irrelevant.clone()
    language = irrelevant.transpose(1, 2).clone()
    for b in range(batch):
        pad = ~word_mask[b]
        for i in range(pixels):
            row = irrelevant[b, i] | pad
            vision[b, i] = pad if row.all() else row
        for j in range(words):
            if language[b, j].all():
                language[b, j] = False
    return vision, language


def reference_mutual_attention(block, f_v, f_l, word_mask, tau, reading, stats=None):
    """Eqs. 3-5 for one block: F_v (B, L_v, C_v), F_l (B, L_t, C_t) -> F_lav (B, L_v, C), F_val (B, L_t, C).
    `stats` (a list), when given, gets the block's eq. 4 mask of real pairs (before the fallback)."""
    z_v = f_v @ block.vision_proj.weight.T  # Z_v = F_v W_v (bias-free)
    z_l = f_l @ block.text_proj.weight.T  # Z_l = F_l W_l
    c = z_v.shape[-1]
    s = z_v @ z_l.transpose(1, 2) / math.sqrt(c)
    vision_masked, language_masked = reference_masks(s, word_mask, tau, reading)
    if stats is not None and tau is not None:
        stats.append((reference_irrelevant(s, tau, reading), word_mask))
    a = softmax(s.masked_fill(vision_masked, -math.inf), dim=-1)  # eq. 3: A, each pixel over the words
    # Documented departure: A^T of eq. 5 is read as the same masked scores transposed, normalised over the
    # pixels for each word (the literal transpose of A would be an unnormalised sum over the pixels).
    a_t = softmax(s.transpose(1, 2).masked_fill(language_masked, -math.inf), dim=-1)
    f_lav = layer_norm(a @ z_l + z_v, block.vision_norm)  # eq. 5
    f_val = layer_norm(a_t @ z_v + z_l, block.text_norm)
    return f_lav, f_val


def reference_sine(length, dim):
    """Vaswani et al.'s encoding: PE(p, 2i) = sin(p / 10000^(2i / d)), PE(p, 2i + 1) = cos(p / 10000^(2i / d))."""
    pe = torch.zeros(length, dim, dtype=torch.float64)
    for p in range(length):
        for i in range(dim // 2):
            angle = p / 10000.0 ** (2 * i / dim)
            pe[p, 2 * i], pe[p, 2 * i + 1] = math.sin(angle), math.cos(angle)
    return pe


def reference_attention(attn, num_heads, query, key, value, key_mask=None):
    """Multi-head attention of eq. 7: Q, K, V by three linear layers, softmax(Q K^T / sqrt(d_k)) V per head
    (d_k the head width), heads concatenated and projected. `key_mask` True = attend."""
    q, k, v = linear(query, attn.q_proj), linear(key, attn.k_proj), linear(value, attn.v_proj)
    batch, lq, width = q.shape
    d = width // num_heads
    outs = []
    for h in range(num_heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        logits = qh @ kh.transpose(1, 2) / math.sqrt(d)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, :], -math.inf)
        outs.append(softmax(logits) @ vh)
    return linear(torch.cat(outs, dim=-1), attn.out_proj)


def reference_decoder(decoder, num_heads, f_lav, f_val, word_mask, grid, word_positions):
    """Eqs. 6-9, the upsampling and mask = MLP(query token) . upsampled features -> logits (B, 4h, 4w).

    Documented departures: a LayerNorm after each residual (eqs. 6, 8, 9 have none); the word positions'
    sine encoding added to the queries and keys of eq. 8 and the keys of eq. 9 (zero for the query token),
    or nowhere in the decoder when `word_positions` is False (the encoding went on F_l instead); GELU after
    each upsampling BatchNorm; the query MLP is Linear-ReLU-Linear-ReLU-Linear."""
    batch, _, width = f_lav.shape
    f_m = decoder.query_token.weight[None].expand(batch, -1, -1)  # the multi-modal query token (1, C)
    f_c = torch.cat([f_m, f_val], dim=1)  # F_c = [F_m, F_val]
    mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool), word_mask], dim=1)
    pos = torch.zeros(f_c.shape[1], width, dtype=torch.float64)
    if word_positions:
        pos[1:] = reference_sine(f_val.shape[1], width)
    pixels = f_lav
    for layer in decoder.layers:
        assert layer.mlp is None  # decoder_mlp_dim = 0: eqs. 6-9 have no feed-forward block
        pixels = layer_norm(pixels + reference_attention(layer.pixel_self_attn, num_heads, pixels, pixels, pixels),
                            layer.pixel_norm)  # eq. 6
        f_c = layer_norm(f_c + reference_attention(layer.token_self_attn, num_heads, f_c + pos, f_c + pos, f_c, mask),
                         layer.token_norm)  # eq. 8
        pixels = layer_norm(pixels + reference_attention(layer.cross_attn, num_heads, pixels, f_c + pos, f_c, mask),
                            layer.cross_norm)  # eq. 9
    x = pixels.transpose(1, 2).reshape(batch, width, *grid)
    up1, bn1, _, up2, bn2, _ = decoder.upsample
    for up, bn in ((up1, bn1), (up2, bn2)):
        assert up.kernel_size == (2, 2) and up.stride == (2, 2)
        x = gelu(batch_norm_eval(torch.nn.functional.conv_transpose2d(x, up.weight, up.bias, stride=2), bn))
    l1, _, l2, _, l3 = decoder.query_mlp
    kernel = linear(torch.relu(linear(torch.relu(linear(f_c[:, 0], l1)), l2)), l3)  # MLP(F^_m)
    return (kernel[:, :, None, None] * x).sum(1)  # the mask: the kernel's dot product with every pixel


def reference_forward(model, stock_encoders, pixel_values, input_ids, attention_mask, stats=None):
    """The whole model from the paper: SAM levels (2nd-4th global blocks), F_l, eqs. 1-9."""
    sam, clip = stock_encoders
    config = model.config
    reading, tau = config.relevance_mask_reading, config.relevance_threshold
    # Sec. 3.1: the outputs of the 2nd, 3rd and 4th global-attention blocks of SAM's ViT
    blocks = sorted(sam.config.global_attn_indexes)[1:4]
    outputs = {}
    hooks = [sam.layers[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
             for i in blocks]
    with torch.no_grad():
        sam(pixel_values)
        f_l = clip(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # F_l: final-LN states
    for hook in hooks:
        hook.remove()
    levels = [outputs[i][0] if isinstance(outputs[i], tuple) else outputs[i] for i in blocks]
    f_v = reference_feature_enhancement(model.feature_enhancement, *levels)  # (B, C, h, w)
    grid = tuple(f_v.shape[-2:])
    f_v = f_v.flatten(2).transpose(1, 2)
    word_mask = attention_mask.bool()
    if config.word_position_encoding == "text_features":  # Fig. 3: Pos. Enc. added to F_l before the MA blocks
        f_l = f_l + reference_sine(f_l.shape[1], f_l.shape[2])
    for block in model.mutual_attention:
        f_v, f_l = reference_mutual_attention(block, f_v, f_l, word_mask, tau, reading, stats)
    logits = reference_decoder(model.mask_decoder, config.decoder_num_heads, f_v, f_l, word_mask, grid,
                               config.word_position_encoding == "decoder")
    return logits, f_v, f_l


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs difference {err:.3e}"


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
        levels = model.get_image_features(pixel_values)
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


# ------------------------------------------------------------------ eq. 4: the two readings, by hand
# Scaled similarities s (one sample, 4 pixels x 5 words; word 4 is padding), chosen around both thresholds
# at tau = 0.35: log(0.65 / 0.35) = 0.619 and log(0.35 / 0.65) = -0.619.
HAND_SCORES = [[1.0, 0.5, -0.5, -1.0, 9.0],     # pixel 0
               [0.0, -0.5, -1.0, 0.5, -9.0],    # pixel 1
               [-1.0, -3.0, -1.0, -3.0, 9.0],   # pixel 2
               [2.0, 0.6, 0.7, -0.6, 0.0]]      # pixel 3: either side of +-0.619
HAND_WORDS = [[True, True, True, True, False]]
T, F_ = True, False
HAND_CASES = {
    # printed: masked where sigma(-s) >= 0.35, i.e. s <= 0.619: only s = 1.0, 2.0, 0.7 (and 9.0) stay
    "printed": dict(
        irrelevant=[[F_, T, T, T, F_],
                    [T, T, T, T, T],
                    [T, T, T, T, F_],
                    [F_, T, F_, T, T]],     # 0.6: sigma(-0.6) = 0.354, masked; 0.7: 0.332, kept
        vision=[[F_, T, T, T, T],           # padding (word 4) masked whatever its score
                [F_, F_, F_, F_, T],        # every real word irrelevant: the padding mask alone
                [F_, F_, F_, F_, T],        # likewise
                [F_, T, F_, T, T]],
        language=[[F_, T, T, F_],           # word 0 over pixels 0-3
                  [F_, F_, F_, F_],         # word 1: irrelevant to every pixel -> not masked at all
                  [T, T, T, F_],
                  [F_, F_, F_, F_],         # word 3: likewise
                  [F_, T, F_, T]]),         # the padding word's row (never read: it is masked as a key)
    # tau_account: masked where sigma(s) < 0.35, i.e. s < -0.619: only s = -1.0, -3.0 (and -9.0)
    "tau_account": dict(
        irrelevant=[[F_, F_, F_, T, F_],
                    [F_, F_, T, F_, T],
                    [T, T, T, T, F_],
                    [F_, F_, F_, F_, F_]],  # -0.6: sigma(-0.6) = 0.354 >= 0.35, kept
        vision=[[F_, F_, F_, T, T],
                [F_, F_, T, F_, T],
                [F_, F_, F_, F_, T],        # every real word irrelevant: the padding mask alone
                [F_, F_, F_, F_, T]],
        language=[[F_, F_, T, F_],
                  [F_, F_, T, F_],
                  [F_, T, T, F_],
                  [T, F_, T, F_],
                  [F_, T, F_, F_]]),
}


@pytest.mark.parametrize("reading", READINGS)
def test_eq4_readings_on_a_hand_built_case(reading):
    from refseg.models.risam.modeling_risam_heads import RisamMutualAwareAttention, relevance_masks

    case = HAND_CASES[reading]
    s = torch.tensor([HAND_SCORES], dtype=torch.float64)
    words = torch.tensor(HAND_WORDS)
    assert reference_irrelevant(s, TAU, reading)[0].tolist() == case["irrelevant"]  # the reference, by hand
    vision, language = relevance_masks(s, words, TAU, reading)
    assert vision[0].tolist() == case["vision"]
    assert language[0].tolist() == case["language"]
    # the other reading gives other masks
    other = READINGS[1 - READINGS.index(reading)]
    assert relevance_masks(s, words, TAU, other)[0][0].tolist() != case["vision"]

    # a block whose scores are exactly s (W_v = W_l = identity, C = 5, F_v = s sqrt(C), F_l = identity):
    # its outputs are eq. 5 with the hand-built masks
    c = 5
    block = RisamMutualAwareAttention(c, c, c, TAU, reading).double()
    with torch.no_grad():
        block.vision_proj.weight.copy_(torch.eye(c))
        block.text_proj.weight.copy_(torch.eye(c))
        block.vision_norm.weight.uniform_(0.5, 1.5)
        block.text_norm.bias.uniform_(-1, 1)
        f_v, f_l = s * math.sqrt(c), torch.eye(c, dtype=torch.float64)[None]
        lav, val = block(f_v, f_l, words)
    a = softmax(s.masked_fill(torch.tensor([case["vision"]]), -math.inf))
    a_t = softmax(s.transpose(1, 2).masked_fill(torch.tensor([case["language"]]), -math.inf))
    close(lav, layer_norm(a @ f_l + f_v, block.vision_norm))
    close(val, layer_norm(a_t @ f_v + f_l, block.text_norm))


# ------------------------------------------------------------------ where the word positions go, by hand
SIN1, COS1, SIN2, COS2 = 0.8414709848078965, 0.5403023058681398, 0.9092974268256817, -0.4161468365471424


def check_hand_sine(table):
    """Rows 0-2 of a sine table against hand values: position 0 is (0, 1, 0, 1, ...); positions 1 and 2 start
    (sin 1, cos 1) and (sin 2, cos 2); channels 2-3 of position 1 are sin/cos of 1 / 10000^(2 / d)."""
    d = table.shape[-1]
    assert table[0, 0::2].abs().max() < 1e-12 and (table[0, 1::2] - 1).abs().max() < 1e-12
    assert abs(table[1, 0] - SIN1) < 1e-12 and abs(table[1, 1] - COS1) < 1e-12
    assert abs(table[2, 0] - SIN2) < 1e-12 and abs(table[2, 1] - COS2) < 1e-12
    angle = 1.0 / 10000 ** (2 / d)
    assert abs(table[1, 2] - math.sin(angle)) < 1e-12 and abs(table[1, 3] - math.cos(angle)) < 1e-12


@pytest.mark.parametrize("place", PLACES)
def test_word_position_encoding_place_on_a_hand_built_case(backbones, stock_encoders, place):
    model = prepared_model(backbones, word_position_encoding=place)
    _, clip = stock_encoders
    inputs = model_inputs()
    seen = {}
    hooks = [model.mutual_attention[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("ma", args)),
             model.mask_decoder.layers[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("dec", args))]
    with torch.no_grad():
        model(**inputs)
        f_l = clip(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    for hook in hooks:
        hook.remove()
    added = seen["ma"][1] - f_l  # what was added to F_l before the first Mutual-Aware Attention block
    token_pos = seen["dec"][2][0]  # the decoder's encodings of [F_m, words]
    assert token_pos.shape == (8, model.config.hidden_size)
    assert token_pos[0].abs().max() == 0  # the query token's encoding is zero
    if place == "decoder":
        assert added.abs().max() == 0
        check_hand_sine(token_pos[1:])
    else:
        assert token_pos.abs().max() == 0
        close(added[0], added[1], atol=1e-12)  # the same for every sample
        check_hand_sine(added[0])
        assert added.shape[-1] == model.config.clip_config.text_config.hidden_size  # width C'


# ------------------------------------------------------------------ fully masked rows and padding, both readings
# tau at which eq. 4 masks every pair whatever the score (|s| < 13): sigma(-s) >= 1e-6, or sigma(s) < 1 - 1e-6
MASK_ALL = {"printed": 1e-6, "tau_account": 1 - 1e-6}


@pytest.mark.parametrize("reading", READINGS)
def test_fully_masked_rows_give_finite_outputs_and_gradients(backbones, reading):
    from refseg.models.risam.modeling_risam_heads import RisamMutualAwareAttention

    torch.manual_seed(0)
    tau = MASK_ALL[reading]
    block = RisamMutualAwareAttention(16, 12, 16, tau, reading)
    visual = torch.randn(2, 10, 16, requires_grad=True)
    words = torch.randn(2, 5, 12, requires_grad=True)
    word_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s = block.vision_proj(visual) @ block.text_proj(words).transpose(1, 2) * block.scale
    assert reference_irrelevant(s.detach().double(), tau, reading).all()  # every pair irrelevant
    lav, val = block(visual, words, word_mask)
    assert torch.isfinite(lav).all() and torch.isfinite(val).all()
    (from_pixels,) = torch.autograd.grad(lav.square().sum(), words, retain_graph=True)
    assert from_pixels[0, 3:].abs().max() == 0  # padding words: no pixel attends to them, even then
    assert from_pixels[0, :3].abs().sum() > 0
    (lav.square().sum() + val.square().sum()).backward()
    assert all(g is not None and torch.isfinite(g).all()
               for g in (visual.grad, words.grad, *(p.grad for p in block.parameters())))
    assert visual.grad.abs().sum() > 0 and words.grad[0, :3].abs().sum() > 0

    # the whole model: finite logits, loss and gradients
    torch.manual_seed(0)
    model = RisamModel.from_backbones(sam=backbones["sam"], clip=backbones["clip"], relevance_threshold=tau,
                                      relevance_mask_reading=reading, **HEADS).train()
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in model_inputs().items()}
    labels = torch.zeros(2, SIZE, SIZE)
    labels[:, 10:70, 20:90] = 1
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("place", PLACES)
def test_text_padding_is_never_attended(backbones, reading, place):
    model = prepared_model(backbones, std=0.2, attention_std=0.7, relevance_mask_reading=reading,
                           word_position_encoding=place)
    inputs = model_inputs()
    with torch.no_grad():
        out = model(**inputs).logits
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][1, 5:] = 17  # padded positions of row 1: never seen
        assert torch.equal(model(**changed).logits, out)
        changed["input_ids"][1, 2] = 17  # a real word: seen
        assert (model(**changed).logits[1] - out[1]).abs().max() > 1e-4


def test_the_two_choices_validate_round_trip_and_reach_the_modules(backbones):
    from refseg import RisamConfig
    from refseg.presets import get_config

    tiny = get_config("risam-tiny")
    for kwargs, field in [({"relevance_mask_reading": "inverted"}, "relevance_mask_reading"),
                          ({"word_position_encoding": "pixels"}, "word_position_encoding")]:
        with pytest.raises(ValueError, match=field):
            RisamConfig(sam_config=tiny.sam_config, clip_config=tiny.clip_config, **{**HEADS, **kwargs})
    for reading in READINGS:
        for place in PLACES:
            config = RisamConfig(sam_config=tiny.sam_config, clip_config=tiny.clip_config, **HEADS,
                                 relevance_mask_reading=reading, word_position_encoding=place)
            again = RisamConfig.from_dict(config.to_dict())
            assert (again.relevance_mask_reading, again.word_position_encoding) == (reading, place)
            model = RisamModel(config)
            assert [block.reading for block in model.mutual_attention] == [reading, reading]
            assert model.mask_decoder.word_positions == (place == "decoder")
