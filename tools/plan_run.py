#!/usr/bin/env python
"""Plan a run before queueing it: wall time, GPU-hours and per-step communication.

    python tools/plan_run.py --arch vit_large_patch16 --method simmim --epochs 800 --gpus 32 \\
        --images-per-sec-per-gpu 450 --global-batch 2048 --micro-batch 64 --zero 1 --link-gbps 400
    python tools/plan_run.py --config configs/vit_l_simmim.yaml --gpus 32 --images-per-sec-per-gpu 450

--images-per-sec-per-gpu is a measured rate (tools/bench_step.py on your GPU). --link-gbps is
the inter-node bandwidth per GPU in Gbit/s (e.g. one 400 Gb/s InfiniBand NIC per GPU).

Communication per optimizer step per GPU, for Psi parameters sent in bf16 (2 bytes), ring
collectives moving (n-1)/n of the data, A micro-batches of accumulation:
  ZeRO-1: reduce-scatter of gradients + all-gather of parameters at the step     ~ 2 Psi
  ZeRO-2: reduce-scatter of gradients every micro-batch + all-gather at the step  ~ (A + 1) Psi
  ZeRO-3: all-gather in forward and backward + reduce-scatter, every micro-batch  ~ 3 A Psi
(ZeRO-3's is an upper bound: DeepSpeed keeps a gathered parameter for its backward when it is
used again within stage3_max_reuse_distance elements, which saves that all-gather.)

Whether this hides behind compute depends on `overlap_comm`. The shipped ds_configs/zero1_bf16.json
and zero2_bf16.json leave it off (ZeRO-1: DeepSpeed's default): the gradients are reduced after
the backward, so the plan adds the communication to the compute. zero3_bf16.json turns it on.
With it on, DeepSpeed reduces the gradients in buckets of reduce_bucket_size elements, each
launched once the backward has filled it; the last bucket is reduced after the backward. The
plan takes the gradients as arriving evenly over the backward (two thirds of a micro-batch's
compute) and adds what of the reduction is left when the backward ends: with the shipped
5e8-element buckets, all of a ViT-L's (304M parameters fill no bucket before the end). ZeRO-1
reduces at the last micro-batch of a step, ZeRO-2/3 at every micro-batch. ZeRO-3's all-gathers
are prefetched during the forward and backward: they cost only what exceeds the compute.
ZeRO-1/2's all-gather of the updated parameters follows the optimizer step, before the next
forward, and is always added. A step also takes at least the link's time for all its traffic.
--overlap-comm on|off plans for a config that differs from the shipped one; the other case is
printed beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

IMAGENET_TRAIN = 1_281_167
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def count_params(arch: str, method: str) -> int:
    import torch
    from mto_ds.models import create_mim_model
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_mim_model(arch, method)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # what ZeRO partitions


def zero_settings(ds: dict) -> tuple:
    """(ZeRO stage, overlap_comm, reduce_bucket_size) of a DeepSpeed config; where it leaves one
    out, DeepSpeed's default (overlap_comm on for ZeRO-3 only; 5e8)."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    return stage, bool(zero.get("overlap_comm", stage == 3)), int(zero.get("reduce_bucket_size", 5e8))


def shipped_zero_settings(zero: int) -> tuple:
    """(overlap_comm, reduce_bucket_size) of the shipped bf16 config of this ZeRO stage."""
    return zero_settings(json.loads((DS_CONFIGS / f"zero{zero}_bf16.json").read_text()))[1:]


def from_config(path: str, dataset: int) -> dict:
    """What a run's YAML says of the plan's inputs: model.arch and model.method, train.epochs (or
    train.steps, as epochs of `dataset` images), the global and micro-batch, and the ZeRO stage,
    overlap_comm and reduce bucket of its deepspeed.config."""
    from mto_ds.config import load_config, read_deepspeed_json
    from mto_ds.data.order import steps_per_epoch
    cfg = load_config(path, training=False)  # its run.output_dir need not be writable from here
    t = cfg.train
    epochs = t.epochs if t.steps is None else t.steps / steps_per_epoch(dataset, t.global_batch_size)
    zero, overlap, bucket = zero_settings(read_deepspeed_json(cfg))
    return {"arch": cfg.model.arch, "method": cfg.model.method, "epochs": epochs,
            "global_batch": t.global_batch_size, "micro_batch": t.micro_batch_size, "zero": zero,
            "overlap_comm": overlap, "reduce_bucket_size": bucket}


