"""Linear probe: a linear classifier trained on frozen, standardised features.

Features are standardised with the training set's per-dimension mean and std, which is
what MAE's BatchNorm-without-affine before the head amounts to once its statistics are
fixed; MIM features have a few dimensions of very large scale that otherwise dominate
the optimisation. The classifier starts at zero and is trained with AdamW and a cosine
schedule for a fixed number of epochs; the batch order comes from a seeded generator, so
the result is a function of (features, seed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .features import top1_accuracy


def standardise(train_features: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6):
    """Each tensor shifted and scaled by the training features' per-dimension statistics, as
    BatchNorm1d(affine=False, eps=1e-6) in MAE's probe does: (x - mean) / sqrt(var + eps)."""
    mean = train_features.mean(dim=0)
    scale = torch.sqrt(train_features.var(dim=0, unbiased=False) + eps)
    return tuple((x - mean) / scale for x in (train_features, *others))


def linear_probe_top1(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                      val_labels: torch.Tensor, num_classes: int, *, epochs: int = 100, lr: float = 1e-2,
                      weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> float:
    """Top-1 accuracy in [0, 100] on the validation features of a linear probe."""
    train_x, val_x = standardise(train_features.float(), val_features.float())
    head = fit_linear_head(train_x, train_labels, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
                           batch_size=batch_size, seed=seed)
    with torch.no_grad():
        predictions = head(val_x).argmax(dim=1)
    return top1_accuracy(predictions, val_labels)


def fit_linear_head(train_x: torch.Tensor, train_labels: torch.Tensor, num_classes: int, *, epochs: int,
                    lr: float, weight_decay: float, batch_size: int, seed: int) -> nn.Linear:
    """A linear head trained on (standardised) features: AdamW from zeros, a cosine LR, each
    epoch a permutation drawn from `seed`."""
    train_y = train_labels.to(train_x.device)
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    num_train = train_x.shape[0]
    steps_per_epoch = math.ceil(num_train / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(num_train, generator=generator).to(train_x.device)
            for start in range(0, num_train, batch_size):
                batch = order[start:start + batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                loss = F.cross_entropy(head(train_x[batch]), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return head
