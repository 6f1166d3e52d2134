"""Keep the model with the best validation score (`scripts/train.py --best_metric val/oIoU`; on a generalized
dataset, e.g. `--best_metric val/gIoU`).

The authors of CRIS (and most RIS code) keep the checkpoint of the epoch with the best validation IoU
besides the last one. `BestTracker` does that for any method: after every evaluation it compares
`results[split][metric]` with the best so far and, when it improves, writes `<output_dir>/best/` as a
complete `save_pretrained` folder (model and processor) plus `best_metric.json`
(`{"split", "metric", "mode", "value", "step"}`). The folder is written to a temporary name and renamed,
so an interrupted save leaves the previous best intact.
"""

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_RECORD = "best_metric.json"
MODES = ("max", "min")


def parse_best_metric(spec: str, eval_splits, metrics=None) -> tuple:
    """`"val/oIoU"` -> `("val", "oIoU")`; a `ValueError` when the form is wrong, the split is not evaluated or
    (given `metrics`, the names the run's evaluation reports) the metric is not one of them."""
    split, sep, metric = (spec or "").partition("/")
    if not sep or not split or not metric:
        raise ValueError(f"`best_metric` must read '<split>/<metric>' (e.g. 'val/oIoU'), got {spec!r}")
    splits = list(eval_splits)
    if split not in splits:
        raise ValueError(f"`best_metric` names split {split!r}, which is not evaluated (`eval_splits`: {splits})")
    if metrics is not None and metric not in metrics:
        raise ValueError(f"`best_metric` names metric {metric!r}, which this evaluation does not report "
                         f"(metrics: {list(metrics)})")
    return split, metric


class BestTracker:
    """Decide after each evaluation whether the model is the best so far, and save it when it is.

    Args:
        output_dir: the run's folder; the best model goes to `output_dir / "best"`.
        split, metric: what to compare (`results[split][metric]`).
        mode: `"max"` (IoU, precision) or `"min"`.
        resume: read the best value of an earlier part of this run from `best/best_metric.json`; a fresh run
            ignores (and replaces at its first evaluation) a record left by another run in the folder.
    """

    def __init__(self, output_dir, split: str, metric: str, mode: str = "max", resume: bool = False):
        if mode not in MODES:
            raise ValueError(f"`best_metric_mode` must be one of {MODES}, got {mode!r}")
        self.folder = Path(output_dir) / BEST_DIR
        self.split, self.metric, self.mode = split, metric, mode
        self.best: Optional[float] = None
        record = self.folder / BEST_RECORD
        if resume and record.is_file():
            data = json.loads(record.read_text())
            if (data.get("split"), data.get("metric"), data.get("mode")) == (split, metric, mode):
                self.best = float(data["value"])

    def value(self, results: dict) -> float:
        if self.split not in results or self.metric not in results[self.split]:
            known = sorted(results.get(self.split, {}))
            raise ValueError(f"`best_metric` {self.split}/{self.metric}: no such result (metrics: {known})")
        return float(results[self.split][self.metric])

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, results: dict, step: int, save) -> bool:
        """Compare, and call `save(folder)` (every process must call `update`; only the caller's `save` decides
        what it writes) when the value improves. Returns whether it did. A metric over no sample (None: N-acc of
        a split without a no-target expression) is never an improvement."""
        if results.get(self.split, {}).get(self.metric, 0.0) is None:
            logger.warning("best %s/%s is undefined at step %d (a metric over no sample): not compared", self.split,
                           self.metric, step)
            return False
        value = self.value(results)
        if not self.improves(value):
            return False
        self.best = value
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        save(tmp, self.folder, {"split": self.split, "metric": self.metric, "mode": self.mode, "value": value,
                                "step": step})
        logger.info("best %s/%s = %.4f at step %d: saved to %s", self.split, self.metric, value, step, self.folder)
        return True


def write_best_folder(tmp: Path, final: Path, record: dict, model, processor) -> None:
    """Write `model` and `processor` with `record` to `tmp`, then put it in place of `final` (main process)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


__all__ = ["BEST_DIR", "BEST_RECORD", "BestTracker", "parse_best_metric", "write_best_folder"]
