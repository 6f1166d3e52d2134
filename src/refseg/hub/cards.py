"""Model cards: per-preset card data + a Jinja template, rendered with `huggingface_hub.ModelCard`.

Card data files (`hub_cards/<preset>.yaml` in the repository; a byte-identical copy ships inside the
package in `refseg/hub/templates/`, which is what the code reads) hold:

- `metadata`: the YAML header, passed to `huggingface_hub.ModelCardData` (`library_name`,
  `pipeline_tag`, `license`, `base_model`, `datasets`, `tags`, ...). We use
  `library_name: transformers`: an exported folder *is* a transformers checkpoint with remote code
  (`AutoModel.from_pretrained(..., trust_remote_code=True)`), and the Hub shows transformers usage
  snippets for it; `refseg` and `custom_code` are tags. `base_model` is one checkpoint id (RISCLIP,
  CRIS: the CLIP) or a list of them, one per pretrained backbone (RISAM: the SAM and the CLIP
  checkpoint). Card data with a list also give `base_model_relation: finetune` (the weights are the
  backbones plus trained heads, not a merge of them), so the Hub need not guess the relation. The
  card's "Base model" line names each one (`base_model_text`).
- `title`, `summary`, `method`, `paper`, `details`, `example_texts`, `training_recipe`,
  `limitations`, `citation`: free text for the template.
- `reported`: numbers *reported in the paper* (`source` + `rows` of `{dataset, split, mIoU, oIoU}`,
  `null` where the paper gives none), or a `note` when the paper has none. The table shows mIoU and
  oIoU; a row may keep other figures of the paper (RISAM's `precision@0.9`), which `source` then states. They are shown in their own table and never enter the
  `model-index` metadata: they belong to the authors' checkpoints, not to these weights.
- `evaluation_dataset`: the dataset of the measured results when their record names none (an
  `eval_results.json` in the old bare layout) and the caller does not say.

License. Every card carries a `license` (`resolve_license`), first found of:

1. the card data's `metadata.license` (with its `license_name` / `license_link` when it is `other`);
2. the backbone checkpoints' own license: the backbones the model was built from are recorded in
   its config (`config.<sub>_config._name_or_path`, e.g. `clip_config`; see
   `backbone_sources_from_config`), and the `license` of each one's model card is read from the YAML
   header of `README.md` in that local folder, or of a Hub id's README.md already in the local
   Hugging Face cache (no network access). Used when every backbone names one and they agree;
3. otherwise `other`, and the card's "License" section says that the license was not recorded and
   that users must check the backbones' licenses.

Results *measured with refseg* come only from an evaluation record, `eval_results.json`, as
`refseg.training.evaluation.write_eval_results` writes it (`scripts/train.py` at the end of a run,
`scripts/evaluate.py`):

    {"dataset": "refcoco", "split_by": "unc", "scored_output": "logits", "global_step": 1200,
     "results": {"<split>": {"oIoU": 0.71, "mIoU": 0.73, "precision@0.5": 0.8, ..., "num_samples": 1500}}}

with metrics as fractions in [0, 1]. The old bare layout `{"<split>": {metrics}}` (no record around
it) is still read; it names no dataset. The dataset of the results is the record's `dataset`; an
explicit `eval_dataset` that contradicts it is an error; without a recorded dataset it is
`eval_dataset`, else the card data's `evaluation_dataset` (see `resolve_eval_dataset`). It is never
guessed from a file name. The card shows the metrics as percentages with two decimals
(`100 * value`, rounded) and records the same rounded percentages as `model-index` `EvalResult`s
(task `image-segmentation`, dataset from `EVAL_DATASETS`, split = the key under `results`).
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
    "refcoco": ("jxu124/refcoco", "RefCOCO"),
    "refcoco+": ("jxu124/refcocoplus", "RefCOCO+"),
    "refcocog": ("jxu124/refcocog", "RefCOCOg"),
    "refshapes": ("refshapes", "RefShapes (synthetic, generated with refseg)"),
    "grefcoco": ("grefcoco", "gRefCOCO (generalized: no-target and multi-target expressions)"),
    "grefshapes": ("grefshapes", "generalized RefShapes (synthetic, generated with refseg)"),
}
# The split protocol a RefCOCO-family display name shows when the record names none
# (as `refseg.training.data.DEFAULT_SPLIT_BY`).
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# Metric keys of `refseg.metrics.ReferringIoU` / scripts/evaluate.py, in table order, with headers.
METRIC_HEADERS = {
    "oIoU": "oIoU",
    "mIoU": "mIoU",
    "precision@0.5": "P@0.5",
    "precision@0.6": "P@0.6",
    "precision@0.7": "P@0.7",
    "precision@0.8": "P@0.8",
    "precision@0.9": "P@0.9",
    # generalized referring segmentation (`ReferringIoU(generalized=True)`)
    "gIoU": "gIoU",
    "cIoU": "cIoU",
    "N-acc": "N-acc",
    "T-acc": "T-acc",
}
COUNT_KEYS = {"num_samples": "Expressions", "num_no_target": "No-target expressions"}
TASK_TYPE = "image-segmentation"
TASK_NAME = "Referring Image Segmentation"

LICENSE_KEYS = ("license", "license_name", "license_link")
UNRECORDED_LICENSE = "other"

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


def generalized_card_info(base: Mapping, name: str) -> dict:
    """The card data of preset `name` = `<base>-g` (`refseg.presets`: the base preset with the presence head of
    generalized RIS, `no_target_head=True`): the base card's, renamed, with a sentence saying what the variant adds
    and that the paper's numbers (kept as they are, still "reported in the paper") are for the method without it."""
    info = dict(base)
    info["preset"] = info["model_name"] = name
    info["title"] = f"{base.get('title', base.get('model_name'))}, with a presence head (generalized RIS)"
    info["summary"] = (
        f"{str(base.get('summary', '')).rstrip()} This variant adds refseg's presence head (`no_target_head=True`, "
        "not part of the paper): the model also says when an expression names nothing in the image, and returns "
        "an empty mask then (generalized referring segmentation, gRefCOCO). Numbers reported in the paper are for "
        "the method without it.")
    metadata = dict(base.get("metadata") or {})
    metadata["tags"] = [*metadata.get("tags", []), "generalized-referring-segmentation"]
    info["metadata"] = metadata
    return info


