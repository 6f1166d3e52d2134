"""PromptRisModel: Cross-Modal Prompting inside every stock CLIP layer (present in its input, gone from its
output, seen by every word), the stock frozen backbones inside, the Gumbel point prompt, SAM's first mask only,
ICL per image group, one SAM pass for N expressions, what trains per stage, the losses, errors, config and
weight round trips."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel, SamModel
from transformers.masking_utils import create_causal_mask

from refseg import PromptRisConfig, PromptRisModel, PromptRisProcessor
from refseg.adapters import PromptedEncoderLayer, disable_prompts
from refseg.losses import bce_loss, dice_loss, instance_contrastive_loss
from refseg.presets import PRESETS, get_config

TINY = dict(PRESETS["prompt-ris-tiny"].config_overrides)
N_TOKENS = 3  # more than the tiny preset's one, so that the prompt rows are told apart from the tokens
GRID, MASK = 8, 64  # tiny: 64 px / patch 8 for CLIP; SAM 256 px -> 16x16 embedding -> 64x64 mask frame
OWN_PREFIXES = ("cross_modal_prompting.", "decoder.", "text_prompter.")
SAM_DECODER_PREFIXES = ("sam.mask_decoder.", "sam.prompt_encoder.mask_embed.")
UNUSED_SAM = ("sam.mask_decoder.iou_prediction_head.", "sam.mask_decoder.output_hypernetworks_mlps.1.",
              "sam.mask_decoder.output_hypernetworks_mlps.2.", "sam.mask_decoder.output_hypernetworks_mlps.3.")

pytestmark = pytest.mark.usefixtures("single_thread")


def build(backbones, stage="end_to_end", seed=0, **overrides):
    torch.manual_seed(seed)
    model = PromptRisModel.from_backbones(clip=backbones["clip"], sam=backbones["sam"], **{**TINY, **overrides})
    model.set_training_stage(stage)
    return model.eval()


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    return PromptRisProcessor.from_backbones(clip=tiny_backbones["clip"], sam=tiny_backbones["sam"], image_size=64)


@pytest.fixture(scope="module")
def model(tiny_backbones):
    """Eval mode, stage `end_to_end`, 3 prompt tokens; tests that change it build their own."""
    return build(tiny_backbones, num_prompt_tokens=N_TOKENS)


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(height, width, box):
    mask = np.zeros((height, width), dtype=bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def batch(processor):
    """Two images with two expressions each (rows 0-1: image 0, rows 2-3: image 1), masks and group ids."""
    images = [noise_image(47, 61, 0), noise_image(60, 40, 1)]
    texts = [["the red circle", "the blue square on the left"], ["the green star", "a thing"]]
    masks = [[box_mask(47, 61, (2, 20, 3, 30)), box_mask(47, 61, (25, 45, 30, 60))],
             [box_mask(60, 40, (5, 30, 5, 20)), box_mask(60, 40, (5, 30, 5, 20))]]
    inputs = dict(processor(images=images, text=texts, masks=masks))
    inputs.pop("original_sizes")
    inputs["group_ids"] = torch.tensor([0, 0, 1, 1])
    inputs["instance_ids"] = torch.tensor([10, 11, 12, 12])
    return inputs


def without(inputs, *names):
    return {k: v for k, v in inputs.items() if k not in names}


# ------------------------------------------------------------------ 1. shapes
@pytest.mark.parametrize("stage", ["coarse", "end_to_end"])
@pytest.mark.parametrize("training", [False, True])
def test_every_output_has_the_documented_shape(tiny_backbones, batch, stage, training):
    model = build(tiny_backbones, stage)
    model.train(training)
    with torch.set_grad_enabled(training):
        out = model(**batch)
    assert out.logits.shape == (4, MASK, MASK)
    assert out.coarse_logits.shape == (4, GRID, GRID)
    assert out.image_embeds.shape == (4, GRID * GRID, model.config.decoder_hidden_size)
    assert out.text_embeds.shape == (4, model.config.decoder_hidden_size)
    assert out.loss.shape == ()
    expected = {"coarse_bce", "coarse_dice", "coarse_icl"}
    if stage == "end_to_end":
        expected |= {"bce", "dice", "icl"}
    assert set(out.loss_dict) == expected
    assert all(torch.isfinite(v) for v in out.loss_dict.values())


# ------------------------------------------------------------------ 2. Cross-Modal Prompting
def test_prompts_enter_every_clip_layer_and_leave_it(model, batch):
    """Each layer's own sub-modules see the n prompts first, then the tokens; the layer returns the tokens only;
    and the prompt rows are exactly what Cross-Modal Prompting computed for that layer (V2L for text layer i, L2V
    for image layer i), from the inputs to layer i."""
    clip, cmp = model.clip, model.cross_modal_prompting
    towers = {"text": clip.text_model.encoder.layers, "vision": clip.vision_model.encoder.layers}
    seen, made, hooks = {}, {}, []
    for tower, layers in towers.items():
        for i, layer in enumerate(layers):
            assert isinstance(layer, PromptedEncoderLayer)
            hooks.append(layer.base_layer.layer_norm1.register_forward_hook(
                lambda _m, args, _o, key=(tower, i): seen.setdefault(key, {}).update(inside=args[0])))
            hooks.append(layer.register_forward_hook(
                lambda _m, args, out, key=(tower, i): seen.setdefault(key, {}).update(input=args[0], output=out)))
    for i in range(cmp.num_layers):
        hooks.append(cmp.vision_to_language[i].register_forward_hook(
            lambda _m, _a, out, key=("text", i): made.__setitem__(key, out)))
        hooks.append(cmp.language_to_vision[i].register_forward_hook(
            lambda _m, _a, out, key=("vision", i): made.__setitem__(key, out)))
    with torch.no_grad():
        model(**without(batch, "labels"))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 8 and len(made) == 8  # 4 + 4 layers, every one prompted
    for key, record in seen.items():
        tokens = record["input"].shape[1]
        assert record["inside"].shape[1] == N_TOKENS + tokens  # prompts in the layer's input
        assert record["output"].shape[1] == tokens  # and dropped from its output
        prompts = made[key]
        assert prompts.shape == (4, N_TOKENS, record["input"].shape[2])
        assert torch.equal(record["inside"], torch.cat([prompts, record["input"]], dim=1))  # [P; x]
    # layer i's prompts are computed from the input to layer i (layer 0's from the embeddings)
    for i in range(1, 4):
        assert torch.equal(seen[("text", i)]["input"], seen[("text", i - 1)]["output"])


def test_every_word_sees_the_prompts(model, batch):
    """Changing a text layer's prompt changes every real word's output of that layer (the causal mask was
    extended, [SOS] included), and the padding stays masked: a padding token's content changes no word."""
    text = model.clip.text_model
    layer = text.encoder.layers[0]
    ids, attention = batch["input_ids"][:1], batch["attention_mask"][:1]  # "the red circle": 4 tokens + padding
    words = int(attention.sum())
    with torch.no_grad():
        hidden = text.embeddings(input_ids=ids)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=attention, cache=None)
        prompts = torch.randn(1, N_TOKENS, hidden.shape[-1], generator=torch.Generator().manual_seed(0))
        changed = prompts.clone()
        changed[0, 1] = 3 * torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(1))  # one token
        a = layer(hidden, mask, prompts, is_causal=True)
        b = layer(hidden, mask, changed, is_causal=True)
        assert ((a - b)[0, :words].abs().amax(dim=-1) > 1e-4).all()
        padded = hidden.clone()
        padded[0, words:] += 5.0
        c = layer(padded, mask, prompts, is_causal=True)
        assert torch.equal(a[0, :words], c[0, :words])


