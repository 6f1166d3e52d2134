"""The SAM3 baseline on a tiny random SAM3 written by the stock classes: the pipeline, the instance-selection
rule (best presence x instance score, or the union above a threshold) and one vision pass per image."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer, Sam3Config, Sam3Model, Sam3Processor, ViTImageProcessor, pipeline

import refseg  # noqa: F401  (registers the task and the baselines)
from refseg.baselines import Sam3ReferringModel, Sam3ReferringProcessor, select_referring_mask
from refseg.pipelines import TASK

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 56  # the tiny SAM3's input: 4 x 4 patches of 14, masks at 16 x 16


def tiny_sam3_config(vocab_size=1024) -> Sam3Config:
    """SAM3 with every part one or two layers deep and 32 wide (the tiny CLIP tokenizer's vocabulary)."""
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    return Sam3Config(
        vision_config=dict(backbone_config=dict(model_type="sam3_vit_model", num_hidden_layers=2, image_size=SIZE,
                                                patch_size=14, window_size=2, global_attn_indexes=[1],
                                                pretrain_image_size=SIZE, **small),
                           fpn_hidden_size=32, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
        text_config=dict(vocab_size=vocab_size, projection_dim=32, num_hidden_layers=1, max_position_embeddings=32,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         **small),
        geometry_encoder_config=dict(num_layers=1, **small),
        detr_encoder_config=dict(num_layers=1, **small),
        detr_decoder_config=dict(num_layers=1, num_queries=5, **small),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=2, num_attention_heads=2),
    )


def save_stock_sam3(folder, clip_folder, seed=0):
    """A folder like `facebook/sam3`, tiny and random, written by the stock `Sam3Model` / `Sam3Processor`
    (SAM3's own image processor needs torchvision; a `ViTImageProcessor` does the same plain square resize)."""
    torch.manual_seed(seed)
    Sam3Model(tiny_sam3_config()).save_pretrained(folder)
    image_processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)
    Sam3Processor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(clip_folder)
                  ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock_sam3(tiny_backbones, tmp_path_factory):
    return save_stock_sam3(tmp_path_factory.mktemp("sam3-stock"), tiny_backbones["clip"])


def _by_hand(folder, batch, with_presence=False):
    """The stock `Sam3Model`, one row at a time and without cached features: best instance per row (and, with
    `with_presence`, each row's presence logit, (B,))."""
    model = Sam3Model.from_pretrained(folder).eval()
    chosen, all_masks, all_scores, presence = [], [], [], []
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            out = model(pixel_values=batch["pixel_values"][row:row + 1], input_ids=batch["input_ids"][row:row + 1],
                        attention_mask=batch["attention_mask"][row:row + 1])
            scores = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
            chosen.append(out.pred_masks[0, scores.argmax()])
            all_masks.append(out.pred_masks[0])
            all_scores.append(scores)
            presence.append(out.presence_logits[0, 0])
    found = torch.stack(chosen), torch.stack(all_masks), torch.stack(all_scores)
    return (*found, torch.stack(presence)) if with_presence else found


def test_the_pipeline_serves_a_stock_sam3_folder(stock_sam3, make_scene):
    segmenter = pipeline(TASK, model=str(stock_sam3))
    assert type(segmenter.model) is Sam3ReferringModel and isinstance(segmenter.processor, Sam3ReferringProcessor)
    # the presence gate off: this random SAM3's presence logit is about -2e-4, just on the no-target side of 0.5,
    # so with it every mask here would come back empty and the comparison would show nothing (the gate is
    # tested on its own below)
    segmenter.model.config.no_target_head = False
    image = make_scene(width=61, height=47)
    texts = ["the red circle", "the blue square", "the red circle on the left"]
    results = segmenter(image, text=texts)
    batch = segmenter.processor(images=image, text=texts)
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["input_ids"].shape == (3, 32)
    chosen, _, _ = _by_hand(stock_sam3, batch)
    probability = F.interpolate(chosen[:, None], size=(47, 61), mode="bilinear", align_corners=False)[:, 0].sigmoid()
    assert all((expected > 0.5).any() for expected in probability)
    for result, expected in zip(results, probability):
        assert result["mask"].size == image.size and result["mask"].mode == "L"
        np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, (expected > 0.5).numpy())
        assert result["no_target"] is False  # no presence output: no target only for an empty mask


def force_presence(model, per_row):
    """A forward hook on SAM3's presence head: row i's presence logit becomes `per_row[i]` (within SAM3's clamp
    of +-10, applied after the head)."""
    def hook(_module, _args, output):
        return torch.tensor(per_row, dtype=output.dtype).reshape(-1, *[1] * (output.dim() - 1)).expand_as(output)

    return model.detr_decoder.presence_head.register_forward_hook(hook)


def test_presence_is_mapped_onto_no_target_logits(stock_sam3, make_scene):
    """`no_target_logits == -presence_logits` (B,), by default; `config.no_target_head=False` turns it off."""
    model = Sam3ReferringModel.from_pretrained(stock_sam3).eval()
    assert not hasattr(model.config, "no_target_head")  # a stock config: the default applies
    processor = model.adapt_processor(Sam3Processor.from_pretrained(stock_sam3))
    batch = processor(images=[make_scene(width=61, height=47), make_scene(width=40, height=52)],
                      text=[["the red circle", "the blue square"], ["the disc"]])
    batch.pop("original_sizes")
    hook = force_presence(model, [2.5, -1.5, 0.25])
    try:
        with torch.no_grad():
            outputs = model(**batch)
    finally:
        hook.remove()
    torch.testing.assert_close(outputs.no_target_logits, torch.tensor([-2.5, 1.5, -0.25]))
    with torch.no_grad():  # unforced, against the stock model row by row
        outputs = model(**batch)
    *_, presence = _by_hand(stock_sam3, batch, with_presence=True)
    assert outputs.no_target_logits.shape == (3,)
    torch.testing.assert_close(outputs.no_target_logits, -presence, atol=1e-6, rtol=1e-5)
    model.config.no_target_head = False
    with torch.no_grad():
        assert model(**batch).no_target_logits is None


