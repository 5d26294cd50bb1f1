"""torch.profiler over a few optimizer steps of a real run (`run.profile_step`), and the trace
writer that tools/bench_step.py's `--profile` shares.

On every rank: RUN/profile/rank<R>_steps<A>-<B>.trace.json.gz (a Chrome trace: Perfetto,
chrome://tracing or TensorBoard's profiler plug-in open it) and .ops.txt beside it (the ops by
own device time, then by own host time, under the GPU's busy share of the profiled span). A run
on many nodes shows there what a one-GPU benchmark cannot: its interconnect's collectives, its
loader and a slow rank.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("mto_ds")


def kernel_busy_share(intervals) -> float:
    """Share of the span from the first kernel's start to the last one's end during which at
    least one kernel ran: 1 minus the GPU's idle gaps (host syncs, launch latency)."""
    if not intervals:
        return float("nan")
    intervals = sorted(intervals)
    busy, (start, end) = 0.0, intervals[0]
    first = start
    for s, e in intervals[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    last = max(e for _, e in intervals)
    return busy / (last - first) if last > first else float("nan")


def write_profile(prof, device: torch.device, trace_path: Path) -> float:
    """Write a finished profile: the Chrome trace (`trace_path`, .trace.json.gz) and the top ops
    by own time (.ops.txt beside it); return the GPU's busy share over it (nan off CUDA). The
    profiler adds host overhead, so gaps can only look larger."""
    from torch.autograd import DeviceType
    prof.export_chrome_trace(str(trace_path))
    ops = prof.key_averages()
    if device.type == "cuda":
        # Kernels only: user annotations on the GPU timeline (e.g. the optimizer step's range)
        # span idle gaps too, and torch's own tables leave them out as well.
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        busy = kernel_busy_share(kernels)
        # By device time, then the host's side: where a launch-bound step spends its time.
        tables = [f"GPU busy {100 * busy:.1f}% of the profiled span",
                  ops.table(sort_by="self_device_time_total", row_limit=25),
                  ops.table(sort_by="self_cpu_time_total", row_limit=25)]
    else:
        busy, tables = float("nan"), ["CPU only", ops.table(sort_by="self_cpu_time_total", row_limit=25)]
    Path(str(trace_path).replace(".trace.json.gz", ".ops.txt")).write_text("\n".join(tables))
    return busy


class StepProfiler:
    """Profiles optimizer steps [first, first + count) of this start on this rank (nothing when
    `first` is None, or already behind the step it starts from). Each step is a `step N` range on
    the trace's host timeline."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, first: Optional[int], count: int):
        self.dir, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self.first, self.last = first, None if first is None else first + count - 1
        self._prof = self._range = None
        self._steps = []

    def begin(self, step: int) -> None:
        """Before optimizer step `step`: starts the profiler at the first, and the step's range."""
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()
        if self._prof is not None:
            self._range = torch.profiler.record_function(f"step {step}")
            self._range.__enter__()
            self._steps.append(step)

    def end(self, step: int) -> None:
        """After optimizer step `step`: ends its range, and at the last one writes the profile."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stops the profiler and writes what it holds (a start that stops early: the steps it
        ran). A trace that cannot be written is a warning, never the run's failure."""
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if self._range is not None:  # a step that raised
            self._range.__exit__(None, None, None)
            self._range = None
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            prof.__exit__(None, None, None)
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"rank{self.rank}_steps{self._steps[0]}-{self._steps[-1]}.trace.json.gz"
            write_profile(prof, self.device, path)
            log.info("profile of steps %d-%d written: %s", self._steps[0], self._steps[-1], path)
        except Exception as err:  # noqa: BLE001 - diagnostics must not end a run
            log.warning("the profile of steps %s could not be written: %s: %s", self._steps, type(err).__name__, err)
