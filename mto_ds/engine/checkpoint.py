"""DeepSpeed checkpoints that become the newest only once complete on every rank.

Layout under run_dir/checkpoints/:
    step_00000120/                 engine.save_checkpoint(tag=...) output of all ranks
    step_00000120/complete.json    written by rank 0 once every rank has written its part and
                                   every node has flushed it to storage (fsync): the step, the
                                   world size and the size of every file of the save, and
                                   `kept` where checkpoint.keep_every_epochs keeps it for good
    step_00000120_universal/       the same, converted by ds_to_universal for another world size
    latest                         DeepSpeed's pointer file, rewritten atomically after complete.json
    latest_universal               the same for the newest universal conversion
    step_00000150.damaged/         a complete checkpoint that failed to load, set aside (kept for
                                   inspection; resume and pruning never look at it again)
    step_00000150.superseded/      a complete checkpoint newer than the step an explicit
                                   checkpoint.resume went back to, set aside as well; a second one
                                   of the same step becomes step_00000150.superseded.2, and so on
    resume_applied.json            which explicit checkpoint.resume a job applied, so that its
                                   restarts continue instead of applying it again, and a later
                                   resume=auto never takes the history it replaced
A save killed midway leaves a tag without complete.json: resume never picks it, the next save
of that step replaces it, and the next pruning removes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data.order import ranks
from ..models.weights import (MARKER, TAG, complete_checkpoints, convert_to_universal, converted_from, kept_for_good,
                              model_differences, read_marker, universal_dir)
from .builder import precision, zero_stage
from .distributed import agree
from .faults import Faults
from .signals import STOP_SIGNALS
from .storage import atomic_write, flush_to_storage, unused_path

log = logging.getLogger("mto_ds")
# Which explicit checkpoint.resume a job applied, so that its restarts do not apply it again.
RESUME_RECORD = "resume_applied.json"
# What pruning may delete: a tag, its universal conversion, and a conversion cut short or the
# record of one that failed (group 3: always deleted).
PRUNABLE = re.compile(r"(step_\d{8})(_universal(\.tmp|\.failed)?)?")


class CheckpointWriteError(OSError):
    """A save that could not write its files (a full disk, a quota, an I/O error)."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def file_sizes(tag_dir: Path) -> dict:
    return {str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(Path(tag_dir).rglob("*")) if p.is_file() and p.name != MARKER}


