"""Generalized referring segmentation: every method's presence head (`config.no_target_head`, `refseg.no_target`).

- The head against a reference written here from its documented design, in float64, on what each method says
  the head reads (RISCLIP: the fused [EOS], the fused patch tokens, the Locator's map; CRIS: F_s, F_c, the
  projector's logits; RISAM: the decoder's query token and pixels, from the paper reference of
  tests/risam_reference.py; Prompt-RIS: t_g, F'_IC, S'_C).
- The loss term: BCE against "the label mask is empty", gradient reaching the head.
- Post-processing: an empty mask exactly where the head says "no target".
- Trained briefly on scenes whose third expression names a colour that is not in the image: the head tells
  the absent referent from the present ones of the same image (it reads the text), on unseen scenes too, and
  its BCE falls.
- The paper configurations are unchanged: no head, no output, no extra weights.
"""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModel

from refseg.modeling_outputs import ReferringSegmentationOutput
from refseg.no_target import no_target_targets
from refseg.presets import get_config
from refseg.training import METHODS

from conftest import make_two_referent_scenes, randomise_parameters, scene_batch, tiny_preset, train_on_scenes

MODEL_METHODS = sorted(m for m in METHODS if not METHODS[m].baseline)


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_head(head, summary, pixels, mask_logits):
    """The documented head: pixels (B, C, h, w) pooled with the softmax of the mask logits averaged over blocks
    onto the pixel grid, LayerNorm of the summary and of the pooled pixels, the mask's largest logit and mean
    probability, then Linear - GELU (erf) - Linear."""
    batch, channels, height, width = pixels.shape
    big_h, big_w = mask_logits.shape[-2:]
    on_grid = mask_logits.reshape(batch, height, big_h // height, width, big_w // width).mean(dim=(2, 4))
    weights = torch.exp(on_grid.reshape(batch, -1))
    weights = weights / weights.sum(-1, keepdim=True)
    pooled = (weights[:, None, :] * pixels.reshape(batch, channels, -1)).sum(-1)
    flat = mask_logits.reshape(batch, -1)
    stats = torch.stack([flat.max(-1).values, (1 / (1 + torch.exp(-flat))).mean(-1)], dim=-1)
    x = torch.cat([layer_norm(summary, head.summary_norm), layer_norm(pooled, head.pixel_norm), stats], dim=-1)
    hidden = x @ head.fc1.weight.T + head.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return (hidden @ head.fc2.weight.T + head.fc2.bias)[:, 0]


def tiny_model(method, **overrides):
    torch.manual_seed(0)
    return AutoModel.from_config(get_config(tiny_preset(method), no_target_head=True, **overrides))


def random_inputs(model, batch=3, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    input_ids = torch.randint(1, 1000, (batch, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 4:] = 0
    inputs = {"pixel_values": torch.randn(batch, 3, size, size, generator=generator, dtype=dtype),
              "input_ids": input_ids, "attention_mask": attention_mask}
    if hasattr(model.config, "sam_image_size"):
        sam = model.config.sam_image_size
        inputs["sam_pixel_values"] = torch.randn(batch, 3, sam, sam, generator=generator, dtype=dtype)
    return inputs


def label_size(model):
    return getattr(model.config, "sam_image_size", None) or model.config.image_size


# ------------------------------------------------------------------ the head's math and inputs
@pytest.mark.parametrize("method", ["cris", "prompt_ris", "risclip"])
def test_head_equals_the_reference_on_the_documented_inputs(method, single_thread):
    model = tiny_model(method).double().eval()
    randomise_parameters(model.no_target_head, seed=3, std=0.3)
    outputs = model(**random_inputs(model, dtype=torch.float64))
    batch = outputs.logits.shape[0]
    if method == "risclip":  # [EOS] after PostFusion, PostFusion's patch tokens, the Locator's map
        grid = outputs.coarse_logits.shape[-2:]
        pixels = outputs.image_embeds.transpose(1, 2).reshape(batch, -1, *grid)
        expected = reference_head(model.no_target_head, outputs.text_embeds, pixels, outputs.coarse_logits)
    elif method == "cris":  # F_s, the decoder's output F_c, the projector's logits (4x the grid)
        grid = int(outputs.image_embeds.shape[1] ** 0.5)
        pixels = outputs.image_embeds.transpose(1, 2).reshape(batch, -1, grid, grid)
        expected = reference_head(model.no_target_head, outputs.text_embeds, pixels, outputs.logits)
    else:  # Prompt-RIS: t_g, F'_IC, the coarse map S'_C
        grid = outputs.coarse_logits.shape[-2:]
        pixels = outputs.image_embeds.transpose(1, 2).reshape(batch, -1, *grid)
        expected = reference_head(model.no_target_head, outputs.text_embeds, pixels, outputs.coarse_logits)
    assert outputs.no_target_logits.shape == (batch,)
    torch.testing.assert_close(outputs.no_target_logits, expected, rtol=0, atol=1e-10)
    assert expected.std() > 1e-3  # rows differ: nothing constant was compared


def test_risam_head_reads_the_decoders_query_token_and_pixels(tmp_path_factory, tiny_backbones):
    from risam_reference import close, make_backbones, model_inputs, prepared_model, reference_forward
    from risam_reference import load_stock_encoders

    backbones = make_backbones(tmp_path_factory, tiny_backbones)
    model = prepared_model(backbones, no_target_head=True)
    randomise_parameters(model.no_target_head, seed=3, std=0.3)
    inputs = model_inputs()
    state = {}
    logits, _, _ = reference_forward(model, load_stock_encoders(backbones), **inputs, state=state)
    outputs = model(**inputs)
    close(outputs.logits, logits)
    expected = reference_head(model.no_target_head, state["query"], state["pixels"], logits)
    close(outputs.no_target_logits, expected, atol=1e-10)


# ------------------------------------------------------------------ loss, gradient, post-processing
def test_targets_are_the_empty_label_masks():
    labels = torch.zeros(4, 5, 6)
    labels[1, 2, 3] = 1.0
    labels[3] = 0.25  # a soft (resized) target is still a target
    assert no_target_targets(labels).tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_bce_term_and_gradient_reach_the_head(method, single_thread):
    model = tiny_model(method, no_target_loss_weight=0.7).train()
    inputs = random_inputs(model, batch=3)
    size = label_size(model)
    labels = torch.zeros(3, size, size)
    labels[1, : size // 2, : size // 2] = 1.0  # rows 0 and 2: no referent
    torch.manual_seed(7)
    outputs = model(**inputs, labels=labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.no_target_logits,
                                                                    torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(outputs.loss_dict["no_target"], expected.detach())
    # the loss is the method's own (its weights pinned by its equation tests) + 0.7 x the presence term
    model.config.no_target_loss_weight = 0.0
    torch.manual_seed(7)  # the same dropout draws
    without = model(**inputs, labels=labels).loss.detach()
    model.config.no_target_loss_weight = 0.7
    torch.testing.assert_close(outputs.loss.detach() - without, 0.7 * expected.detach())
    outputs.loss.backward()
    for name, param in model.no_target_head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_post_processing_empties_exactly_the_masks_the_head_rejects(method, tiny_backbones, single_thread):
    spec = METHODS[method]
    model_cls, processor_cls = spec.load_classes()
    from types import SimpleNamespace

    from refseg.training.modeling import build_model_and_processor

    args = SimpleNamespace(preset=tiny_preset(method), model_name_or_path=None,
                           config_overrides={"no_target_head": True},
                           **{name: str(tiny_backbones[name]) for name in spec.backbones})
    torch.manual_seed(0)
    model, processor = build_model_and_processor(spec, args)
    model.eval()
    scenes = make_two_referent_scenes(2)
    batch = scene_batch(processor, scenes, with_masks=False)
    sizes = batch.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**batch)
        outputs.logits = torch.full_like(outputs.logits, 5.0)  # every mask full without the head
        outputs.no_target_logits = torch.tensor([3.0, -3.0, 0.1, -0.1])  # p = 0.95, 0.05, 0.525, 0.475
    masks = processor.post_process_referring_segmentation(outputs, sizes)
    assert [bool(m.any()) for m in masks] == [False, True, False, True]
    assert masks[1].all() and masks[3].all()
    masks = processor.post_process_referring_segmentation(outputs, sizes, no_target_threshold=0.9)
    assert [bool(m.any()) for m in masks] == [False, True, True, True]
    headless = ReferringSegmentationOutput(logits=outputs.logits)  # a model without the head: masks untouched
    assert all(m.all() for m in processor.post_process_referring_segmentation(headless, sizes))
    with pytest.raises(ValueError, match="no_target_threshold"):
        processor.post_process_referring_segmentation(outputs, sizes, no_target_threshold=1.0)


# ------------------------------------------------------------------ learned: the head reads the expression
def with_absent_referents(scenes, seed):
    """Each scene plus a third expression naming a colour that is in no scene (green or yellow): no referent."""
    rng = np.random.default_rng(seed)
    out = []
    for image, referents in scenes:
        text = f"the {rng.choice(['green', 'yellow'])} {rng.choice(['square', 'circle'])}"
        out.append((image, referents + [(text, np.zeros_like(referents[0][1]))]))
    return out


# RISAM's query token starts the same for every row and takes longer to carry the expression
FIRST_STAGE_STEPS = {"risam": 160}


@pytest.fixture(scope="module")
def trained_with_head(tiny_backbones):
    cache = {}

    def get(method):
        if method not in cache:
            scenes = with_absent_referents(make_two_referent_scenes(8, seed=0), seed=0)
            model, processor = train_on_scenes(method, tiny_backbones, scenes,
                                               first_stage_steps=FIRST_STAGE_STEPS.get(method, 80),
                                               config_overrides={"no_target_head": True})
            cache[method] = (model, processor)
        return cache[method]

    return get


def presence(model, processor, scenes):
    """(p(no target) (N, 3), masks): per scene, its two present expressions then its absent one."""
    batch = scene_batch(processor, scenes, with_masks=False)
    sizes = batch.pop("original_sizes")
    with torch.no_grad():
        outputs = model(**batch)
    masks = processor.post_process_referring_segmentation(outputs, sizes,
                                                          no_target_threshold=model.config.no_target_threshold)
    return outputs.no_target_logits.sigmoid().reshape(-1, 3).numpy(), masks


@pytest.mark.slow
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_trained_head_tells_an_absent_referent_from_the_present_ones(method, trained_with_head):
    """Same images, three expressions each: the head must reject exactly the one whose colour is absent. A head
    that ignores the text gives the three one probability; one that ignores the image cannot be told apart by
    this test, hence the unseen scenes below hold new images of the same vocabulary."""
    model, processor = trained_with_head(method)
    for seed in (0, 1):  # the training scenes, then unseen ones
        scenes = with_absent_referents(make_two_referent_scenes(8, seed=seed), seed=seed)
        probability, masks = presence(model, processor, scenes)
        assert probability[:, 2].min() > 0.5 > probability[:, :2].max(), np.round(probability, 2)
        assert not any(masks[i].any() for i in range(2, len(masks), 3))  # rejected: empty masks


@pytest.mark.slow
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_training_lowers_the_presence_loss(method, trained_with_head, tiny_backbones):
    """The BCE of the presence term on the training scenes, before (a fresh model) and after training."""
    scenes = with_absent_referents(make_two_referent_scenes(8, seed=0), seed=0)

    def presence_loss(model, processor):
        batch = scene_batch(processor, scenes, model=model)
        batch.pop("original_sizes")
        with torch.no_grad():
            return model.eval()(**batch).loss_dict["no_target"].item()

    before = presence_loss(*train_on_scenes(method, tiny_backbones, scenes, first_stage_steps=0, later_stage_steps=0,
                                            config_overrides={"no_target_head": True}))
    after = presence_loss(*trained_with_head(method))
    assert after < 0.2 * before, (before, after)


# ------------------------------------------------------------------ stages, saving, the paper configs
def test_risclip_head_trains_with_the_locator_and_is_frozen_with_the_refiner():
    model = tiny_model("risclip")
    assert all(p.requires_grad for p in model.no_target_head.parameters())
    model.set_training_stage("refiner")
    assert not any(p.requires_grad for p in model.no_target_head.parameters())
    model.train()
    assert not model.no_target_head.training


def test_prompt_ris_head_trains_in_both_stages():
    model = tiny_model("prompt_ris")
    for stage in ("coarse", "end_to_end"):
        model.set_training_stage(stage)
        assert all(p.requires_grad for p in model.no_target_head.parameters()), stage


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_the_head_is_saved_and_reloaded(method, tmp_path, single_thread):
    model = tiny_model(method).eval()
    randomise_parameters(model.no_target_head, seed=5, std=0.3)
    assert any(k.startswith("no_target_head.") for k in model.trainable_state_dict())
    inputs = random_inputs(model, batch=2)
    with torch.no_grad():
        expected = model(**inputs).no_target_logits
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.no_target_head is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).no_target_logits, expected)


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_paper_configurations_have_no_head(method, single_thread):
    torch.manual_seed(0)
    model = AutoModel.from_config(get_config(tiny_preset(method))).eval()
    assert model.no_target_head is None
    assert not any("no_target" in k for k in model.state_dict())
    with torch.no_grad():
        outputs = model(**random_inputs(model, batch=2))
    assert outputs.no_target_logits is None


@pytest.mark.parametrize("field, value", [("no_target_head", 1), ("no_target_loss_weight", -1.0),
                                          ("no_target_threshold", 0.0), ("no_target_threshold", 1.0)])
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_config_fields_are_checked(method, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        get_config(tiny_preset(method), **{field: value})
