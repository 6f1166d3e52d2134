"""Training on several refer datasets together without their held-out images (`load_refer_mixture`),
and the training data path that reads it (`dataset: refcoco,refcocog`, evaluation splits `<dataset>:<split>`)."""

import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from refseg.data import held_out_image_ids, load_refer_mixture

REFCOCO_SPLITS = ("train", "val", "testA", "testB")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """RefShapes rewritten as a "refcoco" (unc) and a "refcocog" (umd) over the same images, with
    different splits: refcocog holds out images that refcoco trains on, and trains on some of refcoco's
    held-out images, as the real datasets do."""
    from refseg.data import make_refshapes

    root = tmp_path_factory.mktemp("mixture")
    make_refshapes(root, num_images=16, seed=3)
    refs = pickle.loads((root / "refshapes" / "refs(unc).p").read_bytes())
    image_ids = sorted({ref["image_id"] for ref in refs})
    for name, split_by, split_of in (
        ("refcoco", "unc", lambda image: REFCOCO_SPLITS[0] if image % 3 else REFCOCO_SPLITS[1 + image % 2]),
        ("refcocog", "umd", lambda image: "train" if image % 4 else ("val", "test")[image // 4 % 2]),
    ):
        folder = root / name
        folder.mkdir()
        shutil.copy(root / "refshapes" / "instances.json", folder / "instances.json")
        rewritten = [dict(ref, split=split_of(ref["image_id"])) for ref in refs]
        (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(rewritten))
    return root, refs, image_ids


def test_mixture_is_the_union_of_train_splits_without_any_held_out_image(two_datasets):
    root, refs, _ = two_datasets
    raw = {name: pickle.loads((root / name / f"refs({sb}).p").read_bytes())
           for name, sb in (("refcoco", "unc"), ("refcocog", "umd"))}
    held_out = {ref["image_id"] for rows in raw.values() for ref in rows if ref["split"] != "train"}
    expected = sorted((ref["ref_id"], ref["image_id"]) for rows in raw.values() for ref in rows
                      if ref["split"] == "train" and ref["image_id"] not in held_out)
    assert 0 < len(expected) < sum(ref["split"] == "train" for rows in raw.values() for ref in rows)

    mixture = load_refer_mixture(root, [("refcoco", "unc"), ("refcocog", "umd")])
    assert sorted(zip(mixture["ref_id"], mixture["image_id"])) == expected
    assert not held_out & set(mixture["image_id"])
    assert set(mixture["split"]) == {"train"}
    assert held_out_image_ids(root, "refcoco", "unc") | held_out_image_ids(root, "refcocog", "umd") == held_out

    plain = load_refer_mixture(root, [("refcoco", "unc"), ("refcocog", "umd")], remove_held_out_images=False)
    assert len(plain) == sum(ref["split"] == "train" for rows in raw.values() for ref in rows)
    # The masks travel with their refs: a row's mask is its own ref's, whatever its position.
    single = load_refer_mixture(root, [("refcocog", "umd")], remove_held_out_images=False)
    by_ref = {(r, i): m for r, i, m in zip(single["ref_id"], single["image_id"], single["mask"])}
    for ref_id, image_id, mask in zip(mixture["ref_id"][-3:], mixture["image_id"][-3:], mixture["mask"][-3:]):
        assert np.array_equal(np.asarray(by_ref[(ref_id, image_id)]), np.asarray(mask))


def test_mixture_arguments_are_checked(two_datasets):
    root, _, _ = two_datasets
    with pytest.raises(ValueError, match="sources"):
        load_refer_mixture(root, [])
    with pytest.raises(ValueError, match="repeated"):
        load_refer_mixture(root, [("refcoco", "unc"), ("refcoco", "unc")])
    with pytest.raises(ValueError, match="split"):
        load_refer_mixture(root, [("refcoco", "unc"), ("refcocog", "umd")], split="testA")  # G-Ref has no testA
    with pytest.raises(FileNotFoundError, match="refcoco\\+"):
        load_refer_mixture(root, [("refcoco+", "unc")])


def _data_args(root, **overrides):
    fields = dict(dataset="refcoco,refcocog", split_by=None, data_root=str(root), image_root=None,
                  parquet_files=None, train_split="train", eval_splits="refcocog:val,refcoco:testA",
                  max_train_samples=None, max_eval_samples=None, refshapes_num_images=0, refshapes_seed=0)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_training_data_reads_a_mixture_and_names_its_evaluation_splits(two_datasets):
    from refseg.training.data import load_eval_splits, load_train_split, resolve_split_by

    root, _, _ = two_datasets
    args = _data_args(root)
    assert resolve_split_by(args) == "unc,umd"
    train = load_train_split(args)
    assert len(train) == len(load_refer_mixture(root, [("refcoco", "unc"), ("refcocog", "umd")]))
    evals = load_eval_splits(args)
    assert list(evals) == ["refcocog:val", "refcoco:testA"]
    with pytest.raises(ValueError, match="<dataset>:<split>"):
        load_eval_splits(_data_args(root, eval_splits="val"))
    with pytest.raises(ValueError, match="one split per dataset"):
        load_train_split(_data_args(root, split_by="unc"))
    with pytest.raises(ValueError, match="refcocoX"):
        load_train_split(_data_args(root, dataset="refcoco,refcocoX"))


# ------------------------------------------------------------------ reproduction recipes
CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "scripts" / "configs"
RECIPE_KEYS_THAT_DIFFER = {"split_by", "eval_splits", "output_dir", "dataset", "global_batch_size",
                           "per_device_train_batch_size"}


def _yaml(name):
    import yaml

    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("preset", ["risclip-b", "cris-b", "risam-h", "prompt-ris-b"])
def test_every_method_has_a_google_split_recipe_equal_to_its_umd_one_but_for_the_split(preset):
    from train_args import parse_args

    google, umd = _yaml(f"{preset}_refcocog-google.yaml"), _yaml(f"{preset}_refcocog.yaml")
    assert (google["dataset"], google["split_by"], google["eval_splits"]) == ("refcocog", "google", "val")
    assert {k: v for k, v in google.items() if k not in RECIPE_KEYS_THAT_DIFFER} == {
        k: v for k, v in umd.items() if k not in RECIPE_KEYS_THAT_DIFFER}
    _, data_args, _ = parse_args(["--config", str(CONFIGS / f"{preset}_refcocog-google.yaml")])
    assert data_args.split_by == "google"


@pytest.mark.parametrize("name, base, batch", [
    ("prompt-ris-b_refcoco-mixed.yaml", "prompt-ris-b_refcoco.yaml", 64),  # Prompt-RIS Sec. 4.2
    ("risclip-b_refcoco-mixed.yaml", "risclip-b_refcoco.yaml", 96),  # RISCLIP Table A5
    ("risclip-l_refcoco-mixed.yaml", "risclip-l_refcoco.yaml", 56),
])
def test_combined_recipes_train_on_the_three_datasets_and_evaluate_each_split(name, base, batch):
    from refseg.data import SUPPORTED_SPLITS
    from refseg.training.data import mixture_sources
    from train_args import parse_args

    _, data_args, train_args = parse_args(["--config", str(CONFIGS / name)])
    sources = mixture_sources(data_args)
    assert sources == [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")]
    expected = [f"{d}:{s}" for d, sb in sources for s in SUPPORTED_SPLITS[(d, sb)] if s != "train"]
    assert data_args.eval_splits.split(",") == expected
    assert train_args.global_batch_size == batch
    mixed, single = _yaml(name), _yaml(base)
    assert {k: v for k, v in mixed.items() if k not in RECIPE_KEYS_THAT_DIFFER} == {
        k: v for k, v in single.items() if k not in RECIPE_KEYS_THAT_DIFFER}
