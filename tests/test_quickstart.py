"""scripts/quickstart.py (the README's main command) end to end, at toy size."""

import json
from pathlib import Path

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


def test_quickstart_configs_parse_as_train_configs_of_their_method():
    import quickstart
    from train_args import parse_args

    for method, name in quickstart.QUICKSTART_CONFIGS.items():
        model_args, _, _ = parse_args(["--config", quickstart.parse_args(["--method", method]).config])
        assert model_args.method == method and model_args.preset == f"{method.replace('_', '-')}-tiny"


def test_quickstart_pretrains_the_backbones_each_method_builds_on():
    import quickstart
    from refseg.training import METHODS

    for method in quickstart.QUICKSTART_CONFIGS:
        assert set(quickstart.method_backbones(method)) == set(METHODS[method].backbones)
    assert quickstart.method_backbones("risclip") == ("clip",)
    assert quickstart.method_backbones("risam") == ("clip", "sam")
    with pytest.raises(ValueError, match="method"):
        quickstart.method_backbones("nope")
    args = quickstart.parse_args(["--method", "risam"])
    for name in ("clip", "sam"):
        expected = quickstart.METHOD_PRETRAINING_STEPS.get("risam", {}).get(name,
                                                                            quickstart.DEFAULT_PRETRAINING_STEPS[name])
        assert getattr(args, f"{name}_pretraining_steps") == expected
    assert quickstart.parse_args(["--sam_pretraining_steps", "0"]).sam_pretraining_steps == 0
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--sam_pretraining_steps", "-1"])


@pytest.fixture
def stubbed_quickstart(monkeypatch):
    """quickstart with every heavy step replaced by a stub that records its call (`calls`) and writes
    what the next run looks for; `train.main` returns fixed results."""
    import quickstart

    calls = []

    def make_refshapes(root, **kwargs):
        calls.append(("data", root))
        (root / "refshapes").mkdir(parents=True)
        (root / "refshapes" / "refs(unc).p").write_bytes(b"")
        return {"splits": {"train": {}}}

    def save_tiny_backbones(out, **kwargs):
        calls.append(("tiny", out))
        for name in ("clip", "sam"):
            (out / name).mkdir(parents=True)
            (out / name / "config.json").write_text("{}")
        return {"clip": out / "clip", "sam": out / "sam"}

    def pretrainer(name):
        def pretrain(raw, data, folder, *, steps, seed, **kwargs):
            calls.append((name, raw, folder, steps, kwargs))
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"")
            return folder
        return pretrain

    results = {"val": {"mIoU": 0.5, "oIoU": 0.5, "num_samples": 1}}

    def train_main(argv):
        calls.append(("train", argv))
        return results

    monkeypatch.setattr(quickstart, "make_refshapes", make_refshapes)
    monkeypatch.setattr(quickstart, "save_tiny_backbones", save_tiny_backbones)
    monkeypatch.setattr(quickstart, "pretrain_clip", pretrainer("clip"))
    monkeypatch.setattr(quickstart, "pretrain_sam", pretrainer("sam"))
    monkeypatch.setattr(quickstart.train, "main", train_main)
    monkeypatch.setattr(quickstart, "_evaluate_script", lambda: type("S", (), {"main": lambda argv: None}))
    monkeypatch.setattr(quickstart, "format_results_table", lambda r: "TABLE")
    return quickstart, calls


def test_quickstart_risam_pretrains_clip_and_sam_and_passes_both(stubbed_quickstart, tmp_path, capsys):
    quickstart, calls = stubbed_quickstart
    work = tmp_path / "qs"
    quickstart.main(["--workdir", str(work), "--method", "risam", "--clip_pretraining_steps", "7",
                     "--sam_pretraining_steps", "5"])
    out = capsys.readouterr().out
    labels = [line.split()[0] for line in out.splitlines() if line.startswith("[")]
    assert labels == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"], out
    assert "pretraining the tiny CLIP" in out and "pretraining the tiny SAM" in out
    backbones = work / "backbones"
    clip, sam = [c for c in calls if c[0] == "clip"], [c for c in calls if c[0] == "sam"]
    assert clip[0][1:4] == (backbones / "clip", backbones / "clip-pretrained", 7)
    assert sam[0][1:4] == (backbones / "sam", backbones / "sam-pretrained", 5)
    assert sam[0][4] == quickstart.SAM_PRETRAINING
    argv = [c for c in calls if c[0] == "train"][0][1]
    assert argv[argv.index("--sam") + 1] == str(backbones / "sam-pretrained")
    assert argv[argv.index("--clip") + 1] == str(backbones / "clip-pretrained")
    assert argv[argv.index("--output_dir") + 1] == str(work / "model-risam")
    assert argv[argv.index("--config") + 1].endswith("quickstart_risam.yaml")

    # a second run reuses data, backbones and both pretrained folders
    calls.clear()
    quickstart.main(["--workdir", str(work), "--method", "risam"])
    out = capsys.readouterr().out
    assert [c[0] for c in calls] == ["train"]
    assert out.count("reusing") == 3, out

    # steps 0: the random tiny SAM, not the cached pretrained one
    calls.clear()
    quickstart.main(["--workdir", str(work), "--method", "risam", "--sam_pretraining_steps", "0"])
    argv = [c for c in calls if c[0] == "train"][0][1]
    assert argv[argv.index("--sam") + 1] == str(backbones / "sam")
    assert "the random one, not pretrained" in capsys.readouterr().out


