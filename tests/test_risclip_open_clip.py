"""scripts/convert_open_clip.py: OpenCLIP weights -> stock `CLIPModel` (the paper's RISCLIP-B backbone).

`open_clip` itself cannot be imported here (it needs torchvision, which the CPU environment does not have
and must not pull in), so the reference is OpenCLIP's computation written out below in plain torch,
float64, on a tiny random state dict in OpenCLIP's `CLIP` layout: fused attention in-projection, GELU
MLPs (`c_fc`, `c_proj`), `ln_post` on the [CLS] token then `@ visual.proj`, the text's causal
transformer, `ln_final`, the token at `argmax(ids)` (end of text) then `@ text_projection`.
"""

import math

import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

import convert_open_clip
from refseg import RisclipModel, RisclipProcessor
from refseg.presets import PRESETS, get_config

pytestmark = pytest.mark.usefixtures("single_thread")

V_WIDTH, V_LAYERS, V_HEADS, PATCH, GRID = 24, 2, 3, 8, 3
T_WIDTH, T_LAYERS, T_HEADS, CONTEXT, EMBED = 16, 2, 2, 12, 12


def open_clip_state_dict(vocab_size, seed=0, device=None, sizes=None):
    """Random weights under OpenCLIP's `CLIP` key names and shapes (float64)."""
    vw, vl, patch, grid, tw, tl, context, embed = sizes or (V_WIDTH, V_LAYERS, PATCH, GRID, T_WIDTH, T_LAYERS,
                                                            CONTEXT, EMBED)
    generator = None if device == "meta" else torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator, dtype=torch.float64) * std

    def blocks(prefix, width, layers):
        out = {}
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            out.update({
                b + "ln_1.weight": 1 + rand(width), b + "ln_1.bias": rand(width),
                b + "attn.in_proj_weight": rand(3 * width, width), b + "attn.in_proj_bias": rand(3 * width),
                b + "attn.out_proj.weight": rand(width, width), b + "attn.out_proj.bias": rand(width),
                b + "ln_2.weight": 1 + rand(width), b + "ln_2.bias": rand(width),
                b + "mlp.c_fc.weight": rand(4 * width, width), b + "mlp.c_fc.bias": rand(4 * width),
                b + "mlp.c_proj.weight": rand(width, 4 * width), b + "mlp.c_proj.bias": rand(width),
            })
        return out

    state = {
        "visual.conv1.weight": rand(vw, 3, patch, patch), "visual.class_embedding": rand(vw),
        "visual.positional_embedding": rand(grid * grid + 1, vw),
        "visual.ln_pre.weight": 1 + rand(vw), "visual.ln_pre.bias": rand(vw),
        **blocks("visual.", vw, vl),
        "visual.ln_post.weight": 1 + rand(vw), "visual.ln_post.bias": rand(vw), "visual.proj": rand(vw, embed),
        "token_embedding.weight": rand(vocab_size, tw), "positional_embedding": rand(context, tw),
        **blocks("", tw, tl),
        "ln_final.weight": 1 + rand(tw), "ln_final.bias": rand(tw), "text_projection": rand(tw, embed),
        "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
    }
    if device != "meta":  # OpenCLIP's causal-mask buffer, in older checkpoints
        state["attn_mask"] = torch.full((context, context), float("-inf")).triu(1)
    return state


