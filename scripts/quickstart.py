#!/usr/bin/env python
"""The whole package in one command, on a CPU, offline.

    python scripts/quickstart.py [--workdir refseg-quickstart]

1. generates RefShapes (the procedural RefCOCO-format dataset) in <workdir>/data;
2. builds a tiny CLIP (and its BPE tokenizer) locally in <workdir>/backbones — no download;
3. pretrains that tiny CLIP contrastively on RefShapes object crops (a stand-in for the web-scale
   pretraining a real CLIP checkpoint brings; cached in <workdir>/backbones/clip-pretrained);
4. trains the tiny RISCLIP with scripts/train.py and scripts/configs/quickstart.yaml (CLIP frozen,
   Locator stage then Refiner stage), evaluates val, testA, testB and unseen;
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

from refseg.backbones import save_tiny_backbones
from refseg.data import make_refshapes
from refseg.training.clip_pretraining import pretrain_clip
from refseg.training.evaluation import format_results_table

_SCRIPTS = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="refseg-quickstart", help="where data, backbones and the model go")
    p.add_argument("--num_images", type=int, default=1000, help="RefShapes images to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip_pretraining_steps", type=int, default=800)
    p.add_argument("--config", default=str(_SCRIPTS / "configs" / "quickstart.yaml"))
    p.add_argument("train_overrides", nargs="*", help="extra `--key value` flags for scripts/train.py (after --)")
    return p.parse_args(argv)


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

    print("[3/4] training the tiny RISCLIP (CLIP frozen)")
    results = train.main(["--config", args.config, "--clip", str(clip), "--data_root", str(data),
                          "--output_dir", str(work / "model"), "--seed", str(args.seed), *args.train_overrides])

    print(f"[4/4] RefShapes results of {work / 'model'} (percent; {time.time() - t0:.0f} s in all):")
    print(format_results_table(results))
    if "val" in results:
        print("val by kind of expression (scripts/evaluate.py --by_kind):")
        _evaluate_script().main(["--model", str(work / "model"), "--data_root", str(data), "--split", "val",
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
