#!/usr/bin/env python
"""Speed and memory of refseg models, measured in one run (ratios within the run, not across runs).

    python scripts/benchmark.py [--preset risclip-tiny] [--image_size 96] [--batch_size 16] [--steps 20]
        [--config_overrides '{"refiner_hidden_sizes": [32, 32, 32], "refiner_feature_layers": [3, 1, 0]}']

Builds the preset on a locally made tiny CLIP (or `--clip <folder>` for a real checkpoint) and
reports, on this machine: a training step of each stage (forward + backward + AdamW) with each
AdamW implementation of `--optimizer_implementations` (the per-tensor `for-loop`, PyTorch's CPU
default, against `auto` = fused, what scripts/train.py uses) and its trainable parameter count,
inference throughput, the time of one image with 8 expressions over one image with 1 (a method
that encodes the image once per image stays near 1; RISCLIP's PreFusion makes its image features
depend on the text, so it pays about 8), the method's inference forward over its stock backbones'
forward alone (`BACKBONE_FORWARDS`: the cost of what the method adds), and peak resident memory
(`ru_maxrss`). The
tests assert no timing; the numbers are for docs/training.md and for comparing changes on one machine.
`--config_overrides` sets config fields on top of the preset's, e.g. the quickstart's Refiner.
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import json
import resource
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from refseg.backbones import save_tiny_backbones
from refseg.presets import PRESETS
from refseg.training import get_method
from refseg.training.modeling import parse_config_overrides
from refseg.training.optim import IMPLEMENTATIONS, build_optimizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="risclip-tiny")
    p.add_argument("--clip", default=None, help="CLIP folder or id (default: a fresh tiny CLIP)")
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--config_overrides", default=None,
                   help="JSON object of config fields set on top of the preset's (as in scripts/train.py)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up steps)")
    p.add_argument("--optimizer_implementations", default="for-loop,auto",
                   help="comma-separated AdamW implementations to time (refseg.training.optim.IMPLEMENTATIONS)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def _clip_forward(clip, inputs):
    """The stock CLIP towers alone on the method's inputs (what any CLIP-based method runs at least)."""
    clip.vision_model(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=True)
    clip.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


# backbone name (`model.backbone_attributes`) -> forward of that stock backbone alone
BACKBONE_FORWARDS = {"clip": _clip_forward}


def timed(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    implementations = [name.strip() for name in args.optimizer_implementations.split(",") if name.strip()]
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown or not implementations:
        raise ValueError(f"`optimizer_implementations` must list names from {IMPLEMENTATIONS}, got {unknown or '[]'}")
    preset = PRESETS[args.preset]
    extra = parse_config_overrides(args.config_overrides)
    spec = get_method(preset.method)
    model_cls, processor_cls = spec.load_classes()
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or str(save_tiny_backbones(tmp, seed=0)["clip"])
        overrides = {**preset.config_overrides, **extra, "image_size": args.image_size}
        torch.manual_seed(0)
        model = model_cls.from_backbones(clip=clip, **overrides)
        processor = processor_cls.from_backbones(clip=clip, image_size=args.image_size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    masks = [rng.random((150, 130)) > 0.7 for _ in range(args.batch_size)]
    batch = processor(images=images, text=["the red circle on the left"] * args.batch_size, masks=masks,
                      return_tensors="pt")
    batch.pop("original_sizes")
    results = {"preset": args.preset, "image_size": args.image_size, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "config_overrides": json.dumps(extra, sort_keys=True)}
    for stage in spec.stages:
        model.set_training_stage(stage)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        results[f"trainable_params[{stage}]"] = sum(p.numel() for p in trainable)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for implementation in implementations:
            params = spec.param_groups(model, 1e-4) if spec.param_groups else trainable
            optimizer = build_optimizer(params, learning_rate=1e-4, implementation=implementation)

            def step():
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            results[f"train_step_s[{stage}, {implementation}]"] = timed(step, args.steps)
            model.load_state_dict(state)  # every implementation times the same weights
        results[f"train_step_s[{stage}]"] = results[f"train_step_s[{stage}, {implementations[-1]}]"]
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        forward_s = timed(lambda: model(**inputs), args.steps)
        results["inference_samples_per_s"] = args.batch_size / forward_s
        backbones = {name: getattr(model, attr) for name, attr in model.backbone_attributes.items()}
        backbone_s = timed(lambda: [BACKBONE_FORWARDS[name](module, inputs) for name, module in backbones.items()],
                           args.steps)
        results["ratio forward/backbones_forward"] = forward_s / backbone_s
        texts = [f"the {c} shape" for c in ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")]
        one, eight = (processor(images=images[0], text=texts[:n], return_tensors="pt") for n in (1, 8))
        for encoded in (one, eight):
            encoded.pop("original_sizes")
        results["ratio 8_expressions/1_expression"] = (timed(lambda: model(**eight), args.steps)
                                                      / timed(lambda: model(**one), args.steps))
    first, *rest = spec.stages
    if len(implementations) > 1:
        for stage in spec.stages:
            results[f"ratio train_step[{stage}, {implementations[-1]}]/[{stage}, {implementations[0]}]"] = (
                results[f"train_step_s[{stage}, {implementations[-1]}]"]
                / results[f"train_step_s[{stage}, {implementations[0]}]"])
    for stage in rest:
        results[f"ratio train_step[{stage}]/train_step[{first}]"] = (
            results[f"train_step_s[{stage}]"] / results[f"train_step_s[{first}]"])
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(map(len, results))
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return results


if __name__ == "__main__":
    main()
