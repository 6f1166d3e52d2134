"""RISCLIP end to end against a reference written from the paper (Kim, Kang, Park; Sec. 3, Appendix A).

`reference_forward` below is the whole model in plain torch, float64: CLIP's two towers written out
from their weights, with the Backbone Adapters of eqs. 3-4 after the MHSA and MLP residuals of every
layer, PreFusion (eqs. 5-8) between the last six image/text layer pairs (the deepest pair first), the
final LN + projections, six PostFusion layers, the Locator's map (sigmoid of the scaled cosine between
the patch tokens and the [EOS] token), the Refiner on that map and the outputs of CLIP image layers
4, 3, 2, 1, and the loss of eqs. 9-10 (lambda_focal : lambda_dice = 1.75 : 1.0, alpha 0.65, gamma 2).

It reads only the weights of the model under test (its state dict) and calls nothing from refseg. The
model's numbers the paper fixes (6 PreFusion, 6 PostFusion, layers 4, 3, 2, 1, the loss weights) are
written here, not read from the config, so a wrong default fails too. Every parameter is random
(`randomise_parameters`), so the zero-initialised branches are live. tests/test_mutation_kills_fusion.py
and tests/test_mutation_kills_layers.py check the adapter modules alone; this file checks how the model
wires them: which layer, which pairing, which token, which features, which loss.

The towers have different depths (10 image, 8 text layers) and widths (16, 12) and PreFusion a shared
width (12) other than CLIP's joint space (8), so a swapped index or width cannot pass by coincidence.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig

from refseg import RisclipConfig, RisclipModel

from conftest import randomise_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

# The paper's numbers (Sec. 4.2, Appendix A).
NUM_PRE_FUSION = 6
NUM_POST_FUSION = 6
REFINER_LAYERS = (4, 3, 2, 1)
LAMBDA_FOCAL, LAMBDA_DICE, FOCAL_ALPHA, FOCAL_GAMMA = 1.75, 1.0, 0.65, 2.0

V_LAYERS, T_LAYERS, V_WIDTH, T_WIDTH, HEADS = 10, 8, 16, 12, 2
SOS, EOS, VOCAB = 62, 63, 64
EPS = 1e-5  # every LayerNorm and BatchNorm


# ----------------------------------------------------------------------------- model under test
def build_model(*, patch=16, image=64, projection=None, techniques=False, seed=0):
    clip = CLIPConfig(
        vision_config=dict(hidden_size=V_WIDTH, intermediate_size=24, num_hidden_layers=V_LAYERS,
                           num_attention_heads=HEADS, image_size=image, patch_size=patch, projection_dim=8),
        text_config=dict(hidden_size=T_WIDTH, intermediate_size=20, num_hidden_layers=T_LAYERS,
                         num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=8,
                         bos_token_id=SOS, eos_token_id=EOS, pad_token_id=EOS, projection_dim=8),
        projection_dim=8,
    )
    config = RisclipConfig(
        clip_config=clip, image_size=image, adapter_bottleneck_dim=4, fusion_hidden_size=12, fusion_num_heads=HEADS,
        refiner_hidden_sizes=[6, 5, 4, 3], refiner_projection_dim=projection,
        adapter_channel_scale=techniques, learnable_attention_temperature=techniques,
    )
    torch.manual_seed(seed)
    model = RisclipModel(config).double().eval()
    randomise_parameters(model, seed=seed + 1, std=0.3)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # BatchNorm statistics, which `randomise_parameters` (parameters only) leaves at 0/1
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype) * 0.3)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype) + 0.5)
    return model


def make_inputs(image, seed=0):
    """Two images and two expressions: [SOS] w w [EOS] pad (padding holds odd tokens, so attending to it
    shows) and [SOS] w w w [EOS]; binary target masks at the input size."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, image, image, generator=generator, dtype=torch.float64)
    input_ids = torch.tensor([[SOS, 7, 21, EOS, 40], [SOS, 3, 9, 50, EOS]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = (torch.rand(2, image, image, generator=generator) > 0.6).to(torch.float64)
    return pixel_values, input_ids, attention_mask, labels


# ----------------------------------------------------------------------------- the reference
def layer_norm(x, p, name):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * p[name + ".weight"] + p[name + ".bias"]


def linear(x, p, name, bias=True):
    out = x @ p[name + ".weight"].T
    return out + p[name + ".bias"] if bias else out


def quick_gelu(x):  # CLIP's activation (`hidden_act="quick_gelu"`)
    return x * torch.sigmoid(1.702 * x)


def gelu(x):  # the PostFusion MLP's
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(p, name, queries, keys, allowed=None):
    """Multi-head attention: softmax(q k^T / sqrt(d_h) [* exp(t_h)]) v, then the output projection.

    `allowed` (B, Nq, Nk) or (B, 1, Nk): False where a query may not look. refseg folds the key/value
    projections of a few queries on many keys into the queries (docs/risclip.md, "Fusion attention"): the
    same equations, so this plain form is also the reference of the folded path.
    """
    b, nq, d = queries.shape
    dh = d // HEADS
    q = linear(queries, p, name + ".q_proj").view(b, nq, HEADS, dh).transpose(1, 2)
    k = linear(keys, p, name + ".k_proj").view(b, -1, HEADS, dh).transpose(1, 2)
    v = linear(keys, p, name + ".v_proj").view(b, -1, HEADS, dh).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, H, Nq, Nk)
    if name + ".temperature" in p:  # Appendix A's learnable temperature
        logits = logits * p[name + ".temperature"].exp()[None, :, None, None]
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)
    return linear(out, p, name + ".out_proj")


