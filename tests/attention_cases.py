"""Inputs, cases and the comparison against the reference shared by the tests of the MTO
statistics implementations (test_fused_attention.py, test_sdpa_stats.py).

Ground truth is the reference in fp32 on the same (rounded) inputs; each implementation is
judged by how far it is from that truth next to the reference itself run in the case's dtype.
"""
from __future__ import annotations

import torch

from mto_ds.mto.stats import attention_with_row_stats

TERMS = ("out", "mass_on_masked", "norm_entropy")
RTOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
STATS_ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Small shapes for the interpreter. Default tiles are 64 x 64 (32 x 32 for fp32), so N = 70
# spans two (three) tiles, the last partial; "tiles" overrides them. "edge" masks sample 0's
# first 20 tokens (CLS included: a visible query then meets a whole excluded key tile) and no
# token of sample 1; "cls_only_visible" masks all of sample 0 but CLS, whose row then has a
# single key (entropy 0, normalised by log 2).
INTERPRETER_CASES = {
    "plain_fp32": dict(shape=(2, 2, 70, 16), dtype="fp32", recalibrate=False),
    "recalibrated_fp32": dict(shape=(2, 2, 70, 16), dtype="fp32", recalibrate=True),
    "recalibrated_only_cls_visible_fp32": dict(shape=(2, 2, 40, 16), dtype="fp32", recalibrate=True,
                                               mask="cls_only_visible", tiles=(16, 16)),
    "recalibrated_edge_masks_small_tiles_head_dim_24_fp32": dict(
        shape=(2, 2, 53, 24), dtype="fp32", recalibrate=True, mask="edge", tiles=(16, 32)),
    "recalibrated_fp16": dict(shape=(2, 2, 53, 32), dtype="fp16", recalibrate=True, tiles=(16, 16)),
    "plain_fp16": dict(shape=(2, 2, 70, 32), dtype="fp16", recalibrate=False),
    "recalibrated_unequal_tiles_fp16": dict(shape=(1, 2, 53, 32), dtype="fp16", recalibrate=True, tiles=(32, 16)),
}
CUDA_CASES = {
    f"vit_{name}_{'recalibrated' if recal else 'plain'}": dict(shape=(2, 16, 197, 64), dtype=name, recalibrate=recal)
    for name in ("bf16", "fp16", "fp32") for recal in (False, True)
}
CUDA_CASES["vit_bf16_recalibrated_n257_edge_masks"] = dict(shape=(2, 16, 257, 64), dtype="bf16",
                                                           recalibrate=True, mask="edge")
CUDA_CASES["vit_bf16_recalibrated_only_cls_visible"] = dict(shape=(2, 16, 197, 64), dtype="bf16",
                                                            recalibrate=True, mask="cls_only_visible")
# The other head dims the benchmarks meet: ViT-H/14 (80, padded to a 128 tile; 257 tokens) and
# the MAE decoder (512 / 16 heads = 32).
CUDA_CASES["vit_h_bf16_recalibrated_head_dim_80"] = dict(shape=(2, 16, 257, 80), dtype="bf16", recalibrate=True)
CUDA_CASES["mae_decoder_bf16_recalibrated_head_dim_32"] = dict(shape=(2, 16, 197, 32), dtype="bf16",
                                                               recalibrate=True)


def _make_inputs(case, device):
    """Leaf qkv [B, N, 3, H, d] in the case's dtype (timm's layout) and masked bool [B, N]."""
    batch, heads, tokens, head_dim = case["shape"]
    gen = torch.Generator().manual_seed(0)
    qkv = 1.5 * torch.randn(batch, tokens, 3, heads, head_dim, generator=gen)
    masked = torch.rand(batch, tokens, generator=gen) < 0.6
    masked[:, 0] = False
    if case.get("mask") == "edge":
        masked[0, :20] = True
        masked[-1] = False
    elif case.get("mask") == "cls_only_visible":  # visible rows of sample 0 have one key: n_i = 1
        masked[0, 1:] = True
    cotangents = {
        "out": torch.randn(batch, tokens, heads, head_dim, generator=gen),
        "mass_on_masked": torch.randn(batch, heads, tokens, generator=gen),
        "norm_entropy": torch.randn(batch, heads, tokens, generator=gen),
    }
    qkv = qkv.to(DTYPES[case["dtype"]])
    return qkv.to(device), masked.to(device), {k: c.to(device) for k, c in cotangents.items()}


