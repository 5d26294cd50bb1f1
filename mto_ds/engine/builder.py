"""Builders: batch geometry, parameter groups, LR schedule and the DeepSpeed config dict."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List

from ..config import Config, ConfigError, read_deepspeed_json
from ..data.order import micro_batch_split, ranks

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int     # per rank, at most (a rank's share may leave its last one short)
    accumulation: int         # micro-batches per optimizer step
    world_size: int

    @property
    def samples_per_micro_batch(self) -> float:
        """The global batch over all micro-batches of a step: what a micro-batch's loss is
        weighed against (train_step), so that each sample weighs 1 / global batch."""
        return self.global_batch_size / (self.accumulation * self.world_size)

    @property
    def places(self) -> int:
        """Micro-batch places of a step on all ranks, DeepSpeed's train_batch_size; more than the
        global batch where the ranks' shares differ (the places beyond a share hold no sample)."""
        return self.micro_batch_size * self.accumulation * self.world_size


def plan_batch(global_batch_size: int, micro_batch_size, world_size: int) -> BatchPlan:
    """The user's global batch is fixed, on any number of ranks up to it: each rank takes its share
    (they differ by one sample where the ranks do not divide the batch) in the fewest micro-batches
    of at most train.micro_batch_size (order.micro_batch_split)."""
    if world_size > global_batch_size:
        raise ConfigError(f"train.global_batch_size={global_batch_size} is smaller than the {world_size} "
                          "data-parallel ranks: each rank needs a sample of every step")
    micro, accumulation = micro_batch_split(global_batch_size, world_size, micro_batch_size)
    return BatchPlan(global_batch_size, micro, accumulation, world_size)


