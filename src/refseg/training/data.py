"""Datasets for training and evaluation, from the refer format, parquet copies or RefShapes; generalized
datasets (`GENERALIZED_DATASETS`: gRefCOCO and generalized RefShapes, read with `refseg.data.load_grefer`)."""

import glob
import json
import logging
from pathlib import Path

from .samples import EvalSamples

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_BY = {"refshapes": "unc", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd",
                    "grefcoco": "unc", "grefshapes": "unc"}
# Datasets whose expressions may name no object or several (gRefCOCO's format): evaluated with the
# generalized metrics (gIoU, cIoU, N-acc, T-acc; `refseg.metrics.summarize_generalized_counts`).
GENERALIZED_DATASETS = ("grefcoco", "grefshapes")


def is_generalized(data_args) -> bool:
    """Whether `data_args.dataset` is a generalized dataset (`GENERALIZED_DATASETS`)."""
    return data_args.dataset.strip() in GENERALIZED_DATASETS


def mixture_sources(data_args) -> list:
    """`[(dataset, split_by), ...]` of a comma-separated `data_args.dataset` ("refcoco,refcoco+,refcocog"),
    `split_by` comma-separated alike or empty (each dataset's usual split); one pair for one dataset."""
    names = [d.strip() for d in data_args.dataset.split(",")]
    split_bys = [s.strip() for s in (data_args.split_by or "").split(",")] if data_args.split_by else [""] * len(names)
    if len(split_bys) != len(names):
        raise ValueError(f"`split_by` {data_args.split_by!r} must name one split per dataset of {data_args.dataset!r}")
    for name in names:
        if name not in DEFAULT_SPLIT_BY:
            raise ValueError(f"`dataset` must be one of {sorted(DEFAULT_SPLIT_BY)} (or several, comma-separated), "
                             f"got {name!r}")
    if len(names) > 1 and set(names) & set(GENERALIZED_DATASETS):
        raise ValueError(f"`dataset` {data_args.dataset!r}: a generalized dataset ({', '.join(GENERALIZED_DATASETS)}) "
                         "is trained and evaluated on its own, not in a mixture")
    return [(name, split_by or DEFAULT_SPLIT_BY[name]) for name, split_by in zip(names, split_bys)]


def resolve_split_by(data_args) -> str:
    """`data_args.split_by`, else the dataset's usual split (`DEFAULT_SPLIT_BY`); comma-separated for a
    mixture of datasets."""
    return ",".join(split_by for _, split_by in mixture_sources(data_args))


def ensure_refshapes(data_args):
    """Generate RefShapes into `data_root` when it is missing (call on the main process first)."""
    from ..data import make_refshapes

    refs = Path(data_args.data_root) / "refshapes" / "refs(unc).p"
    if not refs.is_file():
        logger.info("generating RefShapes (%d images, seed %d) in %s", data_args.refshapes_num_images,
                    data_args.refshapes_seed, data_args.data_root)
        make_refshapes(data_args.data_root, num_images=data_args.refshapes_num_images, seed=data_args.refshapes_seed)


def check_refshapes_matches(root, num_images: int, seed: int) -> None:
    """`ValueError` when `<root>/refshapes/` exists but was generated with another seed or image count.

    `make_refshapes(..., generalized=True)` (re)writes `refshapes/` and `images/` besides `grefshapes/`,
    byte-identical for the same seed and count; with others it would change the data (and the pretrained
    backbones or models made from it) in place."""
    existing = Path(root) / "refshapes" / "instances.json"
    if not existing.is_file():
        return
    instances = json.loads(existing.read_text())
    found = (instances.get("info", {}).get("seed"), len(instances.get("images", [])))
    if found != (seed, num_images):
        raise ValueError(
            f"{root}: RefShapes there has seed {found[0]} and {found[1]} images, but generalized RefShapes would be "
            f"generated with seed {seed} and {num_images} images, rewriting them: generate it with seed {found[0]} "
            f"and {found[1]} images (train.py: --refshapes_seed, --refshapes_num_images), or in another folder")


