#!/usr/bin/env python
"""Evaluate referring segmentation models, side by side, on RefCOCO-family or RefShapes splits.

    accelerate launch scripts/evaluate.py --model <folder or Hub id> [--model <another> ...] \
        --dataset refcoco --data_root data --split val,testA,testB [--output results.json] \
        [--save_examples 8 examples/]

`--model` takes a refseg model or a baseline (`refseg.baselines`: a stock CLIPSeg checkpoint such as
`CIDAS/clipseg-rd64-refined`); give it several times to score several models on the same sentences.
With one model the table is as before; with several, one table has a row per model and split, and
each model gets its own record file (below; `--output` is then refused). `--save_examples N DIR`
also writes `DIR/examples.png`: N sentences of the first split, spread evenly over it, one row each
(the image, the expression, the ground truth, each model's mask with its IoU). A progress bar
counts sentences (sentences/s).

Every sentence of every ref is scored (the model's `logits`); the table (percentages, two
decimals) is printed and the metrics are written as an evaluation record
(`refseg.training.evaluation.write_eval_results`: `{"dataset", "split_by", "scored_output":
"logits", "global_step": null, "results": {split: metrics}}`, metrics as fractions) to `--output`,
default `<model>/eval_<dataset>.json` for a folder. The record names its dataset and split protocol
(`--split_by`, or the dataset's default), so `scripts/push_to_hub.py --eval_results` reads them
from the file, whatever it is called. `main` returns the bare `{split: metrics}` (with several
models, `{model label: {split: metrics}}`).
On a generalized dataset (`--dataset grefcoco`, gRefCOCO in `<data_root>/grefcoco/`, or `grefshapes`, generated
RefShapes with no-target and multi-target expressions), the table holds gIoU, cIoU, N-acc, T-acc and
precision@X over the samples with a target (`refseg.metrics.summarize_generalized_counts`; `--accuracy_convention`),
and a model with the presence head empties the masks it judges to have no target (its config's
`no_target_threshold`, or `--no_target_threshold`).
On RefShapes, `--by_kind` also breaks each split down by kind of expression
(`refseg.data.expression_kind`: colour, shape, colour+shape, size, position, ordinal, relation),
printed as a second table and written next to the JSON as `<name>_by_kind.json`.
"""

import _scripts_path  # noqa: F401  (first: keeps this file from shadowing the `evaluate` package)

import argparse
import json
import logging
from pathlib import Path

from accelerate import Accelerator
from train_args import DataArguments
import numpy as np

import refseg  # noqa: F401  (registers the models with the Auto classes)
from refseg.baselines import load_referring_model_and_processor
from refseg.data.refshapes import EXPRESSION_KINDS, expression_kind
from refseg.metrics import ACCURACY_CONVENTIONS, PRECISION_COMPARISONS, summarize_counts, summarize_generalized_counts
from refseg.training.data import GENERALIZED_DATASETS, is_generalized, load_eval_splits, resolve_split_by
from refseg.training.evaluation import (
    format_comparison_table, format_results_table, predict_masks, render_examples, split_counts, summarize_by_group,
    write_eval_results,
)

SCORED_OUTPUT = "logits"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append",
                   help="model folder or Hub id (refseg model or baseline); repeat to compare models")
    p.add_argument("--dataset", default="refshapes",
                   help="refshapes | refcoco | refcoco+ | refcocog; generalized: grefcoco | grefshapes")
    p.add_argument("--split_by", default=None, help="unc | umd | google (default per dataset)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--image_root", default=None)
    p.add_argument("--parquet_files", default=None, help="parquet glob with '{split}' instead of the refer files")
    p.add_argument("--split", default="val", help="comma-separated splits")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None, help="default: the model config's")
    p.add_argument("--precision_comparison", default=">", choices=PRECISION_COMPARISONS,
                   help="a sample counts for precision@X when its IoU is > X (default) or >= X (LAVT's code)")
    p.add_argument("--empty_iou", type=int, default=1, choices=(0, 1),
                   help="IoU of a sample whose prediction and target are both empty (1, default; CRIS/LAVT code: 0)")
    p.add_argument("--no_target_threshold", type=float, default=None,
                   help="presence head: empty the mask where P(no target) exceeds this (default: the model config's)")
    p.add_argument("--accuracy_convention", default="gsva", choices=ACCURACY_CONVENTIONS,
                   help="generalized datasets: N-acc / T-acc as GSVA's code (default) or ReLA's (docs/metrics.md)")
    p.add_argument("--max_samples", type=int, default=None, help="first N sentences per split")
    p.add_argument("--mixed_precision", default=None)
    p.add_argument("--output", default=None, help="JSON file for the metrics")
    p.add_argument("--by_kind", action="store_true",
                   help="RefShapes only: also report each split by kind of expression")
    p.add_argument("--save_examples", nargs=2, metavar=("N", "DIR"), default=None,
                   help="write DIR/examples.png: N sentences of the first split with every model's mask")
    args = p.parse_args(argv)
    if len(args.model) > 1 and args.output:
        raise ValueError("`--output` names one file; with several `--model`s each record goes next to its model")
    if args.save_examples:
        count, folder = args.save_examples
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"`--save_examples` takes N >= 1 and a folder, got {args.save_examples}")
        args.save_examples = (int(count), Path(folder))
    if args.empty_iou != 1 and args.dataset in GENERALIZED_DATASETS:
        raise ValueError("`--empty_iou` is a convention of the standard metrics; on a generalized dataset a no-target "
                         "sample predicted empty counts 1 in gIoU by definition")
    if args.no_target_threshold is not None and not 0 < args.no_target_threshold < 1:
        raise ValueError(f"`--no_target_threshold` must be in (0, 1), got {args.no_target_threshold}")
    if args.by_kind and args.dataset != "refshapes":
        raise ValueError(f"`--by_kind` needs `--dataset refshapes` (kinds come from the RefShapes grammar), "
                         f"got {args.dataset!r}")
    return args