def test_the_pipeline_reports_sam3_presence_as_score_and_no_target(stock_sam3, make_scene):
    """Present (presence logit +6): the chosen instance's mask, score sigmoid(6), no_target False; absent (-6): an
    empty mask, score sigmoid(-6), no_target True; +0.3 (no target with probability sigmoid(-0.3) = 0.43): absent
    only at a no-target threshold of 0.4 (post-processing empties that mask as well)."""
    segmenter = pipeline(TASK, model=str(stock_sam3))
    image = make_scene(width=61, height=47)
    texts = ["the red circle", "the blue square", "the red circle on the left"]
    chosen, *_ = _by_hand(stock_sam3, segmenter.processor(images=image, text=texts))
    expected = F.interpolate(chosen[:, None], size=(47, 61), mode="bilinear", align_corners=False)[:, 0].sigmoid() > 0.5
    assert expected.any(dim=(1, 2)).all()  # every chosen mask non-empty, so an emptied one shows
    hook = force_presence(segmenter.model, [6.0, -6.0, 0.3])
    try:
        results = segmenter(image, text=texts)
        stricter = segmenter(image, text=texts, no_target_threshold=0.4)
    finally:
        hook.remove()
    present, absent, unsure = results
    assert present["no_target"] is False and present["score"] == pytest.approx(1 / (1 + math.exp(-6)), abs=1e-6)
    np.testing.assert_array_equal(np.asarray(present["mask"]) > 0, expected[0].numpy())
    assert absent["no_target"] is True and absent["score"] == pytest.approx(1 / (1 + math.exp(6)), abs=1e-6)
    assert not np.asarray(absent["mask"]).any()
    assert unsure["no_target"] is False and stricter[2]["no_target"] is True
    np.testing.assert_array_equal(np.asarray(unsure["mask"]) > 0, expected[2].numpy())
    assert not np.asarray(stricter[2]["mask"]).any()
    assert [r["score"] for r in stricter] == pytest.approx([r["score"] for r in results])


def test_each_image_is_encoded_once_for_its_expressions(stock_sam3, make_scene):
    model = Sam3ReferringModel.from_pretrained(stock_sam3).eval()
    processor = model.adapt_processor(Sam3Processor.from_pretrained(stock_sam3))
    calls = []
    model.vision_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    one, other = make_scene(width=61, height=47), make_scene(width=40, height=52)
    batch = processor(images=[one, other], text=[["the red circle", "the blue square", "a shape"], ["the disc"]])
    batch.pop("original_sizes")
    with torch.no_grad():
        logits = model(**batch).logits
    assert calls == [2] and logits.shape == (4, 16, 16)  # two images, four expressions: one pass of two rows
    chosen, _, _ = _by_hand(stock_sam3, batch)
    torch.testing.assert_close(logits, chosen, atol=1e-5, rtol=1e-4)  # the cached features change nothing


def test_union_selection_keeps_every_instance_above_the_threshold(stock_sam3, make_scene):
    model = Sam3ReferringModel.from_pretrained(stock_sam3).eval()
    processor = Sam3ReferringProcessor.from_pretrained(stock_sam3)
    batch = processor(images=make_scene(width=61, height=47), text=["the red circle", "the blue square"])
    batch.pop("original_sizes")
    chosen, masks, scores = _by_hand(stock_sam3, batch)
    model.config.referring_selection = "union"
    cut = float(scores.median())
    model.config.instance_threshold = cut
    with torch.no_grad():
        union = model(**batch).logits
    for row in range(2):
        kept = masks[row][scores[row] > cut]
        expected = torch.maximum(chosen[row], kept.amax(dim=0)) if len(kept) else chosen[row]
        torch.testing.assert_close(union[row], expected, atol=1e-5, rtol=1e-4)
    assert (union >= chosen - 1e-5).all() and (union > chosen + 1e-3).any()  # more than the best instance


def test_select_referring_mask_by_hand():
    masks = torch.tensor([[[[1.0]], [[5.0]], [[3.0]]]])  # (1, 3, 1, 1)
    scores = torch.tensor([[0.2, 0.1, 0.9]])
    assert select_referring_mask(masks, scores).item() == 3.0  # the best-scoring instance, not the largest logit
    assert select_referring_mask(masks, scores, selection="union", instance_threshold=0.15).item() == 3.0
    assert select_referring_mask(masks, scores, selection="union", instance_threshold=0.05).item() == 5.0
    assert select_referring_mask(masks, scores, selection="union", instance_threshold=0.95).item() == 3.0
    with pytest.raises(ValueError, match="selection"):
        select_referring_mask(masks, scores, selection="all")
    with pytest.raises(ValueError, match="scores"):
        select_referring_mask(masks, scores[:, :2])
    with pytest.raises(ValueError, match="labels"):
        Sam3ReferringModel(tiny_sam3_config())(pixel_values=torch.zeros(1, 3, SIZE, SIZE),
                                               input_ids=torch.zeros(1, 4, dtype=torch.long),
                                               labels=torch.zeros(1, SIZE, SIZE))
