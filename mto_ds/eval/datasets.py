"""Labelled train/val splits for evaluating frozen features: `build_eval_sets(cfg)`.

Items are (uint8 image [3, S, S], class index), S = model.img_size, center-resized: the
central square of CROP_PCT of the shorter side, resized to S (the usual ImageNet
evaluation view, 224 of 256).

- data.source=synthetic: `SyntheticImages` with the pre-training seed (so the same class
  definitions), rendered at the pre-training size. Train = samples [0, eval.num_train),
  which are pre-training samples, as ImageNet's train split is for ImageNet models;
  val = eval.num_val samples from just past the pre-training set, never seen in training.
- data.source=folder or ffcv: ImageFolders ROOT/train and ROOT/val, ROOT = eval.path or,
  for folder, the parent of data.path (data.path=IMAGENET/train: ROOT=IMAGENET), each
  reduced to eval.num_train / eval.num_val images by a class-balanced draw with a fixed seed
  when it holds more (set them to the split sizes or larger for the full protocol). Labels are train's class
  folders sorted by name; val's follow them by name, so a val without some class folder keeps
  every other class's label (a val folder that train lacks is refused). Listed and decoded as
  pre-training's folder source is (`ImageFolderSource`), so both agree on what is a sample and
  convert odd files alike; an undecodable image is an item of None, named in a warning, which
  the evaluation loaders leave out of its batch (features.sharded_batches).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mto_ds.data import ImageFolderSource, SyntheticImages

CROP_PCT = 0.875
EVAL_SUBSET_SEED = 0


def center_resize(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 [3, size, size] of its central CROP_PCT square."""
    image = image.convert("RGB")
    side = CROP_PCT * min(image.width, image.height)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class SyntheticEvalImages(Dataset):
    """The samples `indices` of a `SyntheticImages` source, center-resized."""

    def __init__(self, source: SyntheticImages, indices: Sequence[int], img_size: int):
        self.source, self.indices, self.img_size = source, list(indices), img_size
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        return center_resize(Image.fromarray(self.source.image(index)), self.img_size), self.source.label(index)

    def name(self, item: int) -> str:
        return f"synthetic image {self.indices[item]} (seed {self.source.seed})"


class FolderEvalImages(Dataset):
    """An ImageFolder split (class = sub-folder), optionally a seeded subset of it, center-resized;
    an undecodable image gives None (see the module doc).

    `classes`: the label order to use (the train split's), when this split may lack some of its
    folders; a folder not among them is refused.
    """

    def __init__(self, root: Path, img_size: int, max_images: int, seed: int,
                 classes: Optional[Sequence[str]] = None):
        self.source = ImageFolderSource(root)
        self.img_size = img_size
        self.classes = list(classes) if classes is not None else self.source.classes
        # Labels by class name: a val/ without one of train/'s folders would otherwise shift every
        # later class down by one, and the probes would score right predictions as wrong.
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in self.source.classes if name not in index]
        if unknown:
            raise ValueError(f"{root} has class folders that the training split lacks: {', '.join(unknown)} "
                             "(a classifier fitted on the training split cannot predict them)")
        self._label_of = [index[name] for name in self.source.classes]
        self.num_classes = len(self.classes)
        count = len(self.source)
        if max_images < count:  # sorted: a subset read in directory order stays sequential on disk
            self.positions = np.sort(class_balanced_draw(self.source.labels, max_images, seed)).tolist()
        else:
            self.positions = list(range(count))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> Optional[Tuple[torch.Tensor, int]]:
        index = self.positions[item]
        pixels = self.source.image(index)
        if pixels is None:  # undecodable: the source has named it; the loader's collate leaves it out
            return None
        return center_resize(Image.fromarray(pixels), self.img_size), self._label_of[self.source.label(index)]

    def name(self, item: int) -> str:
        return str(self.source.files[self.positions[item]])


