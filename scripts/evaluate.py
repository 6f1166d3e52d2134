#!/usr/bin/env python
"""Evaluate a trained refseg model on RefCOCO-family or RefShapes splits.

    accelerate launch scripts/evaluate.py --model <folder or Hub id> --dataset refcoco \
        --data_root data --split val,testA,testB [--output results.json]

Every sentence of every ref is scored; the table (percentages, two decimals) is printed and the
metrics are written as JSON (`--output`, default `<model>/eval_<dataset>.json` for a folder).
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
from refseg.training.data import load_eval_splits
from refseg.training.evaluation import evaluate_split, format_results_table


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
    p.add_argument("--max_samples", type=int, default=None, help="first N sentences per split")
    p.add_argument("--mixed_precision", default=None)
    p.add_argument("--output", default=None, help="JSON file for the metrics")
    return p.parse_args(argv)


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
    results = {name: evaluate_split(model, processor, samples, accelerator=accelerator,
                                    batch_size=args.batch_size, num_workers=args.num_workers,
                                    threshold=args.threshold, desc=f"eval {name}")
               for name, samples in splits.items()}
    if accelerator.is_main_process:
        print(f"{args.model} on {args.dataset}:")
        print(format_results_table(results))
        output = args.output or (Path(args.model) / f"eval_{args.dataset}.json" if Path(args.model).is_dir()
                                 else f"eval_{args.dataset}.json")
        Path(output).write_text(json.dumps(results, indent=2))
        print(f"metrics written to {output}")
    return results


if __name__ == "__main__":
    main()
