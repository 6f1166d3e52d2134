"""Write a folder a Hub model repository can hold as is.

`export(model, processor, out_dir)` writes:

- `config.json` and `model.safetensors` (`model.save_pretrained`; safetensors only);
- the processor's files (`processor.save_pretrained`: processor, tokenizer and image-processor
  configs, vocabulary);
- `README.md`, the model card (`refseg.hub.cards.build_model_card`), with a `license` always: the
  card data's, else the one the backbone checkpoints recorded in the model's config carry in their
  own model cards, else `other` with a note to check the backbones' licenses;
- with `remote_code=True` (default): the model's code flattened into the folder
  (`refseg.hub.remote_code`: the config, modeling and processing modules, everything of refseg
  they import, and the pipeline module), `auto_map` entries (`AutoConfig`, `AutoModel` in
  `config.json`; `AutoProcessor` in the processor configs) and `custom_pipelines` in `config.json`.
  Then, in a Python without refseg:

      AutoModel.from_pretrained(folder, trust_remote_code=True)
      AutoProcessor.from_pretrained(folder, trust_remote_code=True)
      pipeline("referring-image-segmentation", model=folder, trust_remote_code=True)

  With refseg imported, `AutoModel` / `AutoProcessor` use refseg's own registered classes and need
  no `trust_remote_code`; the pipeline call still does (transformers asks for it whenever a folder
  declares `custom_pipelines`).

Nothing here is specific to one method: the modules to export are found from the classes of the
model, its config and the processor.
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

from .cards import backbone_sources_from_config, build_model_card
from .remote_code import flat_module_name, write_flat_modules

logger = logging.getLogger(__name__)

PIPELINE_MODULE = "refseg.pipelines"
PIPELINE_TASK = "referring-image-segmentation"
PIPELINE_CLASS = "ReferringImageSegmentationPipeline"
# Files of a saved processor that may carry `auto_map["AutoProcessor"]` (transformers reads the first).
PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")

PathLike = Union[str, os.PathLike]


def _update_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _class_ref(cls) -> str:
    return f"{flat_module_name(cls.__module__)}.{cls.__name__}"


def _check_refseg_class(obj, what: str) -> None:
    module = type(obj).__module__
    if not module.startswith("refseg."):
        raise ValueError(f"`{what}` must be a refseg class to export its code, got {type(obj).__name__} from {module}")


def write_remote_code(model, processor, out_dir: PathLike, *, include_pipeline: bool = True) -> list[Path]:
    """Flatten the model's code into `out_dir` (already holding the saved model and processor) and add
    `auto_map` / `custom_pipelines`. Returns the written Python files."""
    out_dir = Path(out_dir)
    for obj, what in ((model, "model"), (model.config, "model.config"), (processor, "processor")):
        _check_refseg_class(obj, what)
    modules = [type(model.config).__module__, type(model).__module__, type(processor).__module__]
    if include_pipeline:
        modules.append(PIPELINE_MODULE)
    written = write_flat_modules(modules, out_dir)

    def update_config(config: dict) -> None:
        auto_map = dict(config.get("auto_map") or {})
        auto_map.update({"AutoConfig": _class_ref(type(model.config)), "AutoModel": _class_ref(type(model))})
        config["auto_map"] = auto_map
        if include_pipeline:
            custom = dict(config.get("custom_pipelines") or {})
            custom[PIPELINE_TASK] = {
                "impl": f"{flat_module_name(PIPELINE_MODULE)}.{PIPELINE_CLASS}",
                "pt": ["AutoModel"],
                "type": "multimodal",
            }
            config["custom_pipelines"] = custom

    _update_json(out_dir / "config.json", update_config)

    processor_ref = _class_ref(type(processor))
    processor_files = [out_dir / name for name in PROCESSOR_CONFIG_FILES if (out_dir / name).is_file()]
    if not processor_files:
        raise ValueError(f"`processor`: save_pretrained wrote none of {PROCESSOR_CONFIG_FILES} to {out_dir}")
    for path in processor_files:
        _update_json(path, lambda data: data.setdefault("auto_map", {}).update({"AutoProcessor": processor_ref}))
    return list(written.values())


def export(
    model,
    processor,
    out_dir: PathLike,
    remote_code: bool = True,
    card_data: Union[None, PathLike, Mapping] = None,
    eval_results: Union[None, PathLike, Mapping] = None,
    *,
    eval_dataset: Optional[str] = None,
    repo_id: Optional[str] = None,
    include_pipeline: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` + `processor` (+ code, + card) to `out_dir` as a Hub-ready folder.

    Args:
        model: a refseg `PreTrainedModel` (e.g. `RisclipModel`).
        processor: its processor (e.g. `RisclipProcessor`).
        out_dir: target folder; must be empty or absent unless `overwrite=True` (which deletes it first).
        remote_code: also write the flattened modeling code, `auto_map` and `custom_pipelines`.
        card_data: card data for the README: a shipped card name (`"risclip-b"`, `"risclip-l"`,
            `"risclip-tiny"`), a YAML/JSON file, a mapping, or `None` for a generic card.
        eval_results: the evaluation record (`eval_results.json` path or mapping as
            `refseg.training.evaluation.write_eval_results` writes it, or the old bare
            `{split: {metric: fraction}}`); fills the card's "Measured with refseg" table and its
            `model-index` metadata.
        eval_dataset: dataset of `eval_results` when the record names none (default: the card
            data's `evaluation_dataset`); must agree with the record's `dataset` when it names one.
        repo_id: Hub id used in the card's usage snippets.
        include_pipeline: with `remote_code`, also export the pipeline module.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        `Path` of the written folder.
    """
    # The card first: bad card data or evaluation results fail before anything is written.
    card = build_model_card(
        card_data,
        eval_results=eval_results,
        eval_dataset=eval_dataset,
        repo_id=repo_id,
        model_type=getattr(model.config, "model_type", None),
        backbones=backbone_sources_from_config(model.config),
        remote_code=remote_code,
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise ValueError(f"`out_dir` {out_dir} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    model.save_pretrained(out_dir, safe_serialization=True)
    pickled = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickled or not any(p.suffix == ".safetensors" for p in out_dir.iterdir()):
        raise ValueError(f"`model`: expected safetensors weights only in {out_dir}, found {pickled or 'none'}")
    processor.save_pretrained(out_dir)
    if remote_code:
        write_remote_code(model, processor, out_dir, include_pipeline=include_pipeline)

    card.save(out_dir / "README.md")
    logger.info("exported %s to %s (remote_code=%s)", type(model).__name__, out_dir, remote_code)
    return out_dir


__all__ = ["PIPELINE_TASK", "export", "write_remote_code"]