def scaled(x, p, name):  # Appendix A's learnable channel-wise scaler, where the model has it
    return x * p[name] if name in p else x


def backbone_adapter(p, name, x):
    """AD(x) = up(ReLU(down(x))): AdaptFormer's adapter (the paper: down, non-linearity, up)."""
    return scaled(linear(torch.relu(linear(x, p, name + ".down")), p, name + ".up"), p, name + ".scale")


def clip_layer(p, name, f, allowed=None, value_path=False):
    """Eqs. 1-4: one pre-LN CLIP layer with a Backbone Adapter after each residual.

    `value_path`: the last image layer, read as MaskCLIP does (Sec. 3.1, "Following MaskCLIP"): every
    token gets its own value, out_proj(v_proj(LN(f))), instead of attending.
    """
    base = name + ".base_layer"
    x = layer_norm(f, p, base + ".layer_norm1")
    if value_path:
        mhsa = linear(linear(x, p, base + ".self_attn.v_proj"), p, base + ".self_attn.out_proj")
    else:
        mhsa = attention(p, base + ".self_attn", x, x, allowed)
    f_bar = mhsa + f  # eq. 1
    f_bar = backbone_adapter(p, name + ".adapter_attn.default", f_bar) + f_bar  # eq. 3
    f_i = linear(quick_gelu(linear(layer_norm(f_bar, p, base + ".layer_norm2"), p, base + ".mlp.fc1")), p,
                 base + ".mlp.fc2") + f_bar  # eq. 2
    return backbone_adapter(p, name + ".adapter_mlp.default", f_i) + f_i  # eq. 4


def pre_fusion(p, name, f_v, f_t, text_keys):
    """Eqs. 5-8, LN before the shared-space projections and before the cross-attentions."""
    s_v = layer_norm(linear(layer_norm(f_v, p, name + ".norm_vision"), p, name + ".v2s"), p, name + ".norm_shared_vision")
    s_t = layer_norm(linear(layer_norm(f_t, p, name + ".norm_text"), p, name + ".t2s"), p, name + ".norm_shared_text")
    m_v = attention(p, name + ".vision_cross_attn", s_v, s_t, text_keys)  # image queries the text
    m_t = attention(p, name + ".text_cross_attn", s_t, s_v)  # text queries the image
    f_v = f_v + scaled(linear(m_v, p, name + ".s2v"), p, name + ".vision_scale")
    f_t = f_t + scaled(linear(m_t, p, name + ".s2t"), p, name + ".text_scale")
    return f_v, f_t


def post_fusion(p, name, v, t, text_keys):
    """CA (each modality queries the other, both reading the layer's inputs), MHSA, MLP; pre-LN, residual."""
    def norm(x, branch):
        return layer_norm(x, p, f"{name}.norms.{branch}")

    def scale(x, branch):
        return scaled(x, p, f"{name}.scales.{branch}")

    v_in, t_in = norm(v, "cross_vision"), norm(t, "cross_text")
    v = v + scale(attention(p, name + ".vision_cross_attn", v_in, t_in, text_keys), "cross_vision")
    t = t + scale(attention(p, name + ".text_cross_attn", t_in, v_in), "cross_text")
    v_n, t_n = norm(v, "self_vision"), norm(t, "self_text")
    v = v + scale(attention(p, name + ".vision_self_attn", v_n, v_n), "self_vision")
    t = t + scale(attention(p, name + ".text_self_attn", t_n, t_n, text_keys), "self_text")
    def mlp(x, module):
        return linear(gelu(linear(x, p, f"{name}.{module}.fc1")), p, f"{name}.{module}.fc2")

    v = v + scale(mlp(norm(v, "mlp_vision"), "vision_mlp"), "mlp_vision")
    t = t + scale(mlp(norm(t, "mlp_text"), "text_mlp"), "mlp_text")
    return v, t


