"""The CLIPSeg baseline: a stock CLIPSeg folder through the pipeline and evaluation, and `METHODS["clipseg"]`
through `scripts/train.py` (only the decoder changes, exact resume)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoModel, CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegModel, CLIPSegProcessor, CLIPTokenizer,
    ViTImageProcessor, pipeline,
)

import refseg  # noqa: F401  (registers the task and the baselines)
from refseg.backbones import tiny_clip_config
from refseg.baselines import (
    DEFAULT_THRESHOLD, ClipsegReferringModel, ClipsegReferringProcessor, load_referring_model_and_processor,
)
from refseg.pipelines import TASK

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64  # the tiny CLIPSeg's square input


def save_stock_clipseg(folder, clip_folder, seed=0):
    """A folder like `CIDAS/clipseg-rd64-refined`, tiny and random: written by the *stock* classes
    (`CLIPSegForImageSegmentation`, `CLIPSegProcessor` with a `ViTImageProcessor` resizing to a square),
    so its config names `CLIPSegForImageSegmentation` and holds no refseg field."""
    clip = tiny_clip_config()
    config = CLIPSegConfig(text_config=clip.text_config.to_dict(), vision_config=clip.vision_config.to_dict(),
                           projection_dim=clip.projection_dim, extract_layers=[1, 2, 3], reduce_dim=32,
                           decoder_num_attention_heads=4, decoder_intermediate_size=64)
    torch.manual_seed(seed)
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    image_processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.48, 0.46, 0.41],
                                        image_std=[0.27, 0.26, 0.28])
    CLIPSegProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(clip_folder)
                     ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock_clipseg(tiny_backbones, tmp_path_factory):
    return save_stock_clipseg(tmp_path_factory.mktemp("clipseg-stock"), tiny_backbones["clip"])


def _stock_probabilities(folder, image, texts):
    """What the stock model gives, by hand: stock processor + stock model, sigmoid, bilinear to the image size."""
    processor = CLIPSegProcessor.from_pretrained(folder)
    model = CLIPSegForImageSegmentation.from_pretrained(folder).eval()
    inputs = processor(images=[image] * len(texts), text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    up = F.interpolate(logits[:, None], size=(image.height, image.width), mode="bilinear", align_corners=False)
    return logits.sigmoid(), up[:, 0].sigmoid()


def test_the_pipeline_serves_a_stock_clipseg_folder(stock_clipseg, make_scene):
    # `AutoModel` would give CLIPSegModel (no decoder); the task loads the segmentation head
    assert type(AutoModel.from_pretrained(stock_clipseg)) is CLIPSegModel
    segmenter = pipeline(TASK, model=str(stock_clipseg))
    assert type(segmenter.model) is ClipsegReferringModel
    assert isinstance(segmenter.processor, ClipsegReferringProcessor)
    assert segmenter.processor.threshold == DEFAULT_THRESHOLD == 0.5 and segmenter.processor.image_size == SIZE

    image = make_scene(width=61, height=47)
    texts = ["the red circle", "the blue square"]
    results = segmenter(image, text=texts)
    low, full = _stock_probabilities(stock_clipseg, image, texts)
    assert [r["text"] for r in results] == texts
    for result, small, probability in zip(results, low, full):
        mask = np.asarray(result["mask"])
        assert result["mask"].mode == "L" and result["mask"].size == image.size
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, (probability > 0.5).numpy())
        foreground = small > 0.5
        expected = float(small[foreground].mean()) if foreground.any() else 0.0
        assert result["score"] == pytest.approx(expected, abs=1e-6)


def test_the_threshold_is_configurable(stock_clipseg, make_scene):
    image = make_scene(width=61, height=47)
    _, full = _stock_probabilities(stock_clipseg, image, ["the red circle"])
    cut = float(full.median())  # a threshold that splits this random map in two
    segmenter = pipeline(TASK, model=str(stock_clipseg))
    masks = {t: np.asarray(segmenter(image, text="the red circle", threshold=t)[0]["mask"]) > 0
             for t in (cut - 0.01, cut + 0.01)}
    for t, mask in masks.items():
        np.testing.assert_array_equal(mask, (full[0] > t).numpy())
    assert masks[cut - 0.01].sum() > masks[cut + 0.01].sum()
    # the processor's own default, and a threshold recorded in the model config, are used when none is passed
    model, processor = load_referring_model_and_processor(stock_clipseg)
    assert processor.threshold == 0.5
    model.config.threshold = 0.3
    assert model.adapt_processor(CLIPSegProcessor.from_pretrained(stock_clipseg)).threshold == 0.3
    with pytest.raises(ValueError, match="threshold"):
        ClipsegReferringProcessor(processor.processor, threshold=1.5)


def test_without_presence_no_target_means_an_empty_mask(stock_clipseg, make_scene):
    """CLIPSeg has no presence output: the pipeline still answers `no_target`, from the mask alone, and the score
    keeps its meaning (mean foreground probability; 0.0 for an empty mask). The second row's logits are forced
    to -20 (nothing predicted) by a forward hook."""
    segmenter = pipeline(TASK, model=str(stock_clipseg))
    image = make_scene(width=61, height=47)
    texts = ["the red circle", "the blue square"]
    inputs = segmenter.processor(images=image, text=texts)
    inputs.pop("original_sizes")
    with torch.no_grad():
        assert segmenter.model(**inputs).no_target_logits is None

    def hook(_module, _args, output):
        output.logits = torch.cat([output.logits[:1], torch.full_like(output.logits[1:], -20.0)])
        return output

    handle = segmenter.model.register_forward_hook(hook)
    try:
        found, missing = segmenter(image, text=texts)
    finally:
        handle.remove()
    assert set(found) == set(missing) == {"score", "label", "mask", "no_target", "text"}
    assert np.asarray(found["mask"]).any() and found["no_target"] is False and found["score"] > 0.5
    assert not np.asarray(missing["mask"]).any() and missing["no_target"] is True and missing["score"] == 0.0


def test_the_processor_pairs_images_and_texts_and_resizes_masks(stock_clipseg, make_scene):
    processor = ClipsegReferringProcessor.from_pretrained(stock_clipseg)
    image = make_scene(width=61, height=47)
    mask = np.zeros((47, 61), dtype=bool)
    mask[10:30, 5:40] = True
    batch = processor(images=image, text=["the red circle", "the blue square on the left"], masks=[mask, ~mask])
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == 2
    assert batch["original_sizes"].tolist() == [[47, 61], [47, 61]]
    assert batch["labels"].shape == (2, SIZE, SIZE) and set(batch["labels"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(batch["labels"][0] + batch["labels"][1], torch.ones(SIZE, SIZE))
    with pytest.raises(ValueError, match="text"):
        processor(images=image, text="")
    with pytest.raises(ValueError, match="masks"):
        processor(images=image, text="the red circle", masks=np.zeros((5, 5), dtype=bool))


def test_evaluate_py_scores_a_stock_clipseg(stock_clipseg, refshapes_root, tmp_path):
    import importlib.util
    from pathlib import Path

    script_path = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("refseg_evaluate_clipseg", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "clipseg.json"
    results = script.main(["--model", str(stock_clipseg), "--data_root", str(refshapes_root), "--split", "val",
                           "--max_samples", "5", "--batch_size", "3", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["results"] == results and results["val"]["num_samples"] == 5
    assert (record["dataset"], record["scored_output"]) == ("refshapes", "logits")
    everything = script.main(["--model", str(stock_clipseg), "--data_root", str(refshapes_root), "--split", "val",
                              "--max_samples", "5", "--threshold", "0.01", "--output", str(tmp_path / "low.json")])
    # a threshold near 0 makes every pixel foreground on this random model: the metric must see it
    assert everything["val"]["mIoU"] != results["val"]["mIoU"]


# ------------------------------------------------------------------ fine-tuning through scripts/train.py
def _train_args(tiny_backbones, refshapes_root, out, steps):
    return ["--method", "clipseg", "--preset", "clipseg-tiny", "--clip", str(tiny_backbones["clip"]),
            "--dataset", "refshapes", "--data_root", str(refshapes_root), "--output_dir", str(out), "--seed", "1",
            "--per_device_train_batch_size", "4", "--stages", f"default:{steps}", "--stage_unit", "steps",
            "--learning_rate", "1e-3", "--eval_splits", "", "--report_to", "none", "--checkpointing_steps", "2"]


def test_train_py_fine_tunes_only_the_decoder_and_resumes_exactly(tiny_backbones, refshapes_root, tmp_path):
    import shutil

    import train
    from safetensors.torch import load_file
    from transformers import CLIPModel

    out = tmp_path / "run"
    train.main(_train_args(tiny_backbones, refshapes_root, out, steps=4))
    trained = ClipsegReferringModel.from_pretrained(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    kept = load_file(str(out / "checkpoint-2" / "method_weights.safetensors"))
    assert kept and all(k.startswith("decoder.") for k in kept)  # checkpoints keep only the decoder

    trained.set_training_stage("default")  # what the optimizer holds: the decoder alone
    assert {n.split(".")[0] for n, p in trained.named_parameters() if p.requires_grad} == {"decoder"}
    stock_clip = CLIPModel.from_pretrained(tiny_backbones["clip"]).state_dict()
    for name, value in trained.clip.state_dict().items():
        assert torch.equal(value, stock_clip[name]), name  # CLIP frozen: still the tiny CLIP
    halfway = {k[len("decoder."):]: v for k, v in kept.items()}
    changed = [n for n, v in trained.decoder.state_dict().items() if not torch.equal(v, halfway[n])]
    assert changed, "the decoder did not train between steps 2 and 4"
    # the folder loads back as a referring model with its processor, at the trained size
    model, processor = load_referring_model_and_processor(out)
    assert type(model) is ClipsegReferringModel and processor.image_size == 64

    uninterrupted = trained.trainable_state_dict()
    shutil.rmtree(out / "checkpoint-4")
    for f in out.glob("*.safetensors"):
        f.unlink()
    train.main(_train_args(tiny_backbones, refshapes_root, out, steps=4) + ["--resume_from_checkpoint", "latest"])
    resumed = ClipsegReferringModel.from_pretrained(out).trainable_state_dict()
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


def test_clipseg_configs_parse_as_train_configs():
    from pathlib import Path

    from train_args import parse_args

    configs = Path(__file__).resolve().parents[1] / "scripts" / "configs"
    model_args, data_args, args = parse_args(["--config", str(configs / "clipseg-tiny_refshapes.yaml")])
    assert (model_args.method, model_args.preset, data_args.dataset) == ("clipseg", "clipseg-tiny", "refshapes")
    model_args, data_args, args = parse_args(["--config", str(configs / "clipseg-rd64_refcoco.yaml")])
    assert (model_args.method, model_args.model_name_or_path) == ("clipseg", "CIDAS/clipseg-rd64-refined")
    assert data_args.dataset == "refcoco"


def test_a_processor_without_a_square_size_needs_image_size(stock_clipseg):
    stock = CLIPSegProcessor.from_pretrained(stock_clipseg)
    stock.image_processor.size = {"shortest_edge": 40, "longest_edge": 80}
    assert ClipsegReferringProcessor(stock).image_size == 40
    stock.image_processor.size = {"height": 32, "width": 48}
    with pytest.raises(ValueError, match="image_size"):
        ClipsegReferringProcessor(stock)
    assert ClipsegReferringProcessor(stock, image_size=48).image_size == 48
    with pytest.raises(ValueError, match="`processor` must be a CLIPSegProcessor"):
        ClipsegReferringProcessor(object())
    for threshold in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            ClipsegReferringProcessor(stock, image_size=48, threshold=threshold)
    assert ClipsegReferringProcessor(stock, image_size=48).threshold == DEFAULT_THRESHOLD
    assert ClipsegReferringProcessor(stock, image_size=48, threshold=0.2).threshold == 0.2
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="unexpected"):
        ClipsegReferringProcessor(stock, image_size=48)(images=image, text="x", padding="max_length")
