"""A smaller ImageNet made of links: some of its classes (ImageNet-100's list, or K of them drawn
with a seed) and at most N training images of each (drawn with the seed), in the same layout
(ROOT/train/<class>/, ROOT/val/<class>/), so that pre-training (`data.source=folder`, or
`tools/make_ffcv.py` on its train/) and the evaluation (`eval.path`) read it as they read the
whole set. For epoch-efficiency studies at a scale that runs in hours. Nothing is copied: a class
taken whole is one link to its folder, a drawn one a folder of links to the drawn files.
"""
from __future__ import annotations

import difflib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .imagefolder import IMAGE_EXTENSIONS, class_files, class_folders, folder_problem

SPLITS = ("train", "val")
RECORD = "subset.json"


def read_class_names(spec: str) -> List[str]:
    """Class folder names from a file (one per line; text after `#` ignored, as in the published
    ImageNet-100 lists) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        names = [line.split()[0] for line in lines if line]
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--classes {spec}: no class names in it")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--classes {spec} names {', '.join(repeated)} more than once")
    return names


def choose_classes(available: List[str], asked: Optional[List[str]], num_classes: Optional[int],
                   seed: int) -> List[str]:
    """The classes of the subset, sorted (their order is the labels'): the ones asked, all of which
    must exist, or `num_classes` drawn with `seed`, or all."""
    if asked is not None:
        unknown = [name for name in asked if name not in available]
        if unknown:
            hints = [f"{name} (did you mean {', '.join(close)}?)" if close else name for name in unknown[:5]
                     for close in [difflib.get_close_matches(name, available, n=2)]]
            raise ValueError(f"{len(unknown)} of the classes asked for are not class folders of the source: "
                             f"{', '.join(hints)}{', ...' if len(unknown) > 5 else ''}")
        return sorted(asked)
    if num_classes is not None:
        if not 1 <= num_classes <= len(available):
            raise ValueError(f"--num-classes {num_classes}: the source has {len(available)} classes")
        return sorted(random.Random(seed).sample(available, num_classes))
    return list(available)


def draw_images(files: List[Path], per_class: Optional[int], seed: int, name: str) -> List[Path]:
    """At most `per_class` of a class's image files, drawn with (seed, class name): the same class
    gets the same images whichever other classes the subset holds. Sorted, as the folder lists them."""
    if per_class is None or len(files) <= per_class:
        return files
    return sorted(random.Random(f"{seed}:{name}").sample(files, per_class))


def read_val_labels(path) -> Dict[str, str]:
    """Image name (without its extension) -> class folder name, for a flat val/ (ImageNet's as
    distributed): Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the string's first
    word the class) or lines `FILE CLASS` (whitespace between)."""
    labels = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("ImageId,"):
            continue
        fields = line.split(",", 1) if "," in line else line.split(None, 1)
        if len(fields) != 2 or not fields[1].split():
            raise ValueError(f"--val-labels {path}, line {number}: expected `IMAGE,CLASS ...` or `IMAGE CLASS`, "
                             f"got {line[:80]!r}")
        labels[Path(fields[0].strip()).stem] = fields[1].split()[0]
    if not labels:
        raise ValueError(f"--val-labels {path}: no labels in it")
    return labels


def _labelled_images(folder: Path, labels: Optional[Dict[str, str]]) -> Dict[str, List[Path]]:
    """class -> its images, sorted, of a flat folder whose images `labels` names (each must be named)."""
    if labels is None:
        raise ValueError(f"{folder} has no class folders (ImageNet's val/ as distributed): give its labels "
                         "with --val-labels (LOC_val_solution.csv, or lines `FILE CLASS`)")
    images = [p for p in class_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]
    unlabelled = [p.name for p in images if p.stem not in labels]
    if unlabelled:
        raise ValueError(f"--val-labels names no class for {len(unlabelled)} of the {len(images)} images of {folder} "
                         f"({', '.join(unlabelled[:3])}{', ...' if len(unlabelled) > 3 else ''})")
    by_class: Dict[str, List[Path]] = {}
    for image in images:
        by_class.setdefault(labels[image.stem], []).append(image)
    return by_class


def make_subset(source, out, classes: Optional[List[str]] = None, num_classes: Optional[int] = None,
                per_class: Optional[int] = None, val_per_class: Optional[int] = None, seed: int = 0,
                val_labels: Optional[Dict[str, str]] = None) -> dict:
    """Links in `out` to a subset of `source` (ImageNet's layout: train/ of class folders and, if
    it has one, val/ of class folders or flat with `val_labels`), and `out/subset.json` saying what
    was taken. Returns that record."""
    source, out = Path(source).resolve(), Path(out)
    splits = [split for split in SPLITS if (source / split).is_dir()]
    problem = folder_problem(source / "train")
    if problem:
        raise ValueError(f"source {problem} (expected ImageNet's layout: ROOT/train/<class>/ and ROOT/val/<class>/)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder")
    for name, value in (("--per-class", per_class), ("--val-per-class", val_per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    chosen = choose_classes(class_folders(source / "train"), classes, num_classes, seed)
    # A split of class folders is read a class at a time; a flat val/ at once, through its labels.
    flat = {split: _labelled_images(source / split, val_labels) for split in splits[1:]
            if not class_folders(source / split)}
    for split in splits[1:]:  # the evaluation needs val/ to hold every class of train/
        held = set(flat[split]) if split in flat else set(class_folders(source / split))
        missing = sorted(set(chosen) - held)
        if missing:
            raise ValueError(f"{source / split} lacks {len(missing)} of the chosen classes: {', '.join(missing[:5])}")
    caps = {"train": per_class, "val": val_per_class}
    counts: Dict[str, int] = {}
    partial = out.with_name(out.name + ".partial")  # renamed at the end: a subset half made is never read
    shutil.rmtree(partial, ignore_errors=True)  # an earlier try's (links only: their targets are untouched)
    for split in splits:
        counts[split] = 0
        for name in chosen:
            folder, link = (source / split if split in flat else source / split / name), partial / split / name
            images = flat[split][name] if split in flat else [p for p in class_files(folder)
                                                              if p.suffix.lower() in IMAGE_EXTENSIONS]
            taken = draw_images(images, caps[split], seed, name)
            counts[split] += len(taken)
            link.parent.mkdir(parents=True, exist_ok=True)
            if len(taken) == len(images) and split not in flat:  # the whole class folder: one link
                link.symlink_to(folder, target_is_directory=True)
                continue
            for image in taken:
                target = link / image.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(image)
    record = {"source": str(source), "classes": chosen, "images": counts, "per_class": per_class,
              "val_per_class": val_per_class, "seed": seed, "command": sys.argv}
    (partial / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return record
