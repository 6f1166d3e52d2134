#!/usr/bin/env python
"""Export a refseg model (or the CLIPSeg baseline) to ONNX: images and expressions in, `logits` out.

    python scripts/export_onnx.py --model <folder or Hub id> --output model.onnx [--check] [--opset 18]

The graph takes what the model's `forward` names (`pixel_values`, `input_ids`, `attention_mask`, and
Prompt-RIS's `sam_pixel_values`), each with a dynamic batch and the text inputs with a dynamic word
length; its one output is `logits` (B, h, w), for the processor's `post_process_referring_segmentation`
(docs/hub.md shows the whole round trip with onnxruntime). The example inputs are the model's own
processor on two blank images and two expressions, so the image sizes are the processor's.

`--check` runs the file with onnxruntime on other inputs (three rows, other expressions, so another
batch and word length than the export's) and prints the largest |logits| difference from PyTorch;
the script exits with status 1 when it exceeds `--atol`. Needs `pip install "refseg[onnx]"` (onnx,
onnxscript, onnxruntime). See `refseg.onnx_export` for what the graph does differently while traced.
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import sys

import numpy as np
import torch
from PIL import Image

from refseg.baselines import load_referring_model_and_processor
from refseg.onnx_export import export_onnx, graph_inputs, onnx_parity, onnx_session

EXPORT_TEXTS = ["the red circle", "a square"]
# the check's inputs: another batch size and other word lengths than the export's
CHECK_TEXTS = ["the blue square on the left", "a circle", "the small red circle next to the large blue square"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub id (a refseg model or the CLIPSeg baseline)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--check", action="store_true",
                   help="run the file with onnxruntime and print its largest logit difference from PyTorch")
    p.add_argument("--atol", type=float, default=1e-3, help="with --check: fail above this logit difference")
    p.add_argument("--no_optimize", action="store_true", help="skip the exporter's graph optimisation")
    p.add_argument("--external_data", choices=("auto", "yes", "no"), default="auto",
                   help="weights in <output>.data next to the graph (auto: only above ~1.5 GB, ONNX's limit is 2 GB)")
    return p.parse_args(argv)


def images(count: int, seed: int = 0) -> list:
    """`count` random RGB images of different sizes (the processor resizes them all to its input size)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 56 - 5 * i, 3), dtype=np.uint8)) for i in range(count)]


def processor_inputs(processor, texts, seed=0) -> dict:
    """The processor's tensors for one random image per expression in `texts`."""
    return dict(processor(images=images(len(texts), seed), text=list(texts), return_tensors="pt"))


def main(argv=None) -> float:
    args = parse_args(argv)
    model, processor = load_referring_model_and_processor(args.model)
    model = model.float().eval()
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    example = processor_inputs(processor, EXPORT_TEXTS)
    path = export_onnx(model, args.output, example, opset=args.opset, optimize=not args.no_optimize,
                       external_data=external)
    session = onnx_session(path)
    shapes = ", ".join(f"{i.name} {i.shape}" for i in session.get_inputs())
    print(f"wrote {path}: inputs {shapes}; output logits {session.get_outputs()[0].shape}")
    if not args.check:
        return None
    inputs = graph_inputs(model, processor_inputs(processor, CHECK_TEXTS, seed=1))
    with torch.no_grad():
        difference = onnx_parity(model, session, inputs)
    shape = "x".join(str(d) for d in inputs["input_ids"].shape)
    print(f"max |logits difference| onnxruntime vs PyTorch: {difference:.3g} (input_ids {shape}; export {len(EXPORT_TEXTS)} rows)")
    if difference > args.atol:
        print(f"the difference exceeds --atol {args.atol}", file=sys.stderr)
        raise SystemExit(1)
    return difference


if __name__ == "__main__":
    main()
