"""MTO's statistics from one PyTorch SDPA call (mto/sdpa_stats.py) against the explicit reference.

Tolerances (attention_cases.assert_within_tolerance): outputs and gradients at most 4 times as far
from the fp32 truth as the reference run in the same dtype, plus 2 * RTOL[dtype] * max|truth|;
statistics within SDPA_STATS_ATOL. Looser than the Triton kernel's: here the statistics leave the
kernel rounded to the inputs' dtype (bf16: 2^-8), and the entropy's gradient is formed from
logit-sized terms (s_ij - sum_k A_ik s_ik), whose rounding a difference of order 1 inherits
(docs/MTO_KERNEL.md). In fp32 every quantity matches the reference to float rounding. On SDPA's
fused kernels (CPU's flash kernel, and every GPU backend) 6 times, not 4: FUSED_KERNEL_TOLERANCE.
"""
from __future__ import annotations

import pytest
import torch

from attention_cases import (CUDA_CASES, DTYPES, FORWARD, GRADIENTS, INTERPRETER_CASES, assert_within_tolerance,
                             compare_with_reference, visible_rows_under_changed_mask_token)
from mto_ds.mto.attention import attention_with_row_stats_by
from mto_ds.mto.sdpa_stats import sdpa_attention_with_row_stats
from mto_ds.mto.stats import attention_with_row_stats

SDPA_STATS_ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 6e-3}
TOLERANCE = dict(reference_factor=4.0, rtol_factor=2.0, stats_atol=SDPA_STATS_ATOL)
# For SDPA's fused kernels (CPU's flash kernel; cuDNN, flash and memory-efficient on a GPU), which
# round the probabilities to the inputs' dtype before the PV product where the math backend does
# not: up to 4.7 times the reference's error was seen on CPU's flash kernel (an fp16 entropy gradient).
FUSED_KERNEL_TOLERANCE = dict(TOLERANCE, reference_factor=6.0)

# The interpreter's small cases, and at a ViT's shapes in bf16 (on CPU: SDPA's math backend).
CPU_CASES = dict(INTERPRETER_CASES)
CPU_CASES.update({name: CUDA_CASES[name] for name in (
    "vit_bf16_plain", "vit_bf16_recalibrated", "vit_bf16_recalibrated_only_cls_visible",
    "vit_h_bf16_recalibrated_head_dim_80", "mae_decoder_bf16_recalibrated_head_dim_32")})


@pytest.mark.parametrize("case_name", CPU_CASES)
def test_sdpa_statistics_outputs_and_gradients_match_reference(case_name):
    case = CPU_CASES[case_name]
    errors = compare_with_reference(case, "cpu", sdpa_attention_with_row_stats)
    assert_within_tolerance(errors, case, FORWARD + GRADIENTS, **TOLERANCE)
    if DTYPES[case["dtype"]] == torch.float32:  # the same function, only float rounding apart
        assert all(e["tested"] <= 1e-5 * max(e["scale"], 1.0) for e in errors.values()), errors


@pytest.mark.parametrize("case_name", [name for name in CPU_CASES if CPU_CASES[name]["recalibrate"]])
def test_padded_form_carries_recalibration_as_exactly_as_the_mask(case_name):
    """equal_head_dims puts recalibration into extra q/k columns (logit offsets) instead of a
    mask: against the reference, fp16 and bf16 included. With equal head dims CPU's SDPA takes its
    flash kernel, which rounds the probabilities to the inputs' dtype before the PV product (as GPU
    flash kernels do), where the unpadded call takes the math backend: the gradients may be up to
    6 times as far from the truth as the reference's own error (4.7 seen, an fp16 entropy
    gradient), not 4. Exactness in float64: test_zero_padded_queries_and_keys_change_no_value..."""
    case = CPU_CASES[case_name]

    def padded(*args):
        return sdpa_attention_with_row_stats(*args, equal_head_dims=True)
    errors = compare_with_reference(case, "cpu", padded)
    assert_within_tolerance(errors, case, FORWARD + GRADIENTS, **FUSED_KERNEL_TOLERANCE)


@pytest.mark.parametrize("equal_head_dims", [False, True])
def test_sdpa_path_visible_outputs_ignore_mask_token_values_when_recalibrated(equal_head_dims):
    def attention(*args):
        return sdpa_attention_with_row_stats(*args, equal_head_dims=equal_head_dims)
    result = visible_rows_under_changed_mask_token(INTERPRETER_CASES["recalibrated_fp32"], "cpu", attention)
    assert result == {"visible_out_change": 0.0, "visible_mass": 0.0}


