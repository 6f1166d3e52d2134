"""RisclipModel: shapes, exact stock features at init, stages, losses, weight round trips, overfitting."""

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoProcessor, CLIPModel

from refseg import RisclipConfig, RisclipModel, RisclipProcessor
from refseg.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from refseg.backbones import tiny_clip_config
from refseg.losses import dice_loss, sigmoid_focal_loss
from refseg.presets import PRESETS

HEADS = dict(adapter_bottleneck_dim=8, fusion_num_heads=4, num_post_fusion_layers=2, refiner_hidden_sizes=[8, 8, 8, 8])
TINY = dict(PRESETS["risclip-tiny"].config_overrides)


pytestmark = pytest.mark.usefixtures("single_thread")


def small_clip_config(patch_size=8, vision_layers=3, text_layers=2):
    config = tiny_clip_config(vocab_size=600, hidden_size=32, num_layers=vision_layers, num_heads=4,
                              image_size=32, patch_size=patch_size, max_text_len=16)
    config.text_config.num_hidden_layers = text_layers
    return config


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = RisclipConfig(clip_config=small_clip_config(), image_size=64, **{**HEADS, **overrides})
    return RisclipModel(config).eval()


def model_inputs(batch=2, size=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 598, (batch, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 4:] = 0
    input_ids[torch.arange(batch), attention_mask.sum(-1) - 1] = 599  # [EOS]
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


def perturb(module, seed=5, std=0.05):
    """Stand-in for training: random values in every trainable tensor (and BN statistics)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.trainable_state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * std)


def test_forward_shapes_and_loss():
    model = small_model()
    inputs = model_inputs()
    labels = torch.zeros(2, 64, 64)
    labels[:, 8:40, 16:48] = 1
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (2, 64, 64)  # 16 x 8 tokens = 128, resized back to the 64 px input
    assert out.coarse_logits.shape == (2, 8, 8)
    assert out.image_embeds.shape == (2, 64, 32) and out.text_embeds.shape == (2, 32)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.loss_dict) == {"focal", "dice"}


def test_locator_starts_from_the_configured_scale_and_bias():
    model = small_model(locator_logit_scale_init=5.0, locator_logit_bias_init=-1.0)
    assert model.locator.logit_scale.exp().item() == pytest.approx(5.0)
    assert model.locator.logit_bias.item() == pytest.approx(-1.0)
    # known inputs: [EOS] along (3, 4, 0); the four patches have cosines 0.6, 0.8, 0 and -1 with it
    eos = torch.tensor([[3.0, 4.0, 0.0]])
    patches = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0], [-3.0, -4.0, 0.0]]])
    with torch.no_grad():
        logits = model.locator(patches, eos, (2, 2))
    # 5 * cos - 1 worked out by hand
    torch.testing.assert_close(logits, torch.tensor([[[2.0, 3.0], [-1.0, -6.0]]]))

    # inside the model: coarse_logits = 5 * cos(fused patch token, fused [EOS]) - 1, with the
    # cosine of the tokens the model returns computed here
    with torch.no_grad():
        out = model(**model_inputs())
    image, text = out.image_embeds.double(), out.text_embeds.double()  # (2, 64, D), (2, D)
    cosine = (image * text[:, None]).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1)[:, None])
    expected = (5.0 * cosine - 1.0).reshape(2, 8, 8)
    torch.testing.assert_close(out.coarse_logits.double(), expected, atol=1e-5, rtol=0)
    assert expected.max() - expected.min() > 0.1  # the cosines differ, so scale and bias both matter


def test_logits_are_foreground_minus_background_scores():
    torch.manual_seed(0)
    # patch 4 on a 64 px input: 16 x 16 tokens, four x2 layers give 256 px -> resized to 64
    config = RisclipConfig(clip_config=small_clip_config(patch_size=4), image_size=64, **HEADS)
    model = RisclipModel(config).eval()
    captured = {}
    model.refiner.register_forward_hook(lambda _m, _i, out: captured.setdefault("scores", out))
    out = model(**model_inputs())
    scores = F.interpolate(captured["scores"], size=(64, 64), mode="bicubic", align_corners=False)
    assert captured["scores"].shape[-2:] == (256, 256)
    assert torch.allclose(out.logits, scores[:, 1] - scores[:, 0], atol=1e-6)
    assert torch.equal(out.logits.sigmoid() > 0.5, scores.argmax(dim=1) == 1)


def test_refiner_reads_the_embeddings_as_layer_zero():
    # patch 8, 8 x 8 tokens, three x2 layers: exactly the 64 px input, no final resize
    model = small_model(refiner_hidden_sizes=[8, 8, 8], refiner_feature_layers=[2, 1, 0])
    inputs = model_inputs()
    captured = {}
    model.refiner.register_forward_hook(lambda _m, args, out: captured.update(features=args[1], scores=out))
    out = model(**inputs)
    assert captured["scores"].shape[-2:] == (64, 64)
    assert torch.equal(out.logits, captured["scores"][:, 1] - captured["scores"][:, 0])
    vision = model.clip.vision_model
    with torch.no_grad():
        embeddings = vision.pre_layrnorm(vision.embeddings(inputs["pixel_values"], interpolate_pos_encoding=True))[:, 1:]
    assert torch.equal(captured["features"][2], embeddings.transpose(1, 2).reshape(2, 32, 8, 8))
    with pytest.raises(ValueError, match="refiner_feature_layers"):
        small_model(refiner_hidden_sizes=[8, 8, 8], refiner_feature_layers=[2, 1, -1])


def test_locator_training_skips_the_frozen_refiner():
    model = small_model()
    calls = []
    model.refiner.register_forward_hook(lambda *_: calls.append(1))
    model.set_training_stage("locator")
    model.train()
    out = model(**model_inputs())
    upsampled = F.interpolate(out.coarse_logits.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False)
    assert calls == [] and torch.equal(out.logits, upsampled.squeeze(1))
    model.eval()  # inference always refines
    assert not torch.equal(model(**model_inputs()).logits, out.logits) and calls == [1]
    model.set_training_stage("refiner")
    model.train()
    model(**model_inputs())
    assert calls == [1, 1]


def test_zero_initialised_model_sees_the_stock_clip_features():
    torch.manual_seed(0)
    stock = CLIPModel(small_clip_config()).eval()
    config = RisclipConfig(clip_config=copy.deepcopy(stock.config), image_size=32, **HEADS)
    model = RisclipModel(config, clip_model=copy.deepcopy(stock)).eval()
    inputs = model_inputs(size=32)
    with torch.no_grad():
        h_v, h_t, features = model._encode(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        vision = stock.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        text = stock.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=True)
    assert len(model.pre_fusion) == 2  # 6 clipped to the 2-layer text tower: image layers 2-3 are fused
    # adapters and PreFusion are zero at init: every feature is CLIP's own
    for layer in config.refiner_feature_layers:  # [3, 3, 2, 1]; layer 3 uses MaskCLIP's value path
        if layer < 3:
            assert torch.equal(features[layer], vision.hidden_states[layer])
    assert torch.equal(model.clip.text_model.final_layer_norm(h_t), text.last_hidden_state)
    # the last image layer follows MaskCLIP: out_proj(v_proj(LN(x))) + x, then the MLP residual
    base = model.clip.vision_model.encoder.layers[2].base_layer
    x = vision.hidden_states[2]
    y = x + base.self_attn.out_proj(base.self_attn.v_proj(base.layer_norm1(x)))
    assert torch.allclose(h_v, y + base.mlp(base.layer_norm2(y)), atol=1e-6)


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_clip_is_frozen_and_each_stage_trains_what_the_paper_says():
    model = small_model()
    assert model.config.training_stage == "locator"
    locator = _trainable(model)
    backbone = {n for n in locator if n.startswith("clip.")}
    assert backbone and all(".adapter_attn." in n or ".adapter_mlp." in n for n in backbone)
    heads = {n.split(".")[0] for n in locator - backbone}
    assert heads == {"pre_fusion", "post_fusion", "locator"}
    assert {n for n, _ in model.named_parameters() if n.startswith("locator.")} <= locator

    model.set_training_stage("refiner")
    assert _trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("refiner.")}
    assert model.config.training_stage == "refiner"

    model.set_training_stage("locator")
    assert _trainable(model) == locator
    stock_names = set(CLIPModel(small_clip_config()).state_dict())
    clip_names = {n[len("clip."):].replace(".base_layer.", ".") for n, _ in model.named_parameters()
                  if n.startswith("clip.") and ".adapter_" not in n}
    assert clip_names <= stock_names and not any(n in locator for n in clip_names)
    with pytest.raises(ValueError, match="stage"):
        model.set_training_stage("both")


def test_frozen_modules_stay_in_eval_mode():
    model = small_model()
    model.train()
    assert model.pre_fusion.training and not model.refiner.training
    model.set_training_stage("refiner")
    assert model.refiner.training and not model.clip.training and not model.post_fusion.training
    model.eval()
    assert not model.refiner.training


def test_each_stage_computes_its_loss_on_its_own_target():
    model = small_model()
    inputs = model_inputs()
    labels = torch.zeros(2, 64, 64)
    labels[0, :20, :36] = 1  # partial tokens: the token target is the covered fraction
    labels[1, 40:, 10:30] = 1
    out = model(**inputs, labels=labels)
    token_target = F.avg_pool2d(labels[:, None], 8)[:, 0]
    assert token_target[0, 2, 0] == pytest.approx(0.5) and token_target[0, 0, 4] == pytest.approx(0.5)
    focal = sigmoid_focal_loss(out.coarse_logits, token_target, alpha=0.65, gamma=2.0)
    dice = dice_loss(out.coarse_logits, token_target)
    assert torch.allclose(out.loss, 1.75 * focal + 1.0 * dice)

    model.set_training_stage("refiner")
    out = model(**inputs, labels=labels)
    expected = 1.75 * sigmoid_focal_loss(out.logits, labels, alpha=0.65, gamma=2.0) + dice_loss(out.logits, labels)
    assert torch.allclose(out.loss, expected)


def test_stage_gradients_reach_only_that_stage():
    model = small_model()
    model.train()
    labels = (torch.rand(2, 64, 64) > 0.7).float()
    model(**model_inputs(), labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".adapter_" in n for n in with_grad) and any(n.startswith("pre_fusion.") for n in with_grad)
    assert not any(n.startswith("refiner.") for n in with_grad)
    model.zero_grad(set_to_none=True)
    model.set_training_stage("refiner")
    model(**model_inputs(), labels=labels).loss.backward()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} == {"refiner"}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"labels": torch.zeros(2, 32, 32)}, "labels"),
        ({"sizes": torch.tensor([[5, 5], [5, 5]])}, "sizes"),  # unknown (the processor's original_sizes is accepted)
        ({"pixel_values": torch.randn(2, 3, 60, 64)}, "pixel_values"),
    ],
)
def test_forward_rejects_bad_inputs(kwargs, name):
    model = small_model()
    with pytest.raises(ValueError, match=name):
        model(**{**model_inputs(), **kwargs})


def test_config_fields_validate_and_round_trip():
    config = RisclipConfig(clip_config=small_clip_config(), **HEADS)
    assert config.image_size == 320  # 40 tokens x patch 8, the paper's grid
    assert config.num_pre_fusion_layers == 2 and config.refiner_feature_layers == [3, 3, 2, 1]
    again = RisclipConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    for kwargs, field in [
        ({"image_size": 60}, "image_size"),
        ({"refiner_feature_layers": [3, 2]}, "refiner_feature_layers"),
        ({"training_stage": "joint"}, "training_stage"),
        ({"focal_alpha": 1.5}, "focal_alpha"),
        ({"fusion_num_heads": 5}, "fusion_num_heads"),
        ({"threshold": 1.0}, "threshold"),
    ]:
        with pytest.raises(ValueError, match=field):
            RisclipConfig(clip_config=small_clip_config(), **{**HEADS, **kwargs})


def test_from_backbones_keeps_clip_weights_and_zero_inits(tiny_backbones):
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **TINY)
    assert model.config.image_size == 64 and model.config.grid_size == 8
    assert RisclipModel.from_backbones(clip=tiny_backbones["clip"]).config.image_size == 40 * 8
    stock = CLIPModel.from_pretrained(tiny_backbones["clip"]).state_dict()
    ours = {k.replace(".base_layer.", "."): v for k, v in model.clip.state_dict().items() if ".adapter_" not in k}
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[k], stock[k]) for k in stock)
    layer = model.clip.text_model.encoder.layers[0]
    assert torch.count_nonzero(layer.adapter_mlp["default"].up.weight) == 0
    assert torch.count_nonzero(layer.adapter_mlp["default"].down.weight) > 0
    assert all(torch.count_nonzero(f.s2v.weight) == 0 for f in model.pre_fusion)
    assert all(torch.count_nonzero(f.text_self_attn.v_proj.weight) == 0 for f in model.post_fusion)


def test_trainable_weights_alone_reproduce_the_model(tiny_backbones, tmp_path):
    torch.manual_seed(0)
    trained = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **TINY)
    perturb(trained)
    trained.eval()
    inputs = model_inputs(size=64)
    inputs["input_ids"] = inputs["input_ids"] % 1000
    with torch.no_grad():
        expected = trained(**inputs)

    state = trained.trainable_state_dict()
    assert not any(k.startswith("clip.") and ".adapter_" not in k for k in state)
    assert any(k.endswith("running_mean") for k in state)  # the Refiner's BatchNorm statistics
    torch.manual_seed(123)  # a differently initialised model on the same CLIP
    fresh = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **TINY).eval()
    fresh.load_trainable_state_dict(state)
    with torch.no_grad():
        got = fresh(**inputs)
    assert torch.equal(expected.logits, got.logits) and torch.equal(expected.coarse_logits, got.coarse_logits)

    trained.save_adapter_weights(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    rebuilt = RisclipModel.from_adapter_weights(tmp_path).eval()  # CLIP path recorded in the folder
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, expected.logits)
    with pytest.raises(ValueError, match="missing"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith("refiner.")})


def test_save_pretrained_round_trips_through_the_auto_classes(tiny_backbones, tmp_path):
    torch.manual_seed(0)
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"], **TINY)
    processor = RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=64)
    perturb(model)
    model.set_training_stage("refiner")
    model.eval()
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    inputs = processor(images=image, text=["the red circle", "the square on the left"])
    inputs.pop("original_sizes")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "model.safetensors" in os.listdir(tmp_path)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), RisclipConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RisclipModel) and isinstance(loaded_processor, RisclipProcessor)
    assert loaded.config.training_stage == "refiner"
    assert _trainable(loaded) == _trainable(model)  # loading must not unfreeze CLIP
    again = loaded_processor(images=image, text=["the red circle", "the square on the left"])
    again.pop("original_sizes")
    with torch.no_grad():
        assert torch.equal(loaded(**again).logits, expected)


def test_lora_option_goes_through_peft(tiny_backbones):
    import peft  # noqa: F401  (a hard dependency: a broken install fails here rather than skipping)

    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"], use_lora=True, lora_r=2, **TINY)
    lora = {n for n in _trainable(model) if ".lora_" in n}
    # q_proj and v_proj of 4 + 4 layers, A and B each
    assert len(lora) == 2 * 8 * 2
    assert all(k in model.trainable_state_dict() for k in lora)
    model.set_training_stage("refiner")
    assert not any(".lora_" in n for n in _trainable(model))


def _train_step_counting_adapter_calls(checkpointing):
    """One locator-stage backward; returns (adapter calls in forward, adapter calls in backward, grads).

    The counter is a pre-hook on each adapted layer's attention adapter, a submodule called inside
    the layer's `forward`: a checkpointed layer runs it again when backward recomputes the layer."""
    model = small_model()
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    layers = [layer for tower in (model.clip.vision_model, model.clip.text_model) for layer in tower.encoder.layers]
    calls = []
    for index, layer in enumerate(layers):
        layer.adapter_attn["default"].register_forward_pre_hook(lambda *_, index=index: calls.append(index))
    labels = (torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(3)) > 0.7).float()
    loss = model(**model_inputs(), labels=labels).loss
    in_forward = sorted(calls)
    del calls[:]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return in_forward, sorted(calls), grads, len(layers)


