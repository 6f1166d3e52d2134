"""refseg.adapters: injection into a stock CLIP, exact identity at init, unload, walking, save/load."""

import copy
import json

import pytest
import torch
from transformers import CLIPModel

from refseg.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdaptedEncoderLayer,
    AdapterConfig,
    BottleneckAdapter,
    BottleneckAdapterConfig,
    FusionAttention,
    PostFusionLayer,
    PreFusionAdapter,
    adapter_layers,
    adapter_named_parameters,
    inject_adapter,
    load_adapter,
    mark_only_adapters_trainable,
    save_adapter,
    unload,
)
from refseg.backbones import tiny_clip_config

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def stock_clip():
    torch.manual_seed(0)
    config = tiny_clip_config(
        vocab_size=600, hidden_size=32, num_layers=NUM_LAYERS, num_heads=4, image_size=32, patch_size=8, max_text_len=16
    )
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def clip_inputs():
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    input_ids = torch.randint(0, 598, (2, 7), generator=generator)
    input_ids[:, -1] = 599
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def _layer_outputs(model, inputs):
    """Every encoder layer's output of both towers (via hooks on `encoder.layers[i]`) + final outputs."""
    captured = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for tower in (model.vision_model, model.text_model)
        for layer in tower.encoder.layers
    ]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    finals = [
        out.vision_model_output.last_hidden_state, out.vision_model_output.pooler_output,
        out.text_model_output.last_hidden_state, out.image_embeds, out.text_embeds,
    ]
    return captured, finals


def test_zero_init_adapters_leave_every_hidden_state_exactly_unchanged(stock_clip, clip_inputs):
    adapted = copy.deepcopy(stock_clip)
    wrapped = inject_adapter(adapted, BottleneckAdapterConfig(bottleneck_dim=8, channel_scale=True))
    assert len(wrapped) == 2 * NUM_LAYERS
    assert all(isinstance(layer, AdaptedEncoderLayer) for layer in adapted.vision_model.encoder.layers)

    stock_states, stock_finals = _layer_outputs(stock_clip, clip_inputs)
    adapted_states, adapted_finals = _layer_outputs(adapted, clip_inputs)
    assert len(stock_states) == len(adapted_states) == 2 * NUM_LAYERS
    for expected, got in zip(stock_states + stock_finals, adapted_states + adapted_finals):
        assert torch.equal(expected, got)
    # transformers' own `output_hidden_states` still records every layer of the wrapped towers
    with torch.no_grad():
        stock = stock_clip(**clip_inputs, output_hidden_states=True)
        ours = adapted(**clip_inputs, output_hidden_states=True)
    for tower in ("vision_model_output", "text_model_output"):
        expected, got = stock[tower].hidden_states, ours[tower].hidden_states
        assert len(got) == len(expected) == NUM_LAYERS + 1
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_adapters_are_in_the_forward_path(stock_clip, clip_inputs):
    adapted = copy.deepcopy(stock_clip)
    inject_adapter(adapted, BottleneckAdapterConfig(bottleneck_dim=8, positions=["mlp"]))
    layer = adapted.text_model.encoder.layers[NUM_LAYERS - 1]
    assert list(layer.adapter_attn) == [] and list(layer.adapter_mlp) == ["default"]
    with torch.no_grad():
        layer.adapter_mlp["default"].up.weight.fill_(0.01)
        stock = stock_clip(**clip_inputs)
        changed = adapted(**clip_inputs)
    assert not torch.equal(stock.text_model_output.last_hidden_state, changed.text_model_output.last_hidden_state)
    # only the text tower was touched: the image features are still the stock ones
    assert torch.equal(stock.vision_model_output.last_hidden_state, changed.vision_model_output.last_hidden_state)


def test_unload_returns_the_untouched_stock_modules(stock_clip, clip_inputs):
    model = copy.deepcopy(stock_clip)
    originals = [layer for tower in (model.vision_model, model.text_model) for layer in tower.encoder.layers]
    inject_adapter(model, BottleneckAdapterConfig(bottleneck_dim=8))
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.normal_()
    unload(model)
    restored = [layer for tower in (model.vision_model, model.text_model) for layer in tower.encoder.layers]
    assert all(a is b for a, b in zip(originals, restored))
    assert list(adapter_layers(model)) == []
    assert not hasattr(model, "refseg_adapter_config")
    assert model.state_dict().keys() == stock_clip.state_dict().keys()
    _, stock_finals = _layer_outputs(stock_clip, clip_inputs)
    _, finals = _layer_outputs(model, clip_inputs)
    assert all(torch.equal(a, b) for a, b in zip(stock_finals, finals))


