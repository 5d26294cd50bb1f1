"""Fault injection and a sample trace, off unless switched on by environment variables.

They make failures happen at a chosen point so the tests (and a user checking a cluster) can
see what the run does then; docs/ROBUSTNESS.md lists them. Steps are numbered as in
metrics.jsonl: step N is the N-th optimizer step.

    MTO_DS_FAULT_NAN_STEPS=3,4      the loss is NaN at these steps
    MTO_DS_FAULT_NAN_RANK=1         ... on this rank only (default: on every rank)
    MTO_DS_FAULT_NAN_GRAD_STEPS=3   the loss is finite but its gradient is NaN at these steps (on
                                    MTO_DS_FAULT_NAN_RANK's rank, or every rank): the step that
                                    DeepSpeed applies when it does not scan gradients for overflow
    MTO_DS_FAULT_EXIT_AT_STEP=N     one rank exits hard (os._exit) right after step N, once per
                                    run directory (a marker file there records that it happened)
    MTO_DS_FAULT_EXIT_RANK=1        ... that rank (default 1); also for the next one
    MTO_DS_FAULT_RAISE_AT_STEP=N    that rank raises InjectedFault right after step N, every time:
                                    a Python error on one rank, as a CUDA out-of-memory is
    MTO_DS_FAULT_SAVE_STALL=N[:S]   every rank sleeps S seconds (default 3600) inside the save of
                                    step N, after DeepSpeed wrote its files and before the
                                    checkpoint is marked complete: the window a kill -9 tests
    MTO_DS_FAULT_SAVE_STALL_UNTIL=P ... or until the file P exists (a test ends the stall when it
                                    has seen what it waited for, on a machine of any speed)
    MTO_DS_FAULT_DATA_STALL=S[:R]   each micro-batch reaches rank R (default: every rank) S seconds
                                    late: a loader that cannot keep up, as metrics.jsonl's
                                    data_wait reports it
    MTO_DS_TRACE_SAMPLES=1          each rank appends the sample indices of every step to
                                    RUN_DIR/samples/rank<R>.jsonl (a resume sets aside the rows of
                                    the steps it runs again, as metrics.jsonl's)
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, List, Optional

from .telemetry import set_aside_rows_after

log = logging.getLogger("mto_ds")
EXIT_CODE = 17


class InjectedFault(RuntimeError):
    """MTO_DS_FAULT_RAISE_AT_STEP's error."""


def _int(env, name: str) -> Optional[int]:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def _steps(env, name: str) -> FrozenSet[int]:
    steps = env.get(name, "").replace(" ", "")
    try:
        return frozenset(int(s) for s in steps.split(",") if s)
    except ValueError:
        raise ValueError(f"{name}={steps!r}: expected step numbers like 3,4") from None


