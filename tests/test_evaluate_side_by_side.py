"""`scripts/evaluate.py --model A --model B`: one table, one record per model, the PNG grid of examples and a
progress bar in sentences/s."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.training.evaluation import (
    EVAL_RECORD_KEYS, EXAMPLE_CAPTION, EXAMPLE_CELL, format_comparison_table, render_examples,
)

from test_baselines_clipseg import save_stock_clipseg
from test_baselines_sam3 import save_stock_sam3

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
pytestmark = pytest.mark.usefixtures("single_thread")


def _script():
    spec = importlib.util.spec_from_file_location("refseg_evaluate_side_by_side", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_two_models_side_by_side_with_examples(tiny_backbones, refshapes_root, tmp_path, capsys):
    # the two baselines, side by side on the same sentences
    models = [save_stock_clipseg(tmp_path / "clipseg", tiny_backbones["clip"]),
              save_stock_sam3(tmp_path / "sam3", tiny_backbones["clip"])]
    pictures = tmp_path / "pictures"
    results = _script().main(["--model", str(models[0]), "--model", str(models[1]), "--data_root",
                              str(refshapes_root), "--split", "val,testA", "--max_samples", "4", "--batch_size", "3",
                              "--save_examples", "3", str(pictures)])
    captured = capsys.readouterr()
    assert set(results) == {"clipseg", "sam3"}
    for folder in models:  # each model's record, in the one format train.py writes too
        record = json.loads((folder / "eval_refshapes.json").read_text())
        assert set(record) == set(EVAL_RECORD_KEYS) and record["results"] == results[folder.name]
        assert {split: m["num_samples"] for split, m in record["results"].items()} == {"val": 4, "testA": 4}
    assert results["clipseg"]["val"] != results["sam3"]["val"]  # two different models
    table, after = captured.out.split("side by side:")[1].strip().split("\n3 examples drawn in ")
    table = table.splitlines()
    assert table[0].split()[:3] == ["model", "split", "oIoU"] and len(table) == 2 + 4
    assert after.strip() == str(pictures / "examples.png")
    assert [line.split()[:2] for line in table[2:]] == [["clipseg", "val"], ["clipseg", "testA"],
                                                        ["sam3", "val"], ["sam3", "testA"]]
    assert "sentences/s" in captured.err  # the progress bar counts sentences

    with Image.open(pictures / "examples.png") as grid:
        assert grid.size == ((2 + 2) * EXAMPLE_CELL, 3 * (EXAMPLE_CELL + EXAMPLE_CAPTION))
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    assert pixels.std() > 20  # not blank
    first_panel = pixels[:EXAMPLE_CELL, :EXAMPLE_CELL]
    assert (first_panel != 255).any(axis=-1).mean() > 0.3  # the image is drawn in the first column


def test_render_examples_tints_each_mask_and_checks_its_input(tmp_path):
    image = Image.new("RGB", (40, 20), (128, 128, 128))
    target = np.zeros((20, 40), dtype=bool)
    target[:, :20] = True
    examples = [{"image": image, "text": "the left half", "target": target,
                 "predictions": [("model", ~target, 0.0)]}]
    path = render_examples(examples, tmp_path / "sub" / "grid.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    middle = EXAMPLE_CELL // 2
    ground_truth, prediction = pixels[middle, EXAMPLE_CELL:2 * EXAMPLE_CELL], pixels[middle, 2 * EXAMPLE_CELL:]
    left, right = EXAMPLE_CELL // 4, 3 * EXAMPLE_CELL // 4
    assert ground_truth[left][1] > ground_truth[left][0] and tuple(ground_truth[right]) == (128, 128, 128)
    assert prediction[right][0] > prediction[right][1] and tuple(prediction[left]) == (128, 128, 128)
    with pytest.raises(ValueError, match="empty"):
        render_examples([], tmp_path / "none.png")
    with pytest.raises(ValueError, match="predictions"):
        render_examples(examples + [dict(examples[0], predictions=[])], tmp_path / "bad.png")


def test_comparison_table_and_argument_checks(tmp_path):
    metrics = {"oIoU": 0.5, "mIoU": 0.25, **{f"precision@{t}": 0.1 for t in (0.5, 0.6, 0.7, 0.8, 0.9)},
               "num_samples": 7}
    lines = format_comparison_table({"a": {"val": metrics}, "b": {"val": metrics}}).splitlines()
    assert lines[2].split()[:4] == ["a", "val", "50.00", "25.00"] and lines[3].split()[0] == "b"
    script = _script()
    with pytest.raises(ValueError, match="--output"):
        script.parse_args(["--model", "a", "--model", "b", "--output", "x.json"])
    with pytest.raises(ValueError, match="--save_examples"):
        script.parse_args(["--model", "a", "--save_examples", "none", "dir"])
    args = script.parse_args(["--model", "org/a", "--model", "org/b"])
    assert script.output_path(args, "org/a") == Path("eval_refshapes_org__a.json")
    folders = [tmp_path / "x" / "m", tmp_path / "y" / "m", tmp_path / "z"]
    for folder in folders:
        folder.mkdir(parents=True)
    # folders by name, unless two share one; Hub ids as they are
    assert script.model_labels([*map(str, folders), "org/a"]) == [str(folders[0]), str(folders[1]), "z", "org/a"]