def _offset_inputs(offset: float):
    """q, k whose logits share a per-row offset (`offset` added to every logit of a row, which the
    softmax ignores), so that the log-sum-exp of each row is about `offset` larger."""
    gen = torch.Generator().manual_seed(3)
    B, H, N, d = 2, 2, 33, 16
    q, k, v = (torch.randn(B, H, N, d, generator=gen) for _ in range(3))
    direction = torch.zeros(d)
    direction[0] = 1.0
    q = q + direction * offset ** 0.5 / d ** -0.25
    k = k * (1 - direction) + direction * offset ** 0.5 / d ** -0.25
    masked = torch.rand(B, N, generator=gen) < 0.5
    masked[:, 0] = False
    return q, k, v, masked


@pytest.mark.parametrize("recalibrate", [False, True])
def test_sdpa_entropy_is_exact_when_every_logit_of_a_row_is_shifted_far_up(recalibrate):
    """A row's log-sum-exp of 300 nats would underflow a sentinel key of logit 0 (e^-300 in
    float32); the sentinel at the row's mean logit keeps its probability near 1/(1 + n)."""
    q, k, v, masked = _offset_inputs(300.0)
    scale = q.shape[-1] ** -0.5
    logits = scale * q @ k.transpose(-2, -1)
    assert logits.logsumexp(-1).min() > 250  # the case this test is about
    out, stats = sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, scale)
    ref_out, ref_stats = attention_with_row_stats(q, k, v, masked, recalibrate, scale)
    assert (out - ref_out).abs().max() < 1e-4
    for name in ("mass_on_masked", "norm_entropy"):
        assert (stats[name] - ref_stats[name]).abs().max() < 1e-4, name


def test_sdpa_entropy_of_a_peaked_row_is_zero_not_negative_and_gradients_stay_finite():
    """One key 200 nats above the rest: the sentinel's probability underflows, the entropy's value
    is clamped at 0 (its true value is below e^-190) and the gradients stay finite."""
    q, k, v, masked = _offset_inputs(0.0)
    k = k.clone()
    k[:, :, 5] = q[:, :, 0] * 200.0 / (q[:, :, 0] * q[:, :, 0]).sum(-1, keepdim=True) * q.shape[-1] ** 0.5
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, stats = sdpa_attention_with_row_stats(q, k, v, masked, False, q.shape[-1] ** -0.5)
    entropy = stats["norm_entropy"][:, :, 0]
    assert entropy.min() >= 0.0 and entropy.max() < 1e-3
    (out.sum() + stats["norm_entropy"].sum() + stats["mass_on_masked"].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("recalibrate", [False, True])
def test_sdpa_entropy_gradient_where_the_sentinel_underflows_is_the_references(recalibrate):
    """Two peaks 1 nat apart, about 120 above the rest, in fp32: the sentinel's probability
    underflows and the entropy's value is clamped at 0 (section 2b), but its gradient must stay
    that of -S_i, the reference's (a plain clamp would cut these rows' gradient to 0)."""
    generator = torch.Generator().manual_seed(8)
    B, H, N, d = 2, 2, 33, 16
    q = torch.zeros(B, H, N, d)
    q[..., 0] = 1.0
    k, v = (0.01 * torch.randn(B, H, N, d, generator=generator) for _ in range(2))
    k[:, :, 3, 0], k[:, :, 4, 0] = 120.0, 119.0
    masked = torch.rand(B, N, generator=generator) < 0.5
    masked[:, :5] = False
    grads = []
    for attention in (sdpa_attention_with_row_stats, attention_with_row_stats):
        keys = k.clone().requires_grad_()
        _, stats = attention(q, keys, v, masked, recalibrate, 1.0)
        (grad,) = torch.autograd.grad(stats["norm_entropy"][:, :, :5].sum(), keys)
        grads.append(grad)
    assert grads[1].abs().max() > 0.05
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-3)


def test_dispatcher_names_the_kernel_it_cannot_serve_and_sends_dropout_to_the_reference():
    q, k, v = torch.randn(3, 2, 2, 9, 8).unbind(0)
    masked = torch.rand(2, 9) < 0.5
    with pytest.raises(ValueError, match="mto.kernel=fused"):
        attention_with_row_stats_by("fused", q, k, v, masked, True, 0.3)
    with pytest.raises(ValueError, match="unknown MTO statistics kernel 'triton'"):
        attention_with_row_stats_by("triton", q, k, v, masked, True, 0.3)
    _, stats = attention_with_row_stats_by("sdpa", q, k, v, masked, True, 0.3, dropout_p=0.5)
    _, ref_stats = attention_with_row_stats(q, k, v, masked, True, 0.3)
    assert all(torch.equal(stats[name], ref_stats[name]) for name in ref_stats)


