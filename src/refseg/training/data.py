"""Datasets for training and evaluation, from the refer format, parquet copies or RefShapes."""

import glob
import logging
from pathlib import Path

from .samples import EvalSamples

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_BY = {"refshapes": "unc", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def resolve_split_by(data_args) -> str:
    """`data_args.split_by`, else the dataset's usual split (`DEFAULT_SPLIT_BY`)."""
    if data_args.split_by:
        return data_args.split_by
    if data_args.dataset not in DEFAULT_SPLIT_BY:
        raise ValueError(f"`dataset` must be one of {sorted(DEFAULT_SPLIT_BY)}, got {data_args.dataset!r}")
    return DEFAULT_SPLIT_BY[data_args.dataset]


def ensure_refshapes(data_args):
    """Generate RefShapes into `data_root` when it is missing (call on the main process first)."""
    from ..data import make_refshapes

    refs = Path(data_args.data_root) / "refshapes" / "refs(unc).p"
    if not refs.is_file():
        logger.info("generating RefShapes (%d images, seed %d) in %s", data_args.refshapes_num_images,
                    data_args.refshapes_seed, data_args.data_root)
        make_refshapes(data_args.data_root, num_images=data_args.refshapes_num_images, seed=data_args.refshapes_seed)


def load_split(data_args, split: str):
    """The refs of one split as a `datasets.Dataset` (one row per ref)."""
    from ..data import load_refer, load_refer_parquet

    if data_args.parquet_files:
        pattern = data_args.parquet_files.replace("{split}", split)
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"`parquet_files` pattern {pattern!r} matches no file")
        image_root = data_args.image_root or str(Path(data_args.data_root) / "images")
        return load_refer_parquet(files, image_root, split=split, dataset=data_args.dataset)
    if data_args.dataset == "refshapes":
        ensure_refshapes(data_args)
    return load_refer(data_args.data_root, data_args.dataset, resolve_split_by(data_args), split,
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

