#!/usr/bin/env python
"""Export a trained refseg model as a Hub repository folder, and optionally upload it.

    python scripts/push_to_hub.py --model outputs/risclip-b/final --repo_id my-org/risclip-b-refcoco \
        --preset risclip-b --eval_results outputs/risclip-b/final/eval_refcoco.json [--push] [--private]

Without `--push` it only writes the folder (default `<model>/hub-export`, or `--out_dir`): config,
safetensors weights, processor files, the model card (README.md) and, unless `--no_remote_code`,
the flattened modeling and pipeline code with `auto_map` / `custom_pipelines`, so the repository
loads with `trust_remote_code=True` where refseg is not installed. With `--push` it creates the
repository (if needed) and uploads the folder with `huggingface_hub` (log in first with
`hf auth login` or set `HF_TOKEN`).

The card data comes from `--preset` (a card shipped with refseg: risclip-b, risclip-l,
risclip-tiny) or `--card_data <yaml/json>`; measured results only from `--eval_results` (the JSON
`scripts/evaluate.py` writes; its dataset from `--eval_dataset`, else from a file name
`eval_<dataset>.json`, else the card's default).
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import re
import sys
from pathlib import Path

import refseg  # noqa: F401  (registers the models with the Auto classes)
from refseg.hub import available_cards, export
from transformers import AutoModel, AutoProcessor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by save_pretrained (model + processor)")
    p.add_argument("--repo_id", required=True, help="target Hub repository, <org>/<name>")
    p.add_argument("--preset", default=None, help=f"card data shipped with refseg: {', '.join(available_cards())}")
    p.add_argument("--card_data", default=None, help="card data YAML/JSON file (instead of --preset)")
    p.add_argument("--eval_results", default=None, help="eval_results.json from scripts/evaluate.py")
    p.add_argument("--eval_dataset", default=None, help="dataset of --eval_results (refcoco, refcoco+, ...)")
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


def infer_eval_dataset(path):
    match = re.fullmatch(r"eval_(.+)\.json", Path(path).name)
    return match.group(1) if match else None


def main(argv=None):
    args = parse_args(argv)
    model_dir = Path(args.model)
    out_dir = Path(args.out_dir) if args.out_dir else model_dir / "hub-export"
    model = AutoModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    eval_dataset = args.eval_dataset
    if args.eval_results and eval_dataset is None:
        eval_dataset = infer_eval_dataset(args.eval_results)
    try:
        export(
            model,
            processor,
            out_dir,
            remote_code=not args.no_remote_code,
            card_data=args.card_data or args.preset,
            eval_results=args.eval_results,
            eval_dataset=eval_dataset,
            repo_id=args.repo_id,
            overwrite=args.overwrite,
        )
    except ValueError as err:
        sys.exit(f"error: {err}")
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
    main()