def verify(tag_dir: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (missing, truncated), or None.

    A size check: cheap on a checkpoint of many GB, and it catches what a killed copy or a full
    disk leaves. Damage that keeps the size shows up as a load error instead.
    """
    try:
        marker = read_marker(tag_dir)
    except (OSError, ValueError) as err:
        return f"unreadable {MARKER}: {err}"
    for name, size in marker.get("files", {}).items():
        path = Path(tag_dir) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


@dataclass
class CheckpointSpace:
    """The disk a run's checkpoints take, from DeepSpeed's layout of ours."""
    bytes_per_param: int
    each: float      # bytes of one checkpoint
    kept: int        # checkpoints kept for good over the run (checkpoint.keep_every_epochs)
    at_once: float   # the most bytes at once: keep_last, the save in flight and those kept for good

    def warning(self, run_dir: Path) -> List[str]:
        """A warning when run_dir's file system cannot hold that (what the run's checkpoints
        already hold counts as room; what was set aside, `.damaged` or `.superseded`, stays and does
        not): a save that finds the disk full stops the run, hours in."""
        checkpoints = Path(run_dir) / "checkpoints"
        saves = [p for p in checkpoints.glob("step_*") if PRUNABLE.fullmatch(p.name)] if checkpoints.is_dir() else []
        held = sum(f.stat().st_size for save in saves for f in [save, *save.rglob("*")] if f.is_file())
        existing = next(p for p in (Path(run_dir).absolute(), *Path(run_dir).absolute().parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if free + held >= self.at_once:
            return []
        return [f"run.output_dir={run_dir}: its file system has {free / 1e9:.3g} GB free"
                + (f" and the run's checkpoints hold {held / 1e9:.3g} GB" if held else "")
                + f", less than the {self.at_once / 1e9:.3g} GB its checkpoints take at once (about "
                f"{self.each / 1e9:.3g} GB each); a save that finds the disk full stops the run (checkpoint.keep_last, "
                "checkpoint.keep_every_epochs)"]


def checkpoint_space(c, ds: dict, params: int, epochs: int) -> CheckpointSpace:
    """A checkpoint of ours holds per trained parameter the fp32 master weights and Adam's two
    moments in the optimizer files (12 bytes), and outside ZeRO-3 the module's own copy in its
    precision (2 or 4), as the demo model's saves measure (docs/ROBUSTNESS.md). `c`: the config's
    checkpoint section; `params`: the trained parameters; `epochs`: the whole epochs the run trains."""
    per_param = 12 if zero_stage(ds) == 3 else 12 + (4 if precision(ds) == "fp32" else 2)
    kept = epochs // c.keep_every_epochs if c.keep_every_epochs else 0
    each = float(params * per_param)
    return CheckpointSpace(per_param, each, kept, (c.keep_last + 1 + kept) * each)


def _attempt(fn: Callable, *args) -> Tuple[object, Optional[str]]:
    try:
        return fn(*args), None
    except Exception as err:  # a damaged checkpoint: the caller falls back to an older one
        where = traceback.extract_tb(err.__traceback__)[-1]
        return None, f"{type(err).__name__}: {err}" if str(err) else \
            f"{type(err).__name__} in {Path(where.filename).name}:{where.lineno}"


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int,
                 faults: Optional[Faults] = None, zero_stage: Optional[int] = None, local_rank: int = 0,
                 model: Optional[dict] = None):
        self.dir, self.keep_last, self.rank, self.world_size = Path(directory), keep_last, rank, world_size
        self.flushes_node = local_rank == 0  # one process per node flushes the node's writes
        self.faults = faults or Faults()
        self.zero_stage = zero_stage  # of this run; a checkpoint of another stage does not load
        self.model = model  # the config keys that shape this run's weights, as complete.json records them

    def complete_tags(self, root: Optional[Path] = None) -> List[Path]:
        """Complete checkpoints, newest first."""
        return complete_checkpoints(root or self.dir)

    # --- saving -------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        path = self.dir / tag_for(step)
        if self.rank == 0:  # an earlier, half-written save of this step must not mix with this one
            for old in (path, universal_dir(path)):
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        with self._writing(path):
            engine.save_checkpoint(str(self.dir), tag=path.name, client_state=client_state, save_latest=False)
        self.faults.stall_in_save(step, path.name)
        _barrier()  # every rank has written its part
        if self.flushes_node:
            with self._writing(path):
                flush_to_storage(path)
        _barrier()  # and every node has it on storage: only now may complete.json name it
        if self.rank == 0:
            # The stage and the model a resume is refused without (refuse_other_settings).
            marker = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage,
                      "model": self.model, "time": time.time(), **meta, "files": file_sizes(path)}
            with self._writing(path):
                atomic_write(path / MARKER, json.dumps(marker, indent=1))
            atomic_write(self.dir / "latest", path.name)
            self._prune()
        _barrier()
        return path

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A write of the save of `path` that fails says which save, the free space, and what is
        left to resume from: torch.save on a full disk says only 'unexpected pos N vs M'."""
        try:
            yield
        except Exception as err:
            free = shutil.disk_usage(self.dir).free / 1e9 if self.dir.is_dir() else float("nan")
            newest = next((p for p in self.complete_tags() if p.name != path.name), None)
            kept = (f"the newest complete checkpoint, {newest}, is untouched, and a resume continues from it"
                    if newest else "no complete checkpoint was saved before")
            raise CheckpointWriteError(f"saving checkpoint {path} failed on rank {self.rank}: "
                                       f"{type(err).__name__}: {err} ({free:.1f} GB free on its file system); "
                                       f"{kept}") from err

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and those saved to be kept
        (checkpoint.keep_every_epochs: `kept` in complete.json); drop the others and unfinished saves.
        A kept one's universal conversion goes once it is not among the newest: as large as the
        checkpoint, and made again from it should a resume on another world size go back there.

        Runs on rank 0 after every rank finished the save, so no save is in flight."""
        complete = self.complete_tags()
        newest = {p.name for p in complete[:self.keep_last]}
        kept = {p.name for p in complete if kept_for_good(p)}
        for path in self.dir.glob("step_*"):
            match = PRUNABLE.fullmatch(path.name)
            if not match:
                continue
            tag, conversion, unfinished = match.groups()
            if unfinished or not (tag in newest or (tag in kept and not conversion)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        # A pointer to a conversion just removed would send DeepSpeed's tools to nothing.
        pointer = self.dir / "latest_universal"
        if pointer.is_file() and not (self.dir / pointer.read_text().strip()).is_dir():
            pointer.unlink()

    # --- resuming -----------------------------------------------------------------------
    def candidates(self, resume: str, env=os.environ) -> List[Path]:
        since = self.saved_since_applied(resume, env)
        if since:
            if self.rank == 0:
                log.warning("checkpoint.resume=%s was applied by an earlier start of this job, which has "
                            "checkpoints of its own since: this restart continues from the newest of them "
                            "(as resume=auto would); a new job applies the value again", resume)
            # Should all of them be damaged, the value itself is the fallback; never an older
            # checkpoint of the history it replaced.
            path = Path(resume)
            return since + (self.complete_tags(path) if resume != "none" and path.is_dir() else [])
        if resume == "none":
            return []
        if resume == "auto":
            return self._after_applied_elsewhere(self.complete_tags() if self.dir.is_dir() else [])
        path = Path(resume)
        found = self.complete_tags(path) if path.is_dir() else []
        if not found:
            raise ConfigError(f"bad value for 'checkpoint.resume': {resume} holds no complete checkpoint "
                              f"(a directory with {MARKER}, or a checkpoints/ folder holding some)")
        return found

    def load_newest(self, engine, candidates: List[Path]) -> Tuple[Optional[Path], dict]:
        """Load the first candidate that loads on every rank, warning about each one that does not.

        Returns (checkpoint directory, client state), or (None, {}) without candidates. All ranks
        take each decision together (one all-gather of the ranks' findings per stage), so a
        checkpoint that fails on one rank is skipped on all of them and no rank waits in a
        collective the others left.
        """
        damaged: List[Path] = []
        for tag_dir in candidates:
            client, problem = self._try_load(engine, tag_dir)
            if problem is None:
                self.set_aside_newer_than(int(read_marker(tag_dir)["step"]), damaged)
                return tag_dir, client
            damaged.append(tag_dir)
            if self.rank == 0:
                # `problem` names the rank it came from where that was not rank 0.
                log.warning("checkpoint %s is damaged (%s); falling back to the one before it", tag_dir, problem)
        if candidates:
            raise RuntimeError(f"none of the {len(candidates)} complete checkpoints under "
                               f"{candidates[0].parent} could be loaded; see the warnings above")
        self.set_aside_newer_than(0, [])
        return None, {}

    def _try_load(self, engine, tag_dir: Path) -> Tuple[Optional[dict], Optional[str]]:
        problem = agree(verify(tag_dir))
        if problem is None:
            self.refuse_other_settings(tag_dir)
        universal = problem is None and read_marker(tag_dir)["world_size"] != self.world_size
        if universal:  # saved on another world size: DeepSpeed's universal format re-partitions it
            if self.rank == 0:
                log.info("checkpoint %s was saved on %s, this run has %d: loading it as a universal "
                         "checkpoint (converted once with ds_to_universal)", tag_dir,
                         ranks(read_marker(tag_dir)["world_size"]), self.world_size)
            converted = self._convert(tag_dir)
            if converted is not None:
                # The checkpoint is complete (verified above); falling back to an older one would
                # lose its steps and set a good checkpoint aside for a failure of the conversion.
                raise RuntimeError(f"converting the complete checkpoint {tag_dir} for {ranks(self.world_size)} "
                                   f"failed ({converted}); fix the cause (disk space, memory) and start "
                                   f"again, or pick an older checkpoint with checkpoint.resume=PATH")
        if problem is not None:
            return None, problem
        source = self._universal_for(tag_dir) if universal else tag_dir
        # DeepSpeed reads this flag at each load_checkpoint; whether a checkpoint needs it depends
        # on the world size it was saved on, so it is set per checkpoint rather than once.
        engine._config.load_universal_checkpoint = universal
        client, problem = _attempt(self._load, engine, source)
        return client, agree(problem)

    def refuse_other_settings(self, tag_dir: Path) -> None:
        """A ConfigError where the complete checkpoint `tag_dir` was saved with another ZeRO stage or
        another model than this run's: a configuration mistake, not damage (every rank reads the same
        marker and stops), which no older checkpoint of the run would fix."""
        saved_stage = read_marker(tag_dir).get("zero_stage")
        if None not in (saved_stage, self.zero_stage) and saved_stage != self.zero_stage:
            raise ConfigError(f"checkpoint {tag_dir} was saved with ZeRO-{saved_stage}, this run uses "
                              f"ZeRO-{self.zero_stage} (deepspeed.config); DeepSpeed loads a checkpoint "
                              f"only into the stage it was saved with (the universal format does not "
                              f"bridge stages either); resume with a ZeRO-{saved_stage} config")
        self._check_model(tag_dir)

    def _check_model(self, tag_dir: Path) -> None:
        """A checkpoint of another model (arch, method, image size) cannot load: DeepSpeed's error
        would call every checkpoint damaged. Only keys both record are compared (MAE's decoder keys
        against a SimMIM checkpoint would only repeat the method)."""
        saved = read_marker(tag_dir).get("model")
        if saved is None or self.model is None:
            return  # saved before checkpoints named their model: DeepSpeed's load decides
        changed = [f"{k}={saved[k]} there, {self.model[k]} here" for k in model_differences(saved, self.model)]
        if changed:
            raise ConfigError(f"checkpoint {tag_dir} holds another model than this run builds ("
                              f"{'; '.join(changed)}): its weights do not fit. Resume with the saved "
                              f"values, or start the new model in another run.output_dir")

    def _universal_for(self, tag_dir: Path) -> Path:
        """Where the universal conversion of `tag_dir` goes: beside it for this run's own
        checkpoints, and for another run's (checkpoint.resume=PATH) into this run's directory too,
        which may be the only one this run can write to."""
        return self.dir / universal_dir(tag_dir).name

    def _convert(self, tag_dir: Path) -> Optional[str]:
        """Rank 0 converts `tag_dir` to the universal format; the others poll the shared run
        directory for its result rather than wait in a collective, whose timeout (10 minutes by
        default) a large model's conversion can outlast. The same verdict on every rank."""
        out = self._universal_for(tag_dir)
        failed = out.with_name(out.name + ".failed")
        if self.rank == 0:
            failed.unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()  # no rank reads a failure left by an earlier attempt
        problem = None
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            problem = _attempt(to_universal, tag_dir, out)[1]
            if problem:
                failed.write_text(problem)
        else:
            while not (converted_from(out, tag_dir) or failed.is_file()):
                time.sleep(1.0)
        return agree(problem)

    @staticmethod
    def _load(engine, source: Path) -> dict:
        optimizer = engine.optimizer
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
        # DeepSpeed's ZeRO-1/2 and bf16 optimizers (0.19) take the checkpoint's gradient clipping
        # over the run's, and ZeRO-1/2 refuses a clipped checkpoint where the norm is off (no
        # clipping now: builder.skip_unread_grad_norm). train.clip_grad is the run's to decide,
        # as its weight decay is: the norm is on for the load only, the run's clip put back.
        clip, norm = getattr(optimizer, "clip_grad", None), getattr(optimizer, "compute_grad_norm", None)
        if norm is False:
            optimizer.compute_grad_norm = True
        try:
            path, client = engine.load_checkpoint(str(source.parent), tag=source.name)
        finally:
            if norm is False:
                optimizer.compute_grad_norm = False
            if clip is not None:
                optimizer.clip_grad = clip
        if path is None or client is None:
            raise RuntimeError("DeepSpeed found nothing to load there")
        _repair_optimizer(optimizer, configured)
        return client

    def set_aside_newer_than(self, step: int, damaged: List[Path]) -> None:
        """Complete checkpoints newer than the step the run continues from belong to a history it no
        longer follows (they failed to load, or the run was started from an older one). Renamed
        so that resume and pruning never take them; nothing is deleted."""
        if self.rank != 0 or not self.dir.is_dir():
            return
        moved = False
        for tag_dir in self.complete_tags():
            if _step_of(tag_dir) <= step:
                continue
            reason = "damaged" if tag_dir in damaged else "superseded"
            target = unused_path(tag_dir.with_name(f"{tag_dir.name}.{reason}"))
            os.replace(tag_dir, target)
            shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
            log.warning("set %s aside as %s: the run continues from step %d", tag_dir, target.name, step)
            moved = True
        if moved:  # `latest` named a checkpoint set aside: it names the resume point, or nothing
            start = self.dir / tag_for(step)
            if (start / MARKER).is_file():
                atomic_write(self.dir / "latest", start.name)
            else:
                (self.dir / "latest").unlink(missing_ok=True)

    # --- an explicit checkpoint.resume applies once per job ----------------------------------
    def _resume_record(self) -> Path:
        return self.dir / RESUME_RECORD

    def saved_since_applied(self, resume: str, env=os.environ) -> List[Path]:
        """The complete checkpoints, newest first, saved since an earlier start of this same job
        applied the explicit `checkpoint.resume` (none or a path); [] where there is none. This
        start is then the job's restart (a Slurm requeue, a torchrun elastic restart) and
        continues from them (as resume=auto). Applied again, the value would throw away every
        restart's progress. A new job (sbatch, a command typed again) applies it again.
        Saved since means past the step it started from: the start that applied it set every
        checkpoint after that step aside, and the older ones (another history, when the value
        was another run's checkpoint) must not be taken for the job's progress."""
        job = job_identity(env)
        if resume == "auto" or job is None or not is_restart(env):
            return []
        try:
            record = json.loads(self._resume_record().read_text())
        except (OSError, ValueError):
            return []
        if record.get("resume") != _resume_key(resume) or record.get("job") != job:
            return []
        return [t for t in self.complete_tags() if _step_of(t) > int(record.get("step", 0))]

    def _after_applied_elsewhere(self, own: List[Path]) -> List[Path]:
        """resume=auto's candidates, given this run's own complete checkpoints (newest first).
        Where the last explicit value was another run's checkpoint (step S), this run's own
        checkpoints up to S are the history that value replaced (the start that applied it set
        aside only what was newer): auto takes the ones saved since, then the checkpoints of the
        value up to S (a start killed before its first save continues from where it began),
        never the older history."""
        try:
            record = json.loads(self._resume_record().read_text())
        except (OSError, ValueError):
            return own
        applied = record.get("resume")
        if applied in (None, "auto", "none") or Path(applied).resolve().is_relative_to(self.dir.resolve()):
            return own  # started afresh, or from this run's own history: nothing older to leave out
        step = int(record.get("step", 0))
        since = [t for t in own if _step_of(t) > step]
        value = [t for t in self.complete_tags(Path(applied)) if _step_of(t) <= step] \
            if Path(applied).is_dir() else []
        if not since and value and self.rank == 0:
            log.warning("checkpoint.resume=auto: this run started from %s (step %d) and has saved no "
                        "checkpoint since; it continues from there, not from its own checkpoints of "
                        "the history before", applied, step)
        return since + value

    def record_resume(self, resume: str, step: int, env=os.environ) -> None:
        """After a start that applied an explicit `checkpoint.resume`: say so for its restarts.
        A restart that continued keeps the record as it is: it names the step the value started
        from, and a later restart must still tell the job's progress from the history before it.
        Collective: no rank may still be deciding from an older record."""
        _barrier()
        if self.rank == 0 and resume != "auto" and not self.saved_since_applied(resume, env):
            self.dir.mkdir(parents=True, exist_ok=True)
            record = {"resume": _resume_key(resume), "job": job_identity(env), "step": step, "time": time.time()}
            atomic_write(self._resume_record(), json.dumps(record, indent=1))


