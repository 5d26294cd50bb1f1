#!/usr/bin/env python
"""A subset of ImageNet as links: chosen classes, at most N images per class.

    python tools/make_subset.py /data/imagenet /data/imagenet100 --classes imagenet100.txt
    python tools/make_subset.py /data/imagenet /data/in100_300 --num-classes 100 --per-class 300 --seed 0

SOURCE holds train/ and val/ class folders (ImageNet's layout; a flat val/, as ImageNet's is
distributed, with --val-labels LOC_val_solution.csv); OUT gets the same layout, each
class a link to its folder or, with --per-class, a folder of links to the images drawn (seeded by
--seed and the class name), and OUT/subset.json records the classes, counts and seed. Then:
`data.source=folder data.path=OUT/train eval.path=OUT`, or `tools/make_ffcv.py OUT/train
OUT/train.beton` for FFCV. A bad option, an unknown class or an OUT that is not empty: a message,
exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mto_ds.data.subset import make_subset, read_class_names, read_val_labels  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="ImageNet's root: train/ and val/ of class folders")
    parser.add_argument("out", help="the subset's root (made; must not exist or be empty)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--classes", help="a file of class folder names, one per line (text after # ignored), "
                                         "or a comma-separated list")
    which.add_argument("--num-classes", type=int, help="draw this many classes with --seed")
    parser.add_argument("--per-class", type=int, help="at most this many train/ images per class, drawn with --seed")
    parser.add_argument("--val-per-class", type=int, help="at most this many val/ images per class (default: all)")
    parser.add_argument("--val-labels", metavar="FILE",
                        help="the labels of a flat val/ (ImageNet's as distributed): Kaggle's LOC_val_solution.csv "
                             "or lines `FILE CLASS`; its images are then linked into class folders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        classes = read_class_names(args.classes) if args.classes else None
        labels = read_val_labels(args.val_labels) if args.val_labels else None
        record = make_subset(args.source, args.out, classes, args.num_classes, args.per_class, args.val_per_class,
                             args.seed, labels)
    except ValueError as err:
        print(f"make_subset: {err}", file=sys.stderr)
        return 2
    images = ", ".join(f"{split}/ {count} images" for split, count in record["images"].items())
    print(f"{args.out}: {len(record['classes'])} classes, {images} (links into {record['source']}); "
          f"{args.out}/subset.json says which")
    return 0


if __name__ == "__main__":
    sys.exit(main())
