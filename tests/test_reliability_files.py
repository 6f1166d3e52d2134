"""Damaged data files: every reader's error names the file.

A copy of the session's RefShapes annotations is damaged one way at a time (the images stay where they
are): a truncated `refs(unc).p`, one claiming a pickle protocol newer than Python reads, an
`instances.json` cut in half; and parquet copies with a column missing or the file cut short.
"""

import json
import pickle
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_parquet import jxu124_rows

from refseg.data import load_refer, load_refer_parquet, load_refs_pickle


@pytest.fixture
def refer_copy(refshapes_root, tmp_path):
    """`(root, refs path, instances path, image_root)`: the annotations copied, the images shared."""
    shutil.copytree(refshapes_root / "refshapes", tmp_path / "refshapes")
    return (tmp_path, tmp_path / "refshapes" / "refs(unc).p", tmp_path / "refshapes" / "instances.json",
            refshapes_root / "images")


def load(root, image_root):
    return load_refer(root, "refshapes", "unc", "val", image_root=image_root)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.999])
def test_a_truncated_refs_pickle_is_refused_naming_the_file(refer_copy, keep):
    root, refs, _, images = refer_copy
    data = refs.read_bytes()
    refs.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(pickle.UnpicklingError, match="not a valid pickle") as info:
        load(root, images)
    assert str(info.value).startswith(str(refs))


def test_a_refs_pickle_of_a_newer_protocol_is_refused_naming_the_file_and_the_protocol(refer_copy):
    root, refs, _, images = refer_copy
    data = pickle.dumps(load_refs_pickle(refs), protocol=pickle.HIGHEST_PROTOCOL)
    refs.write_bytes(bytes([data[0], pickle.HIGHEST_PROTOCOL + 1]) + data[2:])
    with pytest.raises(pickle.UnpicklingError, match=f"protocol {pickle.HIGHEST_PROTOCOL + 1}, newer") as info:
        load(root, images)
    assert str(info.value).startswith(str(refs))


def test_instances_json_cut_in_half_is_refused_naming_the_file(refer_copy):
    root, _, instances, images = refer_copy
    text = instances.read_text()
    instances.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not a valid JSON file") as info:
        load(root, images)
    assert str(instances) in str(info.value)
    instances.write_bytes(b"\xff\xfe" + text.encode()[:100])  # not even UTF-8
    with pytest.raises(ValueError, match="not a valid JSON file"):
        load(root, images)


@pytest.fixture
def parquet_file(refshapes_root, tmp_path):
    refs = load_refs_pickle(refshapes_root / "refshapes" / "refs(unc).p")
    instances = json.loads((refshapes_root / "refshapes" / "instances.json").read_text())
    path = tmp_path / "val-0.parquet"
    pq.write_table(pa.Table.from_pylist(jxu124_rows([r for r in refs if r["split"] == "val"][:4], instances)), path)
    return path, refshapes_root / "images"


@pytest.mark.parametrize("column", ["ref_id", "raw_anns", "split"])
def test_a_parquet_file_with_a_column_missing_is_refused_naming_the_file(parquet_file, column):
    path, images = parquet_file
    pq.write_table(pq.read_table(path).drop([column]), path)
    with pytest.raises(ValueError, match=f"is missing columns \\['{column}'\\]") as info:
        load_refer_parquet(path, images, split="val" if column != "split" else None)
    assert str(path) in str(info.value)


def test_a_parquet_file_cut_short_is_refused_naming_the_file(parquet_file):
    path, images = parquet_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:  # pyarrow's ArrowInvalid is a ValueError
        load_refer_parquet(path, images)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ nothing unpickles data it did not write
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESTRICTED_UNPICKLER = REPO / "src" / "refseg" / "data" / "unpickle.py"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "pandas", "pd"}


def unsafe_loads(source: str) -> list:
    """`(line, call)` of every call that may unpickle: `pickle.load(s)`/`Unpickler` (and the like from
    dill, joblib, cloudpickle), `pandas.read_pickle`, `numpy.load(..., allow_pickle=True)`, a
    `torch.load` without `weights_only=True`, and those names imported bare (`from pickle import load`)."""
    tree = ast.parse(source)
    bare = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] in PICKLE_MODULES | {"torch"} for alias in node.names
            if alias.name in ("load", "loads", "Unpickler", "read_pickle")}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, owner = node.func, None
        if isinstance(func, ast.Attribute):
            name = func.attr
            owner = func.value.id if isinstance(func.value, ast.Name) else getattr(func.value, "attr", None)
        elif isinstance(func, ast.Name) and func.id in bare:
            name = func.id
        else:
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        safe_torch = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
        if owner == "torch" and name == "load" and not safe_torch:
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif owner in PICKLE_MODULES and name in ("load", "loads", "Unpickler", "read_pickle"):
            found.append((node.lineno, f"{owner}.{name}"))
        elif owner in ("np", "numpy") and name == "load" and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                and keywords["allow_pickle"].value:
            found.append((node.lineno, "numpy.load(allow_pickle=True)"))
        elif owner is None and name in bare:
            found.append((node.lineno, f"{name} imported from a pickling module"))
    return found


def test_the_scanner_finds_every_kind_of_unsafe_load():
    source = ("import pickle, torch, numpy as np\nfrom pickle import loads\npickle.load(f)\ntorch.load(p)\n"
              "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\nloads(b)\npickle.Unpickler(f)\n"
              "torch.load(p, map_location='cpu', weights_only=True)\njson.load(f)\n")
    assert [line for line, _ in unsafe_loads(source)] == [3, 4, 5, 6, 7, 8]


def test_nothing_in_the_package_the_scripts_or_the_space_unpickles_outside_the_restricted_unpickler():
    files = [p for folder in ("src/refseg", "scripts", "spaces") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 40
    offending = {str(p.relative_to(REPO)): hits for p in files if p != RESTRICTED_UNPICKLER
                 for hits in [unsafe_loads(p.read_text(encoding="utf-8"))] if hits}
    assert not offending, offending
