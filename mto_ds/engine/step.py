"""The train step: one optimizer step of the DeepSpeed engine over its micro-batches."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from ..data import normalize

LOGGED = ("loss", "loss_mim", "loss_mto", "loss_spa", "loss_e", "loss_r",
          "heterogeneity", "entropy_masked", "entropy_visible")


def _all_finite(loss: torch.Tensor) -> bool:
    """Agreement across ranks, so every rank skips the same step."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train_step(engine, micro_batches: List[dict], mto_scale: float, with_stats: bool, poison: bool = False,
               poison_gradient: bool = False):
    """Forward (MIM + MTO terms), engine.backward and engine.step for each micro-batch.

    DeepSpeed accumulates gradients and steps the optimizer at the last micro-batch. A
    non-finite loss on any rank makes the step a no-op for the parameters: that micro-batch's
    backward runs on zero-weighted clean inputs and the step's learning rate is 0 (the
    optimizer still counts the step: its moment estimates decay, fed by the gradients of the
    step's finite micro-batches, if any).
    `poison` (fault injection) makes this rank's loss NaN, `poison_gradient` its gradient.
    Returns (mean of the logged outputs over micro-batches, whether the step was skipped for a
    non-finite loss, whether DeepSpeed skipped it for non-finite gradients: fp16's loss scaler
    does that while it calibrates, bf16 only with check_grad_overflow on, fp32 when clipping).
    """
    sums: Dict[str, torch.Tensor] = {}
    skipped = overflowed = False
    for batch in micro_batches:
        # float32: the reconstruction target is these pixels; the model casts its input to its
        # weights' dtype, so a bf16 run does not round the target to 3 significant digits.
        images = normalize(batch["images"], engine.device)
        mask = batch["mask"].to(engine.device, non_blocking=True)
        out = engine(images, mask, mto_scale=mto_scale, with_stats=with_stats)
        if poison:
            out["loss"] = out["loss"] * float("nan")
        if poison_gradient:  # + sqrt(0 * loss): the same value, and d/dloss = 1 + 0 * inf = NaN
            out["loss"] = out["loss"] + (out["loss"] * 0.0).sqrt()
        logged = {key: out[key].detach().float() for key in LOGGED}
        if _all_finite(out["loss"]):
            engine.backward(out["loss"])
        else:
            skipped = True
            del out  # its graph goes before the stand-in forward instead of doubling activation memory
            # Keep DeepSpeed's accumulation and gradient reduction in lockstep with zero gradients.
            engine.backward(engine(torch.zeros_like(images), mask, mto_scale=0.0, with_stats=False)["loss"] * 0.0)
        boundary = engine.is_gradient_accumulation_boundary()
        if skipped and boundary:
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0  # the trainer sets the next step's LR before it
        engine.step()
        if boundary and not engine.was_step_applied():
            overflowed = True  # DeepSpeed skipped the step itself: inf/NaN in the gradients
        for key, value in logged.items():
            sums[key] = sums[key] + value if key in sums else value
    means = {k: v / len(micro_batches) for k, v in sums.items()}
    return means, skipped, overflowed
