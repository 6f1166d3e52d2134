"""Prompt-RIS pinned to its paper (Shang et al., CVPR 2024): each numbered equation (1-9) and the text prompts of
Sec. 3.1, written again here in plain float64 torch from the paper and compared with `PromptRisModel` on small
random weights (every parameter drawn afresh, so that no branch sits at its initial value).

The references read the model's weights only; they call nothing of refseg's. The one stock module they run is
SAM's frozen image encoder (`SamModel.get_image_embeddings`, transformers' own; no equation of the paper is in
it). Where refseg departs from the paper on purpose (docs/prompt-ris.md, "Decisions ... departures", and the
module docstrings), the reference implements the departure and says so where it does.

Also here: Instance Contrastive Learning (eqs. 7-8) on hand-built masks whose values are worked out by hand, the
padding of an expression changing nothing (SAM's mask decoder has no key mask for its sparse tokens), and, with
SAM frozen as in the paper, the mask prompt and the point prompt each changing SAM's output and each carrying the
gradient back to the coarse map.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomise_parameters
from refseg import PromptRisConfig, PromptRisModel
from refseg.backbones import tiny_clip_config, tiny_sam_config
from refseg.losses import instance_contrastive_loss  # the loss under test in the hand-worked cases

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-10
VOCAB = 1024
SOS, EOS = VOCAB - 2, VOCAB - 1  # the tiny tokenizer's ids; EOS is also the padding id, as in openai/clip
N_PROMPTS = 3
CLIP_SIZE, SAM_SIZE, LABEL_SIZE = 32, 64, 64  # CLIP 4x4 tokens (patch 8); SAM 4x4 embedding -> 16x16 mask frame
LENGTHS = (5, 8, 5, 3)  # real tokens per row ([SOS] words [EOS]); two images, two rows each
WORDS = 12  # padded length


def build_model(stage="end_to_end", seed=0, **overrides):
    """A small Prompt-RIS in float64 with every parameter random (`randomise`), SAM frozen (the paper's setting)."""
    clip = tiny_clip_config(hidden_size=32, num_layers=2, num_heads=4, image_size=CLIP_SIZE, patch_size=8,
                            max_text_len=16, vocab_size=VOCAB)
    sam = tiny_sam_config(hidden_size=32, num_layers=2, num_heads=2, image_size=SAM_SIZE, patch_size=16,
                          window_size=2, output_channels=32, decoder_num_heads=2, decoder_mlp_dim=48)
    settings = dict(image_size=CLIP_SIZE, num_prompt_tokens=N_PROMPTS, cmp_hidden_size=16, cmp_num_heads=4,
                    decoder_hidden_size=24, decoder_num_heads=4, decoder_ffn_dim=40, word_length=WORDS,
                    gumbel_temperature=0.5, prompt_dropout=0.0, train_sam_decoder=False, training_stage=stage)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = PromptRisModel(PromptRisConfig(clip_config=clip, sam_config=sam, **settings)).to(torch.float64)
    return randomise(model, seed).eval()


def randomise(model, seed):
    """Every parameter drawn afresh (`randomise_parameters`, N(0, 1)), then scaled so that signals keep their size
    through the layers (weights / sqrt(fan-in), LayerNorm gains 1 + N(0, 0.2^2), biases N(0, 0.2^2)): with all
    weights at one std the coarse map comes out nearly flat and the prompts' effects small."""
    randomise_parameters(model, seed=seed, std=1.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.mul_(0.2).add_(1.0)
                module.bias.mul_(0.2)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = module.weight.shape[0] if isinstance(module, nn.ConvTranspose2d) else module.weight[0].numel()
                module.weight.div_(math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.mul_(0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return build_model()


def make_ids(lengths, padded=WORDS, seed=0):
    """[SOS] w_1 .. w_k [EOS] then padding (the EOS id), one row per length; words drawn below 1000."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), padded), EOS, dtype=torch.long)
    mask = torch.zeros(len(lengths), padded, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, 0] = SOS
        ids[row, 1:length - 1] = torch.randint(0, 1000, (length - 2,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


@pytest.fixture(scope="module")
def inputs():
    """Two images with two expressions each (rows 0-1 image 0, rows 2-3 image 1), labels, groups and instances."""
    generator = torch.Generator().manual_seed(1)
    ids, mask = make_ids(LENGTHS)
    pixels = torch.randn(2, 3, CLIP_SIZE, CLIP_SIZE, generator=generator, dtype=torch.float64)
    sam_pixels = torch.randn(2, 3, SAM_SIZE, SAM_SIZE, generator=generator, dtype=torch.float64)
    labels = torch.zeros(4, LABEL_SIZE, LABEL_SIZE, dtype=torch.float64)
    labels[0, 4:30, 6:40] = 1
    labels[1, 20:60, 30:62] = 1
    labels[2, 10:50, 10:30] = 1
    labels[3, 10:50, 10:30] = 1  # the same referent as row 2
    return dict(pixel_values=pixels[[0, 0, 1, 1]], input_ids=ids, attention_mask=mask,
                sam_pixel_values=sam_pixels[[0, 0, 1, 1]], labels=labels,
                group_ids=torch.tensor([0, 0, 1, 1]), instance_ids=torch.tensor([7, 8, 9, 9]))


def pick(inputs, *names):
    return {k: inputs[k] for k in names}


FORWARD = ("pixel_values", "input_ids", "attention_mask", "sam_pixel_values")


# ================================================================== plain-torch building blocks
def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def layer_norm_channels_first(x, norm):  # (B, C, H, W), over C
    return layer_norm(x.permute(0, 2, 3, 1), norm).permute(0, 3, 1, 2)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def attend(q, k, v, heads, allowed=None):
    """Multi-head softmax(q k^T / sqrt(d)) v on projected (B, L, D) tensors; `allowed` (B, Lq, Lk) bool."""
    batch, lq, width = q.shape
    d = width // heads

    def split(x):
        return x.reshape(batch, x.shape[1], heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, lq, width)


def cross_attention(module, query, key, value, heads, key_mask=None):
    """CrossAttn(query; key/value): projections q, k, v, attention, output projection."""
    allowed = None if key_mask is None else key_mask[:, None, :].expand(-1, query.shape[1], -1)
    out = attend(linear(query, module.q_proj), linear(key, module.k_proj), linear(value, module.v_proj), heads, allowed)
    return linear(out, module.out_proj)


def mlp(x, first, second, act):
    return linear(act(linear(x, first)), second)


# ================================================================== CLIP with Cross-Modal Prompting (eqs. 5-6)
def clip_layer(layer, x, heads, allowed=None):
    """A stock pre-LN CLIP encoder layer (`layer` is the wrapped `CLIPEncoderLayer`, read for its weights)."""
    h, attention = layer_norm(x, layer.layer_norm1), layer.self_attn
    x = x + linear(attend(linear(h, attention.q_proj), linear(h, attention.k_proj), linear(h, attention.v_proj),
                          heads, allowed), attention.out_proj)
    return x + mlp(layer_norm(x, layer.layer_norm2), layer.mlp.fc1, layer.mlp.fc2, quick_gelu)


def prompt_generator(generator, features, heads, key_mask=None):
    """T_{S2T}^i = CrossAttn(T_S^i, F_S^i) (eq. 5 / eq. 6). Departures (docs, "Cross-Modal Prompting's
    attention"): keys/values are LayerNorm'd, the attention runs at `cmp_hidden_size` and projects to the target
    tower's width."""
    keys = layer_norm(features, generator.norm)
    queries = generator.query_tokens.unsqueeze(0).expand(features.shape[0], -1, -1)
    return cross_attention(generator.attention, queries, keys, keys, heads, key_mask)


def reference_clip(model, pixel_values, input_ids, attention_mask):
    """Eqs. 5-6 at every paired layer: the prompts for layer i+1 come from the inputs to it, are prepended to the
    layer's input and dropped from its output. Text: every word sees the n prompts, causal order and padding
    otherwise as in CLIP. Returns (F_IC with [CLS], post-LN (B, 1+N, D_I); F_T after the final LN (B, L, D_T))."""
    clip, config = model.clip, model.config
    vision, text = clip.vision_model, clip.text_model
    assert config.clip_config.vision_config.hidden_act == config.clip_config.text_config.hidden_act == "quick_gelu"
    v_heads = config.clip_config.vision_config.num_attention_heads
    t_heads = config.clip_config.text_config.num_attention_heads
    n, cmp_heads = config.num_prompt_tokens, config.cmp_num_heads
    # embeddings (the input size is CLIP's own: no position interpolation)
    emb = vision.embeddings
    patches = F.conv2d(pixel_values, emb.patch_embedding.weight, stride=config.patch_size).flatten(2).transpose(1, 2)
    cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
    h_v = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight
    h_v = layer_norm(h_v, vision.pre_layrnorm)
    length = input_ids.shape[1]
    h_t = text.embeddings.token_embedding.weight[input_ids] + text.embeddings.position_embedding.weight[:length]
    real = attention_mask.bool()
    batch = input_ids.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    words_allowed = causal[None] & real[:, None, :]  # (B, L, L)
    # [prompts; words]: prompt rows see the prompts and the real words (their outputs are dropped anyway), word rows
    # see every prompt and what CLIP lets them see
    top = torch.cat([torch.ones(batch, n, n, dtype=torch.bool), real[:, None, :].expand(-1, n, -1)], dim=2)
    bottom = torch.cat([torch.ones(batch, length, n, dtype=torch.bool), words_allowed], dim=2)
    text_allowed = torch.cat([top, bottom], dim=1)
    cmp = model.cross_modal_prompting
    for i, (v_layer, t_layer) in enumerate(zip(vision.encoder.layers, text.encoder.layers)):
        v2l = prompt_generator(cmp.vision_to_language[i], h_v[:, 1:], cmp_heads)  # from the patch tokens F_IC^i
        l2v = prompt_generator(cmp.language_to_vision[i], h_t, cmp_heads, key_mask=real)  # from the words F_T^i
        h_t = clip_layer(t_layer.base_layer, torch.cat([v2l, h_t], dim=1), t_heads, text_allowed)[:, n:]
        h_v = clip_layer(v_layer.base_layer, torch.cat([l2v, h_v], dim=1), v_heads)[:, n:]
    return layer_norm(h_v, vision.post_layernorm), layer_norm(h_t, text.final_layer_norm)


# ================================================================== decoder and coarse map (eqs. 1-2)
def reference_coarse(model, image_tokens, words, input_ids, attention_mask):
    """Eq. 1, F'_IC = CrossAttn(F_IC, F_T), F'_T = CrossAttn(F_T, F_IC); eq. 2, S'_C = F'_IC . t_g, t_g = F'_T at
    [EOS]. Departures (docs, "Decoder", "Coarse map scale"): F_IC and F_T are first projected to D_C; each decoder
    layer is pre-LN with residuals and a feed-forward block per modality; a final LayerNorm each; eq. 2 is divided
    by sqrt(D_C). Returns (S'_C (B, N), F'_IC (B, N, D_C), t_g (B, D_C))."""
    decoder, config = model.decoder, model.config
    heads = config.decoder_num_heads
    pixels = linear(image_tokens[:, 1:], decoder.vision_proj)  # the patch tokens, [CLS] left out
    tokens = linear(words, decoder.text_proj)
    real = attention_mask.bool()
    for layer in decoder.layers:
        v, t = layer_norm(pixels, layer.vision_norm), layer_norm(tokens, layer.text_norm)
        pixels, tokens = (pixels + cross_attention(layer.vision_cross_attn, v, t, t, heads, key_mask=real),
                          tokens + cross_attention(layer.text_cross_attn, t, v, v, heads))
        pixels = pixels + mlp(layer_norm(pixels, layer.vision_ffn_norm), layer.vision_ffn[0], layer.vision_ffn[2], gelu)
        tokens = tokens + mlp(layer_norm(tokens, layer.text_ffn_norm), layer.text_ffn[0], layer.text_ffn[2], gelu)
    pixels, tokens = layer_norm(pixels, decoder.vision_out_norm), layer_norm(tokens, decoder.text_out_norm)
    eos = (input_ids == EOS).to(torch.long).argmax(dim=1)  # the first EOS id: the [EOS] token (padding comes after)
    t_g = tokens[torch.arange(len(eos)), eos]
    coarse = (pixels * t_g[:, None, :]).sum(-1) / math.sqrt(config.decoder_hidden_size)
    return coarse, pixels, t_g


def upsample(coarse, size):
    """S_C: S'_C upsampled (bilinear, half-pixel centres) to SAM's mask frame, (B, size, size)."""
    grid = int(math.isqrt(coarse.shape[-1]))
    return F.interpolate(coarse.reshape(-1, 1, grid, grid), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0]


# ================================================================== prompts for SAM (Sec. 3.1, eq. 3)
def fourier(coords, gaussian):
    """SAM's random-Fourier positional encoding of coordinates in [0, 1]: [sin, cos](2 pi (2c - 1) G)."""
    projected = 2 * math.pi * ((2 * coords - 1) @ gaussian)
    return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


def reference_point_table(model):
    """E of eq. 3: SAM's embedding of a positive point at the centre of each of the M x M mask pixels (row-major),
    i.e. the positional encoding plus the positive-point embedding."""
    encoder, size = model.sam.prompt_encoder, model.config.mask_size
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    coords = torch.stack([x, y], dim=-1).reshape(-1, 2)
    return fourier(coords, encoder.shared_embedding.positional_embedding) + encoder.point_embed[1].weight


def reference_image_pe(model):
    """SAM's image-wide positional encoding at its embedding grid's cell centres, (D_S, h, w)."""
    size = model.config.sam_grid_size
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    pe = fourier(torch.stack([x, y], dim=-1), model.sam.shared_image_embedding.positional_embedding)
    return pe.permute(2, 0, 1)


def reference_mask_prompt(model, mask_logits):
    """P_mask: S_C through SAM's prompt encoder's mask embedding (two stride-2 convs with channel LayerNorm and GELU,
    a 1x1 conv) -> (B, D_S, h, w)."""
    embed = model.sam.prompt_encoder.mask_embed
    h = F.conv2d(mask_logits[:, None], embed.conv1.weight, embed.conv1.bias, stride=2)
    h = gelu(layer_norm_channels_first(h, embed.layer_norm1))
    h = F.conv2d(h, embed.conv2.weight, embed.conv2.bias, stride=2)
    h = gelu(layer_norm_channels_first(h, embed.layer_norm2))
    return F.conv2d(h, embed.conv3.weight, embed.conv3.bias)


def reference_text_prompts(model, words, attention_mask, image_embeddings):
    """P_text: "two transformer blocks composed of self- and cross-attention modules, which take the text features
    F_T as queries" over SAM's image features F_IS. Decisions (docs / `PromptRisTextPromptLayer`): F_T projected to
    D_S first; pre-LN blocks with residuals and an MLP; SAM's image positional encoding on the keys; a final
    LayerNorm and linear map. Returns (B, L, D_S); only the real tokens are used."""
    prompter, heads = model.text_prompter, model.config.text_prompt_num_heads
    image = image_embeddings.flatten(2).transpose(1, 2)
    keys = image + reference_image_pe(model).flatten(1).T
    real = attention_mask.bool()
    h = linear(words, prompter.in_proj)
    for layer in prompter.layers:
        x = layer_norm(h, layer.self_attn_norm)
        h = h + cross_attention(layer.self_attn, x, x, x, heads, key_mask=real)
        x = layer_norm(h, layer.cross_attn_norm)
        h = h + cross_attention(layer.cross_attn, x, keys, image, heads)
        h = h + mlp(layer_norm(h, layer.mlp_norm), layer.mlp[0], layer.mlp[2], gelu)
    return linear(layer_norm(h, prompter.out_norm), prompter.out_proj)


# ================================================================== SAM decoding (eq. 4)
def sam_attention(module, q, k, v, heads):
    return linear(attend(linear(q, module.q_proj), linear(k, module.k_proj), linear(v, module.v_proj), heads),
                  module.out_proj)


def reference_sam_decode(model, image, dense, sparse):
    """Eq. 4 for one row: S' = D_sam([T_iou; T_out; P_point; P_text], P_mask + F_IS), SAM's two-way transformer
    written out; the first mask token's mask ("we only use the first prediction"). `image`, `dense` (D_S, h, w),
    `sparse` (T, D_S) -> (4h, 4w)."""
    decoder = model.sam.mask_decoder
    config = model.config.sam_config.mask_decoder_config
    assert config.hidden_act == "relu"
    heads = config.num_attention_heads
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, sparse])[None]  # (1, 5 + T, D)
    keys = (image + dense).flatten(1).T[None]  # (1, hw, D)
    key_pe = reference_image_pe(model).flatten(1).T[None]
    queries = tokens
    for i, layer in enumerate(decoder.transformer.layers):
        if i == 0:  # SAM's first block: no positional term, no residual on the self-attention
            queries = sam_attention(layer.self_attn, queries, queries, queries, heads)
        else:
            q = queries + tokens
            queries = queries + sam_attention(layer.self_attn, q, q, queries, heads)
        queries = layer_norm(queries, layer.layer_norm1)
        queries = queries + sam_attention(layer.cross_attn_token_to_image, queries + tokens, keys + key_pe, keys, heads)
        queries = layer_norm(queries, layer.layer_norm2)
        queries = layer_norm(queries + mlp(queries, layer.mlp.lin1, layer.mlp.lin2, torch.relu), layer.layer_norm3)
        keys = keys + sam_attention(layer.cross_attn_image_to_token, keys + key_pe, queries + tokens, queries, heads)
        keys = layer_norm(keys, layer.layer_norm4)
    final = decoder.transformer
    queries = queries + sam_attention(final.final_attn_token_to_image, queries + tokens, keys + key_pe, keys, heads)
    queries = layer_norm(queries, final.layer_norm_final_attn)
    side = image.shape[-1]
    up = keys[0].T.reshape(1, -1, side, side)
    up = F.conv_transpose2d(up, decoder.upscale_conv1.weight, decoder.upscale_conv1.bias, stride=2)
    up = gelu(layer_norm_channels_first(up, decoder.upscale_layer_norm))
    up = gelu(F.conv_transpose2d(up, decoder.upscale_conv2.weight, decoder.upscale_conv2.bias, stride=2))
    hyper = decoder.output_hypernetworks_mlps[0]  # the first mask token's
    h = torch.relu(linear(queries[0, 1], hyper.proj_in))
    for hidden in hyper.layers:
        h = torch.relu(linear(h, hidden))
    h = linear(h, hyper.proj_out)
    return (h @ up[0].flatten(1)).reshape(4 * side, 4 * side)


def reference_forward(model, inputs, like=None):
    """The whole of Sec. 3.1 at inference (eval mode: the point at the argmax, no prompt dropout).

    Ties: S_C is S'_C upsampled bilinearly, which repeats the border cells' values over the frame's outer pixels,
    so a maximum on the border of CLIP's grid is reached at several pixels; which of them an argmax returns then
    depends on the last bit of rounding. Every tied pixel is the paper's point; with `like` (B, M, M), the logits
    of the model under test, the reference takes, per row, the tied pixel whose final mask is nearest to it
    (a wrong equation is not rescued by this: its logits then match none of them)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_tokens, words = reference_clip(model, inputs["pixel_values"], ids, mask)
    coarse, pixels, t_g = reference_coarse(model, image_tokens, words, ids, mask)
    mask_logits = upsample(coarse, model.config.mask_size)
    out = dict(image_tokens=image_tokens, words=words, coarse=coarse, pixels=pixels, t_g=t_g, mask_logits=mask_logits)
    if model.config.training_stage == "coarse":
        out["logits"] = mask_logits
        return out
    with torch.no_grad():
        image = model.sam.get_image_embeddings(inputs["sam_pixel_values"])  # stock SAM image encoder, frozen
    dense = reference_mask_prompt(model, mask_logits)
    table = reference_point_table(model)
    text = reference_text_prompts(model, words, mask, image)
    real = mask.bool()
    flat = mask_logits.flatten(1)
    points, sparse, logits = [], [], []
    for b in range(len(ids)):
        options = []
        for index in (flat[b] >= flat[b].max() - 1e-12).nonzero().flatten().tolist():  # the argmax, ties included
            # P_text in R^{(L+2) x D_S}: the real tokens only ([SOS], words, [EOS]); no padding reaches SAM (its
            # decoder cannot mask sparse tokens)
            tokens = torch.cat([table[index:index + 1], text[b][real[b]]])
            options.append((tokens, reference_sam_decode(model, image[b], dense[b], tokens)))
        if like is not None:
            options.sort(key=lambda option: float((option[1] - like[b]).abs().max()))
        points.append(options[0][0][0])
        sparse.append(options[0][0])
        logits.append(options[0][1])
    out.update(image=image, dense=dense, point=torch.stack(points), text=text, sparse=sparse,
               logits=torch.stack(logits))
    return out


# ================================================================== losses (eqs. 7-9)
def reference_icl(logits, targets, group_ids, instance_ids, threshold=0.5):
    """Eqs. 7-8 per image group, averaged over groups. O_ij = 2 sum_k S_i^k S_j^k / (sum_k (S_i^k)^2 + sum_k
    (S_j^k)^2) on S = sigmoid(logits); L = -1/b^2 sum_ij w_i (Y_ij log O_ij + (1 - Y_ij) log(1 - O_ij)), Y_ij = 1 for
    the same instance, w_i the IoU of the i-th mask with its ground truth. Decisions (`instance_contrastive_loss`
    docstring, docs "Loss weights"): the minus sign of a cross-entropy; w_i binarises the prediction at 0.5 and
    carries no gradient."""
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    losses = []
    for group in sorted(set(group_ids.tolist())):
        rows = [i for i in range(len(group_ids)) if group_ids[i] == group]
        b, total = len(rows), 0.0
        for i in rows:
            pred, gt = probs[i].detach() > threshold, targets[i] > 0.5
            union = (pred | gt).sum()
            w_i = (pred & gt).sum().to(probs.dtype) / union if union > 0 else torch.tensor(1.0, dtype=probs.dtype)
            for j in rows:
                o_ij = 2 * (probs[i] * probs[j]).sum() / ((probs[i] ** 2).sum() + (probs[j] ** 2).sum())
                if instance_ids[i] == instance_ids[j]:
                    term = torch.log(o_ij) if i != j else torch.zeros((), dtype=probs.dtype)  # O_ii = 1 exactly
                else:
                    term = torch.log(1 - o_ij)
                total = total + w_i * term
        losses.append(-total / b**2)
    return torch.stack(losses).mean()


def reference_bce(logits, targets):
    return -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()


def reference_dice(logits, targets):
    """Dice loss per sample, averaged; smoothing 1 in numerator and denominator (refseg's `dice_loss`, as in V-Net
    / DETR code; the paper names the Dice loss only)."""
    p, t = torch.sigmoid(logits).flatten(1), targets.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def reference_losses(coarse, logits, labels, group_ids, instance_ids):
    """Eq. 9: L = L_clipseg + L_samseg + L_icl, BCE + dice on the coarse map and on the final mask, ICL on both.
    Decisions (docs "Loss weights"): the coarse target is the label area-averaged to CLIP's grid; the final mask is
    upsampled (bilinear) to the label's size."""
    grid = int(math.isqrt(coarse.shape[-1]))
    cell = labels.shape[-1] // grid
    coarse_target = labels.reshape(len(labels), grid, cell, grid, cell).mean(dim=(2, 4))
    coarse = coarse.reshape(-1, grid, grid)
    terms = {"coarse_bce": reference_bce(coarse, coarse_target), "coarse_dice": reference_dice(coarse, coarse_target),
             "coarse_icl": reference_icl(coarse, coarse_target, group_ids, instance_ids)}
    if logits is not None:
        final = F.interpolate(logits[:, None], size=labels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        terms.update(bce=reference_bce(final, labels), dice=reference_dice(final, labels),
                     icl=reference_icl(final, labels, group_ids, instance_ids))
    return terms


# ================================================================== the tests
def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_the_model_under_test_is_the_papers_setting(model):
    """Float64, SAM frozen (no SAM parameter trains in stage `end_to_end`), n prompts per layer and direction."""
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not any(p.requires_grad for p in model.sam.parameters()) and not any(
        p.requires_grad for p in model.clip.parameters())
    assert model.config.num_cmp_layers == 2 and model.config.mask_size == 16


def test_eqs_5_6_cross_modal_prompting(model, inputs):
    with torch.no_grad():
        image_tokens, words = model.encode_clip(*(inputs[k] for k in FORWARD[:3]))
        ref_image, ref_words = reference_clip(model, *(inputs[k] for k in FORWARD[:3]))
    close(image_tokens, ref_image, "F_IC")
    real = inputs["attention_mask"].bool()
    close(words[real], ref_words[real], "F_T (real tokens)")


def test_eqs_1_2_decoder_and_coarse_map(model, inputs):
    with torch.no_grad():
        out = model(**pick(inputs, *FORWARD))
        ref = reference_forward(model, inputs)
    close(out.coarse_logits, ref["coarse"].reshape(-1, 4, 4), "S'_C")
    close(out.image_embeds, ref["pixels"], "F'_IC")
    close(out.text_embeds, ref["t_g"], "t_g")


def test_eq_4_sam_decoding_end_to_end(model, inputs):
    """The whole forward: S' of eq. 4 from mask, point and text prompts, SAM frozen."""
    with torch.no_grad():
        out = model(**pick(inputs, *FORWARD))
        ref = reference_forward(model, inputs, like=out.logits)
    assert out.logits.shape == (4, 16, 16)
    close(out.logits, ref["logits"], "S' (eq. 4)")


def _decoder_calls(model, inputs):
    """The keyword arguments of every call of SAM's mask decoder, one forward per row (one call each), and the
    rows' logits."""
    calls, logits = [], []
    hook = model.sam.mask_decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            for row in range(len(inputs["input_ids"])):
                logits.append(model(**{k: inputs[k][row:row + 1] for k in FORWARD}).logits[0])
    finally:
        hook.remove()
    assert len(calls) == len(inputs["input_ids"])
    return calls, torch.stack(logits)


def test_each_prompt_reaches_sams_decoder_as_the_paper_says(model, inputs):
    """What SAM's decoder is given (eq. 4), prompt by prompt: the mask prompt P_mask = mask_embed(S_C) as the dense
    prompt (the decoder adds F_IS), the point prompt e_p (eq. 3, inference: E at the argmax of S_C) first among the
    sparse prompts, then the text prompts P_text of the real tokens, and no other token."""
    calls, logits = _decoder_calls(model, inputs)
    with torch.no_grad():
        ref = reference_forward(model, inputs, like=logits)
    for row, call in enumerate(calls):
        close(call["dense_prompt_embeddings"][0], ref["dense"][row], f"P_mask, row {row}")
        close(call["image_embeddings"][0], ref["image"][row], f"F_IS, row {row}")
        close(call["image_positional_embeddings"][0], reference_image_pe(model), f"SAM's image PE, row {row}")
        sparse = call["sparse_prompt_embeddings"][0, 0]  # (1 + real tokens, D_S)
        assert sparse.shape == (LENGTHS[row] + 1, model.config.sam_hidden_size), row
        close(sparse[0], ref["point"][row], f"e_p (eq. 3), row {row}")
        close(sparse[1:], ref["sparse"][row][1:], f"P_text, row {row}")
        assert call["multimask_output"] is False


def test_text_prompts(model, inputs):
    with torch.no_grad():
        _, words = model.encode_clip(*(inputs[k] for k in FORWARD[:3]))
        image = model.sam.get_image_embeddings(inputs["sam_pixel_values"])
        ours = model.text_prompter(words, inputs["attention_mask"].bool(), image,
                                   model.sam.get_image_wide_positional_embeddings())
        ref = reference_text_prompts(model, words, inputs["attention_mask"], image)
    real = inputs["attention_mask"].bool()
    close(ours[real], ref[real], "P_text")


def test_eq_3_point_table_is_sams_positive_point_embedding(model):
    with torch.no_grad():
        close(model.point_embeddings(), reference_point_table(model), "E")


def test_eq_3_gumbel_softmax_point_prompt_in_training(model):
    """Training: M = GumbelSoftmax(S_C) (hard, straight-through, temperature tau over the flattened M x M map),
    e_p = sum_i M_i E_i. The reference draws the same Gumbel noise, -log(Exp(1)), from the same seed, and checks the
    forward (one row of E) and the straight-through gradient (that of the soft sample) against autograd on it."""
    size, tau = model.config.mask_size, model.config.gumbel_temperature
    assert tau != 1.0  # so that a dropped temperature shows
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, size, size, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, model.config.sam_hidden_size, generator=generator, dtype=torch.float64)
    model.train()
    try:
        torch.manual_seed(11)
        point = model.point_prompt(logits)
    finally:
        model.eval()
    (grad,) = torch.autograd.grad((point * upstream).sum(), logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    flat = ref_logits.flatten(1)
    torch.manual_seed(11)
    gumbel = -torch.empty_like(flat).exponential_().log()
    soft = ((flat + gumbel) / tau).softmax(dim=1)
    hard = F.one_hot(soft.argmax(dim=1), flat.shape[1]).to(soft.dtype)
    ref_point = (hard - soft.detach() + soft) @ reference_point_table(model)
    (ref_grad,) = torch.autograd.grad((ref_point * upstream).sum(), ref_logits)
    close(point, ref_point, "e_p (training)")
    close(grad, ref_grad, "d e_p / d S_C (straight-through)")
    assert grad.abs().amax() > 1e-6


def test_eq_3_point_prompt_at_inference_is_e_at_the_argmax(model):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        close(model.point_prompt(logits), reference_point_table(model)[logits.flatten(1).argmax(1)], "e_p (inference)")


@pytest.mark.parametrize("stage", ["coarse", "end_to_end"])
def test_eq_9_total_loss_with_icl_on_both_masks(stage, inputs):
    model = build_model(stage)
    with torch.no_grad():
        out = model(**pick(inputs, *FORWARD, "labels", "group_ids", "instance_ids"))
        ref = reference_forward(model, inputs, like=out.logits if stage == "end_to_end" else None)
    terms = reference_losses(ref["coarse"], ref["logits"] if stage == "end_to_end" else None, inputs["labels"],
                             inputs["group_ids"], inputs["instance_ids"])
    assert set(out.loss_dict) == set(terms)
    for name, value in terms.items():
        close(out.loss_dict[name], value, name)
    close(out.loss, sum(terms.values()), "L (eq. 9)")
    if stage == "end_to_end":  # the IoU weights are not all 1 here, nor all 0: eq. 8's w_i is in play
        probs = torch.sigmoid(F.interpolate(ref["logits"][:, None], size=(LABEL_SIZE,) * 2, mode="bilinear",
                                            align_corners=False)[:, 0])
        pred, gt = probs > 0.5, inputs["labels"] > 0.5
        ious = (pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1)
        assert ((ious > 0) & (ious < 1)).any(), ious


# ------------------------------------------------------------------ ICL (eqs. 7-8) on hand-built masks
P, Q = math.log(4.0), -math.log(4.0)  # logits of probabilities 0.8 and 0.2


def _icl(logits, targets, groups, instances):
    return instance_contrastive_loss(torch.tensor(logits, dtype=torch.float64),
                                     torch.tensor(targets, dtype=torch.float64),
                                     torch.tensor(groups), instance_ids=torch.tensor(instances))


def test_icl_two_different_instances_by_hand():
    """S_1 = (0.8, 0.2), S_2 = (0.2, 0.8), targets (1, 0) and (0, 1), two instances: both binarised predictions are
    exact (w_1 = w_2 = 1), O_12 = 2 (0.16 + 0.16) / (0.68 + 0.68) = 8/17, the diagonal gives log 1 = 0, so
    L = -1/4 (2 log(1 - 8/17)) = 1/2 log(17/9)."""
    loss = _icl([[P, Q], [Q, P]], [[1, 0], [0, 1]], [0, 0], [1, 2])
    close(loss, torch.tensor(0.5 * math.log(17 / 9), dtype=torch.float64), "ICL, two instances")
    # the same pair as one instance: -1/4 (2 log(8/17))
    same = _icl([[P, Q], [Q, P]], [[1, 0], [0, 1]], [0, 0], [1, 1])
    close(same, torch.tensor(0.5 * math.log(17 / 8), dtype=torch.float64), "ICL, one instance")


THREE_ROWS = dict(
    logits=[[P, P, Q, Q], [P, Q, Q, Q], [P, Q, P, P]],
    targets=[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]],
    instances=[5, 5, 6],
)
# By hand: S_1 = (.8, .8, .2, .2), S_2 = (.8, .2, .2, .2), S_3 = (.8, .2, .8, .8).
#   w_1 = IoU((1,1,0,0), (1,1,0,0)) = 1;  w_2 = IoU((1,0,0,0), (1,1,0,0)) = 1/2;  w_3 = IoU((1,0,1,1), (0,0,1,1)) = 2/3.
#   sums of squares 1.36, 0.76, 1.96; S_1.S_2 = 0.88, S_1.S_3 = 1.12, S_2.S_3 = 1.00
#   O_12 = 1.76 / 2.12 = 44/53,  O_13 = 2.24 / 3.32 = 56/83,  O_23 = 2.00 / 2.72 = 25/34;  Y_12 = 1, Y_13 = Y_23 = 0.
#   L = -1/9 [ w_1 (log O_12 + log(1 - O_13)) + w_2 (log O_21 + log(1 - O_23)) + w_3 (log(1 - O_31) + log(1 - O_32)) ]
THREE_ROWS_LOSS = -(1 / 9) * (
    1.0 * (math.log(44 / 53) + math.log(27 / 83))
    + 0.5 * (math.log(44 / 53) + math.log(9 / 34))
    + (2 / 3) * (math.log(27 / 83) + math.log(9 / 34))
)


def test_icl_iou_weights_and_labels_by_hand():
    loss = _icl(THREE_ROWS["logits"], THREE_ROWS["targets"], [0, 0, 0], THREE_ROWS["instances"])
    close(loss, torch.tensor(THREE_ROWS_LOSS, dtype=torch.float64), "ICL, three rows")
    # with every w_i = 1 it would be another number (so the weights are in play)
    unweighted = -(1 / 9) * 2 * (math.log(44 / 53) + math.log(27 / 83) + math.log(9 / 34))
    assert abs(THREE_ROWS_LOSS - unweighted) > 1e-2


def test_icl_averages_eq_8_over_images_by_hand():
    """Two images in one batch: eq. 8 per image (its own b), the mean over images; rows of one image never pair
    with another's."""
    logits = [[P, Q, Q, Q], [Q, P, Q, Q]] + THREE_ROWS["logits"]
    targets = [[1, 0, 0, 0], [0, 1, 0, 0]] + THREE_ROWS["targets"]
    # image 0: S_1 = (.8, .2, .2, .2), S_2 = (.2, .8, .2, .2), both exact (w = 1), two instances:
    #   O_12 = 2 (0.16 + 0.16 + 0.04 + 0.04) / (0.76 + 0.76) = 0.8 / 1.52 = 10/19, L_0 = -1/4 (2 log(9/19))
    first = 0.5 * math.log(19 / 9)
    loss = _icl(logits, targets, [3, 3, 8, 8, 8], [1, 2] + THREE_ROWS["instances"])
    close(loss, torch.tensor((first + THREE_ROWS_LOSS) / 2, dtype=torch.float64), "ICL, two images")


def test_icl_reference_matches_the_hand_numbers():
    """The plain-torch reference used on the model's outputs above gives the hand-worked numbers too."""
    loss = reference_icl(torch.tensor(THREE_ROWS["logits"], dtype=torch.float64),
                         torch.tensor(THREE_ROWS["targets"], dtype=torch.float64),
                         torch.tensor([0, 0, 0]), torch.tensor(THREE_ROWS["instances"]))
    close(loss, torch.tensor(THREE_ROWS_LOSS, dtype=torch.float64), "reference ICL")


# ------------------------------------------------------------------ padding changes nothing
def test_padding_length_changes_nothing(model):
    """The same expressions padded to 6, 12 and 16 tokens give the same logits and coarse maps (SAM's mask decoder
    cannot mask sparse tokens, so padding must never reach it), and a row's logits do not depend on the rows
    batched with it."""
    lengths = (5, 3, 6)
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(3, 3, CLIP_SIZE, CLIP_SIZE, generator=generator, dtype=torch.float64)
    sam_pixels = torch.randn(3, 3, SAM_SIZE, SAM_SIZE, generator=generator, dtype=torch.float64)
    outputs = []
    for padded in (6, 12, 16):
        ids, mask = make_ids(lengths, padded=padded, seed=6)
        with torch.no_grad():
            outputs.append(model(pixel_values=pixels, input_ids=ids, attention_mask=mask, sam_pixel_values=sam_pixels))
    for other in outputs[1:]:
        torch.testing.assert_close(other.coarse_logits, outputs[0].coarse_logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(other.logits, outputs[0].logits, rtol=0, atol=1e-12)
    ids, mask = make_ids(lengths, padded=12, seed=6)
    with torch.no_grad():
        alone = model(pixel_values=pixels[1:2], input_ids=ids[1:2], attention_mask=mask[1:2],
                      sam_pixel_values=sam_pixels[1:2]).logits
    torch.testing.assert_close(alone[0], outputs[1].logits[1], rtol=0, atol=1e-12)


def test_rows_without_text_prompts_and_mixed_lengths(model):
    """SAM's decoder on mixed rows: a row whose text prompts were dropped (prompt dropout) passes its point alone,
    the others their real tokens, whatever the order of the rows and of their real tokens in the padded frame."""
    generator = torch.Generator().manual_seed(10)
    width, side = model.config.sam_hidden_size, model.config.sam_grid_size
    image = torch.randn(3, width, side, side, generator=generator, dtype=torch.float64)
    dense = torch.randn(3, width, side, side, generator=generator, dtype=torch.float64)
    point = torch.randn(3, width, generator=generator, dtype=torch.float64)
    text = torch.randn(3, 5, width, generator=generator, dtype=torch.float64)
    text_mask = torch.tensor([[True, True, False, True, False], [False] * 5, [True, False, False, False, True]])
    with torch.no_grad():
        ours = model._sam_decode(image, model.sam.get_image_wide_positional_embeddings(), dense, point, text, text_mask)
    for row in range(3):
        tokens = torch.cat([point[row:row + 1], text[row][text_mask[row]]])  # the point, then the real tokens in order
        close(ours[row], reference_sam_decode(model, image[row], dense[row], tokens), f"row {row}")


# ------------------------------------------------------------------ with SAM frozen, mask and point prompts each matter
@pytest.fixture
def frozen_sam_model():
    return build_model(train_sam_decoder=False)


def _sam_inputs(model, inputs):
    with torch.no_grad():
        _, words = model.encode_clip(*(inputs[k] for k in FORWARD[:3]))
    generator = torch.Generator().manual_seed(8)
    mask_logits = torch.randn(4, 16, 16, generator=generator, dtype=torch.float64)
    return mask_logits, words, inputs["attention_mask"].bool(), inputs["sam_pixel_values"]


def test_mask_and_point_prompts_each_change_frozen_sams_output(frozen_sam_model, inputs, monkeypatch):
    model = frozen_sam_model
    assert not any(p.requires_grad for p in model.sam.parameters())
    with torch.no_grad():
        reference = model(**pick(inputs, *FORWARD)).logits
    encoder = model.sam.prompt_encoder
    # no mask prompt: SAM's own "no mask" embedding in place of P_mask
    hook = encoder.mask_embed.register_forward_hook(
        lambda _m, _a, out: encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(out))
    try:
        with torch.no_grad():
            without_mask = model(**pick(inputs, *FORWARD)).logits
    finally:
        hook.remove()
    # no point prompt: SAM's own "not a point" embedding in place of e_p
    monkeypatch.setattr(model, "point_prompt", lambda logits: encoder.not_a_point_embed.weight.expand(len(logits), -1))
    with torch.no_grad():
        without_point = model(**pick(inputs, *FORWARD)).logits
    for name, changed in (("mask", without_mask), ("point", without_point)):
        assert ((changed - reference).flatten(1).abs().amax(1) > 1e-6).all(), name


@pytest.mark.parametrize("path", ["mask", "point", "both"])
def test_gradient_reaches_the_coarse_map_through_each_prompt(frozen_sam_model, inputs, path, monkeypatch):
    """Training mode (Gumbel point), SAM frozen: d S' / d S_C is non-zero through the mask prompt alone (the point
    prompt fed a detached S_C), through the point prompt alone (the mask embedding fed a detached S_C), and both."""
    model = frozen_sam_model.train()
    mask_logits, words, word_mask, sam_pixels = _sam_inputs(model, inputs)
    mask_logits.requires_grad_(True)
    handles = []
    if path == "mask":
        point_prompt = model.point_prompt
        monkeypatch.setattr(model, "point_prompt", lambda logits: point_prompt(logits.detach()))
    if path == "point":
        handles.append(model.sam.prompt_encoder.mask_embed.register_forward_pre_hook(
            lambda _m, args: (args[0].detach(),)))
    try:
        torch.manual_seed(0)
        logits = model.decode_with_sam(mask_logits, words, word_mask, sam_pixels)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9), dtype=logits.dtype)
        (grad,) = torch.autograd.grad((logits * weights).sum(), mask_logits)
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    assert (grad.flatten(1).abs().amax(1) > 1e-8).all(), path
    assert all(p.grad is None for p in model.sam.parameters())
