"""Telemetry of rank 0: metrics.jsonl, TensorBoard, a progress bar, and the closing summary."""
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Optional, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("mto_ds")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a block whose statistic was not computed reads null
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def step_row(line: str) -> Optional[dict]:
    """A line of metrics.jsonl (or of another JSON-lines file of rows with a step: starts.jsonl)
    as its row, or None when it is not one (a write cut short)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step", 0) if isinstance(row, dict) else None
    return row if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def set_aside_rows_after(path: Path, step: int) -> int:
    """Moves the rows of a JSON-lines file (one {"step": ...} a line) after `step`, and every line
    that is not a row, to PATH.superseded; the file keeps the rest, replaced whole. Returns how
    many lines were not rows. For the steps a resume runs again: metrics.jsonl, the sample trace."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, later, unreadable = [], [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        row = step_row(line)
        if row is None:
            unreadable += 1
        (later if row is None or row.get("step", 0) > step else keep).append(line)
    if later:
        with open(path.with_name(path.name + ".superseded"), "a") as f:
            f.write("\n".join(later) + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    return unreadable


def evaluation_logged(metrics_path: Path, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation row (k-NN / probe accuracies) for `step`."""
    if not Path(metrics_path).is_file():
        return False
    rows = map(step_row, Path(metrics_path).read_text(errors="replace").splitlines())
    return any(row is not None and row.get("step") == step and any(k.endswith("_top1") for k in row)
               for row in rows)


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress_bar: bool,
                 resumed: bool = True):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self.first: Optional[dict] = None
        self.last: Optional[dict] = None
        self.data_waits: list = []  # (data_wait, step) of each logged row, for the summary
        self.peak_memory: Dict[str, float] = {}  # the largest of each memory key over the rows (CUDA)
        self.writer = None
        self.bar = None
        self._while_bar = ExitStack()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            # Events of steps after the one this run starts from (logged before a crash, or by a
            # history an explicit checkpoint.resume left) are hidden, as their rows are moved below.
            # Started afresh (no checkpoint), nothing earlier is kept, step 0's evaluation of the
            # initial encoder (eval.at_start) included: it is of this start's settings.
            kept_through = start_step if resumed else -1
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=kept_through + 1)
            self._set_aside_rows_after(kept_through)
            self.file = open(self.metrics_path, "a")
            if progress_bar:
                # Into a file (a Slurm job's log) each refresh is one more line of `\r` updates
                # that is never overwritten: there, one a minute.
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                mininterval=0.1 if sys.stderr.isatty() else 60.0)
                # Log lines written into the bar's line began where the bar ended ("...ips=80,
                # loss=0.79][12:01 rank0] INFO ..."): through tqdm, each is a line of its own above it.
                self._while_bar.enter_context(logging_redirect_tqdm())

    def _set_aside_rows_after(self, step: int) -> None:
        """Rows logged after the checkpoint this run starts from (a crash between saves) are
        logged again by this run: move them to metrics.jsonl.superseded so each step is in
        metrics.jsonl once, and nothing is lost. So is a line that is not a row (a write cut
        short by a crash or a full disk), with a warning: it must not stop the run's resume."""
        unreadable = set_aside_rows_after(self.metrics_path, step)
        if unreadable:
            log.warning("%s: %d line(s) that are not a JSON row (a write cut short?) moved to "
                        "metrics.jsonl.superseded", self.metrics_path, unreadable)

    def tick(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, row: Dict) -> None:
        """One row per logged optimizer step: scalars and per-block lists."""
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        for key, value in row.items():
            if key in ("step",) or value is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                section = "eval" if key.endswith(("_top1", "_held_out")) else "train"
                self.writer.add_scalar(f"{section}/{key}" if "/" not in key else key, value, step)
            elif isinstance(value, list):
                for block, v in enumerate(value):
                    if v is not None:
                        self.writer.add_scalar(f"mto/{key}/block_{block:02d}", v, step)
        if row.get("loss") is not None:  # null: a step skipped for a non-finite loss
            self.first = self.first or row
            self.last = row
        if row.get("data_wait") is not None:
            self.data_waits.append((row["data_wait"], step))
        for key in ("max_memory_allocated_gib", "max_memory_reserved_gib"):
            if row.get(key) is not None:
                self.peak_memory[key] = max(self.peak_memory.get(key, 0.0), row[key])
        if "loss" in row and self.bar is not None:
            loss = "nan" if row["loss"] is None else f"{row['loss']:.4f}"
            self.bar.set_postfix(loss=loss, ips=f"{row.get('images_per_sec') or 0:.0f}")

    def image(self, tag: str, image, step: int) -> None:
        """An image [3, H, W] in [0, 1] into TensorBoard at `step` (rank 0's telemetry only)."""
        if self.enabled:
            self.writer.add_image(tag, image, step)
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._while_bar.close()
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
            self.file.close()

    def summary(self, run_dir: Path, images_per_sec: float, checkpoint: Optional[Path], step: int,
                total_steps: int, reason: str, save_seconds: Sequence[float] = (), seconds: float = 0.0) -> str:
        """The closing lines: how the start ended (finished, or stopped and how to go on), the loss
        it logged from first to last, what its saves took (`save_seconds` each, of its `seconds`),
        and where its outputs are."""
        if reason == "completed":
            ended = f"mto_ds pre-training finished: step {step} of {total_steps}"
        else:
            ended = (f"mto_ds pre-training stopped at step {step} of {total_steps} ({reason}); the same command "
                     "resumes it")
        if self.first is None:
            nothing = "nothing left to train" if reason == "completed" else "no step logged"
            return f"{ended}: {nothing}. Run directory: {run_dir}"
        loss = f"{self.first['loss']:.4f} (step {self.first['step']})"
        if self.last is not self.first:
            loss += f" -> {self.last['loss']:.4f} (step {self.last['step']})"
        lines = [
            "",
            ended,
            f"  loss            {loss}",
            f"  throughput      {images_per_sec:.1f} images/s (mean over the run)",
            *([f"  saves           {len(save_seconds)}, {statistics.median(save_seconds):.1f} s each (median), "
               f"{100 * sum(save_seconds) / max(seconds, 1e-9):.1f}% of this start's time"] if save_seconds else []),
            *([self._data_wait_line()] if self.data_waits else []),
            *([f"  memory          {self.peak_memory['max_memory_allocated_gib']:.1f} GiB in tensors, "
               f"{self.peak_memory['max_memory_reserved_gib']:.1f} GiB reserved at most (the largest rank's)"]
              if self.peak_memory else []),
            f"  run directory   {run_dir}",
            f"  metrics         {self.metrics_path}",
            f"  checkpoint      {checkpoint if checkpoint else 'none saved'}",
            f"  TensorBoard     tensorboard --logdir {self.tb_dir}",
        ]
        return "\n".join(lines)

    def _data_wait_line(self) -> str:
        """The median row's data_wait, and the largest: an epoch's first row, which starts the
        loader, can be most of a short run's mean."""
        median = statistics.median(wait for wait, _ in self.data_waits)
        most, at = max(self.data_waits)
        return (f"  data wait       {100 * median:.1f}% of the time (median of the rows; "
                f"{100 * most:.1f}% at most, step {at})")
