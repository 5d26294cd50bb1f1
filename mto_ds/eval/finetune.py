"""A short end-to-end fine-tune: how well pre-trained weights train, the paper's own metric.

The recipe is MAE's, shortened (docs/STUDY.md lists what it leaves out): a linear head on
the pooled tokens, AdamW with layer-wise
learning-rate decay (block i of L gets lr * decay^(L + 1 - i), so early blocks move
least), no weight decay on biases, norms and position/class tokens, linear warm-up then
cosine, label smoothing 0.1, random horizontal flips. It trains a copy, so the encoder
passed in is left as it was. Across ranks it is data-parallel (DDP, each rank a share of every
global batch of a seeded per-epoch permutation), with the result of one process on any number of
ranks; the validation accuracy is gathered over all ranks. An undecodable
image is left out of its batch, in training and validation alike (features.py).
"""
from __future__ import annotations

import copy
import math
from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mto_ds.data import normalize
from mto_ds.data.order import rank_share

from .features import (DROPPED, at_positions, autocast, batches_of, gather_kept, pool_tokens, rank_and_world,
                       shard_positions, sharded_batches, top1_accuracy)


class PooledClassifier(nn.Module):
    """encoder tokens -> pooled features -> linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "mean"):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init: starts as a near-zero map
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)
        return self.head(pool_tokens(tokens, self.pooling, getattr(self.encoder, "num_prefix_tokens", 1)))


def _layer_id(name: str, num_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_blocks + 1 for the final norm and head."""
    if name.startswith("encoder."):
        name = name[len("encoder."):]
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layer_decay_groups(model: PooledClassifier, weight_decay: float, layer_decay: float) -> List[dict]:
    """AdamW parameter groups with `lr_scale` per layer and no decay on 1-d params and tokens."""
    num_blocks = len(model.encoder.blocks)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = _layer_id(name, num_blocks)
        no_decay = param.ndim == 1 or name.endswith(("cls_token", "reg_token", "pos_embed"))
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_blocks + 1 - layer)}
        groups[key]["params"].append(param)
    return list(groups.values())