def job_identity(env=os.environ) -> Optional[str]:
    """The scheduler job a start belongs to: Slurm's job id (kept across requeues), else
    torchrun's rendezvous id; None for a plain process."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchelastic:{env['TORCHELASTIC_RUN_ID']}"
    return None


def is_restart(env=os.environ) -> bool:
    """A requeued Slurm job, or torchrun's elastic agent starting its workers again."""
    return any(int(env.get(name) or 0) > 0 for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))


def _step_of(tag_dir: Path) -> int:
    """A complete checkpoint's step: from its name (zero-padded step_N), else from its marker."""
    return int(tag_dir.name[len("step_"):]) if TAG.fullmatch(tag_dir.name) else int(read_marker(tag_dir)["step"])


def _resume_key(resume: str) -> str:
    return resume if resume in ("auto", "none") else str(Path(resume).resolve())


def _repair_optimizer(optimizer, configured: List[dict]) -> None:
    """Undo two things DeepSpeed's ZeRO-3 universal loader (0.19) gets wrong; harmless elsewhere.

    It copies the first parameter group's hyperparameters to every group, which would put weight
    decay on the no-decay group (norms, biases, tokens): the run's configuration decides them
    (the checkpoint brings the optimizer's state and the LR schedule's position). And it gives
    every group the same `step` tensor, which torch's Adam then increments once per group, so
    the bias correction runs ahead. Without this, a ZeRO-3 run resumed on another world size
    drifts from the uninterrupted one (1e-3 in the loss after a few steps here); with it, the
    losses are equal.
    """
    for group, hyperparameters in zip(optimizer.param_groups, configured):
        group.update(hyperparameters)
    base = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside ZeRO's wrapper
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# The child ignores the stop signals before it imports anything; its pool workers inherit that.
_IGNORE_STOP_SIGNALS_AND_RUN = (
    "import runpy, signal, sys\n"
    f"for sig in {tuple(int(sig) for sig in STOP_SIGNALS)}:\n"
    "    signal.signal(sig, signal.SIG_IGN)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def run_module_ignoring_stop_signals(module: str, args: List[str], env=None) -> subprocess.CompletedProcess:
    """`python -m module args` that lives on through SIGTERM/SIGUSR1/SIGINT: Slurm signals every
    process of the step and a Ctrl-C reaches the terminal's whole process group, and a stop asked
    for during set-up is the rank's to act on after its first step (signals.py), not a reason to
    kill minutes of conversion. A second Ctrl-C still ends it: subprocess.run kills its child when
    KeyboardInterrupt interrupts the wait."""
    return subprocess.run([sys.executable, "-c", _IGNORE_STOP_SIGNALS_AND_RUN, module, *args],
                          capture_output=True, text=True, env=env)


def to_universal(tag_dir: Path, out: Optional[Path] = None) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (for another world size), into
    `out` (default: `step_N_universal` beside it)."""
    out = Path(out) if out is not None else universal_dir(tag_dir)
    if converted_from(out, tag_dir):
        return out  # converted before, from this very save
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_to_universal(tag_dir, tmp, run=run_module_ignoring_stop_signals)
    shutil.copy(tag_dir / MARKER, tmp / MARKER)
    flush_to_storage(tmp)  # the conversion is named finished only once it is on storage
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    # ds_to_universal pointed its `latest_universal` at the folder it wrote, since renamed.
    atomic_write(out.parent / "latest_universal", out.name)
    return out
