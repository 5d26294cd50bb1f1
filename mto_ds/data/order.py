"""Sample order that does not depend on the number of ranks.

Epoch e visits the samples in one permutation fixed by (seed, e). Optimizer step t of the
epoch takes the global batch perm[t*G : (t+1)*G]; data-parallel rank r of W takes the r-th
contiguous share of it, split into micro-batches for gradient accumulation. The samples a
step sees are therefore the same on 1, 2 or 64 ranks, which is what makes resume on another
world size exact: the data position is just (epoch, step in epoch).
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 31337]).permutation(num_samples)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Whole global batches per epoch; the remainder of the permutation is dropped."""
    steps = num_samples // global_batch_size
    if steps == 0:
        raise ValueError(f"the data set has {num_samples} samples, fewer than one global batch "
                         f"of {global_batch_size}; lower train.global_batch_size")
    return steps


def rank_indices(num_samples: int, seed: int, epoch: int, global_batch_size: int,
                 rank: int, world_size: int, start_step: int = 0) -> np.ndarray:
    """The sample indices rank `rank` reads, in order, from step `start_step` to the epoch's end."""
    if global_batch_size % world_size:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} ranks")
    per_rank = global_batch_size // world_size
    steps = steps_per_epoch(num_samples, global_batch_size)
    perm = epoch_permutation(num_samples, seed, epoch)[: steps * global_batch_size]
    by_step = perm.reshape(steps, world_size, per_rank)
    return by_step[start_step:, rank].reshape(-1)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A generator for one sample's randomness (crop, flip: stream 0; mask: stream 1)."""
    return np.random.default_rng([seed, epoch, int(index), stream])