@pytest.mark.parametrize("with_stats", [True, False])  # False: late blocks compute the mass alone
@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_model_with_sdpa_statistics_gives_the_reference_losses_and_gradients(method, with_stats):
    import numpy as np
    from mto_ds.models import create_mim_model, mask_fn_for
    results = {}
    for kernel in ("reference", "sdpa"):
        torch.manual_seed(0)
        model = create_mim_model("vit_tiny_patch16", method, img_size=32, mto={"kernel": kernel})
        mask = torch.from_numpy(np.stack([mask_fn_for(model, method, 32)(np.random.default_rng(i))
                                          for i in range(3)]))
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out = model(images, mask, with_stats=with_stats)
        out["loss"].backward()
        results[kernel] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref, ref_grads), (new, new_grads) = results["reference"], results["sdpa"]
    for key in ("loss", "loss_mto", "loss_spa", "loss_e", "loss_r", "heterogeneity", "entropy_masked"):
        assert torch.allclose(new[key], ref[key], atol=1e-5, equal_nan=True), key
    late_entropy = new["entropy_masked"][-2:]
    assert torch.isfinite(late_entropy).all() if with_stats else torch.isnan(late_entropy).all()
    assert ref_grads.keys() == new_grads.keys() and "mask_token" in new_grads
    for name, grad in ref_grads.items():
        assert torch.allclose(new_grads[name], grad, atol=1e-5, rtol=1e-4), name


# ---------------------------------------------------------------- CUDA
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("case_name", [name for name in CUDA_CASES if "fp32" not in name])
def test_cuda_sdpa_statistics_match_reference_on_a_fused_sdpa_backend(case_name):
    """On a GPU the call must take one of SDPA's fused kernels (cuDNN or memory-efficient), not the
    math backend that materialises N x N; the values as on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    case = CUDA_CASES[case_name]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        errors = compare_with_reference(case, "cuda", sdpa_attention_with_row_stats)
    assert_within_tolerance(errors, case, FORWARD + GRADIENTS, **FUSED_KERNEL_TOLERANCE)


def test_sdpa_statistics_trace_into_one_graph_with_the_eager_results():
    """train.compile: a block on this path compiles without a graph break (fullgraph) and
    computes what eager computes, values and gradients."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 33, 16, generator=gen, requires_grad=True) for _ in range(3))
    masked = torch.rand(2, 33, generator=gen) < 0.5
    masked[:, 0] = False
    torch._dynamo.reset()
    compiled = torch.compile(sdpa_attention_with_row_stats, backend="aot_eager", fullgraph=True)
    for recalibrate in (False, True):
        results = []
        for fn in (sdpa_attention_with_row_stats, compiled):
            out, stats = fn(q, k, v, masked, recalibrate, 0.25)
            total = out.sum() + stats["norm_entropy"].sum() + stats["mass_on_masked"].sum()
            results.append([out, stats["norm_entropy"], stats["mass_on_masked"],
                            *torch.autograd.grad(total, (q, k, v))])
        assert all(torch.equal(a, b) for a, b in zip(*results)), recalibrate


@pytest.mark.parametrize("kernel", ["reference", "sdpa"])
@pytest.mark.parametrize("recalibrate", [False, True])
def test_mass_alone_equals_the_full_statistics_mass_with_its_gradients(kernel, recalibrate):
    """A late block off a logging step asks for the mass only (L_r reads nothing else): the same
    output and mass, the same gradients, and no entropy."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 29, 16, generator=gen) for _ in range(3))
    masked = torch.rand(2, 29, generator=gen) < 0.5
    masked[:, 0] = False
    weights = torch.randn(2, 3, 29, generator=gen)
    results = []
    for entropy in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, stats = attention_with_row_stats_by(kernel, *leaves, masked, recalibrate, 0.25, entropy=entropy)
        assert ("norm_entropy" in stats) == entropy
        grads = torch.autograd.grad(out.sum() + (stats["mass_on_masked"] * weights).sum(), leaves)
        results.append([out, stats["mass_on_masked"], *grads])
    for full, alone in zip(*results):
        torch.testing.assert_close(alone, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("recalibrate", [False, True])
def test_zero_padded_queries_and_keys_change_no_value_and_no_gradient(entropy, recalibrate):
    """equal_head_dims pads q and k with zeros to V''s width (so flash attention may take the
    call): the logits, and so every output and gradient, stay those of the unpadded call."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 31, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    masked = torch.rand(2, 31, generator=gen) < 0.5
    masked[:, 0] = False
    weights = torch.randn(2, 3, 31, generator=gen, dtype=torch.float64)
    results = []
    for equal_head_dims in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, stats = sdpa_attention_with_row_stats(*leaves, masked, recalibrate, 0.25, entropy=entropy,
                                                   equal_head_dims=equal_head_dims)
        total = out.square().sum() + sum((stat * weights).sum() for stat in stats.values())
        results.append([out, *stats.values(), *torch.autograd.grad(total, leaves)])
    assert len(results[0]) == (6 if entropy else 5)
    for unpadded, padded in zip(*results):
        torch.testing.assert_close(padded, unpadded, atol=1e-10, rtol=1e-10)