def refiner(p, probability, features, projected, size):
    """Appendix A: [3x3 conv, BN, ReLU, x2 bilinear] four times, each fed the previous map concatenated with
    the next shallower feature map (resized bilinearly to match), then a 1x1 projection to background /
    foreground scores, bicubic-resized to the input size where 16x overshoots it (patch 14 / here 8).

    `projected`: refseg's documented departure (`refiner_projection_dim`, docs/risclip.md "Departures"):
    each feature map first goes through a 1x1 conv at the token grid, and only the reduced map is resized.
    """
    x = probability
    for k, feature in enumerate(features):
        if projected:
            w = p[f"refiner.feature_projections.{k}.weight"][:, :, 0, 0]
            feature = torch.einsum("oc,bchw->bohw", w, feature) + p[f"refiner.feature_projections.{k}.bias"][:, None, None]
        if feature.shape[-2:] != x.shape[-2:]:
            feature = F.interpolate(feature, size=x.shape[-2:], mode="bilinear", align_corners=False)
        name = f"refiner.layers.{k}"
        x = F.conv2d(torch.cat([x, feature], dim=1), p[name + ".conv.weight"], padding=1)
        x = (x - p[name + ".norm.running_mean"][:, None, None]) / torch.sqrt(p[name + ".norm.running_var"][:, None, None] + EPS)
        x = torch.relu(x * p[name + ".norm.weight"][:, None, None] + p[name + ".norm.bias"][:, None, None])
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    scores = torch.einsum("oc,bchw->bohw", p["refiner.proj.weight"][:, :, 0, 0], x) + p["refiner.proj.bias"][:, None, None]
    if scores.shape[-2:] != size:
        scores = F.interpolate(scores, size=size, mode="bicubic", align_corners=False)
    return scores[:, 1] - scores[:, 0]  # fg - bg: sigmoid > 0.5 is the argmax


def seg_loss(logits, target):
    """Eqs. 9-10: lambda_focal * focal + lambda_dice * dice. Focal per element, averaged (soft targets
    interpolate alpha_t and p_t linearly: refseg.losses' documented reading); dice per sample with +1
    smoothing, averaged over the batch."""
    prob = torch.sigmoid(logits)
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
    ce = -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob))
    focal = (alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce).mean()
    prob, target = prob.flatten(1), target.flatten(1)
    dice = (1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)).mean()
    return LAMBDA_FOCAL * focal + LAMBDA_DICE * dice


