"""Forward+backward time and peak memory of three attention paths (docs/MTO_KERNEL.md).

  sdpa       torch's scaled_dot_product_attention: no statistics, the floor to beat
  reference  mto_ds.mto.stats.attention_with_row_stats: explicit N x N attention + statistics
  fused      mto_ds.mto.fused_attention: Triton kernels, statistics without N x N storage
  sdpa-stats mto_ds.mto.sdpa_stats: the statistics as extra value columns of one SDPA call, on the
             backend PyTorch picks (on CUDA also forced: sdpa-stats-cudnn, sdpa-stats-efficient)
  sdpa-mass  the same with the mass on masked keys alone (late blocks off logging steps)
  sdpa-stats-padded, sdpa-mass-padded  the same two with q and k zero-padded to V''s width and
             recalibration carried in the padding (no mask), so flash attention may take them

On CUDA it times ViT-L-like shapes (default B=64, H=16, d=64, N=197 and 257, bf16, 60%
masked, with and without recalibration) and prints markdown table rows. Without CUDA it runs
one tiny shape once per path (the fused path under TRITON_INTERPRET=1, set here) to show the
tool works; those timings mean nothing.

  python tools/bench_attention.py [--batch 64] [--tokens 197 257] [--tiles 64x64x8 128x64x8 64x32]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from mto_ds.mto import fused_attention as fa  # noqa: E402
from mto_ds.mto.sdpa_stats import sdpa_attention_with_row_stats  # noqa: E402
from mto_ds.mto.stats import attention_with_row_stats  # noqa: E402

SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


PATHS = ["sdpa", "reference", "fused", "sdpa-stats", "sdpa-stats-cudnn", "sdpa-stats-efficient", "sdpa-mass",
         "sdpa-stats-padded", "sdpa-mass-padded"]


def tile(text: str) -> str:
    """An MxN[xW[xS]] tile, checked as it is parsed (a typo failed later with a traceback)."""
    parts = text.lower().split("x")
    if not 2 <= len(parts) <= 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers MxN[xW[xS]], e.g. 64x64x8")
    return text


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[197, 257])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiles", nargs="*", default=[], metavar="MxN[xW[xS]]", type=tile,
                   help="extra fused rows with these BLOCK_M x BLOCK_N tiles [x num_warps [x num_stages]], "
                        "e.g. 64x64x8 128x64x8x3")
    p.add_argument("--paths", nargs="*", default=PATHS, choices=PATHS,
                   help="which of the standard rows to run (the --tiles rows always run; the forced SDPA "
                        "backends only on CUDA)")
    return p.parse_args()


def make_inputs(batch, heads, tokens, head_dim, dtype, mask_ratio, device):
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    masked = torch.rand(batch, tokens, device=device) < mask_ratio
    masked[:, 0] = False  # CLS is visible
    return q, k, v, masked


def paths(tiles, selected):
    """name -> (q, k, v, masked, recalibrate, scale) -> tuple of differentiable outputs."""
    def sdpa(q, k, v, masked, recalibrate, scale):
        return (F.scaled_dot_product_attention(q, k, v, scale=scale),)

    def reference(q, k, v, masked, recalibrate, scale):
        out, stats = attention_with_row_stats(q, k, v, masked, recalibrate, scale)
        return out, stats["mass_on_masked"], stats["norm_entropy"]

    def fused_with(tile=None):
        def fused(q, k, v, masked, recalibrate, scale):
            out, stats = fa.fused_attention_with_row_stats(q, k, v, masked, recalibrate, scale, tiles=tile)
            return out, stats["mass_on_masked"], stats["norm_entropy"]
        return fused

    def sdpa_stats_with(entropy=True, equal_head_dims=False, backend=None):
        def sdpa_stats(q, k, v, masked, recalibrate, scale):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            forced = sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]) if backend else contextlib.nullcontext()
            with forced:  # the forward's choice of kernel also fixes the backward's
                out, stats = sdpa_attention_with_row_stats(q, k, v, masked, recalibrate, scale, entropy=entropy,
                                                           equal_head_dims=equal_head_dims)
            return (out, *stats.values())
        return sdpa_stats

    table = {"sdpa": sdpa, "reference": reference, "fused": fused_with(), "sdpa-stats": sdpa_stats_with(),
             "sdpa-mass": sdpa_stats_with(entropy=False),
             "sdpa-stats-padded": sdpa_stats_with(equal_head_dims=True),
             "sdpa-mass-padded": sdpa_stats_with(entropy=False, equal_head_dims=True)}
    if torch.cuda.is_available():
        table.update({f"sdpa-stats-{backend}": sdpa_stats_with(backend=backend) for backend in SDPA_BACKENDS})
    table = {name: fn for name, fn in table.items() if name in selected}
    for tile in tiles:
        table[f"fused {tile}"] = fused_with(tuple(int(x) for x in tile.lower().split("x")))
    return table


def step(fn, q, k, v, masked, recalibrate, scale):
    outputs = fn(q, k, v, masked, recalibrate, scale)
    grads = [torch.ones_like(o) for o in outputs]
    return torch.autograd.grad(outputs, (q, k, v), grads)


def time_cuda(fn, args, warmup, iters):
    """(ms per forward+backward, ms per forward alone, peak MiB allocated above the inputs)."""
    for _ in range(warmup):
        step(fn, *args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        start.record()
        for _ in range(iters):
            fn(*args)
        end.record()
    torch.cuda.synchronize()
    forward_ms = start.elapsed_time(end) / iters
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start.record()
    for _ in range(iters):
        step(fn, *args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, forward_ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    args = parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        shapes = [(args.batch, args.heads, n, args.head_dim) for n in args.tokens]
        device = f"{torch.cuda.get_device_name()}"
    else:
        shapes, dtype, device = [(1, 2, 21, 16)], torch.float32, "CPU (tiny smoke shape, interpreter)"
    print(f"<!-- {device}; dtype {dtype}; mask ratio {args.mask_ratio}; torch {torch.__version__} -->")
    print("| path | B | H | N | d | recalibrate | fwd+bwd ms | fwd ms | peak MiB | vs sdpa |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, heads, tokens, head_dim in shapes:
        torch.manual_seed(0)
        q, k, v, masked = make_inputs(batch, heads, tokens, head_dim, dtype, args.mask_ratio,
                                      "cuda" if on_cuda else "cpu")
        for recalibrate in (False, True):
            call = (q, k, v, masked, recalibrate, head_dim ** -0.5)
            sdpa_ms = None
            ref_out = None if on_cuda else attention_with_row_stats(*call)[0]
            for name, fn in paths(args.tiles, args.paths).items():
                shown = f"{recalibrate} (ignored)" if name == "sdpa" else recalibrate
                if name.startswith("fused") and fa.triton is None:
                    print(f"| {name} | {batch} | {heads} | {tokens} | {head_dim} | {shown} | "
                          "n/a (no triton) | | | |")
                    continue
                if on_cuda:
                    try:
                        ms, forward_ms, mib = time_cuda(fn, call, args.warmup, args.iters)
                    except RuntimeError as err:  # e.g. a forced SDPA backend that refuses these shapes
                        print(f"| {name} | {batch} | {heads} | {tokens} | {head_dim} | {shown} | "
                              f"failed: {str(err).splitlines()[0][:160]} | | | |", flush=True)
                        continue
                    sdpa_ms = ms if name == "sdpa" else sdpa_ms
                    ratio = f"{ms / sdpa_ms:.2f}x" if sdpa_ms else ""
                    print(f"| {name} | {batch} | {heads} | {tokens} | {head_dim} | {shown} | "
                          f"{ms:.3f} | {forward_ms:.3f} | {mib:.0f} | {ratio} |")
                else:
                    step(fn, *call)
                    diff = (fn(*call)[0] - ref_out).abs().max().item()
                    print(f"| {name} | {batch} | {heads} | {tokens} | {head_dim} | {shown} | "
                          f"ran (CPU smoke), max abs out diff vs reference {diff:.1e} | | | |")


if __name__ == "__main__":
    main()
