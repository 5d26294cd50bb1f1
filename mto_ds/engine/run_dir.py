"""The run directory across starts: who holds it (running.json), the settings each start ran
with (config.yaml and the earlier ones kept), why the last start stopped (state.json), and what
a start with other settings than its checkpoint's is told (`resume_warnings`).

One start at a time: two starts on one run directory (a duplicate sbatch while the first job
runs) overwrite each other's checkpoints, prune and set aside each other's saves, and move each
other's metrics rows. Rank 0 claims the directory by creating running.json exclusively and
rewrites it every few seconds while the process lives (a heartbeat from a thread, so long saves
and evaluations keep it going). A start that finds the file watches it instead of comparing
clocks (nodes and file servers disagree about time): if it changes, its owner is alive and this
start stops; if it stays the same for STALE_BEATS beats, its owner is gone (killed, node lost)
and this start takes over. No flock: it does not work on every shared file system, and a lock
held by a dead node's client may never be released. A claim is taken over at once, without
watching, when it belongs to an earlier run of this same Slurm job (a requeue, SLURM_RESTART_COUNT
higher than the claim's: the earlier start is dead) or to a process of this host that no longer
exists (the same host name and PID namespace). Two starts in one run of a job (two sruns in
one allocation) watch each other like any.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

import yaml

from ..config import ConfigError, flatten_config
from ..data.order import micro_batch_starts, ranks
from .builder import learning_rate
from .storage import atomic_write, unused_path

log = logging.getLogger("mto_ds")
LOCK = "running.json"
BEAT_SECONDS = 5.0
STALE_BEATS = 6


class RunDirectoryInUse(ConfigError):
    """Another live start holds the run directory."""


def read_or_none(path: Path) -> Optional[str]:
    """The file's text, or None when it cannot be read (absent, removed meanwhile)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _owner(text: Optional[str]) -> dict:
    try:
        owner = json.loads(text or "")
    except ValueError:  # read while its owner rewrote it
        return {}
    return owner if isinstance(owner, dict) else {}


def _holder(owner: dict) -> str:
    return f"{owner.get('job') or 'no scheduler job'} on {owner.get('host', '?')}, pid {owner.get('pid', '?')}"


def describe_holder(path: Path) -> Optional[str]:
    """The start that claims a run directory by `path` (its running.json), in words, or None when
    none does. A look at the file only: whether that start still lives takes watching it."""
    text = read_or_none(path)
    if text is None:
        return None
    return _claimed_by(_owner(text))


def seen_from_here(claim_text: str) -> Tuple[str, Optional[str]]:
    """(The start that a running.json's text names, in words; why that start is known to have
    ended without watching the file, or None): a process of this host that is gone."""
    owner = _owner(claim_text)
    here = {"job": None, "restart": 0, "host": socket.gethostname(), "pidns": _pid_namespace()}
    return _claimed_by(owner), _gone_at_once(owner, here)


def _claimed_by(owner: dict) -> str:
    return f"{_holder(owner)}, started {owner.get('started', '?')}"


def _gone_at_once(owner: dict, me: dict) -> Optional[str]:
    """Why the claim is known dead without watching it, or None: an earlier run of this Slurm job
    (a requeued job runs again under its id only after its earlier run ended) or a process of
    this host that is gone."""
    if me["job"] and me["job"].startswith("slurm:") and owner.get("job") == me["job"] and \
            isinstance(owner.get("restart", 0), int) and owner.get("restart", 0) < me["restart"]:
        return f"an earlier run of this job, restart {owner.get('restart', 0)}"
    # The same PID namespace too: containers that share the host's name (host networking) see
    # another's pids as gone.
    same_processes = me["pidns"] is not None and (owner.get("host"), owner.get("pidns")) == (me["host"], me["pidns"])
    if same_processes and isinstance(owner.get("pid"), int) and _ended(owner["pid"]):
        return "its process is gone"
    return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None


def _ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # a zombie has ended; one whose parent died stays so where nothing reaps orphans
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _heartbeat(path: Path, text: str, beat: float) -> Optional[str]:
    """running.json as its owner rewrote it within STALE_BEATS beats (its heartbeat: the owner
    is alive), or None: it stayed the same or was removed (the owner ended)."""
    deadline = time.monotonic() + STALE_BEATS * beat
    while time.monotonic() < deadline:
        time.sleep(min(1.0, beat / 4))
        now = read_or_none(path)
        if now != text:
            return now
    return None


