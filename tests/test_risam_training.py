"""RISAM through the training script (exact resume, heads-only checkpoints), its YAML configs with the
paper's settings, and export with remote code (loads without refseg, same logits)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import randomise_parameters

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
CONFIGS = REPO / "scripts" / "configs"
HEAD_PREFIXES = ("feature_enhancement.", "mutual_attention.", "mask_decoder.")

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
def test_risam_resumes_exactly_and_checkpoints_only_its_heads(tiny_backbones, refshapes_root, tmp_path):
    out = tmp_path / "run"
    args = ["--method", "risam", "--preset", "risam-tiny", "--sam", str(tiny_backbones["sam"]),
            "--clip", str(tiny_backbones["clip"]), "--dataset", "refshapes", "--data_root", str(refshapes_root),
            "--output_dir", str(out), "--seed", "3", "--per_device_train_batch_size", "4", "--stages", "default:4",
            "--stage_unit", "steps", "--optimizer", "adam", "--learning_rate", "1e-3", "--lr_scheduler", "step",
            "--lr_milestones", "0.75", "--eval_splits", "", "--report_to", "none", "--checkpointing_steps", "2"]
    _run(args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", map_location="cpu", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == pytest.approx([1e-3])  # before the milestone
    # a checkpoint holds the heads (their BatchNorm statistics included), never a frozen encoder tensor
    at_two = load_file(str(out / "checkpoint-2" / "method_weights.safetensors"))
    assert at_two and all(k.startswith(HEAD_PREFIXES) for k in at_two)
    assert any(k.endswith("running_mean") for k in at_two)
    uninterrupted = _final_weights(out)
    assert uninterrupted.keys() == at_two.keys()
    assert any(not torch.equal(uninterrupted[k], at_two[k]) for k in at_two)  # steps 3-4 moved the weights

    shutil.rmtree(out / "checkpoint-4")
    for f in out.glob("*.safetensors"):
        f.unlink()
    _run(args + ["--resume_from_checkpoint", "latest"])
    resumed = _final_weights(out)
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


@pytest.mark.parametrize("dataset, split_by, word_length, eval_splits",
                         [("refcoco", "unc", 17, "val,testA,testB"), ("refcoco+", "unc", 25, "val,testA,testB"),
                          ("refcocog", "umd", 25, "val,test")])
def test_paper_configs_carry_the_papers_settings(dataset, split_by, word_length, eval_splits):
    from train_args import parse_args

    from refseg.presets import get_config
    from refseg.training.modeling import parse_config_overrides
    from refseg.training.schedules import StagePlan, staged_lr_lambda

    model_args, data_args, args = parse_args(["--config", str(CONFIGS / f"risam-h_{dataset}.yaml")])
    assert (model_args.method, model_args.preset) == ("risam", "risam-h")
    overrides = parse_config_overrides(model_args.config_overrides)
    assert overrides == {"word_length": word_length}
    assert (data_args.dataset, data_args.split_by, data_args.eval_splits) == (dataset, split_by, eval_splits)
    assert data_args.augment is False  # the paper mentions none
    assert (args.optimizer, args.learning_rate, args.num_epochs, args.global_batch_size) == ("adam", 1e-4, 50, 32)
    assert (args.lr_scheduler, args.lr_milestones, args.lr_gamma, args.weight_decay) == ("step", "0.6,0.84", 0.1, 0.0)
    assert args.stages is None  # one stage over all 50 epochs
    # the milestones fall on the 30th and 42nd epochs: 1e-4 until then, 1e-5, then 1e-6
    steps_per_epoch = 7
    milestones = [float(m) for m in args.lr_milestones.split(",")]
    scale = staged_lr_lambda(StagePlan(names=("default",), steps=(50 * steps_per_epoch,)), kind="step",
                             milestones=milestones, gamma=args.lr_gamma)
    epoch_start = [scale(e * steps_per_epoch) for e in range(50)]
    assert epoch_start == pytest.approx([1.0] * 30 + [0.1] * 12 + [0.01] * 8)
    assert scale(30 * steps_per_epoch - 1) == 1.0 and scale(42 * steps_per_epoch - 1) == pytest.approx(0.1)
    # the paper-scale config takes the overrides: ViT-H's 2nd-4th global blocks, the paper's threshold
    config = get_config(model_args.preset, **overrides)
    assert config.word_length == word_length and config.feature_layers == [15, 23, 31]
    assert config.threshold == 0.35 and config.relevance_threshold == 0.35


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
segmenter = pipeline("referring-image-segmentation", model=folder, trust_remote_code=True)
results = segmenter(Image.open(image_path), text=texts)
save_file({"logits": logits}, out_path)
print(json.dumps({"classes": [type(model).__module__, type(processor).__module__],
                  "refseg": sorted(m for m in sys.modules if m.startswith("refseg")),
                  "mask_sizes": [list(r["mask"].size) for r in results]}))
'''


def test_export_with_remote_code_loads_without_refseg(tiny_backbones, tmp_path, make_scene):
    from refseg import RisamModel, RisamProcessor
    from refseg.hub import export
    from refseg.presets import PRESETS

    # A fresh tiny RISAM whose heads are all moved off their initial values (weights and BatchNorm statistics),
    # so that a weight the remote loader re-initialised instead of loading would change the logits. (The
    # trained `trained_on_two_referents("risam")` would do too, at about a minute of training.)
    sam, clip = tiny_backbones["sam"], tiny_backbones["clip"]
    torch.manual_seed(0)
    model = RisamModel.from_backbones(sam=sam, clip=clip, **PRESETS["risam-tiny"].config_overrides)
    processor = RisamProcessor.from_backbones(sam=sam, clip=clip)
    for name in ("feature_enhancement", "mutual_attention", "mask_decoder"):
        randomise_parameters(getattr(model, name), seed=1, std=0.2)
    generator = torch.Generator().manual_seed(2)
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + (0.5 if name.endswith("var") else -0.5))
    model.eval()

    out = export(model, processor, tmp_path / "risam-tiny", repo_id="refseg-test/risam-tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_risam.RisamConfig",
                                  "AutoModel": "modeling_risam.RisamModel"}
    assert {"modeling_risam.py", "modeling_risam_heads.py", "processing_risam.py"} <= {p.name for p in out.iterdir()}

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
    inputs = processor(images=Image.open(tmp_path / "scene.png"), text=texts, return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the two expressions give two maps
    torch.testing.assert_close(load_file(tmp_path / "remote.safetensors")["logits"], logits, atol=1e-6, rtol=0)


def test_the_training_processor_follows_the_model_config(tiny_backbones):
    """`build_model_and_processor` hands the processor the config's input size, word length and threshold."""
    from types import SimpleNamespace

    from refseg.training import get_method
    from refseg.training.modeling import build_model_and_processor

    args = SimpleNamespace(preset="risam-tiny", model_name_or_path=None, sam=str(tiny_backbones["sam"]),
                           clip=str(tiny_backbones["clip"]),
                           config_overrides=json.dumps({"word_length": 25, "threshold": 0.4}))
    model, processor = build_model_and_processor(get_method("risam"), args)
    assert (model.config.word_length, model.config.threshold) == (25, 0.4)
    assert (processor.word_length, processor.threshold) == (25, 0.4)
    assert processor.image_size == model.config.image_size == 256
    assert processor(images=Image.new("RGB", (20, 30)), text="the red circle")["input_ids"].shape[-1] == 25