def class_balanced_draw(labels: Sequence[int], size: int, seed: int) -> np.ndarray:
    """`size` positions of `labels` drawn in rounds: one image of every class (that has one left)
    per round, in a seeded random order. A uniform draw of 1024 of ImageNet-1k's images leaves
    about a third of its classes without a training image, which k-NN and the probe then cannot
    predict; in rounds, every class has one before any has two."""
    labels = np.asarray(labels)
    shuffled = np.random.default_rng([seed, 4099]).permutation(len(labels))
    by_class = np.argsort(labels[shuffled], kind="stable")  # each class's images in shuffled order
    sorted_labels = labels[shuffled][by_class]
    class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    round_of = np.empty(len(labels), dtype=np.int64)
    round_of[by_class] = np.arange(len(labels)) - class_start  # this image's turn within its class
    return shuffled[np.lexsort((np.arange(len(labels)), round_of))[:size]]


def build_eval_sets(cfg) -> Tuple[Dataset, Dataset]:
    """(train, val) labelled evaluation sets for `cfg` (a mto_ds.config.Config); both have `num_classes`."""
    ev, size = cfg.eval, cfg.model.img_size
    if ev.num_train <= 0 or ev.num_val <= 0:
        raise ValueError(f"eval.num_train and eval.num_val must be positive, got {ev.num_train}, {ev.num_val}")
    if _synthetic_eval(cfg):
        source, val_start = _synthetic_eval_source(cfg, ev.num_val)
        return (SyntheticEvalImages(source, range(ev.num_train), size),
                SyntheticEvalImages(source, range(val_start, val_start + ev.num_val), size))
    root = eval_root(cfg)
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise FileNotFoundError(f"evaluation needs labelled ImageFolder splits under eval.path (or, with "
                                f"data.source=folder, the parent of data.path); not found: {', '.join(missing)}")
    # Subsets drawn with a fixed seed, not run.seed: runs of a study compared on one evaluation set.
    train = FolderEvalImages(root / "train", size, ev.num_train, EVAL_SUBSET_SEED)
    val = FolderEvalImages(root / "val", size, ev.num_val, EVAL_SUBSET_SEED, classes=train.classes)
    return train, val


def held_out_images(cfg, count: int) -> Dataset:
    """`count` images of the evaluation's val split, which pre-training never reads, center-resized
    like the others: the first synthetic ones, or a class-balanced draw of ROOT/val (items of None
    for undecodable files, as above). Its train split is neither listed nor needed."""
    if _synthetic_eval(cfg):
        source, val_start = _synthetic_eval_source(cfg, count)
        return SyntheticEvalImages(source, range(val_start, val_start + count), cfg.model.img_size)
    val = eval_root(cfg) / "val"
    if not val.is_dir():
        raise FileNotFoundError(f"no evaluation val split at {val} (eval.path, or with data.source=folder the "
                                "parent of data.path)")
    return FolderEvalImages(val, cfg.model.img_size, count, EVAL_SUBSET_SEED)


def _synthetic_eval(cfg) -> bool:
    return cfg.data.source == "synthetic" and not cfg.eval.path  # eval.path, when given, is what to evaluate on


def _synthetic_eval_source(cfg, num_val: int) -> Tuple[SyntheticImages, int]:
    """(The synthetic source of the evaluation's images, where its val samples start): train =
    samples [0, eval.num_train), val = `num_val` from just past the pre-training set."""
    data, ev, size = cfg.data, cfg.eval, cfg.model.img_size
    # Rendered at the pre-training size (data.build_pretrain_loader), so the eval view
    # has the same pixel statistics as the crops the encoder was trained on.
    source = SyntheticImages(data.synthetic_images + num_val + ev.num_train, data.synthetic_classes,
                             size=size * 5 // 4, seed=cfg.run.seed)
    return source, max(data.synthetic_images, ev.num_train)


def eval_root(cfg) -> Path:
    """Where the labelled train/ and val/ ImageFolders are: eval.path, else (data.source=folder)
    the parent of data.path, which is the pre-training class root (ImageNet's IMAGENET/train)."""
    if cfg.eval.path:
        return Path(cfg.eval.path)
    if cfg.data.source == "folder":
        # The parent as named, links not followed: IMAGENET/train linked to a staged copy still
        # evaluates on IMAGENET/val, not on whatever val/ sits beside the copy.
        return Path(os.path.abspath(cfg.data.path)).parent
    raise ValueError(f"evaluation with data.source={cfg.data.source} reads labelled train/ and val/ "
                     "ImageFolders: set eval.path to their root")
