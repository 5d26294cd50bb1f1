"""Sample order that does not depend on the number of ranks.

Epoch e visits the samples in one permutation fixed by (seed, e). Optimizer step t of the
epoch takes the global batch perm[t*G : (t+1)*G]; data-parallel rank r of W takes the r-th
contiguous share of it, split into micro-batches for gradient accumulation. The samples a
step sees are therefore the same on 1, 2 or 64 ranks, which is what makes resume on another
world size exact: the data position is just (epoch, step in epoch).

W need not divide G: the shares then differ by one sample (r*G//W to (r+1)*G//W), and every
rank runs the same number of micro-batch places per step (DeepSpeed accumulates in lockstep),
its share followed by `PAD` places that hold no sample. The loaders leave those out of their
micro-batches as they leave out an undecodable image, and the train step weighs each sample
1/G whatever the size of its micro-batch.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..config import ConfigError

PAD = -1  # a place of a rank's step that holds no sample


def ranks(count: int) -> str:
    """'1 rank', '2 ranks': a world size in the logs' words."""
    return f"{count} rank{'' if count == 1 else 's'}"


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 31337]).permutation(num_samples)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Whole global batches per epoch; the remainder of the permutation is dropped."""
    steps = num_samples // global_batch_size
    if steps == 0:  # a config error: exit status 2 and one line, not a traceback
        raise ConfigError(f"bad value for 'train.global_batch_size': the data set has {num_samples} samples, "
                          f"fewer than one global batch of {global_batch_size}; lower train.global_batch_size")
    return steps


def _check_ranks(global_batch_size: int, world_size: int) -> None:
    if not 0 < world_size <= global_batch_size:
        raise ValueError(f"a global batch of {global_batch_size} cannot give each of {world_size} ranks a sample")


def rank_share(global_batch_size: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank `rank`'s samples within each global batch."""
    _check_ranks(global_batch_size, world_size)
    return rank * global_batch_size // world_size, (rank + 1) * global_batch_size // world_size


def micro_batch_split(global_batch_size: int, world_size: int, micro_batch_size: int) -> Tuple[int, int]:
    """(micro-batch size, micro-batches per step) of every rank: the fewest micro-batches of at
    most `micro_batch_size` (None or 0: the whole share) that hold the largest share, each of
    ceil(largest share / their number) places."""
    _check_ranks(global_batch_size, world_size)
    largest = -(-global_batch_size // world_size)
    accumulation = -(-largest // min(micro_batch_size or largest, largest))
    return -(-largest // accumulation), accumulation


def micro_batch_starts(global_batch_size: int, world_size: int, micro_batch_size: int) -> Tuple[int, ...]:
    """Where each micro-batch of a step starts within the global batch: what groups the samples
    that a per-micro-batch statistic (MTO's L_r) sees together."""
    size, _ = micro_batch_split(global_batch_size, world_size, micro_batch_size)
    return tuple(start for rank in range(world_size)
                 for start in range(*rank_share(global_batch_size, world_size, rank), size))


def rank_indices(num_samples: int, seed: int, epoch: int, global_batch_size: int,
                 rank: int, world_size: int, start_step: int = 0, micro_batch_size: int = 0) -> np.ndarray:
    """The sample indices rank `rank` reads, in order, from step `start_step` to the epoch's end:
    per step its share, then PAD up to the step's places (micro_batch_split; 0: one micro-batch)."""
    start, stop = rank_share(global_batch_size, world_size, rank)
    size, accumulation = micro_batch_split(global_batch_size, world_size, micro_batch_size)
    steps = steps_per_epoch(num_samples, global_batch_size)
    perm = epoch_permutation(num_samples, seed, epoch)[: steps * global_batch_size]
    by_step = np.full((steps - start_step, size * accumulation), PAD, dtype=np.int64)
    by_step[:, : stop - start] = perm.reshape(steps, global_batch_size)[start_step:, start:stop]
    return by_step.reshape(-1)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A generator for one sample's randomness (crop, flip: stream 0; mask: stream 1)."""
    return np.random.default_rng([seed, epoch, int(index), stream])
