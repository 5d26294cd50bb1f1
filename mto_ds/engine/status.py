"""`mto-ds status RUN...`: where runs stand, read from their files alone (no torch, nothing written).

A run directory says it all: running.json (the start that holds it, alive while it is rewritten),
state.json (why the last start ended), starts.jsonl (each start: its step, ranks and schedule),
metrics.jsonl (the rows) and checkpoints/ (the complete saves). Whether the holder of a
running.json lives is found as a start finds it: by watching the file, not by comparing clocks.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..eval.study import find_run_dirs, read_state
from ..models.weights import complete_checkpoints, kept_for_good, read_marker
from .provenance import STARTS
from .run_dir import BEAT_SECONDS, LOCK, STALE_BEATS, read_or_none, seen_from_here
from .telemetry import step_row

RATE_ROWS = 10  # the speed: the median images/s of the current start's last rows


@dataclass
class RunStatus:
    run_dir: str
    state: str                           # running, unresponsive, finished, stopped, ended unsaid, not started
    detail: Optional[str] = None         # the holder (running, unresponsive) or the reason (stopped)
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None         # the last row's
    metrics_age_s: Optional[float] = None  # since metrics.jsonl was written, by this host's clock
    images_per_sec: Optional[float] = None
    hours_to_go: Optional[float] = None  # at images_per_sec, for a run that has not finished
    checkpoints: List[int] = field(default_factory=list)  # the complete ones' steps, newest first
    kept: List[int] = field(default_factory=list)  # ... those checkpoint.keep_every_epochs keeps for good
    checkpoint_age_s: Optional[float] = None  # since the newest was saved (its complete.json), by this host's clock
    starts: int = 0
    last_start: Optional[dict] = None    # started, step, world_size, job
    began_from: Optional[dict] = None    # model.init_from of the start that began the run's weights
    evaluation: Dict[str, float] = field(default_factory=dict)  # the last evaluation's accuracies, held-out loss, epoch


def is_run_dir(path: Path) -> bool:
    """Any file a start writes: a first start still in set-up, or one that failed there, has no
    config.yaml yet."""
    return any((Path(path) / name).exists() for name in
               ("config.yaml", "state.json", LOCK, STARTS, "metrics.jsonl", "checkpoints"))


def runs_at(paths: List[Path]) -> List[Path]:
    """Each path that is a run directory, or the run directories below it (a sweep, a study, runs/);
    StudyError names a path that is neither."""
    return [run for path in map(Path, paths) for run in ([path] if is_run_dir(path) else find_run_dirs([path]))]


def _metrics(path: Path):
    """(The last RATE_ROWS * 2 training rows, the last evaluation row or None): the file streamed,
    only those lines parsed (a long run's file holds tens of megabytes of per-block lists)."""
    rows, evaluation = deque(maxlen=RATE_ROWS * 2), None
    if path.is_file():
        with open(path, errors="replace") as f:
            for line in f:
                if '_top1"' in line:
                    evaluation = step_row(line) or evaluation
                elif '"loss"' in line:
                    rows.append(line)
    return [row for row in map(step_row, rows) if row is not None], evaluation


def read_run(run_dir) -> RunStatus:
    """What the files of `run_dir` say, the holder of its running.json taken at its word
    (`watch_holders` finds out whether it lives)."""
    run_dir = Path(run_dir)
    status = RunStatus(str(run_dir), "not started")
    state = read_state(run_dir)
    starts = [step_row(line) for line in (read_or_none(run_dir / STARTS) or "").splitlines()]
    starts = [start for start in starts if start is not None]
    rows, evaluation = _metrics(run_dir / "metrics.jsonl")
    complete = complete_checkpoints(run_dir / "checkpoints")
    status.checkpoints = [int(tag.name.removeprefix("step_")) for tag in complete]
    status.kept = [int(tag.name.removeprefix("step_")) for tag in complete if kept_for_good(tag)]
    try:
        saved = read_marker(complete[0]).get("time") if complete else None  # by the saving rank 0's clock
    except (OSError, ValueError):  # unreadable: a resume would set it aside as damaged
        saved = None
    if saved is not None:  # what a kill now would lose: the training since then
        status.checkpoint_age_s = max(time.time() - saved, 0.0)
    status.starts = len(starts)
    if starts:
        last = starts[-1]
        status.last_start = {key: last.get(key) for key in ("started", "step", "world_size", "job")}
        status.total_steps = last.get("total_steps")
        # The last start that resumed nothing began the weights the run holds (resume=none starts afresh).
        fresh = [start for start in starts if not start.get("resumed_from")]
        status.began_from = fresh[-1].get("initialised_from") if fresh else None
    if rows:
        status.step, status.epoch, status.loss = rows[-1]["step"], rows[-1].get("epoch"), rows[-1]["loss"]
        status.metrics_age_s = max(time.time() - (run_dir / "metrics.jsonl").stat().st_mtime, 0.0)
    claim = read_or_none(run_dir / LOCK)
    if claim is not None:
        holder, ended = seen_from_here(claim)
        status.state, status.detail = ("ended unsaid", f"{holder}: {ended}") if ended else ("running", holder)
    elif state is not None:
        status.state = "finished" if state.get("finished") else "stopped"
        status.detail = state.get("reason")
        status.total_steps = state.get("total_steps") or status.total_steps
        if isinstance(state.get("step"), int):
            status.step = max(status.step or 0, state["step"])
    elif starts or rows:
        status.state, status.detail = "ended unsaid", "no state.json: a start killed before it wrote one"
    if status.step is None and status.checkpoints:
        status.step = status.checkpoints[0]
    _speed(status, rows, starts)
    if evaluation is not None:
        status.evaluation = {k: v for k, v in evaluation.items() if k.endswith(("_top1", "_held_out")) or k == "epoch"}
    return status


def _speed(status: RunStatus, rows: List[dict], starts: List[dict]) -> None:
    """images/s of the current start's last rows (another world size runs at another speed), and
    the hours left at that speed for a run that has not finished."""
    since = starts[-1].get("step", 0) if starts else 0
    rates = [row["images_per_sec"] for row in rows if row["step"] > since and row.get("images_per_sec")]
    if not rates:
        return
    status.images_per_sec = statistics.median(rates[-RATE_ROWS:])
    batch = starts[-1].get("global_batch_size") if starts else None
    if status.state != "finished" and batch and status.total_steps and status.step is not None:
        status.hours_to_go = (status.total_steps - status.step) * batch / status.images_per_sec / 3600


def watch_holders(statuses: List[RunStatus], beat: float = BEAT_SECONDS, beats: int = 2) -> None:
    """The running.json of each "running" status watched together for up to `beats` beats: one
    rewritten lives; one that stays the same makes its run "unresponsive" (a start takes the
    directory over once it stays so for STALE_BEATS beats); one removed meanwhile ended, and its
    run is read again."""
    watched = {i: read_or_none(Path(s.run_dir) / LOCK) for i, s in enumerate(statuses) if s.state == "running"}
    deadline = time.monotonic() + beats * beat
    while watched and time.monotonic() < deadline:
        time.sleep(min(0.5, beat / 4))
        for i, text in list(watched.items()):
            now = read_or_none(Path(statuses[i].run_dir) / LOCK)
            if now is None:
                statuses[i] = read_run(statuses[i].run_dir)
            if now != text:
                del watched[i]
    for i in watched:
        statuses[i].state = "unresponsive"
        statuses[i].detail = (f"{statuses[i].detail}; its {LOCK} unchanged for {beats * beat:g} s (a start "
                              f"takes the run over once it stays so for {STALE_BEATS * beat:g} s)")


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h', '2.5 d'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} d"


def describe_status(status: RunStatus) -> List[str]:
    """The lines `mto-ds status` prints for one run."""
    where = ""
    if status.step is not None:
        where = f" at step {status.step}" + (f" of {status.total_steps}" if status.total_steps else "")
        if status.total_steps and status.state != "finished":
            where += f" ({100 * status.step / status.total_steps:.1f}%)"
        if status.epoch is not None:
            where += f", epoch {status.epoch:.2f}"
    lines = [f"{status.run_dir}: {status.state}{where}" + (f": {status.detail}" if status.detail else "")]
    if status.loss is not None:
        lines.append(f"  loss         {status.loss:.4f} at step {status.step}; metrics.jsonl written "
                     f"{_duration(status.metrics_age_s)} ago")
    if status.images_per_sec:
        speed = f"  speed        {status.images_per_sec:.1f} images/s (the last start's rows)"
        if status.hours_to_go is not None:
            left = _duration(status.hours_to_go * 3600)
            speed += f"; {status.total_steps - status.step} steps to go: about {left} at that speed"
        lines.append(speed)
    if status.evaluation:
        values = ", ".join(f"{k} {v:.4g}" for k, v in status.evaluation.items() if k != "epoch")
        lines.append(f"  evaluation   {values} (epoch {status.evaluation.get('epoch', 0):g})")
    if status.began_from:
        began = status.began_from
        what = (f"its checkpoint {began['tag']}, step {began['step']}" if began.get("tag")
                else f"a file of {began.get('bytes', 0) / 1e6:.1f} MB")
        lines.append(f"  began from   {began['path']} ({what})")
    newest = ", ".join(map(str, status.checkpoints[:3])) + (", ..." if len(status.checkpoints) > 3 else "")
    shown = status.kept if len(status.kept) <= 5 else status.kept[:2] + ["..."] + status.kept[-2:]
    kept = f"; {len(status.kept)} kept for good: step {', '.join(map(str, shown))}" if status.kept else ""
    age = f" (the newest saved {_duration(status.checkpoint_age_s)} ago)" if status.checkpoint_age_s is not None else ""
    lines.append(f"  checkpoints  {len(status.checkpoints)} complete" + (f": step {newest}" if newest else "")
                 + age + kept)
    if status.last_start:
        last = status.last_start
        lines.append(f"  starts       {status.starts}; the last at {last['started']} from step {last['step']} on "
                     f"{last['world_size']} rank{'s' if last['world_size'] != 1 else ''}"
                     + (f" ({last['job']})" if last.get("job") else ""))
    return lines


def status_report(run_dirs: List[Path], as_json: bool = False, beat: float = BEAT_SECONDS) -> str:
    statuses = [read_run(run_dir) for run_dir in run_dirs]
    watch_holders(statuses, beat)
    if as_json:
        return json.dumps([asdict(status) for status in statuses], indent=1)
    return "\n".join(line for status in statuses for line in describe_status(status))
