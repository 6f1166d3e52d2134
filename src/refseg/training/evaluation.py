"""Evaluation over one split, split across processes, every sentence counted exactly once; the side-by-side
comparison table of several models and the picture of their masks on a few samples (`scripts/evaluate.py`).

Generalized datasets (gRefCOCO, generalized RefShapes: an expression may name no object) are scored with
`generalized=True`: rows of (index, I, U, predicted area, reference area) summarized by
`refseg.metrics.summarize_generalized_counts` (gIoU, cIoU, N-acc, T-acc, precision@X over target samples).
A model whose config has a presence head's `no_target_threshold` is post-processed with it (`post_process_kwargs`),
so a sample it judges to have no target is scored with an empty mask."""

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..metrics import generalized_counts, intersection_union, summarize_counts, summarize_generalized_counts
from .resume import is_sharded
from .samples import ProcessorCollator, shard_indices

logger = logging.getLogger(__name__)


def select_output(outputs, output: str = "logits"):
    """`outputs` with `logits` replaced by the field a stage is judged by (`MethodSpec.stage_outputs`).

    `"logits"` returns `outputs` as it is. Any other field (e.g. `"coarse_logits"`, (B, h, w)) is
    upsampled bilinearly to the `logits` size (B, H, W), so the processor's post-processing (resize
    to the original size, undoing padding, threshold on the sigmoid) applies to it unchanged.
    """
    if output == "logits":
        return outputs
    scores = getattr(outputs, output, None)
    if scores is None:
        raise ValueError(f"`output` {output!r} is not a field this model returns")
    outputs.logits = F.interpolate(scores.unsqueeze(1).float(), size=outputs.logits.shape[-2:], mode="bilinear",
                                   align_corners=False).squeeze(1)
    return outputs


def post_process_kwargs(model) -> dict:
    """Extra `post_process_referring_segmentation` arguments for `model`: its config's `no_target_threshold`
    (the presence head's, `refseg.no_target`; the processor empties a mask whose no-target probability
    exceeds it) where the config has one, else none (a baseline's processor takes no such argument)."""
    threshold = getattr(getattr(model, "config", None), "no_target_threshold", None)
    return {} if threshold is None else {"no_target_threshold": float(threshold)}


