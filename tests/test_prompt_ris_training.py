"""Prompt-RIS through the training script: the grouped sampler's batches, both stages, exact resume across
the stage boundary, checkpoints holding only what trains, the coarse stage judged by its coarse map, and the
paper configs' settings."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
CONFIGS = REPO / "scripts" / "configs"
OWN_PREFIXES = ("cross_modal_prompting.", "decoder.", "text_prompter.")

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(args, timeout=400):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _final_weights(output_dir):
    from transformers import AutoModel

    import refseg  # noqa: F401

    return AutoModel.from_pretrained(output_dir).trainable_state_dict()


@pytest.mark.slow
def test_prompt_ris_trains_both_stages_and_resumes_exactly(tiny_backbones, refshapes_root, tmp_path):
    out = tmp_path / "run"
    # 2 images x b = 2 sentences per batch; the checkpoint at step 2 is the end of the coarse stage
    args = ["--method", "prompt_ris", "--preset", "prompt-ris-tiny", "--clip", str(tiny_backbones["clip"]),
            "--sam", str(tiny_backbones["sam"]), "--dataset", "refshapes", "--data_root", str(refshapes_root),
            "--output_dir", str(out), "--seed", "3", "--per_device_train_batch_size", "4",
            "--sentences_per_image", "2", "--stages", "coarse:2,end_to_end:2", "--stage_unit", "steps",
            "--optimizer", "adamw", "--learning_rate", "1e-3", "--lr_scheduler", "polynomial", "--lr_power", "0.9",
            "--eval_splits", "val", "--eval_steps", "1", "--max_eval_samples", "4", "--report_to", "none",
            "--checkpointing_steps", "2"]
    log = _run(args)
    # evaluation while `coarse` trains scores the coarse map; after `end_to_end`, SAM's mask
    assert re.search(r"step 1 val \[coarse_logits\]", log), log[-3000:]
    assert re.search(r"step 3 val \[logits\]", log), log[-3000:]
    record = json.loads((out / "eval_results.json").read_text())
    assert record["scored_output"] == "logits"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stage"] == "coarse"
    # a checkpoint holds Prompt-RIS's own modules (and the tiny preset's SAM decoder), never CLIP or SAM's encoder
    at_two = load_file(str(out / "checkpoint-2" / "method_weights.safetensors"))
    assert any(k.startswith("text_prompter.") for k in at_two)
    assert not any(k.startswith(("clip.", "sam.vision_encoder.")) for k in at_two)
    assert all(k.startswith(OWN_PREFIXES + ("sam.mask_decoder.", "sam.prompt_encoder.mask_embed.")) for k in at_two)
    uninterrupted = _final_weights(out)
    assert uninterrupted.keys() == at_two.keys()
    # the coarse stage leaves the text prompter alone; end_to_end trains it
    moved = [k for k in at_two if not torch.equal(uninterrupted[k], at_two[k])]
    assert any(k.startswith("text_prompter.") for k in moved) and any(k.startswith("decoder.") for k in moved)

    shutil.rmtree(out / "checkpoint-4")
    for f in out.glob("*.safetensors"):
        f.unlink()
    _run(args + ["--resume_from_checkpoint", "latest"])
    resumed = _final_weights(out)
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


@pytest.mark.parametrize("dataset, split_by, eval_splits",
                         [("refcoco", "unc", "val,testA,testB"), ("refcoco+", "unc", "val,testA,testB"),
                          ("refcocog", "umd", "val,test")])
def test_paper_configs_carry_the_papers_settings(dataset, split_by, eval_splits):
    from train_args import parse_args

    from refseg.presets import get_config
    from refseg.training import get_method
    from refseg.training.schedules import StagePlan, parse_stages, staged_lr_lambda

    model_args, data_args, args = parse_args(["--config", str(CONFIGS / f"prompt-ris-b_{dataset}.yaml")])
    assert (model_args.method, model_args.preset) == ("prompt_ris", "prompt-ris-b")
    assert (data_args.dataset, data_args.split_by, data_args.eval_splits) == (dataset, split_by, eval_splits)
    assert data_args.augment is False
    # Sec. 4.2: 16 images x b = 4 sentences, AdamW 1e-4, polynomial power 0.9, 20 + 30 epochs
    assert (args.optimizer, args.learning_rate, args.global_batch_size) == ("adamw", 1e-4, 64)
    assert (args.sentences_per_image, args.lr_scheduler, args.lr_power) == (4, "polynomial", 0.9)
    assert args.per_device_train_batch_size % args.sentences_per_image == 0
    assert parse_stages(args.stages) == {"coarse": 20, "end_to_end": 30} and args.stage_unit == "epochs"
    assert get_method("prompt_ris").stage_epochs(50) == {"coarse": 20, "end_to_end": 30}
    assert get_method("prompt_ris").sampler == "grouped_by_image"
    # one polynomial decay over the whole run: end_to_end does not restart it
    assert args.lr_schedule_scope == "run"
    scale = staged_lr_lambda(StagePlan(names=("coarse", "end_to_end"), steps=(200, 300)), kind="polynomial",
                             power=args.lr_power, scope=args.lr_schedule_scope)
    assert scale(0) == 1.0 and scale(250) == pytest.approx(0.5 ** 0.9) and scale(200) == pytest.approx(0.6 ** 0.9)
    config = get_config(model_args.preset)
    assert (config.image_size, config.grid_size, config.sam_image_size, config.num_prompt_tokens) == (480, 30, 1024, 16)
    assert config.train_sam_decoder is False  # SAM frozen, as in the paper


def test_the_training_processor_follows_the_model_config(tiny_backbones):
    """`build_model_and_processor` hands the processor the config's CLIP and SAM input sizes, word length and
    threshold (the benchmark's random paper-scale model relies on it too)."""
    from types import SimpleNamespace

    from PIL import Image

    from refseg.training import get_method
    from refseg.training.modeling import build_model_and_processor

    args = SimpleNamespace(preset="prompt-ris-tiny", model_name_or_path=None, clip=str(tiny_backbones["clip"]),
                           sam=str(tiny_backbones["sam"]),
                           config_overrides=json.dumps({"word_length": 12, "threshold": 0.4, "image_size": 96}))
    model, processor = build_model_and_processor(get_method("prompt_ris"), args)
    assert (processor.word_length, processor.threshold, processor.image_size) == (12, 0.4, 96)
    assert processor.sam_image_size == processor.padded_input_size == model.config.sam_image_size == 256
    encoded = processor(images=Image.new("RGB", (20, 30)), text="the red circle")
    assert encoded["input_ids"].shape[-1] == 12 and encoded["pixel_values"].shape[-1] == 96
    assert encoded["sam_pixel_values"].shape[-1] == 256