# ----------------------------------------------------------------------------- OpenCLIP's forward, written out
def _ln(x, s, name):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * s[name + ".weight"] + s[name + ".bias"]


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _transformer(s, prefix, x, layers, heads, causal):
    b, n, width = x.shape
    dh = width // heads
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        h = _ln(x, s, p + "ln_1")
        q, k, v = (h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, heads, dh).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if causal:
            logits = logits + torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)
        attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)
        x = x + attn @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = _gelu(_ln(x, s, p + "ln_2") @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"])
        x = x + h @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
    return x


def open_clip_encode_image(s, pixels):
    b = pixels.shape[0]
    patches = pixels.reshape(b, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, GRID * GRID, -1)
    x = patches @ s["visual.conv1.weight"].reshape(V_WIDTH, -1).T
    x = torch.cat([s["visual.class_embedding"].expand(b, 1, V_WIDTH), x], 1) + s["visual.positional_embedding"]
    x = _transformer(s, "visual.", _ln(x, s, "visual.ln_pre"), V_LAYERS, V_HEADS, causal=False)
    return _ln(x[:, 0], s, "visual.ln_post") @ s["visual.proj"]


def open_clip_encode_text(s, ids):
    x = s["token_embedding.weight"][ids] + s["positional_embedding"][: ids.shape[1]]
    x = _ln(_transformer(s, "", x, T_LAYERS, T_HEADS, causal=True), s, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def converted(tiny_backbones, tmp_path_factory):
    """(OpenCLIP state dict, folder written by the script's `main` from a `.pt` file, tokenizer folder)."""
    tokenizer_dir = tiny_backbones["clip"]
    vocab = CLIPConfig.from_pretrained(tokenizer_dir).text_config.vocab_size
    state = open_clip_state_dict(vocab)
    root = tmp_path_factory.mktemp("open_clip")
    torch.save({"epoch": 32, "state_dict": {"module." + k: v for k, v in state.items()}}, root / "ckpt.pt")
    convert_open_clip.main(["--checkpoint", str(root / "ckpt.pt"), "--output", str(root / "clip"),
                            "--tokenizer", str(tokenizer_dir), "--vision_heads", str(V_HEADS),
                            "--text_heads", str(T_HEADS), "--dtype", "float32"])
    return state, root / "clip", tokenizer_dir


def _inputs(tokenizer_dir, seed=0):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tokenizer(["the red circle", "the blue square on the left of it"], padding="max_length", max_length=CONTEXT,
                     truncation=True, return_tensors="pt")
    pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    return pixels, text["input_ids"], text["attention_mask"]


def test_converted_clip_embeds_images_and_texts_as_open_clip_does(converted):
    state, folder, tokenizer_dir = converted
    model = CLIPModel.from_pretrained(folder).double().eval()
    config = model.config
    assert config.vision_config.hidden_act == config.text_config.hidden_act == "gelu"  # OpenCLIP's LAION models
    assert (config.vision_config.hidden_size, config.vision_config.num_attention_heads) == (V_WIDTH, V_HEADS)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (GRID * PATCH, PATCH)
    assert (config.text_config.hidden_size, config.text_config.max_position_embeddings) == (T_WIDTH, CONTEXT)
    assert config.projection_dim == EMBED
    pixels, ids, mask = _inputs(tokenizer_dir)
    with torch.no_grad():  # the weights were saved in float32: the comparison is in float64 from there
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(image, open_clip_encode_image(state, pixels), rtol=0, atol=1e-5)
    torch.testing.assert_close(text, open_clip_encode_text(state, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.logit_scale, state["logit_scale"], rtol=0, atol=1e-6)


def test_the_activation_and_the_projections_are_not_interchangeable(converted, tmp_path):
    """QuickGELU (OpenAI's activation) gives other embeddings, and so would an untransposed projection."""
    state, _, tokenizer_dir = converted
    quick = convert_open_clip.convert(state, tmp_path / "quick", tokenizer_dir, vision_heads=V_HEADS,
                                      text_heads=T_HEADS, quick_gelu=True, dtype=torch.float64)
    assert quick.config.vision_config.hidden_act == "quick_gelu"
    pixels, _, _ = _inputs(tokenizer_dir)
    with torch.no_grad():
        image = quick.get_image_features(pixel_values=pixels).pooler_output
    assert (image - open_clip_encode_image(state, pixels)).abs().max() > 1e-3
    weights = convert_open_clip.convert_state_dict(state)
    assert weights["visual_projection.weight"].shape == (EMBED, V_WIDTH)
    assert torch.equal(weights["text_projection.weight"], state["text_projection"].T)
    q, k, v = state["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(weights["vision_model.encoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(weights["vision_model.encoder.layers.1.self_attn.v_proj.weight"], v)


def test_unknown_keys_and_wrong_layouts_are_refused(converted):
    state, _, _ = converted
    with pytest.raises(ValueError, match="does not know"):
        convert_open_clip.convert_state_dict({**state, "visual.transformer.resblocks.0.ls_1.gamma": state["visual.ln_pre.bias"]})
    with pytest.raises(ValueError, match="missing"):
        convert_open_clip.clip_config_from_state_dict({k: v for k, v in state.items() if k != "visual.proj"})


def test_risclip_builds_on_the_converted_folder(converted, make_scene):
    _, folder, _ = converted
    processor = RisclipProcessor.from_backbones(clip=folder)  # 40 x patch 8 = 320 px
    assert processor.image_size == 320
    image_processor = CLIPImageProcessor.from_pretrained(folder)
    assert list(image_processor.image_mean) == convert_open_clip.OPENAI_CLIP_MEAN
    model = RisclipModel.from_backbones(clip=folder, image_size=48, fusion_num_heads=2, num_post_fusion_layers=1,
                                        refiner_hidden_sizes=[4, 4], refiner_feature_layers=[1, 0])
    inputs = RisclipProcessor.from_backbones(clip=folder, image_size=48)(
        images=make_scene(), text=["the red circle"], return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        out = model.eval()(**inputs)
    assert out.coarse_logits.shape == (1, 6, 6) and out.logits.shape == (1, 48, 48)


def test_the_paper_preset_is_what_the_conversion_of_vit_b_16_plus_240_gives():
    """`risclip-b-paper` is built offline from architecture numbers; the converter, reading a state dict of
    ViT-B-16-plus-240's shapes (on the meta device: nothing allocated), must arrive at the same towers."""
    sizes = (896, 12, 16, 15, 640, 12, 77, 640)  # OpenCLIP's ViT-B-16-plus-240.json: 240 px = 15 x 16
    inferred = convert_open_clip.clip_config_from_state_dict(open_clip_state_dict(49408, device="meta", sizes=sizes))
    preset = get_config("risclip-b-paper")
    assert PRESETS["risclip-b-paper"].backbones == {}  # a local folder written by the converter
    assert (preset.image_size, preset.grid_size) == (640, 40)
    for tower in ("vision_config", "text_config"):
        ours, theirs = getattr(preset.clip_config, tower), getattr(inferred, tower)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim",
                    "hidden_act", "layer_norm_eps"):
            assert getattr(ours, key) == getattr(theirs, key), (tower, key)
    assert (preset.clip_config.vision_config.image_size, preset.clip_config.vision_config.patch_size) == (240, 16)
    assert (preset.clip_config.vision_config.num_attention_heads, preset.clip_config.text_config.num_attention_heads) == (14, 10)
    # no tokenizer given: [SOS]/[EOS] are the last two ids of CLIP's vocabulary, as in OpenAI's and OpenCLIP's
    assert preset.clip_config.text_config.eos_token_id == inferred.text_config.eos_token_id == 49407
    assert preset.clip_config.text_config.bos_token_id == inferred.text_config.bos_token_id == 49406
    assert preset.clip_config.projection_dim == inferred.projection_dim == 640
