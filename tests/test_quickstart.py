"""scripts/quickstart.py (the README's main command) end to end, at toy size."""

import json

import pytest


@pytest.mark.slow
def test_quickstart_runs_every_step_and_prints_the_table(tmp_path, capsys):
    import quickstart

    work = tmp_path / "qs"
    argv = ["--workdir", str(work), "--num_images", "40", "--clip_pretraining_steps", "3", "--",
            "--stages", "locator:2,refiner:1", "--stage_unit", "steps", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--max_eval_samples", "6", "--checkpointing_steps", "0"]
    results = quickstart.main(argv)
    out = capsys.readouterr().out
    assert set(results) == {"val", "testA", "testB", "unseen"}
    for split, metrics in results.items():
        assert 0 <= metrics["mIoU"] <= 1 and 1 <= metrics["num_samples"] <= 6
        assert f"{100 * metrics['mIoU']:.2f}" in out  # the printed table, in percent
    assert json.loads((work / "model" / "eval_results.json").read_text())["results"] == results
    assert (work / "model" / "model.safetensors").is_file()
    assert (work / "backbones" / "clip-pretrained" / "model.safetensors").is_file()
    # then val by kind of expression (every val sentence), printed and written next to the model
    assert "val by kind of expression" in out
    by_kind = json.loads((work / "model" / "eval_refshapes_by_kind.json").read_text())["val"]
    full_val = json.loads((work / "model" / "eval_refshapes.json").read_text())["results"]["val"]
    assert sum(m["num_samples"] for m in by_kind.values()) == full_val["num_samples"] >= metrics["num_samples"]
    for kind in by_kind:
        assert f"val {kind}" in out

    # A second run reuses the data and the pretrained CLIP instead of rebuilding them.
    before = (work / "backbones" / "clip-pretrained" / "model.safetensors").stat().st_mtime_ns
    quickstart.main(argv)
    assert "reusing" in capsys.readouterr().out
    assert (work / "backbones" / "clip-pretrained" / "model.safetensors").stat().st_mtime_ns == before


def test_quickstart_says_how_many_steps_each_stage_runs():
    import quickstart

    config = quickstart.parse_args([]).config
    assert config.endswith("quickstart.yaml")
    assert quickstart.stage_plan(config, []) == "locator 1200 steps, refiner 400 steps"
    assert quickstart.stage_plan(config, ["--stages", "locator:2,refiner:1", "--seed", "3"]) == (
        "locator 2 steps, refiner 1 steps")
    for method, name in quickstart.QUICKSTART_CONFIGS.items():
        assert quickstart.parse_args(["--method", method]).config.endswith(name)