def describe_batch(batch: BatchPlan, asked_micro_batch_size) -> str:
    """How the global batch splits over the ranks, for the start's log."""
    low, high = batch.global_batch_size // batch.world_size, -(-batch.global_batch_size // batch.world_size)
    shares = f"{high} samples" if low == high else f"{low}-{high} samples (the ranks do not divide it)"
    text = (f"global batch {batch.global_batch_size} = {ranks(batch.world_size)} x {shares}, in "
            f"{batch.accumulation} micro-batch(es) of at most {batch.micro_batch_size}")
    if asked_micro_batch_size and batch.micro_batch_size < min(asked_micro_batch_size, high):
        text += f" (train.micro_batch_size={asked_micro_batch_size} does not split {high} evenly)"
    return text


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW groups: no weight decay on 1-D parameters (norms, biases) and on what the model's
    `no_weight_decay()` names, as the method's reference does (MAE: nothing more, so its CLS and
    mask tokens are decayed; SimMIM: the position embedding and CLS token)."""
    skip_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip_names else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: Config) -> float:
    """Linear scaling rule of MAE/SimMIM: lr = blr * global batch / 256, unless train.lr is set."""
    return cfg.train.lr if cfg.train.lr is not None else cfg.train.blr * cfg.train.global_batch_size / 256


def schedule_steps(cfg: Config, steps_per_epoch: int):
    """(total optimizer steps, warm-up steps): the warm-up asked for, cut to end a step before the run."""
    total, warmup = _asked_schedule(cfg, steps_per_epoch)
    return total, min(warmup, max(total - 1, 0))


def _asked_schedule(cfg: Config, steps_per_epoch: int):
    total = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * steps_per_epoch
    warmup = cfg.train.warmup_steps
    if warmup is None:
        warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    return total, warmup


def schedule_warnings(cfg: Config, steps_per_epoch: int) -> List[str]:
    """What in the run's schedule does not do what its keys suggest: a warm-up as long as the run
    (a recipe's 40 epochs in a 20-epoch budget), cut to fit, so the LR climbs to the peak at the
    last step and never decays; an evaluation interval the run never reaches."""
    total, asked = _asked_schedule(cfg, steps_per_epoch)
    _, warmup = schedule_steps(cfg, steps_per_epoch)
    problems = []
    if asked > warmup:
        key = (f"train.warmup_steps={cfg.train.warmup_steps}" if cfg.train.warmup_steps is not None
               else f"train.warmup_epochs={cfg.train.warmup_epochs:g} ({asked} steps)")
        problems.append(f"{key} is not shorter than the run ({total} steps): the warm-up is cut to {warmup} "
                        f"steps, so the LR rises until the last step and never decays (train.min_lr_ratio "
                        f"has no effect); give a shorter warm-up for this budget")
    every, epochs = cfg.eval.every_epochs, total // steps_per_epoch
    if every and epochs < every:
        problems.append(f"eval.every_epochs={every} evaluates at the end of epoch {every}, {2 * every}, ...; this "
                        f"run ends after {total} steps ({epochs} complete epochs of {steps_per_epoch} steps), "
                        f"so it evaluates nothing during pre-training")
    return problems


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """The LR of optimizer step `step` (0-based), MAE's and SimMIM's shape per step: a linear
    warm-up over the first `warmup_steps` steps up to `peak` (its first step at peak / warm-up,
    not 0), then half a cosine from `peak` towards `peak * min_ratio`.

    The trainer sets it before every step from the step count it checkpoints, so it needs no
    scheduler state, and a step that is skipped (ours or DeepSpeed's) cannot shift it. (DeepSpeed's
    WarmupCosineLR, used before, gave the first two steps LR 0, never reached the peak or the
    floor, and refused a warm-up of 0.)"""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def deepspeed_config(cfg: Config, batch: BatchPlan) -> dict:
    """The chosen ds_configs/ JSON with the run's batch and optimizer filled in (the LR schedule
    is the trainer's: `learning_rate`)."""
    ds = read_deepspeed_json(cfg)
    ds["train_batch_size"] = batch.places
    ds["train_micro_batch_size_per_gpu"] = batch.micro_batch_size
    ds["gradient_accumulation_steps"] = batch.accumulation
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update(lr=peak_lr(cfg), betas=list(cfg.train.betas),
                                              weight_decay=cfg.train.weight_decay)
    # train.clip_grad alone decides (the ds_configs files leave it out): null is MAE's recipe,
    # no clipping, which DeepSpeed spells 0.
    ds["gradient_clipping"] = cfg.train.clip_grad or 0.0
    ds.setdefault("steps_per_print", 10 ** 9)  # our telemetry prints; DeepSpeed's would repeat it
    skip_unread_grad_norm(ds)
    return ds


def check_deepspeed_config(ds: dict, name: str) -> None:
    """DeepSpeed's own validation of the dict the engine is to get, whose sections refuse a key they
    do not know (`overlap_com` for `overlap_comm` in a file of the user's): run before the model is
    built, so the error is a config error (exit status 2, which a Slurm job does not requeue). Left
    to deepspeed.initialize it came after the model and the data were set up, as a traceback with
    exit status 1: a crash to Slurm, restarted until its restart limit."""
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed holds the batch to micro-batch x accumulation x the world size it sees, which is 1
    # where no process group is up (a dry run planning for many ranks).
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    view = {**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * ranks}
    try:
        DeepSpeedConfig(view)
    except Exception as err:  # noqa: BLE001 - pydantic's, DeepSpeed's and plain assertions alike
        detail = " ".join(str(err).split()).split(" For further information visit")[0]
        raise ConfigError(f"bad value for 'deepspeed.config': DeepSpeed refuses {name}: "
                          f"{type(err).__name__}: {detail}") from None


def skip_unread_grad_norm(ds: dict) -> None:
    """Turn off the gradient norm of DeepSpeed's ZeRO-1/2 optimizer when nothing reads it: bf16 or
    fp16, no clipping, and the JSON does not ask for it (`zero_optimization.compute_grad_norm`).
    DeepSpeed computes it at every step in a Python loop of two kernels per gradient tensor (an
    upcast and a norm: about 800 launches for ViT-L MAE) that the host must issue before the
    optimizer runs. In fp32 DeepSpeed reads it to skip a step with non-finite gradients (fp16 has
    its loss scaler's own check), so fp32 keeps it. Left on where DeepSpeed refuses it off
    (optimizer offload, ZenFlow, ZeRO-1 bf16 with float32 gradient accumulation) and in ZeRO-3,
    which always computes it."""
    zero = ds.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    bf16_fp32_accumulation = (zero_stage(ds) == 1 and precision(ds) == "bf16"
                              and ds.get("data_types", {}).get("grad_accum_dtype") in ("fp32", "float32"))
    if (ds.get("gradient_clipping", 0.0) == 0.0 and zero_stage(ds) in (1, 2) and precision(ds) != "fp32"
            and not offload and not zero.get("zenflow") and not bf16_fp32_accumulation):
        zero.setdefault("compute_grad_norm", False)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def mark_zero3_leaf_blocks(model: nn.Module, ds: dict) -> None:
    """Under ZeRO-3, make each transformer block one leaf for DeepSpeed: it gathers and releases
    the block's weights in one go around the block's call, instead of hooking every layer
    inside it. Those per-layer hooks are host work (on an H100, a quarter of a ViT-H step went
    to releasing layers' parameters; docs/BENCHMARKS.md). Call before deepspeed.initialize."""
    if zero_stage(ds) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        # Here, not at the top: the batch and DeepSpeed-config helpers above serve tools (plan_run,
        # bench_step --dry-run) that need no model, and the models module imports timm (seconds).
        from ..models.vit import MTOBlock
        set_z3_leaf_modules(model, [MTOBlock])


def precision(ds: dict) -> str:
    # "bfloat16" is DeepSpeed's older spelling of the section, which it still reads.
    if ds.get("bf16", ds.get("bfloat16", {})).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
