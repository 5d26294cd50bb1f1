"""The fused MTO attention kernel against the explicit reference (docs/MTO_KERNEL.md).

CPU: Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors. It must be
on before the kernels are defined, so the interpreted cases run in one child process (this
file run as a script) and the tests here assert on the errors it reports. The interpreter
cannot multiply bf16 (triton-lang/triton#11584), so its low-precision case is fp16; bf16 is
covered by the CUDA tests, which run the same comparisons at ViT shapes when a GPU is present.

Tolerances. Ground truth is the reference in fp32 on the same (rounded) inputs. For every
output and gradient: max|fused - truth| <= 2 * max|reference(dtype) - truth| + RTOL[dtype] *
max|truth|, i.e. the kernel may be at most twice as far from the truth as the reference
itself run in that dtype. Statistics are fp32 functions of exact logits in both paths, so they
must agree to STATS_ATOL.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention_cases import (CUDA_CASES, FORWARD, GRADIENTS, INTERPRETER_CASES, _make_inputs, _run,
                             assert_within_tolerance, compare_with_reference, visible_rows_under_changed_mask_token)
from mto_ds.mto.attention import attention_with_row_stats_by
from mto_ds.mto.fused_attention import fused_attention_with_row_stats, fused_path_applies, triton
from mto_ds.mto.stats import attention_with_row_stats

REPO_ROOT = Path(__file__).resolve().parents[1]


def fused_for(case):
    """The fused kernel with the case's tiles, in the reference's signature."""
    def fused(q, k, v, masked, recalibrate, scale):
        return fused_attention_with_row_stats(q, k, v, masked, recalibrate, scale, tiles=case.get("tiles"))
    return fused


# ---------------------------------------------------------------- CPU, Triton interpreter
@pytest.fixture(scope="module")
def interpreter_report():
    if triton is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--interpreter-report"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_name", INTERPRETER_CASES)
def test_interpreted_kernel_outputs_and_statistics_match_reference(interpreter_report, case_name):
    assert_within_tolerance(interpreter_report[case_name], INTERPRETER_CASES[case_name], FORWARD)


@pytest.mark.parametrize("case_name", INTERPRETER_CASES)
def test_interpreted_kernel_gradients_match_reference_for_each_loss_term(interpreter_report, case_name):
    assert_within_tolerance(interpreter_report[case_name], INTERPRETER_CASES[case_name], GRADIENTS)


def test_interpreted_kernel_visible_outputs_ignore_mask_token_values_when_recalibrated(interpreter_report):
    assert interpreter_report["invariance"] == {"visible_out_change": 0.0, "visible_mass": 0.0}


# ---------------------------------------------------------------- CPU, no kernel
def test_interpreted_kernel_compiles_into_one_graph_with_the_eager_results(interpreter_report):
    """train.compile: a block that calls the kernel stays one graph (no break) and computes the same."""
    assert interpreter_report["compiled_vs_eager"] == 0.0


def test_kernel_operators_pass_torch_library_opcheck(interpreter_report):
    """Fake shapes, schema and autograd registration of both custom operators, as torch checks them."""
    checks = interpreter_report["opcheck"]
    assert {name.split()[0] for name in checks} == {"forward", "backward"}
    assert checks and all(result == "SUCCESS" for result in checks.values()), checks


def test_dispatcher_takes_reference_path_on_cpu():
    qkv, masked, _ = _make_inputs(INTERPRETER_CASES["recalibrated_fp32"], "cpu")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not fused_path_applies(q, k, v, 0.0)
    out, stats = attention_with_row_stats_by("auto", q, k, v, masked, True, 0.25)
    ref_out, ref_stats = attention_with_row_stats(q, k, v, masked, True, 0.25)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(stats[name], ref_stats[name]) for name in ref_stats)


def test_module_imports_and_dispatches_to_reference_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from mto_ds.mto import fused_attention as fa\n"
        "from mto_ds.mto.attention import attention_with_row_stats_by\n"
        "from mto_ds.mto.stats import attention_with_row_stats\n"
        "q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0); m = torch.rand(1, 9) < 0.5\n"
        "out, st = attention_with_row_stats_by('auto', q, k, v, m, True, 0.3)\n"
        "ref, rst = attention_with_row_stats(q, k, v, m, True, 0.3)\n"
        "print(fa.triton is None, (out - ref).abs().max().item(),"
        " (st['norm_entropy'] - rst['norm_entropy']).abs().max().item())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["True", "0.0", "0.0"]


# ---------------------------------------------------------------- CPU, compiled for a GPU
def _compile_for_gpu(kernel, arch, dtype, constexprs, num_warps, num_stages):
    """triton.compile for a CUDA target without a device (PTX and cubin; nothing runs).

    Argument types follow the kernels' naming: MASKED int8, the [B, H, N] row tensors fp32,
    other upper-case names tensors of `dtype`, `scale` fp32, the rest int32. Pointers and
    strides are marked 16-divisible, as triton's launcher marks them for contiguous inputs.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name == "MASKED":
            signature[name] = "*i8"
        elif name in ("LSE", "MASS", "ENT", "DMASS", "DENT", "CONST"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
        if signature[name].startswith("*") or (name[0] == "s" and len(name) == 3):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def test_kernels_compile_for_sm90_with_tensor_core_products_at_vit_head_dim():
    from mto_ds.mto import fused_attention as fa
    if triton is None or fa._interpreted() or "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("needs triton with its NVIDIA backend, not interpreted")
    config = fa._launch_config(64, torch.bfloat16, None)
    tile = {name: config[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
    attention = dict(RECALIBRATE=True, DOT_PRECISION=None, **tile)
    kernels = {fa._row_stats_fwd_kernel: attention, fa._row_stats_bwd_dkdv_kernel: attention,
               fa._row_stats_bwd_dq_kernel: attention,
               fa._row_constant_kernel: dict(BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"])}
    for kernel, constexprs in kernels.items():
        compiled = _compile_for_gpu(kernel, 90, "bf16", constexprs, config["num_warps"], config["num_stages"])
        assert compiled.asm["cubin"], kernel.__name__
        if kernel is not fa._row_constant_kernel:
            assert "wgmma" in compiled.asm["ptx"], f"{kernel.__name__} does not use tensor cores on sm_90"


# ---------------------------------------------------------------- CUDA
cuda_only = pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                               reason="needs a CUDA device and triton")


@pytest.fixture
def exact_fp32_matmuls():
    """The fp32 truth must not be TF32-rounded, whatever the process set globally."""
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = saved


@cuda_only
@pytest.mark.parametrize("case_name", CUDA_CASES)
def test_cuda_kernel_outputs_statistics_and_gradients_match_reference_at_vit_shapes(case_name, exact_fp32_matmuls):
    case = CUDA_CASES[case_name]
    assert_within_tolerance(compare_with_reference(case, "cuda", fused_for(case)), case, FORWARD + GRADIENTS)


@cuda_only
def test_cuda_kernel_visible_outputs_ignore_mask_token_values_when_recalibrated():
    result = visible_rows_under_changed_mask_token(CUDA_CASES["vit_bf16_recalibrated"], "cuda",
                                                   fused_attention_with_row_stats)
    assert result == {"visible_out_change": 0.0, "visible_mass": 0.0}


@cuda_only
def test_cuda_kernel_compiled_by_inductor_inside_one_graph_matches_eager(exact_fp32_matmuls):
    assert compiled_against_eager(CUDA_CASES["vit_fp32_recalibrated"], "cuda", backend="inductor") <= 1e-5


@cuda_only
def test_dispatcher_takes_fused_kernel_on_cuda_only_without_dropout_and_for_supported_head_dims():
    q = torch.randn(2, 4, 197, 64, device="cuda", dtype=torch.bfloat16)
    assert fused_path_applies(q, q, q, 0.0)
    assert not fused_path_applies(q, q, q, 0.1)
    wide = torch.randn(2, 4, 197, 192, device="cuda", dtype=torch.bfloat16)
    assert not fused_path_applies(wide, wide, wide, 0.0)
    assert not fused_path_applies(q.cpu(), q.cpu(), q.cpu(), 0.0)


def compiled_against_eager(case, device, backend="aot_eager"):
    """Largest |compiled - eager| over outputs and gradients, with the fused kernel traced by
    torch.compile as part of one graph (fullgraph=True fails on a graph break)."""
    qkv, masked, cotangents = _make_inputs(case, device)
    fused = fused_for(case)
    torch._dynamo.reset()
    eager = _run(fused, qkv, masked, cotangents, case["recalibrate"])
    traced = _run(torch.compile(fused, backend=backend, fullgraph=True), qkv, masked, cotangents,
                  case["recalibrate"])
    return max((eager[name] - traced[name]).abs().max().item() for name in eager)


def custom_op_checks(case, device) -> dict:
    """torch.library.opcheck of the two operators (fake shapes, schema, autograd registration)."""
    from torch.library import opcheck
    from mto_ds.mto.fused_attention import _CONFIG_KEYS, _launch_config
    qkv, masked, _ = _make_inputs(case, device)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    config = _launch_config(q.shape[-1], q.dtype, case.get("tiles"))
    args = (q, k, v, masked.to(torch.int8), case["recalibrate"], q.shape[-1] ** -0.5,
            [config[key] for key in _CONFIG_KEYS])
    forward = opcheck(torch.ops.mto_ds.row_stats_attention.default, args)
    with torch.no_grad():  # the backward operator has no derivative of its own (no double backward)
        saved = torch.ops.mto_ds.row_stats_attention.default(*args)
        out, _, mass, entropy = saved
        backward = opcheck(torch.ops.mto_ds.row_stats_attention_backward.default,
                           (*(t.detach() for t in args[:4]), *saved, torch.randn_like(out), torch.randn_like(mass),
                            torch.randn_like(entropy), *args[4:]))
    return {f"forward {name}": result for name, result in forward.items()} | {
        f"backward {name}": result for name, result in backward.items()}


def _interpreter_report() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    report = {name: compare_with_reference(case, "cpu", fused_for(case)) for name, case in INTERPRETER_CASES.items()}
    report["invariance"] = visible_rows_under_changed_mask_token(INTERPRETER_CASES["recalibrated_fp32"], "cpu",
                                                                 fused_attention_with_row_stats)
    # Tracing and opcheck run the kernels many times over; interpreted, each run costs seconds, so
    # they take a smaller case that still spans three tiles each way, the last partial.
    small = dict(INTERPRETER_CASES["recalibrated_fp32"], shape=(1, 2, 40, 16), tiles=(16, 16))
    report["compiled_vs_eager"] = compiled_against_eager(small, "cpu")
    report["opcheck"] = custom_op_checks(small, "cpu")
    return report


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter-report"]:
    print(json.dumps(_interpreter_report()))