def output_path(args, model: str) -> Path:
    """The record file of `model`: `--output`, else `<model>/eval_<dataset>.json` for a folder, else
    `eval_<dataset>.json` (one model) or `eval_<dataset>_<owner>__<name>.json` (several) here."""
    if args.output:
        return Path(args.output)
    if Path(model).is_dir():
        return Path(model) / f"eval_{args.dataset}.json"
    suffix = "" if len(args.model) == 1 else "_" + model.replace("/", "__")
    return Path(f"eval_{args.dataset}{suffix}.json")


def model_labels(models) -> list:
    """Short unique names for the table and the picture: a folder's name, a Hub id as it is."""
    labels = [Path(m).name if Path(m).is_dir() else m for m in models]
    return [label if labels.count(label) == 1 else models[i] for i, label in enumerate(labels)]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    data_args = DataArguments(dataset=args.dataset, split_by=args.split_by, data_root=args.data_root,
                              image_root=args.image_root, parquet_files=args.parquet_files,
                              eval_splits=args.split, max_eval_samples=args.max_samples)
    with accelerator.main_process_first():
        splits = load_eval_splits(data_args)
    first_split = next(iter(splits.values()))
    example_indices = []
    if args.save_examples:
        count = min(args.save_examples[0], len(first_split))
        example_indices = np.unique(np.linspace(0, len(first_split) - 1, count).round().astype(int)).tolist()
    generalized = is_generalized(data_args)
    conventions = {"precision_comparison": args.precision_comparison, "empty_iou": args.empty_iou}
    labels = model_labels(args.model)
    all_results, example_masks, example_ious = {}, {}, {}
    for name, label in zip(args.model, labels):
        model, processor = load_referring_model_and_processor(name)
        model.to(accelerator.device)
        if args.no_target_threshold is not None:  # read by the post-processing (`post_process_kwargs`)
            if getattr(model.config, "no_target_threshold", None) is None:
                raise ValueError(f"`--no_target_threshold`: {name} has no presence head threshold in its config")
            model.config.no_target_threshold = args.no_target_threshold
        results, by_kind = {}, {}
        for split, samples in splits.items():
            rows = split_counts(model, processor, samples, accelerator=accelerator, batch_size=args.batch_size,
                                num_workers=args.num_workers, threshold=args.threshold, output=SCORED_OUTPUT,
                                desc=f"{label} {split}", generalized=generalized)
            if generalized:
                results[split] = summarize_generalized_counts(
                    rows[:, 1:], precision_comparison=args.precision_comparison,
                    accuracy_convention=args.accuracy_convention)
            else:
                results[split] = summarize_counts(rows[:, 1:], **conventions)
            if args.by_kind:
                kinds = [expression_kind(sentence) for sentence in samples.dataset["sentence"]]
                by_kind[split] = summarize_by_group(rows, kinds, order=EXPRESSION_KINDS, **conventions)
            if split == next(iter(splits)) and example_indices:
                counts = rows[example_indices, 1:]
                empty = float(generalized)  # both masks empty: 1 in gIoU (a no-target sample predicted empty)
                example_ious[label] = np.where(counts[:, 1] > 0, counts[:, 0] / np.maximum(counts[:, 1], 1), empty)
        if example_indices and accelerator.is_main_process:
            example_masks[label] = predict_masks(model, processor, first_split, example_indices,
                                                 device=accelerator.device, batch_size=args.batch_size,
                                                 threshold=args.threshold)
        all_results[label] = results
        if accelerator.is_main_process:
            report(args, name, results, by_kind, resolve_split_by(data_args))
        del model
    if accelerator.is_main_process:
        if len(args.model) > 1:
            print("side by side:")
            print(format_comparison_table(all_results))
        if example_indices:
            examples = []
            for k, index in enumerate(example_indices):
                sample = first_split[index]
                examples.append({"image": sample["image"], "text": sample["text"], "target": np.asarray(sample["mask"]) > 0,
                                 "predictions": [(label, example_masks[label][k], float(example_ious[label][k]))
                                                 for label in labels]})
            path = render_examples(examples, args.save_examples[1] / "examples.png")
            print(f"{len(examples)} examples drawn in {path}")
    return all_results[labels[0]] if len(labels) == 1 else all_results


def report(args, model, results, by_kind, split_by):
    """Print one model's table (and its by-kind table) and write its record file(s)."""
    print(f"{model} on {args.dataset}:")
    print(format_results_table(results))
    output = output_path(args, model)
    write_eval_results(output, results, dataset=args.dataset, split_by=split_by, scored_output=SCORED_OUTPUT)
    print(f"metrics written to {output}")
    if args.by_kind:
        print("by kind of expression:")
        print(format_results_table({f"{split} {kind}": metrics for split, groups in by_kind.items()
                                    for kind, metrics in groups.items()}))
        kinds_output = output.with_name(f"{output.stem}_by_kind.json")
        kinds_output.write_text(json.dumps(by_kind, indent=2))
        print(f"metrics by kind written to {kinds_output}")


if __name__ == "__main__":
    main()
