#!/usr/bin/env python
"""Train-step benchmark: images/s, TFLOP/s, MFU, peak memory and data wait, side by side with
plain baselines in the same run: the same timm ViT (SDPA, no DeepSpeed, no MTO), and with MAE rows
the same MAE model in plain PyTorch (bf16 autocast, fused AdamW, no DeepSpeed, no MTO).

    python tools/bench_step.py --arch vit_large_patch16 --method simmim mae --mto on off \\
        --zero 2 3 --batch 128 --steps 20             # on a GPU (bf16)
    python tools/bench_step.py --tiny                 # on CPU: vit_tiny at 64 px, fp32, a few steps
    python tools/bench_step.py --arch vit_large_patch16 --width 64 --bf16 --img 32 --batch 2 --data none
                                                      # the host floor: ViT-L's blocks at width 64 (any device)

MFU is achieved FLOP/s over the bf16 matmul peak this tool measures on the same device in the
same run (an 8192^3 matmul on GPU); FLOPs per step are counted by torch's FlopCounterMode.
"""
from __future__ import annotations

import argparse
import gc
from functools import lru_cache
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from mto_ds.engine.profiling import write_profile  # noqa: E402


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of 3 windows of back-to-back n^3 matmuls (about 0.15 s each on an H100: long enough
    that the clock settles where a sustained step runs it, not at a short burst's boost). On a
    CPU, whose figure only exercises the tool, small: a CPU without bf16 kernels (AVX2) computes
    bf16 at about 1 GFLOP/s, where 1024^3 matmuls took a minute."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(10 if cuda else 2):
        a @ b
    _sync(device)
    reps = 100 if cuda else 3
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Attention's two matmuls, Q K^T and P V, at 2 FLOPs a multiply-add."""
    b, h, s_q, d_q = query_shape
    return 2 * b * h * s_q * key_shape[-2] * (d_q + value_shape[-1])


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """The backward's four matmuls (the gradients of P, V, Q and K): twice the forward. Flash-style
    kernels also recompute Q K^T, which torch's own formula counts; recomputation is not model work."""
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


def _attention_formulas() -> dict:
    """FlopCounterMode formulas that count every SDPA kernel as model FLOPs: the CPU kernels too
    (torch counts only the CUDA ones, so a CPU count left attention out) and each backward as four
    matmuls, so that the count is the hand count on any device."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
            **{op: _attention_backward_flops for op in (
                aten._scaled_dot_product_flash_attention_for_cpu_backward,
                aten._scaled_dot_product_flash_attention_backward,
                aten._scaled_dot_product_efficient_attention_backward,
                aten._scaled_dot_product_cudnn_attention_backward)}}


def step_flops(fn) -> float:
    """FLOPs of `fn` (matmuls, convolutions, attention; a multiply-add counts 2), as torch's
    FlopCounterMode counts them, attention as `_attention_formulas` says."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter:
        fn()
    return counter.get_total_flops()


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def profile_steps(step, device, steps, trace_path) -> float:
    """Run `steps` steps under torch.profiler, write a Chrome trace (.json.gz) and the top ops
    by own time (.ops.txt), and return the GPU's busy share over them (nan on CPU)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    return write_profile(prof, device, trace_path)


# Ops that launch no device work: views and metadata, allocations, the profiler's own markers.
_NO_LAUNCH = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "lift_fresh", "set_", "_record_function_enter_new", "_record_function_exit"}


def count_launches(step) -> dict:
    """Ops one `step` dispatches to the device (ATen and custom operators after autograd, views and
    allocations left out): a count of kernel launches the host must issue, which bounds a step
    from below where the host, not the GPU, is the limit. By phase: `forward` (until the first
    backward op), `backward` (inside the autograd engine: the model's gradient kernels and
    DeepSpeed's gradient hooks, activation recomputation too), `after` (after the backward: the
    gradient reduction and the optimizer step); `syncs` counts reads of a device value to the host
    (`.item()` and the like), each of which waits for the device to drain. Not with torch.compile:
    compiled kernels are not ATen calls, and a dispatch mode would change what dynamo compiles."""
    from torch.utils._python_dispatch import TorchDispatchMode
    counts = {"forward": 0, "backward": 0, "after": 0, "syncs": 0}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                counts["syncs"] += 1
            elif not func.is_view and name not in _NO_LAUNCH:
                if torch._C._current_graph_task_id() != -1:
                    counts["backward"] += 1
                else:
                    counts["after" if counts["backward"] else "forward"] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return counts


def narrowed(width):
    """Keyword arguments of create_mim_model for `--width`: the arch's depth and parameter tensors
    (every block, the MAE decoder's too) at `width` channels in one head; {} for the arch as it is.
    At width 64 the device does almost no work, so a step takes what the host needs to issue it:
    Python, dispatch, kernel launches and syncs (the host floor of a step)."""
    if width is None:
        return {}
    return {"encoder_overrides": {"embed_dim": width, "num_heads": 1},
            "decoder_embed_dim": width, "decoder_num_heads": 1}


@lru_cache(maxsize=None)
def model_flops_per_image(arch, method, img, device, width=None) -> float:
    """FLOPs of one forward + backward of the architecture, MFU's "model FLOPs": counted on the
    MTO-off model without activation checkpointing, so neither MTO's statistics nor recomputation
    count as useful work (MTO on and off rows share it; the fused kernel's FLOPs are invisible to
    the counter anyway). Counted once on 2 images, per image: FLOPs are linear in the batch.
    Equal to the hand count: 2 FLOPs a multiply-add, a backward twice its forward, less the
    patch embedding's gradient with respect to the images (tests/test_perf_tools.py)."""
    from mto_ds.models import create_mim_model
    model = create_mim_model(arch, method, img_size=img, **narrowed(width)).to(device)
    images, mask = _inputs(model, method, 2, img, device, torch.float32)
    return step_flops(lambda: model(images, mask, with_stats=False)["loss"].backward()) / 2


def _inputs(model, method, batch, img, device, dtype):
    import numpy as np
    from mto_ds.models import mask_fn_for
    fn = mask_fn_for(model, method, img)
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(batch)])).to(device)
    return torch.randn(batch, 3, img, img, device=device, dtype=dtype), mask


