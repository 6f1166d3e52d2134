"""Training support shared by `scripts/train.py` and `scripts/evaluate.py`.

The scripts own argument parsing, logging and the loop; this package holds what they share and
what a new method plugs into: the method registry (`registry`), the deterministic training and
evaluation sample sets (`samples`), crash-safe checkpoint folders (`checkpointing`), the
stage-aware learning-rate schedule (`schedules`), the distributed evaluation (`evaluation`), the best
checkpoint by a validation score (`best`) and BatchNorm synchronised across processes (`distributed`).
"""

from .checkpointing import find_latest_checkpoint, prune_checkpoints, save_checkpoint
from .evaluation import evaluate_split, split_counts, summarize_by_group
from .registry import METHODS, MethodSpec, get_method
from .samples import EvalSamples, TrainSamples, epoch_permutation
from .schedules import StagePlan, build_stage_plan, staged_lr_lambda

__all__ = [
    "METHODS",
    "EvalSamples",
    "MethodSpec",
    "StagePlan",
    "TrainSamples",
    "build_stage_plan",
    "epoch_permutation",
    "evaluate_split",
    "find_latest_checkpoint",
    "get_method",
    "prune_checkpoints",
    "save_checkpoint",
    "split_counts",
    "staged_lr_lambda",
    "summarize_by_group",
]
