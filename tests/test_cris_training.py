"""CRIS through the training script (exact resume, the backbone's 0.1x group in the saved optimizer), its
YAML configs, and export with remote code (loads without refseg, same logits)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
CONFIGS = REPO / "scripts" / "configs"

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _final_weights(output_dir):
    from transformers import AutoModel

    import refseg  # noqa: F401

    return AutoModel.from_pretrained(output_dir).trainable_state_dict()


@pytest.mark.slow
def test_cris_resumes_exactly_and_checkpoints_its_two_learning_rates(tiny_backbones, refshapes_root, tmp_path):
    out = tmp_path / "run"
    args = ["--method", "cris", "--preset", "cris-tiny", "--clip", str(tiny_backbones["clip"]),
            "--dataset", "refshapes", "--data_root", str(refshapes_root), "--output_dir", str(out), "--seed", "3",
            "--per_device_train_batch_size", "4", "--stages", "default:4", "--stage_unit", "steps",
            "--optimizer", "adam", "--learning_rate", "1e-3", "--lr_scheduler", "step", "--lr_milestones", "0.75",
            "--eval_splits", "", "--report_to", "none", "--checkpointing_steps", "2",
            "--config_overrides", json.dumps({"decoder_dropout": 0.1})]
    # With dropout the forward draws from the global RNG: exact only if nothing else (such as building the
    # DataLoader iterator after a resume) draws from it in between (train.py gives the loader its own generator).
    _run(args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", map_location="cpu", weights_only=True)
    rates = {group["name"]: group["lr"] for group in optimizer["param_groups"]}
    assert rates == pytest.approx({"heads": 1e-3, "backbone": 1e-4})  # step 2 of 4: before the milestone (step 3)
    uninterrupted = _final_weights(out)
    assert any(k.startswith("clip.") for k in uninterrupted)  # the fine-tuned CLIP is part of the weights

    shutil.rmtree(out / "checkpoint-4")
    for f in out.glob("*.safetensors"):
        f.unlink()
    _run(args + ["--resume_from_checkpoint", "latest"])
    resumed = _final_weights(out)
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


@pytest.mark.parametrize("dataset, split_by, word_length", [("refcoco", "unc", 17), ("refcoco+", "unc", 17),
                                                             ("refcocog", "umd", 22)])
def test_paper_configs_carry_the_papers_settings(dataset, split_by, word_length):
    from train_args import parse_args

    from refseg.training.modeling import parse_config_overrides

    model_args, data_args, args = parse_args(["--config", str(CONFIGS / f"cris-b_{dataset}.yaml")])
    assert (model_args.method, model_args.preset) == ("cris", "cris-b")
    # the authors' protocol (docs/cris.md, "Differences from the authors' code"): letterbox, soft targets,
    # position embeddings at the base rate, fp16, SyncBatchNorm, the best val mIoU kept
    assert parse_config_overrides(model_args.config_overrides) == {
        "word_length": word_length, "resize_mode": "letterbox", "mask_resample": "bilinear",
        "backbone_position_embeddings_at_base_rate": True}
    assert (args.mixed_precision, args.sync_batch_norm, args.best_metric) == ("fp16", True, "val/mIoU")
    assert args.max_grad_norm == 0.0
    assert (data_args.dataset, data_args.split_by) == (dataset, split_by)
    assert (args.optimizer, args.learning_rate, args.num_epochs, args.global_batch_size) == ("adam", 1e-4, 50, 64)
    assert (args.lr_scheduler, args.lr_milestones, args.lr_gamma, args.weight_decay) == ("step", "0.7", 0.1, 0.0)
    assert args.stages is None  # one stage over all 50 epochs


def test_quickstart_config_parses():
    from train_args import parse_args

    model_args, _, args = parse_args(["--config", str(CONFIGS / "quickstart_cris.yaml")])
    assert (model_args.method, model_args.preset, args.optimizer) == ("cris", "cris-tiny", "adam")


REMOTE = r'''
import importlib.abc, json, sys

class RefuseRefseg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "refseg" or name.startswith("refseg."):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, RefuseRefseg())
import torch
from PIL import Image
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor, pipeline

folder, image_path, out_path = sys.argv[1:4]
texts = json.loads(sys.argv[4])
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=Image.open(image_path), text=texts, return_tensors="pt")
inputs.pop("original_sizes")
with torch.no_grad():
    logits = model(**inputs).logits
results = pipeline("referring-image-segmentation", model=folder, trust_remote_code=True)(Image.open(image_path), text=texts)
save_file({"logits": logits}, out_path)
print(json.dumps({"classes": [type(model).__module__, type(processor).__module__],
                  "refseg": sorted(m for m in sys.modules if m.startswith("refseg")),
                  "mask_sizes": [list(r["mask"].size) for r in results]}))
'''


def test_export_with_remote_code_loads_without_refseg(trained_on_two_referents, tmp_path, make_scene):
    from safetensors.torch import load_file

    from refseg.hub import export

    model, processor, _ = trained_on_two_referents("cris")
    out = export(model, processor, tmp_path / "cris-tiny", card_data="cris-tiny", repo_id="refseg-test/cris-tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_cris.CrisConfig", "AutoModel": "modeling_cris.CrisModel"}
    assert {"modeling_cris.py", "modeling_cris_heads.py", "processing_cris.py"} <= {p.name for p in out.iterdir()}

    texts = ["the red circle", "the blue square"]
    image = make_scene()
    image.save(tmp_path / "scene.png")
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(out), str(tmp_path / "scene.png"),
                           str(tmp_path / "remote.safetensors"), json.dumps(texts)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["refseg"] == [] and all(c.startswith("transformers_modules.") for c in report["classes"])
    assert report["mask_sizes"] == [[61, 47]] * 2  # PIL (width, height) of the scene
    inputs = processor(images=image, text=texts, return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(load_file(tmp_path / "remote.safetensors")["logits"], logits, atol=1e-6, rtol=0)


def test_the_training_processor_follows_the_model_config(tiny_backbones):
    """`build_model_and_processor` hands the processor the config's word length and threshold (RefCOCOg: 22)."""
    from types import SimpleNamespace

    from refseg.training import get_method
    from refseg.training.modeling import build_model_and_processor

    args = SimpleNamespace(preset="cris-tiny", model_name_or_path=None, clip=str(tiny_backbones["clip"]),
                           config_overrides=json.dumps({"word_length": 22, "threshold": 0.4}))
    model, processor = build_model_and_processor(get_method("cris"), args)
    assert (processor.word_length, processor.threshold) == (model.config.word_length, model.config.threshold) == (22, 0.4)
    assert processor(images=Image.new("RGB", (20, 30)), text="the red circle")["input_ids"].shape[-1] == 22