def _flip_some(images: torch.Tensor, kept: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose position's `flip` is set: `flip` [B] covers the batch's positions,
    decoded or not, `images` [K] the kept ones (one stand-in where none is)."""
    flip = (flip[kept] if kept.any() else flip[:1]).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def finetune_top1(encoder: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int,
                  device: torch.device, *, epochs: int, pooling: str = "mean", batch_size: int = 64,
                  lr: float = 1e-3, layer_decay: float = 0.75, weight_decay: float = 0.05,
                  warmup_fraction: float = 0.1, label_smoothing: float = 0.1, seed: int = 0,
                  num_workers: int = 0) -> float:
    """Top-1 accuracy in [0, 100] on `val_set` after fine-tuning a copy of `encoder` on `train_set`
    (`finetune`); `batch_size` is the global batch, and per rank the batch of the validation."""
    device = torch.device(device)
    model = finetune(encoder, train_set, num_classes, device, epochs=epochs, pooling=pooling,
                     batch_size=batch_size, lr=lr, layer_decay=layer_decay, weight_decay=weight_decay,
                     warmup_fraction=warmup_fraction, label_smoothing=label_smoothing, seed=seed,
                     num_workers=num_workers)
    rank, world_size = rank_and_world()
    model.eval()
    predictions, targets = [], []
    with torch.no_grad():
        for images, labels, kept in sharded_batches(val_set, shard_positions(len(val_set), rank, world_size),
                                                    batch_size, num_workers):
            with autocast(device):
                predictions.append(at_positions(model(normalize(images, device)).argmax(dim=1), kept))
            targets.append(at_positions(labels.to(device), kept, DROPPED))
    return top1_accuracy(*gather_kept(torch.cat(predictions), torch.cat(targets), len(val_set)))


def check_batch(num_train: int, batch_size: int) -> None:
    """A ValueError naming eval.finetune_batch_size where it cannot be a fine-tune's global batch."""
    world_size = rank_and_world()[1]
    if num_train < batch_size:
        raise ValueError(f"eval.finetune_batch_size={batch_size} is more than the {num_train} training images of "
                         "the evaluation: each step takes a whole batch (the last partial one is dropped)")
    if world_size > batch_size:
        raise ValueError(f"eval.finetune_batch_size={batch_size} is smaller than the {world_size} ranks: each rank "
                         "needs a sample of every batch")


def finetune(encoder: nn.Module, train_set: Dataset, num_classes: int, device: torch.device, *, epochs: int,
             pooling: str = "mean", batch_size: int = 64, lr: float = 1e-3, layer_decay: float = 0.75,
             weight_decay: float = 0.05, warmup_fraction: float = 0.1, label_smoothing: float = 0.1,
             seed: int = 0, num_workers: int = 0) -> PooledClassifier:
    """A copy of `encoder` with a linear head, fine-tuned on `train_set`; `encoder` is a plain
    module (under ZeRO-3, pass a gathered copy).

    `batch_size` is the global batch: each step takes the next `batch_size` samples of the epoch's
    seeded permutation (the last partial batch is dropped, as MAE's loader does) and rank r of W
    their share r*B//W to (r+1)*B//W, with the flips drawn for the whole batch; each rank's loss
    counts its decoded samples times W / B, so each sample weighs 1/B (DDP averages the ranks).
    The result is therefore that of one process, whatever the number of ranks, up to the order
    of floating-point sums.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    check_batch(len(train_set), batch_size)
    steps_per_epoch = len(train_set) // batch_size
    device = torch.device(device)
    # Seeded for the head init (and anything stochastic an encoder passed in may hold), without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _train(PooledClassifier(copy.deepcopy(encoder), num_classes, pooling).to(device), train_set, device,
                      epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr,
                      layer_decay=layer_decay, weight_decay=weight_decay, warmup_fraction=warmup_fraction,
                      label_smoothing=label_smoothing, seed=seed, num_workers=num_workers)


def _decoded_anywhere(decoded: int, world_size: int, device: torch.device) -> bool:
    """Whether any rank decoded an image of this global batch (all ranks get the same answer)."""
    if world_size == 1:
        return decoded > 0
    total = torch.tensor([decoded], device=device)
    dist.all_reduce(total)
    return int(total) > 0


def _train(model, train_set, device, *, epochs, steps_per_epoch, batch_size, lr, layer_decay, weight_decay,
           warmup_fraction, label_smoothing, seed, num_workers) -> PooledClassifier:
    rank, world_size = rank_and_world()
    start, stop = rank_share(batch_size, world_size, rank)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, weight_decay, layer_decay), lr=lr)
    trained = model
    if world_size > 1:
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    generator = torch.Generator().manual_seed(seed)
    total_steps, warmup_steps = epochs * steps_per_epoch, int(warmup_fraction * epochs * steps_per_epoch)
    step = 0
    model.train()
    for _ in range(epochs):
        # The same permutation on every rank (same generator state); each takes its share of each batch.
        order = torch.randperm(len(train_set), generator=generator).tolist()
        shares = [order[s * batch_size + start:s * batch_size + stop] for s in range(steps_per_epoch)]
        for images, labels, kept in batches_of(train_set, shares, num_workers):
            if step < warmup_steps:
                scale = (step + 1) / warmup_steps
            else:
                scale = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale * group["lr_scale"]
            flip = torch.rand(batch_size, generator=generator) < 0.5  # the whole batch's, on every rank
            images = _flip_some(normalize(images, device), kept, flip[start:stop])
            with autocast(device):
                logits = trained(images)
            loss = F.cross_entropy(logits.float(), labels.to(device), label_smoothing=label_smoothing)
            decoded = int(kept.sum())
            weight = decoded * world_size / batch_size  # 0 for the stand-in of a batch with none decoded
            optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1 else loss * weight).backward()
            # A global batch none of whose images decoded has zero gradients, on which AdamW would
            # still decay the weights and move them by its momentum: no step, as for a skipped one.
            if _decoded_anywhere(decoded, world_size, device):
                optimizer.step()
            step += 1
    return model
