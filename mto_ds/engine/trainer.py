"""The pre-training run: components built once, then the loop over optimizer steps."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config, to_yaml
from ..data import build_pretrain_loader
from ..data.order import steps_per_epoch
from ..models import create_mim_model, mask_fn_for
from ..mto.state import MTOState
from .builder import (BatchPlan, deepspeed_config, param_groups, plan_batch, precision, schedule_steps,
                      zero_stage)
from .checkpoint import Checkpointer, read_marker, to_universal
from .distributed import DistInfo, init_distributed
from .signals import StopRequest
from .step import LOGGED, train_step
from .telemetry import Telemetry

log = logging.getLogger("mto_ds")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    pass


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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

    def __init__(self, cfg: Config):
        import deepspeed

        self.cfg = cfg
        self.dist = init_distributed()
        self.run_dir = Path(cfg.run.output_dir)
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        m = cfg.model
        model = create_mim_model(m.arch, m.method, img_size=m.img_size, mto=cfg.mto, drop_path=m.drop_path,
                                 activation_checkpointing=cfg.train.activation_checkpointing,
                                 decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                                 decoder_num_heads=m.decoder_num_heads, norm_pix_loss=m.norm_pix_loss)
        self.batch = plan_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.dist.world_size)
        mask_fn = mask_fn_for(model, m.method, m.img_size, m.mask_ratio, m.mask_patch_size)
        self.loader = build_pretrain_loader(
            cfg.data, method=m.method, img_size=m.img_size, seed=cfg.run.seed,
            global_batch_size=self.batch.global_batch_size, micro_batch_size=self.batch.micro_batch_size,
            rank=self.dist.rank, world_size=self.dist.world_size, mask_fn=mask_fn)
        self.steps_per_epoch = steps_per_epoch(self.loader.num_samples, self.batch.global_batch_size)
        self.total_steps, warmup = schedule_steps(cfg, self.steps_per_epoch)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                         self.dist.rank, self.dist.world_size)
        self.ds_config = deepspeed_config(cfg, self.batch, self.total_steps, warmup)
        candidates = self.checkpointer.candidates(cfg.checkpoint.resume)
        self.universal = bool(candidates) and read_marker(candidates[0])["world_size"] != self.dist.world_size
        if self.universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
                                               config=self.ds_config)
        self.dtype = DTYPES[precision(self.ds_config)]
        self.mto_state = MTOState(warmup_steps=cfg.mto.warmup_steps)
        self.global_step = 0
        self.nonfinite_total = 0
        self.resumed_from = self._resume(candidates)
        self.stop = StopRequest()
        self.telemetry = Telemetry(self.run_dir, self.dist.rank == 0, self.total_steps, self.global_step,
                                   cfg.run.progress_bar)
        log.info("world %d, batch %s, %d steps/epoch, %d steps in all, ZeRO-%d, %s",
                 self.dist.world_size, self.batch, self.steps_per_epoch, self.total_steps,
                 zero_stage(self.ds_config), precision(self.ds_config))

    # --- checkpoints -------------------------------------------------------------------
    def _client_state(self) -> dict:
        return {"global_step": self.global_step, "mto": self.mto_state.state_dict(),
                "nonfinite_total": self.nonfinite_total, "steps_per_epoch": self.steps_per_epoch}

    def _resume(self, candidates) -> Optional[Path]:
        """Load the newest complete checkpoint; on failure warn and fall back to the one before."""
        for tag_dir in candidates:
            error = None
            try:
                if self.universal:
                    if self.dist.rank == 0:
                        to_universal(tag_dir)
                    if dist.is_initialized():
                        dist.barrier()
                    tag_dir = tag_dir.with_name(tag_dir.name + "_universal")
                path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
                ok = path is not None and client is not None
            except Exception as err:  # a damaged checkpoint: try the previous one
                ok, error = False, err
            flag = torch.tensor([1.0 if ok else 0.0], device=self.dist.device)
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item():
                self.global_step = int(client["global_step"])
                self.mto_state.load_state_dict(client["mto"])
                self.nonfinite_total = int(client.get("nonfinite_total", 0))
                log.info("resumed from %s at step %d", tag_dir, self.global_step)
                return tag_dir
            log.warning("checkpoint %s could not be loaded (%s); falling back to the one before it",
                        tag_dir, error or "incomplete on some rank")
        if candidates:
            raise RuntimeError(f"no checkpoint under {self.checkpointer.dir} could be loaded")
        return None

    def save(self) -> Path:
        meta = {"zero_stage": zero_stage(self.ds_config), "epoch": self.global_step / self.steps_per_epoch}
        path = self.checkpointer.save(self.engine, self.global_step, self._client_state(), meta)
        self.last_saved_step = self.global_step
        return path

    # --- the loop ------------------------------------------------------------------------
    def _micro_batches(self):
        """Micro-batches grouped by optimizer step, from the current data position onward."""
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            stream = self.loader.micro_batches(epoch, step_in_epoch)
            for _ in range(step_in_epoch, self.steps_per_epoch):
                if self.global_step >= self.total_steps:
                    return
                yield [next(stream) for _ in range(self.batch.accumulation)]

    def _log_row(self, means: dict, lr: float, images_per_sec: float) -> dict:
        scalars = [k for k in LOGGED if means[k].ndim == 0]
        packed = torch.cat([means[k].reshape(-1) for k in LOGGED])
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed /= self.dist.world_size
        values, offset = {}, 0
        for k in LOGGED:
            n = means[k].numel()
            chunk = packed[offset:offset + n].tolist()
            values[k] = chunk[0] if k in scalars else chunk
            offset += n
        return {"step": self.global_step, "epoch": self.global_step / self.steps_per_epoch, **values,
                "lr": lr, "images_per_sec": images_per_sec, "mto_scale": self.mto_state.loss_scale,
                "nonfinite_steps": self.nonfinite_total}

    def train(self) -> dict:
        cfg = self.cfg
        self.last_saved_step = self.global_step if self.resumed_from else -1
        start_step, start_time = self.global_step, time.time()
        window_time, window_steps, consecutive_bad, reason = time.time(), 0, 0, "completed"
        try:
            for micro_batches in self._micro_batches():
                # Dropout and drop-path draw from a generator fixed by (seed, step, rank): exact resume
                # needs no saved RNG state.
                torch.manual_seed(hash((cfg.run.seed, self.global_step, self.dist.rank)) % 2 ** 62)
                log_now = (self.global_step + 1) % cfg.run.log_every == 0 or self.global_step + 1 == self.total_steps
                lr = self.engine.optimizer.param_groups[0]["lr"]  # what this step uses
                means, skipped = train_step(self.engine, micro_batches, self.mto_state.loss_scale, log_now, self.dtype)
                self.global_step += 1
                window_steps += 1
                consecutive_bad = consecutive_bad + 1 if skipped else 0
                self.nonfinite_total += int(skipped)
                if consecutive_bad >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{consecutive_bad} optimizer steps in a row had a non-finite loss (last at step "
                        f"{self.global_step}); stopping. The last good checkpoint is untouched: "
                        f"{self.checkpointer.complete_tags()[0] if self.checkpointer.complete_tags() else 'none'}")
                if log_now:
                    ips = window_steps * self.batch.global_batch_size / max(time.time() - window_time, 1e-9)
                    row = self._log_row(means, lr, ips)
                    self.mto_state.advance(row["heterogeneity"])
                    self.telemetry.log(row)
                    window_time, window_steps = time.time(), 0
                else:
                    self.mto_state.advance()
                self.telemetry.tick(self.global_step)
                every = cfg.checkpoint.every_steps
                if every and self.global_step % every == 0:
                    self.save()
                if self.global_step % self.steps_per_epoch == 0:
                    self._maybe_evaluate()
                if self.stop.agreed():
                    reason = f"signal {self.stop.signal_name}"
                    break
            if self.last_saved_step != self.global_step:
                self.save()
        except NonFiniteLossError as err:
            reason = f"non-finite loss: {err}"
            raise
        finally:
            self.telemetry.close()
            self._write_state(reason)
        elapsed = max(time.time() - start_time, 1e-9)
        ips = (self.global_step - start_step) * self.batch.global_batch_size / elapsed
        if self.dist.rank == 0:
            print(self.telemetry.summary(self.run_dir, ips, self.checkpointer.complete_tags()[:1][0]
                                         if self.checkpointer.complete_tags() else None), flush=True)
        return {"step": self.global_step, "reason": reason, "images_per_sec": ips}

    def _maybe_evaluate(self) -> None:
        every = self.cfg.eval.every_epochs
        epoch = self.global_step // self.steps_per_epoch
        if not every or epoch % every:
            return
        from ..eval import evaluate  # eval is optional on the hot path; imported when asked for
        encoder = self.engine.module.encoder
        if zero_stage(self.ds_config) == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(encoder.parameters())):
                result = evaluate(encoder, self.cfg, self.dist.device)
        else:
            result = evaluate(encoder, self.cfg, self.dist.device)
        self.engine.module.train()
        self.telemetry.log({"step": self.global_step, "epoch": float(epoch), **result})

    def _write_state(self, reason: str) -> None:
        if self.dist.rank != 0:
            return
        state = {"finished": self.global_step >= self.total_steps, "step": self.global_step,
                 "total_steps": self.total_steps, "reason": reason}
        _write_atomic(self.run_dir / "state.json", json.dumps(state, indent=1))
