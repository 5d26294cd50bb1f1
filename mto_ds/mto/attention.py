"""The attention module of blocks that see mask tokens.

A subclass of timm's `Attention` with the same parameters (qkv, q_norm, k_norm, proj), so
an encoder built with it saves a state dict that `timm.create_model` loads. Its plain
`forward` is timm's; `forward_mto` adds recalibration and per-row statistics.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention

from ..config import MTO_KERNELS
from .fused_attention import fused_attention_with_row_stats, fused_path_applies
from .sdpa_stats import sdpa_attention_with_row_stats
from .stats import attention_with_row_stats, recalibration_mask


def attention_with_row_stats_by(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                masked: torch.Tensor, recalibrate: bool, scale: float, dropout_p: float = 0.0,
                                entropy: bool = True):
    """(out, per-row statistics) from the implementation `kernel` names (mto.kernel); the
    statistics hold `mass_on_masked`, and `norm_entropy` unless `entropy` is False:

    auto       the fused Triton kernel where it applies (CUDA, no dropout, d <= 128); on other CUDA
               inputs the sdpa path, which keeps no N x N tensor either; else (CPU) the reference
    fused      the fused Triton kernel; an error where it does not apply
    sdpa       one call of PyTorch's scaled_dot_product_attention with the statistics as extra
               value columns (mto/sdpa_stats.py)
    reference  explicit N x N attention in float32 (mto/stats.py), the ground truth

    With attention dropout every choice takes the reference: the statistics are those of the
    probabilities before dropout, which only the reference keeps apart.
    """
    if kernel not in MTO_KERNELS:
        raise ValueError(f"unknown MTO statistics kernel {kernel!r}; expected one of {MTO_KERNELS}")
    if dropout_p > 0.0 or kernel == "reference":
        return attention_with_row_stats(q, k, v, masked, recalibrate, scale, dropout_p, entropy)
    if kernel == "sdpa":
        return sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, scale, entropy)
    if fused_path_applies(q, k, v, dropout_p):
        # The kernel computes the entropy at no extra cost; dropped when not asked for.
        out, stats = fused_attention_with_row_stats(q, k, v, masked, recalibrate, scale)
        return out, stats if entropy else {"mass_on_masked": stats["mass_on_masked"]}
    if kernel == "fused":
        raise ValueError(f"mto.kernel=fused needs triton and CUDA tensors of one shape and dtype with head "
                         f"dim <= 128; got {q.device} {q.dtype} {tuple(q.shape)}")
    if q.is_cuda:
        return sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, scale, entropy)
    return attention_with_row_stats(q, k, v, masked, recalibrate, scale, entropy=entropy)


class MTOAttention(Attention):
    stats_kernel = "auto"  # mto.kernel; the MIM model sets it on each of its attention modules

    def forward_mto(self, x: torch.Tensor, masked: Optional[torch.Tensor], recalibrate: bool,
                    with_stats: bool, entropy: bool = True) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """Attention over x [B, N, C]; `masked` bool [B, N] marks mask tokens.

        recalibrate: visible queries do not attend to masked keys.
        with_stats: also return per-row statistics with gradients (the `stats_kernel`
        implementation), the entropy only if `entropy`; without them PyTorch's SDPA runs, with a
        boolean mask when recalibrating.
        """
        B, N, C = x.shape
        q, k, v = self._heads(x)
        dropout_p = self.attn_drop.p if self.training else 0.0
        stats = None
        if with_stats:
            out, stats = attention_with_row_stats_by(self.stats_kernel, q, k, v, masked, recalibrate, self.scale,
                                                     dropout_p, entropy)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=recalibration_mask(masked, recalibrate),
                                                 dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.proj_drop(self.proj(self.norm(out)))
        return out, stats

    def row_stats(self, x: torch.Tensor, masked: torch.Tensor, recalibrate: bool) -> Dict[str, torch.Tensor]:
        """The statistics of `forward_mto(..., with_stats=True)` alone: no dropout and no output
        projection, so computing them beside a training forward draws no random numbers."""
        q, k, v = self._heads(x)
        return attention_with_row_stats_by(self.stats_kernel, q, k, v, masked, recalibrate, self.scale)[1]

    def _heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, N, d] (strided views of one qkv projection, as timm's Attention)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v