def reduction_left_after_backward(reduce_s: float, params: int, bucket: int, backward_s: float) -> float:
    """Seconds of one gradient reduction (`reduce_s` for all `params`) still running when the
    backward ends (`backward_s`): each full bucket of `bucket` elements is launched once the
    backward has produced it (gradients taken to arrive evenly) and after the bucket before it;
    the last one, filled by the backward's last gradient, at its end."""
    full = (params - 1) // bucket
    link_free, filled = 0.0, 0
    for size in [bucket] * full + [params - full * bucket]:
        filled += size
        link_free = max(link_free, backward_s * filled / params) + reduce_s * size / params
    return link_free - backward_s


def comm_bytes_per_step(params: int, zero: int, accumulation: int, gpus: int, bytes_per_elem: int = 2) -> float:
    ring = (gpus - 1) / gpus if gpus > 1 else 0.0
    factor = {1: 2.0, 2: accumulation + 1.0, 3: 3.0 * accumulation}[zero]
    return factor * params * bytes_per_elem * ring


def plan(params: int, epochs: float, dataset: int, gpus: int, rate_per_gpu: float, global_batch: int,
         micro_batch: int, zero: int, link_gbps: float, overlap_comm=None, reduce_bucket_size=None) -> dict:
    """The plan's figures; overlap_comm and reduce_bucket_size None: as the shipped config of the
    stage has them."""
    # The trainer's own rule (a ConfigError names more GPUs than images in a global batch).
    from mto_ds.data.order import steps_per_epoch
    from mto_ds.engine.builder import plan_batch
    batch = plan_batch(global_batch, micro_batch, gpus)
    accumulation = batch.accumulation
    steps = int(math.ceil(epochs * steps_per_epoch(dataset, global_batch)))
    # The largest share sets the pace where the GPUs do not divide the global batch (shares differ by one).
    compute_s = math.ceil(global_batch / gpus) / rate_per_gpu
    comm = comm_bytes_per_step(params, zero, accumulation, gpus)
    bytes_per_s = link_gbps * 1e9 / 8
    comm_s = comm / bytes_per_s
    shipped_overlap, shipped_bucket = shipped_zero_settings(zero)
    overlap_comm = shipped_overlap if overlap_comm is None else overlap_comm
    bucket = reduce_bucket_size or shipped_bucket
    # One pass of Psi over the ring: a reduce-scatter of the gradients, or an all-gather.
    one_pass_s = comm_bytes_per_step(params, 1, 1, gpus) / 2 / bytes_per_s
    reductions = 1 if zero == 1 else accumulation
    left_s = reductions * reduction_left_after_backward(one_pass_s, params, bucket, 2 / 3 * compute_s / accumulation)
    if zero < 3:  # the all-gather of the updated parameters follows the optimizer step
        overlapped_s = max(compute_s + left_s, comm_s - one_pass_s) + one_pass_s
    else:  # the prefetched all-gathers of the forward and backward
        overlapped_s = max(max(compute_s, comm_s - reductions * one_pass_s) + left_s, comm_s)
    overlapped_h = steps * overlapped_s / 3600
    serial_h = steps * (compute_s + comm_s) / 3600
    wall_h = overlapped_h if overlap_comm else serial_h
    return {"params": params, "accumulation": accumulation, "micro_batch": batch.micro_batch_size, "steps": steps,
            "compute_s_per_step": compute_s, "comm_gb_per_step": comm / 1e9, "comm_s_per_step": comm_s,
            "comm_to_compute": comm_s / compute_s, "overlap_comm": overlap_comm, "reduce_bucket_size": bucket,
            "wall_hours": wall_h,
            "wall_hours_other": serial_h if overlap_comm else overlapped_h, "gpu_hours": wall_h * gpus}


