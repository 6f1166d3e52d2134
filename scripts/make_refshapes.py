#!/usr/bin/env python
"""Generate the RefShapes dataset in the refer format and print its summary as JSON.

    python scripts/make_refshapes.py --root data --num_images 1000 --seed 0

writes data/refshapes/refs(unc).p, data/refshapes/instances.json and data/images/*.png, which
`refseg.data.load_refer("data", "refshapes", "unc", split)` reads. With `--generalized`, also
data/grefshapes/ in gRefCOCO's format (multi-target and no-target refs besides the single-target ones), which
`refseg.data.load_grefer("data", "grefshapes", "unc", split)` reads.
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import json
import sys
import time

from refseg.data import make_refshapes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="output root (gets refshapes/ and images/)")
    parser.add_argument("--num_images", type=int, default=1000, help="number of images (>= 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--min_size", type=int, default=112, help="smallest image width/height in pixels")
    parser.add_argument("--max_size", type=int, default=176, help="largest image width/height in pixels")
    parser.add_argument("--generalized", action="store_true",
                        help="also write grefshapes/ (gRefCOCO format: multi-target and no-target refs)")
    parser.add_argument("--multi_target_share", type=float, default=None,
                        help="with --generalized: share of multi-target refs drawn (default: the library's)")
    parser.add_argument("--no_target_share", type=float, default=None,
                        help="with --generalized: share of no-target refs drawn (default: the library's)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    shares = {name: getattr(args, name) for name in ("multi_target_share", "no_target_share")
              if getattr(args, name) is not None}
    if shares and not args.generalized:
        raise ValueError(f"{sorted(shares)} need --generalized")
    summary = make_refshapes(args.root, num_images=args.num_images, seed=args.seed, min_size=args.min_size,
                             max_size=args.max_size, generalized=args.generalized, **shares)
    print(json.dumps(summary, indent=2))
    print(f"generated in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
