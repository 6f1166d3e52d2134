"""`config_overrides` in scripts/benchmark.py and in train.py's YAML and flags; bad overrides are refused."""

import json

import sys

import pytest

import benchmark
from refseg.training.modeling import parse_config_overrides


def _run(clip, overrides):
    return benchmark.main(["--clip", str(clip), "--image_size", "64", "--batch_size", "2", "--steps", "1",
                           "--config_overrides", json.dumps(overrides)])


def test_config_overrides_change_only_the_overridden_part(tiny_backbones, capsys):
    narrow = _run(tiny_backbones["clip"], {"refiner_hidden_sizes": [8, 8, 8], "refiner_feature_layers": [3, 1, 0]})
    wide = _run(tiny_backbones["clip"], {"refiner_hidden_sizes": [16, 16, 16], "refiner_feature_layers": [3, 1, 0]})
    assert narrow["trainable_params[locator]"] == wide["trainable_params[locator]"] > 0
    assert 0 < narrow["trainable_params[refiner]"] < wide["trainable_params[refiner]"]
    for result in (narrow, wide):
        assert result["train_step_s[refiner]"] > 0 and result["inference_samples_per_s"] > 0
    assert "trainable_params[refiner]" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_bad_config_overrides_raise_naming_the_flag(text):
    with pytest.raises(ValueError, match="config_overrides"):
        parse_config_overrides(text)
    with pytest.raises(ValueError, match="config_overrides"):
        benchmark.main(["--config_overrides", text])


def test_config_overrides_from_json_text_or_a_mapping():
    assert parse_config_overrides(None) == {} == parse_config_overrides("")
    assert parse_config_overrides('{"image_size": 64}') == {"image_size": 64}
    assert parse_config_overrides({"image_size": 64}) == {"image_size": 64}  # a YAML mapping


def test_yaml_config_may_write_overrides_as_a_mapping(tiny_backbones, tmp_path):
    from train_args import parse_args

    from refseg.training import get_method
    from refseg.training.modeling import backbone_sources

    config = tmp_path / "run.yaml"
    config.write_text("method: risclip\npreset: risclip-tiny\nconfig_overrides:\n  image_size: 96\n"
                      "  refiner_feature_layers: [3, 1, 0]\n")
    model_args, _, _ = parse_args(["--config", str(config), "--clip", str(tiny_backbones["clip"])])
    _, overrides = backbone_sources(get_method("risclip"), model_args)
    assert overrides["image_size"] == 96 and overrides["refiner_feature_layers"] == [3, 1, 0]
    assert overrides["adapter_bottleneck_dim"] == 16  # the preset's value survives
    model_args, _, _ = parse_args(["--config", str(config), "--clip", str(tiny_backbones["clip"]),
                                   "--config_overrides", '{"image_size": 64}'])
    overrides = backbone_sources(get_method("risclip"), model_args)[1]
    assert overrides["image_size"] == 64 and "refiner_feature_layers" not in overrides  # the flag replaces the key


def test_benchmark_times_each_optimizer_implementation(tiny_backbones):
    result = benchmark.main(["--clip", str(tiny_backbones["clip"]), "--image_size", "64", "--batch_size", "2",
                             "--steps", "1", "--optimizer_implementations", "for-loop,fused"])
    for stage in ("locator", "refiner"):
        assert result[f"train_step_s[{stage}, for-loop]"] > 0 and result[f"train_step_s[{stage}, fused]"] > 0
        assert result[f"train_step_s[{stage}]"] == result[f"train_step_s[{stage}, fused]"]
        assert result[f"ratio train_step[{stage}, fused]/[{stage}, for-loop]"] == pytest.approx(
            result[f"train_step_s[{stage}, fused]"] / result[f"train_step_s[{stage}, for-loop]"])
    with pytest.raises(ValueError, match="optimizer_implementations"):
        benchmark.main(["--optimizer_implementations", "apex"])


@pytest.mark.parametrize("preset", ["risclip-tiny", "cris-tiny", "risam-tiny", "prompt-ris-tiny"])
def test_benchmark_reports_the_backbone_and_expression_ratios(tiny_backbones, preset):
    spec = benchmark.get_method(benchmark.PRESETS[preset].method)
    size = [] if preset == "risam-tiny" else ["--image_size", "64"]  # RISAM's input size is SAM's own
    backbones = [arg for name in spec.backbones for arg in (f"--{name}", str(tiny_backbones[name]))]
    result = benchmark.main(["--preset", preset, *backbones, *size, "--batch_size", "2", "--steps", "1",
                             "--optimizer_implementations", "auto"])
    # reported, not judged (no timing assertions): RISAM's ratio sits near 1, within the noise of one step
    assert result["ratio forward/backbones_forward"] > 0 and result["ratio 8_expressions/1_expression"] > 0
    assert ("share 8_expressions[clip towers alone]" in result) == ("clip" in spec.backbones)
    shares = {key: value for key, value in result.items() if key.startswith("share forward[")}
    assert len(shares) == len(benchmark.MODULE_SHARES[spec.name].split(","))
    assert all(0 < share < 1 for share in shares.values()), shares  # each module runs, inside the forward
    assert all(result[f"train_step_s[{stage}]"] > 0 for stage in spec.stages)
    if result["inference_extra_memory_mib"] is not None:  # Linux
        assert all(result[f"train_step_extra_memory_mib[{stage}]"] > 0 for stage in spec.stages)