@torch.no_grad()
def predict_counts(model, processor, samples, *, accelerator, batch_size=8, num_workers=0,
                   threshold=None, output="logits", desc="eval", generalized=False):
    """Per-sample integer (index, intersection, union) rows of this process's shard; with `generalized`,
    (index, intersection, union, predicted area, reference area) rows (`refseg.metrics.generalized_counts`).

    `model` must be the unwrapped module: processes may run different numbers of batches, and a
    DDP-wrapped forward would wait for the others. An FSDP-sharded model gathers its weights in every
    forward, so all processes must run as many: a shorter shard is padded with repeats of its first
    sample (a process without any, the split's first), whose rows are dropped. `output` names the field
    scored (`select_output`).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = shard_indices(len(samples), rank, world)
    num_real = len(indices)
    if world > 1 and len(samples) and is_sharded(model):
        longest = max(len(shard_indices(len(samples), r, world)) for r in range(world))
        indices = indices + [indices[0] if indices else 0] * (longest - num_real)
    subset = Subset(samples, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=ProcessorCollator(processor, keep_targets=True))
    was_training = model.training
    model.eval()
    rows = []
    # counted in sentences, so the bar shows sentences/s whatever the batch size
    progress = tqdm(total=num_real, desc=desc, unit=" sentences", disable=not accelerator.is_local_main_process,
                    leave=False)
    for batch in loader:
        targets = batch.pop("target_masks")
        indices = batch.pop("indices")
        sizes = batch.pop("original_sizes")
        inputs = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            outputs = model(**inputs)
        outputs = select_output(outputs, output)
        outputs.logits = outputs.logits.float()
        masks = processor.post_process_referring_segmentation(outputs, target_sizes=sizes.tolist(),
                                                              threshold=threshold, **post_process_kwargs(model))
        count = generalized_counts if generalized else intersection_union
        counts = count([m.cpu().numpy() for m in masks], targets)
        rows.append(np.concatenate([indices.numpy()[:, None], counts], axis=1))
        progress.update(len(indices))
    progress.close()
    model.train(was_training)
    return np.concatenate(rows)[:num_real] if rows else np.zeros((0, 5 if generalized else 3), dtype=np.int64)


def gather_rows(rows: np.ndarray, accelerator) -> np.ndarray:
    """All processes' (index, ...counts) rows on every process, sorted by index, padding dropped."""
    local = torch.as_tensor(rows, dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.pad_across_processes(local, dim=0, pad_index=-1)
        local = accelerator.gather(local)
    out = local.cpu().numpy()
    out = out[out[:, 0] >= 0]
    return out[np.argsort(out[:, 0], kind="stable")]


def split_counts(model, processor, samples, *, accelerator, batch_size=8, num_workers=0,
                 threshold=None, output="logits", desc="eval", generalized=False) -> np.ndarray:
    """Gathered integer (index, intersection, union) rows, one per sample of `samples`, sorted by index
    (`generalized`: (index, intersection, union, predicted area, reference area) rows).

    Raises `RuntimeError` unless the gathered rows are exactly samples 0 .. n-1, each once.
    """
    rows = predict_counts(model, processor, samples, accelerator=accelerator, batch_size=batch_size,
                          num_workers=num_workers, threshold=threshold, output=output, desc=desc,
                          generalized=generalized)
    rows = gather_rows(rows, accelerator)
    if not np.array_equal(rows[:, 0], np.arange(len(samples))):  # sorted: each index once, none outside
        raise RuntimeError(f"evaluation covered {len(np.unique(rows[:, 0]))} distinct of "
                           f"{len(samples)} samples ({len(rows)} rows)")
    return rows


def evaluate_split(model, processor, samples, *, accelerator, batch_size=8, num_workers=0,
                   threshold=None, output="logits", desc="eval", generalized=False):
    """Metric dict (`oIoU`, `mIoU`, `precision@X`, `num_samples`) over all of `samples` (see `split_counts`);
    with `generalized`, `summarize_generalized_counts`'s (`gIoU`, `cIoU`, `N-acc`, `T-acc`, `precision@X` of
    the target samples, `num_samples`, `num_no_target`; an accuracy over no sample is None)."""
    rows = split_counts(model, processor, samples, accelerator=accelerator, batch_size=batch_size,
                        num_workers=num_workers, threshold=threshold, output=output, desc=desc,
                        generalized=generalized)
    return summarize_generalized_counts(rows[:, 1:]) if generalized else summarize_counts(rows[:, 1:])


def summarize_by_group(rows: np.ndarray, labels, order=None, **conventions) -> dict:
    """`{label: metrics}` of the (index, I, U) `rows` grouped by `labels[index]`.

    `labels` holds one label per sample index; groups come in `order` (labels absent from the rows
    are skipped), then any other label in sorted order. `conventions` (`precision_comparison`,
    `empty_iou`) go to `refseg.metrics.summarize_counts`.
    """
    rows = np.asarray(rows)
    if len(rows) and rows[:, 0].max() >= len(labels):
        raise ValueError(f"`labels` has {len(labels)} entries but the rows reach sample index {rows[:, 0].max()}")
    row_labels = np.asarray([labels[i] for i in rows[:, 0]], dtype=object)
    present = set(row_labels.tolist())
    ordered = [g for g in (order or ()) if g in present]
    ordered += sorted(present - set(ordered))
    return {g: summarize_counts(rows[row_labels == g, 1:], **conventions) for g in ordered}


METRIC_COLUMNS = ("oIoU", "mIoU", "precision@0.5", "precision@0.6", "precision@0.7",
                  "precision@0.8", "precision@0.9")
# the generalized metrics (`summarize_generalized_counts`); precision@X over the samples with a target
GENERALIZED_METRIC_COLUMNS = ("gIoU", "cIoU", "N-acc", "T-acc", "precision@0.5", "precision@0.6", "precision@0.7",
                              "precision@0.8", "precision@0.9")


def _table_columns(metric_dicts) -> tuple:
    """`(metric columns, count columns)`: the generalized ones when any of `metric_dicts` holds `gIoU`."""
    if any("gIoU" in m for m in metric_dicts):
        return GENERALIZED_METRIC_COLUMNS, ("num_samples", "num_no_target")
    return METRIC_COLUMNS, ("num_samples",)


COUNT_HEADERS = {"num_samples": "samples", "num_no_target": "no-target"}


def _cells(metrics: dict, columns, counts) -> list:
    """Percentages with two decimals ("-" for a metric over no sample, None), then the counts."""
    values = [metrics.get(c) for c in columns]
    return [*("-" if v is None else f"{100 * v:.2f}" for v in values), *(str(metrics.get(c, "")) for c in counts)]


def format_results_table(results: dict) -> str:
    """`{split: metrics}` as a fixed-width text table in percentages with two decimals (generalized metrics
    `GENERALIZED_METRIC_COLUMNS` and a no-target count when the results are generalized)."""
    columns, counts = _table_columns(results.values())
    header = ["split", *columns, *(COUNT_HEADERS[c] for c in counts)]
    rows = [[split, *_cells(m, columns, counts)] for split, m in results.items()]
    return _format_table(header, rows)


def _format_table(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_comparison_table(results_by_model: dict) -> str:
    """`{model: {split: metrics}}` as one table like `format_results_table`'s, a row per model and split."""
    columns, counts = _table_columns(m for splits in results_by_model.values() for m in splits.values())
    header = ["model", "split", *columns, *(COUNT_HEADERS[c] for c in counts)]
    rows = [[model, split, *_cells(m, columns, counts)]
            for model, splits in results_by_model.items() for split, m in splits.items()]
    return _format_table(header, rows)


@torch.no_grad()
def predict_masks(model, processor, samples, indices, *, device="cpu", batch_size=8, threshold=None) -> list:
    """Boolean masks (h, w) at the original sizes, as numpy arrays, for `samples[i]` for each `i` in `indices`."""
    collate = ProcessorCollator(processor, keep_targets=True)
    was_training = model.training
    model.eval()
    masks = []
    for start in range(0, len(indices), batch_size):
        batch = collate([samples[i] for i in indices[start:start + batch_size]])
        sizes = batch.pop("original_sizes")
        for name in ("target_masks", "indices"):
            batch.pop(name)
        outputs = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        outputs.logits = outputs.logits.float()
        found = processor.post_process_referring_segmentation(outputs, target_sizes=sizes.tolist(),
                                                              threshold=threshold, **post_process_kwargs(model))
        masks.extend(m.cpu().numpy() for m in found)
    model.train(was_training)
    return masks


EXAMPLE_CELL = 192  # px: each panel of the example grid is EXAMPLE_CELL x EXAMPLE_CELL
EXAMPLE_CAPTION = 30  # px of text under each panel (two lines)
_MASK_COLOURS = {"ground truth": (40, 200, 60), "prediction": (230, 40, 40)}


def _panel(image, mask=None, colour=(230, 40, 40)):
    """`image` (PIL RGB) fitted into a square panel, `mask` (bool (h, w) at the image's size) tinted on top."""
    from PIL import Image

    shown = image.convert("RGB")
    if mask is not None:
        array = np.asarray(shown).astype(np.float32)
        array[mask] = 0.45 * array[mask] + 0.55 * np.asarray(colour, dtype=np.float32)
        shown = Image.fromarray(array.astype(np.uint8))
    scale = EXAMPLE_CELL / max(shown.size)
    shown = shown.resize((max(1, round(shown.width * scale)), max(1, round(shown.height * scale))))
    panel = Image.new("RGB", (EXAMPLE_CELL, EXAMPLE_CELL), (255, 255, 255))
    panel.paste(shown, ((EXAMPLE_CELL - shown.width) // 2, (EXAMPLE_CELL - shown.height) // 2))
    return panel


def render_examples(examples: list, path: Union[str, os.PathLike]) -> Path:
    """Write the example grid PNG: a row per example, columns image | ground truth | each model's mask.

    Args:
        examples: dicts `{"image": PIL image, "text": str, "target": bool (h, w), "predictions": [(model
            label, bool (h, w) mask, IoU), ...]}`, every example with the same models in the same order.
        path: the PNG to write (its folder is created).

    Returns:
        `path`. The image is `(2 + models) * EXAMPLE_CELL` wide and `len(examples) * (EXAMPLE_CELL +
        EXAMPLE_CAPTION)` high; under each panel, its title (the expression, "ground truth", or the model
        label) and, for models, the sample's IoU.
    """
    from PIL import Image, ImageDraw

    if not examples:
        raise ValueError("`examples` is empty: nothing to draw")
    num_models = len(examples[0]["predictions"])
    row_height = EXAMPLE_CELL + EXAMPLE_CAPTION
    grid = Image.new("RGB", ((2 + num_models) * EXAMPLE_CELL, len(examples) * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    width = EXAMPLE_CELL // 6  # characters that fit under a panel in PIL's default font

    for row, example in enumerate(examples):
        if len(example["predictions"]) != num_models:
            raise ValueError(f"`examples`[{row}] has {len(example['predictions'])} predictions, expected {num_models}")
        panels = [(_panel(example["image"]), f'"{example["text"]}"', ""),
                  (_panel(example["image"], example["target"], _MASK_COLOURS["ground truth"]), "ground truth", "")]
        panels += [(_panel(example["image"], mask, _MASK_COLOURS["prediction"]), label, f"IoU {iou:.2f}")
                   for label, mask, iou in example["predictions"]]
        top = row * row_height
        for column, (panel, title, note) in enumerate(panels):
            left = column * EXAMPLE_CELL
            grid.paste(panel, (left, top))
            draw.text((left + 4, top + EXAMPLE_CELL + 2), title[:width], fill=(0, 0, 0))
            draw.text((left + 4, top + EXAMPLE_CELL + 15), note, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


EVAL_RECORD_KEYS = ("dataset", "split_by", "scored_output", "global_step", "results")


def write_eval_results(path: Union[str, os.PathLike], results: dict, *, dataset: str,
                       split_by: Optional[str] = None, scored_output: str = "logits",
                       global_step: Optional[int] = None) -> Path:
    """Write `eval_results.json`: the metrics and what they were measured on.

    Layout: `{"dataset": "refcoco", "split_by": "unc", "scored_output": "logits", "global_step": 1200,
    "results": {"<split>": {"oIoU": ..., "mIoU": ..., "precision@0.5": ..., "num_samples": ...}}}` with
    metrics as fractions. `scored_output` names the model output that was thresholded (`"logits"`, or
    `"coarse_logits"` when a run ends in a stage judged by its token-level map). Model cards read the
    dataset from here (`refseg.hub.load_eval_results`), never from the file's name.
    """
    if not dataset:
        raise ValueError("`dataset` is required: the record must say what the results were measured on")
    record = {"dataset": dataset, "split_by": split_by, "scored_output": scored_output,
              "global_step": global_step, "results": results}
    path = Path(path)
    path.write_text(json.dumps(record, indent=2))
    return path


def read_eval_results(path: Union[str, os.PathLike]) -> dict:
    """The record `write_eval_results` wrote, as a dict with every key of `EVAL_RECORD_KEYS`.

    A bare `{split: metrics}` mapping (the layout before the record existed) is read as
    `{"results": mapping}` with the other keys `None`.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "results" not in data:
        data = {"results": data}
    return {key: data.get(key) for key in EVAL_RECORD_KEYS}
