"""CRIS pinned to its paper: each numbered equation (eqs. 1-10) written out again here, from the paper, in
plain torch, and compared in float64 with `CrisModel` on small random weights.

The references read only the model's weights (parameters and buffers); they never call refseg code. The
stock `transformers` CLIP towers are called as they are (they are not refseg's). Where refseg departs from the
paper on purpose (docs/cris.md, "Departures" and "Differences from the authors' code"), the reference
implements the documented departure and says so where it does:

- ViT-B levels instead of the ResNet's C3, C4, C5 (upsampled x2, kept, projected and pooled x2);
- the public code's details the paper leaves open: BN + ReLU after the gating product of eq. 1, the 1x1 block
  after each concatenation of eq. 2 (in place of the paper's W_m4, W_m3 before it), the average pool after
  the 3x3 projection of the 1/8 level, a 3x3 block per level before the aggregation of eq. 3, a 3x3 block
  after CoordConv, the decoder's LayerNorm on each attention output and inside the FFN and its final
  LayerNorm, positions added to queries and keys only, and the projector's 3x3 dynamic kernel (the paper's
  z_t . z_v is its 1x1 case);
- the concatenation of F_m2 puts the pooled 1/8 level first (as the public code; the paper writes
  [F_m3, F'_v2]); F_m3 keeps the paper's order [F_m4, F_v3] (the public code writes it the other way);
- the target of eqs. 9-10 is the mask downsampled to the logits with nearest-exact.

A one-line break of any equation in `modeling_cris*.py` fails a test here (see docs/cris.md for the list).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_parameters

from refseg import CrisConfig, CrisModel
from refseg.backbones import tiny_clip_config

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(rtol=1e-10, atol=1e-10)
EOS = 599  # tiny CLIP vocabulary: <|endoftext|> (EOS and padding) = vocab_size - 1
SOS = 598


# ----------------------------------------------------------------------------- the model under test
def build_model(seed=0, **overrides):
    """A small CRIS in float64, eval mode, every head weight and BN statistic random (seeded).

    Widths differ on purpose (vision 32, text 32, joint 20, neck 16/24/40, z_v 12) so that a swapped
    operand shows as a shape error or a different value."""
    torch.manual_seed(seed)
    clip = tiny_clip_config(vocab_size=600, hidden_size=32, num_layers=3, num_heads=4, image_size=32, patch_size=8,
                            max_text_len=16, projection_dim=20)
    settings = dict(neck_hidden_sizes=[16, 24, 40], decoder_num_layers=2, decoder_num_heads=4, decoder_ffn_dim=36,
                    word_length=7, decoder_dropout=0.1, vision_feature_layers=[1, 2, 3])
    config = CrisConfig(clip_config=clip, image_size=64, **{**settings, **overrides})
    model = CrisModel(config).double().eval()
    for i, heads in enumerate((model.neck, model.decoder, model.projector)):
        randomise_parameters(heads, seed=seed + i, std=0.15)
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def make_inputs(batch=2, seed=1, size=64):
    """Random images and token ids as CLIP's tokenizer gives them: [SOS] words [EOS], padded with [EOS]
    (the real CLIP pads with <|endoftext|>); rows of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 590, (batch, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = [7, 4, 5, 6][:batch]
    for row, length in enumerate(lengths):
        input_ids[row, 0] = SOS
        input_ids[row, length - 1:] = EOS
        attention_mask[row, length:] = 0
    pixel_values = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def capture(model, names):
    """Forward hooks storing `(args, output)` of the named submodules."""
    seen, hooks = {}, []
    modules = dict(model.named_modules())
    for name in names:
        hooks.append(modules[name].register_forward_hook(
            lambda _m, args, out, name=name: seen.__setitem__(name, (args, out))))
    return seen, hooks


# ----------------------------------------------------------------------------- plain-torch building blocks
def linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def batch_norm(x, norm):
    """Eval-mode BatchNorm from its running statistics, over dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = norm.weight.view(shape) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
    return (x - norm.running_mean.view(shape)) * scale + norm.bias.view(shape)


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def conv_bn_relu(x, block):
    """sigma(x W) of the paper for a feature map: k x k conv (no bias), BatchNorm, ReLU."""
    conv, norm = block[0], block[1]
    assert conv.bias is None
    return torch.relu(batch_norm(F.conv2d(x, conv.weight, padding=conv.weight.shape[-1] // 2), norm))


def up(x, size=None):
    """Up(.) of the paper: bilinear, half-pixel centres (x2 unless `size`)."""
    if size is None:
        size = (2 * x.shape[-2], 2 * x.shape[-1])
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def coordinates(batch, height, width):
    """F_coord (CoordConv, Liu et al.): channel 0 = x, channel 1 = y, each from -1 to 1 across the map."""
    xs = torch.tensor([-1 + 2 * j / (width - 1) for j in range(width)], dtype=torch.float64)
    ys = torch.tensor([-1 + 2 * i / (height - 1) for i in range(height)], dtype=torch.float64)
    coord = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)])
    return coord[None].expand(batch, 2, height, width)


def sine_1d(length, dim):
    """Vaswani et al.'s fixed encoding: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...), in float64
    (the module computes its tables in the model's precision, float64 here)."""
    table = torch.zeros(length, dim, dtype=torch.float64)
    for p in range(length):
        for i in range(0, dim, 2):
            angle = torch.tensor(p, dtype=torch.float64) * torch.exp(
                torch.tensor(i, dtype=torch.float64) * (-math.log(10000.0) / dim))
            table[p, i], table[p, i + 1] = torch.sin(angle), torch.cos(angle)
    return table


def sine_2d(height, width, dim):
    """DETR's 2-D encoding, row-major pixels: the first dim/2 channels encode the column, the rest the row."""
    columns, rows = sine_1d(width, dim // 2), sine_1d(height, dim // 2)
    return torch.cat([columns[None].expand(height, -1, -1), rows[:, None].expand(-1, width, -1)], -1).reshape(-1, dim)


def attention(query, key, value, attn, key_mask=None):
    """Eq. 6 for every head: softmax(Q K^T / sqrt(d_k)) V, then the output projection. `key_mask` (B, L)
    True = a word (padding gets no weight)."""
    heads = attn.num_heads
    q, k, v = linear(query, attn.q_proj), linear(key, attn.k_proj), linear(value, attn.v_proj)
    batch, n, width = q.shape
    d_k = width // heads
    split = lambda t: t.reshape(batch, t.shape[1], heads, d_k).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d_k)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return linear(out.transpose(1, 2).reshape(batch, n, width), attn.out_proj)


# ----------------------------------------------------------------------------- the references
def reference_image_levels(model, pixel_values):
    """Sec. 3.1 "Image Encoder", as the documented ViT departure: the patch tokens after the configured
    layers on the h x w grid; the first upsampled x2 (1/8), the second kept (1/16), the last through CLIP's
    post-LN and visual projection, average-pooled 2x2 stride 2 (1/32)."""
    clip, config = model.clip, model.config
    hidden = clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True,
                               output_hidden_states=True).hidden_states
    batch, grid = pixel_values.shape[0], config.image_size // config.patch_size
    to_map = lambda t: t[:, 1:].transpose(1, 2).reshape(batch, -1, grid, grid)  # noqa: E731
    a, b, c = config.vision_feature_layers
    projected = layer_norm(hidden[c], clip.vision_model.post_layernorm) @ clip.visual_projection.weight.T
    pooled = to_map(projected).reshape(batch, -1, grid // 2, 2, grid // 2, 2).mean(dim=(3, 5))
    return up(to_map(hidden[a])), to_map(hidden[b]), pooled


def reference_text(model, input_ids, attention_mask):
    """Sec. 3.1 "Text Encoder": F_t = the highest layer's activations, F_s = those at the [EOS] token (its
    first occurrence: CLIP pads with the same token) through CLIP's text projection."""
    clip = model.clip
    words = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    eos = torch.stack([(row == EOS).nonzero()[0, 0] for row in input_ids])
    sentence = words[torch.arange(len(eos)), eos] @ clip.text_projection.weight.T
    return words, sentence


def reference_neck(neck, v2, v3, v4, f_s):
    """Eqs. 1-4. Returns every intermediate: m4 (eq. 1), m3 and m2 (eq. 2), f_m (eq. 3), f_v (eq. 4)."""
    size = v3.shape[-2:]
    # eq. 1: sigma(F_v4 W_v4) * sigma(F_s W_s); the public code's BN + ReLU after the product; Up(.) is applied
    # where the 1/16 level is used
    gate = torch.relu(linear(f_s, neck.text_proj))[:, :, None, None]
    m4 = torch.relu(batch_norm(conv_bn_relu(v4, neck.v4_proj) * gate, neck.fuse4_norm[0]))
    # eq. 2: F_m3 = [F_m4, sigma(F_v3 W_v3)] (paper's order), then the code's 1x1 block
    m3 = conv_bn_relu(torch.cat([up(m4, size), conv_bn_relu(v3, neck.v3_proj)], 1), neck.fuse3)
    # eq. 2: F_m2 = [Avg(sigma(F_v2 W_v2)), F_m3] (code's order, Avg after the 3x3 block), then a 1x1 block
    v2 = conv_bn_relu(v2, neck.v2_proj)
    v2 = v2.reshape(*v2.shape[:2], v2.shape[2] // 2, 2, v2.shape[3] // 2, 2).mean(dim=(3, 5))
    m2 = conv_bn_relu(torch.cat([v2, m3], 1), neck.fuse2)
    # eq. 3: F_m = Conv([F_m2, F_m3, F_m4]), each level through a 3x3 block first (public code)
    levels = [conv_bn_relu(m2, neck.level2_proj), conv_bn_relu(m3, neck.level3_proj),
              up(conv_bn_relu(m4, neck.level4_proj), size)]
    f_m = conv_bn_relu(torch.cat(levels, 1), neck.aggregate)
    # eq. 4: F_v = Conv([F_m, F_coord]) (3x3), then the code's second 3x3 block
    coord = coordinates(f_m.shape[0], *f_m.shape[-2:])
    f_v = conv_bn_relu(conv_bn_relu(torch.cat([f_m, coord], 1), neck.coord_conv.conv), neck.out_conv)
    return {"m4": m4, "m3": m3, "m2": m2, "f_m": f_m, "f_v": f_v}


def reference_decoder_layer(layer, f_v, f_t, pos_v, pos_t, word_mask):
    """Eqs. 5-7 (pre-norm). Positions on queries and keys; the code's LN on each attention output."""
    h = layer_norm(f_v, layer.self_attn_layer_norm)
    f_v1 = f_v + layer_norm(attention(h + pos_v, h + pos_v, h, layer.self_attn), layer.self_attn_out_norm)  # eq. 5
    h = layer_norm(f_v1, layer.cross_attn_layer_norm)
    f_c1 = f_v1 + layer_norm(attention(h + pos_v, f_t + pos_t, f_t, layer.cross_attn, word_mask),
                             layer.cross_attn_out_norm)  # eq. 7, F'_c
    h = torch.relu(linear(layer_norm(f_c1, layer.final_layer_norm), layer.fc1))
    return f_c1 + linear(layer_norm(h, layer.ffn_norm), layer.fc2)  # eq. 7, F_c (the code's LN inside the MLP)


def reference_decoder(decoder, f_v, f_t, word_mask):
    """n layers, then the final LayerNorm; F_v (B, C, h, w) -> F_c (B, C, h, w)."""
    batch, channels, height, width = f_v.shape
    pos_v, pos_t = sine_2d(height, width, channels), sine_1d(f_t.shape[1], f_t.shape[2])
    x = f_v.flatten(2).transpose(1, 2)
    for layer in decoder.layers:
        x = reference_decoder_layer(layer, x, f_t, pos_v, pos_t, word_mask)
    return layer_norm(x, decoder.layer_norm).transpose(1, 2).reshape(batch, channels, height, width)


def reference_projector(projector, f_c, f_s):
    """Eq. 8: z_v from Up(F_c) (two x2 steps with 3x3 blocks, then W_v, b_v as a 1x1 conv), z_t = F_s W_t + b_t
    read as a k x k kernel per channel plus one bias; the logit at pixel i is z_t . z_v around i (the code's
    3x3 generalisation of the paper's 1x1 dot product), written as an explicit sum over the window."""
    x = conv_bn_relu(up(f_c), projector.up1)
    x = conv_bn_relu(up(x), projector.up2)
    z_v = F.conv2d(x, projector.vision_proj.weight) + projector.vision_proj.bias[None, :, None, None]
    z_t = linear(f_s, projector.text_proj)
    batch, channels, height, width = z_v.shape
    k = projector.kernel_size
    kernel, bias = z_t[:, :-1].reshape(batch, channels, k, k), z_t[:, -1]
    padded = F.pad(z_v, (k // 2,) * 4)
    logits = bias[:, None, None].expand(batch, height, width).clone()
    for dy in range(k):
        for dx in range(k):
            window = padded[:, :, dy:dy + height, dx:dx + width]
            logits = logits + (kernel[:, :, dy, dx, None, None] * window).sum(1)
    return z_v, logits


def reference_loss(logits, labels):
    """Eqs. 9-10: -log sigma(s) over P, -log(1 - sigma(s)) over N, averaged over |P u N| (every pixel of every
    sample); the target is the mask at the logits size, nearest-exact (the pixel whose centre covers it)."""
    height, width = logits.shape[-2:]
    rows = [int((i + 0.5) * labels.shape[-2] / height) for i in range(height)]
    cols = [int((j + 0.5) * labels.shape[-1] / width) for j in range(width)]
    target = labels[:, rows][:, :, cols]
    positive = -F.logsigmoid(logits)
    negative = -F.logsigmoid(-logits)  # -log(1 - sigma(s))
    return torch.where(target > 0.5, positive, negative).mean()


def reference_logits(model, inputs):
    levels = reference_image_levels(model, inputs["pixel_values"])
    words, sentence = reference_text(model, inputs["input_ids"], inputs["attention_mask"])
    f_v = reference_neck(model.neck, *levels, sentence)["f_v"]
    f_c = reference_decoder(model.decoder, f_v, words, inputs["attention_mask"].bool())
    return reference_projector(model.projector, f_c, sentence)[1]


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def model():
    return build_model()


def test_image_levels_are_the_documented_vit_pyramid(model):
    inputs = make_inputs()
    with torch.no_grad():
        got = model.get_visual_levels(inputs["pixel_values"])
        want = reference_image_levels(model, inputs["pixel_values"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_sentence_feature_is_read_at_eos_not_sos(model):
    inputs = make_inputs(batch=3)
    with torch.no_grad():
        words, sentence = model.get_word_features(inputs["input_ids"], inputs["attention_mask"])
        ref_words, ref_sentence = reference_text(model, inputs["input_ids"], inputs["attention_mask"])
        at_sos = words[:, 0] @ model.clip.text_projection.weight.T
    torch.testing.assert_close(words, ref_words, **TOL)
    torch.testing.assert_close(sentence, ref_sentence, **TOL)
    assert (sentence - at_sos).abs().min() > 1e-6  # the two readings differ on every row


def test_neck_eqs_1_to_4(model):
    """Eq. 1 (sentence gating), eq. 2 (two concatenations), eq. 3 (aggregation), eq. 4 (CoordConv), each
    intermediate compared."""
    generator = torch.Generator().manual_seed(3)
    v2 = torch.randn(2, 32, 16, 16, generator=generator, dtype=torch.float64)
    v3 = torch.randn(2, 32, 8, 8, generator=generator, dtype=torch.float64)
    v4 = torch.randn(2, 20, 4, 4, generator=generator, dtype=torch.float64)
    f_s = torch.randn(2, 20, generator=generator, dtype=torch.float64)
    seen, hooks = capture(model, ["neck.fuse4_norm", "neck.fuse3", "neck.fuse2", "neck.aggregate"])
    with torch.no_grad():
        f_v = model.neck((v2, v3, v4), f_s)
        ref = reference_neck(model.neck, v2, v3, v4, f_s)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["neck.fuse4_norm"][1], ref["m4"], **TOL)  # eq. 1
    torch.testing.assert_close(seen["neck.fuse3"][1], ref["m3"], **TOL)  # eq. 2, F_m3
    torch.testing.assert_close(seen["neck.fuse2"][1], ref["m2"], **TOL)  # eq. 2, F_m2
    torch.testing.assert_close(seen["neck.aggregate"][1], ref["f_m"], **TOL)  # eq. 3
    torch.testing.assert_close(f_v, ref["f_v"], **TOL)  # eq. 4


def test_eq_1_the_sentence_gates_the_deepest_level(model):
    """Two sentences, same image: the gated level differs, and by exactly the gate."""
    generator = torch.Generator().manual_seed(5)
    v4 = torch.randn(1, 20, 4, 4, generator=generator, dtype=torch.float64).expand(2, -1, -1, -1)
    f_s = torch.randn(2, 20, generator=generator, dtype=torch.float64)
    neck = model.neck
    with torch.no_grad():
        seen, hooks = capture(model, ["neck.fuse4_norm"])
        neck((torch.zeros(2, 32, 16, 16, dtype=torch.float64), torch.zeros(2, 32, 8, 8, dtype=torch.float64), v4), f_s)
    hooks[0].remove()
    m4 = seen["neck.fuse4_norm"][1]
    visual = conv_bn_relu(v4, neck.v4_proj)  # sigma(F_v4 W_v4): the same for both rows
    gate = torch.relu(linear(f_s, neck.text_proj))[:, :, None, None]  # sigma(F_s W_s): one per sentence
    torch.testing.assert_close(m4, torch.relu(batch_norm(visual * gate, neck.fuse4_norm[0])), **TOL)
    assert (m4[0] - m4[1]).abs().max() > 1e-3  # the sentence changes the level


def test_eq_4_coordconv_sees_the_coordinates(model):
    """The two coordinate channels reach the 3x3 conv: x then y, from -1 to 1."""
    seen, hooks = capture(model, ["neck.coord_conv.conv"])
    with torch.no_grad():
        model.neck.coord_conv(torch.zeros(1, 24, 8, 8, dtype=torch.float64))
    hooks[0].remove()
    fed = seen["neck.coord_conv.conv"][0][0]
    torch.testing.assert_close(fed[:, 24:], coordinates(1, 8, 8), **TOL)
    assert fed[0, 24, 0, 0] == -1 and fed[0, 24, 0, -1] == 1 and fed[0, 25, -1, 0] == 1


def test_decoder_eqs_5_to_7(model):
    generator = torch.Generator().manual_seed(6)
    f_v = torch.randn(2, 24, 8, 8, generator=generator, dtype=torch.float64)
    f_t = torch.randn(2, 7, 32, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    seen, hooks = capture(model, ["decoder.layers.0"])
    with torch.no_grad():
        f_c = model.decoder(f_v, f_t, mask)
        pos_v, pos_t = sine_2d(8, 8, 24), sine_1d(7, 32)
        first = reference_decoder_layer(model.decoder.layers[0], f_v.flatten(2).transpose(1, 2), f_t, pos_v, pos_t, mask)
        ref = reference_decoder(model.decoder, f_v, f_t, mask)
    hooks[0].remove()
    torch.testing.assert_close(seen["decoder.layers.0"][1], first, **TOL)
    torch.testing.assert_close(f_c, ref, **TOL)
    # padded words get no attention: changing them changes nothing
    f_t2 = f_t.clone()
    f_t2[1, 4:] = 7.0
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(f_v, f_t2, mask), f_c, **TOL)


def test_decoder_dropout_is_active_in_training_only(model):
    generator = torch.Generator().manual_seed(6)
    f_v = torch.randn(1, 24, 8, 8, generator=generator, dtype=torch.float64)
    f_t = torch.randn(1, 7, 32, generator=generator, dtype=torch.float64)
    mask = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        model.decoder.train()
        trained = model.decoder(f_v, f_t, mask)
        model.decoder.eval()
        evaluated = model.decoder(f_v, f_t, mask)
    assert (trained - evaluated).abs().max() > 1e-6
    torch.testing.assert_close(evaluated, reference_decoder(model.decoder, f_v, f_t, mask), **TOL)


def test_projector_eq_8_dynamic_kernel(model):
    generator = torch.Generator().manual_seed(7)
    f_c = torch.randn(3, 24, 8, 8, generator=generator, dtype=torch.float64)
    f_s = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        logits = model.projector(f_c, f_s)
        z_v = model.projector.project_image(f_c)
        ref_z_v, ref_logits = reference_projector(model.projector, f_c, f_s)
    assert z_v.shape == (3, 12, 32, 32)
    torch.testing.assert_close(z_v, ref_z_v, **TOL)
    torch.testing.assert_close(logits, ref_logits, **TOL)


def test_loss_eqs_9_and_10(model):
    inputs = make_inputs()
    labels = torch.zeros(2, 64, 64, dtype=torch.float64)
    labels[0, 5:30, 9:50] = 1
    labels[1, 33:61, 2:20] = 1
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, reference_loss(out.logits, labels), **TOL)
    # targets already at the logits size are used as they are
    small = labels[:, 1::2, 1::2]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, labels=small).loss, reference_loss(out.logits, small), **TOL)


def test_whole_forward_matches_the_written_out_reference(model):
    """Image levels, F_t and F_s, eqs. 1-8 end to end; rows of different word lengths."""
    inputs = make_inputs(batch=3)
    with torch.no_grad():
        out = model(**inputs)
        ref = reference_logits(model, inputs)
    assert out.logits.shape == (3, 32, 32)
    torch.testing.assert_close(out.logits, ref, **TOL)
    torch.testing.assert_close(out.text_embeds, reference_text(model, inputs["input_ids"], inputs["attention_mask"])[1],
                               **TOL)