def _allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


WINDOWS = 3  # timed windows per row; the row reports their median


def _time(step, device, warmup, steps, base_bytes, windows=WINDOWS):
    """Seconds per step (the median of `windows` timed windows of `steps` steps, and the spread
    (max - min) / median between them), after `warmup` untimed steps; and peak GiB allocated
    above `base_bytes` (what this configuration holds at its peak, not what earlier rows left)
    and reserved by the caching allocator (what the process takes from the GPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_step = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        per_step.append((time.perf_counter() - t) / steps)
    sec = sorted(per_step)[len(per_step) // 2]
    spread = (max(per_step) - min(per_step)) / sec
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_bytes) / 2 ** 30
        reserved = torch.cuda.max_memory_reserved() / 2 ** 30
    else:
        peak = reserved = float("nan")
    return sec, spread, peak, reserved


def bench_baseline(arch, img, batch, device, dtype, compiled, width=None):
    """timm ViT classifier-free forward + backward with SDPA and a fused AdamW, no DeepSpeed."""
    import timm
    from mto_ds.models import TIMM_NAMES
    base = _allocated(device)
    model = timm.create_model(TIMM_NAMES[arch], num_classes=0, img_size=img,
                              **narrowed(width).get("encoder_overrides", {})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # one kernel, on CPU too
    x = torch.randn(batch, 3, img, img, device=device)
    step = _plain_step(lambda: model.forward_features(x).float().pow(2).mean(), opt, device, dtype)
    # Counted before compiling: dynamo does not compile a frame first called under a dispatch
    # mode such as FlopCounterMode, and would leave the "compiled" baseline eager for good.
    flops = step_flops(step)
    if compiled:
        for block in model.blocks:
            block.compile()  # block by block, as train.compile does
    return step, flops, base, lambda: None


def bench_plain_mae(arch, img, batch, device, dtype, compiled, width=None):
    """MAE's plain twin: the project's MAE model with MTO off, trained as facebookresearch/mae's
    loop does (autocast, AdamW; here bf16 and fused), no DeepSpeed. Set against the MAE engine
    rows, it tells what DeepSpeed's step adds from what the model's own shapes allow."""
    from mto_ds.engine.builder import param_groups
    from mto_ds.models import create_mim_model
    flops = model_flops_per_image(arch, "mae", img, device, width) * batch
    base = _allocated(device)
    model = create_mim_model(arch, "mae", img_size=img, compile_blocks=compiled, **narrowed(width)).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=True)
    images, mask = _inputs(model, "mae", batch, img, device, torch.float32)
    step = _plain_step(lambda: model(images, mask, with_stats=False)["loss"], opt, device, dtype)
    return step, flops, base, lambda: None


def _plain_step(loss_fn, opt, device, dtype):
    """A plain PyTorch training step, as the reference repositories write it: the loss under
    autocast (off in float32), backward, optimizer step, gradients set to None."""
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def set_key(config: dict, assignment: str) -> None:
    """Apply one --ds-set KEY=VALUE (dotted KEY, JSON VALUE) to a DeepSpeed config dict."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--ds-set expects KEY=VALUE, got {assignment!r}")
    *parents, leaf = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
        if not isinstance(config, dict):
            raise ValueError(f"--ds-set {assignment!r}: {part!r} is not a section")
    try:
        config[leaf] = json.loads(value)
    except json.JSONDecodeError:
        config[leaf] = value


