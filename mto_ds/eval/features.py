"""Frozen-encoder features, extracted on a shard per data-parallel rank and all-gathered.

Pooling. A MIM encoder's CLS token is not trained by any objective (SimMIM and MAE put
their loss on patch tokens only), so the mean of the patch tokens is the better summary
of what pre-training learned; MAE fine-tunes with global average pooling for the same
reason. 'mean' is therefore the default; 'cls' is there for encoders trained with a CLS
objective.

Sharding. The set is padded (by wrapping around to its start) to a multiple of the world
size and rank r takes positions r, r + W, r + 2W, ... . Every rank then runs the same
number of equally sized batches, which matters because under ZeRO-3 every forward is a
collective; the gathered shards interleave back into the original order and the padding
is cut off.

Undecodable images. A folder set's item is None for a file that cannot be decoded (named in
a warning by the source); as in pre-training it is left out of its batch, never replaced.
Results per batch are spread back over all its positions (`at_positions`, the label DROPPED
where the image was left out), so shards keep their length for the all-gather, and
`gather_kept` then drops those positions from values and labels alike.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, List, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mto_ds.data import normalize

POOLINGS = ("mean", "cls")
DROPPED = -1  # the label of a position whose image was left out of its batch
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[B, prefix + L, D] encoder output -> [B, D]: CLS token, or mean of the patch tokens."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def feature_fn(encoder: Union[nn.Module, FeatureFn], pooling: str = "mean") -> FeatureFn:
    """Normalised images [B, 3, H, W] -> features [B, D].

    `encoder` is a timm ViT (its `forward_features` returns the normed tokens, CLS first)
    or already such a feature function, which is returned as it is.
    """
    if not hasattr(encoder, "forward_features"):
        return encoder
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    prefix = getattr(encoder, "num_prefix_tokens", 1)
    return lambda images: pool_tokens(encoder.forward_features(images), pooling, prefix)


def shard_positions(num_items: int, rank: int, world_size: int) -> List[int]:
    """Rank `rank`'s positions in the set padded to a multiple of `world_size` (see module doc)."""
    if num_items <= 0:
        raise ValueError("cannot shard an empty set")
    per_rank = -(-num_items // world_size)
    return [(rank + world_size * i) % num_items for i in range(per_rank)]


def gather_shards(shard: torch.Tensor, num_items: int) -> torch.Tensor:
    """Inverse of `shard_positions`: every rank's shard, all-gathered, in the set's order."""
    _, world_size = rank_and_world()
    if world_size == 1:
        return shard[:num_items]
    # gloo moves CPU tensors only; NCCL moves device tensors only.
    comm = shard.cpu() if dist.get_backend() == "gloo" else shard
    parts = [torch.empty_like(comm) for _ in range(world_size)]
    dist.all_gather(parts, comm.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)[:num_items].to(shard.device)


def autocast(device: torch.device):
    """bf16 autocast on GPUs (as pre-training runs); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sharded_batches(dataset: Dataset, positions: List[int], batch_size: int,
                    num_workers: int = 0) -> DataLoader:
    """Batches of the given positions, in order: uint8 images [K, 3, S, S] and labels [K] of the
    K items that decoded, and `kept` bool [B] marking which of the batch's B positions they are.
    A batch where nothing decoded holds one black stand-in image (kept all False): every rank
    still runs the same number of forwards, which are collectives under ZeRO-3 and DDP."""
    return batches_of(dataset, [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)],
                      num_workers)


def batches_of(dataset: Dataset, batches: List[List[int]], num_workers: int = 0) -> DataLoader:
    """`sharded_batches` for batches given as lists of positions, of any sizes."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      collate_fn=functools.partial(_collate, image_size=dataset.img_size))


def _collate(items, image_size: int):
    kept = torch.tensor([item is not None for item in items], dtype=torch.bool)
    if not kept.any():
        return torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), kept
    images, labels = zip(*(item for item in items if item is not None))
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long), kept


def at_positions(values: torch.Tensor, kept: torch.Tensor, fill=0) -> torch.Tensor:
    """[K, ...] results of a batch's kept items -> [B, ...] over all its positions, `fill` where
    an image was left out (all of them for a batch of the stand-in image)."""
    if bool(kept.all()):
        return values
    spread = values.new_full((kept.numel(), *values.shape[1:]), fill)
    if kept.any():
        spread[kept.to(values.device)] = values
    return spread


def gather_kept(values: torch.Tensor, labels: torch.Tensor, num_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`gather_shards` of this rank's per-position values and labels, without the positions whose
    image was left out (label DROPPED): rows stay paired with their labels."""
    values, labels = gather_shards(values, num_items), gather_shards(labels, num_items)
    decoded = labels != DROPPED
    if not decoded.any():
        raise RuntimeError(f"none of the {num_items} images of the evaluation set could be decoded (each named "
                           "in a warning above): is it damaged or still being written?")
    return values[decoded], labels[decoded]


@torch.no_grad()
def extract_features(encoder: Union[nn.Module, FeatureFn], dataset: Dataset, device: torch.device, *,
                     pooling: str = "mean", batch_size: int = 128,
                     num_workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features float32 [N, D] and labels [N] of `dataset` in its order, on every rank, on `device`;
    N = len(dataset) less the items whose image could not be decoded."""
    device = torch.device(device)
    rank, world_size = rank_and_world()
    positions = shard_positions(len(dataset), rank, world_size)
    fn = feature_fn(encoder, pooling)
    # A DeepSpeed bf16/fp16 engine keeps the module's weights in that dtype: feed it the same.
    params = next(encoder.parameters(), None) if isinstance(encoder, nn.Module) else None
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    was_training = getattr(encoder, "training", None)
    if was_training is not None:
        encoder.eval()
    features, labels = [], []
    try:
        for images, batch_labels, kept in sharded_batches(dataset, positions, batch_size, num_workers):
            with autocast(device):
                batch_features = fn(normalize(images, device, dtype)).float()
            features.append(at_positions(batch_features, kept))
            labels.append(at_positions(batch_labels.to(device), kept, DROPPED))
    finally:
        if was_training:
            encoder.train()
    return gather_kept(torch.cat(features), torch.cat(labels), len(dataset))


def top1_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage in [0, 100] of predictions equal to labels."""
    return 100.0 * int((predictions.to(labels.device) == labels).sum()) / labels.numel()