def test_gradient_checkpointing_still_trains_the_adapters():
    forward, backward, grads, num_layers = _train_step_counting_adapter_calls(checkpointing=True)
    plain_forward, plain_backward, plain_grads, _ = _train_step_counting_adapter_calls(checkpointing=False)
    # every adapted layer of both towers runs once forward and, checkpointed, once more in backward
    assert forward == plain_forward == list(range(num_layers))
    assert plain_backward == []
    assert backward == list(range(num_layers))
    downs = [g for n, g in grads.items() if n.endswith("adapter_attn.default.down.weight")]
    ups = [g for n, g in grads.items() if n.endswith("adapter_attn.default.up.weight")]
    assert len(downs) == len(ups) == num_layers and all(g.abs().sum() > 0 for g in ups)
    # recomputing changes nothing: the same gradients as without checkpointing
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("refiner_projection_dim", [None, 16], ids=["paper-refiner", "projected-refiner"])
def test_tiny_risclip_overfits_a_handful_of_refshapes_samples(tiny_backbones, refshapes_root, refiner_projection_dim):
    from refseg.data import load_refer

    rows = load_refer(refshapes_root, "refshapes", "unc", "train")
    # the four largest referred objects: boundaries then weigh less against the 8x8 token grid
    order = sorted(range(len(rows)), key=lambda i: -(np.asarray(rows[i]["mask"]) > 0).mean())[:4]
    samples = [rows[i] for i in order]
    images, masks = [s["image"] for s in samples], [s["mask"] for s in samples]
    texts = [s["sentences"][0] for s in samples]

    torch.manual_seed(0)
    model = RisclipModel.from_backbones(clip=tiny_backbones["clip"],
                                        **{**TINY, "refiner_projection_dim": refiner_projection_dim})
    processor = RisclipProcessor.from_backbones(clip=tiny_backbones["clip"], image_size=model.config.image_size)
    inputs = processor(images=images, text=texts, masks=masks)
    original_sizes = inputs.pop("original_sizes")
    model.train()
    for stage, steps, lr in (("locator", 80, 3e-3), ("refiner", 100, 1e-2)):
        model.set_training_stage(stage)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            loss = model(**inputs).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ious = []
    for prediction, mask in zip(predictions, masks):
        target = torch.from_numpy(np.asarray(mask) > 0)
        assert prediction.shape == target.shape
        ious.append(((prediction & target).sum() / (prediction | target).sum()).item())
    assert np.mean(ious) > 0.9, ious
