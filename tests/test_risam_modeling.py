"""RisamModel: SAM feature levels from the configured blocks, the stock frozen encoders inside (no autograd
history, nothing of SAM's prompt side or CLIP's image tower saved), the relevance mask of eq. 4 and its
fully masked rows, one SAM pass for N expressions, shapes, the loss, errors, config and weight round trips."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor, CLIPModel, CLIPTextModel, SamModel, SamVisionModel

from refseg import RisamConfig, RisamModel, RisamProcessor
from refseg.backbones import tiny_sam_config
from refseg.losses import dice_loss, sigmoid_focal_loss
from refseg.models.risam.configuration_risam import default_feature_layers
from refseg.models.risam.modeling_risam_heads import RisamMutualAwareAttention, relevance_masks
from refseg.presets import PRESETS, get_config

SIZE = 128  # the small SAM below: 128 px, patch 16 -> an 8x8 grid, logits 32x32
GLOBAL_BLOCKS = [0, 2, 3, 5]  # of 6 blocks: the 2nd-4th global blocks (2, 3, 5) are not simply the last three
HEADS = dict(hidden_size=32, decoder_num_heads=4, upsample_hidden_sizes=[16, 8], word_length=7)
HEAD_PREFIXES = ("feature_enhancement.", "mutual_attention.", "mask_decoder.")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    """A small stock `SamModel` checkpoint with windowed blocks between global ones (1, 4 windowed)."""
    config = tiny_sam_config(num_layers=6, global_attn_indexes=GLOBAL_BLOCKS, image_size=SIZE, window_size=4)
    # At the tiny config's std 0.02 each random block moves the residual stream by ~2 %: every level would
    # be nearly the patch embedding. At 0.2 the blocks differ enough for the choice of levels to show.
    config.vision_config.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = SamModel(config).eval()
    folder = tmp_path_factory.mktemp("sam6")
    sam.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backbones(sam_folder, tiny_backbones):
    return {"sam": sam_folder, "clip": tiny_backbones["clip"]}


def small_model(backbones, seed=0, **overrides):
    torch.manual_seed(seed)
    return RisamModel.from_backbones(sam=backbones["sam"], clip=backbones["clip"], **{**HEADS, **overrides}).eval()


def model_inputs(batch=2, size=SIZE, seed=1, length=7):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1000, (batch, length), generator=generator)
    input_ids[:, 0] = 1022  # [SOS]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 4:] = 0
    input_ids[torch.arange(batch), attention_mask.sum(-1) - 1] = 1023  # [EOS]
    input_ids[-1, 4:] = 1023  # padding (= [EOS], as openai/clip)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator), "input_ids": input_ids,
            "attention_mask": attention_mask}


def box_labels(batch=2, size=SIZE):
    labels = torch.zeros(batch, size, size)
    labels[0, 10:70, 20:90] = 1
    labels[-1, 60:, 5:50] = 1
    return labels


def capture(module, store, key):
    def hook(_module, args, out):
        store[key] = (args, out)  # returns None: the output is left as it is

    return module.register_forward_hook(hook)


# ------------------------------------------------------------------ 1. feature levels
def test_feature_levels_come_from_the_configured_sam_blocks(backbones):
    model = small_model(backbones)
    assert model.config.feature_layers == [2, 3, 5]  # the 2nd-4th of global_attn_indexes [0, 2, 3, 5]
    stock = SamModel.from_pretrained(backbones["sam"]).vision_encoder.eval()
    block_outputs = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: block_outputs.__setitem__(i, out))
             for i, layer in enumerate(stock.layers)]
    pixel_values = model_inputs()["pixel_values"]
    with torch.no_grad():
        levels = model.get_visual_levels(pixel_values)
        hidden = stock(pixel_values, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    assert len(levels) == 3
    for level, i in zip(levels, [2, 3, 5]):
        assert level.shape == (2, 8, 8, 32)  # channels-last, SAM's width
        assert torch.equal(level, hidden[i + 1])  # hidden[0]: the patch embeddings
        assert torch.equal(level, block_outputs[i])  # the output of block i itself

    # the paper-scale presets read the 2nd-4th global blocks too
    assert get_config("risam-h").feature_layers == [15, 23, 31]
    assert get_config("risam-b").feature_layers == [5, 8, 11]
    assert get_config("risam-tiny").feature_layers == [1, 2, 3]
    assert RisamConfig().feature_layers == [5, 8, 11]  # SamConfig()'s ViT-B
    assert default_feature_layers([11, 2, 8, 5]) == [5, 8, 11]  # in block order, whatever the listing order
    assert default_feature_layers([1, 3]) == [1, 1, 3] and default_feature_layers([4]) == [4, 4, 4]

    # other blocks: other levels, other logits
    other = small_model(backbones, feature_layers=[0, 1, 4])
    other.load_trainable_state_dict(model.trainable_state_dict())  # the same heads
    inputs = model_inputs()
    with torch.no_grad():
        other_levels = other.get_visual_levels(pixel_values)
        assert all(torch.equal(level, hidden[i + 1]) for level, i in zip(other_levels, [0, 1, 4]))
        assert (other(**inputs).logits - model(**inputs).logits).abs().max() > 1e-2


# ------------------------------------------------------------------ 2. frozen encoders
def test_frozen_encoders_give_the_stock_outputs_bit_for_bit(backbones):
    model = small_model(backbones)
    inputs = model_inputs()
    stock_sam = SamModel.from_pretrained(backbones["sam"]).vision_encoder.eval()
    stock_clip = CLIPModel.from_pretrained(backbones["clip"]).text_model.eval()
    with torch.no_grad():
        ours = model.sam(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        theirs = stock_sam(inputs["pixel_values"], output_hidden_states=True)
        words = model.get_word_features(inputs["input_ids"], inputs["attention_mask"])
        text = stock_clip(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 7
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))
    assert words.shape == (2, 7, 64) and torch.equal(words, text.last_hidden_state)  # F_l: final-LN states


def test_only_the_heads_train_and_the_encoders_keep_no_history(backbones, tmp_path):
    model = small_model(backbones).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)}
    assert trainable == heads and heads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}
    grad_mode = {}  # autograd's mode while each module runs
    hooks = [capture(model.sam, seen, "sam"), capture(model.clip, seen, "clip"),
             capture(model.feature_enhancement, seen, "enhancement"),
             *(getattr(model, name).register_forward_pre_hook(
                 lambda _m, _a, name=name: grad_mode.setdefault(name, []).append(torch.is_grad_enabled()))
               for name in ("sam", "clip", "feature_enhancement"))]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.enable_grad():
        model(**model_inputs(), labels=box_labels()).loss.backward()
    for hook in hooks:
        hook.remove()
    # the encoders ran without autograd history: what they returned, and the levels the heads got
    sam_out, clip_out = seen["sam"][1], seen["clip"][1]
    for tensor in (*sam_out.hidden_states, sam_out.last_hidden_state, clip_out.last_hidden_state,
                   *seen["enhancement"][0]):
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert seen["enhancement"][1].requires_grad  # the heads do keep theirs
    assert grad_mode == {"sam": [False], "clip": [False], "feature_enhancement": [True]}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == heads
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in heads)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == heads  # every head parameter moved; no SAM or CLIP weight did

    # what is saved: SAM's image encoder, CLIP's text tower and the heads; checkpoints: the heads only
    model.save_pretrained(tmp_path)
    saved = set()
    for file in tmp_path.glob("*.safetensors"):
        saved |= set(load_file(str(file)))
    sam_keys = {f"sam.{k}" for k in SamVisionModel(model.config.sam_config.vision_config).state_dict()}
    clip_keys = {f"clip.{k}" for k in CLIPTextModel(model.config.clip_config.text_config).state_dict()}
    head_state = {k for k in model.state_dict() if k.startswith(HEAD_PREFIXES)}
    assert saved == sam_keys | clip_keys | head_state
    assert all(k.startswith("sam.vision_encoder.") for k in sam_keys)  # no prompt encoder, no SAM mask decoder
    # CLIP's text transformer alone: no image tower, projections or logit scale
    assert {k.split(".")[1] for k in clip_keys} == {"embeddings", "encoder", "final_layer_norm"}
    assert not any(part in k for k in saved for part in ("prompt_encoder", "shared_image_embedding",
                                                          "iou_prediction", "mask_tokens", "vision_model",
                                                          "visual_projection", "text_projection", "logit_scale"))
    assert set(model.trainable_state_dict()) == head_state


# ------------------------------------------------------------------ 3-4. the relevance mask of eq. 4
def test_relevance_mask_of_eq4_on_a_hand_built_case():
    # tau = 0.5: a pair is irrelevant (masked) where sigmoid(-s) >= 0.5, i.e. s <= 0 (s = 0 itself included)
    scores = torch.tensor([[1.0, -1.0, 0.0, 5.0],    # pixel 0; word 3 is padding in sample 0
                           [-1.0, -2.0, 0.0, 3.0],   # pixel 1: no real word relevant in sample 0
                           [2.0, 0.5, -0.5, -3.0]])  # pixel 2
    scores = torch.stack([scores, scores])
    word_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    vision, language = relevance_masks(scores, word_mask, 0.5, "printed")  # eq. 4 as printed
    assert vision.dtype == language.dtype == torch.bool
    assert vision.shape == (2, 3, 4) and language.shape == (2, 4, 3)
    T, F_ = True, False
    assert vision[0].tolist() == [[F_, T, T, T],
                                  [F_, F_, F_, T],   # would be all masked: keeps the padding mask only
                                  [F_, F_, T, T]]
    assert vision[1].tolist() == [[F_, T, T, F_],   # no padding: word 3 (s = 5) relevant
                                  [T, T, T, F_],
                                  [F_, F_, T, T]]
    # the Language-Guided branch: each word over the pixels
    assert language[1].tolist() == [[F_, T, F_],
                                    [T, T, F_],
                                    [F_, F_, F_],  # word 2 is relevant to no pixel: unmasked rather than empty
                                    [F_, F_, T]]
    assert language[0, :3].tolist() == language[1, :3].tolist()  # real words: the same in both samples
    # the direction of eq. 4 at the paper's tau = 0.35: sigmoid(-0.7) = 0.332 kept, sigmoid(-0.6) = 0.354 masked
    vision, language = relevance_masks(torch.tensor([[[0.7, 0.6, 3.0, -1.0], [3.0, 3.0, 3.0, 3.0]]]),
                                       torch.ones(1, 4, dtype=torch.bool), 0.35, "printed")
    assert vision[0].tolist() == [[F_, T, F_, T], [F_, F_, F_, F_]]
    assert language[0].tolist() == [[F_, F_], [T, F_], [F_, F_], [T, F_]]

    # threshold None (Table 3's "w/o attn. mask"): padding only
    vision, language = relevance_masks(scores, word_mask, None, "printed")
    assert torch.equal(vision, ~word_mask[:, None, :].expand(2, 3, 4))
    assert not language.any()

    # no row is ever all masked, whatever the scores and the threshold
    generator = torch.Generator().manual_seed(0)
    random_scores = torch.randn(3, 20, 6, generator=generator) * 3
    random_words = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for tau in (1e-6, 0.35, 0.9, 1 - 1e-6, None):
        vision, language = relevance_masks(random_scores, random_words, tau, "printed")
        assert not vision.all(-1).any() and not language.all(-1).any()
        assert vision[~random_words[:, None, :].expand(3, 20, 6)].all()  # padding: masked in every pixel row


def test_a_fully_masked_row_gives_finite_outputs_and_gradients(backbones):
    torch.manual_seed(0)
    block = RisamMutualAwareAttention(16, 12, 16, threshold=1e-6, reading="printed")
    visual = torch.randn(2, 10, 16, requires_grad=True)
    words = torch.randn(2, 5, 12, requires_grad=True)
    word_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    scores = block.vision_proj(visual) @ block.text_proj(words).transpose(1, 2) * block.scale
    assert (torch.sigmoid(-scores) >= 1e-6).all()  # tau = 1e-6: every pair is irrelevant
    lav, val = block(visual, words, word_mask)
    assert torch.isfinite(lav).all() and torch.isfinite(val).all()
    (lav.square().sum() + val.square().sum()).backward()
    grads = [visual.grad, words.grad, *(p.grad for p in block.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert visual.grad.abs().sum() > 0 and words.grad[0, :3].abs().sum() > 0

    # the whole model with that threshold: finite logits, loss and gradients
    model = small_model(backbones, relevance_threshold=1e-6, relevance_mask_reading="printed").train()
    out = model(**model_inputs(), labels=box_labels())
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_word_padding_is_never_attended(backbones):
    for threshold in (0.35, None):
        model = small_model(backbones, relevance_threshold=threshold)
        inputs = model_inputs()
        with torch.no_grad():
            out = model(**inputs).logits
            changed = dict(inputs, input_ids=inputs["input_ids"].clone())
            changed["input_ids"][1, 5:] = 17  # padded positions of row 1: never seen
            assert torch.equal(model(**changed).logits, out)
            changed["input_ids"][1, 2] = 17  # a real word: seen
            assert (model(**changed).logits[1] - out[1]).abs().max() > 1e-4


# ------------------------------------------------------------------ 5. one SAM pass for N expressions
def test_sam_runs_once_for_one_image_with_three_expressions(backbones):
    model = small_model(backbones)
    calls = []
    model.sam.register_forward_hook(lambda _m, _a, kwargs, _o: calls.append(kwargs["pixel_values"].shape[0]),
                                    with_kwargs=True)
    inputs = model_inputs(batch=3)
    inputs["pixel_values"] = inputs["pixel_values"][:1].repeat(3, 1, 1, 1)
    inputs["attention_mask"][1, 5:] = 0  # three different expressions, of different lengths
    with torch.no_grad():
        together = model(**inputs)
        assert calls == [1]  # one call, one row: the image
        alone = [model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits for i in range(3)]
    assert calls == [1, 1, 1, 1]
    torch.testing.assert_close(together.logits, torch.cat(alone), atol=1e-5, rtol=0)
    assert (together.logits[0] - together.logits[1]).abs().max() > 1e-3  # the expression changes the mask
    # two images, interleaved: each distinct image once, each row gets its own image back
    mixed = model_inputs(batch=4, seed=3)
    mixed["pixel_values"] = mixed["pixel_values"][[0, 1, 0, 0]]
    with torch.no_grad():
        shared = model(**inputs).logits, model(**mixed).logits
    assert calls[-1] == 2
    model.config.share_image_encoding = False
    with torch.no_grad():
        separate = model(**inputs).logits, model(**mixed).logits
    assert calls[-2:] == [3, 4]
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ 6. shapes, loss, errors, config, weights
def test_every_stage_has_the_documented_shape(backbones):
    model = small_model(backbones)
    seen = {}
    hooks = [capture(model.feature_enhancement, seen, "enhancement"), capture(model.mutual_attention[0], seen, "ma0"),
             capture(model.mutual_attention[1], seen, "ma1"), capture(model.mask_decoder, seen, "decoder")]
    out = model(**model_inputs(), labels=box_labels())
    for hook in hooks:
        hook.remove()
    assert len(model.mutual_attention) == 2 and len(model.mask_decoder.layers) == 2
    assert seen["enhancement"][1].shape == (2, 32, 8, 8)  # F_v (B, C, h, w)
    (visual, words, word_mask), (lav, val) = seen["ma0"]
    assert visual.shape == (2, 64, 32) and words.shape == (2, 7, 64)  # F_v flattened, F_l at CLIP's width
    assert word_mask.dtype == torch.bool and word_mask[1].tolist() == [True] * 4 + [False] * 3
    assert lav.shape == (2, 64, 32) and val.shape == (2, 7, 32)
    assert seen["ma1"][0][1].shape == (2, 7, 32)  # the second block reads the first one's F_val
    assert seen["decoder"][1].shape == (2, 32, 32)
    assert out.logits.shape == (2, 32, 32) and out.coarse_logits is None  # 4x the 8x8 grid
    assert out.image_embeds.shape == (2, 64, 32) and out.text_embeds.shape == (2, 7, 32)
    assert out.loss.ndim == 0 and set(out.loss_dict) == {"focal", "dice"}


def test_loss_is_half_focal_plus_half_dice_against_the_label(backbones):
    model = small_model(backbones)
    labels = box_labels()
    out = model(**model_inputs(), labels=labels)
    upsampled = F.interpolate(out.logits[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    focal = sigmoid_focal_loss(upsampled, labels, alpha=None, gamma=2.0)
    dice = dice_loss(upsampled, labels)
    torch.testing.assert_close(out.loss, 0.5 * focal + 0.5 * dice)
    torch.testing.assert_close(out.loss_dict["focal"], focal)
    torch.testing.assert_close(out.loss_dict["dice"], dice)
    assert not torch.allclose(focal, sigmoid_focal_loss(upsampled, labels, alpha=0.25, gamma=2.0))  # no alpha
    # labels already at the logits size
    small = F.interpolate(labels[:, None], size=(32, 32), mode="nearest-exact")[:, 0]
    expected = 0.5 * sigmoid_focal_loss(out.logits, small, alpha=None, gamma=2.0) + 0.5 * dice_loss(out.logits, small)
    torch.testing.assert_close(model(**model_inputs(), labels=small).loss, expected)
    # the weights of eq. 12 come from the config
    model.config.focal_weight, model.config.dice_weight = 1.0, 0.0
    torch.testing.assert_close(model(**model_inputs(), labels=labels).loss, focal)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"labels": torch.zeros(2, 48, 48)}, "labels"),
        ({"labels": torch.zeros(2, 1, SIZE, SIZE)}, "labels"),
        ({"sizes": torch.tensor([[5, 5], [5, 5]])}, "sizes"),  # unknown (the processor's original_sizes is accepted)
        ({"pixel_values": torch.randn(2, 3, SIZE - 8, SIZE)}, "pixel_values"),
        ({"pixel_values": torch.randn(2, 1, SIZE, SIZE)}, "pixel_values"),
        ({"input_ids": torch.zeros(3, 7, dtype=torch.long)}, "input_ids"),
        ({"input_ids": torch.zeros(2, 40, dtype=torch.long), "attention_mask": None}, "input_ids"),
        ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, "attention_mask"),
    ],
    ids=["labels-size", "labels-dims", "unexpected", "pixel-size", "pixel-channels", "input-ids-batch",
         "input-ids-length", "attention-mask"],
)
def test_forward_rejects_bad_inputs(backbones, kwargs, name):
    with pytest.raises(ValueError, match=name):
        small_model(backbones)(**{**model_inputs(), **kwargs})


def test_config_defaults_validate_and_round_trip(tiny_backbones):
    config = RisamConfig()
    assert config.image_size == 1024 and config.grid_size == 64 and config.feature_layers == [5, 8, 11]
    assert (config.hidden_size, config.num_mutual_attention_blocks, config.relevance_threshold) == (256, 2, 0.35)
    assert (config.decoder_num_layers, config.decoder_num_heads, config.decoder_mlp_dim) == (2, 8, 0)
    assert config.upsample_hidden_sizes == [64, 32] and config.word_length == 17 and config.threshold == 0.35
    assert (config.focal_weight, config.dice_weight, config.focal_gamma) == (0.5, 0.5, 2.0)
    paper = get_config("risam-h")
    assert paper.sam_config.vision_config.hidden_size == 1280 and paper.clip_config.text_config.hidden_size == 512
    for again in (RisamConfig.from_dict(config.to_dict()), RisamConfig.from_dict(paper.to_dict())):
        assert again.to_dict() in (config.to_dict(), paper.to_dict())
    assert RisamConfig.from_dict(paper.to_dict()).feature_layers == [15, 23, 31]
    unmasked = RisamConfig(relevance_threshold=None)
    assert RisamConfig.from_dict(unmasked.to_dict()).relevance_threshold is None
    tiny = get_config("risam-tiny")
    for kwargs, field in [
        ({"feature_layers": [3, 2, 1]}, "feature_layers"), ({"feature_layers": [1, 2]}, "feature_layers"),
        ({"feature_layers": [1, 2, 4]}, "feature_layers"), ({"decoder_num_heads": 5}, "decoder_num_heads"),
        ({"relevance_threshold": 0.0}, "relevance_threshold"), ({"relevance_threshold": 1.0}, "relevance_threshold"),
        ({"threshold": 1.0}, "threshold"), ({"word_length": 2}, "word_length"), ({"word_length": 33}, "word_length"),
        ({"upsample_hidden_sizes": [16]}, "upsample_hidden_sizes"), ({"training_stage": "refiner"}, "training_stage"),
        ({"focal_weight": 0.0, "dice_weight": 0.0}, "focal_weight"), ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"hidden_size": 0}, "hidden_size"), ({"batch_norm_momentum": 0.0}, "batch_norm_momentum"),
    ]:
        with pytest.raises(ValueError, match=field):
            RisamConfig(sam_config=tiny.sam_config, clip_config=tiny.clip_config, **{**HEADS, **kwargs})
    # relevance_threshold reaches every Mutual-Aware Attention block (None: the padding mask only)
    model = RisamModel(RisamConfig(sam_config=tiny.sam_config, clip_config=tiny.clip_config, relevance_threshold=None,
                                   **HEADS))
    assert [block.threshold for block in model.mutual_attention] == [None, None]
    with pytest.raises(ValueError, match="stage"):
        model.set_training_stage("refiner")


def test_from_backbones_keeps_the_weights_and_auto_classes_round_trip(tiny_backbones, tmp_path, make_scene):
    sam, clip = tiny_backbones["sam"], tiny_backbones["clip"]
    torch.manual_seed(0)
    model = RisamModel.from_backbones(sam=sam, clip=clip, **PRESETS["risam-tiny"].config_overrides).eval()
    processor = RisamProcessor.from_backbones(sam=sam, clip=clip)
    stock_sam = SamModel.from_pretrained(sam).vision_encoder.state_dict()
    stock_clip = CLIPModel.from_pretrained(clip).text_model.state_dict()
    ours_sam, ours_clip = model.sam.vision_encoder.state_dict(), model.clip.state_dict()
    assert ours_sam.keys() == stock_sam.keys() and all(torch.equal(ours_sam[k], stock_sam[k]) for k in stock_sam)
    assert ours_clip.keys() == stock_clip.keys() and all(torch.equal(ours_clip[k], stock_clip[k]) for k in stock_clip)
    assert model.config.grid_size == 16 and model.config.feature_layers == [1, 2, 3]
    assert model.backbone_sources() == {"sam": str(sam), "clip": str(clip)}

    image, texts = make_scene(), ["the red circle", "the blue square"]
    inputs = processor(images=image, text=texts)
    inputs.pop("original_sizes")
    with torch.no_grad():
        expected = model(**inputs).logits
    assert expected.shape == (2, 64, 64)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RisamConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RisamModel) and isinstance(loaded_processor, RisamProcessor)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, _ in loaded.named_parameters() if n.startswith(HEAD_PREFIXES)}
    again = loaded_processor(images=image, text=texts)
    again.pop("original_sizes")
    assert all(torch.equal(again[k], inputs[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(loaded(**again).logits, expected)
