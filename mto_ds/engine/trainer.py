"""The pre-training run: components built once, then the loop over optimizer steps."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..config import (Config, ConfigError, mask_ratio, mask_units, other_method_defaults, realised_mask_ratio, to_yaml,
                      unread_keys)
from ..data import build_pretrain_loader, data_fingerprint, data_path_problem
from ..data.order import rank_share, steps_per_epoch
from ..models import build_mim_model
from ..models.weights import init_state, model_differences, saved_model_settings, weights_identity
from ..mto.fused_attention import fused_kernel_available
from ..mto.plan import STATS_WITH_GRADIENTS
from ..mto.state import MTOState
from .builder import (BatchPlan, check_deepspeed_config, deepspeed_config, describe_batch, learning_rate,
                      mark_zero3_leaf_blocks, param_groups, peak_lr, plan_batch, precision, schedule_steps,
                      schedule_warnings, zero_stage)
from .checkpoint import Checkpointer, checkpoint_space, job_identity
from .distributed import DistInfo, agree, check_shared_directory, differing_from_rank_0, init_distributed
from .faults import Faults, SampleTrace
from .profiling import StepProfiler
from .provenance import append_start, describe, differing_ranks, gather_environments, start_record
from .run_dir import RunDirectoryInUse, RunLock, claim, clear_state, resume_warnings, write_config, write_state
from .signals import TAKEN_OVER, StopRequest
from .step import (LOGGED, NonFiniteGradientsError, NonFiniteLossError, NonFiniteWeightsError, train_step,
                   weights_finite)
from .telemetry import Telemetry, evaluation_logged

log = logging.getLogger("mto_ds")
# Raised on every rank together (the ranks decided them together), so rank 0's reason is everyone's.
AGREED_ERRORS = (ConfigError, NonFiniteLossError)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_keys(m) -> dict:
    """The settings of `model` (the config section) that decide the shapes of the weights, saved in
    complete.json: a resume with others is refused by name instead of failing in DeepSpeed's load."""
    keys = {"model.arch": m.arch, "model.method": m.method, "model.img_size": m.img_size}
    if m.method == "mae":
        keys.update({"model.decoder_embed_dim": m.decoder_embed_dim, "model.decoder_depth": m.decoder_depth})
    return keys


def build_model(cfg: Config):
    """(The run's MIM model, the mask generator of its patch grid), on the current default device."""
    return build_mim_model(cfg, activation_checkpointing=cfg.train.activation_checkpointing,
                           checkpoint_every=cfg.train.checkpoint_every,
                           compile_blocks=cfg.train.compile)


def find_inputs(cfg: Config, checkpointer: Checkpointer):
    """(The checkpoints to resume from, the evaluation's images or None, why checkpoint.resume,
    data.path, model.init_from or the evaluation folders cannot be read or None when all can):
    looked up before the model is built, not at the first evaluation, an epoch of training later."""
    try:
        candidates = checkpointer.candidates(cfg.checkpoint.resume)
    except ConfigError as err:
        return [], None, str(err)
    problem = data_path_problem(cfg.data)
    if problem:
        return candidates, None, f"bad value for 'data.path': {problem}"
    problem = None if candidates else init_from_problem(cfg.model)
    if problem:  # read only by a start from step 0, after the model is built: looked at now
        return candidates, None, f"bad value for 'model.init_from': {problem}"
    asked = "eval.every_epochs" if cfg.eval.every_epochs else "eval.at_start" if cfg.eval.at_start else None
    if not asked:
        return candidates, None, None
    from ..eval.datasets import build_eval_sets  # eval is imported only where it is used
    # Built (listed, subsets drawn) once: what cannot be read fails here, not at the first
    # evaluation epochs later (a flat val/, a class train/ lacks), and no evaluation walks
    # ImageNet's folders again.
    try:
        return candidates, build_eval_sets(cfg), None
    except (FileNotFoundError, ValueError) as err:
        off = "eval.every_epochs=0" if asked == "eval.every_epochs" else "eval.at_start=false"
        return candidates, None, (f"bad value for '{asked}': evaluating during pre-training reads labelled "
                                  f"train/ and val/ ImageFolders: {err} (set eval.path to the root of "
                                  f"train/ and val/, or {off})")


