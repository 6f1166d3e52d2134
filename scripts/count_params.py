"""Print total and trainable parameter counts of refseg presets, per training stage.

Models are instantiated on the meta device from `refseg.presets.get_config(name)`, so nothing is
downloaded or allocated; the counts are those of the paper-scale architectures.

    python scripts/count_params.py                        # every preset
    python scripts/count_params.py risclip-b risclip-l    # some presets
    python scripts/count_params.py --markdown             # a Markdown table (docs/<method>.md, model cards)
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse

import torch
from transformers import AutoModel

from refseg.pipelines import AutoModelForReferringImageSegmentation
from refseg.presets import PRESETS, get_config


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def count(name: str) -> dict:
    """`{"total", "frozen_backbone", "stages": {stage: trainable}}` for preset `name` (the frozen
    count is what no stage trains)."""
    config = get_config(name)
    with torch.device("meta"):
        try:  # a baseline (`clipseg-tiny`): the class the task loads, not `AutoModel`'s
            model = AutoModelForReferringImageSegmentation.from_config(config)
        except ValueError:
            model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    stages, ever_trained = {}, set()
    for stage in getattr(model, "training_stages", (model.config.training_stage,)):
        model.set_training_stage(stage)
        trainable = [p for p in model.parameters() if p.requires_grad]
        stages[stage] = sum(p.numel() for p in trainable)
        ever_trained.update(id(p) for p in trainable)
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in ever_trained)
    return {"total": total, "frozen_backbone": frozen, "stages": stages}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help=f"preset names (default: all of {sorted(PRESETS)})")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = args.presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    rows = [(name, count(name)) for name in names]
    stage_names = []
    for _, c in rows:
        stage_names += [s for s in c["stages"] if s not in stage_names]
    header = ["preset", "total", "frozen backbone"] + [f"trainable ({s})" for s in stage_names]
    table = [header]
    for name, c in rows:
        table.append([name, _millions(c["total"]), _millions(c["frozen_backbone"])]
                     + [_millions(c["stages"][s]) if s in c["stages"] else "-" for s in stage_names])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(" --- " for _ in header) + "|")
        for row in table[1:]:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
