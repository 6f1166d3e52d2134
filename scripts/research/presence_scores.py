#!/usr/bin/env python
"""How well does the pipeline's `score` tell a present referent from an absent one? (docs/generalized.md)

    python scripts/research/presence_scores.py --model refseg-quickstart/model-risclip-g \
        --data_root refseg-quickstart/data --dataset grefshapes --split val

Runs `pipeline("referring-image-segmentation")` on every sentence of a generalized split (gRefCOCO layout) and
reports the two distributions of `score`: sentences with a referent and sentences without (`no_target`), their
medians and quartiles, and the AUROC of `score` as a detector of "has a referent" (the probability that a random
present sentence scores above a random absent one, ties counting one half). For a model with the presence head
the score is `1 - sigmoid(no_target_logits)`; without it, the mean mask probability (not a presence score), and
the AUROC says how much that happens to separate them. Also: the share of each group the pipeline flags
`no_target` (N-acc and 1 - T-acc at the sentence level).
"""

import argparse
import json

import numpy as np


def auroc(positive_scores, negative_scores) -> float:
    """P(a positive scores above a negative) + 0.5 P(tie): the area under the ROC curve (Mann-Whitney U / n m)."""
    positive = np.asarray(positive_scores, dtype=np.float64)
    negative = np.asarray(negative_scores, dtype=np.float64)
    if positive.size == 0 or negative.size == 0:
        raise ValueError("`auroc` needs at least one score in each group")
    values = np.concatenate([positive, negative])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):  # average ranks over ties
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


def describe(scores) -> dict:
    scores = np.asarray(scores, dtype=np.float64)
    return {"count": int(scores.size), "median": float(np.median(scores)),
            "quartiles": [float(np.quantile(scores, 0.25)), float(np.quantile(scores, 0.75))]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved refseg model folder (model + processor)")
    p.add_argument("--data_root", required=True)
    p.add_argument("--dataset", default="grefshapes", help="grefshapes | grefcoco")
    p.add_argument("--split", default="val")
    p.add_argument("--image_root", default=None)
    p.add_argument("--max_sentences", type=int, default=None, help="stop after this many sentences")
    p.add_argument("--output", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm
    from transformers import pipeline

    import refseg.pipelines  # noqa: F401  (registers the task)
    from refseg.data import load_grefer

    rows = load_grefer(args.data_root, dataset=args.dataset, split=args.split, image_root=args.image_root)
    pipe = pipeline("referring-image-segmentation", model=args.model)
    present, absent, flagged = [], [], {True: 0, False: 0}
    total = sum(len(s) for s in rows["sentences"])
    if args.max_sentences:
        total = min(total, args.max_sentences)
    progress = tqdm(total=total, unit=" sentences")
    for row in rows:
        for sentence in row["sentences"]:
            if progress.n >= total:
                break
            result = pipe(row["image"], text=sentence)
            result = result[0] if isinstance(result, list) else result
            (absent if row["no_target"] else present).append(result["score"])
            flagged[row["no_target"]] += bool(result["no_target"])
            progress.update(1)
    progress.close()
    if not present or not absent:
        raise ValueError(f"split {args.split!r} has {len(present)} sentences with a referent and {len(absent)} without: "
                         "both are needed")
    figures = {
        "model": args.model, "dataset": args.dataset, "split": args.split,
        "head": bool(getattr(pipe.model.config, "no_target_head", False)),
        "present": describe(present), "absent": describe(absent), "auroc": auroc(present, absent),
        "flagged_no_target": {"absent": flagged[True] / max(len(absent), 1),
                              "present": flagged[False] / max(len(present), 1)},
    }
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
