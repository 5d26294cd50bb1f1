"""The train step: one optimizer step of the DeepSpeed engine over its micro-batches, and the
checks of non-finite values around it (every rank agrees on each)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..data import normalize

LOGGED = ("loss", "loss_mim", "loss_mto", "loss_spa", "loss_e", "loss_r",
          "heterogeneity", "entropy_masked", "entropy_visible")


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGradientsError(NonFiniteLossError):
    """fp16's gradients overflow at the loss scaler's minimum scale: DeepSpeed gives up."""


class NonFiniteWeightsError(NonFiniteLossError):
    """A non-finite gradient reached the weights. DeepSpeed's ZeRO-1/2 applies one when nothing
    checks the gradients: bf16 with check_grad_overflow off (the shipped ZeRO-1/2 configs); fp32
    skips such a step, and so does ZeRO-3 in every dtype (it always checks the gradient norm)."""


def _true_on_every_rank(flag: torch.Tensor, device: torch.device) -> bool:
    """One all-reduce (MIN) of a boolean and one read to the host."""
    flag = flag.to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _all_finite(loss: torch.Tensor) -> bool:
    """Agreement across ranks, so every rank skips the same step."""
    return _true_on_every_rank(torch.isfinite(loss.detach()), loss.device)


def weights_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether every rank's weights are finite: ZeRO-3's partitions, else the full tensors.
    Once per checkpoint, not per step."""
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    return _true_on_every_rank(torch.stack([torch.isfinite(t).all() for t in tensors if t.numel()]).all(), device)


def train_step(engine, micro_batches: List[dict], mto_scale: float, with_stats: bool,
               samples_per_micro_batch: float, seeds: Optional[List[int]] = None, poison: bool = False,
               poison_gradient: bool = False):
    """Forward (MIM + MTO terms), engine.backward and engine.step for each micro-batch.

    DeepSpeed accumulates gradients and steps the optimizer at the last micro-batch. A
    non-finite loss on any rank makes the step a no-op for the parameters: that micro-batch's
    backward runs on zero-weighted clean inputs and the step's learning rate is 0 (the
    optimizer still counts the step: its moment estimates decay, fed by the gradients of the
    step's finite micro-batches, if any).
    Each micro-batch backpropagates its loss, a mean over its samples, times its samples over
    `samples_per_micro_batch` (global batch / (accumulation x ranks); BatchPlan): DeepSpeed
    divides every micro-batch's loss by the accumulation and averages the ranks, so each sample
    of the step weighs 1 / global batch. That holds for a micro-batch short of undecodable
    images (as if a missing one contributed zero), for the stand-in of one with none decoded
    (0), and for ranks whose shares differ by a sample (order.rank_share).
    `seeds`, one per micro-batch, reseed torch's generator before its forward (dropout, drop-path).
    `poison` (fault injection) makes this rank's loss NaN, `poison_gradient` its gradient.
    Returns (the logged outputs summed over this rank's samples, only with `with_stats`, and
    always their count as "samples": summed over ranks, the one over the other is the mean over
    the global batch; whether the step was skipped for a non-finite loss; whether DeepSpeed
    skipped it for non-finite gradients: fp16's loss scaler does that while it calibrates, bf16
    under ZeRO-1/2 only with check_grad_overflow on, fp32 and ZeRO-3 by the gradient norm, with
    or without clipping).
    """
    sums: Dict[str, torch.Tensor] = {}
    samples = 0
    skipped = overflowed = False
    for k, batch in enumerate(micro_batches):
        if seeds:
            torch.manual_seed(seeds[k])
        # float32: the reconstruction target is these pixels; the model casts its input to its
        # weights' dtype, so a bf16 run does not round the target to 3 significant digits.
        images = normalize(batch["images"], engine.device)
        mask = batch["mask"].to(engine.device, non_blocking=True)
        out = engine(images, mask, mto_scale=mto_scale, with_stats=with_stats)
        if poison:
            out["loss"] = out["loss"] * float("nan")
        if poison_gradient:  # + sqrt(0 * loss): the same value, and d/dloss = 1 + 0 * inf = NaN
            out["loss"] = out["loss"] + (out["loss"] * 0.0).sqrt()
        size = len(batch["index"])  # 0 for a stand-in of a micro-batch with no image decoded
        # Read only on logged steps (with_stats): other steps queue no work for them.
        logged = {key: out[key].detach().float() * size for key in LOGGED} if with_stats else {}
        if _all_finite(out["loss"]):
            weight = size / samples_per_micro_batch
            engine.backward(out["loss"] if weight == 1 else out["loss"] * weight)
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
        samples += size
    return {**sums, "samples": samples}, skipped, overflowed