def test_trainable_parameters_are_found_by_walking_the_wrappers(stock_clip):
    model = copy.deepcopy(stock_clip)
    inject_adapter(model, BottleneckAdapterConfig(bottleneck_dim=8, channel_scale=True))
    mark_only_adapters_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"{tower}.encoder.layers.{i}.adapter_{pos}.default.{part}"
        for tower in ("vision_model", "text_model")
        for i in range(NUM_LAYERS)
        for pos in ("attn", "mlp")
        for part in ("down.weight", "down.bias", "up.weight", "up.bias", "scale")
    }
    assert trainable == expected
    assert {name for name, _ in adapter_named_parameters(model)} == expected
    # per adapter: 2*C*r + r + C (+ C for the scale), C = 32, r = 8
    per_adapter = 2 * 32 * 8 + 8 + 32 + 32
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * NUM_LAYERS * 2 * per_adapter


def test_bottleneck_adapter_initialisation():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(256, 64, channel_scale=True, scale_init=0.5)
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.bias) == 0
    assert torch.equal(adapter.scale, torch.full((256,), 0.5))
    x = torch.randn(3, 5, 256)
    assert torch.equal(adapter(x), torch.zeros_like(x))


def test_bottleneck_down_projection_is_kaiming_normal():
    # Kaiming normal in `fan_in` mode (torch's default, gain sqrt(2) for ReLU): the down weight
    # (r, C) has fan_in = C, so std = sqrt(2 / C). A layer large enough (256k weights) that the
    # estimates are tight: std to ~0.15 %, kurtosis to ~0.01, the 2-sigma tail share to ~0.04 %.
    torch.manual_seed(0)
    hidden, bottleneck = 1024, 256
    weight = BottleneckAdapter(hidden, bottleneck).down.weight.detach().double().flatten()
    expected_std = (2 / hidden) ** 0.5  # 0.0442; Xavier-normal would give sqrt(2 / (C + r)) = 0.0395
    assert weight.mean().abs().item() < 3 * expected_std / weight.numel() ** 0.5
    std = weight.std().item()
    assert abs(std / expected_std - 1) < 0.02, std
    # normal, not uniform: kurtosis 3 (uniform: 1.8), 4.55 % of weights beyond 2 sigma (uniform
    # with the same std: none, its bound is sqrt(3) sigma)
    centred = weight - weight.mean()
    kurtosis = (centred**4).mean().item() / (centred**2).mean().item() ** 2
    assert abs(kurtosis - 3.0) < 0.1, kurtosis
    tail = (centred.abs() > 2 * expected_std).double().mean().item()
    assert abs(tail - 0.0455) < 0.004, tail


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bottleneck_dim": 0}, "bottleneck_dim"),
        ({"positions": ["attn", "ffn"]}, "positions"),
        ({"positions": []}, "positions"),
        ({"activation": "swish-ish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": "layers.(\\d+"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_config_rejects_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BottleneckAdapterConfig(**kwargs)


def test_inject_raises_when_nothing_matches(stock_clip):
    model = copy.deepcopy(stock_clip)
    with pytest.raises(ValueError, match="matched no module"):
        inject_adapter(model, BottleneckAdapterConfig(target_modules=["no_such_layer"]))
    with pytest.raises(ValueError, match="not a pre-LN encoder layer"):
        inject_adapter(model, BottleneckAdapterConfig(target_modules=["vision_model.encoder.layers.0.mlp"]))


def test_config_json_round_trip(tmp_path):
    config = BottleneckAdapterConfig(bottleneck_dim=16, positions=["attn"], modules_to_save=["head"],
                                     base_model_name_or_path={"clip": "x"}, method_config={"a": 1})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert data["adapter_type"] == "bottleneck" and data["bottleneck_dim"] == 16
    assert AdapterConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="adapter_type"):
        AdapterConfig.from_dict({**data, "adapter_type": "nope"})
    with pytest.raises(ValueError, match="unknown fields"):
        AdapterConfig.from_dict({**data, "extra": 1})


def test_save_and_load_adapter_reproduce_outputs(stock_clip, clip_inputs, tmp_path):
    trained = copy.deepcopy(stock_clip)
    inject_adapter(trained, BottleneckAdapterConfig(bottleneck_dim=8, channel_scale=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, param in adapter_named_parameters(trained):
            param.normal_(std=0.05)
    save_adapter(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])

    fresh = copy.deepcopy(stock_clip)
    config = load_adapter(fresh, tmp_path)  # injects, then loads
    assert config.bottleneck_dim == 8 and config.channel_scale
    _, expected = _layer_outputs(trained, clip_inputs)
    _, got = _layer_outputs(fresh, clip_inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not torch.equal(expected[0], _layer_outputs(stock_clip, clip_inputs)[1][0])

    mismatched = copy.deepcopy(stock_clip)
    inject_adapter(mismatched, BottleneckAdapterConfig(bottleneck_dim=4, channel_scale=True))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(mismatched, tmp_path)
    with pytest.raises(ValueError, match="load_directory"):
        load_adapter(copy.deepcopy(stock_clip), tmp_path / "missing")


def test_lora_from_peft_is_walked_and_unloaded(stock_clip, clip_inputs):
    import peft  # a hard dependency: a broken install fails here rather than skipping
    model = copy.deepcopy(stock_clip)
    inject_adapter(model, BottleneckAdapterConfig(bottleneck_dim=8))
    q_proj = model.vision_model.encoder.layers[0].base_layer.self_attn.q_proj
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)
    names = {name for name, _ in adapter_named_parameters(model)}
    assert any(".lora_A." in n for n in names) and any(".adapter_attn." in n for n in names)
    # LoRA B starts at zero: still the stock features
    _, stock = _layer_outputs(stock_clip, clip_inputs)
    _, lora = _layer_outputs(model, clip_inputs)
    assert all(torch.equal(a, b) for a, b in zip(stock, lora))
    unload(model)
    assert model.vision_model.encoder.layers[0].self_attn.q_proj is q_proj
    assert list(adapter_layers(model)) == []


def test_prefusion_starts_as_identity_and_masks_text_padding():
    torch.manual_seed(0)
    fusion = PreFusionAdapter(vision_dim=24, text_dim=16, fusion_dim=32, num_heads=4, channel_scale=True).eval()
    vision, text = torch.randn(2, 10, 24), torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out_v, out_t = fusion(vision, text, mask)
    assert torch.equal(out_v, vision) and torch.equal(out_t, text)

    with torch.no_grad():
        fusion.s2v.weight.normal_()
        fusion.s2t.weight.normal_()
    out_v, out_t = fusion(vision, text, mask)
    assert not torch.equal(out_v, vision) and not torch.equal(out_t, text)
    # the padded text tokens of sample 1 are never attended by the image queries
    changed = text.clone()
    changed[1, 3:] = torch.randn(3, 16)
    again_v, _ = fusion(vision, changed, mask)
    assert torch.allclose(again_v[1], out_v[1], atol=1e-6) and torch.equal(again_v[0], out_v[0])


def test_postfusion_attention_branches_start_at_zero():
    torch.manual_seed(0)
    layer = PostFusionLayer(dim=32, num_heads=4, mlp_ratio=2.0).eval()
    vision, text = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    out_v, out_t = layer(vision, text, torch.ones(2, 5))
    # value projections are zero: only the MLP branches act at initialisation
    expected_v = vision + layer.vision_mlp(layer.norms["mlp_vision"](vision))
    expected_t = text + layer.text_mlp(layer.norms["mlp_text"](text))
    assert torch.allclose(out_v, expected_v, atol=1e-6) and torch.allclose(out_t, expected_t, atol=1e-6)
    assert torch.count_nonzero(layer.vision_cross_attn.v_proj.weight) == 0


def test_learnable_temperature_starts_at_one():
    torch.manual_seed(0)
    plain = FusionAttention(32, 4)
    tempered = FusionAttention(32, 4, learnable_temperature=True)
    tempered.load_state_dict({**plain.state_dict(), "temperature": torch.zeros(4)})
    q, k = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    assert torch.allclose(plain(q, k), tempered(q, k), atol=1e-6)
    with torch.no_grad():
        tempered.temperature.fill_(1.0)
    assert not torch.allclose(plain(q, k), tempered(q, k), atol=1e-4)
    with pytest.raises(ValueError, match="num_heads"):
        FusionAttention(30, 4)
