"""MTO's per-row statistics from one call of PyTorch's scaled_dot_product_attention (docs/MTO.md).

Same contract as the reference `stats.attention_with_row_stats` (without dropout), computed by
whichever fused attention kernel PyTorch picks (cuDNN or memory-efficient on a GPU), so no N x N
tensor is stored and the backward pass is SDPA's own. The statistics are linear functionals of
the attention rows, so they ride along as extra value columns:

    V' = [ v | k (detached) | m | e0 | 0 ... ]     m_j = 1 for masked keys, e0 marks a sentinel key

    O'[:, :d]   = sum_j A_ij v_j                   the attention output
    O'[:, d:2d] = sum_j A_ij k_j                   so that sum_j A_ij s_ij = scale * q_i . O'[:, d:2d]
    O'[:, 2d]   = sum_j A_ij m_j = q_i             the mass on masked keys

and the entropy is H_i = lse_i - sum_j A_ij s_ij. Its gradient in the logits,
-A_ij (s_ij - sum_k A_ik s_ik), is exactly the gradient of -scale * q_i . O'[:, d:2d] taken
through the probabilities alone (q_i and the k columns of V' detached), so lse_i only needs a
value. That value comes from a sentinel key appended to the keys, whose logit is the mean
logit of the keys row i may attend to (key = the mean of those keys): with p0_i the
probability the row puts on it, lse_i = s0_i + log((1 - p0_i) / p0_i), and every other
quantity is divided by (1 - p0_i), which removes the sentinel exactly. By Jensen's inequality
p0_i <= 1 / (1 + n_i) <= 1/2, so the division is safe; p0_i underflows only for a row whose
largest logit is more than about 80 above its mean, whose entropy is then 0 to within e^-80
(the entropy's value is clamped at 0 there).

Precision: the statistics come out of the kernel in the inputs' dtype (bf16: about 3
significant digits per row) where the reference and the Triton kernel keep float32.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .stats import allowed_keys, normalised_entropy


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sentinel_keys(k: torch.Tensor, masked: torch.Tensor, recalibrate: bool) -> torch.Tensor:
    """[B, H, S, d]: the mean key over all tokens (S = 1), and under recalibration also over the
    visible tokens (S = 2), whose logit for a query is that query's mean logit over those keys."""
    k = k.detach()
    keys = [k.mean(2, keepdim=True)]
    if recalibrate:
        visible = (~masked).to(k.dtype)[:, None, :, None]                      # [B, 1, N, 1]
        keys.append((k * visible).sum(2, keepdim=True) / visible.sum(2, keepdim=True))
    return torch.cat(keys, dim=2)


def sdpa_attention_with_row_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                                  recalibrate: bool, scale: float
                                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Attention [B, H, N, d] in v's dtype and float32 [B, H, N] `mass_on_masked` and
    `norm_entropy` (the reference's contract), differentiable in q, k and v, from one SDPA call."""
    B, H, N, d = q.shape
    dtype = v.dtype
    width = _round_up(2 * d + 2, 8)  # SDPA kernels want head dims in multiples of 8
    sentinels = _sentinel_keys(k, masked, recalibrate).to(k.dtype)  # rounded as the kernel will see them
    S = sentinels.shape[2]

    value_rows = torch.cat([v, k.detach().to(dtype), masked[:, None, :, None].to(dtype).expand(B, H, N, 1),
                            v.new_zeros(B, H, N, width - 2 * d - 1)], dim=-1)
    sentinel_rows = v.new_zeros(B, H, S, width)
    sentinel_rows[..., 2 * d + 1] = 1.0
    keys = torch.cat([k, sentinels], dim=2)
    values = torch.cat([value_rows, sentinel_rows], dim=2)
    attn_mask = None
    if recalibrate:  # visible queries: visible keys and the visible sentinel; masked: all and the other
        sees = torch.stack([masked, ~masked], dim=-1)                            # [B, N, 2]
        attn_mask = torch.cat([allowed_keys(masked), sees], dim=-1)[:, None]     # [B, 1, N, N + 2]
    out_ext = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale)

    p0 = out_ext[..., 2 * d + 1].float()
    keep = 1.0 - p0                                                              # >= 1/2
    out = out_ext[..., :d] / keep.to(dtype)[..., None]
    mass = out_ext[..., 2 * d].float() / keep
    # sum_j A_ij s_ij, differentiable through the probabilities only (see the module docstring).
    mean_logit = scale * (q.detach().float() * out_ext[..., d:2 * d].float()).sum(-1) / keep
    with torch.no_grad():
        sentinel_logit = scale * (q.float() @ sentinels.float().transpose(-2, -1))          # [B, H, N, S]
        if recalibrate:
            sentinel_logit = torch.where(masked[:, None, :], sentinel_logit[..., 0], sentinel_logit[..., 1])
        else:
            sentinel_logit = sentinel_logit[..., 0]
        lse = sentinel_logit + torch.log(keep) - torch.log(p0.clamp(min=torch.finfo(torch.float32).tiny))
    entropy = lse - mean_logit
    # The value clamped at 0 (see the docstring), the gradient left as it is.
    entropy = entropy + (entropy.clamp(min=0.0) - entropy).detach()
    return out, {"mass_on_masked": mass, "norm_entropy": normalised_entropy(entropy, masked, recalibrate)}


__all__ = ["sdpa_attention_with_row_stats"]
