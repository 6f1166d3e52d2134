"""scripts/benchmark.py: config overrides reach the measured model; bad overrides are refused."""

import json

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


def test_empty_config_overrides_are_no_overrides():
    assert parse_config_overrides(None) == {} == parse_config_overrides("")
    assert parse_config_overrides('{"image_size": 64}') == {"image_size": 64}