def positive(kind):
    """An argparse type: a number of `kind` above zero (zero GPUs or a zero rate divide by zero)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def main(argv=None) -> int:
    from mto_ds.config import ARCHS, METHODS, ConfigError  # not mto_ds.models: it imports timm
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a run's YAML: model.arch and model.method, train.epochs (or steps), the global "
                   "and micro-batch, and the ZeRO stage, overlap_comm and reduce bucket of its deepspeed.config, "
                   "for those of the options below that are not given")
    p.add_argument("--arch", choices=sorted(ARCHS), help="default vit_large_patch16")
    p.add_argument("--method", choices=METHODS, help="default simmim")
    p.add_argument("--epochs", type=positive(float), help="default 800")
    p.add_argument("--dataset-size", type=positive(int), default=IMAGENET_TRAIN)
    p.add_argument("--gpus", type=positive(int), default=64)
    p.add_argument("--images-per-sec-per-gpu", type=positive(float), required=True)
    p.add_argument("--global-batch", type=positive(int), help="default 2048")
    p.add_argument("--micro-batch", type=positive(int), help="default 64 (a config's null: the GPU's share)")
    p.add_argument("--zero", type=int, choices=[1, 2, 3], help="default 2")
    p.add_argument("--link-gbps", type=positive(float), default=400.0)
    p.add_argument("--overlap-comm", choices=["on", "off"],
                   help="DeepSpeed's zero_optimization.overlap_comm (default: as ds_configs/zero{1,2,3}_bf16.json "
                        "have it: off for ZeRO-1/2, on for ZeRO-3)")
    p.add_argument("--reduce-bucket-size", type=positive(float),
                   help="DeepSpeed's zero_optimization.reduce_bucket_size in elements (default: as the shipped "
                        "config of the stage has it, 5e8): with overlap_comm on, only full buckets are reduced "
                        "during the backward")
    args = p.parse_args(argv)
    if args.reduce_bucket_size is not None and args.reduce_bucket_size < 1:
        p.error(f"--reduce-bucket-size counts elements: at least 1, got {args.reduce_bucket_size:g}")
    overlap = None if args.overlap_comm is None else args.overlap_comm == "on"
    try:
        given = from_config(args.config, args.dataset_size) if args.config else {}
    except (ConfigError, ValueError) as err:  # ValueError: train.steps of a data set under one batch
        p.error(f"--config {args.config}: {err}")
    if given.get("zero") not in (None, 1, 2, 3):
        p.error(f"--config {args.config}: its deepspeed.config has ZeRO stage {given['zero']}; "
                "plan_run plans 1, 2 or 3")
    defaults = {"arch": "vit_large_patch16", "method": "simmim", "epochs": 800.0, "global_batch": 2048,
                "micro_batch": 64, "zero": 2}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, given.get(key, default))
    # The config's own DeepSpeed settings, unless a flag says otherwise (or another stage is asked).
    if given and args.zero == given["zero"]:
        overlap = given["overlap_comm"] if overlap is None else overlap
        args.reduce_bucket_size = args.reduce_bucket_size or given["reduce_bucket_size"]
    try:
        r = plan(count_params(args.arch, args.method), args.epochs, args.dataset_size, args.gpus,
                 args.images_per_sec_per_gpu, args.global_batch, args.micro_batch, args.zero, args.link_gbps,
                 overlap, args.reduce_bucket_size and int(args.reduce_bucket_size))
    except (ConfigError, ValueError) as err:  # fewer images per step than GPUs, a data set under one batch
        p.error(str(err))
    print(f"{args.arch} {args.method}: {r['params'] / 1e6:.0f}M trainable parameters, {args.epochs:g} epochs of "
          f"{args.dataset_size} images on {args.gpus} GPUs")
    print(f"  optimizer steps        {r['steps']} (global batch {args.global_batch}: micro-batch {r['micro_batch']} "
          f"per GPU, accumulation {r['accumulation']})")
    if args.micro_batch is not None and r["micro_batch"] != args.micro_batch:
        print(f"  note: {args.global_batch} images over {args.gpus} GPUs run in micro-batches of at most "
              f"{r['micro_batch']}, not {args.micro_batch}: measure the rate at that micro-batch")
    print(f"  compute per step       {r['compute_s_per_step'] * 1e3:.0f} ms at {args.images_per_sec_per_gpu:g} images/s/GPU")
    print(f"  ZeRO-{args.zero} traffic per step {r['comm_gb_per_step']:.2f} GB per GPU -> "
          f"{r['comm_s_per_step'] * 1e3:.0f} ms at {args.link_gbps:g} Gb/s ({100 * r['comm_to_compute']:.0f}% of compute)")
    source = ("--overlap-comm" if args.overlap_comm is not None else
              f"as {args.config}'s deepspeed.config has it" if given and args.zero == given["zero"] else "as shipped")
    other = "off" if r["overlap_comm"] else "on"
    print(f"  wall time              {r['wall_hours']:.1f} h with overlap_comm {'on' if r['overlap_comm'] else 'off'} "
          f"({source}); {r['wall_hours_other']:.1f} h with it {other} (reduce buckets of {r['reduce_bucket_size']:.3g} "
          f"elements)")
    print(f"  GPU-hours              {r['gpu_hours']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