@dataclass(frozen=True)
class Faults:
    nan_steps: FrozenSet[int] = frozenset()
    nan_rank: Optional[int] = None
    nan_grad_steps: FrozenSet[int] = frozenset()
    exit_at_step: Optional[int] = None
    exit_rank: int = 1
    raise_at_step: Optional[int] = None
    save_stall_step: Optional[int] = None
    save_stall_seconds: float = 3600.0
    save_stall_until: Optional[str] = None
    data_stall_seconds: float = 0.0
    data_stall_rank: Optional[int] = None

    @classmethod
    def from_env(cls, env=os.environ) -> "Faults":
        nan_steps, nan_grad_steps = (_steps(env, name) for name in ("MTO_DS_FAULT_NAN_STEPS",
                                                                      "MTO_DS_FAULT_NAN_GRAD_STEPS"))
        stall = env.get("MTO_DS_FAULT_SAVE_STALL", "").strip()
        stall_step, _, seconds = stall.partition(":")
        try:
            stall_step, seconds = int(stall_step) if stall_step else None, float(seconds) if seconds else 3600.0
        except ValueError:
            raise ValueError(f"MTO_DS_FAULT_SAVE_STALL={stall!r}: expected STEP or STEP:SECONDS") from None
        exit_rank = _int(env, "MTO_DS_FAULT_EXIT_RANK")
        data_stall = env.get("MTO_DS_FAULT_DATA_STALL", "").strip()
        data_seconds, _, data_rank = data_stall.partition(":")
        try:
            data_seconds, data_rank = float(data_seconds or 0), int(data_rank) if data_rank else None
        except ValueError:
            raise ValueError(f"MTO_DS_FAULT_DATA_STALL={data_stall!r}: expected SECONDS or SECONDS:RANK") from None
        return cls(nan_steps=nan_steps, nan_rank=_int(env, "MTO_DS_FAULT_NAN_RANK"), nan_grad_steps=nan_grad_steps,
                   exit_at_step=_int(env, "MTO_DS_FAULT_EXIT_AT_STEP"),
                   raise_at_step=_int(env, "MTO_DS_FAULT_RAISE_AT_STEP"),
                   exit_rank=1 if exit_rank is None else exit_rank,
                   save_stall_step=stall_step, save_stall_seconds=seconds,
                   save_stall_until=env.get("MTO_DS_FAULT_SAVE_STALL_UNTIL") or None,
                   data_stall_seconds=data_seconds, data_stall_rank=data_rank)

    def nan_loss(self, step: int, rank: int) -> bool:
        return step in self.nan_steps and self.nan_rank in (None, rank)

    def nan_gradient(self, step: int, rank: int) -> bool:
        return step in self.nan_grad_steps and self.nan_rank in (None, rank)

    def exit_after(self, step: int, rank: int, run_dir: Path) -> None:
        if step == self.raise_at_step and rank == self.exit_rank:
            raise InjectedFault(f"fault injection: rank {rank} fails after step {step}")
        if step != self.exit_at_step or rank != self.exit_rank:
            return
        marker = Path(run_dir) / f"fault_exit_at_step_{step}.done"
        if marker.exists():
            return
        marker.write_text(f"rank {rank} exited after step {step}\n")
        log.error("fault injection: rank %d exits hard after step %d", rank, step)
        logging.shutdown()
        os._exit(EXIT_CODE)

    def stall_in_data(self, rank: int) -> None:
        if self.data_stall_seconds > 0 and self.data_stall_rank in (None, rank):
            time.sleep(self.data_stall_seconds)

    def stall_in_save(self, step: int, tag: str) -> None:
        if step == self.save_stall_step:
            log.warning("fault injection: stalling %.0f s inside the save of %s", self.save_stall_seconds, tag)
            deadline = time.monotonic() + self.save_stall_seconds
            while time.monotonic() < deadline and not (self.save_stall_until and Path(self.save_stall_until).exists()):
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


class SampleTrace:
    """Which samples each rank consumed at each step, for sample-by-sample accounting."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, enabled: Optional[bool] = None,
                 start_step: int = 0):
        if enabled is None:
            enabled = os.environ.get("MTO_DS_TRACE_SAMPLES", "") not in ("", "0")
        self.path = Path(run_dir) / "samples" / f"rank{rank}.jsonl" if enabled else None
        self.rank, self.world_size = rank, world_size
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Steps after the checkpoint this start resumes from (a crash between saves) run
            # again: their earlier rows go to .superseded, as metrics.jsonl's do. Rank 0 also
            # trims the files of ranks this start does not have (an earlier, larger world).
            mine = [self.path] + ([p for p in self.path.parent.glob("rank*.jsonl")
                                   if int(p.stem[len("rank"):]) >= world_size] if rank == 0 else [])
            for path in mine:
                set_aside_rows_after(path, start_step)

    def record(self, step: int, micro_batches: List[dict]) -> None:
        if self.path is None:
            return
        row = {"step": step, "rank": self.rank, "world_size": self.world_size,
               "micro_batches": [b["index"].tolist() for b in micro_batches]}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
