"""MTO's losses over per-block summaries (docs/MTO.md, section 4). Pure functions."""
from __future__ import annotations

from typing import Dict, List

import torch


def mto_terms(summaries: List[Dict[str, torch.Tensor]], num_early: int, delta: float) -> Dict[str, torch.Tensor]:
    """L_spa, L_e, L_r from the summaries of the blocks that see mask tokens, in depth order.

    L_spa = mean over early blocks of the mean normalised entropy of masked query rows
    L_e   = mean over early blocks of (1 - h_l)
    L_r   = mean over consecutive late pairs of max(0, h_{l+1} - h_l + delta)
    A term with no block to average over is 0.
    """
    zero = summaries[0]["heterogeneity"].new_zeros(()) if summaries else torch.zeros(())
    early, late = summaries[:num_early], summaries[num_early:]
    spa = torch.stack([s["entropy_masked"] for s in early]).mean() if early else zero
    e = torch.stack([1.0 - s["heterogeneity"] for s in early]).mean() if early else zero
    if len(late) >= 2:
        h = torch.stack([s["heterogeneity"] for s in late])
        r = torch.clamp(h[1:] - h[:-1] + delta, min=0.0).mean()
    else:
        r = zero
    return {"loss_spa": spa, "loss_e": e, "loss_r": r}


def warmup_scale(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the MTO loss weights over optimizer steps (1.0 without warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def weighted_mto_loss(terms: Dict[str, torch.Tensor], lambda_spa: float, lambda_e: float,
                      lambda_r: float, scale: float) -> torch.Tensor:
    """scale * (lambda_spa * L_spa + lambda_e * L_e + lambda_r * L_r)."""
    return scale * (lambda_spa * terms["loss_spa"] + lambda_e * terms["loss_e"] + lambda_r * terms["loss_r"])