def ensure_grefshapes(data_args):
    """Generate generalized RefShapes (`<data_root>/grefshapes/`, `make_refshapes(..., generalized=True)`) when it
    is missing (call on the main process first); `check_refshapes_matches` first. Returns the generator's summary,
    or None when the data was there."""
    from ..data import make_refshapes

    root = Path(data_args.data_root)
    if (root / "grefshapes" / "grefs(unc).json").is_file():
        return None
    num_images, seed = data_args.refshapes_num_images, data_args.refshapes_seed
    check_refshapes_matches(root, num_images, seed)
    logger.info("generating generalized RefShapes (%d images, seed %d) in %s", num_images, seed, root)
    return make_refshapes(root, num_images=num_images, seed=seed, generalized=True)


def load_split(data_args, split: str):
    """The refs of one split as a `datasets.Dataset` (one row per ref).

    With several datasets (`dataset: refcoco,refcoco+,refcocog`), the training split is their union
    without the images of any held-out split (`refseg.data.load_refer_mixture`), and an evaluation split
    is named `<dataset>:<split>` (`refcocog:val`). A generalized dataset (`grefcoco`, `grefshapes`) is read by
    `refseg.data.load_grefer` (rows also hold `ann_ids` and `no_target`; `mask` is the union of the referents,
    empty for no target); `grefshapes` is generated first when missing (`ensure_grefshapes`)."""
    from ..data import load_grefer, load_refer, load_refer_mixture, load_refer_parquet

    sources = mixture_sources(data_args)
    if len(sources) > 1:
        if data_args.parquet_files:
            raise ValueError("`parquet_files` reads one dataset; a mixture of datasets needs the refer layout")
        if split == data_args.train_split:
            return load_refer_mixture(data_args.data_root, sources, split, image_root=data_args.image_root)
        dataset, _, name = split.rpartition(":")
        split_by = dict(sources).get(dataset)
        if split_by is None:
            raise ValueError(f"split {split!r}: with several datasets, name evaluation splits "
                             f"`<dataset>:<split>` with a dataset of {[d for d, _ in sources]}")
        return load_refer(data_args.data_root, dataset, split_by, name, image_root=data_args.image_root)
    if is_generalized(data_args):
        if data_args.parquet_files:
            raise ValueError(f"`parquet_files`: {data_args.dataset} is read from its refer-style layout "
                             "(grefs(<split_by>).json + instances.json), not from parquet copies")
        if data_args.dataset == "grefshapes":
            ensure_grefshapes(data_args)
        return load_grefer(data_args.data_root, data_args.dataset, sources[0][1], split,
                           image_root=data_args.image_root)
    if data_args.parquet_files:
        pattern = data_args.parquet_files.replace("{split}", split)
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"`parquet_files` pattern {pattern!r} matches no file")
        image_root = data_args.image_root or str(Path(data_args.data_root) / "images")
        return load_refer_parquet(files, image_root, split=split, dataset=data_args.dataset)
    if data_args.dataset == "refshapes":
        ensure_refshapes(data_args)
    return load_refer(data_args.data_root, data_args.dataset, sources[0][1], split,
                      image_root=data_args.image_root)


def load_train_split(data_args):
    rows = load_split(data_args, data_args.train_split)
    if data_args.max_train_samples:
        rows = rows.select(range(min(data_args.max_train_samples, len(rows))))
    return rows


def load_eval_splits(data_args) -> dict:
    """`{split: EvalSamples}`: every sentence of every ref of each evaluation split."""
    from ..data import explode_sentences

    out = {}
    for split in filter(None, (s.strip() for s in data_args.eval_splits.split(","))):
        rows = explode_sentences(load_split(data_args, split))
        if data_args.max_eval_samples:
            rows = rows.select(range(min(data_args.max_eval_samples, len(rows))))
        out[split] = EvalSamples(rows)
    return out

