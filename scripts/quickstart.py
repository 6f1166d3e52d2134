#!/usr/bin/env python
"""The whole package in one command, on a CPU, offline.

    python scripts/quickstart.py [--workdir refseg-quickstart] [--method risclip|cris]

1. generates RefShapes (the procedural RefCOCO-format dataset) in <workdir>/data;
2. builds a tiny CLIP (and its BPE tokenizer) locally in <workdir>/backbones — no download;
3. pretrains that tiny CLIP contrastively on RefShapes object crops (a stand-in for the web-scale
   pretraining a real CLIP checkpoint brings; cached in <workdir>/backbones/clip-pretrained);
4. trains the method's tiny model with scripts/train.py and its quickstart config
   (`QUICKSTART_CONFIGS`: RISCLIP, the default, with CLIP frozen, Locator stage then Refiner stage),
   printing first how many steps each stage runs; evaluates val, testA, testB and unseen;
5. prints the metric table, then val broken down by kind of expression (scripts/evaluate.py
   --by_kind). The model lands in <workdir>/model (the Gradio Space's default).
Every step that is already done is reused on a second run.
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import json
import logging
import time
from pathlib import Path

import train
import yaml

from refseg.backbones import save_tiny_backbones
from refseg.data import make_refshapes
from refseg.training.clip_pretraining import pretrain_clip
from refseg.training.evaluation import format_results_table
from refseg.training.schedules import parse_stages

_SCRIPTS = Path(__file__).resolve().parent
# method -> its quickstart config under scripts/configs/
QUICKSTART_CONFIGS = {"risclip": "quickstart.yaml", "cris": "quickstart_cris.yaml"}
DEFAULT_METHOD = "risclip"  # its model lands in <workdir>/model (the Space's default); others in model-<method>


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="refseg-quickstart", help="where data, backbones and the model go")
    p.add_argument("--num_images", type=int, default=1000, help="RefShapes images to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip_pretraining_steps", type=int, default=800)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(QUICKSTART_CONFIGS),
                   help="which tiny model to train (its config: scripts/configs/" + ", ".join(
                       f"{m} -> {c}" for m, c in sorted(QUICKSTART_CONFIGS.items())) + ")")
    p.add_argument("--config", default=None, help="train.py YAML config (default: the method's quickstart config)")
    p.add_argument("train_overrides", nargs="*", help="extra `--key value` flags for scripts/train.py (after --)")
    args = p.parse_args(argv)
    if args.config is None:
        args.config = str(_SCRIPTS / "configs" / QUICKSTART_CONFIGS[args.method])
    return args


def stage_plan(config_path, train_overrides) -> str:
    """`"locator 1200 steps, refiner 400 steps"`: the `stages` a run of `config_path` with the extra
    `train.py` flags `train_overrides` trains (the last `--stages` / `--stage_unit` flag wins)."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    stages, unit = config.get("stages"), config.get("stage_unit", "epochs")
    for flag, value in zip(train_overrides, train_overrides[1:]):
        if flag == "--stages":
            stages = value
        elif flag == "--stage_unit":
            unit = value
    if not stages:
        return f"{config.get('num_epochs', 1)} epoch(s), split into the method's stages"
    return ", ".join(f"{name} {length} {unit}" for name, length in parse_stages(stages).items())


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    work = Path(args.workdir)
    t0 = time.time()

    data = work / "data"
    if not (data / "refshapes" / "refs(unc).p").is_file():
        summary = make_refshapes(data, num_images=args.num_images, seed=args.seed)
        print(f"[1/4] RefShapes: {json.dumps(summary['splits'])}")
    else:
        print(f"[1/4] RefShapes: reusing {data}")

    backbones = work / "backbones"
    if not (backbones / "clip" / "config.json").is_file():
        save_tiny_backbones(backbones, seed=args.seed)
    clip = backbones / "clip-pretrained"
    if not (clip / "model.safetensors").is_file():
        print(f"[2/4] pretraining the tiny CLIP on RefShapes crops ({args.clip_pretraining_steps} steps)")
        pretrain_clip(backbones / "clip", data, clip, steps=args.clip_pretraining_steps, seed=args.seed)
    else:
        print(f"[2/4] tiny CLIP: reusing {clip}")

    print(f"[3/4] training the tiny {args.method} ({Path(args.config).name}): {stage_plan(args.config, args.train_overrides)}")
    model_dir = work / ("model" if args.method == DEFAULT_METHOD else f"model-{args.method}")
    results = train.main(["--config", args.config, "--clip", str(clip), "--data_root", str(data),
                          "--output_dir", str(model_dir), "--seed", str(args.seed), *args.train_overrides])

    print(f"[4/4] RefShapes results of {model_dir} (percent; {time.time() - t0:.0f} s in all):")
    print(format_results_table(results))
    if "val" in results:
        print("val by kind of expression (scripts/evaluate.py --by_kind):")
        _evaluate_script().main(["--model", str(model_dir), "--data_root", str(data), "--split", "val",
                                 "--by_kind"])
    return results


def _evaluate_script():
    """scripts/evaluate.py as a module (its file name is the `evaluate` package's, so load it by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refseg_evaluate_script", _SCRIPTS / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
