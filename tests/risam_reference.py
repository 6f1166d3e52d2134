"""Plain-torch references for RISAM's equations (Zhang et al., "RISAM: Referring Image Segmentation via
Mutual-Aware Attention Features", Sec. 3), float64, written from the paper, and the small model the tests
build: `tests/test_risam_equations.py` (eqs. 1-9) and `tests/test_risam_relevance_choices.py` (the two
readings of eq. 4, the two places of the word encoding, fully masked rows, padding) use them.

The references read only the parameters and buffers of the refseg modules under test; the frozen encoders
are the stock `transformers` SAM image encoder and CLIP text tower, loaded from the same checkpoints. Where
refseg departs from the equations on purpose (docs/risam.md, "Departures and decisions"), the reference
implements the documented departure and says so where it does.
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


# ------------------------------------------------------------------ fixtures: the model under test
def make_backbones(tmp_path_factory, tiny_backbones):
    """A small stock SAM (6 blocks, global attention at 0, 2, 3, 5, 128 px) and the tiny CLIP: folders."""
    config = tiny_sam_config(num_layers=6, global_attn_indexes=GLOBAL_BLOCKS, image_size=SIZE, window_size=4)
    config.vision_config.initializer_range = 0.2  # blocks that move the residual stream: levels differ
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = SamModel(config).eval()
    folder = tmp_path_factory.mktemp("sam6-equations")
    sam.save_pretrained(folder)
    return {"sam": folder, "clip": tiny_backbones["clip"]}


def load_stock_encoders(backbones):
    """The stock encoders, loaded apart from refseg's model: SAM's image encoder, CLIP's text transformer."""
    sam = SamModel.from_pretrained(backbones["sam"]).vision_encoder.double().eval()
    clip = CLIPModel.from_pretrained(backbones["clip"]).text_model.double().eval()
    return sam, clip


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tiny_backbones):
    """Module fixture of the RISAM reference tests (import it into the test module): `make_backbones`."""
    return make_backbones(tmp_path_factory, tiny_backbones)


@pytest.fixture(scope="module")
def stock_encoders(backbones):
    """Module fixture: the stock SAM and CLIP encoders of `backbones` (`load_stock_encoders`)."""
    return load_stock_encoders(backbones)


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


def reference_decoder(decoder, num_heads, f_lav, f_val, word_mask, grid, word_positions, state=None):
    """Eqs. 6-9, the upsampling and mask = MLP(query token) . upsampled features -> logits (B, 4h, 4w).

    Documented departures: a LayerNorm after each residual (eqs. 6, 8, 9 have none); the word positions'
    sine encoding added to the queries and keys of eq. 8 and the keys of eq. 9 (zero for the query token),
    or nowhere in the decoder when `word_positions` is False (the encoding went on F_l instead); GELU after
    each upsampling BatchNorm; the query MLP is Linear-ReLU-Linear-ReLU-Linear. A dict `state` receives the query
    token F^_m after the blocks ("query", (B, C)) and the blocks' pixels on the grid ("pixels", (B, C, h, w))."""
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
    if state is not None:
        state.update(query=f_c[:, 0], pixels=x)
    up1, bn1, _, up2, bn2, _ = decoder.upsample
    for up, bn in ((up1, bn1), (up2, bn2)):
        assert up.kernel_size == (2, 2) and up.stride == (2, 2)
        x = gelu(batch_norm_eval(torch.nn.functional.conv_transpose2d(x, up.weight, up.bias, stride=2), bn))
    l1, _, l2, _, l3 = decoder.query_mlp
    kernel = linear(torch.relu(linear(torch.relu(linear(f_c[:, 0], l1)), l2)), l3)  # MLP(F^_m)
    return (kernel[:, :, None, None] * x).sum(1)  # the mask: the kernel's dot product with every pixel


def reference_forward(model, stock_encoders, pixel_values, input_ids, attention_mask, stats=None, state=None):
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
                               config.word_position_encoding == "decoder", state)
    return logits, f_v, f_l


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs difference {err:.3e}"

