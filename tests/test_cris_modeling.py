"""CrisModel: stage shapes, per-sample dynamic kernels, one image encoding for N expressions, the loss,
the stock CLIP inside, parameter groups, weight round trips."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, CLIPModel

from refseg import CrisConfig, CrisModel
from refseg.backbones import tiny_clip_config
from refseg.losses import bce_loss
from refseg.models.cris.modeling_cris import unique_rows
from refseg.models.cris.modeling_cris_heads import sine_positions_2d
from refseg.presets import PRESETS
from refseg.training import get_method
from refseg.training.optim import build_optimizer

HEADS = dict(neck_hidden_sizes=[16, 32, 32], decoder_num_layers=2, decoder_num_heads=4, decoder_ffn_dim=64,
             word_length=7, decoder_dropout=0.0)
TINY = dict(PRESETS["cris-tiny"].config_overrides)

pytestmark = pytest.mark.usefixtures("single_thread")


def small_clip_config(layers=3):
    return tiny_clip_config(vocab_size=600, hidden_size=32, num_layers=layers, num_heads=4, image_size=32,
                            patch_size=8, max_text_len=16)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = CrisConfig(clip_config=small_clip_config(), image_size=64, **{**HEADS, **overrides})
    return CrisModel(config).eval()


def model_inputs(batch=2, size=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 598, (batch, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 4:] = 0
    input_ids[torch.arange(batch), attention_mask.sum(-1) - 1] = 599  # [EOS]
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator), "input_ids": input_ids,
            "attention_mask": attention_mask}


def capture(module, store, key):
    def hook(_module, args, out):
        store[key] = (args, out)  # returns None: the output is left as it is

    return module.register_forward_hook(hook)


def test_every_stage_has_the_documented_shape():
    model = small_model()
    seen = {}
    hooks = [capture(model.neck, seen, "neck"), capture(model.decoder, seen, "decoder"),
             capture(model.projector, seen, "projector")]
    labels = torch.zeros(2, 64, 64)
    labels[:, 8:40, 16:48] = 1
    out = model(**model_inputs(), labels=labels)
    for hook in hooks:
        hook.remove()
    (levels, sentence), visual = seen["neck"]
    # 64 px, patch 8: an 8x8 grid; levels at 1/8 (x2 upsampled), 1/16 (the grid), 1/32 (projected, pooled)
    assert [tuple(level.shape) for level in levels] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    assert sentence.shape == (2, 32)  # F_s: the [EOS] token through CLIP's text projection
    assert visual.shape == (2, 32, 8, 8)  # F_v: neck_hidden_sizes[1] channels at the grid
    (decoder_in, words, word_mask), decoded = seen["decoder"]
    assert words.shape == (2, 7, 32) and word_mask.dtype == torch.bool and word_mask[1].tolist() == [True] * 4 + [False] * 3
    assert decoded.shape == (2, 32, 8, 8)
    assert seen["projector"][1].shape == (2, 32, 32)  # 4x the grid, 16 channels of z_v reduced by the kernel
    assert model.projector.project_image(decoded).shape == (2, 16, 32, 32)
    assert out.logits.shape == (2, 32, 32) and out.coarse_logits is None
    assert out.image_embeds.shape == (2, 64, 32) and out.text_embeds.shape == (2, 32)
    assert out.loss.ndim == 0 and set(out.loss_dict) == {"bce"}


def test_visual_levels_come_from_the_configured_clip_layers():
    model = small_model(vision_feature_layers=[1, 2, 3])
    pixel_values = model_inputs()["pixel_values"]
    with torch.no_grad():
        c3, c4, c5 = model.get_visual_levels(pixel_values)
        hidden = model.clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True,
                                         output_hidden_states=True).hidden_states
    grid = lambda t: t[:, 1:].transpose(1, 2).reshape(2, -1, 8, 8)  # noqa: E731
    assert torch.equal(c4, grid(hidden[2]))
    assert torch.equal(c3, F.interpolate(grid(hidden[1]), scale_factor=2.0, mode="bilinear", align_corners=False))
    projected = model.clip.visual_projection(model.clip.vision_model.post_layernorm(hidden[3]))
    assert torch.allclose(c5, F.avg_pool2d(grid(projected), 2), atol=1e-6)


def test_the_dynamic_kernel_is_per_sample():
    model = small_model()
    projector = model.projector
    generator = torch.Generator().manual_seed(4)
    features, sentences = torch.randn(3, 32, 8, 8, generator=generator), torch.randn(3, 32, generator=generator)
    with torch.no_grad():
        batched = projector(features, sentences)
        alone = torch.cat([projector(features[i:i + 1], sentences[i:i + 1]) for i in range(3)])
        # the logit is z_t . z_v: one kernel per sample, convolved with that sample's z_v only
        weight, bias = projector.kernels(sentences)
        z_v = projector.project_image(features)
        by_hand = torch.stack([F.conv2d(z_v[i:i + 1], weight[i:i + 1], bias[i:i + 1], padding=1)[0, 0] for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, by_hand, atol=1e-5, rtol=0)

    # the whole model: one image with two expressions, then the expressions swapped -> the outputs swap
    inputs = model_inputs()
    inputs["pixel_values"] = inputs["pixel_values"][:1].repeat(2, 1, 1, 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    swapped = {k: (v.flip(0) if k != "pixel_values" else v) for k, v in inputs.items()}
    with torch.no_grad():
        out, out_swapped = model(**inputs).logits, model(**swapped).logits
    assert (out[0] - out[1]).abs().max() > 1e-3  # the expression changes the mask
    torch.testing.assert_close(out_swapped, out.flip(0), atol=1e-5, rtol=0)


def test_one_image_with_many_expressions_is_encoded_once():
    model = small_model()
    calls = []
    model.clip.vision_model.register_forward_hook(lambda _m, _a, kwargs, _o: calls.append(kwargs["pixel_values"].shape[0]),
                                                  with_kwargs=True)
    inputs = model_inputs(batch=4)
    pixel_values = inputs["pixel_values"]
    inputs["pixel_values"] = torch.stack([pixel_values[0], pixel_values[1], pixel_values[0], pixel_values[0]])
    with torch.no_grad():
        shared = model(**inputs).logits
    assert calls == [2]  # one call, the two distinct images
    model.config.share_image_encoding = False
    with torch.no_grad():
        separate = model(**inputs).logits
    assert calls == [2, 4]
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)  # sharing changes nothing
    representatives, inverse = unique_rows(inputs["pixel_values"])
    assert representatives.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 0]
    nearly = inputs["pixel_values"].clone()
    nearly[2, 0, 0, 0] += 1e-3  # one value differs: a different image
    assert unique_rows(nearly)[1].tolist() == [0, 1, 2, 0]


def test_loss_is_bce_against_the_downsampled_target():
    model = small_model()
    labels = torch.zeros(2, 64, 64)
    labels[0, 3:21, 5:37] = 1
    labels[1, 40:, 10:30] = 1
    out = model(**model_inputs(), labels=labels)
    target = F.interpolate(labels[:, None], size=(32, 32), mode="nearest-exact")[:, 0]
    assert target[0, 1].sum() == 16 and target[0, 0].sum() == 0  # rows 3.. of 64 -> row 1 of 32
    torch.testing.assert_close(out.loss, bce_loss(out.logits, target))
    torch.testing.assert_close(model(**model_inputs(), labels=target).loss, out.loss)  # labels at the logits size


def test_word_padding_is_masked_in_the_decoder():
    model = small_model()
    inputs = model_inputs()
    with torch.no_grad():
        out = model(**inputs).logits
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][1, 5:] = 17  # padded positions of row 1: never seen
        assert torch.equal(model(**changed).logits, out)
        changed["input_ids"][1, 2] = 17  # a real word: seen
        assert not torch.equal(model(**changed).logits[1], out[1])


def test_sine_encodings_are_fixed_and_distinct():
    encoding = sine_positions_2d(3, 4, 8)
    assert encoding.shape == (12, 8) and len({tuple(row.tolist()) for row in encoding}) == 12
    assert torch.equal(encoding[0, :4], encoding[4, :4])  # same column, the first half agrees
    assert not any(p.requires_grad for p in small_model().decoder.buffers())


def test_frozen_clip_inside_gives_the_stock_features_and_everything_else_trains():
    torch.manual_seed(0)
    stock = CLIPModel(small_clip_config()).eval()
    config = CrisConfig(clip_config=copy.deepcopy(stock.config), image_size=64, **HEADS)
    model = CrisModel(config, clip_model=copy.deepcopy(stock)).eval()
    inputs = model_inputs()
    with torch.no_grad():
        words, sentence = model.get_word_features(inputs["input_ids"], inputs["attention_mask"])
        text = stock.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        _, c4, _ = model.get_visual_levels(inputs["pixel_values"])
        vision = stock.vision_model(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=True,
                                    output_hidden_states=True)
    assert torch.equal(words, text.last_hidden_state)
    assert torch.equal(sentence, stock.text_projection(text.pooler_output))
    assert torch.equal(c4, vision.hidden_states[config.vision_feature_layers[1]][:, 1:].transpose(1, 2).reshape(2, 32, 8, 8))
    # CRIS fine-tunes CLIP: every parameter trains except CLIP's unused logit scale
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"clip.logit_scale"}
    with pytest.raises(ValueError, match="stage"):
        model.set_training_stage("refiner")


def test_backbone_group_trains_at_a_tenth_of_the_base_rate():
    model = small_model()
    spec = get_method("cris")
    optimizer = build_optimizer(spec.param_groups(model, 1e-4), optimizer="adam", learning_rate=1e-4)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["heads"]["lr"] == pytest.approx(1e-4) and groups["backbone"]["lr"] == pytest.approx(1e-5)
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    backbone = {id(p) for p in groups["backbone"]["params"]}
    heads = {id(p) for p in groups["heads"]["params"]}
    named = dict(model.named_parameters())
    assert backbone == {id(p) for n, p in named.items() if n.startswith("clip.") and p.requires_grad}
    assert heads == {id(p) for n, p in named.items() if not n.startswith("clip.")}
    assert optimizer.param_groups[0]["name"] == "heads"  # the script logs the first group's rate


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"labels": torch.zeros(2, 48, 48)}, "labels"),
        ({"sizes": torch.tensor([[5, 5], [5, 5]])}, "sizes"),  # unknown (the processor's original_sizes is accepted)
        ({"pixel_values": torch.randn(2, 3, 60, 64)}, "pixel_values"),
        ({"input_ids": torch.zeros(3, 7, dtype=torch.long)}, "input_ids"),
        ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, "attention_mask"),
    ],
)
def test_forward_rejects_bad_inputs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        small_model()(**{**model_inputs(), **kwargs})


def test_config_defaults_validate_and_round_trip():
    config = CrisConfig()
    assert config.image_size == 416 and config.grid_size == 26 and config.vision_feature_layers == [4, 8, 12]
    assert config.hidden_size == 512 and config.projector_hidden_size == 256 and config.threshold == 0.35
    assert (config.decoder_num_layers, config.decoder_num_heads, config.decoder_ffn_dim) == (3, 8, 2048)
    again = CrisConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    for kwargs, field in [
        ({"image_size": 60}, "image_size"), ({"word_length": 2}, "word_length"),
        ({"vision_feature_layers": [3, 2, 1]}, "vision_feature_layers"), ({"decoder_num_heads": 5}, "decoder_num_heads"),
        ({"threshold": 1.0}, "threshold"), ({"projector_kernel_size": 2}, "projector_kernel_size"),
    ]:
        with pytest.raises(ValueError, match=field):
            CrisConfig(clip_config=small_clip_config(), **{**HEADS, **kwargs})


def test_from_backbones_keeps_clip_weights_and_auto_classes_round_trip(tiny_backbones, tmp_path):
    model = CrisModel.from_backbones(clip=tiny_backbones["clip"], **TINY).eval()
    stock = CLIPModel.from_pretrained(tiny_backbones["clip"]).state_dict()
    ours = model.clip.state_dict()
    assert ours.keys() == stock.keys() and all(torch.equal(ours[k], stock[k]) for k in stock)
    assert model.config.grid_size == 8
    state = model.trainable_state_dict()  # CRIS fine-tunes CLIP: checkpoints hold it
    assert any(k.startswith("clip.vision_model.") for k in state) and any(k.startswith("projector.") for k in state)
    inputs = model_inputs()
    inputs["input_ids"] = inputs["input_ids"] % 1000
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CrisConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CrisModel)
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == {"clip.logit_scale"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
