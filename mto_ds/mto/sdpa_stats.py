"""MTO's per-row statistics from one call of PyTorch's scaled_dot_product_attention (docs/MTO.md).

Same contract as the reference `stats.attention_with_row_stats` (without dropout), computed by
whichever fused attention kernel PyTorch picks (cuDNN or memory-efficient on a GPU), so no N x N
tensor is stored and the backward pass is SDPA's own. The statistics are linear functionals of
the attention rows, so they ride along as extra value columns:

    V' = [ v | k - c_kind (detached) | m | e0 | 0 ... ]

with m_j = 1 for masked keys, e0 marking a sentinel key (below), and c_kind the mean key of
j's kind (c_M over masked keys, c_vis over visible ones):

    O'[:, :d]   = sum_j A_ij v_j                   the attention output
    O'[:, d:2d] = sum_j A_ij (k_j - c_kind(j))
    O'[:, 2d]   = sum_j A_ij m_j = mass_i          the mass on masked keys

so that sum_j A_ij s_ij = scale * q_i . (O'[:, d:2d] + mass_i c_M + (1 - mass_i) c_vis).
The entropy is H_i = lse_i - sum_j A_ij s_ij. Its gradient in the logits,
-A_ij (s_ij - sum_k A_ik s_ik), is exactly the gradient of -(that sum) taken through the
probabilities alone (q_i and the k columns of V' detached), so lse_i only needs a value. That
value comes from a sentinel key appended to the keys, whose logit is the mean
logit of the keys row i may attend to (key = the mean of those keys): with p0_i the
probability the row puts on it, lse_i = s0_i + log((1 - p0_i) / p0_i), and every other
quantity is divided by (1 - p0_i), which removes the sentinel exactly. By Jensen's inequality
p0_i <= 1 / (1 + n_i) <= 1/2, so the division is safe. p0_i rounds to 0 where a row's largest
logit stands above its mean by more than about 87 (bf16, fp32) or 17 (fp16, whose p0_i is
subnormal, with fewer digits, from about 10); it is then clamped at the smallest positive value
of its dtype, so lse_i and the entropy are lower bounds (the entropy's value clamped at 0): right
for a row with one dominant key, below the truth for a row with several (log 2 for two).

Both lse_i and the sum are taken relative to the sentinel's logit, and the keys are centred
before V' is rounded to the inputs' dtype, so an offset common to a row's logits (the keys'
shared component) never enters a rounded number: with raw keys in V' it lost 2^-9 of itself
in bf16, then cancelled.

A block whose entropy no loss reads (a late block off a logging step: L_r reads only the mass)
asks for the mass alone, V' = [v | m | 0 ...]: no k columns, no sentinel, a value width of d + 1
rounded up to a multiple of 8.

Precision: the statistics come out of the kernel in the inputs' dtype (bf16: about 3
significant digits per row) where the reference and the Triton kernel keep float32.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .stats import normalised_entropy, recalibration_mask


def _smallest_positive(dtype: torch.dtype) -> float:
    """Where p0 is clamped: the smallest positive value SDPA can return it as (fp16: 2^-24), or
    float32's smallest normal (bf16, fp32). A p0 of 0 was below it, so the log-sum-exp taken from the
    clamp is a lower bound and the entropy one too (then clamped at 0); a clamp below the dtype's range
    (float32's 2^-126 for fp16) would overstate the log-sum-exp, in fp16 by up to 70 nats."""
    info = torch.finfo(dtype)
    return max(info.tiny * info.eps, torch.finfo(torch.float32).tiny)


def _round_up(n: int, multiple: int = 8) -> int:
    """SDPA's fused kernels want head dims in multiples of 8."""
    return -(-n // multiple) * multiple


def _key_means(k: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """float32 [B, H, 3, d]: the mean key over all tokens, over the masked ones (0 without any) and
    over the visible ones (CLS is one, so never empty)."""
    k = k.detach().float()
    m = masked.float()[:, None, :, None]                                       # [B, 1, N, 1]
    count = m.sum(2, keepdim=True)
    mean_masked = (k * m).sum(2, keepdim=True) / count.clamp(min=1.0)
    mean_visible = (k * (1.0 - m)).sum(2, keepdim=True) / (k.shape[2] - count).clamp(min=1.0)
    return torch.cat([k.mean(2, keepdim=True), mean_masked, mean_visible], dim=2)


def _value_columns(v: torch.Tensor, k, masked: torch.Tensor, width: int, sentinels: int) -> torch.Tensor:
    """V' [B, H, N + sentinels, width]: token rows [v | k (detached, float32, centred by the caller;
    if given) | m | 0 ...], sentinel rows 1 in the column after m, 0 elsewhere.

    Built as v (zero rows below for the sentinels) beside a block with no gradient, written in
    place: the backward then hands v its gradient as a view. Writing v into a zeroed V' in place
    instead would make the backward copy the whole of V''s gradient once per write after it."""
    B, H, N, d = v.shape
    rest = v.new_zeros(B, H, N + sentinels, width - d)
    column = 0
    if k is not None:
        rest[:, :, :N, :d] = k.detach()  # rounded to v's dtype here, after the centring
        column = d
    rest[:, :, :N, column] = masked[:, None, :].to(v.dtype)
    if sentinels:
        rest[:, :, N:, column + 1] = 1.0
        v = F.pad(v, (0, 0, 0, sentinels))
    return torch.cat([v, rest], dim=-1)


# The logit offset that stands for a masked-out key in the padded form (times the softmax scale:
# -4096 at head dim 64, -2048 at 256), far below float32's exp underflow near -104; a power of two,
# exact in fp16 and bf16.
_BLOCKED = -2.0 ** 15


def _recalibration_columns(masked: torch.Tensor, sentinels: bool, dtype: torch.dtype):
    """The recalibration mask as extra q and k columns, [B, 1, N, C] and [B, 1, N (+ 2), C]: the
    logit of query i and key j gains scale * _BLOCKED exactly where the mask forbids the pair.
    Column 0: visible queries against masked keys (and the sentinel of all keys); column 1 (with
    sentinels): masked queries against the visible-keys sentinel."""
    m = masked[:, None, :, None].to(dtype)                                     # [B, 1, N, 1]
    q_cols = torch.cat([1.0 - m, m], dim=-1) * _BLOCKED
    k_cols = torch.cat([m, torch.zeros_like(m)], dim=-1)
    if not sentinels:
        return q_cols[..., :1], k_cols[..., :1]
    sentinel_rows = torch.eye(2, dtype=dtype, device=masked.device).expand(masked.shape[0], 1, 2, 2)
    return q_cols, torch.cat([k_cols, sentinel_rows], dim=2)


def _pad_to(t: torch.Tensor, width: int, columns) -> torch.Tensor:
    """t zero-padded to `width`, with `columns` (broadcast over heads) right after t's own."""
    padded = F.pad(t, (0, width - t.shape[-1]))
    if columns is None:
        return padded
    return padded + F.pad(columns, (t.shape[-1], width - t.shape[-1] - columns.shape[-1]))


def _attend(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, masked: torch.Tensor, recalibrate: bool,
            sentinels: bool, scale: float, equal_head_dims: bool) -> torch.Tensor:
    """SDPA over V', recalibrated as `stats.recalibration_mask` says (sentinel keys, if any, after
    the tokens: the first for masked queries, the second for visible ones). By default with a
    boolean mask. With `equal_head_dims`, q and k are zero-padded to V''s width, so that q, k and
    V' share one head dim as PyTorch's flash backend requires, and the mask travels in the padding
    as logit offsets (`_recalibration_columns`), which flash also requires: no mask argument."""
    if not equal_head_dims:
        extra = torch.stack([masked, ~masked], dim=-1) if sentinels else None
        return F.scaled_dot_product_attention(q, k, values, attn_mask=recalibration_mask(masked, recalibrate, extra),
                                              scale=scale)
    q_cols, k_cols = _recalibration_columns(masked, sentinels, q.dtype) if recalibrate else (None, None)
    width = values.shape[-1]
    return F.scaled_dot_product_attention(_pad_to(q, width, q_cols), _pad_to(k, width, k_cols), values, scale=scale)


def sdpa_attention_with_row_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                                  recalibrate: bool, scale: float, entropy: bool = True,
                                  equal_head_dims: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Attention [B, H, N, d] in v's dtype and float32 [B, H, N] `mass_on_masked` and
    `norm_entropy` (the reference's contract), differentiable in q, k and v, from one SDPA call.
    Without `entropy` only the mass: V' = [v | m | 0 ...], no k columns and no sentinel.
    `equal_head_dims`: zero-pad q and k to V''s width and carry recalibration in the padding, not
    in a mask (same values; which form is faster is the GPU's to say, tools/bench_attention.py)."""
    d, dtype = q.shape[-1], v.dtype
    if not entropy:
        values = _value_columns(v, None, masked, _round_up(d + 1), sentinels=0)
        out_ext = _attend(q, k, values, masked, recalibrate, False, scale, equal_head_dims)
        out, mass, _ = out_ext.split([d, 1, values.shape[-1] - d - 1], dim=-1)
        return out, {"mass_on_masked": mass.squeeze(-1).float()}
    # Sentinel keys, rounded as the kernel will see them: the mean key c_all (all rows, or masked rows
    # under recalibration) and the mean visible key c_vis (visible rows under recalibration).
    means = _key_means(k, masked)                                               # c_all, c_M, c_vis
    sentinels = means[:, :, [0, 2] if recalibrate else [0]].to(k.dtype)
    keys = torch.cat([k, sentinels], dim=2)
    # The k columns of V' hold each key less the mean key of its kind, c_M or c_vis (in float32, then
    # rounded to v's dtype): a component that all keys share (an offset common to a row's logits)
    # cancels before the rounding, instead of losing 2^-9 of itself (bf16) in it and then cancelling
    # against lse_i in H_i = lse_i - sum_j A_ij s_ij.
    mean_masked, mean_visible = means[:, :, 1:2], means[:, :, 2:3]
    centred = k.detach().float() - torch.where(masked[:, None, :, None], mean_masked, mean_visible)
    values = _value_columns(v, centred, masked, _round_up(2 * d + 2), sentinels=sentinels.shape[2])
    # Under recalibration a masked query sees the sentinel of all keys, a visible one the other.
    out_ext = _attend(q, keys, values, masked, recalibrate, recalibrate, scale, equal_head_dims)
    # One split, not four slices: each slice's backward would write a zeroed copy of the whole
    # [B, H, N, width] gradient, and autograd would then add the four up.
    out_mix, key_mix, mass_col, p0_col, _ = out_ext.split([d, d, 1, 1, values.shape[-1] - 2 * d - 2], dim=-1)

    p0 = p0_col.squeeze(-1).float()
    keep = 1.0 - p0                                                              # >= 1/2
    out = out_mix / keep.to(dtype)[..., None]
    mass = mass_col.squeeze(-1).float() / keep
    # sum_j A_ij s_ij = scale q_i . [sum_j A_ij (k_j - c_kind(j)) + q_i c_M + (1 - q_i) c_vis], taken
    # relative to the sentinel's logit scale q_i . c0 (c0 = c_all or c_vis, rounded): differentiable
    # through the probabilities alone (O'[d:2d] and the mass; see the module docstring), each term
    # free of the keys' shared offset.
    q_fixed = q.detach().float()
    logit_masked_over_visible = scale * (q_fixed * (mean_masked - mean_visible)).sum(-1)
    centred_mean_logit = (scale * (q_fixed * key_mix.float()).sum(-1) / keep
                          + mass * logit_masked_over_visible)
    with torch.no_grad():
        shift = scale * (q_fixed @ (mean_visible - sentinels.float()).transpose(-2, -1))  # [B, H, N, S]
        if recalibrate:
            shift = torch.where(masked[:, None, :], shift[..., 0], shift[..., 1])
        else:
            shift = shift[..., 0]
        # lse_i less the sentinel's logit: log((1 - p0_i) / p0_i).
        lse_over_sentinel = torch.log(keep) - torch.log(p0.clamp(min=_smallest_positive(dtype)))
    # H_i = lse_i - sum_j A_ij s_ij, both taken relative to the sentinel's logit.
    row_entropy = lse_over_sentinel - shift - centred_mean_logit
    # The value clamped at 0 (see the docstring), the gradient left as it is.
    row_entropy = row_entropy + (row_entropy.clamp(min=0.0) - row_entropy).detach()
    return out, {"mass_on_masked": mass, "norm_entropy": normalised_entropy(row_entropy, masked, recalibrate)}


__all__ = ["sdpa_attention_with_row_stats"]
