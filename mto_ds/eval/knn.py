"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Similarity is cosine; each of the k most similar training samples votes for its class
with weight exp(similarity / T). Queries are processed in chunks, so memory is bounded
by chunk_size x num_train similarities whatever the size of the validation set.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .features import rank_and_world, top1_accuracy

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                num_classes: int, *, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 1024) -> torch.Tensor:
    """Predicted class [Q] of each query row."""
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}")
    bank = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(bank.device)
    if k > bank.shape[0]:  # not the protocol asked for: said, not silently changed
        if rank_and_world()[0] == 0:
            log.warning("eval.knn_k=%d is more than the %d training features: k-NN votes over all of them "
                        "(raise eval.num_train or lower eval.knn_k)", k, bank.shape[0])
        k = bank.shape[0]
    predictions = []
    for start in range(0, query_features.shape[0], chunk_size):
        queries = F.normalize(query_features[start:start + chunk_size].float().to(bank.device), dim=1)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)
        # Scaling a row's weights by exp(-max / T) leaves its vote unchanged and keeps
        # small temperatures from overflowing.
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
             val_labels: torch.Tensor, num_classes: int, *, k: int = 20, temperature: float = 0.07,
             chunk_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 100] of weighted k-NN on the validation features."""
    predictions = knn_predict(train_features, train_labels, val_features, num_classes, k=k,
                              temperature=temperature, chunk_size=chunk_size)
    return top1_accuracy(predictions, val_labels)
