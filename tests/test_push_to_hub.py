"""scripts/push_to_hub.py on what scripts/train.py really writes: the card names the dataset the run
recorded in `<output_dir>/eval_results.json` (never a file name), and carries a license."""

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from refseg.training.evaluation import read_eval_results

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def trained_run(tiny_backbones, refshapes_root, tmp_path_factory):
    """A couple of training steps of the tiny RISCLIP on RefShapes with scripts/train.py, on a copy of the
    tiny CLIP whose model card says `license: mit`; returns the run's output folder."""
    import train

    work = tmp_path_factory.mktemp("push")
    clip = work / "clip-mit"
    shutil.copytree(tiny_backbones["clip"], clip)
    (clip / "README.md").write_text("---\nlicense: mit\ntags: [clip]\n---\n\n# tiny CLIP\n")
    out = work / "run"
    args = {
        "method": "risclip", "clip": str(clip), "dataset": "refshapes", "data_root": str(refshapes_root),
        "output_dir": str(out), "seed": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3, "stages": "locator:1,refiner:1", "stage_unit": "steps", "eval_splits": "val,testA",
        "max_eval_samples": 6, "report_to": "none", "logging_steps": 1,
        "config_overrides": json.dumps({"image_size": 64}),
    }
    train.main([token for key, value in args.items() for token in (f"--{key}", str(value))])
    return out


def _push(run, out_dir, *extra):
    import push_to_hub

    push_to_hub.main(["--model", str(run), "--repo_id", "refseg-test/risclip-tiny-run", "--out_dir", str(out_dir),
                      "--eval_results", str(run / "eval_results.json"), *extra])
    return ModelCard.load(out_dir / "README.md")


def _measured(card):
    section = card.content.split("### Measured with refseg", 1)[1].split("\n## ", 1)[0]
    return re.search(r"Measured on \*\*(.+?)\*\*", section).group(1), section


def test_card_names_the_dataset_train_py_recorded(trained_run, tmp_path, capsys):
    record = read_eval_results(trained_run / "eval_results.json")
    assert record["dataset"] == "refshapes" and set(record["results"]) == {"val", "testA"}

    # no --preset, no --eval_dataset: the dataset comes from the record alone
    card = _push(trained_run, tmp_path / "generic")
    assert "on refshapes (recorded in the file)" in capsys.readouterr().out
    shown, section = _measured(card)
    assert shown == "RefShapes (synthetic, generated with refseg)"
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {
        ("refshapes", "RefShapes (synthetic, generated with refseg)")}
    assert {r.dataset_split for r in card.data.eval_results} == {"val", "testA"}
    assert f"after {record['global_step']} optimizer steps" in section
    assert "**results**" not in card.content and "**eval_results**" not in card.content
    assert not {f for r in card.data.eval_results for f in (r.dataset_type, r.dataset_name)} & {
        "results", "eval_results"}
    # the license of the backbone this run was built from
    assert card.data.license == "mit"

    # with a preset: its evaluation_dataset (refshapes) agrees, and its license wins
    card = _push(trained_run, tmp_path / "preset", "--preset", "risclip-tiny", "--eval_dataset", "RefShapes")
    assert _measured(card)[0] == "RefShapes (synthetic, generated with refseg)"
    assert card.data.license == "apache-2.0"
    # the risclip-b card's default (refcoco) does not override what the run recorded
    card = _push(trained_run, tmp_path / "paper-card", "--preset", "risclip-b")
    assert {r.dataset_type for r in card.data.eval_results} == {"refshapes"}


def test_eval_dataset_that_contradicts_the_record_is_refused(trained_run, tmp_path):
    with pytest.raises(ValueError, match="contradicts.*'refshapes'"):
        _push(trained_run, tmp_path / "bad", "--eval_dataset", "refcoco")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_evaluate_py_writes_a_record_push_to_hub_reads(trained_run, refshapes_root, tmp_path):
    import importlib.util

    from refseg.training.evaluation import EVAL_RECORD_KEYS

    # scripts/evaluate.py shares its file name with the `evaluate` package: load it by path
    spec = importlib.util.spec_from_file_location("refseg_evaluate_script", SCRIPTS / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "metrics.json"  # a name that says nothing about the dataset
    results = script.main(["--model", str(trained_run), "--dataset", "refshapes", "--data_root", str(refshapes_root),
                           "--split", "val", "--max_samples", "6", "--output", str(output)])
    written = json.loads(output.read_text())
    assert set(written) == set(EVAL_RECORD_KEYS)
    assert written == {"dataset": "refshapes", "split_by": "unc", "scored_output": "logits", "global_step": None,
                       "results": results}
    # the training run's own final evaluation scored the same model on the same sentences
    assert results["val"] == read_eval_results(trained_run / "eval_results.json")["results"]["val"]

    import push_to_hub

    push_to_hub.main(["--model", str(trained_run), "--repo_id", "refseg-test/risclip-tiny-run",
                      "--out_dir", str(tmp_path / "export"), "--eval_results", str(output)])
    card = ModelCard.load(tmp_path / "export" / "README.md")
    assert _measured(card)[0] == "RefShapes (synthetic, generated with refseg)"
    assert {r.dataset_split for r in card.data.eval_results} == {"val"}


def test_evaluate_py_passes_the_metric_conventions(trained_on_two_referents, refshapes_root, tmp_path, monkeypatch):
    """`--precision_comparison` and `--empty_iou` reach the metric, for the splits and the by-kind table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refseg_evaluate_conventions", SCRIPTS / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = []
    original = script.summarize_counts

    def recording(counts, *args, **kwargs):
        seen.append(kwargs)
        return original(counts, *args, **kwargs)

    monkeypatch.setattr(script, "summarize_counts", recording)
    folder = trained_on_two_referents("risclip")[2]
    script.main(["--model", str(folder), "--data_root", str(refshapes_root), "--split", "val", "--max_samples", "4",
                 "--precision_comparison", ">=", "--empty_iou", "0", "--output", str(tmp_path / "eval.json")])
    assert seen == [{"precision_comparison": ">=", "empty_iou": 0}]
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "m", "--empty_iou", "2"])
