"""ONNX export (scripts/export_onnx.py, `refseg.onnx_export`): every method's tiny model, saved with
`save_pretrained`, exported at a batch of 2, run by onnxruntime at another batch size and word length
(the axes are dynamic), and compared with PyTorch on the same inputs.

The exports take tens of seconds each on a 2-core CPU (torch.export, then the ONNX translation), so
the per-method round trips are marked slow; the checks of the plumbing below them are fast.
"""

import json

import numpy as np
import pytest
import torch

from conftest import randomise_parameters, tiny_preset

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import export_onnx  # noqa: E402  (scripts/export_onnx.py)

from refseg.onnx_export import (  # noqa: E402
    ONNX_INPUT_NAMES,
    export_onnx as export_model,
    exportable,
    max_text_positions,
    onnx_input_names,
    onnx_session,
    run_onnx,
)
from refseg.training import METHODS, get_method  # noqa: E402

# Largest |logits(onnxruntime) - logits(PyTorch)| accepted: float32 graphs that reorder a few sums.
ATOL = 1e-4
METHOD_NAMES = sorted(m for m in METHODS if not METHODS[m].baseline)


def build_tiny(method, backbones, seed=0):
    """The tiny preset of `method` on the tiny backbones, its parameters drawn at random (so no branch is
    zero), in eval mode, with its processor."""
    from types import SimpleNamespace

    from refseg.training.modeling import build_model_and_processor

    spec = get_method(method)
    args = SimpleNamespace(preset=tiny_preset(method), model_name_or_path=None, config_overrides=None,
                           **{name: str(backbones[name]) for name in spec.backbones})
    torch.manual_seed(seed)
    model, processor = build_model_and_processor(spec, args)
    randomise_parameters(model, seed=seed, std=0.2)
    return model.eval(), processor


@pytest.fixture(scope="module")
def saved_tiny(tiny_backbones, tmp_path_factory):
    """`get(method) -> (model, processor, folder)`: `build_tiny` saved with `save_pretrained`, once per method."""
    cache = {}

    def get(method):
        if method not in cache:
            model, processor = build_tiny(method, tiny_backbones)
            folder = tmp_path_factory.mktemp(f"{method}-onnx")
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            cache[method] = (model, processor, folder)
        return cache[method]

    return get


def other_shape_inputs(model, processor):
    """Inputs at 3 rows and a word length 2 shorter than the export's (which is 2 rows of `EXPORT_TEXTS`)."""
    exported = export_onnx.processor_inputs(processor, export_onnx.EXPORT_TEXTS)
    inputs = export_onnx.processor_inputs(processor, export_onnx.CHECK_TEXTS, seed=1)
    length = exported["input_ids"].shape[1] - 2
    inputs = {name: inputs[name] for name in onnx_input_names(model)}
    for name in ("input_ids", "attention_mask"):
        inputs[name] = inputs[name][:, :length]
    assert inputs["pixel_values"].shape[0] == 3 != exported["pixel_values"].shape[0]
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_exported_logits_match_pytorch_at_another_batch_and_word_length(method, saved_tiny, tmp_path, capsys):
    model, processor, folder = saved_tiny(method)
    path = tmp_path / f"{method}.onnx"
    export_onnx.main(["--model", str(folder), "--output", str(path), "--no_optimize"])
    session = onnx_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == list(onnx_input_names(model))
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for spec in session.get_inputs():  # batch symbolic everywhere, the word length on the text inputs
        assert isinstance(spec.shape[0], str), (spec.name, spec.shape)
        assert isinstance(spec.shape[1], str) == (spec.name in ("input_ids", "attention_mask")), (spec.name, spec.shape)

    inputs = other_shape_inputs(model, processor)
    onnx_logits = run_onnx(session, inputs)
    with torch.no_grad():
        torch_logits = model(**inputs).logits.numpy()
    assert onnx_logits.shape == torch_logits.shape and onnx_logits.shape[0] == 3
    difference = float(np.abs(onnx_logits - torch_logits).max())
    print(json.dumps({"method": method, "max_abs_difference": difference,
                      "logit_scale": float(np.abs(torch_logits).max())}))
    assert difference < ATOL
    assert np.abs(torch_logits).max() > 1e-3  # the comparison is not of zeros


@pytest.mark.slow
def test_script_check_exports_with_the_optimiser_and_reports_the_difference(saved_tiny, tmp_path, capsys):
    """The script as documented: default graph optimisation, `--check` (another batch and word length)."""
    model, processor, folder = saved_tiny("risam")
    difference = export_onnx.main(["--model", str(folder), "--output", str(tmp_path / "m.onnx"), "--check"])
    out = capsys.readouterr().out
    assert "max |logits difference| onnxruntime vs PyTorch" in out and difference < ATOL
    assert not (tmp_path / "m.onnx.data").exists()  # tiny weights stay inside the graph