@cuda_only
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("recalibrate", [False, True])
def test_cuda_padded_statistics_run_on_flash_attention(entropy, recalibrate):
    """The padded call (recalibration in the padding, no mask) must be one that flash attention
    accepts, and give what the default call gives on its own backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(4, 4, 197, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    masked = (torch.rand(4, 197, generator=gen) < 0.6).cuda()
    masked[:, 0] = False
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out, stats = sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, 0.125, entropy,
                                                   equal_head_dims=True)
    ref_out, ref_stats = sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, 0.125, entropy)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], atol=SDPA_STATS_ATOL[torch.bfloat16], rtol=0)


@cuda_only
def test_cuda_auto_takes_the_sdpa_path_where_the_fused_kernel_does_not_apply():
    """Head dim 192 is beyond the Triton kernel: auto must not fall back to the N x N reference."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 65, 192, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    masked = (torch.rand(2, 65, generator=gen) < 0.5).cuda()
    masked[:, 0] = False
    out, stats = attention_with_row_stats_by("auto", q, k, v, masked, True, 0.1)
    sdpa_out, sdpa_stats = sdpa_attention_with_row_stats(q, k, v, masked, True, 0.1)
    assert torch.equal(out, sdpa_out) and torch.equal(stats["norm_entropy"], sdpa_stats["norm_entropy"])


def _two_peaks(gap: float, dtype):
    """Rows whose two largest logits (equal) stand `gap` above the others: entropy log 2 in nats."""
    gen = torch.Generator().manual_seed(8)
    B, H, N, d = 2, 2, 33, 16
    q = torch.zeros(B, H, N, d)
    q[..., 0] = 1.0
    k, v = (0.01 * torch.randn(B, H, N, d, generator=gen) for _ in range(2))
    k[:, :, 3:5, 0] = gap
    masked = torch.rand(B, N, generator=gen) < 0.5
    masked[:, :5] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), masked


@pytest.mark.parametrize("recalibrate", [False, True])
def test_sdpa_fp16_entropy_where_the_sentinel_underflows_is_a_lower_bound_not_70_nats_too_high(recalibrate):
    """fp16's smallest positive value is 2^-24: the sentinel's probability rounds to 0 once a row's
    largest logit stands about 17 above its mean. Clamped at float32's tiny (2^-126) the log-sum-exp
    then came out 70 nats too high (normalised entropy 23 where the truth is 0.2); clamped at fp16's
    smallest value it is a lower bound, so the entropy lies in [0, the truth]."""
    q, k, v, masked = _two_peaks(25.0, torch.float16)
    _, stats = sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, 1.0)
    _, ref_stats = attention_with_row_stats(q, k, v, masked, recalibrate, 1.0)
    entropy, truth = stats["norm_entropy"][:, :, :5], ref_stats["norm_entropy"][:, :, :5]
    assert truth.min() > 0.15  # log 2 / log 33: the rows this test is about
    assert entropy.min() >= 0.0 and (entropy - truth).max() <= 1e-3, (entropy, truth)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recalibrate", [False, True])
def test_sdpa_low_precision_entropy_does_not_degrade_with_a_common_logit_offset(dtype, recalibrate):
    """Keys sharing a component (a mean key) add the same offset to every logit of a row, which the
    softmax ignores. The entropy must ignore it too: computed as lse_i - sum_j A_ij s_ij, two numbers of
    the offset's size of which the second came from keys rounded to bf16, it lost 2^-9 of the offset
    (normalised entropy off by 0.03 at an offset of 30 nats, 0.4 at 300). With keys centred on their
    mean in V' the error is that of a row without offset."""
    errors = {}
    for offset in (0.0, 30.0, 300.0):
        q, k, v, masked = (t.to(dtype) if t.is_floating_point() else t for t in _offset_inputs(offset))
        _, stats = sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, q.shape[-1] ** -0.5)
        _, ref_stats = attention_with_row_stats(q, k, v, masked, recalibrate, q.shape[-1] ** -0.5)
        errors[offset] = (stats["norm_entropy"] - ref_stats["norm_entropy"]).abs().max().item()
    assert max(errors.values()) <= SDPA_STATS_ATOL[dtype], errors
