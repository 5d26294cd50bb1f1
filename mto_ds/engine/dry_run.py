"""`mto-ds pretrain --dry-run`: what a start of a configuration would do on N ranks, checked
before the job is queued (on a login node, say). Nothing starts: no process group, no device, no
weights (the model is built on torch's meta device: shapes only), nothing written.

It runs the checks a start makes before its first step, with the same code: the config, the
global batch split over N ranks, the DeepSpeed file (DeepSpeed's own validation), data.path
(counted as the loader counts it) and the evaluation folders, and the checkpoint a start would
resume from (its files there at their saved sizes, of this run's ZeRO stage and model). What it
cannot tell: whether that checkpoint's contents load, and what the nodes' GPUs and network do
(tools/plan_run.py estimates the time from a measured rate).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from ..config import Config, ConfigError, other_method_defaults, unread_keys
from ..data import count_samples
from ..data.order import ranks, steps_per_epoch
from ..models.weights import init_state, model_folder_weights, newest_complete, read_marker, saved_model_settings
from .builder import (check_deepspeed_config, deepspeed_config, describe_batch, peak_lr, plan_batch, precision,
                      schedule_steps, schedule_warnings, zero_stage)
from .checkpoint import Checkpointer, CheckpointSpace, checkpoint_space, verify
from .run_dir import LOCK, describe_holder
from .trainer import build_model, find_inputs, model_keys


def dry_run(cfg: Config, world_size: int) -> List[str]:
    """The report's lines, `name: what a start would do`; a ConfigError for what a start refuses."""
    batch = plan_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size)
    ds = deepspeed_config(cfg, batch)
    check_deepspeed_config(ds, cfg.deepspeed.config)
    run_dir = Path(cfg.run.output_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, 0, world_size,
                                zero_stage=zero_stage(ds), model=model_keys(cfg.model))
    candidates, _, problem = find_inputs(cfg, checkpointer)
    if problem:
        raise ConfigError(problem)
    num_samples = count_samples(cfg.data)
    per_epoch = steps_per_epoch(num_samples, batch.global_batch_size)
    total, warmup = schedule_steps(cfg, per_epoch)
    resume = _resume_plan(checkpointer, candidates, world_size, total)
    with torch.device("meta"):
        model, _ = build_model(cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    space = checkpoint_space(cfg.checkpoint, ds, params, total // per_epoch)
    m, mto = cfg.model, cfg.mto
    where = "" if cfg.data.source == "synthetic" else f" {cfg.data.path}"
    lines = [
        f"model: {m.arch} {m.method}, {m.img_size} px: {params / 1e6:.1f} M parameters, "
        f"{model.flops_per_image() / 1e9:.1f} GFLOPs per image (forward and backward, as tflops_per_gpu counts)",
        f"MTO: {f'on, recalibrate {mto.recalibrate}' if mto.enabled else 'off'}",
        f"data: {cfg.data.source}{where}, {num_samples} images",
        f"batch: {describe_batch(batch, cfg.train.micro_batch_size)}",
        f"schedule: {per_epoch} steps per epoch, {total} steps ({total / per_epoch:.4g} epochs), warm-up "
        f"{warmup} steps, peak lr {peak_lr(cfg):.4g}",
        f"deepspeed: {cfg.deepspeed.config}, ZeRO-{zero_stage(ds)}, {precision(ds)}: "
        "accepted by DeepSpeed's validation",
        f"run directory: {run_dir}: {resume}",
        f"checkpoints: {_checkpoint_plan(cfg, space)}",
    ]
    if m.init_from is not None:
        lines.append(f"model.init_from: {_init_plan(cfg, model, resumes=bool(candidates))}")
    holder = describe_holder(run_dir / LOCK)
    if holder:
        lines.append(f"run directory: {LOCK} names {holder}; while that start lives, a start now stops "
                     "(exit status 2) without touching the run")
    lines += [f"warning: {text}" for text in [*schedule_warnings(cfg, per_epoch), *unread_keys(cfg),
                                                *other_method_defaults(cfg), *space.warning(run_dir)]]
    return lines


def _checkpoint_plan(cfg: Config, space: CheckpointSpace) -> str:
    """When a start saves, what it keeps, and the disk that takes."""
    c = cfg.checkpoint
    when = []
    if c.every_steps:
        when.append(f"every {c.every_steps} steps")
    if c.every_minutes:
        when.append(f"every {c.every_minutes:g} min")
    when.append("at the end and on a stop signal")
    k = c.keep_every_epochs
    keeps = f"the newest {c.keep_last} kept" + (
        f", and the ends of epochs {k}, {2 * k}, ... for good ({space.kept} in this run)" if k else "")
    return (f"{', '.join(when)}; {keeps}; about {space.each / 1e9:.3g} GB each ({space.bytes_per_param} bytes per "
            f"parameter), at most {space.at_once / 1e9:.3g} GB at once")


def _init_plan(cfg: Config, model, resumes: bool) -> str:
    """What a start does with model.init_from (find_inputs has refused a path it cannot take):
    nothing when it resumes; else a file's weights are read and fitted to the model as the start
    fits them, a run's newest complete checkpoint is named (its weights are merged at the start)."""
    source = cfg.model.init_from
    if resumes:
        return f"{source} is not read: the start resumes from the run's checkpoints"
    if Path(source).is_dir() and model_folder_weights(source) is None:  # a run or checkpoint directory
        tag_dir = newest_complete(source)
        saved = (saved_model_settings(source) or (None, {}))[1]
        other_size = saved.get("model.img_size", cfg.model.img_size) != cfg.model.img_size
        return (f"{tag_dir} (step {read_marker(tag_dir).get('step')}): the start merges its weights and takes its "
                "encoder's, and its decoder and mask token where they fit"
                + (f"; its encoder.pos_embed, of model.img_size={saved['model.img_size']}, is fitted to "
                   f"{cfg.model.img_size}" if other_size else ""))
    try:
        return f"{source}: {init_state(model, source)[1]}"
    except ValueError as err:
        raise ConfigError(f"bad value for 'model.init_from': {err}") from None


def _resume_plan(checkpointer: Checkpointer, candidates: List[Path], world_size: int, total: int) -> str:
    """Where a start would begin: the newest checkpoint whose files are all there at their saved
    sizes (a start falls back past the others as this does), refused as a start refuses it."""
    damaged = []
    for tag_dir in candidates:
        problem = verify(tag_dir)
        if problem:
            damaged.append(f"{tag_dir.name} ({problem})")
            continue
        checkpointer.refuse_other_settings(tag_dir)
        marker = read_marker(tag_dir)
        step, saved_on = int(marker["step"]), int(marker["world_size"])
        plan = f"resumes from {tag_dir} at step {step} of {total}"
        if step >= total:
            plan = f"at step {step} of {total} in {tag_dir}: nothing left to train"
        if saved_on != world_size:
            plan += (f"; saved on {ranks(saved_on)}, it is converted to DeepSpeed's universal format for "
                     f"{world_size} first")
        break
    else:
        if damaged:  # a start stops here (Checkpointer.load_newest): it never starts such a run afresh
            raise ConfigError(f"none of the {len(damaged)} complete checkpoints under {candidates[0].parent} has "
                              f"its files at their saved sizes ({', '.join(damaged)}): a start would stop; copy "
                              f"them again, or choose with checkpoint.resume=PATH (none: start afresh)")
        plan = "starts at step 0"
    if damaged:
        plan += f"; skipped as damaged: {', '.join(damaged)}"
    return plan