def init_from_problem(model) -> Optional[str]:
    """Why `model.init_from` (of the config section `model`) names no weights this run can take, or
    None: a path that is not there, a directory without a complete checkpoint, or a run of another
    model.arch (from its files, before a ViT-H checkpoint is merged for minutes only for its
    shapes to be refused; another model.img_size is fitted). A file's shapes are checked as it
    is read."""
    source = model.init_from
    if source is None:
        return None
    if not Path(source).exists():
        return f"{source} does not exist (a run or checkpoint directory, or a weights file)"
    if Path(source).is_dir() and weights_identity(source) is None:
        return f"{source} holds no complete checkpoint (a run directory, its checkpoints/ or one step_N of it)"
    saved = saved_model_settings(source)
    if saved and model_differences(saved[1], {"model.arch": model.arch}):
        return (f"{source} was pre-trained with another encoder (model.arch: {saved[1]['model.arch']} there, "
                f"{model.arch} here)")
    return None


class Trainer:
    cfg: Config
    dist: DistInfo
    batch: BatchPlan
    loader: object              # mto_ds.data loader: micro_batches(epoch, start_step)
    engine: object              # deepspeed.DeepSpeedEngine around the MIM model
    checkpointer: Checkpointer
    mto_state: MTOState
    telemetry: Telemetry
    stop: StopRequest
    faults: Faults              # fault injection, off unless MTO_DS_FAULT_* are set
    trace: SampleTrace          # per-step sample indices, off unless MTO_DS_TRACE_SAMPLES=1

    def __init__(self, cfg: Config, stop: Optional[StopRequest] = None):
        # First (the CLI makes it earlier still), so a preemption during set-up ends in a clean stop.
        self.stop = stop or StopRequest()
        self.cfg = cfg
        self.dist = init_distributed()
        # Also with MTO off: the baseline's telemetry (heterogeneity per block) takes the same kernel.
        if cfg.mto.kernel == "fused" and not fused_kernel_available(self.dist.device):
            raise ConfigError(f"bad value for 'mto.kernel': fused needs triton and a CUDA device, this rank has "
                              f"{self.dist.device}; use auto (the fused kernel where it applies), sdpa or reference")
        self.faults = Faults.from_env()
        self.run_dir = Path(cfg.run.output_dir)
        self.run_lock = self._claim_run_dir()  # first: a duplicate start touches nothing
        if self.dist.rank == 0:
            clear_state(self.run_dir)
        self.telemetry = None
        try:
            self._set_up(cfg)
            if self.dist.rank == 0:
                # Only a start that set up trains with its settings: config.yaml, which the study reads
                # for the run's method and model, keeps those of the checkpoints when one is refused.
                # It is also how to continue the run (`--config RUN/config.yaml`), so it says resume=auto:
                # a `none` or a path there would start afresh, or from that old checkpoint, every time.
                write_config(self.run_dir, to_yaml(dataclasses.replace(
                    cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))))
        except BaseException as err:
            if self.telemetry is not None:  # opened at the end of the set-up: flushed and closed
                with contextlib.suppress(Exception):
                    self.telemetry.close()
            self._write_state(f"set-up failed: {self._where(err)}{type(err).__name__}: {err}", err, in_set_up=True)
            self._release_run_dir()
            raise

    def _claim_run_dir(self) -> Optional[RunLock]:
        """Rank 0 claims the run directory (engine/run_dir.py); every rank stops if another live
        start holds it."""
        lock, problem, unusable = None, None, None
        if self.dist.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                lock = claim(self.run_dir, job_identity())
            except RunDirectoryInUse as err:
                problem = str(err)
            except OSError as err:  # a file of that name, a read-only file system
                unusable = (f"bad value for 'run.output_dir': {self.run_dir} cannot be made or written as the run "
                            f"directory ({err.strerror or err})")
        problem, unusable = agree(problem), agree(unusable)
        if unusable:
            raise ConfigError(unusable)
        if problem:
            raise RunDirectoryInUse(problem)
        return lock

    def _release_run_dir(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def _set_up(self, cfg: Config) -> None:
        """Everything but the process group: model, data, engine, and the resume."""
        import deepspeed

        problem = check_shared_directory(self.run_dir, self.dist.rank, self.dist.world_size, self.dist.device)
        if problem:
            raise ConfigError(f"run.output_dir={cfg.run.output_dir} must be one directory that every rank "
                              f"sees (shared storage, not a node-local disk): {problem}")
        self.batch = plan_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.dist.world_size)
        self.ds_config = deepspeed_config(cfg, self.batch)
        check_deepspeed_config(self.ds_config, cfg.deepspeed.config)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                         self.dist.rank, self.dist.world_size, self.faults,
                                         zero_stage(self.ds_config), local_rank=self.dist.local_rank,
                                         model=model_keys(cfg.model))
        candidates, self.eval_sets, problem = find_inputs(cfg, self.checkpointer)
        problem = agree(problem)  # one rank's missing file (node-local data) stops every rank
        if problem:
            raise ConfigError(problem)
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        m = cfg.model
        model, mask_fn = build_model(cfg)
        self.mask_fn = mask_fn
        self.held_out = None  # the images each evaluation reconstructs (eval.reconstructions), read once
        self.flops_per_image = model.flops_per_image()  # MFU's model FLOPs, from the layer shapes
        asked, realised = mask_ratio(m), realised_mask_ratio(m)
        if abs(realised - asked) > 0.05 and self.dist.rank == 0:
            log.warning("model.mask_ratio=%g masks %.3g of the patches: masks are whole %s, %d of them per "
                        "image at model.img_size=%d (smaller SimMIM cells, model.mask_patch_size, come closer)",
                        asked, realised, "cells" if m.method == "simmim" else "patches", mask_units(m), m.img_size)
        try:
            self.loader = build_pretrain_loader(
                cfg.data, method=m.method, img_size=m.img_size, seed=cfg.run.seed,
                global_batch_size=self.batch.global_batch_size, micro_batch_size=self.batch.micro_batch_size,
                rank=self.dist.rank, world_size=self.dist.world_size, mask_fn=mask_fn)
        except FileNotFoundError as err:  # class folders without an image: seen only by listing them
            raise ConfigError(f"bad value for 'data.path': {err}") from None
        # Each rank lists the folder or opens the .beton itself: a node-local copy short of one
        # file would shift every epoch's order on that rank (samples read twice, others never).
        differing = differing_from_rank_0(data_fingerprint(cfg.data, self.loader))
        if differing:
            raise ConfigError(f"bad value for 'data.path': the ranks read different data sets at "
                              f"{cfg.data.path} ({differing}); every rank must read the same one (a "
                              "node-local copy incomplete or out of date?)")
        self.steps_per_epoch = steps_per_epoch(self.loader.num_samples, self.batch.global_batch_size)
        self.total_steps, self.warmup_steps = schedule_steps(cfg, self.steps_per_epoch)
        self.peak_lr = peak_lr(cfg)

        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
        space = checkpoint_space(cfg.checkpoint, self.ds_config, trained, self.total_steps // self.steps_per_epoch)
        self.initialised_from = self._init_weights(model, candidates)
        mark_zero3_leaf_blocks(model, self.ds_config)
        groups = param_groups(model, cfg.train.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        self.dtype = DTYPES[precision(self.ds_config)]
        self.mto_state = MTOState(warmup_steps=cfg.mto.warmup_steps)
        self.global_step = 0
        self.nonfinite_total = 0     # optimizer steps skipped for a non-finite loss, in all
        self.nonfinite_streak = 0    # ... in a row up to now
        self.overflow_total = 0      # fp16 steps DeepSpeed's loss scaler skipped
        self.save_seconds = []       # each save's wall time, for the closing summary
        self.resumed_from = self._resume(candidates)
        self.checkpointer.record_resume(cfg.checkpoint.resume, self.global_step)
        self.trace = SampleTrace(self.run_dir, self.dist.rank, self.dist.world_size, start_step=self.global_step)
        self.telemetry = Telemetry(self.run_dir, self.dist.rank == 0, self.total_steps, self.global_step,
                                   cfg.run.progress_bar, resumed=bool(self.resumed_from))
        self.profiler = StepProfiler(self.run_dir, self.dist.rank, self.dist.device, cfg.run.profile_step,
                                     cfg.run.profile_steps)
        self._record_start()
        log.info("%s, %d steps/epoch, %d steps in all, ZeRO-%d, %s",
                 describe_batch(self.batch, cfg.train.micro_batch_size), self.steps_per_epoch, self.total_steps,
                 zero_stage(self.ds_config), precision(self.ds_config))
        if self.dist.rank == 0:
            for problem in [*schedule_warnings(cfg, self.steps_per_epoch), *unread_keys(cfg),
                            *other_method_defaults(cfg), *space.warning(self.run_dir)]:
                log.warning(problem)

    def _init_weights(self, model, candidates) -> Optional[dict]:
        """model.init_from, on a start from step 0 (a resume takes its checkpoint's weights, or stops:
        never starts afresh). Rank 0 alone reads and loads them, so a checkpoint is not merged once
        per rank: deepspeed.initialize broadcasts rank 0's parameters to the other ranks (and ZeRO-3
        each one again as it partitions it; test_cli checks both on 2 ranks). Returns which weights."""
        source = self.cfg.model.init_from
        if source is None or candidates:
            if source is not None and self.dist.rank == 0:
                log.info("model.init_from=%s is not read: this start resumes from the run's checkpoints", source)
            return None
        problem, taken = None, None
        if self.dist.rank == 0:
            try:
                state, taken = init_state(model, source)
                model.load_state_dict(state, strict=False)
            except (FileNotFoundError, ValueError) as err:
                problem = f"bad value for 'model.init_from': {err}"
            except Exception as err:  # unforeseen: rank 0 must still reach the agreement, or rank 1 hangs
                problem = f"model.init_from={source} could not be loaded: {type(err).__name__}: {err}"
        problem = agree(problem)
        if problem:
            raise ConfigError(problem)
        if self.dist.rank == 0:
            log.info("initialised from %s: %s", source, taken)
        return {"path": str(Path(source).resolve()), **(weights_identity(source) or {})}

    def _record_start(self) -> None:
        """RUN/starts.jsonl gets this start's line (engine/provenance.py); ranks that run other code
        or library versions than rank 0 are named. A collective: every rank calls it."""
        environments = gather_environments(self.dist.device)
        if self.dist.rank != 0:
            return
        record = start_record(environments, self.global_step, self.resumed_from, job_identity(),
                              {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                               "global_batch_size": self.batch.global_batch_size})
        if self.initialised_from:
            record["initialised_from"] = self.initialised_from
        append_start(self.run_dir, record)
        log.info("%s", describe(record))
        for rank in differing_ranks(environments):
            log.warning("this start's ranks run different code or libraries: %s", rank)

    # --- checkpoints -------------------------------------------------------------------
    def _data_plan(self) -> dict:
        """What the data position (epoch, step in epoch) is a function of, saved with it; whether
        the loss depends on the micro-batch size (MTO's L_r); and the LR schedule's inputs."""
        schedule = {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "peak_lr": self.peak_lr,
                    "min_lr_ratio": self.cfg.train.min_lr_ratio}
        return {"steps_per_epoch": self.steps_per_epoch, "num_samples": self.loader.num_samples,
                "seed": self.cfg.run.seed, "order": self.cfg.data.order,  # quasi_random: ffcv only (config)
                "global_batch_size": self.batch.global_batch_size, "world_size": self.dist.world_size,
                "micro_batch_size": self.batch.micro_batch_size,
                "hinge_on_micro_batch": self._l_r_active(), "schedule": schedule}

    def _l_r_active(self) -> bool:
        """Whether this run's loss has MTO's L_r, whose value depends on the micro-batch size:
        its late blocks compute statistics with gradients."""
        num_early, flags = self.engine.module.block_flags(with_stats=False)
        return any(mode in STATS_WITH_GRADIENTS for _, mode in flags[num_early:])

    def _client_state(self) -> dict:
        return {"global_step": self.global_step, "mto": self.mto_state.state_dict(),
                "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                "overflow_total": self.overflow_total, **self._data_plan()}

    def _resume(self, candidates) -> Optional[Path]:
        """Load the newest complete checkpoint that loads (the checkpointer warns about the others)."""
        tag_dir, client = self.checkpointer.load_newest(self.engine, candidates)
        if tag_dir is None:
            return None
        self.global_step = int(client["global_step"])
        self.mto_state.load_state_dict(client["mto"])
        self.nonfinite_total = int(client.get("nonfinite_total", 0))
        self.nonfinite_streak = int(client.get("nonfinite_streak", 0))
        self.overflow_total = int(client.get("overflow_total", 0))
        for warning in resume_warnings(client, self._data_plan()):
            log.warning("resuming at step %d: %s", self.global_step, warning)
        log.info("resumed from %s at step %d", tag_dir, self.global_step)
        return tag_dir

    def save(self) -> Path:
        # A checkpoint of non-finite weights would be marked complete and become the resume
        # point; stop instead, so that the newest complete checkpoint stays the last good one.
        if not weights_finite(self.engine.module, self.dist.device):
            raise NonFiniteWeightsError(
                f"the weights are not finite at step {self.global_step} (a non-finite gradient was "
                f"applied); {self._stopping_without_saving()}")
        meta = {"epoch": self.global_step / self.steps_per_epoch}
        if self._ends_kept_epoch():
            meta["kept"] = True  # checkpoint.keep_every_epochs: pruning never takes it
        began = time.monotonic()
        path = self.checkpointer.save(self.engine, self.global_step, self._client_state(), meta)
        self.last_saved_step, self.saved_at = self.global_step, time.monotonic()
        self.save_seconds.append(self.saved_at - began)
        if self.dist.rank == 0:  # what a save costs, to set checkpoint.every_minutes by
            log.info("saved %s in %.1f s", path, self.save_seconds[-1])
        return path

    def _ends_kept_epoch(self) -> bool:
        every = self.cfg.checkpoint.keep_every_epochs
        epoch, into_epoch = divmod(self.global_step, self.steps_per_epoch)
        return bool(every) and epoch > 0 and not into_epoch and epoch % every == 0

    def _save_due(self) -> bool:
        """Whether this step saves: every_steps, an epoch that keep_every_epochs keeps or that
        eval.every_epochs evaluates, or a timed save that some rank asked for after the last save."""
        every = self.cfg.checkpoint.every_steps
        return ((every and self.global_step % every == 0) or self._ends_kept_epoch() or self._evaluation_due()
                or self.stop.agreed_save_asked_at > max(self.last_saved_step, 0))  # 0: none asked

    # --- the loop ------------------------------------------------------------------------
    def _micro_batches(self):
        """Micro-batches grouped by optimizer step, from the current data position onward. The
        time this rank waits for them (an epoch's loader start included) goes to data_wait."""
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            stream = self.loader.micro_batches(epoch, step_in_epoch)
            for _ in range(step_in_epoch, self.steps_per_epoch):
                if self.global_step >= self.total_steps:
                    return
                began = time.time()
                micro_batches = []
                for _ in range(self.batch.accumulation):
                    self.faults.stall_in_data(self.dist.rank)
                    micro_batches.append(next(stream))
                self._window_data_wait += time.time() - began
                yield micro_batches

    def _log_row(self, sums: dict, lr: float, images_per_sec: float, data_wait: float) -> dict:
        """The row of a logged step: each output the mean over the global batch's samples;
        `data_wait` this rank's share of the row's time spent waiting for data, of which the row
        keeps the largest over the ranks (the others wait for that rank in the gradient reduction),
        as it does of the ranks' peak memory since the previous row (CUDA only)."""
        scalars = [k for k in LOGGED if sums[k].ndim == 0]
        packed = torch.cat([sums[k].reshape(-1) for k in LOGGED] + [sums["loss"].new_tensor([sums["samples"]])])
        memory = peak_memory_gib(self.dist.device)
        most = packed.new_tensor([data_wait, *(memory or (0.0, 0.0))])
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
        # Two small device-to-host copies for the row (a logged step only)
        most_waited, allocated, reserved = most.tolist()
        *flat, samples = packed.tolist()
        if not samples:  # every rank's micro-batches were stand-ins (loader.py: _collate)
            raise ConfigError(f"bad value for 'data.path': no image of step {self.global_step}'s global batch "
                              f"could be decoded (each named in a warning): is {self.cfg.data.path} damaged or "
                              "still being written?")
        flat, values, offset = [value / samples for value in flat], {}, 0
        for k in LOGGED:
            n = sums[k].numel()
            chunk = flat[offset:offset + n]
            values[k] = chunk[0] if k in scalars else chunk
            offset += n
        # DeepSpeed's norm of the step's gradients, global over ranks; None where it computes none
        # (no clipping under ZeRO-1/2: engine/builder.py:skip_unread_grad_norm).
        grad_norm = self.engine.get_global_grad_norm()
        # fp16's dynamic loss scale after this step (what the next one multiplies the loss by).
        loss_scale = float(self.engine.optimizer.cur_scale) if self.engine.fp16_enabled() else None
        return {"step": self.global_step, "epoch": self.global_step / self.steps_per_epoch, **values,
                "grad_norm": None if grad_norm is None else float(grad_norm), "loss_scale": loss_scale,
                "lr": lr, "images_per_sec": images_per_sec,
                "tflops_per_gpu": images_per_sec * self.flops_per_image / self.dist.world_size / 1e12,
                "data_wait": most_waited,
                "max_memory_allocated_gib": allocated if memory else None,
                "max_memory_reserved_gib": reserved if memory else None, "mto_scale": self.mto_state.loss_scale,
                "nonfinite_steps": self.nonfinite_total, "overflow_steps": self.overflow_total}

    def train(self) -> dict:
        self.last_saved_step = self.global_step if self.resumed_from else -1
        self.saved_at = time.monotonic()  # checkpoint.every_minutes counts from here, then from each save
        start_step, start_time = self.global_step, time.time()
        # Throughput and data wait between logged rows
        self._window_start, self._window_steps, self._window_data_wait = time.time(), 0, 0.0
        reason, failure = "completed", None
        try:
            if self._evaluation_pending():
                # Step 0 with eval.at_start, or the epoch this run resumes at ended but its evaluation
                # was cut short (an error, a kill, a stop signal at that step): do it now, or its
                # point is missing for good.
                with self._off_the_clock():
                    self._maybe_evaluate()
            for micro_batches in self._micro_batches():
                self.profiler.begin(self.global_step + 1)
                self._step(micro_batches)
                with self._off_the_clock():  # writing a trace is not training
                    self.profiler.end(self.global_step)
                if self.run_lock is not None and self.run_lock.lost.is_set():
                    self.stop.taken_over = True  # agreed as a signal is, a step later
                minutes = self.cfg.checkpoint.every_minutes
                timed = minutes and time.monotonic() - self.saved_at >= 60 * minutes
                if self.stop.agreed(self.dist.device, save_asked_at=self.global_step if timed else 0):
                    if self.stop.agreed_code == TAKEN_OVER:
                        # Saving, state.json, the lock: all the other start's now.
                        raise RunDirectoryInUse(
                            f"run.output_dir={self.run_dir} was taken over by another start while this one ran "
                            f"(its running.json heartbeat stalled): this start stopped at step {self.global_step} "
                            "without saving; the other one goes on")
                    reason = f"signal {self.stop.signal_name}"
                    break
                with self._off_the_clock():
                    # An epoch's evaluation comes after its checkpoint, whatever every_steps is: an
                    # evaluation that fails or is killed is done again from it, not after retraining.
                    if self._save_due():
                        self.save()
                    if self._evaluation_due():
                        self._maybe_evaluate()
                        self.saved_at = time.monotonic()  # every_minutes counts training time
            if self.last_saved_step != self.global_step:
                self.save()
        except BaseException as err:
            reason, failure = (f"non-finite weights: {err}" if isinstance(err, NonFiniteWeightsError)
                               else f"non-finite gradients: {err}" if isinstance(err, NonFiniteGradientsError)
                               else f"non-finite loss: {err}" if isinstance(err, NonFiniteLossError)
                               else f"error: {self._where(err)}{type(err).__name__}: {err}"), err
            raise
        finally:
            if self.stop.agreed_code != TAKEN_OVER:  # the run directory is the other start's now
                self.profiler.close()  # a start that stopped inside the profiled steps: the steps it ran
            try:
                self.telemetry.close()  # fails again after a write error in the telemetry
            finally:
                if self.stop.agreed_code != TAKEN_OVER:
                    self._write_state(reason, failure)
                self._release_run_dir()
        self.stop.close()
        elapsed = max(time.time() - start_time, 1e-9)
        ips = (self.global_step - start_step) * self.batch.global_batch_size / elapsed
        if self.dist.rank == 0:
            newest = self.checkpointer.complete_tags()[:1]
            print(self.telemetry.summary(self.run_dir, ips, newest[0] if newest else None, self.global_step,
                                         self.total_steps, reason, self.save_seconds, elapsed), flush=True)
        return {"step": self.global_step, "reason": reason, "images_per_sec": ips}

    def _step(self, micro_batches) -> None:
        """One optimizer step: train, count a non-finite loss, log; the fault hooks act here."""
        step = self.global_step + 1
        log_now = step % self.cfg.run.log_every == 0 or step == self.total_steps
        lr = learning_rate(self.global_step, self.total_steps, self.warmup_steps, self.peak_lr,
                           self.cfg.train.min_lr_ratio)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.trace.record(step, micro_batches)
        try:
            sums, skipped, overflowed = train_step(self.engine, micro_batches, self.mto_state.loss_scale, log_now,
                                                   self.batch.samples_per_micro_batch, self._micro_batch_seeds(),
                                                   poison=self.faults.nan_loss(step, self.dist.rank),
                                                   poison_gradient=self.faults.nan_gradient(step, self.dist.rank))
        except Exception as err:
            # DeepSpeed's loss scaler ends the run with a bare Exception (on every rank: the
            # overflow is agreed) when it cannot lower the scale any further.
            if self.dtype == torch.float16 and "loss scale already at minimum" in str(err):
                raise NonFiniteGradientsError(
                    f"fp16: the gradients of step {step} overflowed at the minimum loss scale "
                    f"(fp16.min_loss_scale={self.ds_config['fp16'].get('min_loss_scale', 1)}) after "
                    f"{self.overflow_total} steps skipped for overflows; {self._stopping_without_saving()}"
                ) from err
            raise
        # fp16's loss scaler skips steps while it calibrates: expected, counted apart. In bf16 or
        # fp32 a step DeepSpeed skips for non-finite gradients is as lost as one with a NaN loss.
        if overflowed and self.dtype == torch.float16:
            self.overflow_total += 1
        else:
            skipped = skipped or overflowed
        self.global_step = step
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        self.nonfinite_total += int(skipped)
        self._log(sums if log_now else None, lr)
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or gradients (steps "
                f"{step - self.nonfinite_streak + 1}-{step}, train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); {self._stopping_without_saving()}")
        self.faults.exit_after(step, self.dist.rank, self.run_dir)

    def _micro_batch_seeds(self) -> list:
        """Dropout and drop-path draw, per micro-batch, from a generator fixed by (seed, step, the
        micro-batch's first place in the global batch): exact resume needs no saved RNG state, and
        on another number of ranks whose micro-batches group the same samples (1 rank accumulating
        2 of 16 where 2 ranks took one each) the same masks are drawn."""
        first = rank_share(self.batch.global_batch_size, self.dist.world_size, self.dist.rank)[0]
        return [hash((self.cfg.run.seed, self.global_step, first + k * self.batch.micro_batch_size)) % 2 ** 62
                for k in range(self.batch.accumulation)]

    def _stopping_without_saving(self) -> str:
        newest = self.checkpointer.complete_tags()[:1]
        return ("stopping without saving. The checkpoints are untouched; the newest is "
                f"{newest[0] if newest else 'none (none was saved)'}")

    @contextlib.contextmanager
    def _off_the_clock(self):
        """Saves and evaluations between two rows are not training: their time is left out of
        the next row's images_per_sec (the run's mean in the summary keeps it)."""
        began = time.time()
        try:
            yield
        finally:
            self._window_start += time.time() - began

    def _log(self, sums: Optional[dict], lr: float) -> None:
        """Advance MTO's state (with this step's statistics when logged) and write the row."""
        self._window_steps += 1
        if sums is None:
            self.mto_state.advance()
        else:
            elapsed = max(time.time() - self._window_start, 1e-9)
            row = self._log_row(sums, lr, self._window_steps * self.batch.global_batch_size / elapsed,
                                self._window_data_wait / elapsed)
            self.mto_state.advance(row["heterogeneity"])
            self.telemetry.log(row)
            self._window_start, self._window_steps, self._window_data_wait = time.time(), 0, 0.0
        self.telemetry.tick(self.global_step)

    def _evaluation_pending(self) -> bool:
        """Whether the current step ends an epoch (or is step 0 with eval.at_start) whose evaluation
        is due and not in metrics.jsonl.
        Rank 0 reads the file and tells the others: they evaluate together."""
        if not self._evaluation_due():
            return False
        pending = [self.dist.rank != 0 or not evaluation_logged(self.run_dir / "metrics.jsonl", self.global_step)]
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.broadcast_object_list(pending, src=0, device=self.dist.device)
        return pending[0]

    def _evaluation_due(self) -> bool:
        """Whether the current step ends an epoch that eval.every_epochs evaluates, or is step 0
        with eval.at_start."""
        if self.global_step == 0:
            return self.cfg.eval.at_start
        every = self.cfg.eval.every_epochs
        epoch, into_epoch = divmod(self.global_step, self.steps_per_epoch)
        return bool(every) and not into_epoch and epoch % every == 0

    def _maybe_evaluate(self) -> None:
        if not self._evaluation_due():
            return
        epoch = self.global_step // self.steps_per_epoch
        from ..eval import evaluate  # eval is optional on the hot path; imported when asked for
        encoder = self.engine.module.encoder
        gathered = contextlib.nullcontext()
        if zero_stage(self.ds_config) == 3:  # ZeRO-3 holds only shards: gather what is evaluated
            import deepspeed
            needed = self.engine.module if self.cfg.eval.reconstructions else encoder
            gathered = deepspeed.zero.GatheredParameters(list(needed.parameters()))
        with gathered:
            if self.dtype != torch.float32:
                encoder = fp32_master_encoder(encoder, self.cfg, self.dist.device)
            result = evaluate(encoder, self.cfg, self.dist.device, self.eval_sets)
            reconstructed = self._reconstruct_held_out()
        self.engine.module.train()
        self.telemetry.log({"step": self.global_step, "epoch": float(epoch), **result, **reconstructed})

    def _reconstruct_held_out(self) -> dict:
        """eval.reconstructions held-out images through the model as it is (the working copy: bf16
        in a bf16 run), masked as `mto-ds reconstruct` masks them: the figure into TensorBoard,
        their mean loss_mim for the evaluation's row. Every rank runs it, as every rank evaluates
        (under ZeRO-3 inside the caller's gathering of the whole model: SimMIM's mask token is used
        outside any block's call); rank 0's telemetry writes."""
        if not self.cfg.eval.reconstructions:
            return {}
        from ..eval.reconstruct import grid, load_held_out, reconstruct_held_out
        if self.held_out is None:
            self.held_out = load_held_out(self.cfg, self.cfg.eval.reconstructions)[0]
        views = reconstruct_held_out(self.engine.module.eval(), self.mask_fn, self.held_out, 0, self.dist.device)
        self.telemetry.image("eval/reconstructions", grid(views), self.global_step)
        return {"loss_mim_held_out": views["loss"].float().mean().item()}

    def _where(self, err: BaseException) -> str:
        """'rank R of W: ' for a failure of this rank's own, which another rank sees only as its
        absence (a closed connection, a timeout) if at all; '' for one every rank raised together."""
        return "" if isinstance(err, AGREED_ERRORS) or self.dist.world_size == 1 else \
            f"rank {self.dist.rank} of {self.dist.world_size}: "

    def _write_state(self, reason: str, failure: Optional[BaseException] = None, in_set_up: bool = False) -> None:
        """Rank 0 writes why this start stopped; a rank that failed on its own writes its failure
        too, and of the failures the first one written stays (write_state's `first`)."""
        own = failure is not None and not isinstance(failure, AGREED_ERRORS)
        if self.dist.rank == 0 or own:
            step, total = (None, None) if in_set_up else (self.global_step, self.total_steps)
            # Finished means every step and every due evaluation done: an error or a stop signal in
            # the last step's evaluation leaves it for the next start (_evaluation_pending).
            finished = reason == "completed" and step >= total
            write_state(self.run_dir, finished, step, total, reason, first=failure is not None)


def peak_memory_gib(device: torch.device) -> Optional[Tuple[float, float]]:
    """The most memory that torch's CUDA allocator held since the previous call, in GiB: in
    tensors (`torch.cuda.max_memory_allocated`, MAE's and DINOv2's "max mem") and reserved from
    the device (what an out-of-memory error counts against); None off CUDA. Resets the peaks."""
    if device.type != "cuda":
        return None
    peaks = torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return peaks


def fp32_master_encoder(encoder: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """An fp32 encoder holding the optimizer's fp32 master weights of a bf16/fp16 engine's
    `encoder` (frozen parameters and buffers as the module holds them): what `mto-ds eval` reads
    from the checkpoint, so an evaluation during pre-training gives the number it gives, and the
    study's curve one protocol (the bf16 working copy ran the residual stream in bf16). Call on
    every rank, in the same order (ZeRO gathers the masters); under ZeRO-3 with the encoder's
    parameters gathered."""
    from deepspeed.utils import safe_get_full_fp32_param

    from ..eval.run import build_encoder  # the encoder `mto-ds eval` builds for the checkpoint

    state = {}
    for name, value in encoder.state_dict(keep_vars=True).items():
        trained = isinstance(value, torch.nn.Parameter) and value.requires_grad
        master = safe_get_full_fp32_param(value) if trained else None
        state[name] = (value if master is None else master).detach().float()
    copy = build_encoder(cfg)
    copy.load_state_dict(state, strict=True)
    return copy.to(device)