def engine_ds_config(method: str, zero: int, batch: int, bf16: bool, ds_set=()) -> dict:
    """The DeepSpeed config of an engine row: the shipped file of this stage (the bf16 one for a
    bf16 row: every GPU row, and CPU's with --bf16; else the fp32 gloo one), one micro-batch per step, clipping as the recipes in configs/ have it
    (SimMIM 5.0, MAE none), the --ds-set overrides (what a user's JSON would change), then the
    trainer's own adjustments, which read them (fp32 gradient accumulation under ZeRO-1 bf16 keeps
    DeepSpeed's gradient norm, which its BF16 optimizer needs)."""
    from mto_ds.engine.builder import skip_unread_grad_norm
    name = f"zero{zero}_bf16.json" if bf16 else f"cpu_zero{zero}.json"
    ds = json.loads((REPO / "ds_configs" / name).read_text())
    ds.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1,
              gradient_clipping=5.0 if method == "simmim" else 0.0)
    ds["optimizer"]["params"]["lr"] = 1e-4
    for assignment in ds_set:
        set_key(ds, assignment)
    skip_unread_grad_norm(ds)  # as the trainer builds it from the user's JSON (engine/builder.py)
    return ds


def bench_engine(arch, method, mto, zero, img, batch, device, dtype, ckpt, compiled, ds_set=(), kernel="auto",
                 width=None):
    """The project's path: create_mim_model + deepspeed.initialize + the real train_step;
    `kernel` is mto.kernel, the implementation of MTO's statistics."""
    import deepspeed
    from mto_ds.engine.builder import mark_zero3_leaf_blocks, param_groups
    from mto_ds.engine.step import train_step
    from mto_ds.models import create_mim_model
    flops = model_flops_per_image(arch, method, img, device, width) * batch
    base = _allocated(device)
    model = create_mim_model(arch, method, img_size=img, mto={"enabled": mto, "kernel": kernel},
                             activation_checkpointing=bool(ckpt), checkpoint_every=ckpt or 1, compile_blocks=compiled,
                             **narrowed(width))
    ds = engine_ds_config(method, zero, batch, dtype == torch.bfloat16, ds_set)
    mark_zero3_leaf_blocks(model, ds)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05), config=ds)
    images, mask = _inputs(model, method, batch, img, device, torch.float32)
    images = (images * 40 + 120).clamp(0, 255).to(torch.uint8)
    micro = [{"images": images, "mask": mask, "index": torch.arange(batch)}]

    def step():
        train_step(engine, micro, 1.0, False, batch)
        # The trainer's per-step agreement on a stop signal (free on one rank); here it ends the run.
        stop_if_signalled(device)
    # DeepSpeed's hooks keep an engine alive after its last use; destroy() lets ZeRO-1/2 engines
    # go (a ZeRO-3 engine still stays: give ZeRO-3 rows a process of their own).
    return step, flops, base, engine.destroy


