"""Command-line and YAML arguments of `scripts/train.py` and `scripts/evaluate.py`.

`--config file.yaml` supplies defaults (a flat mapping of the flag names below); flags given on
the command line override them. Unknown YAML keys are an error, so a typo never goes unnoticed.
"""

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml
from transformers import HfArgumentParser


@dataclass
class ModelArguments:
    method: str = field(default="risclip", metadata={"help": "risclip (more methods register in refseg.training.METHODS)"})
    preset: Optional[str] = field(default=None, metadata={"help": "refseg.presets name: backbone ids and config overrides"})
    clip: Optional[str] = field(default=None, metadata={"help": "CLIP backbone: Hub id or local folder (overrides the preset)"})
    sam: Optional[str] = field(default=None, metadata={"help": "SAM backbone: Hub id or local folder (overrides the preset)"})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a trained refseg model to fine-tune instead"})
    config_overrides: Optional[str] = field(default=None, metadata={"help": "JSON object of config fields, e.g. '{\"adapter_bottleneck\": 32}'"})


@dataclass
class DataArguments:
    dataset: str = field(default="refshapes", metadata={"help": "refshapes | refcoco | refcoco+ | refcocog, or several comma-separated (trained together without any held-out image; evaluation splits then named <dataset>:<split>); generalized (no-target and multi-target expressions, scored by gIoU / cIoU / N-acc / T-acc): grefcoco | grefshapes (generated like refshapes when missing)"})
    split_by: Optional[str] = field(default=None, metadata={"help": "unc (refcoco, refcoco+, refshapes, grefcoco, grefshapes) | umd | google (refcocog); comma-separated per dataset for several"})
    data_root: str = field(default="data", metadata={"help": "folder holding <dataset>/refs(<split_by>).p (gRefCOCO: grefs(<split_by>).json) and instances.json"})
    image_root: Optional[str] = field(default=None, metadata={"help": "image folder (default <data_root>/images)"})
    parquet_files: Optional[str] = field(default=None, metadata={"help": "read parquet copies instead: a glob per split, '{split}' is replaced"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_splits: str = field(default="val", metadata={"help": "comma-separated splits to evaluate ('' for none)"})
    refshapes_num_images: int = field(default=1000, metadata={"help": "images generated when RefShapes (or grefshapes) is missing"})
    refshapes_seed: int = field(default=0, metadata={"help": "seed of the generated RefShapes"})
    augment: bool = field(default=False, metadata={"help": "random affine + saturation augmentation"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training refs"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "evaluate only the first N sentences per split"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run", metadata={"help": "checkpoints, logs, final model, eval_results.json"})
    seed: int = field(default=42, metadata={"help": "seed of initialisation, sampling and augmentation"})
    num_epochs: int = field(default=1, metadata={"help": "epochs when `stages` is not given (split into the method's stages)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "total optimizer updates (stages keep their shares)"})
    stages: Optional[str] = field(default=None, metadata={"help": "explicit stage lengths, e.g. 'locator:59,refiner:1'"})
    stage_unit: str = field(default="epochs", metadata={"help": "unit of `stages`: epochs | steps"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch size per process: batch rows (image-expression pairs) per micro-batch. With a grouped_by_image method each image gives `sentences_per_image` consecutive rows, so this must be a multiple of it (Prompt-RIS: 64 rows = 16 images x 4 sentences)"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "evaluation batch size per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer update"})
    global_batch_size: Optional[int] = field(default=None, metadata={"help": "samples (batch rows) per optimizer update over all processes; derives gradient_accumulation_steps. A grouped_by_image method's images are never split across processes or micro-batches"})
    sentences_per_image: int = field(default=4, metadata={"help": "grouped_by_image sampler (Prompt-RIS Instance Contrastive Learning) only: b sentences drawn per image from all its refs, as b consecutive rows of one device batch, each with its own referent's mask; an image with fewer than b sentences repeats some of them (drawn with replacement) with words dropped, see word_mask_rate"})
    word_mask_rate: float = field(default=0.25, metadata={"help": "grouped_by_image sampler only: share of the words dropped from a repeated sentence (round(rate x words), at least 1, never all; one-word sentences repeat unchanged; 0 repeats unchanged)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adam"})
    optimizer_implementation: str = field(default="auto", metadata={"help": "auto (fused where supported) | fused | foreach | for-loop"})
    learning_rate: float = field(default=5e-5, metadata={"help": "base learning rate"})
    stage_learning_rates: str = field(default="", metadata={"help": "per-stage base rates, e.g. 'refiner:3e-3' (others: learning_rate)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    lr_scheduler: str = field(default="polynomial", metadata={"help": "polynomial | step | constant (restarts each stage)"})
    lr_power: float = field(default=1.0, metadata={"help": "power of the polynomial decay"})
    lr_milestones: str = field(default="", metadata={"help": "step scheduler: comma-separated fractions of the stage"})
    lr_gamma: float = field(default=0.1, metadata={"help": "step scheduler: factor at each milestone"})
    lr_schedule_scope: str = field(default="stage", metadata={
        "help": "'stage': the schedule restarts at each stage; 'run': one schedule over all stages"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    mixed_precision: Optional[str] = field(default=None, metadata={"help": "no | fp16 | bf16 (default: accelerate config)"})
    checkpointing_steps: Optional[int] = field(default=None, metadata={"help": "save a checkpoint every N updates"})
    checkpoints_total_limit: Optional[int] = field(default=None, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "evaluate every N updates (always at the end)"})
    best_metric: Optional[str] = field(default=None, metadata={
        "help": "keep the best model by '<split>/<metric>' (e.g. 'val/oIoU', 'val/mIoU') in <output_dir>/best after each evaluation"})
    best_metric_mode: str = field(default="max", metadata={"help": "max | min: which way `best_metric` improves"})
    sync_batch_norm: bool = field(default=False, metadata={
        "help": "with several processes, BatchNorm layers normalise by the statistics of the whole global batch (SyncBatchNorm; CPU processes too)"})
    logging_steps: int = field(default=10, metadata={"help": "log every N updates"})
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker, or 'none'"})


def parse_args(argv=None, dataclass_types=(ModelArguments, DataArguments, TrainArguments)):
    """Parse `--config` YAML defaults, then the command line; returns one instance per dataclass."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML file of defaults for these flags")
    if known.config:
        with open(known.config) as f:
            defaults = yaml.safe_load(f) or {}
        valid = {f.name for t in dataclass_types for f in fields(t)}
        unknown = sorted(set(defaults) - valid)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**defaults)
    *parsed, extra = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return tuple(parsed[: len(dataclass_types)])  # drop the namespace holding --config
