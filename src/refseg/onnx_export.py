"""ONNX export of a referring segmentation model: images and expressions in, `logits` out.

    from refseg.onnx_export import export_onnx, onnx_parity
    export_onnx(model, "model.onnx", example_inputs)    # example_inputs: the processor's tensors
    onnx_parity(model, "model.onnx", other_inputs)      # largest |logits(onnxruntime) - logits(PyTorch)|

`scripts/export_onnx.py` is the command line. The graph's inputs are the ones `forward` names, in its
order: `pixel_values` (B, 3, H, W), `input_ids` and `attention_mask` (B, T) int64, and Prompt-RIS's
`sam_pixel_values` (B, 3, S, S); its one output is `logits` (B, h, w), what `forward` returns as
`logits` (pass it to the processor's `post_process_referring_segmentation`). B and T are dynamic (T up to
CLIP's text positions); the image sizes are the ones the example inputs have (the processor's).

The graph comes from `torch.onnx.export(dynamo=True)` (`torch.export`, then onnxscript's translation).
Neither transformers nor optimum exports these models: transformers has no ONNX path of its own, and
optimum's exporter (`optimum-onnx`, which needs transformers < 4.58) knows only the architectures it
ships an `OnnxConfig` for, not refseg's model types. Two things differ from eager inference while
the graph is traced, neither changes the logits beyond rounding:

- `config.share_image_encoding` is off: which rows hold the same image depends on the pixel values,
  which a graph cannot branch on, so the exported graph encodes every row (`unique_rows` does the
  same under `torch.export` at a fixed batch; with a dynamic batch the branch on its count would pin it).
- RISCLIP's fusion attention folds the key projections only where that is the cheaper side for every
  word length the graph accepts (`FusionAttention.folds_keys`), so the graph is one path for all T.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

# The inputs an ONNX graph takes, in the order `forward` names them; everything else `forward` accepts
# (labels, grouping ids) is training-only.
ONNX_INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "sam_pixel_values")
ONNX_OUTPUT_NAMES = ("logits",)
TEXT_INPUTS = ("input_ids", "attention_mask")
# ONNX's protobuf limit is 2 GB: weights above this many bytes go to a `<file>.data` next to the graph.
INLINE_WEIGHTS_LIMIT = 1_500_000_000


def onnx_input_names(model: nn.Module) -> tuple:
    """The graph inputs of `model`: the names of `ONNX_INPUT_NAMES` its `forward` takes, in its order."""
    parameters = inspect.signature(model.forward).parameters
    return tuple(name for name in parameters if name in ONNX_INPUT_NAMES)


def max_text_positions(model: nn.Module) -> Optional[int]:
    """CLIP's text positions (the longest `input_ids` the model takes), from its text embeddings; `None`
    when the model has none."""
    for module in model.modules():  # CLIP's (or CLIPSeg's) text embeddings: token and position tables
        if hasattr(module, "token_embedding") and hasattr(module, "position_embedding"):
            return module.position_embedding.num_embeddings
    return None


class LogitsOnly(nn.Module):
    """`model(**inputs).logits` alone, so the graph has one output and no training inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask, sam_pixel_values=None):
        # explicit arguments, in `ONNX_INPUT_NAMES` order: `torch.export` names the graph inputs after them
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if sam_pixel_values is not None:
            inputs["sam_pixel_values"] = sam_pixel_values
        outputs = self.model(**inputs)
        return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits


@contextlib.contextmanager
def exportable(model: nn.Module):
    """`model` in eval mode with `config.share_image_encoding` off (module docstring), both restored after."""
    config = getattr(model, "config", None)
    shared = getattr(config, "share_image_encoding", False)
    training = model.training
    model.eval()
    if shared:
        config.share_image_encoding = False
    try:
        yield model
    finally:
        if shared:
            config.share_image_encoding = shared
        model.train(training)


def graph_inputs(model: nn.Module, inputs: Mapping) -> dict:
    """The tensors of `inputs` (a processor output) the graph takes, in its order; `ValueError` if one is missing."""
    names = onnx_input_names(model)
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ValueError(f"the inputs lack {missing} (give the processor's output for images and texts)")
    return {name: inputs[name] for name in names}


