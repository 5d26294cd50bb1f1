"""Fused attention that returns MTO's per-row statistics (docs/MTO_KERNEL.md).

Same contract as `stats.attention_with_row_stats`, the reference, without an N x N tensor
in memory: the forward pass keeps online-softmax running sums per query row, the backward
pass recomputes the probabilities block by block from q, k and the saved log-sum-exp.
Weight recalibration comes from per-token masked flags ([B, N]), never from an N x N mask.
Attention dropout is not supported here; the dispatcher (`attention.attention_with_row_stats_by`)
sends calls with dropout to the reference.

Importing this module needs neither triton nor CUDA: without triton the kernels are not
defined, and mto.kernel=auto takes the reference path.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch

from .stats import normalised_entropy

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves every call
    triton = None

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:
    # Excluded logits become this finite value, not -inf, so that no running sum meets inf - inf.
    _EXCLUDED = tl.constexpr(-1.0e30)

    @triton.jit
    def _allowed_pairs(row_ok, col_ok, query_masked, key_masked, RECALIBRATE: tl.constexpr):
        """[BLOCK_M, BLOCK_N] bool: real (query, key) pairs that recalibration keeps."""
        allowed = row_ok[:, None] & col_ok[None, :]
        if RECALIBRATE:
            allowed = allowed & (query_masked[:, None] | (key_masked[None, :] == 0))
        return allowed

    @triton.jit
    def _batch_head(num_heads):
        """This program's (b * H + h, b, h); b and h in int64 so offsets cannot overflow."""
        bh = tl.program_id(1)
        return bh, (bh // num_heads).to(tl.int64), (bh % num_heads).to(tl.int64)

    @triton.jit
    def _tile(BASE, b, h, stride_b, stride_h, stride_n, offs, offs_d):
        """Pointers to rows `offs` of the (b, h) slice of a [B, H, N, d] tensor (d contiguous)."""
        return BASE + b * stride_b + h * stride_h + offs[:, None] * stride_n + offs_d[None, :]

    @triton.jit
    def _row_grad_inputs(LSE, DMASS, DENT, CONST, row, row_ok):
        """Per-row lse_i, dL/dq_i, dL/dH_i and C_i for the rows `row` of [B, H, N]."""
        return (tl.load(LSE + row, mask=row_ok, other=0.0), tl.load(DMASS + row, mask=row_ok, other=0.0),
                tl.load(DENT + row, mask=row_ok, other=0.0), tl.load(CONST + row, mask=row_ok, other=0.0))

    @triton.jit
    def _row_stats_fwd_kernel(
            Q, K, V, MASKED, OUT, LSE, MASS, ENT,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
            num_heads, num_tokens, head_dim, scale,
            RECALIBRATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        bh, b, h = _batch_head(num_heads)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < num_tokens
        d_ok = offs_d < head_dim
        q = tl.load(_tile(Q, b, h, sqb, sqh, sqn, offs_m, offs_d),
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        query_masked = tl.load(MASKED + b * num_tokens + offs_m, mask=row_ok, other=0) != 0

        # Running state per row, all relative to the running max m: l = sum p,
        # acc = sum p v, mass = sum over masked keys of p, t = sum p (s - m).
        m_i = tl.full([BLOCK_M], _EXCLUDED, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        mass_i = tl.zeros([BLOCK_M], tl.float32)
        t_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, num_tokens, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < num_tokens
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(_tile(K, b, h, skb, skh, skn, offs_n, offs_d), mask=kv_mask, other=0.0)
            v = tl.load(_tile(V, b, h, svb, svh, svn, offs_n, offs_d), mask=kv_mask, other=0.0)
            key_masked = tl.load(MASKED + b * num_tokens + offs_n, mask=col_ok, other=0)
            allowed = _allowed_pairs(row_ok, col_ok, query_masked, key_masked, RECALIBRATE)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            s = tl.where(allowed, s, _EXCLUDED)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            shifted = s - m_new[:, None]
            p = tl.where(allowed, tl.exp(shifted), 0.0)
            # Moving the reference point from m to m_new: p rescales by alpha, (s - m) gains m - m_new.
            t_i = alpha * (t_i + (m_i - m_new) * l_i) + tl.sum(p * shifted, 1)
            l_i = alpha * l_i + tl.sum(p, 1)
            mass_i = alpha * mass_i + tl.sum(tl.where(key_masked[None, :] != 0, p, 0.0), 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # 0 only on padding rows, which are not stored
        log_l = tl.log(l_safe)
        out = acc / l_safe[:, None]
        tl.store(_tile(OUT, b, h, sob, soh, son, offs_m, offs_d),
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        row = bh.to(tl.int64) * num_tokens + offs_m
        tl.store(LSE + row, m_i + log_l, mask=row_ok)
        tl.store(MASS + row, mass_i / l_safe, mask=row_ok)
        # H = -sum p (s - lse) = (lse - m) - sum p (s - m) = log l - t / l
        tl.store(ENT + row, log_l - t_i / l_safe, mask=row_ok)

    @triton.jit
    def _row_constant_kernel(OUT, DOUT, MASS, DMASS, ENT, DENT, CONST,
                             sob, soh, son, sdb, sdh, sdn,
                             num_heads, num_tokens, head_dim,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """C_i = dO_i . O_i + dq_i q_i + dH_i H_i, the part of dS_ij shared by the whole row."""
        pid_m = tl.program_id(0)
        bh, b, h = _batch_head(num_heads)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < num_tokens
        tile_ok = row_ok[:, None] & (offs_d[None, :] < head_dim)
        o = tl.load(_tile(OUT, b, h, sob, soh, son, offs_m, offs_d),
                    mask=tile_ok, other=0.0).to(tl.float32)
        do = tl.load(_tile(DOUT, b, h, sdb, sdh, sdn, offs_m, offs_d),
                     mask=tile_ok, other=0.0).to(tl.float32)
        row = bh.to(tl.int64) * num_tokens + offs_m
        const = tl.sum(o * do, 1)
        const += tl.load(DMASS + row, mask=row_ok, other=0.0) * tl.load(MASS + row, mask=row_ok, other=0.0)
        const += tl.load(DENT + row, mask=row_ok, other=0.0) * tl.load(ENT + row, mask=row_ok, other=0.0)
        tl.store(CONST + row, const, mask=row_ok)

    @triton.jit
    def _logit_grad_tile(q, k, v, do, key_masked, allowed, lse, dmass, dent, const, scale,
                         DOT_PRECISION: tl.constexpr):
        """Recomputed probabilities P and dL/dS for one [BLOCK_M, BLOCK_N] tile.

        dS_ij = P_ij (dO_i . v_j + dq_i m_j - dH_i (s_ij - lse_i) - C_i)
        """
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        log_p = tl.where(allowed, s - lse[:, None], 0.0)
        p = tl.where(allowed, tl.exp(log_p), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        on_masked = tl.where(key_masked[None, :] != 0, dmass[:, None], 0.0)
        ds = p * (dp + on_masked - dent[:, None] * log_p - const[:, None])
        return p, ds

    @triton.jit
    def _row_stats_bwd_dkdv_kernel(
            Q, K, V, DOUT, MASKED, LSE, DMASS, DENT, CONST, DK, DV,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
            num_heads, num_tokens, head_dim, scale,
            RECALIBRATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One key block: dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij q_i, over all query blocks."""
        pid_n = tl.program_id(0)
        bh, b, h = _batch_head(num_heads)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < num_tokens
        d_ok = offs_d < head_dim
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(_tile(K, b, h, skb, skh, skn, offs_n, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, b, h, svb, svh, svn, offs_n, offs_d), mask=kv_mask, other=0.0)
        key_masked = tl.load(MASKED + b * num_tokens + offs_n, mask=col_ok, other=0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, num_tokens, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < num_tokens
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(_tile(Q, b, h, sqb, sqh, sqn, offs_m, offs_d), mask=q_mask, other=0.0)
            do = tl.load(_tile(DOUT, b, h, sdb, sdh, sdn, offs_m, offs_d),
                         mask=q_mask, other=0.0)
            query_masked = tl.load(MASKED + b * num_tokens + offs_m, mask=row_ok, other=0) != 0
            row = bh.to(tl.int64) * num_tokens + offs_m
            lse, dmass, dent, const = _row_grad_inputs(LSE, DMASS, DENT, CONST, row, row_ok)
            allowed = _allowed_pairs(row_ok, col_ok, query_masked, key_masked, RECALIBRATE)
            p, ds = _logit_grad_tile(q, k, v, do, key_masked, allowed, lse, dmass, dent, const, scale,
                                     DOT_PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        tl.store(_tile(DK, b, h, sgb, sgh, sgn, offs_n, offs_d), (dk * scale).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(_tile(DV, b, h, sgb, sgh, sgn, offs_n, offs_d), dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _row_stats_bwd_dq_kernel(
            Q, K, V, DOUT, MASKED, LSE, DMASS, DENT, CONST, DQ,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
            num_heads, num_tokens, head_dim, scale,
            RECALIBRATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One query block: dQ_i = scale sum_j dS_ij k_j, over all key blocks (no atomics)."""
        pid_m = tl.program_id(0)
        bh, b, h = _batch_head(num_heads)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < num_tokens
        d_ok = offs_d < head_dim
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_tile(Q, b, h, sqb, sqh, sqn, offs_m, offs_d), mask=q_mask, other=0.0)
        do = tl.load(_tile(DOUT, b, h, sdb, sdh, sdn, offs_m, offs_d), mask=q_mask, other=0.0)
        query_masked = tl.load(MASKED + b * num_tokens + offs_m, mask=row_ok, other=0) != 0
        row = bh.to(tl.int64) * num_tokens + offs_m
        lse, dmass, dent, const = _row_grad_inputs(LSE, DMASS, DENT, CONST, row, row_ok)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, num_tokens, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < num_tokens
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(_tile(K, b, h, skb, skh, skn, offs_n, offs_d), mask=kv_mask, other=0.0)
            v = tl.load(_tile(V, b, h, svb, svh, svn, offs_n, offs_d), mask=kv_mask, other=0.0)
            key_masked = tl.load(MASKED + b * num_tokens + offs_n, mask=col_ok, other=0)
            allowed = _allowed_pairs(row_ok, col_ok, query_masked, key_masked, RECALIBRATE)
            _, ds = _logit_grad_tile(q, k, v, do, key_masked, allowed, lse, dmass, dent, const, scale,
                                     DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        tl.store(_tile(DQ, b, h, sgb, sgh, sgn, offs_m, offs_d), (dq * scale).to(DQ.dtype.element_ty),
                 mask=q_mask)


def _interpreted() -> bool:
    """True when triton runs its kernels on the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(_row_stats_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_config(head_dim: int, dtype: torch.dtype, tiles: Optional[Tuple[int, ...]]) -> Dict[str, int]:
    """Tiles and warps. Chosen from ahead-of-time compiles for sm_90 (no spills, vectorised
    loads; docs/MTO_KERNEL.md), not from timings: `tiles` = (BLOCK_M, BLOCK_N[, num_warps[,
    num_stages]]) overrides them, for tests and tools/bench_attention.py."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:  # exact fp32 products run on FMA units; larger tiles spill
        block_m, block_n, num_warps = 32, 32, 8
    elif block_d <= 64:
        block_m, block_n, num_warps = 64, 64, 4
    else:
        block_m, block_n, num_warps = 64, 32, 8
    num_stages = 2
    if tiles:
        block_m, block_n = tiles[:2]
        num_warps = tiles[2] if len(tiles) > 2 else num_warps
        num_stages = tiles[3] if len(tiles) > 3 else num_stages
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps,
            "num_stages": num_stages}


def _row_stats_forward(q, k, v, masked_i8, recalibrate, scale, config):
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty(q.shape, dtype=v.dtype, device=q.device)
    lse, mass, entropy = (torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
                          for _ in range(3))
    grid = (triton.cdiv(tokens, config["BLOCK_M"]), batch * heads)
    _row_stats_fwd_kernel[grid](
        q, k, v, masked_i8, out, lse, mass, entropy,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, tokens, head_dim, scale,
        RECALIBRATE=recalibrate, DOT_PRECISION=_dot_precision(q.dtype), **config)
    return out, lse, mass, entropy


def _row_stats_backward(q, k, v, masked_i8, out, lse, mass, entropy, dout, dmass, dentropy,
                        recalibrate, scale, config):
    batch, heads, tokens, head_dim = q.shape
    dout = _unit_last_stride(dout)
    dmass = dmass.float().contiguous()
    dentropy = dentropy.float().contiguous()
    const = torch.empty_like(lse)
    _row_constant_kernel[(triton.cdiv(tokens, config["BLOCK_M"]), batch * heads)](
        out, dout, mass, dmass, entropy, dentropy, const, *_strides(out), *_strides(dout),
        heads, tokens, head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"])
    dq, dk, dv = (torch.empty(q.shape, dtype=t.dtype, device=q.device) for t in (q, k, v))
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
              heads, tokens, head_dim, scale)
    flags = dict(RECALIBRATE=recalibrate, DOT_PRECISION=_dot_precision(q.dtype), **config)
    _row_stats_bwd_dkdv_kernel[(triton.cdiv(tokens, config["BLOCK_N"]), batch * heads)](
        q, k, v, dout, masked_i8, lse, dmass, dentropy, const, dk, dv, *common, **flags)
    _row_stats_bwd_dq_kernel[(triton.cdiv(tokens, config["BLOCK_M"]), batch * heads)](
        q, k, v, dout, masked_i8, lse, dmass, dentropy, const, dq, *common, **flags)
    return dq, dk, dv


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take head_dim as contiguous (vectorised loads); other strides are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    assert t.stride(-1) == 1, f"expected a contiguous last dim, got strides {t.stride()}"
    return t.stride()[:3]


def _dot_precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 inputs: exact products like the reference's fp32 matmul (tf32 would cost ~1e-3).
    # fp16/bf16 products are exact in fp32 anyway; None keeps the target's default.
    return "ieee" if dtype == torch.float32 else None


# The kernels as two custom operators with a registered autograd formula: torch.compile traces
# through them (shapes from the fake implementations) without a graph break, so a compiled
# block stays one graph with the kernel inside it; eager calls run them as plain functions.
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")


@torch.library.custom_op("mto_ds::row_stats_attention", mutates_args=())
def _row_stats_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_i8: torch.Tensor,
                            recalibrate: bool, scale: float, config: List[int],
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, mass on masked keys, entropy H in nats); lse only for the backward."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    masked_i8 = masked_i8.contiguous()
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _row_stats_forward(q, k, v, masked_i8, recalibrate, scale, dict(zip(_CONFIG_KEYS, config)))


@_row_stats_attention_op.register_fake
def _(q, k, v, masked_i8, recalibrate, scale, config):
    rows = q.shape[:3]
    return (torch.empty(q.shape, dtype=v.dtype, device=q.device),
            *(torch.empty(rows, dtype=torch.float32, device=q.device) for _ in range(3)))


@torch.library.custom_op("mto_ds::row_stats_attention_backward", mutates_args=())
def _row_stats_attention_backward_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_i8: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, mass: torch.Tensor, entropy: torch.Tensor, dout: torch.Tensor, dmass: torch.Tensor,
        dentropy: torch.Tensor, recalibrate: bool, scale: float, config: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    masked_i8 = masked_i8.contiguous()
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _row_stats_backward(q, k, v, masked_i8, out, lse, mass, entropy, dout, dmass, dentropy,
                                   recalibrate, scale, dict(zip(_CONFIG_KEYS, config)))


@_row_stats_attention_backward_op.register_fake
def _(q, k, v, masked_i8, out, lse, mass, entropy, dout, dmass, dentropy, recalibrate, scale, config):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, masked_i8, recalibrate, scale, config = inputs
    out, lse, mass, entropy = output
    ctx.save_for_backward(q, k, v, masked_i8, out, lse, mass, entropy)
    ctx.recalibrate, ctx.scale, ctx.config = recalibrate, scale, config


def _backward(ctx, dout, dlse, dmass, dentropy):
    q, k, v, masked_i8, out, lse, mass, entropy = ctx.saved_tensors
    # An output no loss used arrives as None: its cotangent is zero.
    dout = torch.zeros_like(out) if dout is None else dout
    dmass = torch.zeros_like(mass) if dmass is None else dmass
    dentropy = torch.zeros_like(entropy) if dentropy is None else dentropy
    dq, dk, dv = _row_stats_attention_backward_op(q, k, v, masked_i8, out, lse, mass, entropy, dout, dmass,
                                                  dentropy, ctx.recalibrate, ctx.scale, ctx.config)
    return dq, dk, dv, None, None, None, None


_row_stats_attention_op.register_autograd(_backward, setup_context=_setup_context)


def fused_attention_with_row_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   masked: torch.Tensor, recalibrate: bool, scale: float, *,
                                   tiles: Optional[Tuple[int, ...]] = None,
                                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`attention_with_row_stats` (no dropout) as Triton kernels; same inputs, same outputs.

    q, k, v [B, H, N, d] of one dtype (fp16, bf16 or fp32, any strides), d <= MAX_HEAD_DIM;
    masked bool [B, N]. Returns (out [B, H, N, d] in v's dtype, stats) with float32 [B, H, N]
    `mass_on_masked` and `norm_entropy`, differentiable in q, k, v. Accumulation is fp32.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). `tiles`
    (BLOCK_M, BLOCK_N[, num_warps[, num_stages]]) overrides the launch configuration (tests, benchmarks).
    """
    _check_fused_inputs(q, k, v, masked)
    config = _launch_config(q.shape[-1], q.dtype, tiles)
    out, _, mass, entropy = _row_stats_attention_op(q, k, v, masked.to(torch.int8), bool(recalibrate), float(scale),
                                                    [config[key] for key in _CONFIG_KEYS])
    return out, {"mass_on_masked": mass, "norm_entropy": normalised_entropy(entropy, masked, recalibrate)}


def _check_fused_inputs(q, k, v, masked) -> None:
    if triton is None:
        raise RuntimeError("fused_attention_with_row_stats needs triton; mto.kernel=auto or sdpa serve without it")
    if not (q.is_cuda or _interpreted()):
        raise RuntimeError(f"fused attention runs on CUDA tensors (or under TRITON_INTERPRET=1), got {q.device}")
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"expected q, k, v of one shape [B, H, N, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES):
        raise ValueError(f"expected q, k, v of one dtype in {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"expected head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if masked.dtype != torch.bool or tuple(masked.shape) != (q.shape[0], q.shape[2]) or masked.device != q.device:
        raise ValueError(f"expected masked bool [B, N] = {(q.shape[0], q.shape[2])} on {q.device}, "
                         f"got {masked.dtype} {tuple(masked.shape)} on {masked.device}")


def fused_kernel_available(device: torch.device) -> bool:
    """Whether the fused kernel can run on `device` at all (triton installed, a CUDA device)."""
    return triton is not None and torch.device(device).type == "cuda"


def fused_path_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether the fused kernel serves these inputs (mto.kernel=auto takes it when it does)."""
    return (fused_kernel_available(q.device) and dropout_p == 0.0
            and q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES
            and q.dim() == 4 and q.shape == k.shape == v.shape and q.shape[-1] <= MAX_HEAD_DIM)


__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "fused_attention_with_row_stats", "fused_kernel_available",
           "fused_path_applies"]
