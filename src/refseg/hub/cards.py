"""Model cards: per-preset card data + a Jinja template, rendered with `huggingface_hub.ModelCard`.

Card data files (`hub_cards/<preset>.yaml` in the repository; a byte-identical copy ships inside the
package in `refseg/hub/templates/`, which is what the code reads) hold:

- `metadata`: the YAML header, passed to `huggingface_hub.ModelCardData` (`library_name`,
  `pipeline_tag`, `license`, `base_model`, `datasets`, `tags`, ...). We use
  `library_name: transformers`: an exported folder *is* a transformers checkpoint with remote code
  (`AutoModel.from_pretrained(..., trust_remote_code=True)`), and the Hub shows transformers usage
  snippets for it; `refseg` and `custom_code` are tags.
- `title`, `summary`, `method`, `paper`, `details`, `example_texts`, `training_recipe`,
  `limitations`, `citation`: free text for the template.
- `reported`: numbers *reported in the paper* (`source` + `rows` of `{dataset, split, mIoU, oIoU}`),
  or a `note` when the paper has none. They are shown in their own table and never enter the
  `model-index` metadata: they belong to the authors' checkpoints, not to these weights.
- `evaluation_dataset`: the dataset an `eval_results.json` refers to when the caller does not say.

Results *measured with refseg* come only from an `eval_results.json` as written by
`scripts/evaluate.py`: `{"<split>": {"oIoU": 0.71, "mIoU": 0.73, "precision@0.5": 0.8, ...,
"num_samples": 1500}}` with metrics as fractions in [0, 1]. The card shows them as percentages with
two decimals (`100 * value`, rounded) and records the same rounded percentages as `model-index`
`EvalResult`s (task `image-segmentation`, dataset from `EVAL_DATASETS`, split = the JSON key).
"""

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_NAME = "modelcard_template.md"
CARD_DATA_SUFFIXES = (".yaml", ".yml", ".json")

# refseg dataset name -> (model-index dataset type = Hub dataset id where one exists, display name)
EVAL_DATASETS = {
    "refcoco": ("jxu124/refcoco", "RefCOCO (UNC)"),
    "refcoco+": ("jxu124/refcocoplus", "RefCOCO+ (UNC)"),
    "refcocog": ("jxu124/refcocog", "RefCOCOg (UMD)"),
    "refshapes": ("refshapes", "RefShapes (synthetic, generated with refseg)"),
}
# Metric keys of `refseg.metrics.ReferringIoU` / scripts/evaluate.py, in table order, with headers.
METRIC_HEADERS = {
    "oIoU": "oIoU",
    "mIoU": "mIoU",
    "precision@0.5": "P@0.5",
    "precision@0.6": "P@0.6",
    "precision@0.7": "P@0.7",
    "precision@0.8": "P@0.8",
    "precision@0.9": "P@0.9",
}
COUNT_KEYS = {"num_samples": "Expressions"}
TASK_TYPE = "image-segmentation"
TASK_NAME = "Referring Image Segmentation"

PathLike = Union[str, os.PathLike]


def templates_dir() -> Path:
    """Folder holding the card template and the per-preset card data shipped with the package."""
    return TEMPLATES_DIR


def available_cards() -> list[str]:
    """Names of the card data files shipped with the package (e.g. `risclip-b`)."""
    return sorted(p.stem for p in TEMPLATES_DIR.iterdir() if p.suffix in CARD_DATA_SUFFIXES)


def _read_mapping(path: Path, what: str) -> dict:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"`{what}` file {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_card_info(card: Union[None, PathLike, Mapping], *, model_type: Optional[str] = None) -> dict:
    """Card data as a dict.

    Args:
        card: a shipped card name (`"risclip-b"`, see `available_cards()`), a path to a YAML/JSON
            card data file, a mapping with the same keys, or `None` for a generic card built from
            `model_type` (no paper table).
        model_type: the model's `config.model_type`, used for the generic card.
    """
    if card is None:
        name = model_type or "refseg"
        return {
            "model_name": name,
            "title": f"{name} (referring image segmentation)",
            "summary": f"A `{name}` referring image segmentation model exported with refseg.",
            "method": name,
            "metadata": {
                "library_name": "transformers",
                "pipeline_tag": TASK_TYPE,
                "tags": ["refseg", name, "referring-image-segmentation", "custom_code"],
            },
        }
    if isinstance(card, Mapping):
        return dict(card)
    if not isinstance(card, (str, os.PathLike)):
        raise ValueError(f"`card_data` must be a card name, a path or a mapping, got {type(card).__name__}")
    path = Path(card)
    if path.suffix not in CARD_DATA_SUFFIXES:
        path = TEMPLATES_DIR / f"{card}.yaml"
        if not path.is_file():
            raise ValueError(f"`card_data` {card!r} is neither a card data file nor one of {available_cards()}")
    elif not path.is_file():
        raise ValueError(f"`card_data` file {path} does not exist")
    return _read_mapping(path, "card_data")


def load_eval_results(eval_results: Union[None, PathLike, Mapping]) -> Optional[dict[str, dict[str, float]]]:
    """Validated `{split: {metric: value}}` from a JSON file path or a mapping (`None` passes through).

    Metric values must be finite numbers in [0, 1] (fractions, as `scripts/evaluate.py` writes them);
    `num_samples` must be a non-negative integer.
    """
    if eval_results is None:
        return None
    if isinstance(eval_results, (str, os.PathLike)):
        path = Path(eval_results)
        if not path.is_file():
            raise ValueError(f"`eval_results` file {path} does not exist")
        eval_results = _read_mapping(path, "eval_results")
    if not isinstance(eval_results, Mapping) or not eval_results:
        raise ValueError("`eval_results` must be a non-empty mapping {split: {metric: value}}")
    checked = {}
    for split, metrics in eval_results.items():
        if not isinstance(split, str) or not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"`eval_results`[{split!r}] must map metric names to numbers, got {metrics!r}")
        row = {}
        for key, value in metrics.items():
            if key in COUNT_KEYS:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"`eval_results`[{split!r}][{key!r}] must be an int >= 0, got {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0.0 <= value <= 1.0
            ):
                raise ValueError(
                    f"`eval_results`[{split!r}][{key!r}] must be a fraction in [0, 1] (as scripts/evaluate.py "
                    f"writes), got {value!r}"
                )
            row[key] = value
        checked[split] = row
    return checked