def reference_forward(model, pixel_values, input_ids, attention_mask, labels, projected):
    p = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    b, _, height, width = pixel_values.shape
    patch = p["clip.vision_model.embeddings.patch_embedding.weight"].shape[-1]
    h, w = height // patch, width // patch

    # image tokens: patches (row-major) -> linear embedding, [CLS] in front, positions, LN
    patches = pixel_values.reshape(b, 3, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    tokens = patches @ p["clip.vision_model.embeddings.patch_embedding.weight"].reshape(V_WIDTH, -1).T
    cls = p["clip.vision_model.embeddings.class_embedding"].expand(b, 1, V_WIDTH)
    f_v = torch.cat([cls, tokens], 1) + p["clip.vision_model.embeddings.position_embedding.weight"]
    f_v = layer_norm(f_v, p, "clip.vision_model.pre_layrnorm")
    # text tokens: word + position embeddings; causal attention, padding never a key
    n = input_ids.shape[1]
    f_t = p["clip.text_model.embeddings.token_embedding.weight"][input_ids] + p["clip.text_model.embeddings.position_embedding.weight"][:n]
    real = attention_mask.bool()
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None] & real[:, None, :]  # (B, T, T)
    text_keys = real[:, None, :]  # (B, 1, T)

    def image_layer(i, f):  # 1-based
        return clip_layer(p, f"clip.vision_model.encoder.layers.{i - 1}", f, value_path=i == V_LAYERS)

    def text_layer(j, f):
        return clip_layer(p, f"clip.text_model.encoder.layers.{j - 1}", f, allowed=causal)

    outputs = {}
    for i in range(1, V_LAYERS - NUM_PRE_FUSION + 1):
        f_v = outputs[i] = image_layer(i, f_v)
    for j in range(1, T_LAYERS - NUM_PRE_FUSION + 1):
        f_t = text_layer(j, f_t)
    # PreFusion k (0 = the deepest pair) sits before image layer L_v - k and text layer L_t - k
    for k in reversed(range(NUM_PRE_FUSION)):
        f_v, f_t = pre_fusion(p, f"pre_fusion.{k}", f_v, f_t, text_keys)
        f_v = outputs[V_LAYERS - k] = image_layer(V_LAYERS - k, f_v)
        f_t = text_layer(T_LAYERS - k, f_t)

    # v = Proj(LN(f_L^v)), t = Proj(LN(f_L^t)); PostFusion on the patch tokens (refseg drops [CLS] here)
    v = linear(layer_norm(f_v, p, "clip.vision_model.post_layernorm"), p, "clip.visual_projection", bias=False)[:, 1:]
    t = linear(layer_norm(f_t, p, "clip.text_model.final_layer_norm"), p, "clip.text_projection", bias=False)
    for k in range(NUM_POST_FUSION):
        v, t = post_fusion(p, f"post_fusion.{k}", v, t, text_keys)

    # Locator: scaled cosine between every patch token and the [EOS] token
    eos = t[torch.arange(b), (input_ids == EOS).int().argmax(1)]  # (B, D)
    cosine = (v @ eos[:, :, None])[..., 0] / (v.norm(dim=-1) * eos.norm(dim=-1)[:, None])
    coarse = (p["locator.logit_scale"].exp() * cosine + p["locator.logit_bias"]).view(b, h, w)  # sigmoid: the map t

    # Refiner: the map, then the visual features of image layers 4, 3, 2, 1 (before any PreFusion)
    assert max(REFINER_LAYERS) <= V_LAYERS - NUM_PRE_FUSION  # these layers precede every PreFusion
    features = [outputs[i][:, 1:].transpose(1, 2).reshape(b, V_WIDTH, h, w) for i in REFINER_LAYERS]
    logits = refiner(p, torch.sigmoid(coarse)[:, None], features, projected, (height, width))

    # losses: stage 1 on the token-level target (labels averaged over each patch), stage 2 on the pixels
    token_target = labels.reshape(b, h, patch, w, patch).mean((2, 4))
    losses = {"locator": seg_loss(coarse, token_target), "refiner": seg_loss(logits, labels)}
    return {"coarse_logits": coarse, "logits": logits, "image_embeds": v, "text_embeds": eos, "loss": losses}


# ----------------------------------------------------------------------------- tests
CASES = {
    "paper-refiner": dict(projection=None),
    "projected-refiner+techniques": dict(projection=4, techniques=True),
    "patch8-bicubic": dict(patch=8, image=32, projection=4),  # 16x overshoots: resized like RISCLIP-L
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_risclip_matches_the_paper_reference_end_to_end(case):
    options = CASES[case]
    image = options.get("image", 64)
    model = build_model(**options)
    assert model.config.num_pre_fusion_layers == NUM_PRE_FUSION
    assert model.config.num_post_fusion_layers == NUM_POST_FUSION
    pixel_values, input_ids, attention_mask, labels = make_inputs(image)
    expected = reference_forward(model, pixel_values, input_ids, attention_mask, labels,
                                 projected=options.get("projection") is not None)
    with torch.no_grad():
        for stage in ("locator", "refiner"):
            model.set_training_stage(stage)
            model.eval()
            out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            for key in ("image_embeds", "text_embeds", "coarse_logits", "logits"):
                torch.testing.assert_close(getattr(out, key), expected[key], rtol=1e-10, atol=1e-10, msg=key)
            torch.testing.assert_close(out.loss, expected["loss"][stage], rtol=1e-10, atol=1e-10, msg=f"{stage} loss")
    # the map depends on the expression: the two rows are no constant maps agreeing by accident
    assert not torch.allclose(expected["coarse_logits"][0], expected["coarse_logits"][1], atol=1e-3)


def test_padding_never_matters_and_the_reference_masks_it():
    """What the padding holds never changes the map (the causal text mask, and the padding masks of the
    cross-attentions where text tokens are keys, hide it), and the reference's masking is not idle:
    attending to the padding changes the map of the padded row."""
    model = build_model(projection=4)
    pixel_values, input_ids, attention_mask, labels = make_inputs(64)
    base = reference_forward(model, pixel_values, input_ids, attention_mask, labels, projected=True)["coarse_logits"]
    with torch.no_grad():
        padded = model(pixel_values=pixel_values, input_ids=input_ids.where(attention_mask.bool(), 11),
                       attention_mask=attention_mask).coarse_logits
    torch.testing.assert_close(padded, base, rtol=1e-10, atol=1e-10)
    unmasked = reference_forward(model, pixel_values, input_ids, torch.ones_like(attention_mask), labels, projected=True)
    assert (unmasked["coarse_logits"][0] - base[0]).abs().max() > 1e-3
