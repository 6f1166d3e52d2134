"""refseg.presets and scripts/count_params.py."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, CLIPConfig, CLIPModel

from refseg import RisclipConfig, RisclipModel
from refseg.presets import PRESETS, Preset, get_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "count_params.py"


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_risclip_presets_describe_the_paper_models():
    b, l_ = get_config("risclip-b"), get_config("risclip-l")
    assert isinstance(b, RisclipConfig) and isinstance(l_, RisclipConfig)
    assert (b.image_size, b.patch_size, b.grid_size) == (640, 16, 40)
    assert (l_.image_size, l_.patch_size, l_.grid_size) == (560, 14, 40)
    assert b.clip_config.vision_config.num_hidden_layers == 12 and l_.clip_config.vision_config.num_hidden_layers == 24
    assert l_.clip_config.vision_config.hidden_size == 1024 and l_.clip_config.projection_dim == 768
    for config in (b, l_):
        assert config.num_pre_fusion_layers == 6 and config.num_post_fusion_layers == 6
        assert config.adapter_layers is None and config.refiner_feature_layers == [4, 3, 2, 1]
        assert (config.dice_loss_weight, config.focal_loss_weight, config.focal_alpha) == (1.0, 1.75, 0.65)
    assert PRESETS["risclip-b"].backbones["clip"] == "openai/clip-vit-base-patch16"
    paper_b = get_config("risclip-b-paper")  # OpenCLIP ViT-B-16-plus-240, the paper's RISCLIP-B backbone
    assert (paper_b.image_size, paper_b.patch_size, paper_b.grid_size) == (640, 16, 40)
    assert paper_b.clip_config.vision_config.hidden_size == 896 and paper_b.clip_config.projection_dim == 640
    assert paper_b.clip_config.vision_config.hidden_act == paper_b.clip_config.text_config.hidden_act == "gelu"
    assert (paper_b.num_pre_fusion_layers, paper_b.num_post_fusion_layers, paper_b.refiner_feature_layers) == (6, 6, [4, 3, 2, 1])
    assert all(p.method == "risclip" for n, p in PRESETS.items() if n.startswith("risclip"))


def test_get_config_applies_overrides_and_rejects_unknown_names():
    assert get_config("risclip-b", adapter_bottleneck_dim=32).adapter_bottleneck_dim == 32
    with pytest.raises(ValueError, match="name"):
        get_config("risclip-xl")


def test_presets_are_read_only():
    preset = PRESETS["risclip-b"]
    with pytest.raises(TypeError):
        preset.config_overrides["image_size"] = 224
    with pytest.raises(AttributeError):
        preset.method = "cris"
    assert isinstance(preset, Preset) and preset.description


@pytest.mark.parametrize("name", ["risclip-b", "risclip-b-paper", "risclip-l"])
def test_paper_scale_models_instantiate_on_the_meta_device(name):
    config = get_config(name)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
        stock = CLIPModel(config.clip_config)
    assert isinstance(model, RisclipModel)
    assert all(p.device.type == "meta" for p in model.parameters())
    clip_params = {n: p for n, p in model.clip.named_parameters() if ".adapter_" not in n}
    assert sum(p.numel() for p in clip_params.values()) == _count(stock)
    assert not any(p.requires_grad for p in clip_params.values())


def test_backbone_adapter_count_matches_the_formula():
    with torch.device("meta"):
        model = AutoModel.from_config(get_config("risclip-b"))
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapter_" in n)
    r = 64
    per_layer = lambda c: 2 * (2 * c * r + r + c)  # noqa: E731  (after MHSA and after MLP)
    assert adapters == 12 * per_layer(768) + 12 * per_layer(512)


def test_tiny_preset_matches_the_tiny_backbones(tiny_backbones):
    tiny = get_config("risclip-tiny").clip_config
    saved = CLIPConfig.from_pretrained(tiny_backbones["clip"])
    for tower in ("vision_config", "text_config"):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(getattr(tiny, tower), key) == getattr(getattr(saved, tower), key)
    assert tiny.vision_config.patch_size == saved.vision_config.patch_size
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **PRESETS["risclip-tiny"].config_overrides)
    assert model.config.to_dict().keys() == get_config("risclip-tiny").to_dict().keys()
    assert model.config.image_size == get_config("risclip-tiny").image_size == 64


def test_count_params_script_prints_a_table_per_stage(capsys):
    spec = importlib.util.spec_from_file_location("count_params", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    counts = script.count("risclip-b")
    with torch.device("meta"):
        model = AutoModel.from_config(get_config("risclip-b"))
    assert counts["total"] == _count(model)
    model.set_training_stage("refiner")
    assert counts["stages"]["refiner"] == _count(model.refiner)
    assert counts["frozen_backbone"] + counts["stages"]["locator"] + counts["stages"]["refiner"] == counts["total"]

    script.main(["risclip-tiny", "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| preset | total | frozen backbone | trainable (locator) | trainable (refiner) |"
    assert lines[2].startswith("| risclip-tiny | ")
    with pytest.raises(SystemExit):
        script.main(["risclip-xxl"])


def test_generalized_presets_add_only_the_presence_head():
    """Every `-g` preset is its base with `no_target_head=True` and nothing else; the base keeps the head off."""
    import refseg.presets as presets

    generalized = sorted(n for n in PRESETS if n.endswith("-g"))
    assert generalized == sorted(f"{base}-g" for base in presets.GENERALIZED_BASES)
    for name in ("risclip-b-g", "cris-b-g", "risam-h-g", "risam-b-g", "prompt-ris-b-g", "risclip-tiny-g",
                 "cris-tiny-g", "risam-tiny-g", "prompt-ris-tiny-g"):
        assert name in generalized
    for name in generalized:
        base_name = name[: -len("-g")]
        preset, base = PRESETS[name], PRESETS[base_name]
        assert (preset.method, dict(preset.backbones)) == (base.method, dict(base.backbones))
        assert dict(preset.config_overrides) == {**base.config_overrides, "no_target_head": True}
        with_head, without = get_config(name).to_dict(), get_config(base_name).to_dict()
        assert get_config(base_name).no_target_head is False
        assert {k for k in with_head if with_head[k] != without.get(k)} == {"no_target_head"}
    assert "risclip-b-paper-g" not in PRESETS and "clipseg-tiny-g" not in PRESETS
    for name in PRESETS:  # the module docstring names every preset
        assert f"`{name}`" in presets.__doc__, name


def test_a_tiny_generalized_preset_builds_a_model_with_the_presence_head(tiny_backbones, single_thread):
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **PRESETS["risclip-tiny-g"].config_overrides)
    assert model.config.no_target_head is True
    pixel_values = torch.zeros(2, 3, 64, 64)
    input_ids = torch.tensor([[1, 5, 2], [1, 6, 2]])  # the tiny vocabulary
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    assert out.no_target_logits.shape == (2,)
