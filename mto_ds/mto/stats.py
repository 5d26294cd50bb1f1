"""MTO's per-row attention statistics and per-block summaries (docs/MTO.md, sections 1-3).

Pure functions over tensors. Shapes: B batch, H heads, N tokens (CLS first, counted as
visible), `masked` bool [B, N] with True where the token is a mask token.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F


def allowed_keys(masked: torch.Tensor) -> torch.Tensor:
    """Weight recalibration: bool [B, N, N], False where a visible query meets a masked key.

    Masked queries keep every key; visible queries renormalise over visible keys only.
    """
    visible_query = ~masked[:, :, None]
    masked_key = masked[:, None, :]
    return ~(visible_query & masked_key)


def recalibration_mask(masked: torch.Tensor, recalibrate: bool,
                       extra_keys: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """SDPA's boolean mask [B, 1, N, N (+ extra)] under recalibration, else None; `extra_keys`
    [B, N, E] says which of E keys appended after the tokens each query may attend to."""
    if not recalibrate:
        return None
    allowed = allowed_keys(masked)
    if extra_keys is not None:
        allowed = torch.cat([allowed, extra_keys], dim=-1)
    return allowed[:, None]


def attention_with_row_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             masked: torch.Tensor, recalibrate: bool, scale: float,
                             dropout_p: float = 0.0, entropy: bool = True):
    """Explicit attention (the reference path) that also returns per-row statistics.

    Returns (out [B, H, N, d] in v's dtype, stats) with stats holding float32 [B, H, N]:
      `mass_on_masked`  q_i = sum_{j in M} A_ij
      `norm_entropy`    e_i = H(A_i) / log(n_i), n_i the number of keys row i may attend to
                        (left out when `entropy` is False)
    Statistics are taken from the probabilities before attention dropout.
    """
    # float32 even under autocast, which would otherwise run this matmul in bf16.
    with torch.autocast(q.device.type, enabled=False):
        return _explicit_attention(q, k, v, masked, recalibrate, scale, dropout_p, entropy)


def _explicit_attention(q, k, v, masked, recalibrate, scale, dropout_p, with_entropy):
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    allowed = recalibration_mask(masked, recalibrate)                 # [B, 1, N, N] or None
    if allowed is not None:
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    stats = {"mass_on_masked": (probs * masked[:, None, None, :].float()).sum(-1)}
    if with_entropy:
        # Excluded keys have probability 0; zero their log so 0 * log(0) stays 0 in backward too.
        safe_log = log_probs if allowed is None else log_probs.masked_fill(~allowed, 0.0)
        entropy = -(probs * safe_log).sum(-1)
        stats["norm_entropy"] = normalised_entropy(entropy, masked, recalibrate)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = probs.to(v.dtype) @ v
    return out, stats


def keys_per_row(masked: torch.Tensor, recalibrate: bool) -> torch.Tensor:
    """n_i as float [B, 1, N]: N, or under recalibration the visible count for visible rows."""
    num_tokens = masked.shape[-1]
    if not recalibrate:
        return torch.full((masked.shape[0], 1, num_tokens), float(num_tokens), device=masked.device)
    num_visible = (~masked).sum(-1, keepdim=True, dtype=torch.float32)          # [B, 1]
    return torch.where(masked, float(num_tokens), num_visible)[:, None]


def normalised_entropy(entropy: torch.Tensor, masked: torch.Tensor, recalibrate: bool) -> torch.Tensor:
    """e_i = H_i / log(n_i) for entropies [B, H, N] in nats (n_i clamped to >= 2)."""
    return entropy / keys_per_row(masked, recalibrate).clamp(min=2.0).log()


def block_summary(stats: Dict[str, torch.Tensor], masked: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One block's scalars from its per-row statistics.

    heterogeneity h = 1 - mean_i(q_i) / r, with r = |M| / N per sample; averaged over heads,
    queries and batch. A sample without mask tokens has h = 1 (nobody can read one).
    entropy_masked / entropy_visible: mean e_i over masked / visible query rows (NaN when the
    statistics hold no entropy).
    """
    masked_f = masked.float()                                          # [B, N]
    ratio = masked_f.mean(-1)                                          # r per sample [B]
    mean_mass = stats["mass_on_masked"].mean(dim=(1, 2))               # [B]
    per_sample = torch.where(ratio > 0, 1.0 - mean_mass / ratio.clamp(min=1e-12),
                             torch.ones_like(ratio))
    summary = {"heterogeneity": per_sample.mean()}
    if "norm_entropy" not in stats:
        nan = per_sample.new_full((), float("nan"))
        return {**summary, "entropy_masked": nan, "entropy_visible": nan}
    row_entropy = stats["norm_entropy"].mean(1)                        # [B, N], mean over heads
    return {**summary,
            "entropy_masked": _masked_mean(row_entropy, masked_f),
            "entropy_visible": _masked_mean(row_entropy, 1.0 - masked_f)}


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def num_early_blocks(num_blocks: int, early_blocks: Optional[int]) -> int:
    """K: the first K blocks that see mask tokens are early; default ceil(L / 3)."""
    k = math.ceil(num_blocks / 3) if early_blocks is None else early_blocks
    return min(k, num_blocks)
