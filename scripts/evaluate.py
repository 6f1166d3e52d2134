#!/usr/bin/env python
"""Evaluate a trained refseg model on RefCOCO-family or RefShapes splits.

    accelerate launch scripts/evaluate.py --model <folder or Hub id> --dataset refcoco \
        --data_root data --split val,testA,testB [--output results.json]

Every sentence of every ref is scored (the model's `logits`); the table (percentages, two
decimals) is printed and the metrics are written as an evaluation record
(`refseg.training.evaluation.write_eval_results`: `{"dataset", "split_by", "scored_output":
"logits", "global_step": null, "results": {split: metrics}}`, metrics as fractions) to `--output`,
default `<model>/eval_<dataset>.json` for a folder. The record names its dataset and split protocol
(`--split_by`, or the dataset's default), so `scripts/push_to_hub.py --eval_results` reads them
from the file, whatever it is called. `main` returns the bare `{split: metrics}`.
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
from transformers import AutoModel, AutoProcessor

import refseg  # noqa: F401  (registers the models with the Auto classes)
from refseg.data.refshapes import EXPRESSION_KINDS, expression_kind
from refseg.metrics import PRECISION_COMPARISONS, summarize_counts
from refseg.training.data import load_eval_splits, resolve_split_by
from refseg.training.evaluation import format_results_table, split_counts, summarize_by_group, write_eval_results

SCORED_OUTPUT = "logits"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="trained model folder or Hub id")
    p.add_argument("--dataset", default="refshapes", help="refshapes | refcoco | refcoco+ | refcocog")
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
    p.add_argument("--max_samples", type=int, default=None, help="first N sentences per split")
    p.add_argument("--mixed_precision", default=None)
    p.add_argument("--output", default=None, help="JSON file for the metrics")
    p.add_argument("--by_kind", action="store_true",
                   help="RefShapes only: also report each split by kind of expression")
    args = p.parse_args(argv)
    if args.by_kind and args.dataset != "refshapes":
        raise ValueError(f"`--by_kind` needs `--dataset refshapes` (kinds come from the RefShapes grammar), "
                         f"got {args.dataset!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    model = AutoModel.from_pretrained(args.model).to(accelerator.device)
    processor = AutoProcessor.from_pretrained(args.model)
    data_args = DataArguments(dataset=args.dataset, split_by=args.split_by, data_root=args.data_root,
                              image_root=args.image_root, parquet_files=args.parquet_files,
                              eval_splits=args.split, max_eval_samples=args.max_samples)
    with accelerator.main_process_first():
        splits = load_eval_splits(data_args)
    results, by_kind = {}, {}
    for name, samples in splits.items():
        rows = split_counts(model, processor, samples, accelerator=accelerator, batch_size=args.batch_size,
                            num_workers=args.num_workers, threshold=args.threshold, output=SCORED_OUTPUT,
                            desc=f"eval {name}")
        conventions = {"precision_comparison": args.precision_comparison, "empty_iou": args.empty_iou}
        results[name] = summarize_counts(rows[:, 1:], **conventions)
        if args.by_kind:
            kinds = [expression_kind(sentence) for sentence in samples.dataset["sentence"]]
            by_kind[name] = summarize_by_group(rows, kinds, order=EXPRESSION_KINDS, **conventions)
    if accelerator.is_main_process:
        print(f"{args.model} on {args.dataset}:")
        print(format_results_table(results))
        output = Path(args.output or (Path(args.model) / f"eval_{args.dataset}.json" if Path(args.model).is_dir()
                                      else f"eval_{args.dataset}.json"))
        write_eval_results(output, results, dataset=args.dataset,
                           split_by=resolve_split_by(data_args), scored_output=SCORED_OUTPUT)
        print(f"metrics written to {output}")
        if args.by_kind:
            print("by kind of expression:")
            print(format_results_table({f"{split} {kind}": metrics for split, groups in by_kind.items()
                                        for kind, metrics in groups.items()}))
            kinds_output = output.with_name(f"{output.stem}_by_kind.json")
            kinds_output.write_text(json.dumps(by_kind, indent=2))
            print(f"metrics by kind written to {kinds_output}")
    return results


if __name__ == "__main__":
    main()
