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


def normalised_entropy(entropy: torch.Tensor, masked: torch.Tensor, recalibrate: bool) -> torch.Tensor:
    """e_i = H_i / log(n_i) for entropies [B, H, N] in nats; n_i the number of keys row i may attend
    to (clamped to >= 2): N, or under recalibration the visible count for visible rows."""
    log_all = math.log(max(masked.shape[-1], 2))
    if not recalibrate:
        return entropy / log_all
    num_visible = (~masked).sum(-1, keepdim=True, dtype=torch.float32)          # [B, 1]
    log_keys = torch.where(masked, log_all, num_visible.clamp(min=2.0).log())   # [B, N]
    return entropy / log_keys[:, None]


def summary_weights(masked: torch.Tensor) -> torch.Tensor:
    """float32 [3, B, N]: weights that turn per-row statistics (averaged over heads) into a block's
    scalars with one product and sum each. Row 0 gives the heterogeneity's mean mass over r:
    1 / (B |M_b|) = 1 / (B N r_b), 0 for a sample without mask tokens (its h is 1); rows 1 and 2
    the means over masked and over visible rows. They depend on the mask alone, so a forward pass
    computes them once for all its blocks (models/vit.py: run_blocks)."""
    m = masked.float()
    count = m.sum(-1, keepdim=True)                                            # |M_b|
    heterogeneity = torch.where(count > 0, 1.0 / (m.shape[0] * count.clamp(min=1.0)), 0.0).expand_as(m)
    rows = torch.stack([m, 1.0 - m])
    return torch.cat([heterogeneity[None], rows / rows.sum((1, 2), keepdim=True).clamp(min=1.0)])


def block_summary(stats: Dict[str, torch.Tensor], masked: torch.Tensor,
                  weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """One block's scalars from its per-row statistics.

    heterogeneity h = 1 - mean_i(q_i) / r, with r = |M| / N per sample; averaged over heads,
    queries and batch. A sample without mask tokens has h = 1 (nobody can read one).
    entropy_masked / entropy_visible: mean e_i over masked / visible query rows (NaN when the
    statistics hold no entropy). `weights`: `summary_weights(masked)`, when already computed.
    """
    weights = summary_weights(masked) if weights is None else weights
    mass = stats["mass_on_masked"].mean(1)                                     # [B, N], mean over heads
    summary = {"heterogeneity": 1.0 - (mass * weights[0]).sum()}
    if "norm_entropy" not in stats:
        nan = mass.new_full((), float("nan"))
        return {**summary, "entropy_masked": nan, "entropy_visible": nan}
    entropy_masked, entropy_visible = (stats["norm_entropy"].mean(1) * weights[1:]).sum((1, 2)).unbind()
    return {**summary, "entropy_masked": entropy_masked, "entropy_visible": entropy_visible}


def num_early_blocks(num_blocks: int, early_blocks: Optional[int]) -> int:
    """K: the first K blocks that see mask tokens are early; default ceil(L / 3)."""
    k = math.ceil(num_blocks / 3) if early_blocks is None else early_blocks
    return min(k, num_blocks)