def test_benchmark_refuses_an_input_size_sam_fixes(tiny_backbones):
    with pytest.raises(ValueError, match="image_size"):
        benchmark.main(["--preset", "risam-tiny", "--image_size", "64", "--steps", "1"])


def test_frozen_sam_keeps_no_activations_for_backward(tiny_backbones):
    """RISAM's training step needs less extra memory than the same step with SAM's image encoder trainable
    (then its activations are kept for backward): what running the frozen encoders without autograd saves."""
    import torch

    from refseg import RisamModel
    from refseg.presets import PRESETS

    model = RisamModel.from_backbones(sam=str(tiny_backbones["sam"]), clip=str(tiny_backbones["clip"]),
                                      **PRESETS["risam-tiny"].config_overrides)
    batch = {"pixel_values": torch.randn(4, 3, 256, 256), "input_ids": torch.randint(0, 1000, (4, 8)),
             "labels": (torch.rand(4, 256, 256) > 0.5).float()}

    def step():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    frozen = benchmark.peak_extra_memory_mib(step)
    model.sam.requires_grad_(True)
    step()
    trainable = benchmark.peak_extra_memory_mib(step)
    if frozen is None:
        assert not sys.platform.startswith("linux"), "the peak-memory reading must work on Linux"
        pytest.skip("peak-memory reading needs Linux's /proc/self/clear_refs")
    assert trainable > 1.5 * frozen, (frozen, trainable)


def test_benchmark_inference_only_in_two_dtypes_with_chosen_module_shares(tiny_backbones):
    result = benchmark.main(["--clip", str(tiny_backbones["clip"]), "--image_size", "64", "--batch_size", "2",
                             "--steps", "1", "--warmup", "0", "--skip_training", "--dtypes", "float32,bfloat16",
                             "--module_shares", "refiner,post_fusion"])
    assert not any(key.startswith(("train_step", "trainable_params", "ratio train_step")) for key in result)
    assert result["inference_forward_s"] > 0 and result["inference_forward_s[bfloat16]"] > 0
    assert result["ratio forward[bfloat16]/forward[float32]"] == pytest.approx(
        result["inference_forward_s[bfloat16]"] / result["inference_forward_s"])
    assert 0 < result["max_abs_logit_difference[bfloat16]"] < 1  # bf16 rounding, not another model
    assert sorted(k for k in result if k.startswith("share forward[")) == [
        "share forward[post_fusion]", "share forward[refiner]"]
    with pytest.raises(ValueError, match="dtypes"):
        benchmark.main(["--dtypes", "float32,half-ish"])
    with pytest.raises(ValueError, match="module_shares"):
        benchmark.main(["--clip", str(tiny_backbones["clip"]), "--image_size", "64", "--batch_size", "1",
                        "--steps", "1", "--warmup", "0", "--skip_training", "--module_shares", "no_such_module"])


def test_benchmark_times_one_chosen_stage_without_inference(tiny_backbones):
    result = benchmark.main(["--clip", str(tiny_backbones["clip"]), "--image_size", "64", "--batch_size", "2",
                             "--steps", "1", "--warmup", "0", "--stages", "refiner", "--skip_inference",
                             "--optimizer_implementations", "auto"])
    assert result["train_step_s[refiner]"] > 0 and result["trainable_params[refiner]"] > 0
    assert not any("locator" in key for key in result)
    assert not any(key.startswith(("inference", "share", "ratio 8")) for key in result)
    with pytest.raises(ValueError, match="stages"):
        benchmark.main(["--clip", str(tiny_backbones["clip"]), "--stages", "decoder"])


@pytest.mark.parametrize("preset", ["risam-tiny", "cris-tiny"])
def test_benchmark_reports_the_training_step_with_and_without_gradient_checkpointing(tiny_backbones, preset):
    spec = benchmark.get_method(benchmark.PRESETS[preset].method)
    size = [] if preset == "risam-tiny" else ["--image_size", "64"]
    backbones = [arg for name in spec.backbones for arg in (f"--{name}", str(tiny_backbones[name]))]
    result = benchmark.main(["--preset", preset, *backbones, *size, "--batch_size", "2", "--steps", "1",
                             "--warmup", "0", "--skip_inference", "--optimizer_implementations", "auto",
                             "--gradient_checkpointing"])
    for stage in spec.stages:
        assert result[f"train_step_s[{stage}, checkpointed]"] > 0
        if result[f"train_step_extra_memory_mib[{stage}]"] is not None:  # Linux
            assert result[f"train_step_extra_memory_mib[{stage}, checkpointed]"] > 0
            assert result[f"ratio train_step_extra_memory[{stage}, checkpointed]/[{stage}]"] == pytest.approx(
                result[f"train_step_extra_memory_mib[{stage}, checkpointed]"] / result[f"train_step_extra_memory_mib[{stage}]"])