def _metric_keys(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    present = {k for metrics in results.values() for k in metrics if k not in COUNT_KEYS}
    known = [k for k in METRIC_HEADERS if k in present]
    return known + sorted(present - set(known))


def as_percent(value: float) -> float:
    """The percentage shown in cards and `model-index` for a fraction: `round(100 * value, 2)`."""
    return round(100.0 * float(value), 2)


def measured_table(results: Mapping[str, Mapping[str, Any]], dataset: str) -> dict:
    """Template context for the "Measured with refseg" table (`dataset_name`, `headers`, `rows`)."""
    keys = _metric_keys(results)
    counts = [k for k in COUNT_KEYS if any(k in m for m in results.values())]
    rows = []
    for split, metrics in results.items():
        cells = [f"{as_percent(metrics[k]):.2f}" if k in metrics else "-" for k in keys]
        cells += [str(metrics[k]) if k in metrics else "-" for k in counts]
        rows.append({"split": split, "cells": cells})
    headers = [METRIC_HEADERS.get(k, k) for k in keys] + [COUNT_KEYS[k] for k in counts]
    return {"dataset_name": EVAL_DATASETS.get(dataset, (dataset, dataset))[1], "headers": headers, "rows": rows}


def measured_eval_results(results: Mapping[str, Mapping[str, Any]], dataset: str) -> list[EvalResult]:
    """One `EvalResult` per (split, metric): percentages, rounded like the card's table."""
    dataset_type, dataset_name = EVAL_DATASETS.get(dataset, (dataset, dataset))
    out = []
    for split, metrics in results.items():
        for key in _metric_keys({split: metrics}):
            out.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=key,
                    metric_name=METRIC_HEADERS.get(key, key),
                    metric_value=as_percent(metrics[key]),
                )
            )
    return out


def build_model_card(
    card_data: Union[None, PathLike, Mapping] = None,
    *,
    eval_results: Union[None, PathLike, Mapping] = None,
    eval_dataset: Optional[str] = None,
    repo_id: Optional[str] = None,
    model_type: Optional[str] = None,
    remote_code: bool = True,
    template_path: Optional[PathLike] = None,
) -> ModelCard:
    """Render a model card.

    Args:
        card_data: see `load_card_info` (a shipped card name, a file, a mapping or `None`).
        eval_results: `eval_results.json` path or mapping (see `load_eval_results`); the only source
            of the "Measured with refseg" table and of the `model-index` metadata.
        eval_dataset: the dataset those results were measured on (a key of `EVAL_DATASETS` or any
            name); default: the card data's `evaluation_dataset`.
        repo_id: Hub id used in the usage snippets (default: `<your-org>/<model_name>`).
        model_type: the model's `config.model_type` (used for the generic card).
        remote_code: whether the folder ships its modeling code (usage snippets with
            `trust_remote_code=True` and the `custom_code` tag) or needs `refseg` installed.
        template_path: a Jinja template (default: the shipped `modelcard_template.md`).

    Returns:
        `huggingface_hub.ModelCard`; `card.save(path)` writes the README.md.
    """
    info = load_card_info(card_data, model_type=model_type)
    results = load_eval_results(eval_results)
    metadata = dict(info.get("metadata") or {})
    tags = [t for t in metadata.get("tags") or [] if remote_code or t != "custom_code"]
    if remote_code and "custom_code" not in tags:
        tags.append("custom_code")
    metadata["tags"] = tags
    model_name = info.get("model_name") or model_type or "refseg-model"
    index_name = repo_id.split("/")[-1] if repo_id else model_name
    repo_id = repo_id or f"<your-org>/{model_name}"

    measured = None
    if results is not None:
        dataset = eval_dataset or info.get("evaluation_dataset")
        if not dataset:
            raise ValueError("`eval_dataset` is required: the card data names no `evaluation_dataset`")
        measured = measured_table(results, dataset)
        metadata["eval_results"] = measured_eval_results(results, dataset)
        metadata["model_name"] = index_name
    data = ModelCardData(**metadata)

    template = Path(template_path) if template_path is not None else TEMPLATES_DIR / TEMPLATE_NAME
    context = {
        "title": info.get("title", model_name),
        "summary": info.get("summary", ""),
        "method": info.get("method", model_type or ""),
        "paper": info.get("paper"),
        "details": info.get("details", []),
        "example_texts": list(info.get("example_texts") or ["the object on the left", "the red one"]),
        "training_recipe": info.get("training_recipe") or ["Not documented for this model."],
        "reported": info.get("reported"),
        "measured": measured,
        "limitations": info.get("limitations") or ["Not documented for this model."],
        "citation": info.get("citation"),
        "repo_id": repo_id,
        "remote_code": remote_code,
    }
    return ModelCard.from_template(data, template_path=str(template), **context)


__all__ = [
    "EVAL_DATASETS",
    "METRIC_HEADERS",
    "as_percent",
    "available_cards",
    "build_model_card",
    "load_card_info",
    "load_eval_results",
    "measured_eval_results",
    "measured_table",
    "templates_dir",
]
