#!/usr/bin/env python
"""Images/s of the FFCV loader and of the PIL ImageFolder loader, side by side.

    python tools/bench_loader.py [--src IMAGEFOLDER] [--images 384] [--size 256] [--crop 224]
        [--batch 32] [--workers 1,0] [--epochs 3]

Both read the same JPEG files (the FFCV side from a .beton made of them at their own size,
JPEG quality 90) through the loaders training uses: same crop size, crop-scale recipe,
flip, per-sample masks, batch and worker counts (0 = all cores; FFCV: threads, PIL: DataLoader
processes). Without --src, synthetic JPEGs are written first. Each loader runs one untimed
epoch (FFCV compiles its pipeline; files reach the page cache), then epochs alternate
between the two loaders so that load from other processes hits both alike; the table
shows the median epoch. Besides images/s it shows images per CPU-second: the CPU time the
loader used (its process, all threads, plus its DataLoader worker processes), which other
load on the machine changes far less than wall time.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mto_ds.data import build_pretrain_loader, write_image_folder  # noqa: E402
from mto_ds.data.ffcv_writer import convert_image_folder  # noqa: E402


def random_mask(rng: np.random.Generator, num_patches: int, ratio: float = 0.6) -> np.ndarray:
    return rng.permutation(num_patches) < int(num_patches * ratio)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers end with the epoch)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_epoch(loader, epoch: int):
    """(wall seconds, CPU seconds) of one epoch."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in loader.micro_batches(epoch):
        pass
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="ImageNet-layout folder of JPEGs (default: write synthetic ones)")
    parser.add_argument("--images", type=int, default=384, help="synthetic images to write")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--method", choices=("simmim", "mae"), default="mae", help="crop-scale recipe")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="1,0", help="comma-separated worker counts; 0 = all cores")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader and worker count")
    parser.add_argument("--work-dir", help="where the synthetic JPEGs and the .beton go (default: a temp dir)")
    args = parser.parse_args(argv)
    # Checked before any image is written or converted.
    for flag in ("images", "size", "crop", "batch", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if not args.src and args.images < args.batch:
        parser.error(f"--images {args.images} is fewer than one batch (--batch {args.batch})")
    if args.src and not Path(args.src).is_dir():
        parser.error(f"--src {args.src} is not a folder")
    try:
        counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers {args.workers!r}: expected comma-separated integers >= 0, e.g. 1,0")
    if min(counts) < 0:
        parser.error(f"--workers {args.workers!r}: expected integers >= 0 (0 = all cores)")

    cores = os.cpu_count() or 1
    workers = [w or cores for w in counts]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = Path(args.src) if args.src else work / "jpeg"
        if not args.src and not src.exists():
            write_image_folder(src, args.images, num_classes=10, size=args.size, seed=0, quality=90)
        beton = work / "bench.beton"
        convert_image_folder(src, beton, max_side=None, jpeg_quality=90, write_mode="jpg", workers=cores,
                             progress=False, overwrite=True)
        mask_fn = partial(random_mask, num_patches=(args.crop // 16) ** 2)
        common = dict(method=args.method, img_size=args.crop, seed=0, global_batch_size=args.batch,
                      micro_batch_size=args.batch, rank=0, world_size=1, mask_fn=mask_fn)
        rows = []
        for w in workers:
            loaders = {name: build_pretrain_loader(SimpleNamespace(source=name, path=str(path), num_workers=w,
                                                                   crop_scale_min=None, crop_scale_max=1.0,
                                                                   order="exact", os_cache=True), **common)
                       for name, path in (("ffcv", beton), ("folder", src))}
            timings = {name: [] for name in loaders}
            for epoch in range(args.epochs + 1):
                for name, loader in loaders.items():
                    timing = run_epoch(loader, epoch)
                    if epoch:  # epoch 0 warms up
                        timings[name].append(timing)
            images = loaders["ffcv"].steps_per_epoch * args.batch
            rate = {name: images / statistics.median(t[0] for t in ts) for name, ts in timings.items()}
            per_cpu = {name: images / statistics.median(t[1] for t in ts) for name, ts in timings.items()}
            rows.append((w, rate["ffcv"], rate["folder"], per_cpu["ffcv"], per_cpu["folder"]))
            del loaders

    print(f"{images} images/epoch from {src if args.src else f'{args.images} synthetic {args.size}px JPEGs'}, "
          f"crop {args.crop}, batch {args.batch}, {args.method} scale; {cores} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| workers | FFCV images/s | PIL images/s | FFCV / PIL | FFCV images per CPU-s | "
          "PIL images per CPU-s | FFCV / PIL per CPU-s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w, ffcv_rate, pil_rate, ffcv_cpu, pil_cpu in rows:
        print(f"| {w} | {ffcv_rate:.0f} | {pil_rate:.0f} | {ffcv_rate / pil_rate:.2f}x | {ffcv_cpu:.0f} | "
              f"{pil_cpu:.0f} | {ffcv_cpu / pil_cpu:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