def test_graph_inputs_are_the_forward_inputs_in_forward_order(saved_tiny, tiny_backbones):
    from transformers import CLIPConfig

    positions = CLIPConfig.from_pretrained(tiny_backbones["clip"]).text_config.max_position_embeddings
    for method in METHOD_NAMES:
        model = saved_tiny(method)[0]
        names = onnx_input_names(model)
        assert names[:3] == ("pixel_values", "input_ids", "attention_mask")
        assert ("sam_pixel_values" in names) == (method == "prompt_ris")
        assert set(names) <= set(ONNX_INPUT_NAMES)
        assert max_text_positions(model) == positions  # the word-length axis's upper bound


def test_exportable_turns_image_sharing_off_and_restores_it(saved_tiny):
    model = saved_tiny("risclip")[0]
    model.train()
    assert model.config.share_image_encoding is True
    with exportable(model):
        assert model.config.share_image_encoding is False and not model.training
    assert model.config.share_image_encoding is True and model.training
    model.eval()


def test_export_refuses_a_batch_of_one(saved_tiny, tmp_path):
    model, processor, _ = saved_tiny("cris")
    inputs = export_onnx.processor_inputs(processor, ["the red circle"])
    with pytest.raises(ValueError, match="at least 2 rows"):
        export_model(model, tmp_path / "m.onnx", inputs)
    with pytest.raises(ValueError, match="lack"):
        export_model(model, tmp_path / "m.onnx", {"pixel_values": inputs["pixel_values"]})
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_benchmark_times_onnxruntime_against_pytorch(tiny_backbones):
    import benchmark  # scripts/benchmark.py

    result = benchmark.main(["--preset", "cris-tiny", "--clip", str(tiny_backbones["clip"]), "--image_size", "64",
                             "--batch_size", "2", "--steps", "1", "--warmup", "0", "--skip_training", "--onnx",
                             "--module_shares", "neck"])
    assert result["onnxruntime_forward_s"] > 0
    assert result["ratio forward[onnxruntime]/forward[pytorch]"] == pytest.approx(
        result["onnxruntime_forward_s"] / result["inference_forward_s"])
    assert result["max_abs_logit_difference[onnxruntime]"] < ATOL


@pytest.mark.slow
def test_clipseg_baseline_exports_with_dynamic_axes(tiny_backbones, tmp_path, capsys):
    """The stock CLIPSeg behind refseg's contract (a folder as `CIDAS/clipseg-rd64-refined` is laid out)."""
    from test_baselines_clipseg import save_stock_clipseg

    folder = save_stock_clipseg(tmp_path / "clipseg", tiny_backbones["clip"])
    difference = export_onnx.main(["--model", str(folder), "--output", str(tmp_path / "clipseg.onnx"), "--check",
                                   "--no_optimize"])
    print(json.dumps({"method": "clipseg", "max_abs_difference": difference}))
    assert difference < ATOL
    assert [i.name for i in onnx_session(tmp_path / "clipseg.onnx").get_inputs()] == [
        "pixel_values", "input_ids", "attention_mask"]


def test_a_graph_with_a_fixed_batch_or_word_length_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from refseg.onnx_export import check_dynamic_axes

    def write(ids_shape):
        ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ids_shape)
        out = helper.make_tensor_value_info("logits", TensorProto.INT64, ids_shape)
        graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [ids], [out])
        path = tmp_path / f"{'x'.join(map(str, ids_shape))}.onnx"
        onnx.save(helper.make_model(graph), path)
        return path

    check_dynamic_axes(write(["batch", "sequence"]))
    with pytest.raises(ValueError, match=r"axis \[0\] of `input_ids`"):
        check_dynamic_axes(write([2, "sequence"]))
    with pytest.raises(ValueError, match=r"axis \[1\] of `input_ids`"):
        check_dynamic_axes(write(["batch", 7]))


def test_risclip_torch_export_accepts_every_word_length(saved_tiny):
    """`torch.export` itself (no ONNX) with the graph's dynamic axes: RISCLIP's fusion attention must not branch
    on the word length (`FusionAttention.folds_keys`), or the export is refused for the lengths past the branch
    (torch.onnx.export recovers from that on its own, so the ONNX tests above cannot see it)."""
    from refseg.onnx_export import LogitsOnly, dynamic_shapes, graph_inputs

    model, processor, _ = saved_tiny("risclip")
    inputs = graph_inputs(model, export_onnx.processor_inputs(processor, export_onnx.EXPORT_TEXTS))
    with exportable(model), torch.no_grad():
        program = torch.export.export(LogitsOnly(model).eval(), (), kwargs=inputs,
                                      dynamic_shapes=dynamic_shapes(model, inputs), strict=False)
        longest = max_text_positions(model)
        ids = torch.randint(1, 40, (3, longest))
        other = {**graph_inputs(model, export_onnx.processor_inputs(processor, export_onnx.CHECK_TEXTS)),
                 "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        assert torch.allclose(program.module()(**other), model(**other).logits, atol=1e-5)
