"""CRIS against the authors' layout (DerrickWang005/CRIS.pytorch, read, not copied): a state dict with their
parameter names and shapes, random, mapped onto `CrisModel` by `convert_cris_original_state_dict`, and the
model's heads compared with a reference written here in their layout (their `fuse3` order [F_v3, F_m4], their
text gate Linear -> BatchNorm1d -> ReLU in eval mode, `nn.MultiheadAttention`'s packed projections and
key-padding convention, their projector). Plain torch, float64; reads only the state dict and the stock CLIP.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from refseg import CrisConfig, CrisModel
from refseg.backbones import tiny_clip_config
from refseg.models.cris.convert_cris_original import convert_cris_original_state_dict, load_cris_original_heads

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(rtol=1e-10, atol=1e-10)
FPN_IN, FPN_OUT = [32, 32, 20], [16, 24, 40]  # (1/8, 1/16, 1/32 inputs), neck widths
WORD_DIM, VIS_DIM, WORD_WIDTH, LAYERS, HEADS, FFN = 20, 24, 32, 2, 4, 36


def authors_state_dict(seed=0):
    """Random tensors under their names and shapes (`CRIS.neck`, `.decoder`, `.proj`), `module.`-prefixed as
    their DDP training saves them."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}

    def rand(*shape, std=0.15):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std

    def conv_layer(name, cin, cout, k):
        sd[f"{name}.0.weight"] = rand(cout, cin, k, k)
        norm(f"{name}.1", cout)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(c, std=0.5) + 1, rand(c)
        sd[f"{name}.running_mean"] = rand(c, std=0.3)
        sd[f"{name}.running_var"] = torch.rand(c, generator=generator, dtype=torch.float64) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    def ln(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(c, std=0.3) + 1, rand(c)

    def lin(name, cin, cout, bias=True):
        sd[f"{name}.weight"] = rand(cout, cin)
        if bias:
            sd[f"{name}.bias"] = rand(cout)

    i0, i1, i2 = FPN_IN
    o0, o1, o2 = FPN_OUT
    lin("neck.txt_proj.0", i2, o2, bias=False)
    norm("neck.txt_proj.1", o2)
    conv_layer("neck.f1_v_proj", i2, o2, 1)
    norm("neck.norm_layer.0", o2)
    conv_layer("neck.f2_v_proj", i1, o1, 3)
    conv_layer("neck.f2_cat", o2 + o1, o1, 1)
    conv_layer("neck.f3_v_proj", i0, o0, 3)
    conv_layer("neck.f3_cat", o0 + o1, o1, 1)
    conv_layer("neck.f4_proj5", o2, o1, 3)
    conv_layer("neck.f4_proj4", o1, o1, 3)
    conv_layer("neck.f4_proj3", o1, o1, 3)
    conv_layer("neck.aggr", 3 * o1, o1, 1)
    conv_layer("neck.coordconv.0.conv1", o1 + 2, o1, 3)
    conv_layer("neck.coordconv.1", o1, o1, 3)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}"
        for name in ("self_attn_norm", "cross_attn_norm", "norm1", "norm2", "norm3"):
            ln(f"{p}.{name}", VIS_DIM)
        sd[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj_bias"] = rand(3 * VIS_DIM, VIS_DIM), rand(3 * VIS_DIM)
        lin(f"{p}.self_attn.out_proj", VIS_DIM, VIS_DIM)
        # keys/values of another width than d_model: PyTorch keeps separate q/k/v weights and one packed bias
        sd[f"{p}.multihead_attn.q_proj_weight"] = rand(VIS_DIM, VIS_DIM)
        sd[f"{p}.multihead_attn.k_proj_weight"] = rand(VIS_DIM, WORD_WIDTH)
        sd[f"{p}.multihead_attn.v_proj_weight"] = rand(VIS_DIM, WORD_WIDTH)
        sd[f"{p}.multihead_attn.in_proj_bias"] = rand(3 * VIS_DIM)
        lin(f"{p}.multihead_attn.out_proj", VIS_DIM, VIS_DIM)
        lin(f"{p}.ffn.0", VIS_DIM, FFN)
        ln(f"{p}.ffn.3", FFN)
        lin(f"{p}.ffn.4", FFN, VIS_DIM)
    ln("decoder.norm", VIS_DIM)
    conv_layer("proj.vis.1", VIS_DIM, VIS_DIM, 3)
    conv_layer("proj.vis.3", VIS_DIM, VIS_DIM // 2, 3)
    sd["proj.vis.4.weight"], sd["proj.vis.4.bias"] = rand(VIS_DIM // 2, VIS_DIM // 2, 1, 1), rand(VIS_DIM // 2)
    lin("proj.txt", WORD_DIM, VIS_DIM // 2 * 9 + 1)
    sd["backbone.visual.conv1.weight"] = rand(4, 3, 3, 3)  # their CLIP: not mapped
    return {f"module.{k}": v for k, v in sd.items()}


# ----------------------------------------------------------------------------- their forward, in their layout
def bn(x, sd, name, eps=1e-5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - sd[f"{name}.running_mean"].view(shape)) / torch.sqrt(sd[f"{name}.running_var"].view(shape) + eps)
            * sd[f"{name}.weight"].view(shape) + sd[f"{name}.bias"].view(shape))


def conv_layer(x, sd, name):
    weight = sd[f"{name}.0.weight"]
    return torch.relu(bn(F.conv2d(x, weight, padding=weight.shape[-1] // 2), sd, f"{name}.1"))


def ln(x, sd, name, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def up2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def authors_fpn(sd, imgs, state):
    v3, v4, v5 = imgs
    state = torch.relu(bn(state @ sd["neck.txt_proj.0.weight"].T, sd, "neck.txt_proj.1"))[:, :, None, None]
    f5 = torch.relu(bn(conv_layer(v5, sd, "neck.f1_v_proj") * state, sd, "neck.norm_layer.0"))
    f4 = conv_layer(v4, sd, "neck.f2_v_proj")
    f4 = conv_layer(torch.cat([f4, up2(f5)], 1), sd, "neck.f2_cat")  # their order: visual first
    f3 = F.avg_pool2d(conv_layer(v3, sd, "neck.f3_v_proj"), 2, 2)
    f3 = conv_layer(torch.cat([f3, f4], 1), sd, "neck.f3_cat")
    fq = torch.cat([conv_layer(f3, sd, "neck.f4_proj3"), conv_layer(f4, sd, "neck.f4_proj4"),
                    up2(conv_layer(f5, sd, "neck.f4_proj5"))], 1)
    fq = conv_layer(fq, sd, "neck.aggr")
    b, _, h, w = fq.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, h, dtype=fq.dtype), torch.linspace(-1, 1, w, dtype=fq.dtype),
                          indexing="ij")
    fq = torch.cat([fq, x.expand(b, 1, -1, -1), y.expand(b, 1, -1, -1)], 1)
    return conv_layer(conv_layer(fq, sd, "neck.coordconv.0.conv1"), sd, "neck.coordconv.1")


def pos1d(d, length):
    """Their sine table, in float64 here (they compute it in their model's float32; refseg in the model's
    precision, float64 in these tests)."""
    pe = torch.zeros(length, d, dtype=torch.float64)
    position = torch.arange(0, length, dtype=torch.float64).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * -(math.log(10000.0) / d))
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
    return pe


def pos2d(d, h, w):
    half = d // 2
    cols, rows = pos1d(half, w), pos1d(half, h)
    return torch.cat([cols[None].expand(h, -1, -1), rows[:, None].expand(-1, w, -1)], -1).reshape(h * w, d)


def mha(sd, name, query, key, value, key_padding_mask=None):
    """`nn.MultiheadAttention` (batch first here), packed or separate input projections; `key_padding_mask`
    True = padding (their convention)."""
    d = query.shape[-1]
    bias = sd[f"{name}.in_proj_bias"]
    if f"{name}.in_proj_weight" in sd:
        wq, wk, wv = sd[f"{name}.in_proj_weight"].chunk(3)
    else:
        wq, wk, wv = (sd[f"{name}.{p}_proj_weight"] for p in "qkv")
    bq, bk, bv = bias.chunk(3)
    q, k, v = query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    b, n, _ = q.shape
    hd = d // HEADS
    q, k, v = (t.reshape(b, t.shape[1], HEADS, hd).transpose(1, 2) for t in (q, k, v))
    scores = (q / math.sqrt(hd)) @ k.transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, n, d)
    return out @ sd[f"{name}.out_proj.weight"].T + sd[f"{name}.out_proj.bias"]


def authors_decoder(sd, vis, txt, pad_mask):
    b, c, h, w = vis.shape
    vis_pos, txt_pos = pos2d(c, h, w), pos1d(txt.shape[-1], txt.shape[1])
    x = vis.flatten(2).transpose(1, 2)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}"
        x2 = ln(x, sd, f"{p}.norm1")
        x2 = mha(sd, f"{p}.self_attn", x2 + vis_pos, x2 + vis_pos, x2)
        x = x + ln(x2, sd, f"{p}.self_attn_norm")
        x2 = ln(x, sd, f"{p}.norm2")
        x2 = mha(sd, f"{p}.multihead_attn", x2 + vis_pos, txt + txt_pos, txt, key_padding_mask=pad_mask)
        x = x + ln(x2, sd, f"{p}.cross_attn_norm")
        x2 = ln(x, sd, f"{p}.norm3")
        x2 = torch.relu(x2 @ sd[f"{p}.ffn.0.weight"].T + sd[f"{p}.ffn.0.bias"])
        x2 = ln(x2, sd, f"{p}.ffn.3") @ sd[f"{p}.ffn.4.weight"].T + sd[f"{p}.ffn.4.bias"]
        x = x + x2
    return ln(x, sd, "decoder.norm").transpose(1, 2).reshape(b, c, h, w)


def authors_projector(sd, x, word):
    x = conv_layer(up2(x), sd, "proj.vis.1")
    x = conv_layer(up2(x), sd, "proj.vis.3")
    x = F.conv2d(x, sd["proj.vis.4.weight"], sd["proj.vis.4.bias"])
    b, c, h, w = x.shape
    word = word @ sd["proj.txt.weight"].T + sd["proj.txt.bias"]
    weight, bias = word[:, :-1].reshape(b, c, 3, 3), word[:, -1]
    return F.conv2d(x.reshape(1, b * c, h, w), weight, bias, padding=1, groups=b).reshape(b, h, w)


# ----------------------------------------------------------------------------- tests
def small_model():
    torch.manual_seed(0)
    clip = tiny_clip_config(vocab_size=600, hidden_size=32, num_layers=3, num_heads=4, image_size=32, patch_size=8,
                            max_text_len=16, projection_dim=WORD_DIM)
    config = CrisConfig(clip_config=clip, image_size=64, neck_hidden_sizes=FPN_OUT, decoder_num_layers=LAYERS,
                        decoder_num_heads=HEADS, decoder_ffn_dim=FFN, word_length=7, decoder_dropout=0.1,
                        vision_feature_layers=[1, 2, 3])
    return CrisModel(config).double().eval()


@pytest.fixture(scope="module")
def converted():
    sd = authors_state_dict()
    model = small_model()
    assert load_cris_original_heads(model, sd) == []
    return model, {k[len("module."):]: v for k, v in sd.items()}


def test_neck_equals_the_authors_fpn(converted):
    model, sd = converted
    generator = torch.Generator().manual_seed(1)
    imgs = (torch.randn(2, 32, 16, 16, generator=generator, dtype=torch.float64),
            torch.randn(2, 32, 8, 8, generator=generator, dtype=torch.float64),
            torch.randn(2, 20, 4, 4, generator=generator, dtype=torch.float64))
    state = torch.randn(2, 20, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.neck(imgs, state), authors_fpn(sd, imgs, state), **TOL)


def test_decoder_and_projector_equal_the_authors(converted):
    model, sd = converted
    generator = torch.Generator().manual_seed(2)
    vis = torch.randn(2, VIS_DIM, 8, 8, generator=generator, dtype=torch.float64)
    txt = torch.randn(2, 7, WORD_WIDTH, generator=generator, dtype=torch.float64)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    word = torch.randn(2, WORD_DIM, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        decoded = model.decoder(vis, txt, ~pad)
        torch.testing.assert_close(decoded, authors_decoder(sd, vis, txt, pad), **TOL)
        torch.testing.assert_close(model.projector(decoded, word), authors_projector(sd, decoded, word), **TOL)


def test_whole_heads_on_clip_features_equal_the_authors(converted):
    """The model's forward against their neck -> decoder -> projector on the same CLIP levels and text
    features (their padding mask: token id 0, here the attention mask's zeros)."""
    model, sd = converted
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(0, 590, (2, 7), generator=generator)
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    input_ids[0, -1], input_ids[1, 4:] = 599, 599
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        levels = model.get_visual_levels(pixel_values)
        words, state = model.get_word_features(input_ids, attention_mask)
        fq = authors_fpn(sd, levels, state)
        ref = authors_projector(sd, authors_decoder(sd, fq, words, attention_mask == 0), state)
    torch.testing.assert_close(out, ref, **TOL)


def test_conversion_details(tmp_path):
    sd = authors_state_dict()
    ours = convert_cris_original_state_dict(sd)
    assert not any(k.startswith("backbone") for k in ours)
    # fuse3's input channels are swapped: their [F_v3 (24), F_m4 (40)] -> our [F_m4, F_v3]
    theirs = sd["module.neck.f2_cat.0.weight"]
    assert torch.equal(ours["neck.fuse3.0.weight"][:, :40], theirs[:, 24:])
    assert torch.equal(ours["neck.fuse3.0.weight"][:, 40:], theirs[:, :24])
    # their checkpoint file, as their train.py writes it (optimizer and MultiStepLR state included), opened with
    # weights_only=True
    path = tmp_path / "best_model.pth"
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[35], gamma=0.1)
    torch.save({"epoch": 50, "cur_iou": 0.69, "best_iou": 0.7, "prec": {"Pr@50": 0.8}, "state_dict": sd,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    model = small_model()
    assert load_cris_original_heads(model, str(path)) == []
    torch.testing.assert_close(model.state_dict()["projector.text_proj.weight"], sd["module.proj.txt.weight"], **TOL)
    # widths that do not fit (their ResNet's) are refused, or skipped and listed
    sd["module.proj.txt.weight"] = torch.zeros(VIS_DIM // 2 * 9 + 1, 1024, dtype=torch.float64)
    with pytest.raises(ValueError, match="projector.text_proj.weight"):
        load_cris_original_heads(small_model(), sd)
    assert load_cris_original_heads(small_model(), sd, strict=False) == ["projector.text_proj.weight"]
    with pytest.raises(KeyError, match="no mapping"):
        convert_cris_original_state_dict({"neck.unknown.weight": torch.zeros(1)})
