#!/usr/bin/env python
"""Speed and memory of refseg models, measured in one run (ratios within the run, not across runs).

    python scripts/benchmark.py [--preset risclip-tiny] [--image_size 96] [--batch_size 16] [--steps 20]
        [--config_overrides '{"refiner_hidden_sizes": [32, 32, 32], "refiner_feature_layers": [3, 1, 0]}']
    python scripts/benchmark.py --preset risam-tiny
    python scripts/benchmark.py --preset risam-b --random_backbones --batch_size 1 --steps 1
    python scripts/benchmark.py --preset risclip-b --random_backbones --image_size 640 --batch_size 1 --steps 1 \
        --warmup 1 --skip_training --dtypes float32,bfloat16   # issue-size RISCLIP-B: towers, shares, bf16

Builds the preset on locally made tiny backbones (or `--clip` / `--sam <folder>` for real checkpoints, or
`--random_backbones`: the preset's own architecture with random weights, built offline) and
reports, on this machine: a training step of each stage (forward + backward + AdamW) with each
AdamW implementation of `--optimizer_implementations` (the per-tensor `for-loop`, PyTorch's CPU
default, against `auto` = fused, what scripts/train.py uses) and its trainable parameter count,
inference throughput, the time of one image with 8 expressions over one image with 1 (a method
that encodes the image once per image stays near 1; RISCLIP's PreFusion makes its image features
depend on the text, so it pays about 8) and the share of those 8 the stock CLIP towers alone take on
the 8 pairs (Prompt-RIS's image tower sees the text, so it runs per pair), the method's inference forward over its stock backbones'
forward alone (`BACKBONE_FORWARDS`: the cost of what the method adds), the extra resident memory at
the peak of one training step and of one inference forward (Linux: the process's high-water mark is
reset before each; what a frozen backbone run without autograd history saves shows in their ratio),
and peak resident memory (`ru_maxrss`). The
tests assert no timing; the numbers are for docs/training.md and for comparing changes on one machine.
`--config_overrides` sets config fields on top of the preset's, e.g. the quickstart's Refiner.
`--module_shares` times the share of one inference forward spent in named submodules (forward hooks;
default `MODULE_SHARES[method]`), `--dtypes float32,bfloat16` also times the forward of a copy cast whole
to each dtype (with its largest logit difference from float32), `--stages` / `--skip_training` choose the
training steps timed, `--warmup` the untimed calls before each measurement (3). `--onnx` also exports the model to ONNX
(`refseg.onnx_export`, as scripts/export_onnx.py does) and times onnxruntime's CPU forward on the same inputs
with as many threads as PyTorch, against PyTorch's (with the largest logit difference between the two).
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import copy
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
    p.add_argument("--sam", default=None, help="SAM folder or id (default: a fresh tiny SAM)")
    p.add_argument("--random_backbones", action="store_true",
                   help="build the preset's architecture with random weights (offline) instead of loading backbones")
    p.add_argument("--image_size", type=int, default=None,
                   help="model input size where the method's config sets one (default 96); SAM-based methods take "
                        "SAM's own input size")
    p.add_argument("--config_overrides", default=None,
                   help="JSON object of config fields set on top of the preset's (as in scripts/train.py)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after `--warmup` steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--skip_training", action="store_true",
                   help="time inference only (no training step, no trainable-parameter counts)")
    p.add_argument("--skip_inference", action="store_true",
                   help="time the training steps only (no inference, module shares, expressions or dtypes)")
    p.add_argument("--stages", default=None,
                   help="comma-separated training stages to time (default: every stage of the method)")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated dtypes of the inference forward (e.g. float32,bfloat16): each is a copy "
                        "of the model cast whole, timed and compared with the model's own dtype (float32), "
                        "which is skipped")
    p.add_argument("--module_shares", default=None,
                   help="comma-separated submodule names (default: the method's MODULE_SHARES) whose share of one "
                        "inference forward is timed with hooks; a ModuleList counts as the sum of its members")
    p.add_argument("--optimizer_implementations", default="for-loop,auto",
                   help="comma-separated AdamW implementations to time (refseg.training.optim.IMPLEMENTATIONS)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="also time each stage's training step, and its peak memory, with gradient checkpointing on")
    p.add_argument("--onnx", action="store_true",
                   help="also time the ONNX export of the model under onnxruntime (needs refseg[onnx])")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def _clip_forward(clip, inputs):
    """The stock CLIP towers the method holds, alone on the method's inputs (what any CLIP-based method runs
    at least): the image tower where it has one (RISAM keeps only the text tower), and the text tower."""
    if hasattr(clip, "vision_model"):
        clip.vision_model(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=True)
    text_tower = getattr(clip, "text_model", clip)  # a `CLIPModel`'s text tower, or a `CLIPTextModel`
    text_tower(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def _sam_forward(sam, inputs):
    """The stock SAM image encoder alone, once per row of SAM's input: `sam_pixel_values` where the method
    also feeds CLIP an image (Prompt-RIS), else `pixel_values` (RISAM). The method holds a `SamVisionModel`
    (RISAM) or a whole `SamModel` (Prompt-RIS, whose prompt encoder and mask decoder are its own cost)."""
    encoder = getattr(sam, "vision_encoder", sam)
    encoder(pixel_values=inputs.get("sam_pixel_values", inputs["pixel_values"]))


# backbone name (`model.backbone_attributes`) -> forward of that stock backbone alone
BACKBONE_FORWARDS = {"clip": _clip_forward, "sam": _sam_forward}


# method -> submodules whose share of one inference forward `--module_shares` times by default. Nested names
# overlap: RISCLIP's PreFusion blocks run inside CLIP's image layers. The CLIP methods run the towers' layers
# themselves (not `vision_model.forward`), so their layer lists are timed.
MODULE_SHARES = {
    "risclip": "clip.vision_model.encoder.layers,clip.text_model.encoder.layers,pre_fusion,post_fusion,locator,refiner",
    "cris": "clip.vision_model.encoder.layers,clip.text_model.encoder.layers,neck,decoder,projector",
    "risam": "sam,clip",
    "prompt_ris": "clip.vision_model.encoder.layers,clip.text_model.encoder.layers,sam.vision_encoder,sam.mask_decoder",
}


def module_shares(model, names, forward, steps, warmup):
    """{name: seconds in `name` / seconds of `forward()`} over `steps` calls of `forward` (after `warmup`),
    timed with forward pre/post hooks; a `ModuleList` (never called itself) sums its members' calls."""
    spent = {name: 0.0 for name in names}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"`module_shares`: {type(model).__name__} has no submodule {name!r}") from None
        members = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        for member in members:
            starts = []

            def pre(_module, _args, starts=starts):
                starts.append(time.perf_counter())

            def post(_module, _args, _output, starts=starts, name=name):
                spent[name] += time.perf_counter() - starts.pop()

            handles += [member.register_forward_pre_hook(pre), member.register_forward_hook(post)]
    try:
        for _ in range(warmup):
            forward()
        spent.update({name: 0.0 for name in names})
        total = timed(forward, steps, warmup=0) * steps
    finally:
        for handle in handles:
            handle.remove()
    return {name: seconds / total for name, seconds in spent.items()}


