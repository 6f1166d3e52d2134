"""refseg.adapters.layers with non-zero adapters: the equations written out by hand.

Fresh adapters output zero, so tests of a freshly built model cannot tell `h + AD(h)` from `h - AD(h)`,
nor see a dropped adapter or a skipped channel scale. Here every adapter gets random weights.
"""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from refseg.adapters.config import BottleneckAdapterConfig
from refseg.adapters.layers import AdaptedEncoderLayer, BottleneckAdapter

from conftest import randomise_parameters

pytestmark = pytest.mark.usefixtures("single_thread")


def randomise(module, seed=0):
    return randomise_parameters(module, seed=seed, std=0.3)


def stock_layer():
    torch.manual_seed(0)
    config = CLIPConfig(vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                       "num_hidden_layers": 1, "image_size": 16, "patch_size": 8},
                        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                     "num_hidden_layers": 1}, projection_dim=16)
    return CLIPModel(config).eval().vision_model.encoder.layers[0]


def test_bottleneck_adapter_output_by_hand():
    adapter = randomise(BottleneckAdapter(6, 3, activation="gelu", channel_scale=True, scale_init=0.5))
    x = torch.randn(2, 4, 6)
    hand = torch.nn.functional.gelu(x @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T
    hand = (hand + adapter.up.bias) * adapter.scale
    assert torch.allclose(adapter(x), hand, atol=1e-6)


@pytest.mark.parametrize("positions", [("attn", "mlp"), ("attn",), ("mlp",)])
def test_adapted_layer_adds_each_adapter_after_its_residual(positions):
    base = stock_layer()
    layer = AdaptedEncoderLayer(base)
    layer.update_layer("default", BottleneckAdapterConfig(
        target_modules=["x"], bottleneck_dim=4, positions=positions, channel_scale=True, scale_init=2.0))
    randomise(layer.adapter_attn)
    randomise(layer.adapter_mlp, seed=1)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = x + base.self_attn(hidden_states=base.layer_norm1(x), attention_mask=None)[0]
        if "attn" in positions:
            h = h + layer.adapter_attn["default"](h)
        h = h + base.mlp(base.layer_norm2(h))
        if "mlp" in positions:
            h = h + layer.adapter_mlp["default"](h)
        got = layer(x)
    assert torch.allclose(got, h, atol=1e-5)
    assert sorted(layer.adapter_attn) == (["default"] if "attn" in positions else [])
    assert sorted(layer.adapter_mlp) == (["default"] if "mlp" in positions else [])


def test_update_layer_passes_every_setting_to_the_adapter():
    layer = AdaptedEncoderLayer(stock_layer())
    layer.update_layer("a", BottleneckAdapterConfig(target_modules=["x"], bottleneck_dim=5, activation="gelu",
                                                     dropout=0.25, channel_scale=True, scale_init=0.75))
    for adapter in (layer.adapter_attn["a"], layer.adapter_mlp["a"]):
        assert adapter.down.out_features == 5 and adapter.up.in_features == 5
        assert adapter.dropout.p == 0.25
        assert torch.equal(adapter.scale, torch.full((16,), 0.75))
        assert adapter.act(torch.tensor([-1.0])).item() == pytest.approx(torch.nn.functional.gelu(torch.tensor(-1.0)).item())
    layer.delete_adapter("a")
    assert layer.adapter_names == [] and len(layer.adapter_attn) == len(layer.adapter_mlp) == 0


def test_forward_hooks_on_the_base_layer_see_the_adapted_output():
    base = stock_layer()
    layer = AdaptedEncoderLayer(base)
    layer.update_layer("default", BottleneckAdapterConfig(target_modules=["x"], bottleneck_dim=4))
    randomise(layer.adapter_mlp)
    seen = []
    base.register_forward_hook(lambda module, args, output: seen.append(output))
    out = layer(torch.randn(1, 3, 16))
    assert len(seen) == 1 and torch.equal(seen[0], out)
