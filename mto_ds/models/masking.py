"""Mask generators: one sample's bool mask [num_patches] (True = masked) from a numpy RNG.

The data pipeline calls them with a generator seeded by (seed, epoch, sample index), so the
same sample gets the same mask on any number of ranks and after a resume.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from ..config import MASK_RATIO, default_mask_patch_size, masked_count

MaskFn = Callable[[np.random.Generator], np.ndarray]


def block_mask(rng: np.random.Generator, grid: int, cell: int, ratio: float) -> np.ndarray:
    """SimMIM: mask ceil(ratio * cells) random cells of `cell` x `cell` patches each (SimMIM's
    MaskGenerator: 30 of the 49 cells of a 224 px image at 0.6)."""
    cells_per_side = grid // cell
    num_cells = cells_per_side ** 2
    chosen = np.zeros(num_cells, dtype=bool)
    chosen[rng.permutation(num_cells)[: masked_count("simmim", num_cells, ratio)]] = True
    cells = chosen.reshape(cells_per_side, cells_per_side)
    return np.kron(cells, np.ones((cell, cell), dtype=bool)).reshape(-1).astype(bool)


def random_mask(rng: np.random.Generator, num_patches: int, ratio: float) -> np.ndarray:
    """MAE: the same number of random patches masked in every sample, all but MAE's
    len_keep = int(num_patches * (1 - ratio)) (147 of 196 at 0.75)."""
    mask = np.zeros(num_patches, dtype=bool)
    mask[rng.permutation(num_patches)[: masked_count("mae", num_patches, ratio)]] = True
    return mask


def build_mask_fn(method: str, img_size: int, patch_size: int, ratio=None, mask_patch_size=None) -> MaskFn:
    ratio = MASK_RATIO[method] if ratio is None else ratio
    grid = img_size // patch_size
    if method == "mae":
        return partial(random_mask, num_patches=grid * grid, ratio=ratio)
    mask_patch_size = mask_patch_size or default_mask_patch_size(patch_size)
    if mask_patch_size % patch_size or img_size % mask_patch_size:
        raise ValueError(f"mask patch {mask_patch_size} must be a multiple of the patch {patch_size} "
                         f"and divide the image size {img_size}")
    return partial(block_mask, grid=grid, cell=mask_patch_size // patch_size, ratio=ratio)
