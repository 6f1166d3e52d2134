#!/usr/bin/env python
"""The whole package in one command, on a CPU, offline.

    python scripts/quickstart.py [--workdir refseg-quickstart] [--method risclip|cris|risam|prompt_ris] [--generalized]

1. generates RefShapes (the procedural RefCOCO-format dataset) in <workdir>/data;
2. builds a tiny CLIP (and its BPE tokenizer) and a tiny SAM locally in <workdir>/backbones — no
   download — and pretrains those the method builds on (`refseg.training.METHODS[m].backbones`) on
   RefShapes training images, a stand-in for the pretraining a real checkpoint brings: CLIP
   contrastively on object crops (cached in <workdir>/backbones/clip-pretrained), SAM with its
   promptable-segmentation objective on point and box prompts (<workdir>/backbones/sam-pretrained);
   `--clip_pretraining_steps 0` / `--sam_pretraining_steps 0` use the random tiny backbone instead;
3. trains the method's tiny model with scripts/train.py and its quickstart config
   (`QUICKSTART_CONFIGS`: RISCLIP, the default, with CLIP frozen, Locator stage then Refiner stage),
   printing first how many steps each stage runs; evaluates val, testA, testB and unseen;
4. prints the metric table, then val broken down by kind of expression (scripts/evaluate.py
   --by_kind). The model lands in <workdir>/model (the Gradio Space's default), or model-<method>.
Every step that is already done is reused on a second run (a pretrained backbone whatever its step count).

`--generalized`: generalized referring segmentation instead. Step 1 also writes generalized RefShapes
(<workdir>/data/grefshapes: gRefCOCO's format, expressions naming several shapes or none; `refshapes/` and the
images stay the same, so backbones pretrained on them are reused); step 3 trains the method's tiny `-g` preset
(its presence head on) with the same quickstart config and schedule (`generalized_flags`), into
<workdir>/model-<method>-g; step 4 prints gIoU, cIoU, N-acc, T-acc and precision@X per split (no by-kind table).
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import train
import yaml

from refseg.backbones import save_tiny_backbones
from refseg.data import make_refshapes
from refseg.training.clip_pretraining import pretrain_clip
from refseg.training.evaluation import format_results_table
from refseg.training.data import check_refshapes_matches
from refseg.training.sam_pretraining import pretrain_sam
from refseg.training.schedules import parse_stages

_SCRIPTS = Path(__file__).resolve().parent
# method -> its quickstart config under scripts/configs/
QUICKSTART_CONFIGS = {"risclip": "quickstart.yaml", "cris": "quickstart_cris.yaml", "risam": "quickstart_risam.yaml",
                      "prompt_ris": "quickstart_prompt_ris.yaml"}
DEFAULT_METHOD = "risclip"  # its model lands in <workdir>/model (the Space's default); others in model-<method>
# The backbones the quickstart can pretrain, in the order it does: `--<name>_pretraining_steps` each.
PRETRAINABLE_BACKBONES = ("clip", "sam")
DEFAULT_PRETRAINING_STEPS = {"clip": 800, "sam": 800}
# Methods whose quickstart differs from those defaults (0: the random tiny backbone, not pretrained).
METHOD_PRETRAINING_STEPS = {}
# SAM pretraining settings (refseg.training.sam_pretraining; figures in its docstring and docs/risam.md).
# --generalized: train.py flags after the method's quickstart config (its schedule kept): the data, and the
# config's tiny preset swapped for its `-g` twin (`refseg.presets`: the same model plus the presence head).
GENERALIZED_DATASET = "grefshapes"
SAM_PRETRAINING = dict(learning_rate=2e-3, batch_size=4, objects_per_image=4,
                       positional_embedding_std=1.0)  # the tiny SAM is random: SAM's own Fourier scale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="refseg-quickstart", help="where data, backbones and the model go")
    p.add_argument("--num_images", type=int, default=1000, help="RefShapes images to generate")
    p.add_argument("--seed", type=int, default=0)
    for name in PRETRAINABLE_BACKBONES:
        p.add_argument(f"--{name}_pretraining_steps", type=int, default=None,
                       help=f"{name.upper()} pretraining steps when the method builds on {name.upper()} (default "
                            f"{DEFAULT_PRETRAINING_STEPS[name]}" + "".join(
                                f", {m}: {steps[name]}" for m, steps in sorted(METHOD_PRETRAINING_STEPS.items())
                                if name in steps) + "; 0: the random tiny one)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(QUICKSTART_CONFIGS),
                   help="which tiny model to train (its config: scripts/configs/" + ", ".join(
                       f"{m} -> {c}" for m, c in sorted(QUICKSTART_CONFIGS.items())) + ")")
    p.add_argument("--config", default=None, help="train.py YAML config (default: the method's quickstart config)")
    p.add_argument("--generalized", action="store_true",
                   help="generalized RIS: the tiny -g preset (presence head) on generalized RefShapes (expressions "
                        "naming several shapes or none), scored by gIoU, cIoU, N-acc, T-acc")
    p.add_argument("train_overrides", nargs="*", help="extra `--key value` flags for scripts/train.py (after --)")
    args = p.parse_args(argv)
    if args.config is None:
        args.config = str(_SCRIPTS / "configs" / QUICKSTART_CONFIGS[args.method])
    for name in PRETRAINABLE_BACKBONES:
        flag = f"{name}_pretraining_steps"
        if getattr(args, flag) is None:
            setattr(args, flag, METHOD_PRETRAINING_STEPS.get(args.method, {}).get(name, DEFAULT_PRETRAINING_STEPS[name]))
        elif getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    return args


def method_backbones(method) -> tuple:
    """The backbones `method` builds on, in the order the quickstart pretrains them (`("clip", "sam")`)."""
    from refseg.training import get_method

    names = get_method(method).backbones
    unknown = sorted(set(names) - set(PRETRAINABLE_BACKBONES))
    if unknown:
        raise ValueError(f"the quickstart cannot build the tiny {unknown} backbone(s) of {method!r}")
    return tuple(name for name in PRETRAINABLE_BACKBONES if name in names)


def prepare_backbone(name, raw, folder, data, steps, seed, step_label) -> Path:
    """The folder of backbone `name` for training: `folder` (pretrained now, or reused when it holds a
    model), or the random tiny one `raw` when `steps` is 0. Prints one line labelled `step_label`."""
    title = {"clip": "CLIP", "sam": "SAM"}[name]
    if steps == 0:
        print(f"{step_label} tiny {title}: the random one, not pretrained ({raw})")
        return raw
    if (folder / "model.safetensors").is_file():
        print(f"{step_label} tiny {title}: reusing {folder}")
        return folder
    if name == "clip":
        print(f"{step_label} pretraining the tiny CLIP on RefShapes crops ({steps} steps)")
        pretrain_clip(raw, data, folder, steps=steps, seed=seed)
    else:
        print(f"{step_label} pretraining the tiny SAM on RefShapes training objects, point and box prompts "
              f"({steps} steps)")
        pretrain_sam(raw, data, folder, steps=steps, seed=seed, **SAM_PRETRAINING)
    return folder


def generalized_flags(config_path) -> list:
    """The train.py flags `--generalized` adds after `config_path`: `--dataset grefshapes --preset <preset>-g`."""
    from refseg.presets import PRESETS

    preset = (yaml.safe_load(Path(config_path).read_text()) or {}).get("preset")
    if not preset or f"{preset}-g" not in PRESETS:
        raise ValueError(f"--generalized: {config_path} names preset {preset!r}, which has no `-g` twin in "
                         "refseg.presets (GENERALIZED_BASES)")
    return ["--dataset", GENERALIZED_DATASET, "--preset", f"{preset}-g"]


def model_folder(work: Path, method: str, generalized: bool = False) -> Path:
    """<workdir>/model for the default method (the Space's default), model-<method> otherwise; model-<method>-g
    with `--generalized` (the default method's too: the Space's default model stays the standard one)."""
    if generalized:
        return work / f"model-{method}-g"
    return work / ("model" if method == DEFAULT_METHOD else f"model-{method}")


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
    backbone_names = method_backbones(args.method)
    total = 3 + len(backbone_names)  # data, one per backbone, training, results
    label = iter(f"[{i}/{total}]" for i in range(1, total + 1))

    data = work / "data"
    data_name = "generalized RefShapes" if args.generalized else "RefShapes"
    marker = data / "grefshapes" / "grefs(unc).json" if args.generalized else data / "refshapes" / "refs(unc).p"
    train_flags = generalized_flags(args.config) if args.generalized else []  # a bad config fails before any work
    if not marker.is_file():
        if args.generalized:  # it rewrites refshapes/ and the images: they must come out the same
            check_refshapes_matches(data, args.num_images, args.seed)
        summary = make_refshapes(data, num_images=args.num_images, seed=args.seed, generalized=args.generalized)
        print(f"{next(label)} {data_name}: {json.dumps(summary['generalized' if args.generalized else 'splits'])}")
    else:
        print(f"{next(label)} {data_name}: reusing {data}")

    backbones = work / "backbones"
    missing = [name for name in PRETRAINABLE_BACKBONES if not (backbones / name / "config.json").is_file()]
    if missing:  # written aside, then only the missing ones moved in: an existing one is never rewritten
        fresh = save_tiny_backbones(backbones / ".tiny-tmp", seed=args.seed)
        for name in missing:
            shutil.rmtree(backbones / name, ignore_errors=True)
            fresh[name].rename(backbones / name)
        shutil.rmtree(backbones / ".tiny-tmp")
    flags = []
    for name in backbone_names:
        folder = prepare_backbone(name, backbones / name, backbones / f"{name}-pretrained", data,
                                  getattr(args, f"{name}_pretraining_steps"), args.seed, next(label))
        flags += [f"--{name}", str(folder)]

    what = f"{args.method} with the presence head ({' '.join(train_flags)})" if args.generalized else args.method
    print(f"{next(label)} training the tiny {what} ({Path(args.config).name}): "
          f"{stage_plan(args.config, args.train_overrides)}")
    model_dir = model_folder(work, args.method, args.generalized)
    results = train.main(["--config", args.config, *train_flags, *flags, "--data_root", str(data),
                          "--output_dir", str(model_dir), "--seed", str(args.seed), *args.train_overrides])

    print(f"{next(label)} {data_name} results of {model_dir} (percent; {time.time() - t0:.0f} s in all):")
    print(format_results_table(results))
    if "val" in results and not args.generalized:  # kinds come from the RefShapes grammar
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
