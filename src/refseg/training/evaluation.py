"""Evaluation over one split, split across processes, every sentence counted exactly once."""

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..metrics import intersection_union, summarize_counts
from .samples import ProcessorCollator, shard_indices

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_counts(model, processor, samples, *, accelerator, batch_size=8, num_workers=0,
                   threshold=None, desc="eval"):
    """Per-sample integer (index, intersection, union) rows of this process's shard.

    `model` must be the unwrapped module: processes may run different numbers of batches, and a
    DDP-wrapped forward would wait for the others.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    subset = Subset(samples, shard_indices(len(samples), rank, world))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=ProcessorCollator(processor, keep_targets=True))
    was_training = model.training
    model.eval()
    rows = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        targets = batch.pop("target_masks")
        indices = batch.pop("indices")
        sizes = batch.pop("original_sizes")
        inputs = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            outputs = model(**inputs)
        outputs.logits = outputs.logits.float()
        masks = processor.post_process_referring_segmentation(outputs, target_sizes=sizes.tolist(),
                                                              threshold=threshold)
        counts = intersection_union([m.cpu().numpy() for m in masks], targets)
        rows.append(np.concatenate([indices.numpy()[:, None], counts], axis=1))
    model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)


def gather_rows(rows: np.ndarray, accelerator) -> np.ndarray:
    """All processes' (index, I, U) rows on every process, sorted by index, padding dropped."""
    local = torch.as_tensor(rows, dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.pad_across_processes(local, dim=0, pad_index=-1)
        local = accelerator.gather(local)
    out = local.cpu().numpy()
    out = out[out[:, 0] >= 0]
    return out[np.argsort(out[:, 0], kind="stable")]


def split_counts(model, processor, samples, *, accelerator, batch_size=8, num_workers=0,
                 threshold=None, desc="eval") -> np.ndarray:
    """Gathered integer (index, intersection, union) rows, one per sample of `samples`, sorted by index.

    Raises `RuntimeError` if the gathered rows do not cover every sample exactly once.
    """
    rows = predict_counts(model, processor, samples, accelerator=accelerator, batch_size=batch_size,
                          num_workers=num_workers, threshold=threshold, desc=desc)
    rows = gather_rows(rows, accelerator)
    if len(rows) != len(samples) or len(np.unique(rows[:, 0])) != len(samples):
        raise RuntimeError(f"evaluation covered {len(np.unique(rows[:, 0]))} distinct of "
                           f"{len(samples)} samples ({len(rows)} rows)")
    return rows


def evaluate_split(model, processor, samples, *, accelerator, batch_size=8, num_workers=0,
                   threshold=None, desc="eval"):
    """Metric dict (`oIoU`, `mIoU`, `precision@X`, `num_samples`) over all of `samples` (see `split_counts`)."""
    rows = split_counts(model, processor, samples, accelerator=accelerator, batch_size=batch_size,
                        num_workers=num_workers, threshold=threshold, desc=desc)
    return summarize_counts(rows[:, 1:])


def summarize_by_group(rows: np.ndarray, labels, order=None) -> dict:
    """`{label: metrics}` of the (index, I, U) `rows` grouped by `labels[index]`.

    `labels` holds one label per sample index; groups come in `order` (labels absent from the rows
    are skipped), then any other label in sorted order.
    """
    rows = np.asarray(rows)
    if len(rows) and rows[:, 0].max() >= len(labels):
        raise ValueError(f"`labels` has {len(labels)} entries but the rows reach sample index {rows[:, 0].max()}")
    row_labels = np.asarray([labels[i] for i in rows[:, 0]], dtype=object)
    present = set(row_labels.tolist())
    ordered = [g for g in (order or ()) if g in present]
    ordered += sorted(present - set(ordered))
    return {g: summarize_counts(rows[row_labels == g, 1:]) for g in ordered}


METRIC_COLUMNS = ("oIoU", "mIoU", "precision@0.5", "precision@0.6", "precision@0.7",
                  "precision@0.8", "precision@0.9")


def format_results_table(results: dict) -> str:
    """`{split: metrics}` as a fixed-width text table in percentages with two decimals."""
    header = ["split", *METRIC_COLUMNS, "samples"]
    rows = [[split, *(f"{100 * m[c]:.2f}" for c in METRIC_COLUMNS), str(m.get("num_samples", ""))]
            for split, m in results.items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