def test_quickstart_risclip_numbering_and_flags_are_unchanged(stubbed_quickstart, tmp_path, capsys):
    quickstart, calls = stubbed_quickstart
    quickstart.main(["--workdir", str(tmp_path / "qs")])
    out = capsys.readouterr().out
    labels = [line.split()[0] for line in out.splitlines() if line.startswith("[")]
    assert labels == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], out
    assert not [c for c in calls if c[0] == "sam"]
    argv = [c for c in calls if c[0] == "train"][0][1]
    assert "--sam" not in argv and argv[argv.index("--clip") + 1].endswith("clip-pretrained")
    assert [c[3] for c in calls if c[0] == "clip"] == [quickstart.DEFAULT_PRETRAINING_STEPS["clip"]]


def test_quickstart_adds_a_missing_tiny_backbone_without_rewriting_the_other(stubbed_quickstart, tmp_path):
    """A workdir from before SAM was built (backbones/clip only) gets backbones/sam; clip stays as it was."""
    quickstart, calls = stubbed_quickstart
    clip = tmp_path / "qs" / "backbones" / "clip"
    clip.mkdir(parents=True)
    (clip / "config.json").write_text('{"old": true}')
    quickstart.main(["--workdir", str(tmp_path / "qs"), "--method", "risam"])
    assert (clip / "config.json").read_text() == '{"old": true}'
    assert (clip.parent / "sam" / "config.json").is_file()
    assert not (clip.parent / ".tiny-tmp").exists()


def test_quickstart_generalized_trains_the_g_preset_on_grefshapes(stubbed_quickstart, tmp_path, capsys, monkeypatch):
    """--generalized: generalized RefShapes generated (grefshapes/), train.py gets `--dataset grefshapes --preset
    <tiny>-g` right after the method's own quickstart config (its schedule kept; the user's flags still win), the
    model lands in model-<method>-g, and no by-kind table (a RefShapes-grammar breakdown) follows."""
    quickstart, calls = stubbed_quickstart

    def make_refshapes(root, **kwargs):
        calls.append(("data", root, kwargs))
        for folder, marker in (("refshapes", "refs(unc).p"), ("grefshapes", "grefs(unc).json")):
            if folder == "refshapes" or kwargs.get("generalized"):
                (root / folder).mkdir(parents=True, exist_ok=True)
                (root / folder / marker).write_text("")
        return {"splits": {}, "generalized": {"val": {"refs": 1, "multi_target": 0, "no_target": 1}}}

    monkeypatch.setattr(quickstart, "make_refshapes", make_refshapes)
    evaluated = []
    monkeypatch.setattr(quickstart, "_evaluate_script", lambda: type("S", (), {"main": evaluated.append}))
    work = tmp_path / "qs"
    for method, preset in [("risclip", "risclip-tiny-g"), ("prompt_ris", "prompt-ris-tiny-g")]:
        calls.clear()
        quickstart.main(["--workdir", str(work), "--method", method, "--generalized", "--", "--seed", "9"])
        out = capsys.readouterr().out
        argv = [c for c in calls if c[0] == "train"][0][1]
        config = quickstart.QUICKSTART_CONFIGS[method]
        assert argv[:6] == ["--config", str(quickstart._SCRIPTS / "configs" / config), "--dataset", "grefshapes",
                            "--preset", preset]
        assert argv[argv.index("--output_dir") + 1] == str(work / f"model-{method}-g")
        assert argv[-2:] == ["--seed", "9"]
        assert "generalized RefShapes results of" in out and "presence head" in out
    assert [c for c in calls if c[0] == "data"] == []  # the second method reused the generalized data
    assert not evaluated
    # a plain quickstart in the same workdir still uses its own data marker and model folder
    calls.clear()
    quickstart.main(["--workdir", str(work)])
    argv = [c for c in calls if c[0] == "train"][0][1]
    assert "--dataset" not in argv and argv[argv.index("--output_dir") + 1] == str(work / "model")


def test_quickstart_generalized_generates_with_the_same_seed_and_count_or_refuses(stubbed_quickstart, tmp_path,
                                                                                   monkeypatch):
    quickstart, calls = stubbed_quickstart
    made = []
    monkeypatch.setattr(quickstart, "make_refshapes",
                        lambda root, **kwargs: made.append(kwargs) or {"generalized": {}})
    quickstart.main(["--workdir", str(tmp_path / "a"), "--generalized", "--num_images", "50", "--seed", "4"])
    assert made == [{"num_images": 50, "seed": 4, "generalized": True}]
    # RefShapes already there from another seed: generating grefshapes would rewrite its images
    refshapes = tmp_path / "b" / "data" / "refshapes"
    refshapes.mkdir(parents=True)
    (refshapes / "instances.json").write_text(json.dumps({"info": {"seed": 0}, "images": [{}] * 50}))
    with pytest.raises(ValueError, match="seed 0 and 50 images"):
        quickstart.main(["--workdir", str(tmp_path / "b"), "--generalized", "--num_images", "50", "--seed", "4"])
    assert len(made) == 1


def test_every_quickstart_config_has_a_generalized_twin_preset():
    import quickstart
    from refseg.presets import PRESETS

    for method, name in quickstart.QUICKSTART_CONFIGS.items():
        flags = quickstart.generalized_flags(quickstart._SCRIPTS / "configs" / name)
        assert flags[:2] == ["--dataset", "grefshapes"] and PRESETS[flags[3]].method == method
        assert PRESETS[flags[3]].config_overrides["no_target_head"] is True
    assert quickstart.parse_args(["--generalized"]).generalized and not quickstart.parse_args([]).generalized
    assert quickstart.model_folder(Path("w"), "risclip", generalized=True) == Path("w") / "model-risclip-g"
