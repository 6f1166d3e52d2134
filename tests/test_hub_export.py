"""Hub export: remote-code folder loading without refseg, model cards, push script (no network)."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import refseg.pipelines  # noqa: F401  (registers the pipeline task)
from refseg.hub import build_model_card, export, load_eval_results, module_closure
from refseg.hub.cards import backbone_card_license, backbone_sources_from_config, resolve_license
from refseg.hub.remote_code import flat_module_name

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the red circle", "the blue square"]
EVAL_RESULTS = {
    "val": {"oIoU": 0.612345, "mIoU": 0.634567, "precision@0.5": 0.7, "precision@0.9": 0.05, "num_samples": 40},
    "testA": {"oIoU": 0.5, "mIoU": 0.519999, "precision@0.5": 0.525, "precision@0.9": 0.0, "num_samples": 12},
}
# Table 1 of the RISCLIP paper: (mIoU, oIoU) per (dataset, split).
PAPER_B = {
    ("RefCOCO", "val"): (75.68, 74.82), ("RefCOCO", "testA"): (78.01, 76.64), ("RefCOCO", "testB"): (72.46, 71.06),
    ("RefCOCO+", "val"): (69.16, 67.64), ("RefCOCO+", "testA"): (73.53, 72.89), ("RefCOCO+", "testB"): (60.68, 59.33),
    ("RefCOCOg (UMD)", "val"): (67.62, 67.76), ("RefCOCOg (UMD)", "test"): (67.97, 69.05),
}
PAPER_L = {
    ("RefCOCO", "val"): (78.87, 76.92), ("RefCOCO", "testA"): (81.46, 80.99), ("RefCOCO", "testB"): (75.41, 73.04),
    ("RefCOCO+", "val"): (74.38, 69.33), ("RefCOCO+", "testA"): (78.77, 74.56), ("RefCOCO+", "testB"): (66.84, 61.87),
    ("RefCOCOg (UMD)", "val"): (71.82, 69.20), ("RefCOCOg (UMD)", "test"): (71.65, 70.19),
}
# Table 1 of the RISAM paper: (IoU, Pr@90) per (dataset, split); its "IoU" sums intersections and unions
# over all test expressions (Sec. 4.3), i.e. oIoU.
PAPER_RISAM_H = {
    ("RefCOCO", "val"): (76.20, 42.38), ("RefCOCO", "testA"): (78.92, 43.15), ("RefCOCO", "testB"): (71.84, 40.69),
    ("RefCOCO+", "val"): (66.37, 36.58), ("RefCOCO+", "testA"): (72.10, 38.18), ("RefCOCO+", "testB"): (57.33, 30.42),
    ("RefCOCOg (UMD)", "val"): (65.48, 29.94), ("RefCOCOg (UMD)", "test"): (66.60, 32.00),
    ("RefCOCOg (Google)", "val"): (64.78, 31.29),
}

# Runs in a fresh interpreter where `import refseg` is made impossible (refseg is installed in
# editable mode here, so a meta-path finder refuses it), loads the export with remote code and
# writes what it computed for the parent test to compare.
REMOTE_SCRIPT = r'''
import importlib.abc, json, sys

class RefuseRefseg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "refseg" or name.startswith("refseg."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None

sys.meta_path.insert(0, RefuseRefseg())
try:
    import refseg  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("refseg is importable in the remote-code check")

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor, pipeline

folder, image_path, out_path = sys.argv[1:4]
texts = json.loads(sys.argv[4])
image = Image.open(image_path)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=image, text=texts, return_tensors="pt")
inputs.pop("original_sizes")
with torch.no_grad():
    logits = model(**inputs).logits
segmenter = pipeline("referring-image-segmentation", model=folder, trust_remote_code=True)
results = segmenter(image, text=texts)
masks = torch.from_numpy(np.stack([np.asarray(r["mask"]) for r in results]))
save_file({"pixel_values": inputs["pixel_values"], "input_ids": inputs["input_ids"], "logits": logits,
           "masks": masks, "scores": torch.tensor([r["score"] for r in results], dtype=torch.float64)}, out_path)
loaded = sorted(m for m in sys.modules if m == "refseg" or m.startswith("refseg."))
classes = [type(model).__module__, type(processor).__module__, type(segmenter).__module__]
print(json.dumps({"refseg_modules": loaded, "classes": classes, "texts": [r["text"] for r in results]}))
'''



@pytest.fixture(scope="module")
def trained(tiny_trained_risclip):
    return tiny_trained_risclip


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """An evaluation file in the old bare `{split: metrics}` layout (it records no dataset)."""
    path = tmp_path_factory.mktemp("eval") / "eval_refshapes.json"
    path.write_text(json.dumps(EVAL_RESULTS))
    return path


@pytest.fixture(scope="module")
def exported(trained, eval_file, tmp_path_factory):
    model, processor, _ = trained
    out = tmp_path_factory.mktemp("export") / "risclip-tiny"
    return export(model, processor, out, card_data="risclip-tiny", eval_results=eval_file,
                  eval_dataset="refshapes", repo_id="refseg-test/risclip-tiny")


def test_export_writes_a_hub_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= names
    assert {"configuration_risclip.py", "modeling_risclip.py", "processing_risclip.py", "pipelines.py",
            "processing_utils.py", "modeling_outputs.py", "losses.py"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_risclip.RisclipConfig",
                                  "AutoModel": "modeling_risclip.RisclipModel"}
    assert config["custom_pipelines"]["referring-image-segmentation"] == {
        "impl": "pipelines.ReferringImageSegmentationPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    processor_config = json.loads((exported / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_risclip.RisclipProcessor"
    for path in exported.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (exported / f"{node.module}.py").is_file(), (path.name, node.module)
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [m for m in modules if m.split(".")[0] == "refseg"], path.name


def test_remote_code_loads_without_refseg_and_matches(trained, exported, tmp_path, make_scene):
    model, processor, _ = trained
    image = make_scene()
    image_path, out_path, script = tmp_path / "scene.png", tmp_path / "remote.safetensors", tmp_path / "remote.py"
    image.save(image_path)
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [sys.executable, str(script), str(exported), str(image_path), str(out_path), json.dumps(TEXTS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["refseg_modules"] == []
    assert all(c.startswith("transformers_modules.") for c in report["classes"]), report["classes"]
    assert report["texts"] == TEXTS
    remote = load_file(out_path)

    inputs = processor(images=image, text=TEXTS, return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(remote["pixel_values"], inputs["pixel_values"])
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(remote["logits"], logits, atol=1e-6, rtol=0)

    segmenter = refseg.pipelines.load_pipeline(str(exported))
    local = segmenter(image, text=TEXTS)
    assert torch.equal(remote["masks"], torch.from_numpy(np.stack([np.asarray(r["mask"]) for r in local])))
    torch.testing.assert_close(remote["scores"], torch.tensor([r["score"] for r in local], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_export_loads_with_refseg_classes(trained, exported, make_scene):
    from transformers import AutoModel, AutoProcessor

    from refseg import RisclipModel, RisclipProcessor

    model, processor, _ = trained
    reloaded = AutoModel.from_pretrained(exported).eval()
    assert type(reloaded) is RisclipModel
    assert type(AutoProcessor.from_pretrained(exported)) is RisclipProcessor
    inputs = processor(images=make_scene(), text=TEXTS, return_tensors="pt")
    inputs.pop("original_sizes")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_export_without_remote_code_and_overwrite_rules(trained, tmp_path):
    model, processor, _ = trained
    out = export(model, processor, tmp_path / "plain", remote_code=False, card_data="risclip-tiny")
    assert not list(out.glob("*.py"))
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "custom_code" not in ModelCard.load(out / "README.md").data.tags
    with pytest.raises(ValueError, match="out_dir"):
        export(model, processor, out, remote_code=False)
    assert export(model, processor, out, overwrite=True) == out
    assert (out / "modeling_risclip.py").is_file()


def parse_table(text, heading):
    """Rows (lists of cell strings) of the first Markdown table after `heading`."""
    section = text.split(heading, 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row] for row in rows[2:]]  # skip the header and the --- line


def test_card_metadata_and_measured_table_round_trip(exported):
    card = ModelCard.load(exported / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    assert data.license == "apache-2.0"
    assert {"refseg", "risclip", "referring-image-segmentation", "custom_code"} <= set(data.tags)
    assert data.model_name == "risclip-tiny"
    from_index = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert {r.dataset_type for r in data.eval_results} == {"refshapes"}
    expected = {(split, key): round(100 * value, 2) for split, metrics in EVAL_RESULTS.items()
                for key, value in metrics.items() if key != "num_samples"}
    assert from_index == expected

    rows = parse_table(card.content, "### Measured with refseg")
    header = ["oIoU", "mIoU", "precision@0.5", "precision@0.9"]
    parsed = {row[0]: row[1:] for row in rows}
    assert set(parsed) == set(EVAL_RESULTS)
    for split, metrics in EVAL_RESULTS.items():
        assert [float(c) for c in parsed[split][:4]] == [round(100 * metrics[k], 2) for k in header]
        assert int(parsed[split][4]) == metrics["num_samples"]
    assert "reports no results for this test-scale configuration" in card.content


@pytest.mark.parametrize("preset, paper", [("risclip-b", PAPER_B), ("risclip-l", PAPER_L)])
def test_paper_cards_keep_reported_numbers_apart(preset, paper, tmp_path):
    from refseg.presets import PRESETS

    path = tmp_path / "README.md"
    build_model_card(preset, repo_id=f"refseg-test/{preset}").save(path)
    card = ModelCard.load(path)
    assert card.data.base_model == PRESETS[preset].backbones["clip"]  # the CLIP checkpoint the preset builds on
    assert "jxu124/refcoco" in card.data.datasets
    assert card.data.eval_results is None  # paper numbers never enter model-index
    rows = parse_table(card.content, "### Reported in the paper")
    assert {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows} == paper
    measured = card.content.split("### Measured with refseg", 1)[1]
    assert "No evaluation results were supplied" in measured and "|" not in measured.split("## ")[0]
    assert card.content.index("### Reported in the paper") < card.content.index("### Measured with refseg")


def _base_model_line(card):
    return next(line for line in card.content.splitlines() if line.startswith("- **Base model:**"))


def test_risam_card_reports_table_1_as_oiou_and_names_both_base_models(tmp_path):
    from refseg.hub import load_card_info
    from refseg.presets import PRESETS

    path = tmp_path / "README.md"
    build_model_card("risam-h", repo_id="refseg-test/risam-h").save(path)
    card = ModelCard.load(path)
    backbones = PRESETS["risam-h"].backbones
    assert card.data.base_model == [backbones["sam"], backbones["clip"]]  # the SAM and the CLIP checkpoint
    assert card.data.base_model_relation == "finetune"  # backbones plus trained heads, not a merge
    assert _base_model_line(card) == f"- **Base model:** `{backbones['sam']}`, `{backbones['clip']}`"
    assert card.data.license == "apache-2.0"
    assert {"refseg", "risam", "sam", "clip", "referring-image-segmentation", "custom_code"} <= set(card.data.tags)
    assert "jxu124/refcocog" in card.data.datasets
    assert card.data.eval_results is None  # paper numbers never enter model-index
    rows = parse_table(card.content, "### Reported in the paper")
    assert [(r[0], r[1]) for r in rows] == list(PAPER_RISAM_H)
    assert {(r[0], r[1]): (r[2], float(r[3])) for r in rows} == {k: ("—", iou) for k, (iou, _) in PAPER_RISAM_H.items()}
    # Pr@90: kept per row in the card data, and written out (in table order) above the table
    reported = load_card_info("risam-h")["reported"]
    assert {(r["dataset"], r["split"]): r["precision@0.9"] for r in reported["rows"]} == {
        k: pr90 for k, (_, pr90) in PAPER_RISAM_H.items()}
    text = card.content.split("### Reported in the paper", 1)[1].split("| Dataset |", 1)[0]
    assert "oIoU" in text and "reports no mIoU" in text
    assert [float(x) for x in re.findall(r"\d+\.\d\d", text.split("Pr@90", 1)[1])] == [
        pr90 for _, pr90 in PAPER_RISAM_H.values()]
    measured = card.content.split("### Measured with refseg", 1)[1]
    assert "No evaluation results were supplied" in measured and "|" not in measured.split("## ")[0]
    assert card.content.index("### Reported in the paper") < card.content.index("### Measured with refseg")


def test_risam_tiny_card_shows_only_measured_numbers():
    card = build_model_card("risam-tiny", eval_results=EVAL_RESULTS, repo_id="refseg-test/risam-tiny")
    assert card.data.base_model is None and _base_model_line(card).endswith("none (randomly initialised backbone)")
    assert card.data.license == "apache-2.0" and {"risam", "tiny"} <= set(card.data.tags)
    assert "The RISAM paper reports no results for this test-scale configuration." in card.content
    # the bare results name no dataset: the card data's `evaluation_dataset`
    assert {r.dataset_type for r in card.data.eval_results} == {"refshapes"}
    rows = {row[0]: row[1:] for row in parse_table(card.content, "### Measured with refseg")}
    assert set(rows) == set(EVAL_RESULTS)
    assert float(rows["val"][0]) == round(100 * EVAL_RESULTS["val"]["oIoU"], 2)


def test_base_model_line_names_one_or_several_checkpoints():
    from refseg.hub.cards import base_model_text

    assert base_model_text("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert base_model_text(["facebook/sam-vit-huge", "openai/clip-vit-base-patch16"]) == (
        "facebook/sam-vit-huge`, `openai/clip-vit-base-patch16")
    assert base_model_text(None) is None and base_model_text([]) is None
    with pytest.raises(ValueError, match="base_model"):
        base_model_text(["facebook/sam-vit-huge", 3])
    # one base model (CRIS, RISCLIP): the line is a single code span, as before
    assert _base_model_line(build_model_card("cris-b")) == "- **Base model:** `openai/clip-vit-base-patch16`"


@pytest.mark.parametrize(
    "bad, match",
    [({"val": {"mIoU": 75.3}}, "fraction"), ({"val": {"mIoU": "high"}}, "fraction"), ({}, "non-empty"),
     ({"val": {"num_samples": -1}}, "num_samples"), ("/does/not/exist.json", "does not exist")],
)
def test_eval_results_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        load_eval_results(bad)


def test_unknown_card_name_is_refused():
    with pytest.raises(ValueError, match="card_data"):
        build_model_card("risclip-xxl")


def test_shipped_templates_match_hub_cards():
    repo, shipped = REPO_ROOT / "hub_cards", REPO_ROOT / "src" / "refseg" / "hub" / "templates"
    names = sorted(p.name for p in repo.iterdir() if p.is_file())
    assert names == sorted(p.name for p in shipped.iterdir() if p.is_file())
    for name in names:
        assert (repo / name).read_bytes() == (shipped / name).read_bytes(), f"copy hub_cards/{name} to {shipped}"


def test_module_closure_follows_refseg_imports_only():
    closure = module_closure(["refseg.models.risclip.modeling_risclip"])
    assert closure[0] == "refseg.models.risclip.modeling_risclip"
    assert {"refseg.models.risclip.configuration_risclip", "refseg.modeling_outputs", "refseg.losses"} <= set(closure)
    assert not [m for m in closure if m.split(".")[1] in ("data", "training", "metrics", "hub")]
    assert flat_module_name("refseg.models.risclip.modeling_risclip") == "modeling_risclip"
    assert flat_module_name("refseg.adapters.layers") == "adapters_layers"
    with pytest.raises(ValueError, match="module"):
        flat_module_name("refseg")


def test_push_script_writes_the_folder_without_pushing(trained, eval_file):
    _, _, saved = trained
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), "--model", str(saved),
         "--repo_id", "refseg-test/risclip-tiny", "--preset", "risclip-tiny", "--eval_results", str(eval_file)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "not uploaded" in completed.stdout
    out = saved / "hub-export"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_risclip.RisclipModel"
    card = ModelCard.load(out / "README.md")
    # the old bare layout records no dataset: the card data's `evaluation_dataset` names it
    assert {r.dataset_type for r in card.data.eval_results} == {"refshapes"}
    assert 'model="refseg-test/risclip-tiny"' in card.content


# ------------------------------------------------------------------ the evaluation record's dataset
def _record(dataset="refshapes", **extra):
    return {"dataset": dataset, "split_by": "unc", "scored_output": "logits", "global_step": 6,
            "results": EVAL_RESULTS, **extra}


def test_eval_results_accept_the_record_and_the_bare_layout(tmp_path):
    from refseg.training.evaluation import write_eval_results

    path = write_eval_results(tmp_path / "eval_results.json", EVAL_RESULTS, dataset="refcoco", split_by="unc",
                              global_step=6)
    expected = {"dataset": "refcoco", "split_by": "unc", "scored_output": "logits", "global_step": 6,
                "results": EVAL_RESULTS}
    assert load_eval_results(path) == expected
    assert load_eval_results(str(path)) == expected
    assert load_eval_results(json.loads(path.read_text())) == expected  # the record as a mapping
    bare = {"dataset": None, "split_by": None, "scored_output": None, "global_step": None, "results": EVAL_RESULTS}
    assert load_eval_results(EVAL_RESULTS) == bare
    (tmp_path / "bare.json").write_text(json.dumps(EVAL_RESULTS))
    assert load_eval_results(tmp_path / "bare.json") == bare


@pytest.mark.parametrize(
    "bad, match",
    [({"dataset": "refcoco", "results": {}}, "non-empty"), ({"dataset": 3, "results": EVAL_RESULTS}, "dataset"),
     ({"dataset": "refcoco", "global_step": -1, "results": EVAL_RESULTS}, "global_step"),
     ({"dataset": "refcoco", "results": {"val": {"mIoU": 75.3}}}, "fraction")],
)
def test_eval_records_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        load_eval_results(bad)


def _measured_dataset(card):
    types = {r.dataset_type for r in card.data.eval_results}
    names = {r.dataset_name for r in card.data.eval_results}
    measured = card.content.split("### Measured with refseg", 1)[1]
    shown = re.search(r"Measured on \*\*(.+?)\*\*", measured).group(1)
    return types, names, shown


def test_card_names_the_dataset_the_record_names(tmp_path):
    # The record's dataset beats the card data's default (risclip-b: refcoco) and the file's name.
    path = tmp_path / "eval_refcoco.json"
    path.write_text(json.dumps(_record("refshapes")))
    card = build_model_card("risclip-b", eval_results=path)
    assert _measured_dataset(card) == ({"refshapes"}, {"RefShapes (synthetic, generated with refseg)"},
                                       "RefShapes (synthetic, generated with refseg)")
    assert "after 6 optimizer steps" in card.content and "`logits`" in card.content
    # an explicit eval_dataset that agrees (any case) is fine; one that contradicts the record is not
    assert _measured_dataset(build_model_card("risclip-b", eval_results=path, eval_dataset="RefShapes"))[0] == {
        "refshapes"}
    with pytest.raises(ValueError, match="contradicts"):
        build_model_card("risclip-b", eval_results=path, eval_dataset="refcoco")
    # the split protocol the record names shows in the dataset's name
    card = build_model_card("risclip-b", eval_results=_record("refcocog", split_by="google"))
    assert _measured_dataset(card) == ({"jxu124/refcocog"}, {"RefCOCOg (GOOGLE)"}, "RefCOCOg (GOOGLE)")


def test_export_refuses_a_contradicting_dataset_before_writing(trained, tmp_path):
    model, processor, _ = trained
    with pytest.raises(ValueError, match="contradicts"):
        export(model, processor, tmp_path / "out", eval_results=_record("refshapes"), eval_dataset="refcoco")
    assert not (tmp_path / "out").exists()
    out = export(model, processor, tmp_path / "ok", remote_code=False, eval_results=_record("refshapes"))
    assert {r.dataset_type for r in ModelCard.load(out / "README.md").data.eval_results} == {"refshapes"}


def test_bare_results_never_take_the_dataset_from_the_file_name(tmp_path):
    path = tmp_path / "eval_refcoco.json"  # named like the old evaluate.py output
    path.write_text(json.dumps(EVAL_RESULTS))
    assert _measured_dataset(build_model_card("risclip-tiny", eval_results=path))[0] == {"refshapes"}
    assert _measured_dataset(build_model_card("risclip-tiny", eval_results=path, eval_dataset="refcoco+"))[0] == {
        "jxu124/refcocoplus"}
    with pytest.raises(ValueError, match="eval_dataset"):
        build_model_card(None, model_type="risclip", eval_results=path)  # no card default, no record


# ------------------------------------------------------------------------------------------ license
def _license_section(card):
    return card.content.split("## License", 1)[1].split("\n## ", 1)[0]


def _write_card(folder, header):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{header}\n---\n\n# a backbone\n")
    return folder


def test_every_card_has_a_license(tmp_path):
    # card data's license first
    card = build_model_card("risclip-tiny")
    assert card.data.license == "apache-2.0"
    card = build_model_card({"metadata": {"license": "cc-by-4.0"}}, backbones={"clip": str(tmp_path)})
    assert card.data.license == "cc-by-4.0"
    # no card data, no backbone card: an explicit `other`, and the card says what to do
    card = build_model_card(None, model_type="risclip")
    assert card.data.license == "other"
    section = _license_section(card)
    assert "license of these weights was not recorded" in section and "check the license" in section
    # no card data: the backbone's own model card
    mit = _write_card(tmp_path / "clip-mit", "license: mit\ntags: [clip]")
    card = build_model_card(None, model_type="risclip", backbones={"clip": str(mit)})
    assert card.data.license == "mit"
    assert "`mit`, taken from the model card of the backbone" in _license_section(card)


def test_backbone_licenses_must_agree(tmp_path):
    mit = _write_card(tmp_path / "clip", "license: mit")
    apache = _write_card(tmp_path / "sam", "license: apache-2.0")
    bare = tmp_path / "nocard"
    bare.mkdir()
    assert resolve_license({}, {"clip": str(mit), "sam": str(_write_card(tmp_path / "sam2", "license: mit"))})[0] == {
        "license": "mit"}
    fields, text = resolve_license({}, {"clip": str(mit), "sam": str(apache)})
    assert fields == {"license": "other"} and "clip: `mit`" in text and "sam: `apache-2.0`" in text
    assert resolve_license({}, {"clip": str(mit), "sam": str(bare)})[0] == {"license": "other"}
    assert resolve_license({}, {"clip": str(bare)})[0] == {"license": "other"}
    other = _write_card(tmp_path / "custom", "license: other\nlicense_name: custom\nlicense_link: LICENSE")
    assert resolve_license({}, {"clip": str(other)})[0] == {"license": "other", "license_name": "custom",
                                                             "license_link": "LICENSE"}


def test_backbone_license_from_the_local_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--some-org--tiny-clip" / "snapshots" / "abc123"
    _write_card(snapshot, "license: bsd-3-clause")
    (tmp_path / "hub" / "models--some-org--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--tiny-clip" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert backbone_card_license("some-org/tiny-clip") == {"license": "bsd-3-clause"}
    assert backbone_card_license("some-org/not-cached") is None
    assert backbone_card_license("not a repo id!") is None


def test_export_takes_the_license_from_the_backbone_the_config_records(trained, tiny_backbones, tmp_path):
    import shutil

    from refseg import RisclipModel, RisclipProcessor

    model, processor, _ = trained
    assert backbone_sources_from_config(model.config) == {"clip": str(tiny_backbones["clip"])}
    # the session's tiny CLIP folder has no model card: `other`, with the note
    card = ModelCard.load(export(model, processor, tmp_path / "plain", remote_code=False) / "README.md")
    assert card.data.license == "other" and "was not recorded" in _license_section(card)
    # a copy of that CLIP whose README says `license: mit`
    clip = tmp_path / "clip-mit"
    shutil.copytree(tiny_backbones["clip"], clip)
    _write_card(clip, "license: mit")
    model = RisclipModel.from_backbones(clip=str(clip), image_size=64)
    processor = RisclipProcessor.from_backbones(clip=str(clip), image_size=64)
    card = ModelCard.load(export(model, processor, tmp_path / "mit", remote_code=False) / "README.md")
    assert card.data.license == "mit"
    card = ModelCard.load(export(model, processor, tmp_path / "preset", remote_code=False,
                                 card_data="risclip-tiny") / "README.md")
    assert card.data.license == "apache-2.0"  # the card data's wins


PAPER_PROMPT_RIS_B = {  # Table 1 of the Prompt-RIS paper: (mIoU, oIoU)
    ("RefCOCO", "val"): (78.10, 76.36), ("RefCOCO", "testA"): (81.21, 80.37), ("RefCOCO", "testB"): (74.64, 72.29),
    ("RefCOCO+", "val"): (71.13, 67.06), ("RefCOCO+", "testA"): (76.60, 73.58), ("RefCOCO+", "testB"): (64.25, 58.96),
    ("RefCOCOg (Google)", "val"): (69.17, 64.79), ("RefCOCOg (UMD)", "val"): (70.47, 67.16),
    ("RefCOCOg (UMD)", "test"): (71.29, 69.01),
}


def test_prompt_ris_cards_keep_the_papers_table_apart_and_name_both_backbones(tmp_path):
    from refseg.presets import PRESETS

    path = tmp_path / "README.md"
    build_model_card("prompt-ris-b", repo_id="refseg-test/prompt-ris-b").save(path)
    card = ModelCard.load(path)
    backbones = PRESETS["prompt-ris-b"].backbones
    assert card.data.base_model == [backbones["clip"], backbones["sam"]]
    assert _base_model_line(card) == f"- **Base model:** `{backbones['clip']}`, `{backbones['sam']}`"
    assert {"refseg", "prompt_ris", "sam", "clip", "custom_code"} <= set(card.data.tags)
    assert card.data.eval_results is None  # paper numbers never enter model-index
    rows = parse_table(card.content, "### Reported in the paper")
    assert {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows} == PAPER_PROMPT_RIS_B
    assert "combined" in card.content.split("### Reported in the paper", 1)[1].split("| Dataset |", 1)[0]
    tiny = build_model_card("prompt-ris-tiny", eval_results=EVAL_RESULTS, repo_id="refseg-test/prompt-ris-tiny")
    assert "The Prompt-RIS paper reports no results for this test-scale configuration." in tiny.content
    assert {r.dataset_type for r in tiny.data.eval_results} == {"refshapes"}


def test_a_generalized_record_makes_a_card(tmp_path):
    """What `scripts/evaluate.py` writes for gRefCOCO-style data: gIoU / cIoU / N-acc / T-acc, the no-target count,
    and None for an accuracy over no sample (a split without no-target expressions)."""
    from refseg.metrics import summarize_generalized_counts

    with_none = summarize_generalized_counts([[3, 4, 3, 4], [0, 5, 5, 0], [0, 0, 0, 0]])
    without = summarize_generalized_counts([[3, 4, 3, 4], [2, 6, 4, 4]])
    assert without["N-acc"] is None and without["num_no_target"] == 0
    record = {"dataset": "grefshapes", "split_by": "unc", "scored_output": "logits", "global_step": 9,
              "results": {"val": with_none, "testA": without}}
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps(record))
    card = build_model_card("risclip-b", eval_results=path)
    table = card.content[card.content.index("| gIoU"):]
    header = table.splitlines()[0]
    for name in ("gIoU", "cIoU", "N-acc", "T-acc", "No-target expressions"):
        assert name in header
    row = next(line for line in table.splitlines() if line.startswith("| testA"))
    assert " - " in row  # N-acc over no sample
    assert f"{100 * with_none['gIoU']:.2f}" in table
    metrics = {(e.dataset_split, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert metrics[("val", "N-acc")] == round(100 * with_none["N-acc"], 2)
    assert ("testA", "N-acc") not in metrics  # None never reaches model-index
    assert {e.dataset_name for e in card.data.eval_results} == {"generalized RefShapes (synthetic, generated with refseg)"}


def test_a_presence_head_preset_gets_its_base_card_with_the_difference_said():
    base, card = build_model_card("risclip-b"), build_model_card("risclip-b-g")
    assert "with a presence head" in card.content and "not part of the paper" in card.content
    assert "generalized-referring-segmentation" in card.data.tags
    assert "generalized-referring-segmentation" not in base.data.tags
    # the paper's table is the base card's, kept apart as "reported in the paper"
    reported = lambda c: c.content.split("### Measured with refseg", 1)[0].split("Reported in the paper", 1)[-1]
    assert reported(card) == reported(base)
    with pytest.raises(ValueError, match="-g"):
        build_model_card("risclip-xxl-g")