def dynamic_shapes(model: nn.Module, names) -> dict:
    """`torch.export` dynamic shapes: dimension 0 of every input is the batch, dimension 1 of the text
    inputs the word length (at most `max_text_positions`)."""
    batch = torch.export.Dim("batch")
    positions = max_text_positions(model)
    words = torch.export.Dim("sequence", max=positions) if positions else torch.export.Dim("sequence")
    return {name: ({0: batch, 1: words} if name in TEXT_INPUTS else {0: batch}) for name in names}


def export_onnx(model: nn.Module, path, example_inputs: Mapping, *, opset: Optional[int] = None,
                optimize: bool = True, external_data: Optional[bool] = None) -> Path:
    """Write `model`'s ONNX graph (module docstring) to `path` and return it.

    Args:
        model: a refseg model (or the CLIPSeg baseline) in float32.
        path: the `.onnx` file; parent folders are made.
        example_inputs: a processor output (or any mapping holding the tensors `onnx_input_names` lists)
            at a batch of at least 2 (size 1 would be specialised); the image sizes become fixed.
        opset: ONNX opset (`None`: the exporter's default).
        optimize: run the exporter's graph optimisation (constant folding, redundant ops removed).
        external_data: weights in `<path>.data` instead of inside the graph; `None` chooses by size
            (`INLINE_WEIGHTS_LIMIT`).
    """
    inputs = graph_inputs(model, example_inputs)
    if inputs["pixel_values"].shape[0] < 2:
        raise ValueError("`example_inputs` needs a batch of at least 2 rows (a batch of 1 would be fixed in the graph)")
    if external_data is None:
        size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        external_data = size > INLINE_WEIGHTS_LIMIT
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exportable(model), torch.no_grad():
        torch.onnx.export(
            LogitsOnly(model).eval(), (), os.fspath(path), kwargs=inputs, dynamo=True,
            dynamic_shapes=dynamic_shapes(model, inputs), input_names=list(inputs),
            output_names=list(ONNX_OUTPUT_NAMES), opset_version=opset, optimize=optimize,
            external_data=external_data, verbose=False,
        )
    check_dynamic_axes(path)
    return path


def check_dynamic_axes(path) -> None:
    """`ValueError` unless every graph input has a symbolic batch and the text inputs a symbolic word length:
    the exporter may fix a size the model's code compares with a number, without failing."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        axes = (0, 1) if value.name in TEXT_INPUTS else (0,)
        fixed = [axis for axis in axes if not dims[axis].dim_param]
        if fixed:
            raise ValueError(f"the exported graph fixes axis {fixed} of `{value.name}` "
                             f"({[d.dim_param or d.dim_value for d in dims]}): the model's code specialises it")


def onnx_session(path, *, threads: Optional[int] = None):
    """An onnxruntime CPU `InferenceSession` on `path` (`threads`: intra-op threads, `None` its default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: Mapping) -> np.ndarray:
    """`logits` (B, h, w) of the graph on `inputs` (tensors or arrays; the session's input names are read)."""
    feed = {}
    for spec in session.get_inputs():
        value = inputs[spec.name]
        feed[spec.name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return session.run(list(ONNX_OUTPUT_NAMES), feed)[0]


def onnx_parity(model: nn.Module, path_or_session, inputs: Mapping) -> float:
    """Largest |logits| difference between the ONNX graph (onnxruntime) and `model` (PyTorch, eval) on `inputs`."""
    session = onnx_session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    inputs = graph_inputs(model, inputs)
    onnx_logits = run_onnx(session, inputs)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_logits = LogitsOnly(model)(**inputs)
    finally:
        model.train(training)
    if onnx_logits.shape != tuple(torch_logits.shape):
        raise ValueError(f"ONNX logits {onnx_logits.shape} and PyTorch logits {tuple(torch_logits.shape)} differ in shape")
    return float(np.abs(onnx_logits - torch_logits.float().cpu().numpy()).max())


__all__ = [
    "ONNX_INPUT_NAMES",
    "ONNX_OUTPUT_NAMES",
    "LogitsOnly",
    "check_dynamic_axes",
    "dynamic_shapes",
    "export_onnx",
    "exportable",
    "graph_inputs",
    "max_text_positions",
    "onnx_input_names",
    "onnx_parity",
    "onnx_session",
    "run_onnx",
]
