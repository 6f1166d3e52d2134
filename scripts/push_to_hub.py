#!/usr/bin/env python
"""Export a trained refseg model as a Hub repository folder, and optionally upload it.

    python scripts/push_to_hub.py --model outputs/risclip-b_refcoco --repo_id my-org/risclip-b-refcoco \
        --preset risclip-b --eval_results outputs/risclip-b_refcoco/eval_results.json [--push] [--private]

Without `--push` it only writes the folder (default `<model>/hub-export`, or `--out_dir`): config,
safetensors weights, processor files, the model card (README.md) and, unless `--no_remote_code`,
the flattened modeling and pipeline code with `auto_map` / `custom_pipelines`, so the repository
loads with `trust_remote_code=True` where refseg is not installed. With `--push` it creates the
repository (if needed) and uploads the folder with `huggingface_hub` (log in first with
`hf auth login` or set `HF_TOKEN`).

The card data comes from `--preset` (a card shipped with refseg: risclip-b, risclip-l,
risclip-tiny) or `--card_data <yaml/json>`; measured results only from `--eval_results`, the
evaluation record `scripts/train.py` (`<output_dir>/eval_results.json`) or `scripts/evaluate.py`
writes. The dataset of those results is the one the record names; `--eval_dataset` only fills in
for a record that names none (the old bare `{split: metrics}` layout), else the card data's
`evaluation_dataset` does; an `--eval_dataset` that contradicts the record is an error. The file's
name plays no part. The card's license: the card data's, else the backbone checkpoint's (from its
model card, when the model's config records a local folder or a cached Hub id), else `other` with
a note (see `refseg.hub.cards`).

Called as `main(argv)`, a bad argument raises `ValueError`; run as a script, it exits with the message.
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import sys
from pathlib import Path

import refseg  # noqa: F401  (registers the models with the Auto classes)
from refseg.hub import available_cards, export, load_card_info, load_eval_results, resolve_eval_dataset
from transformers import AutoModel, AutoProcessor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by save_pretrained (model + processor)")
    p.add_argument("--repo_id", required=True, help="target Hub repository, <org>/<name>")
    p.add_argument("--preset", default=None, help=f"card data shipped with refseg: {', '.join(available_cards())}")
    p.add_argument("--card_data", default=None, help="card data YAML/JSON file (instead of --preset)")
    p.add_argument("--eval_results", default=None,
                   help="eval_results.json written by scripts/train.py or scripts/evaluate.py")
    p.add_argument("--eval_dataset", default=None,
                   help="dataset of --eval_results when the file records none (old layout): refcoco, refcoco+, ...")
    p.add_argument("--out_dir", default=None, help="export folder (default: <model>/hub-export)")
    p.add_argument("--no_remote_code", action="store_true", help="do not ship the modeling code")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out_dir")
    p.add_argument("--push", action="store_true", help="upload the folder to --repo_id")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit_message", default="Upload refseg model")
    args = p.parse_args(argv)
    if args.preset and args.card_data:
        p.error("pass either --preset or --card_data, not both")
    if args.repo_id.count("/") != 1:
        p.error(f"--repo_id must look like <org>/<name>, got {args.repo_id!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    model_dir = Path(args.model)
    out_dir = Path(args.out_dir) if args.out_dir else model_dir / "hub-export"
    card_data = args.card_data or args.preset
    # Check the results and their dataset before loading the model: a contradiction fails fast.
    record = load_eval_results(args.eval_results)
    if record is not None:
        default = load_card_info(card_data).get("evaluation_dataset") if card_data else None
        dataset = resolve_eval_dataset(record, args.eval_dataset, default)
        source = "recorded in the file" if record["dataset"] else (
            "--eval_dataset" if args.eval_dataset else "the card data's evaluation_dataset")
        print(f"measured results: {', '.join(record['results'])} on {dataset} ({source})")
    model = AutoModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    export(
        model,
        processor,
        out_dir,
        remote_code=not args.no_remote_code,
        card_data=card_data,
        eval_results=record,
        eval_dataset=args.eval_dataset,
        repo_id=args.repo_id,
        overwrite=args.overwrite,
    )
    print(f"wrote {out_dir}")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name}")
    if not args.push:
        print("not uploaded (pass --push to upload)")
        return

    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
    api.upload_folder(
        repo_id=args.repo_id, folder_path=str(out_dir), repo_type="model", commit_message=args.commit_message
    )
    print(f"uploaded to {url}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
