"""Embedded synthetic image set: procedural, labelled, deterministic from a seed; no download.

Each class is a family of oriented colour gratings with its own orientation, frequency and
palette; each sample varies phase, offset, a second weaker grating, a blob and noise. The
classes are not separable by mean colour alone, but with the 10 default classes a random
encoder's frozen features (and raw pixels) already separate them at 99 % k-NN: the set shows that
pre-training and evaluation run, not which method learns faster (100 classes leave room:
docs/STUDY.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


class SyntheticImages:
    """`num_images` RGB uint8 images [H, W, 3] with labels; image i depends only on (seed, i)."""

    def __init__(self, num_images: int, num_classes: int, size: int, seed: int = 0):
        self.num_images, self.num_classes, self.size, self.seed = num_images, num_classes, size, seed
        class_rng = np.random.default_rng([seed, 7919])
        self.angles = class_rng.permutation(num_classes) * np.pi / num_classes
        self.freqs = class_rng.uniform(2.0, 7.0, num_classes)
        self.palettes = class_rng.uniform(0.15, 0.85, (num_classes, 2, 3))

    def __len__(self) -> int:
        return self.num_images

    def label(self, index: int) -> int:
        return int(np.random.default_rng([self.seed, index, 1]).integers(self.num_classes))

    def image(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index, 2])
        c = self.label(index)
        yy, xx = np.mgrid[0:self.size, 0:self.size] / self.size
        angle = self.angles[c] + rng.normal(0, 0.08)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * self.freqs[c] * u + rng.uniform(0, 2 * np.pi))
        other = rng.uniform(0, np.pi)
        wave2 = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 8) * (np.cos(other) * xx + np.sin(other) * yy))
        t = (0.75 * wave + 0.25 * wave2)[..., None]
        lo, hi = self.palettes[c]
        img = lo * (1 - t) + hi * t
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        img = np.where(blob, rng.uniform(0, 1, 3), img)
        img = img + rng.normal(0, 0.04, img.shape)
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image_folder(out_dir, num_images: int, num_classes: int, size: int, seed: int = 0,
                       quality: int = 90, val_images: int = 0) -> Path:
    """The synthetic set as an ImageNet-layout folder of JPEGs: OUT/class_<c>/<i>.JPEG, or with
    `val_images`, OUT/train/class_<c>/ (images 0 to num_images - 1) and OUT/val/class_<c>/ (the
    next `val_images`): one set of classes, as an evaluation needs (another seed draws other
    classes).

    Class folders are zero-padded so their sorted order is the label order. Written under a
    temporary name and renamed at the end; an existing `out_dir` is an error.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists")
    images = SyntheticImages(num_images + val_images, num_classes, size, seed)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    class_width, image_width = len(str(num_classes - 1)), len(str(len(images) - 1))
    splits = {partial / "train": range(num_images), partial / "val": range(num_images, len(images))} \
        if val_images else {partial: range(num_images)}
    try:
        for root, indices in splits.items():
            for c in range(num_classes):
                (root / f"class_{c:0{class_width}d}").mkdir(parents=True)
            for i in indices:
                path = root / f"class_{images.label(i):0{class_width}d}" / f"{i:0{image_width}d}.JPEG"
                Image.fromarray(images.image(i)).save(path, format="JPEG", quality=quality)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