def _run(attention, qkv, masked, cotangents, recalibrate):
    """Forward values and, per loss term, the gradient in q, k, v (all as fp32)."""
    qkv = qkv.detach().requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)       # strided views, as timm's Attention
    out, stats = attention(q, k, v, masked, recalibrate, q.shape[-1] ** -0.5)
    # The out term reads out through a transpose, so the kernel gets a non-contiguous dout.
    terms = {"out": out.transpose(1, 2), **stats}
    result = {name: value.detach().float() for name, value in terms.items()}
    for term, value in terms.items():
        (grad,) = torch.autograd.grad((value.float() * cotangents[term]).sum(), qkv, retain_graph=True)
        for i, name in enumerate("qkv"):
            result[f"d{name}/{term}"] = grad[:, :, i].float()
    return result


def compare_with_reference(case, device, attention):
    """{quantity: {tested, reference, scale}}: max errors of `attention` (same contract as the
    reference) and of the reference in the case's dtype against fp32 truth, and max |truth|."""
    qkv, masked, cotangents = _make_inputs(case, device)
    recalibrate = case["recalibrate"]
    truth = _run(attention_with_row_stats, qkv.float(), masked, cotangents, recalibrate)
    reference = _run(attention_with_row_stats, qkv, masked, cotangents, recalibrate)
    tested = _run(attention, qkv, masked, cotangents, recalibrate)
    return {name: {"tested": (tested[name] - t).abs().max().item(),
                   "reference": (reference[name] - t).abs().max().item(),
                   "scale": t.abs().max().item()} for name, t in truth.items()}



def visible_rows_under_changed_mask_token(case, device, attention):
    """Recalibrated `attention` (the reference's signature) run twice, v at masked keys changed
    in between.

    Returns the largest change of the output at visible rows and the largest mass that a
    visible row puts on masked keys; both must be exactly 0.
    """
    qkv, masked, _ = _make_inputs(case, device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = q.shape[-1] ** -0.5
    out_a, stats = attention(q, k, v, masked, True, scale)
    v_changed = torch.where(masked[:, None, :, None], v + 5.0, v)
    out_b, _ = attention(q, k, v_changed, masked, True, scale)
    visible = ~masked[:, None, :]
    return {"visible_out_change": (out_a - out_b).abs().amax(-1)[visible.expand_as(out_a[..., 0])].max().item(),
            "visible_mass": stats["mass_on_masked"][visible.expand_as(out_a[..., 0])].abs().max().item()}


def assert_within_tolerance(errors, case, names, reference_factor=2.0, rtol_factor=1.0, stats_atol=STATS_ATOL):
    """Outputs and gradients: error <= reference_factor * the reference's own error in that dtype
    + rtol_factor * RTOL[dtype] * max|truth|; statistics: error <= stats_atol[dtype]."""
    dtype = DTYPES[case["dtype"]]
    for name in names:
        e = errors[name]
        if "/" in name or name == "out":
            bound = reference_factor * e["reference"] + rtol_factor * RTOL[dtype] * e["scale"]
        else:
            bound = stats_atol[dtype]
        assert e["tested"] <= bound, f"{name}: error {e['tested']:.3g} > bound {bound:.3g} ({e})"


FORWARD = TERMS
GRADIENTS = tuple(f"d{x}/{term}" for term in TERMS for x in "qkv")


FORWARD = TERMS
GRADIENTS = tuple(f"d{x}/{term}" for term in TERMS for x in "qkv")