@lru_cache(maxsize=None)
def stop_request():
    """The trainer's handler of SIGTERM and SIGUSR1 (mto_ds.engine.signals), one per process and
    installed before the first row, so that a signal between rows is not lost. It only sets a flag:
    stop_if_signalled acts on it, or `timeout`'s SIGTERM (BENCH_TIMEOUT) would not end the run."""
    from mto_ds.engine.signals import StopRequest
    return StopRequest()


def stop_if_signalled(device=None) -> None:
    """End the run (exit status 1) once a stop signal came; the rows finished are in --json."""
    stop = stop_request()
    if stop.agreed(device):
        raise SystemExit(f"bench_step: stopped by {stop.signal_name}; the rows finished before it are kept")


def data_wait_share(source, path, method, arch, img, batch, workers, step_sec, steps) -> float:
    """Share of a step spent blocked on the loader when each step takes `step_sec`: the loader
    runs while a sleep stands in for the step. `source` as data.source (synthetic renders its
    images in the workers; ffcv decodes the .beton at `path`). The first batches, which the
    workers prefetch while the loader starts, are not timed: the share is the steady state."""
    import itertools
    from types import SimpleNamespace
    from mto_ds.data import build_pretrain_loader
    from mto_ds.models.masking import build_mask_fn
    prefetch = 2 * workers  # torch's and FFCV's default: 2 batches in flight per worker
    cfg = SimpleNamespace(source=source, path=path, synthetic_images=batch * (prefetch + steps + 2),
                          synthetic_classes=10, crop_scale_min=None, crop_scale_max=1.0, num_workers=workers,
                          order="exact", os_cache=True)
    loader = build_pretrain_loader(cfg, method=method, img_size=img, seed=0, global_batch_size=batch,
                                   micro_batch_size=batch, rank=0, world_size=1,
                                   mask_fn=build_mask_fn(method, img, int(arch.rsplit("patch", 1)[1])))
    stream = itertools.chain.from_iterable(loader.micro_batches(epoch) for epoch in itertools.count())
    waited = 0.0
    for i in range(prefetch + 1 + steps):
        t = time.perf_counter()
        next(stream)
        if i > prefetch:
            waited += time.perf_counter() - t
        time.sleep(step_sec)  # stands in for the step, during which the workers decode ahead
    return waited / (waited + step_sec * steps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The config's names, not mto_ds.models' (which imports timm, seconds that --help and
    # --dry-run need not wait for).
    from mto_ds.config import ARCHS, METHODS
    p.add_argument("--arch", default="vit_large_patch16", choices=sorted(ARCHS))
    p.add_argument("--method", nargs="+", default=["simmim", "mae"], choices=METHODS)
    p.add_argument("--mto", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--zero", nargs="+", type=int, default=[2], choices=[1, 2, 3])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mto-kernel", nargs="+", default=["auto"], choices=["auto", "fused", "sdpa", "reference"],
                   help="mto.kernel of the MTO-on rows, one row each (auto: the fused Triton kernel on CUDA)")
    p.add_argument("--activation-checkpointing", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="recompute the blocks in the backward pass (train.activation_checkpointing); with K, "
                        "every K-th block of each stack only (train.checkpoint_every=K)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block (train.compile), baseline too; not with ZeRO-3")
    p.add_argument("--profile", metavar="DIR",
                   help="profile 3 more steps per row: a Chrome trace and an op table each in DIR, "
                        "and the GPU-busy column")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: vit_tiny, 64 px, batch 8, fp32, 2 steps")
    p.add_argument("--width", type=int, metavar="W",
                   help="the arch's depth and parameter tensors at W channels in one head (64: the device does "
                        "almost no work, and the step time is the host's floor: Python, dispatch, launches, syncs)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 on CPU too (a GPU always runs bf16): the engine rows then take the GPU's "
                        "ds_configs/zero*_bf16.json, as DeepSpeed's CPU accelerator runs bf16")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers per GPU")
    p.add_argument("--data", choices=["synthetic", "folder", "ffcv", "none"], default="synthetic",
                   help="the data-wait column's source (synthetic renders images in Python: slower than "
                        "FFCV's JPEG decoding, so its wait is an upper bound); none: not measured")
    p.add_argument("--data-path", help="the ImageFolder or .beton for --data folder/ffcv")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain baseline rows (timm; MAE's with --method mae)")
    p.add_argument("--json", help="also write the rows here (rewritten after every row)")
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the shipped DeepSpeed config in the engine rows, e.g. "
                        "zero_optimization.overlap_comm=false (dotted key, JSON value; repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the rows and check each engine row's DeepSpeed config (the GPU's bf16 file and "
                        "--ds-set) with DeepSpeed's own validation; builds no model and needs no GPU")
    args = p.parse_args()
    if args.tiny:
        args.arch, args.img, args.batch, args.steps, args.warmup = "vit_tiny_patch16", 64, 8, 2, 1
    if args.width is not None and args.width < 1:
        p.error(f"--width must be a positive number of channels, got {args.width}")
    for flag, value in (("--img", args.img), ("--batch", args.batch), ("--steps", args.steps)):
        if value < 1:
            p.error(f"{flag} must be a positive integer, got {value}")
    if args.warmup < 0 or args.workers < 0 or args.activation_checkpointing < 0:
        p.error(f"--warmup, --workers and --activation-checkpointing must be >= 0, got {args.warmup}, "
                f"{args.workers} and {args.activation_checkpointing}")
    # Before any row (and in --dry-run, the check made before a GPU lease): a file that cannot be
    # written was found after the first row's minutes, and ended the run there.
    from mto_ds.cli import unwritable_output
    for flag, out in (("--json", args.json), ("--profile", args.profile and Path(args.profile) / "x")):
        problem = out and unwritable_output(out)
        if problem:
            p.error(f"{flag}: {problem}")
    if args.data in ("folder", "ffcv") and not args.data_path:
        p.error(f"--data {args.data} needs --data-path")
    for assignment in args.ds_set:
        try:
            set_key({}, assignment)  # the syntax, before any row is built
        except ValueError as err:
            p.error(str(err))
    if args.dry_run:
        return dry_run(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mto_ds.engine.distributed import init_distributed
    init_distributed()
    stop_request()
    dtype = torch.bfloat16 if device.type == "cuda" or args.bf16 else torch.float32
    peak = matmul_peak_tflops(device, dtype)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {device_name}, "
          f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul peak measured {peak:.1f} TFLOP/s", flush=True)
    rows = []
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    def run(name, bench, *bench_args):
        """One row. A configuration that fails (out of memory, or any error) says so in its row,
        and the others still run."""
        release = None
        try:
            step, flops, base, release = bench(*bench_args)
            frames_before = _compiled_frames()
            sec, spread, mem, reserved = _time(step, device, args.warmup, args.steps, base)
            launches, counted = None, True
            if not args.compile:
                try:
                    launches = count_launches(step)
                except Exception as err:  # noqa: BLE001 - the row's timing stands without its counts
                    print(f"| {name} | launch count failed: {type(err).__name__}: {err} |", flush=True)
                    counted = False  # a step stopped part-way: no more steps on this engine
            busy = float("nan")
            if args.profile and counted:
                busy = profile_steps(step, device, 3, Path(args.profile) / f"{slug(name)}.trace.json.gz")
            if args.compile and _compiled_frames() == frames_before == 0:
                print(f"| {name} | warning: torch.compile compiled no frame; this row ran eager |", flush=True)
            add(name, sec, spread, mem, reserved, flops, busy, launches)
        except Exception as err:  # noqa: BLE001 - one row's failure is that row's result
            kind = "out of GPU memory" if isinstance(err, torch.cuda.OutOfMemoryError) else type(err).__name__
            print(f"| {name} | {kind}: {str(err).splitlines()[0] if str(err) else ''} |", flush=True)
            rows.append({"config": name, "error": f"{kind}: {err}"[:2000]})
        finally:
            if release is not None:
                release()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_json()

    def add(name, sec, spread, mem, reserved, flops, busy, launches):
        tflops = flops / sec / 1e12
        wait = float("nan")
        if args.data != "none":
            wait = data_wait_share(args.data, args.data_path, method_of(name), args.arch, args.img, args.batch,
                                   args.workers, sec, 10)
        rows.append({"config": name, "images_per_sec": args.batch / sec, "step_ms": sec * 1e3,
                     "window_spread": spread, "tflops": tflops, "mfu": tflops / peak, "peak_mem_gib": mem,
                     "reserved_gib": reserved, "data_wait": wait, "gpu_busy": busy, "launches": launches})
        r = rows[-1]
        counted = ("-" if launches is None else
                   "{forward} / {backward} / {after} ({syncs})".format(**launches))
        print(f"| {name} | {r['images_per_sec']:.1f} | {r['step_ms']:.1f} ({100 * spread:.1f}%) | {r['tflops']:.2f} | "
              f"{100 * r['mfu']:.1f}% | {mem:.1f} / {reserved:.1f} | {100 * wait:.1f}% | {100 * busy:.1f}% | "
              f"{counted} |", flush=True)

    def write_json():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"device": device_name, "peak_tflops": peak, "argv": sys.argv[1:], "rows": rows,
                           "comparisons": compare(rows)}, f, indent=1)

    def method_of(name):
        return "mae" if name.startswith(("mae", "baseline MAE")) else "simmim"

    print(f"| config | images/s | step ms (spread of {WINDOWS} windows) | TFLOP/s | MFU | peak GiB allocated / reserved | "
          f"data wait ({args.data}, {args.workers} workers) | GPU busy | launches forward / backward / after (syncs) |"
          f"\n|---|---|---|---|---|---|---|---|---|")
    for name, kind, what in planned_rows(args):
        stop_if_signalled()
        if kind == "refused":
            print(f"| {name} | not run: {what} |", flush=True)
        elif kind == "baseline":
            run(name, bench_baseline, args.arch, args.img, args.batch, device, dtype, args.compile, args.width)
        elif kind == "plain_mae":
            run(name, bench_plain_mae, args.arch, args.img, args.batch, device, dtype, args.compile, args.width)
        else:
            method, zero, mto, kernel = what
            run(name, bench_engine, args.arch, method, mto, zero, args.img, args.batch, device, dtype,
                args.activation_checkpointing, args.compile, args.ds_set, kernel, args.width)
    for line in compare(rows):
        print(line)
    write_json()
    return 0


def planned_rows(args) -> list:
    """The rows of a run, in order, as (name, kind, what): kind "baseline" or "plain_mae" (what:
    None), "engine" (what: (method, ZeRO stage, MTO on, mto.kernel)) or "refused" (what: why it
    cannot run)."""
    suffix = (" compiled" if args.compile else "") + ("" if args.width is None else f" width {args.width}")
    engine_suffix = suffix + "".join(f" {a}" for a in args.ds_set)
    rows = []
    if not args.no_baseline:
        rows.append((f"baseline timm {args.arch} SDPA, no DS, no MTO{suffix}", "baseline", None))
        if "mae" in args.method:
            rows.append((f"baseline MAE {args.arch} plain PyTorch, no DS, no MTO{suffix}", "plain_mae", None))
    for method in args.method:
        for zero in args.zero:
            if args.compile and zero == 3:
                rows.append((f"{method} ZeRO-3", "refused", "train.compile is refused with ZeRO-3"))
                continue
            for mto in args.mto:
                for kernel in args.mto_kernel if mto == "on" else ["auto"]:
                    shown = "" if kernel == "auto" else f" [{kernel}]"
                    rows.append((f"{method} ZeRO-{zero} MTO {mto}{shown}{engine_suffix}", "engine",
                                 (method, zero, mto == "on", kernel)))
    return rows


def dry_run(args) -> int:
    """--dry-run: the rows a GPU run of these arguments would measure, each engine row's DeepSpeed
    config built as there (bf16) and put through DeepSpeed's validation, which rejects an unknown
    key in a section (a misspelt --ds-set). 0 when every row is valid, else 2."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # validation only: no device is touched
    from mto_ds.config import ConfigError
    from mto_ds.engine.builder import check_deepspeed_config
    invalid = 0
    for name, kind, what in planned_rows(args):
        if kind == "refused":
            detail = f"not run: {what}"
        elif kind in ("baseline", "plain_mae"):
            model = "timm" if kind == "baseline" else "MAE, plain PyTorch:"
            detail = f"would run: {model} {args.arch}, {args.img} px, batch {args.batch}"
        else:
            method, zero, mto, kernel = what
            try:
                check_deepspeed_config(engine_ds_config(method, zero, args.batch, True, args.ds_set),
                                       f"zero{zero}_bf16.json")
                detail = (f"would run: ds_configs/zero{zero}_bf16.json{''.join(f' {a}' for a in args.ds_set)}, "
                          f"{args.img} px, batch {args.batch}" + (f", mto.kernel={kernel}" if mto else "")
                          + (", activation checkpointing" if args.activation_checkpointing else "")
                          + (f" of one block in {args.activation_checkpointing}"
                             if args.activation_checkpointing > 1 else ""))
            except ConfigError as err:  # each row says what is wrong with it
                invalid += 1
                detail = f"invalid: {str(err)[:300]}"
        print(f"| {name} | {detail} |", flush=True)
    return 2 if invalid else 0


def _compiled_frames() -> int:
    """Frames torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["frames"]["ok"])


def compare(rows) -> list:
    """The relative figures, from the rows: MTO's share of step time (on vs off, same method and
    stage), SimMIM's speed relative to the plain timm baseline (the same encoder over all tokens)
    and MAE's relative to the plain MAE (the same model without DeepSpeed or MTO)."""
    timed = {r["config"]: r for r in rows if "step_ms" in r}
    lines = []
    baselines = {"simmim": ("baseline timm", "speed vs baseline"), "mae": ("baseline MAE", "speed vs plain MAE")}
    for name, row in timed.items():
        twin = re.sub(r" MTO on( \[\w+\])?", " MTO off", name)
        if " MTO on" in name and twin in timed:
            off = timed[twin]
            lines.append(f"MTO overhead, {name}: {100 * (row['step_ms'] / off['step_ms'] - 1):+.1f}% step time")
        prefix, label = baselines.get(name.split(" ", 1)[0], (None, None))
        baseline = next((r for other, r in timed.items() if prefix and other.startswith(prefix)), None)
        if baseline is not None:
            lines.append(f"{label}, {name}: {row['images_per_sec'] / baseline['images_per_sec']:.2f}x")
    return lines


if __name__ == "__main__":
    sys.exit(main())