def _cast_inputs(inputs, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def _memory_kib():
    """(current resident set, high-water mark) in KiB from /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def peak_extra_memory_mib(fn):
    """Resident memory `fn()` needs above what the process holds before it, at its peak, in MiB (Linux:
    freed heap is returned to the system and the high-water mark reset first); None where unsupported."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError:
        return None
    before = _memory_kib()
    fn()
    after = _memory_kib()
    if before is None or after is None:
        return None
    return (after[1] - before[0]) / 1024


def _checkpointing(model, what: str) -> None:
    """`model.activation_checkpointing_<what>()` (transformers >= 5.25), else `gradient_checkpointing_<what>()`."""
    (getattr(model, f"activation_checkpointing_{what}", None) or getattr(model, f"gradient_checkpointing_{what}"))()


def _ratio(a, b):
    """a / b, or None where either is unknown (peak memory off Linux) or b is 0."""
    return a / b if a is not None and b else None


def timed(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def onnx_timings(model, inputs, forward_s, reference, steps, warmup) -> dict:
    """onnxruntime's forward of `model`'s ONNX export on `inputs` (seconds, its ratio to PyTorch's `forward_s`,
    its largest logit difference from `reference`), with PyTorch's thread count."""
    from refseg.onnx_export import export_onnx, graph_inputs, onnx_session, run_onnx

    inputs = graph_inputs(model, inputs)
    example = inputs if inputs["pixel_values"].shape[0] > 1 else {k: torch.cat([v, v]) for k, v in inputs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, f"{tmp}/model.onnx", example)
        session = onnx_session(path, threads=torch.get_num_threads())
    onnx_s = timed(lambda: run_onnx(session, inputs), steps, warmup)
    difference = float(np.abs(run_onnx(session, inputs) - reference.numpy()).max())
    return {"onnxruntime_forward_s": onnx_s, "ratio forward[onnxruntime]/forward[pytorch]": onnx_s / forward_s,
            "max_abs_logit_difference[onnxruntime]": difference}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    bad = [name for name in dtypes if not isinstance(getattr(torch, name, None), torch.dtype)]
    if bad or not dtypes:
        raise ValueError(f"`dtypes` must name torch dtypes such as float32,bfloat16, got {bad or '[]'}")
    implementations = [name.strip() for name in args.optimizer_implementations.split(",") if name.strip()]
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown or not implementations:
        raise ValueError(f"`optimizer_implementations` must list names from {IMPLEMENTATIONS}, got {unknown or '[]'}")
    preset = PRESETS[args.preset]
    extra = parse_config_overrides(args.config_overrides)
    spec = get_method(preset.method)
    model_cls, processor_cls = spec.load_classes()
    config_fields = set(getattr(model_cls.config_class, "__annotations__", {}))
    overrides = {**preset.config_overrides, **extra}
    if "image_size" in config_fields:  # CLIP-input methods; SAM's input size is fixed by its position embeddings
        overrides["image_size"] = args.image_size or 96
    elif args.image_size is not None:
        raise ValueError(f"`image_size` is not a {preset.method} config field (the input size is SAM's own)")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny_backbones(tmp, seed=0)
        sources = {name: getattr(args, name, None) or str(tiny[name]) for name in spec.backbones}
        torch.manual_seed(0)
        if args.random_backbones:
            from refseg.presets import get_config

            model = model_cls(get_config(args.preset, **overrides))
            # the processor only needs the tokenizer and image processor: the tiny folders' serve
            settings = {"image_size": model.config.image_size}
        else:
            model = model_cls.from_backbones(**sources, **overrides)
            settings = {"image_size": model.config.image_size}
        settings.update({name: getattr(model.config, name) for name in getattr(processor_cls, "config_fields", ())})
        processor = processor_cls.from_backbones(**{name: str(tiny[name]) if args.random_backbones else sources[name]
                                                    for name in spec.backbones}, **settings)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    masks = [rng.random((150, 130)) > 0.7 for _ in range(args.batch_size)]
    batch = processor(images=images, text=["the red circle on the left"] * args.batch_size, masks=masks,
                      return_tensors="pt")
    batch.pop("original_sizes")
    results = {"preset": args.preset, "image_size": model.config.image_size, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "config_overrides": json.dumps(extra, sort_keys=True)}
    stages = [] if args.skip_training else list(spec.stages)
    if args.stages:
        stages = [name.strip() for name in args.stages.split(",") if name.strip()]
        if not stages or set(stages) - set(spec.stages) or args.skip_training:
            raise ValueError(f"`stages` must name stages of {preset.method} ({', '.join(spec.stages)}) and not be "
                             f"combined with `skip_training`, got {args.stages!r}")
    for stage in stages:
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

            results[f"train_step_s[{stage}, {implementation}]"] = timed(step, args.steps, args.warmup)
            model.load_state_dict(state)  # every implementation times the same weights
        results[f"train_step_s[{stage}]"] = results[f"train_step_s[{stage}, {implementations[-1]}]"]
        optimizer = build_optimizer(spec.param_groups(model, 1e-4) if spec.param_groups else trainable,
                                    learning_rate=1e-4, implementation=implementations[-1])

        def one_step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        one_step()  # the optimizer state exists before the measured step
        results[f"train_step_extra_memory_mib[{stage}]"] = peak_extra_memory_mib(one_step)
        if args.gradient_checkpointing:  # the same step, activations recomputed in backward
            _checkpointing(model, "enable")
            results[f"train_step_extra_memory_mib[{stage}, checkpointed]"] = peak_extra_memory_mib(one_step)
            results[f"train_step_s[{stage}, checkpointed]"] = timed(one_step, args.steps, args.warmup)
            _checkpointing(model, "disable")
            results[f"ratio train_step_extra_memory[{stage}, checkpointed]/[{stage}]"] = _ratio(
                results[f"train_step_extra_memory_mib[{stage}, checkpointed]"],
                results[f"train_step_extra_memory_mib[{stage}]"])
        model.load_state_dict(state)
    if not args.skip_inference:
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        steps, warmup = args.steps, args.warmup
        with torch.no_grad():
            results["inference_extra_memory_mib"] = peak_extra_memory_mib(lambda: model(**inputs))
            forward_s = timed(lambda: model(**inputs), steps, warmup)
            results["inference_forward_s"] = forward_s
            results["inference_samples_per_s"] = args.batch_size / forward_s
            backbones = {name: getattr(model, attr) for name, attr in model.backbone_attributes.items()}
            backbone_s = timed(lambda: [BACKBONE_FORWARDS[name](module, inputs) for name, module in backbones.items()],
                               steps, warmup)
            results["backbones_forward_s"] = backbone_s
            results["ratio forward/backbones_forward"] = forward_s / backbone_s
            names = args.module_shares or MODULE_SHARES.get(preset.method, "")
            names = [name.strip() for name in names.split(",") if name.strip()]
            for name, share in module_shares(model, names, lambda: model(**inputs), steps, warmup).items():
                results[f"share forward[{name}]"] = share
            texts = [f"the {c} shape" for c in ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")]
            one, eight = (processor(images=images[0], text=texts[:n], return_tensors="pt") for n in (1, 8))
            for encoded in (one, eight):
                encoded.pop("original_sizes")
            one_s, eight_s = timed(lambda: model(**one), steps, warmup), timed(lambda: model(**eight), steps, warmup)
            results["1_expression_s"], results["8_expressions_s"] = one_s, eight_s
            results["ratio 8_expressions/1_expression"] = eight_s / one_s
            if "clip" in backbones:  # what the stock CLIP towers alone cost of those 8 pairs (run once per pair)
                results["share 8_expressions[clip towers alone]"] = timed(
                    lambda: BACKBONE_FORWARDS["clip"](backbones["clip"], eight), steps, warmup) / eight_s
            reference = model(**inputs).logits.float()
            own = str(next(model.parameters()).dtype).removeprefix("torch.")
            for name in dtypes:
                dtype = getattr(torch, name)
                if dtype == next(model.parameters()).dtype:
                    continue
                cast = copy.deepcopy(model).to(dtype)
                cast_inputs = _cast_inputs(inputs, dtype)
                results[f"inference_forward_s[{name}]"] = timed(lambda: cast(**cast_inputs), steps, warmup)
                results[f"ratio forward[{name}]/forward[{own}]"] = results[f"inference_forward_s[{name}]"] / forward_s
                difference = (cast(**cast_inputs).logits.float() - reference).abs().max().item()
                results[f"max_abs_logit_difference[{name}]"] = difference
                del cast
            if args.onnx:
                results.update(onnx_timings(model, inputs, forward_s, reference, steps, warmup))
    first, *rest = spec.stages
    if len(implementations) > 1:
        for stage in stages:
            results[f"ratio train_step[{stage}, {implementations[-1]}]/[{stage}, {implementations[0]}]"] = (
                results[f"train_step_s[{stage}, {implementations[-1]}]"]
                / results[f"train_step_s[{stage}, {implementations[0]}]"])
    if results.get("inference_extra_memory_mib"):
        for stage in stages:
            if results[f"train_step_extra_memory_mib[{stage}]"] is not None:
                results[f"ratio train_step_memory[{stage}]/inference_memory"] = (
                    results[f"train_step_extra_memory_mib[{stage}]"] / results["inference_extra_memory_mib"])
    for stage in rest if stages == list(spec.stages) else []:
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
