#!/usr/bin/env python
"""ImageNet-layout ImageFolder -> FFCV .beton with labels.

    python tools/make_ffcv.py SRC OUT.beton [--max-side 512] [--quality 90]
        [--write-mode jpg|raw|smart|proportion] [--workers N] [--overwrite]

Odd files are converted (CMYK, grayscale incl. 16-bit and float, palette, alpha, PNG named
.JPEG, truncated); undecodable ones are skipped; the closing report names every skipped file
and the counts, and OUT.beton.report.json keeps it with the class names. An existing OUT is
left as it is (exit 0) unless --overwrite. A bad option or source, or an OUT that cannot be
written: a message, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mto_ds.data.ffcv_writer import WRITE_MODES, convert_image_folder  # noqa: E402
from mto_ds.cli import unwritable_output  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder with one sub-folder per class")
    parser.add_argument("output", help="the .beton to write")
    parser.add_argument("--max-side", type=int, default=512,
                        help="resize so the longer side is at most this (default 512; 0 keeps sizes, and FFCV's "
                             "loader then holds buffers sized by the largest image: docs/DATA.md)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of stored images (default 90)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                        help="jpg: JPEG (small file); raw: pixels (fastest to read, large); smart: JPEG "
                             "above --smart-threshold bytes of pixels; proportion: JPEG for a random "
                             "--compress-probability share (default jpg)")
    parser.add_argument("--compress-probability", type=float, default=0.5)
    parser.add_argument("--smart-threshold", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0, help="processes (default 0: the cores this process may use)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true",
                        help="no bar for the checking pass (FFCV's writer still draws its own)")
    args = parser.parse_args(argv)
    if args.max_side < 0:
        parser.error(f"--max-side must be >= 0 (0 keeps sizes), got {args.max_side}")
    # Checked before the checking pass, which on ImageNet takes a while; an existing OUT that is
    # left as it is needs no writable folder.
    problem = None if Path(args.output).is_file() and not args.overwrite else unwritable_output(args.output)
    if problem:
        print(f"make_ffcv: {problem}", file=sys.stderr)
        return 2
    try:
        report = convert_image_folder(args.source, args.output, max_side=args.max_side or None,
                                      jpeg_quality=args.quality, write_mode=args.write_mode,
                                      compress_probability=args.compress_probability,
                                      smart_threshold=args.smart_threshold, workers=args.workers,
                                      overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as err:  # a bad option or source, named; nothing was written
        print(f"make_ffcv: {err}", file=sys.stderr)
        return 2
    if report is None:
        print(f"make_ffcv: {args.output} exists; left as it is (pass --overwrite to rebuild it)")
        return 0
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