def test_the_model_runs_each_direction_of_prompting(tiny_backbones, batch):
    """Through the whole model: the V2L prompts of the last layer pair change the word features (of every real
    word) and not the image features, the L2V prompts the other way round."""
    model = build(tiny_backbones, num_prompt_tokens=N_TOKENS)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    last = model.cross_modal_prompting.num_layers - 1
    with torch.no_grad():
        image0, words0 = model.encode_clip(*args)
        model.cross_modal_prompting.vision_to_language[last].query_tokens.mul_(-2.0)
        image1, words1 = model.encode_clip(*args)
        model.cross_modal_prompting.language_to_vision[last].query_tokens.mul_(-2.0)
        image2, words2 = model.encode_clip(*args)
    real = batch["attention_mask"].bool()
    assert ((words1 - words0).abs().amax(-1)[real] > 1e-6).all() and torch.equal(image1, image0)
    assert ((image2 - image1).abs().amax(-1) > 1e-6).all() and torch.equal(words2, words1)


# ------------------------------------------------------------------ 3. the stock backbones inside
def test_frozen_backbones_give_the_stock_outputs_bit_for_bit(model, batch, tiny_backbones):
    stock_clip = CLIPModel.from_pretrained(tiny_backbones["clip"]).eval()
    stock_sam = SamModel.from_pretrained(tiny_backbones["sam"]).eval()
    assert (batch["attention_mask"] == 0).any()  # padding is in play
    with torch.no_grad():
        with disable_prompts(model.clip):  # CMP off: the prompted layers run as the stock ones
            image, words = model.encode_clip(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        vision = stock_clip.vision_model(pixel_values=batch["pixel_values"], interpolate_pos_encoding=True)
        text = stock_clip.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.equal(image, stock_clip.vision_model.post_layernorm(vision.last_hidden_state))
        assert torch.equal(words, text.last_hidden_state)
        ours = model.get_sam_image_embeddings(batch["sam_pixel_values"])
        assert torch.equal(ours, stock_sam.get_image_embeddings(batch["sam_pixel_values"]))
        assert torch.equal(model.sam.get_image_wide_positional_embeddings(),
                           stock_sam.get_image_wide_positional_embeddings())
        # with CMP on, CLIP's features do change
        prompted, _ = model.encode_clip(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        assert not torch.equal(prompted, image)
    ours = model.clip.state_dict()
    for name, tensor in stock_clip.state_dict().items():  # the stock weights, untouched, inside the wrappers
        parts = name.split(".")
        if ".encoder.layers." in name:
            parts.insert(parts.index("layers") + 2, "base_layer")
        assert torch.equal(ours[".".join(parts)], tensor), name


def test_sams_image_encoder_keeps_no_autograd_history(tiny_backbones, batch):
    """SAM's image encoder runs under no_grad whatever its parameters say (nothing upstream of it needs
    gradients), while the loss still reaches the trainable parts through SAM's frozen decoder."""
    model = build(tiny_backbones, train_sam_decoder=False).train()
    model.sam.vision_encoder.requires_grad_(True)  # even so
    embeddings = model.get_sam_image_embeddings(batch["sam_pixel_values"])
    assert not embeddings.requires_grad and embeddings.grad_fn is None
    model.sam.vision_encoder.requires_grad_(False)
    model(**batch).loss.backward()
    assert model.text_prompter.in_proj.weight.grad.abs().sum() > 0  # through SAM's frozen mask decoder
    assert all(p.grad is None for p in model.sam.parameters())


# ------------------------------------------------------------------ 4. the point prompt (eq. 3)
def test_point_prompt_is_a_straight_through_gumbel_one_hot_in_training(model):
    table = model.point_embeddings()
    assert table.shape == (MASK * MASK, model.config.sam_hidden_size)
    logits = torch.randn(3, MASK, MASK, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model.train()
    try:
        torch.manual_seed(0)
        point = model.point_prompt(logits)
        torch.manual_seed(1)
        other = model.point_prompt(logits)
    finally:
        model.eval()
    # forward: exactly one row of E per sample (hard one-hot)
    rows = [(table == p).all(dim=1).nonzero().flatten().tolist() for p in point.detach()]
    assert all(len(r) == 1 for r in rows)
    assert not torch.equal(point, other)  # Gumbel noise: another draw, another point
    # backward: the soft sample's gradient reaches every position of the map
    (point * torch.randn_like(point)).sum().backward()
    assert logits.grad is not None and (logits.grad.flatten(1).abs() > 0).float().mean() > 0.99


def test_point_prompt_at_inference_is_sams_embedding_of_the_argmax(model):
    logits = torch.randn(2, MASK, MASK, generator=torch.Generator().manual_seed(2))
    logits[0, 10, 37] = 50.0
    logits[1, 63, 0] = 50.0
    with torch.no_grad():
        point = model.point_prompt(logits)
        assert torch.equal(point, model.point_prompt(logits))  # no noise
        # SAM's own prompt encoder on a positive point at those pixels' centres (input coordinates, 4 px per pixel)
        scale = model.config.sam_image_size / MASK
        coords = torch.tensor([[[[37.5 * scale - 0.5, 10.5 * scale - 0.5]]], [[[0.5 * scale - 0.5, 63.5 * scale - 0.5]]]])
        stock = model.sam.prompt_encoder._embed_points(coords, torch.ones(2, 1, 1, dtype=torch.long), pad=False)
    torch.testing.assert_close(point, stock[:, 0, 0], rtol=0, atol=1e-4)  # sin/cos of large arguments


# ------------------------------------------------------------------ 5. SAM's decoder
def test_text_prompts_are_sams_width_and_zero_at_word_padding(model, batch):
    """P_text: one D_S token per word position; padding positions are SAM's zero padding token."""
    with torch.no_grad():
        _, words = model.encode_clip(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        image = model.get_sam_image_embeddings(batch["sam_pixel_values"])
        prompts = model.text_prompter(words, batch["attention_mask"].bool(), image,
                                      model.sam.get_image_wide_positional_embeddings())
    real = batch["attention_mask"].bool()
    assert prompts.shape == (4, words.shape[1], model.config.sam_hidden_size)
    assert (prompts[~real] == 0).all() and (prompts[real].abs().amax(-1) > 0).all()


def test_only_the_first_sam_mask_is_used(tiny_backbones, batch):
    model = build(tiny_backbones)
    inputs = without(batch, "labels", "group_ids", "instance_ids")
    hypernetworks = model.sam.mask_decoder.output_hypernetworks_mlps
    assert len(hypernetworks) == 4  # SAM's four mask tokens
    with torch.no_grad():
        reference = model(**inputs).logits
        for mlp in hypernetworks[1:]:
            mlp.proj_out.weight.add_(1.0)  # the other mask tokens' outputs
        assert torch.equal(model(**inputs).logits, reference)
        hypernetworks[0].proj_out.weight.add_(1.0)
        assert not torch.allclose(model(**inputs).logits, reference)


def test_sam_runs_once_for_three_expressions_of_one_image(model, processor):
    inputs = processor(images=noise_image(30, 50), text=["the red circle", "the square", "blue thing"])
    inputs.pop("original_sizes")
    sam_calls, clip_rows = [], []
    hooks = [model.sam.vision_encoder.register_forward_hook(lambda _m, args, _o: sam_calls.append(args[0].shape[0])),
             model.clip.vision_model.embeddings.register_forward_hook(
                 lambda _m, args, _o: clip_rows.append(args[0].shape[0]))]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert sam_calls == [1]  # SAM's image encoder: once, on the one image
    assert clip_rows == [3]  # CLIP's image tower sees the text (CMP): once per row
    assert out.logits.shape == (3, MASK, MASK)
    assert not torch.equal(out.logits[0], out.logits[1])


def test_the_coarse_stage_skips_sam(tiny_backbones, batch):
    model = build(tiny_backbones, "coarse")
    calls = []
    hook = model.sam.register_forward_pre_hook(lambda *_: calls.append(1))
    encoder_hook = model.sam.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model(**without(batch, "sam_pixel_values"))
    hook.remove()
    encoder_hook.remove()
    assert calls == []
    expected = F.interpolate(out.coarse_logits[:, None], size=(MASK, MASK), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(out.logits, expected)


def test_prompt_dropout_replaces_prompts_with_sams_empty_tokens(tiny_backbones):
    model = build(tiny_backbones, prompt_dropout=0.7).train()
    encoder = model.sam.prompt_encoder
    rows, width = 400, model.config.sam_hidden_size
    dense, point, text = torch.randn(rows, width, 16, 16), torch.randn(rows, width), torch.randn(rows, 5, width)
    text_mask = torch.ones(rows, 5, dtype=torch.bool)
    text_mask[::2, 3:] = False  # padding stays padding
    torch.manual_seed(0)
    d, p, t, m = model._drop_prompts(dense, point, text, text_mask)
    no_mask = (d == encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(1).all(1)
    no_point = (p == encoder.not_a_point_embed.weight).all(1)
    no_text = (t == 0).flatten(1).all(1)
    assert torch.equal(m, text_mask & ~no_text[:, None])  # dropped text: no token left for SAM's decoder
    assert 0.28 < no_text.float().mean() < 0.44  # 0.7 x (1 - 0.7^2): never all three
    kept = [torch.equal(d[i], dense[i]) or no_mask[i] for i in range(rows)]
    assert all(kept) and all(torch.equal(p[i], point[i]) or no_point[i] for i in range(rows))
    for dropped in (no_mask, no_point):
        assert 0.6 < dropped.float().mean() < 0.8  # each kind at the configured rate
    assert not (no_mask & no_point & no_text).any()  # never all three
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model._drop_prompts(dense, point, text, text_mask),
                                                 (dense, point, text, text_mask)))


# ------------------------------------------------------------------ 6. losses and ICL
def test_loss_terms_are_bce_dice_and_icl_on_both_masks(tiny_backbones, batch):
    model = build(tiny_backbones, icl_weight=0.5, dice_weight=2.0)
    with torch.no_grad():
        out = model(**batch)
    labels = batch["labels"]
    coarse_target = F.interpolate(labels[:, None], size=(GRID, GRID), mode="area")[:, 0]
    final = F.interpolate(out.logits[:, None], size=labels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    groups, instances = batch["group_ids"], batch["instance_ids"]
    expected = {
        "coarse_bce": bce_loss(out.coarse_logits, coarse_target),
        "coarse_dice": dice_loss(out.coarse_logits, coarse_target),
        "coarse_icl": instance_contrastive_loss(out.coarse_logits, coarse_target, groups, instance_ids=instances),
        "bce": bce_loss(final, labels), "dice": dice_loss(final, labels),
        "icl": instance_contrastive_loss(final, labels, groups, instance_ids=instances),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.loss_dict[name], value, rtol=1e-5, atol=1e-6, msg=name)
    total = sum(v * {"bce": 1.0, "dice": 2.0, "icl": 0.5}[k.rsplit("_", 1)[-1]] for k, v in expected.items())
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    # without group ids ICL is left out; the labels may also come at the logits' size
    with torch.no_grad():
        plain = model(**without(batch, "group_ids", "instance_ids"))
        small = model(**{**without(batch, "group_ids", "instance_ids"),
                         "labels": F.interpolate(labels[:, None], size=(MASK, MASK), mode="nearest-exact")[:, 0]})
    assert set(plain.loss_dict) == {"coarse_bce", "coarse_dice", "bce", "dice"}
    assert set(small.loss_dict) == set(plain.loss_dict)


def test_icl_contrasts_the_rows_of_each_image_only(tiny_backbones, batch, processor):
    """The ICL term is the mean over images of eq. 8 on that image's rows alone: replacing another image's
    rows (image, texts, masks) leaves an image's own term unchanged."""
    model = build(tiny_backbones)

    def group_terms(inputs):
        with torch.no_grad():
            out = model(**inputs)
        labels = inputs["labels"]
        final = F.interpolate(out.logits[:, None], size=labels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        per_group = instance_contrastive_loss(final, labels, inputs["group_ids"], instance_ids=inputs["instance_ids"],
                                              reduction="none")
        torch.testing.assert_close(out.loss_dict["icl"], per_group.mean(), rtol=1e-5, atol=1e-6)
        alone = instance_contrastive_loss(final[:2], labels[:2], instance_ids=inputs["instance_ids"][:2])
        torch.testing.assert_close(per_group[0], alone, rtol=1e-5, atol=1e-6)
        return per_group

    first = group_terms(batch)
    other = dict(processor(images=noise_image(33, 33, 7), text=["left thing", "right thing"],
                           masks=[box_mask(33, 33, (0, 33, 0, 10)), box_mask(33, 33, (0, 33, 20, 33))]))
    other.pop("original_sizes")
    changed = {k: torch.cat([batch[k][:2], other[k]]) for k in other}
    changed.update(group_ids=batch["group_ids"], instance_ids=torch.tensor([10, 11, 20, 21]))
    second = group_terms(changed)
    torch.testing.assert_close(second[0], first[0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(second[1], first[1])
    with torch.no_grad():  # one group over all four rows is another loss
        single = model(**{**batch, "group_ids": torch.zeros(4, dtype=torch.long)})
    assert not torch.allclose(single.loss_dict["icl"], model(**batch).loss_dict["icl"])


# ------------------------------------------------------------------ 7. what trains
@pytest.mark.parametrize("train_sam_decoder", [False, True])
def test_only_the_stage_parts_get_gradients(tiny_backbones, batch, train_sam_decoder):
    model = build(tiny_backbones, "coarse", train_sam_decoder=train_sam_decoder).train()
    for stage, prefixes in (("coarse", ("cross_modal_prompting.", "decoder.")),
                            ("end_to_end", OWN_PREFIXES + (SAM_DECODER_PREFIXES if train_sam_decoder else ()))):
        model.set_training_stage(stage)
        model(**batch).loss.backward()
        for name, param in model.named_parameters():
            should = name.startswith(prefixes) and not name.startswith(UNUSED_SAM)
            assert param.requires_grad == should, name
            if not should:
                assert param.grad is None, name
        trained = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained) == len(trained), stage
        model.zero_grad(set_to_none=True)
    keys = set(model.trainable_state_dict())
    assert keys and all(k.startswith(OWN_PREFIXES + (SAM_DECODER_PREFIXES if train_sam_decoder else ())) for k in keys)
    assert any(k.startswith("text_prompter.") for k in keys)
    assert any(k.startswith("sam.") for k in keys) == train_sam_decoder


# ------------------------------------------------------------------ 8. errors
SAM_SHAPE = (2, 3, 256, 256)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda b: b.update(pixel_values=torch.zeros(2, 3, 60, 60)), "pixel_values"),
        (lambda b: b.update(pixel_values=torch.zeros(2, 3, 64, 32)), "pixel_values"),
        (lambda b: b.pop("sam_pixel_values"), "sam_pixel_values"),
        (lambda b: b.update(sam_pixel_values=torch.zeros(2, 3, 128, 128)), "sam_pixel_values"),
        (lambda b: b.update(sam_pixel_values=torch.zeros(1, 3, 256, 256)), "sam_pixel_values"),
        (lambda b: b.update(input_ids=b["input_ids"][:1]), "input_ids"),
        (lambda b: b.update(input_ids=torch.ones(2, 40, dtype=torch.long)), "input_ids"),
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :5]), "attention_mask"),
        (lambda b: b.update(labels=torch.zeros(2, 100, 100)), "labels"),
        (lambda b: b.update(group_ids=torch.zeros(3, dtype=torch.long)), "group_ids"),
        (lambda b: b.update(instance_ids=torch.zeros(2, dtype=torch.long)), "instance_ids"),
        (lambda b: b.update(sizes=torch.zeros(2, 2)), "sizes"),  # unknown (the processor's original_sizes is accepted)
    ],
    ids=["clip-size", "clip-not-square", "no-sam", "sam-size", "sam-batch", "ids-batch", "ids-too-long", "mask-shape",
         "labels", "group-ids", "instances-without-groups", "unexpected"],
)
def test_forward_rejects_bad_inputs(model, batch, change, name):
    inputs = {k: v[:2] for k, v in without(batch, "group_ids", "instance_ids").items()}
    change(inputs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        model(**inputs)


# ------------------------------------------------------------------ 9. config and round trips
@pytest.mark.parametrize(
    "kwargs, name",
    [({"image_size": 70}, "image_size"), ({"image_size": 8}, "image_size"), ({"num_prompt_tokens": 0}, "num_prompt_tokens"),
     ({"cmp_num_heads": 3}, "cmp_num_heads"), ({"decoder_num_heads": 5}, "decoder_num_heads"),
     ({"text_prompt_num_heads": 3}, "text_prompt_num_heads"), ({"decoder_ffn_dim": -1}, "decoder_ffn_dim"),
     ({"word_length": 2}, "word_length"), ({"word_length": 40}, "word_length"),
     ({"gumbel_temperature": 0.0}, "gumbel_temperature"), ({"prompt_dropout": 1.0}, "prompt_dropout"),
     ({"threshold": 1.0}, "threshold"), ({"icl_weight": -1.0}, "icl_weight"),
     ({"bce_weight": 0.0, "dice_weight": 0.0}, "dice_weight"), ({"training_stage": "refiner"}, "training_stage"),
     ({"train_sam_decoder": "yes"}, "train_sam_decoder")],
)
def test_config_validates_its_fields(kwargs, name):
    with pytest.raises(ValueError, match=name):
        get_config("prompt-ris-tiny", **kwargs)


def test_config_defaults_are_the_papers():
    config = PromptRisConfig()
    assert (config.image_size, config.grid_size, config.num_prompt_tokens, config.num_cmp_layers) == (480, 30, 16, 12)
    assert (config.sam_image_size, config.mask_size, config.sam_hidden_size) == (1024, 256, 256)
    assert (config.decoder_hidden_size, config.text_prompt_num_layers, config.threshold) == (512, 2, 0.5)
    assert config.training_stage == "coarse" and not config.train_sam_decoder and config.word_length == 20
    paper = get_config("prompt-ris-b")
    assert paper.clip_config.vision_config.hidden_size == 768 and paper.sam_config.vision_config.hidden_size == 768
    with torch.device("meta"):
        model = AutoModel.from_config(paper)
    model.set_training_stage("end_to_end")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"cross_modal_prompting", "decoder", "text_prompter"}
    loaded = PromptRisConfig.from_dict(paper.to_dict())
    assert loaded.image_size == 480 and loaded.sam_config.vision_config.hidden_size == 768


def test_save_and_load_round_trip_through_the_auto_classes(tiny_backbones, batch, processor, tmp_path):
    model = build(tiny_backbones, train_sam_decoder=False)
    with torch.no_grad():
        model.cross_modal_prompting.vision_to_language[0].query_tokens.add_(0.5)  # not the initial values
        expected = model(**without(batch, "labels")).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is PromptRisModel and type(loaded_processor) is PromptRisProcessor
    assert loaded.config.training_stage == "end_to_end"
    assert {n.split(".")[0] for n, p in loaded.named_parameters() if p.requires_grad} == {
        "cross_modal_prompting", "decoder", "text_prompter"}
    weights = model.state_dict()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in loaded.state_dict().items())  # bit for bit
    # The logits to rounding only: the rows' real text tokens go through SAM's decoder in per-length calls, some of
    # a single row, and one-row float32 matmuls may round differently on weights held in other memory.
    with torch.no_grad():
        torch.testing.assert_close(loaded(**without(batch, "labels")).logits, expected, rtol=1e-5, atol=1e-9)
    # the trainable weights alone, onto the same backbones
    state = model.trainable_state_dict()
    assert all(k.startswith(OWN_PREFIXES) for k in state)
    model.save_adapter_weights(tmp_path / "adapter")
    rebuilt = PromptRisModel.from_adapter_weights(tmp_path / "adapter", clip=tiny_backbones["clip"],
                                                  sam=tiny_backbones["sam"]).eval()
    rebuilt.set_training_stage("end_to_end")
    assert all(torch.equal(tensor, weights[name]) for name, tensor in rebuilt.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**without(batch, "labels")).logits, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_remote_code_export_loads_without_refseg_and_matches(tiny_backbones, processor, tmp_path):
    """`refseg.hub.export(remote_code=True)` carries every module Prompt-RIS needs (the prompt-token wrapper
    included): the folder loads in an interpreter where refseg cannot be imported and gives the same logits."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from refseg.hub import export
    from test_hub_export import REMOTE_SCRIPT, TEXTS

    model = build(tiny_backbones)
    folder = export(model, processor, tmp_path / "export", remote_code=True)
    assert (folder / "adapters_prompts.py").is_file()
    image = noise_image(47, 61)
    image.save(tmp_path / "scene.png")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(folder), str(tmp_path / "scene.png"),
         str(tmp_path / "remote.safetensors"), json.dumps(TEXTS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1])["refseg_modules"] == []
    inputs = processor(images=image, text=TEXTS)
    inputs.pop("original_sizes")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(load_file(tmp_path / "remote.safetensors")["logits"], logits, atol=1e-6, rtol=0)