class RunLock:
    def __init__(self, path: Path, owner: dict, beat: float):
        self.path, self.owner, self.beat = path, owner, beat
        self.lost = threading.Event()  # another start took the directory over: this one must stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    def _taken_over(self) -> bool:
        """Another start's claim in the file, or no file (a takeover removes it, then creates its
        own). A read that fails, or finds the file empty or cut short (this start's own rewrite
        failed: a full disk empties it), proves nothing: the next beat rewrites it."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return _owner(text).get("token") not in (None, self.owner["token"])

    def _beat(self) -> None:
        while not self._stop.wait(self.beat):
            if self._taken_over():
                log.error("%s was taken over by another start (this one's heartbeat stalled for %.0f s?): "
                          "this start stops after its step, without saving", self.path, STALE_BEATS * self.beat)
                self.lost.set()
                return
            self.owner["beat"] += 1
            try:
                with open(self.path, "w") as f:  # in place: a reader on NFS sees it at its next open
                    f.write(json.dumps(self.owner))
            except OSError as err:  # a full disk: the run's own writes will say so
                log.warning("could not refresh %s: %s", self.path, err)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if _owner(read_or_none(self.path)).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)


def claim(run_dir: Path, job: Optional[str], beat: float = BEAT_SECONDS, restart: Optional[int] = None) -> RunLock:
    """Claim `run_dir` for this process (rank 0), or raise RunDirectoryInUse naming the holder.
    `restart`: how many times Slurm requeued the job (default: SLURM_RESTART_COUNT)."""
    path = Path(run_dir) / LOCK
    if restart is None:
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    me = {"job": job, "restart": restart, "host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": os.urandom(8).hex(), "beat": 0}
    for _ in range(3):  # a claim that vanished or was taken over between two looks: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = read_or_none(path)
            if text is None:
                continue
            owner = _owner(text)
            ended = _gone_at_once(owner, me)
            rewritten = None if ended else _heartbeat(path, text, beat)
            if rewritten is not None:
                # The first read may have caught the owner's rewrite half done (an empty file).
                owner = _owner(rewritten) or owner or _owner(read_or_none(path))
                raise RunDirectoryInUse(
                    f"run.output_dir={run_dir} is in use by another start ({_claimed_by(owner)}; its {LOCK} is "
                    f"alive): two starts on one run directory overwrite each other's checkpoints and metrics. "
                    f"Stop that one first, or give this one another run.output_dir")
            log.warning("%s: taking the run directory over from a start that has ended (%s: %s)", path, _holder(owner),
                        ended or f"unchanged for {STALE_BEATS * beat:.0f} s")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return RunLock(path, me, beat)
    raise RunDirectoryInUse(f"run.output_dir={run_dir}: {path} keeps changing hands; is another start "
                            f"starting on it at the same time?")


def write_config(run_dir: Path, text: str) -> None:
    """RUN_DIR/config.yaml: the settings this start runs with. A start with other settings than
    the last one's (another data path, batch, learning rate) keeps the earlier file as
    config.<time>.yaml and names each changed key in a warning: the run's history stays readable."""
    path = run_dir / "config.yaml"
    if path.is_file():
        before = path.read_text(errors="replace")
        if before != text:
            try:
                earlier = yaml.safe_load(before) or {}
                if not isinstance(earlier, dict):
                    raise ValueError(f"a {type(earlier).__name__}, not a mapping")
                changed = flatten_config(earlier), flatten_config(yaml.safe_load(text) or {})
                keys = sorted(k for k in set(changed[0]) | set(changed[1]) if changed[0].get(k) != changed[1].get(k))
                what = ", ".join(f"{k}: {changed[0].get(k)!r} -> {changed[1].get(k)!r}" for k in keys)
            except (yaml.YAMLError, ValueError) as err:  # edited by hand, or cut short: kept, not fatal
                what = f"the earlier file is not a readable config: {str(err).splitlines()[0]}"
            written = time.strftime("config.%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            kept = unused_path(run_dir / written, ".yaml")  # a start in the same second: config.<time>.2.yaml
            path.replace(kept)
            log.warning("%s: this start's settings differ from the last start's (%s); the earlier file is "
                        "kept as %s", path, what, kept.name)
    atomic_write(path, text)


def write_state(run_dir: Path, finished: bool, step: Optional[int], total_steps: Optional[int], reason: str,
                first: bool = False) -> None:
    """RUN_DIR/state.json: whether the run finished, at which step, and why it stopped.

    `first`: write only if no rank of this start has (clear_state ran at its start): where one
    rank fails, the others fail after it, of its absence (a closed connection, a timeout), and the
    first reason is the one that says what happened."""
    state = {"finished": finished, "step": step, "total_steps": total_steps, "reason": reason}
    path = run_dir / "state.json"
    try:
        if not atomic_write(path, json.dumps(state, indent=1), only_if_absent=first):
            log.error("this rank's reason, after another rank's in %s: %s", path, reason)
    except OSError as err:
        # A full disk: the error in flight must not be replaced by this one, and an earlier start's
        # file must not speak for this start (a job script would requeue or stop on its word).
        if not first:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        log.error("could not write %s (%s); this start's reason: %s", path, err.strerror or err, reason)


def clear_state(run_dir: Path) -> None:
    """Removes an earlier start's state.json: it must not speak for this start, which may be
    killed before it writes its own (a job script would stop on an earlier "finished")."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "state.json").unlink()


def _position_shift(saved: dict, now: dict, repeat: str) -> str:
    """What re-deriving the data position from the step with another number of steps per epoch
    does: the epoch it lands in can be another one (a global batch 4096 -> 4032 at step 100000 of
    ImageNet moves it from epoch 320 back to 315)."""
    if "global_step" not in saved or not saved.get("steps_per_epoch"):
        return repeat
    step = int(saved["global_step"])
    (was, was_in), (now_epoch, now_in) = divmod(step, saved["steps_per_epoch"]), divmod(step, now["steps_per_epoch"])
    where = (f"step {step} was step {was_in} of epoch {was} and is now step {now_in} of epoch {now_epoch}, "
             "so the logged epoch and the epoch-end evaluations follow the new count")
    if now_epoch < was:
        return f"{where}: epochs {now_epoch} to {was - 1} are read again"
    if now_epoch > was:
        return f"{where}: epochs {was} to {now_epoch - 1} are skipped"
    return f"{where}; {repeat}"


def _micro_batches_differ(saved: dict, now: dict) -> bool:
    """Whether the micro-batches of a step group the global batch's samples otherwise."""
    if "micro_batch_size" not in saved:  # a checkpoint older than the key
        return False
    # A checkpoint from before the global batch was saved: its ranks divided it; where the global
    # batch changed, the data-position warning says so.
    global_batch = saved.get("global_batch_size", now["global_batch_size"])
    return (micro_batch_starts(global_batch, saved["world_size"], saved["micro_batch_size"])
            != micro_batch_starts(now["global_batch_size"], now["world_size"], now["micro_batch_size"]))


def resume_warnings(saved: dict, now: dict) -> list:
    """Why this run cannot continue the saved one exactly (the rest of the current epoch's samples,
    or the objective itself): one message per reason, empty when it can. `saved` and `now` are
    `Trainer._data_plan()`s (a checkpoint older than a key gives no message about it)."""
    def changed(key):
        return key in saved and saved[key] != now[key]
    repeat = "samples of the current epoch may repeat or be skipped (later epochs are whole)"
    messages = []
    if changed("steps_per_epoch") or changed("num_samples"):
        messages.append(f"the checkpoint was saved with {saved.get('num_samples', '?')} samples and "
                        f"{saved['steps_per_epoch']} steps per epoch, this run has {now['num_samples']} and "
                        f"{now['steps_per_epoch']} (another data set or global batch): the data position is "
                        f"re-derived from the step, and {_position_shift(saved, now, repeat)}")
    if changed("order"):
        messages.append(f"data.order was {saved['order']}, now {now['order']}: the rest of the current epoch is "
                        f"drawn in the other order, so {repeat}")
    if changed("seed"):
        messages.append(f"run.seed was {saved['seed']}, now {now['seed']}: the sample order and masks "
                        f"change, and {repeat}")
    if now.get("hinge_on_micro_batch") and _micro_batches_differ(saved, now):
        messages.append(f"the micro-batches were {saved['micro_batch_size']} samples on "
                        f"{ranks(saved['world_size'])}, now {now['micro_batch_size']} on {now['world_size']}, "
                        f"and group the global batch's samples otherwise: MTO's L_r is a hinge on each "
                        f"micro-batch's heterogeneity, so the objective differs from the saved run's "
                        f"({ranks(saved['world_size'])} with train.micro_batch_size={saved['micro_batch_size']} "
                        f"continue it exactly; docs/MTO.md, section 4)")
    if changed("schedule"):
        names = {"total_steps": "total steps", "warmup_steps": "warm-up steps", "peak_lr": "peak LR",
                 "min_lr_ratio": "train.min_lr_ratio"}
        diffs = ", ".join(f"{names[k]} {saved['schedule'][k]:.6g} -> {now['schedule'][k]:.6g}" for k in names
                          if saved["schedule"].get(k) != now["schedule"][k])
        step = int(saved.get("global_step", 0))
        lr_saved, lr_now = (learning_rate(step, s["total_steps"], s["warmup_steps"], s["peak_lr"], s["min_lr_ratio"])
                            for s in (saved["schedule"], now["schedule"]))
        messages.append(f"the LR schedule differs from the saved run's ({diffs}): step {step + 1} runs at LR "
                        f"{lr_now:.3g}, where the saved schedule had {lr_saved:.3g}. The warm-up and cosine "
                        f"are functions of the total steps: a run extended after it ended goes back up "
                        f"from its final LR (docs/ROBUSTNESS.md, extending a run)")
    if now["order"] == "quasi_random" and (changed("world_size") or changed("micro_batch_size")):
        messages.append(f"data.order=quasi_random was saved on {ranks(saved['world_size'])} x micro-batch "
                        f"{saved['micro_batch_size']}, this run has {now['world_size']} x "
                        f"{now['micro_batch_size']}: its shards and order differ, so {repeat} "
                        "(data.order=exact continues exactly on any world size)")
    return messages