def load_card_info(card: Union[None, PathLike, Mapping], *, model_type: Optional[str] = None) -> dict:
    """Card data as a dict.

    Args:
        card: a shipped card name (`"risclip-b"`, see `available_cards()`; `"risclip-b-g"` for a shipped name plus
            `-g`, `generalized_card_info`), a path to a YAML/JSON
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
        base = TEMPLATES_DIR / f"{str(card)[:-2]}.yaml"
        if not path.is_file() and str(card).endswith("-g") and base.is_file():
            return generalized_card_info(_read_mapping(base, "card_data"), str(card))
        if not path.is_file():
            raise ValueError(f"`card_data` {card!r} is neither a card data file nor one of {available_cards()}"
                             " (or one of them with `-g`, the presence-head variant)")
    elif not path.is_file():
        raise ValueError(f"`card_data` file {path} does not exist")
    return _read_mapping(path, "card_data")


def _check_results(results: Any) -> dict[str, dict[str, float]]:
    if not isinstance(results, Mapping) or not results:
        raise ValueError(
            "`eval_results` must hold a non-empty mapping {split: {metric: value}} (a run evaluated on no "
            f"split records none), got {results!r}"
        )
    checked = {}
    for split, metrics in results.items():
        if not isinstance(split, str) or not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"`eval_results`[{split!r}] must map metric names to numbers, got {metrics!r}")
        row = {}
        for key, value in metrics.items():
            if key in COUNT_KEYS:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"`eval_results`[{split!r}][{key!r}] must be an int >= 0, got {value!r}")
            elif value is None:  # a generalized metric over no sample (N-acc of a split without no-target rows)
                pass
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


def load_eval_results(eval_results: Union[None, PathLike, Mapping]) -> Optional[dict[str, Any]]:
    """The validated evaluation record from an `eval_results.json` path or a mapping (`None` passes through).

    Accepts the record `refseg.training.evaluation.write_eval_results` writes (`{"dataset", "split_by",
    "scored_output", "global_step", "results": {split: metrics}}`) and the old bare `{split: metrics}`
    layout, read as a record whose other fields are `None` (a mapping with a `results` key is a record).

    Returns:
        `{"dataset": str | None, "split_by": str | None, "scored_output": str | None,
        "global_step": int | None, "results": {split: {metric: value}}}`. Metric values must be finite
        numbers in [0, 1] (fractions, as the scripts write them) or null (a generalized metric over no sample:
        shown as "-", left out of `model-index`); `num_samples` and `num_no_target` must be non-negative ints.
    """
    from ..training.evaluation import EVAL_RECORD_KEYS, read_eval_results

    if eval_results is None:
        return None
    if isinstance(eval_results, (str, os.PathLike)):
        path = Path(eval_results)
        if not path.is_file():
            raise ValueError(f"`eval_results` file {path} does not exist")
        try:
            record = read_eval_results(path)
        except json.JSONDecodeError as err:
            raise ValueError(f"`eval_results` file {path} is not JSON: {err}") from err
    elif isinstance(eval_results, Mapping):
        data = eval_results if "results" in eval_results else {"results": eval_results}
        record = {key: data.get(key) for key in EVAL_RECORD_KEYS}
    else:
        raise ValueError(f"`eval_results` must be a path or a mapping, got {type(eval_results).__name__}")
    for key in ("dataset", "split_by", "scored_output"):
        value = record[key]
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"`eval_results` field {key!r} must be a non-empty string or null, got {value!r}")
    step = record["global_step"]
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"`eval_results` field 'global_step' must be an int >= 0 or null, got {step!r}")
    record["results"] = _check_results(record["results"])
    return record


def resolve_eval_dataset(
    record: Mapping[str, Any], eval_dataset: Optional[str] = None, default: Optional[str] = None
) -> str:
    """The dataset an evaluation record was measured on.

    The record's own `dataset` wins; an `eval_dataset` that names another one (compared without case)
    raises `ValueError`. Without a recorded dataset (old bare layout): `eval_dataset`, else `default`
    (the card data's `evaluation_dataset`), else `ValueError`. Never guessed from a file name.
    """
    recorded = record.get("dataset")
    if recorded:
        if eval_dataset and eval_dataset.strip().lower() != recorded.strip().lower():
            raise ValueError(
                f"`eval_dataset` {eval_dataset!r} contradicts the evaluation record, which was measured on "
                f"{recorded!r}; drop `eval_dataset` (the record's dataset is used) or pass the matching results"
            )
        return recorded
    dataset = eval_dataset or default
    if not dataset:
        raise ValueError(
            "`eval_dataset` is required: the evaluation record names no `dataset` (old layout) and the card "
            "data names no `evaluation_dataset`"
        )
    return dataset


def dataset_display_name(dataset: str, split_by: Optional[str] = None) -> str:
    """Name shown in the card and `model-index` (`"RefCOCOg (UMD)"`; `"RefCOCOg (GOOGLE)"` for that split)."""
    name = EVAL_DATASETS.get(dataset, (dataset, dataset))[1]
    protocol = split_by or DEFAULT_SPLIT_BY.get(dataset)
    return f"{name} ({protocol.upper()})" if protocol and dataset in DEFAULT_SPLIT_BY else name


# ----------------------------------------------------------------------------------------- license
def backbone_sources_from_config(config) -> dict[str, str]:
    """`{backbone: checkpoint}` recorded in a refseg config: `_name_or_path` of each backbone sub-config
    (`clip_config` -> `"clip"`, `sam_config` -> `"sam"`), empty ones dropped. Works for any method's
    config (its `sub_configs`)."""
    sources = {}
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        source = getattr(sub, "_name_or_path", "") if sub is not None else ""
        if source:
            sources[name[: -len("_config")] if name.endswith("_config") else name] = str(source)
    return sources


def _read_front_matter(readme: Path) -> Optional[dict]:
    try:
        from huggingface_hub import metadata_load

        return metadata_load(readme)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        logger.warning("could not read the YAML header of %s: %s", readme, err)
        return None


def backbone_card_license(source: PathLike) -> Optional[dict[str, str]]:
    """`license` (and `license_name` / `license_link`) from a backbone checkpoint's own model card.

    `source` is a local folder (its `README.md`) or a Hub id, whose README.md is looked up in the local
    Hugging Face cache only (`huggingface_hub.try_to_load_from_cache`: no network access). `None` when
    no card or no license is found.
    """
    readme = None
    folder = Path(source)
    if folder.is_dir():
        readme = folder / "README.md"
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(source), "README.md")
        except ValueError:  # not a valid repo id either (huggingface_hub's validation errors are ValueErrors)
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    header = _read_front_matter(readme) or {}
    license_id = header.get("license")
    if isinstance(license_id, list) and len(license_id) == 1:
        license_id = license_id[0]
    if not isinstance(license_id, str) or not license_id.strip():
        return None
    found = {"license": license_id.strip()}
    for key in LICENSE_KEYS[1:]:
        if isinstance(header.get(key), str) and header[key].strip():
            found[key] = header[key].strip()
    return found


def _describe_source(source: str) -> str:
    path = Path(source)
    return f"a local folder `{path.name}`" if path.is_absolute() or path.is_dir() else f"`{source}`"


def resolve_license(metadata: Mapping[str, Any], backbones: Optional[Mapping[str, str]] = None) -> tuple[dict, str]:
    """The card's license fields and the sentence its "License" section shows.

    Order: the card data's `metadata.license`; else the license of the backbone checkpoints'
    own model cards (`backbone_card_license`), when every backbone names one and they agree;
    else `other`, with a sentence saying the license was not recorded and that the backbones'
    licenses must be checked.

    Returns:
        `({"license": ..., ["license_name": ..., "license_link": ...]}, text)`.
    """
    if metadata.get("license"):
        fields = {k: metadata[k] for k in LICENSE_KEYS if metadata.get(k)}
        return fields, f"`{fields['license']}`, as stated in the card data of this model."
    backbones = dict(backbones or {})
    found = {name: backbone_card_license(source) for name, source in backbones.items()}
    named = "; ".join(f"{name}: {_describe_source(source)}" for name, source in backbones.items())
    if found and all(found.values()) and len({tuple(sorted(f.items())) for f in found.values()}) == 1:
        fields = next(iter(found.values()))
        which = "checkpoint" if len(found) == 1 else "checkpoints"
        return fields, (
            f"`{fields['license']}`, taken from the model card of the backbone {which} these weights were "
            f"built from ({named}). The card data of this model records no license of its own."
        )
    if not backbones:
        origin = "The configuration records no backbone checkpoint either."
    else:
        licensed = [f"{name}: `{f['license']}`" for name, f in found.items() if f]
        origin = f"These weights are built from backbone checkpoints ({named})" + (
            f"; the licenses found for them ({', '.join(licensed)}) do not settle one license for these weights."
            if licensed else ", and no license was found in their model cards."
        )
    return {"license": UNRECORDED_LICENSE}, (
        f"The license of these weights was not recorded: the card data names none, so the metadata says "
        f"`{UNRECORDED_LICENSE}`. {origin} Before you use or redistribute this model, check the license of "
        f"each backbone checkpoint it derives from."
    )


def base_model_text(base_model: Union[None, str, list]) -> Optional[str]:
    """What the card's "Base model" line shows inside its code span (the template writes
    `` `{{ base_model }}` ``): a single id as it is; several ids (one per backbone, RISAM's SAM and CLIP)
    joined with `` `, ` `` so that each sits in a code span of its own. `None` (or an empty list) when the
    card data names no base model. The metadata keeps the list itself, as the Hub expects it."""
    if base_model is None or isinstance(base_model, str):
        return base_model or None
    if not isinstance(base_model, (list, tuple)) or not all(isinstance(b, str) and b.strip() for b in base_model):
        raise ValueError(f"`metadata.base_model` must be a checkpoint id or a list of them, got {base_model!r}")
    return "`, `".join(base_model) or None


def _metric_keys(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    present = {k for metrics in results.values() for k in metrics if k not in COUNT_KEYS}
    known = [k for k in METRIC_HEADERS if k in present]
    return known + sorted(present - set(known))


def as_percent(value: float) -> float:
    """The percentage shown in cards and `model-index` for a fraction: `round(100 * value, 2)`."""
    return round(100.0 * float(value), 2)


def measured_table(results: Mapping[str, Mapping[str, Any]], dataset: str, split_by: Optional[str] = None) -> dict:
    """Template context for the "Measured with refseg" table (`dataset_name`, `headers`, `rows`)."""
    keys = _metric_keys(results)
    counts = [k for k in COUNT_KEYS if any(k in m for m in results.values())]
    rows = []
    for split, metrics in results.items():
        cells = [f"{as_percent(metrics[k]):.2f}" if metrics.get(k) is not None else "-" for k in keys]
        cells += [str(metrics[k]) if k in metrics else "-" for k in counts]
        rows.append({"split": split, "cells": cells})
    headers = [METRIC_HEADERS.get(k, k) for k in keys] + [COUNT_KEYS[k] for k in counts]
    return {"dataset_name": dataset_display_name(dataset, split_by), "headers": headers, "rows": rows}


def measured_eval_results(
    results: Mapping[str, Mapping[str, Any]], dataset: str, split_by: Optional[str] = None
) -> list[EvalResult]:
    """One `EvalResult` per (split, metric): percentages, rounded like the card's table."""
    dataset_type = EVAL_DATASETS.get(dataset, (dataset, dataset))[0]
    dataset_name = dataset_display_name(dataset, split_by)
    out = []
    for split, metrics in results.items():
        for key in _metric_keys({split: metrics}):
            if metrics[key] is None:
                continue
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
    backbones: Optional[Mapping[str, str]] = None,
    remote_code: bool = True,
    template_path: Optional[PathLike] = None,
) -> ModelCard:
    """Render a model card.

    Args:
        card_data: see `load_card_info` (a shipped card name, a file, a mapping or `None`).
        eval_results: the evaluation record, an `eval_results.json` path or mapping (see
            `load_eval_results`; the new record or the old bare `{split: metrics}`); the only source
            of the "Measured with refseg" table and of the `model-index` metadata.
        eval_dataset: the dataset those results were measured on (a key of `EVAL_DATASETS` or any
            name), for a record that names none; it must agree with the record's `dataset` when that
            is set (else `ValueError`). Default: the record's `dataset`, else the card data's
            `evaluation_dataset` (see `resolve_eval_dataset`).
        repo_id: Hub id used in the usage snippets (default: `<your-org>/<model_name>`).
        model_type: the model's `config.model_type` (used for the generic card).
        backbones: `{backbone: checkpoint name or path}` the model was built from
            (`backbone_sources_from_config(model.config)`); their model cards supply the license
            when the card data has none (see `resolve_license`).
        remote_code: whether the folder ships its modeling code (usage snippets with
            `trust_remote_code=True` and the `custom_code` tag) or needs `refseg` installed.
        template_path: a Jinja template (default: the shipped `modelcard_template.md`).

    Returns:
        `huggingface_hub.ModelCard`; `card.save(path)` writes the README.md. Its metadata always has
        a `license`.
    """
    info = load_card_info(card_data, model_type=model_type)
    record = load_eval_results(eval_results)
    metadata = dict(info.get("metadata") or {})
    tags = [t for t in metadata.get("tags") or [] if remote_code or t != "custom_code"]
    if remote_code and "custom_code" not in tags:
        tags.append("custom_code")
    metadata["tags"] = tags
    license_fields, license_text = resolve_license(metadata, backbones)
    metadata.update(license_fields)
    model_name = info.get("model_name") or model_type or "refseg-model"
    index_name = repo_id.split("/")[-1] if repo_id else model_name
    repo_id = repo_id or f"<your-org>/{model_name}"

    measured = None
    if record is not None:
        dataset = resolve_eval_dataset(record, eval_dataset, info.get("evaluation_dataset"))
        results, split_by = record["results"], record["split_by"]
        measured = measured_table(results, dataset, split_by)
        measured.update(split_by=split_by, scored_output=record["scored_output"], global_step=record["global_step"])
        metadata["eval_results"] = measured_eval_results(results, dataset, split_by)
        metadata["model_name"] = index_name
    data = ModelCardData(**metadata)

    template = Path(template_path) if template_path is not None else TEMPLATES_DIR / TEMPLATE_NAME
    context = {
        "base_model": base_model_text(metadata.get("base_model")),  # the card data's value, for the template
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
        "license_text": license_text,
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
    "backbone_card_license",
    "backbone_sources_from_config",
    "base_model_text",
    "build_model_card",
    "dataset_display_name",
    "load_card_info",
    "load_eval_results",
    "measured_eval_results",
    "measured_table",
    "resolve_eval_dataset",
    "resolve_license",
    "templates_dir",
]
