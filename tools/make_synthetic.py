#!/usr/bin/env python
"""The embedded synthetic image set as an ImageNet-layout folder of JPEG files.

    python tools/make_synthetic.py OUT_DIR --images 1024 --classes 10 --size 80 --seed 0 [--val-images 256]

With --val-images, OUT_DIR/train and OUT_DIR/val of the same classes (ImageNet's layout, which
evaluation reads); two runs with other seeds would draw other classes. An existing OUT_DIR is
left as it is (exit 0) unless --overwrite.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mto_ds.data.synthetic import write_image_folder  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=80, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--val-images", type=int, default=0,
                        help="also write this many held-out images: OUT_DIR/train and OUT_DIR/val")
    parser.add_argument("--overwrite", action="store_true", help="delete OUT_DIR first if it exists")
    args = parser.parse_args(argv)
    # Checked first: a bad argument must not cost an existing OUT_DIR under --overwrite.
    if min(args.images, args.classes, args.size) <= 0 or args.val_images < 0:
        parser.error("--images, --classes and --size must be positive, --val-images >= 0")
    out = Path(args.out_dir)
    if out.exists():
        if not args.overwrite:
            print(f"make_synthetic: {out} exists; left as it is (pass --overwrite to rebuild it)")
            return 0
        shutil.rmtree(out)
    write_image_folder(out, args.images, args.classes, args.size, args.seed, quality=args.quality,
                       val_images=args.val_images)
    split = f" (+ {args.val_images} in val/)" if args.val_images else ""
    print(f"make_synthetic: {args.images} JPEG files{split} of {args.size} px in {args.classes} classes -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
