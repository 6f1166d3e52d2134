"""RISCLIP's config options beyond the presets' defaults reach the modules they name (mutation testing of
`modeling_risclip.py` found them unheld: every other test builds the defaults): the fusion options, adapters in
the last `adapter_layers` layers only, LoRA's rank and alpha, the peft-missing message, and a Refiner that reads
the embeddings (layer 0; the quickstart's config reads layers 3, 1, 0)."""

import pytest
import torch
from torch import nn
from transformers import AutoModel

from refseg.adapters.fusion import PostFusionLayer, PreFusionAdapter
from refseg.presets import get_config

OPTIONS = dict(learnable_attention_temperature=True, adapter_channel_scale=True, adapter_scale_init=0.5,
               adapter_dropout=0.1)


def signature(module: nn.Module) -> dict:
    """Every sub-module's type and plain settings (bools, numbers, strings) and every parameter's shape and
    values: two modules built with the same options have the same signature."""
    out = {}
    for name, sub in module.named_modules():
        settings = {k: v for k, v in vars(sub).items() if isinstance(v, (bool, int, float, str)) and k != "training" and not k.startswith("_")}
        out[name] = (type(sub).__name__, settings)
    for name, param in module.named_parameters():
        out[f"param {name}"] = (tuple(param.shape), param.detach().flatten()[:4].tolist() if "scale" in name else None)
    return out


def tiny(**overrides):
    torch.manual_seed(0)
    return AutoModel.from_config(get_config("risclip-tiny", **overrides))


def test_fusion_options_reach_every_fusion_block():
    model = tiny(**OPTIONS)
    clip = model.config.clip_config
    vision, text = clip.vision_config, clip.text_config
    pre = PreFusionAdapter(vision.hidden_size, text.hidden_size, model.config.fusion_dim, model.config.fusion_num_heads,
                           learnable_temperature=True, channel_scale=True, scale_init=0.5, dropout=0.1,
                           layer_norm_eps=vision.layer_norm_eps)
    post = PostFusionLayer(clip.projection_dim, model.config.fusion_num_heads, mlp_ratio=model.config.fusion_mlp_ratio,
                           learnable_temperature=True, channel_scale=True, scale_init=0.5, dropout=0.1)
    assert all(signature(block) == signature(pre) for block in model.pre_fusion)
    assert all(signature(block) == signature(post) for block in model.post_fusion)
    assert signature(tiny().pre_fusion[0]) != signature(pre)  # the defaults differ: the comparison can fail


def test_backbone_adapters_in_the_last_layers_only_with_their_options():
    model = tiny(adapter_layers=2, **OPTIONS)
    for tower, config in (("vision_model", model.config.clip_config.vision_config),
                          ("text_model", model.config.clip_config.text_config)):
        layers = getattr(model.clip, tower).encoder.layers
        depth = config.num_hidden_layers
        adapted = [i for i, layer in enumerate(layers) if any("adapter" in n for n, _ in layer.named_parameters())]
        assert adapted == [depth - 2, depth - 1], tower
    adapters = [m for n, m in model.clip.named_modules() if n.endswith("adapter_attn.default")]
    assert adapters and all(m.scale_init == 0.5 and m.dropout.p == 0.1 and m.scale.shape[-1] > 1 for m in adapters)
    assert not any("adapter" in n for n, _ in tiny(adapter_layers=0).clip.named_parameters())
    every = tiny()  # None: every layer of both towers
    assert sum("adapter_attn.default.down.weight" in n for n, _ in every.clip.named_parameters()) == sum(
        c.num_hidden_layers for c in (every.config.clip_config.vision_config, every.config.clip_config.text_config))


def test_lora_rank_alpha_and_dropout_reach_peft():
    pytest.importorskip("peft")
    model = tiny(use_lora=True, lora_r=4, lora_alpha=12, lora_dropout=0.2, lora_target_modules=["q_proj"])
    loras = [m for n, m in model.clip.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert loras and not any(hasattr(m, "lora_A") for n, m in model.clip.named_modules() if n.endswith("v_proj"))
    for layer in loras:
        assert layer.lora_A["default"].weight.shape[0] == 4
        assert layer.scaling["default"] == pytest.approx(12 / 4)
        assert layer.lora_dropout["default"].p == 0.2


def test_lora_without_peft_names_the_package(monkeypatch):
    from refseg.models.risclip import modeling_risclip

    monkeypatch.setattr(modeling_risclip, "LoraConfig", None)
    with pytest.raises(ImportError, match=r"`use_lora=True` needs the `peft` package"):
        tiny(use_lora=True)


def test_a_refiner_reading_the_embeddings_runs(single_thread):
    model = tiny(refiner_hidden_sizes=[8, 8, 8], refiner_feature_layers=[3, 2, 0]).eval()
    size = model.config.image_size
    inputs = {"pixel_values": torch.randn(2, 3, size, size), "input_ids": torch.randint(1, 500, (2, 5))}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, size, size) and torch.isfinite(logits).all()
