"""One start at a time in a run directory: RUN_DIR/running.json.

Two starts on one run directory (a duplicate sbatch while the first job runs) overwrite each
other's checkpoints, prune and set aside each other's saves, and move each other's metrics rows.
Rank 0 claims the directory by creating running.json exclusively and rewrites it every few
seconds while the process lives (a heartbeat from a thread, so long saves and evaluations keep
it going). A start that finds the file watches it instead of comparing clocks (nodes and file
servers disagree about time): if it changes, its owner is alive and this start stops; if it
stays the same for STALE_BEATS beats, its owner is gone (killed, node lost) and this start takes
over. No flock: it does not work on every shared file system, and a lock held by a dead node's
client may never be released. A claim is taken over at once, without watching, when it belongs
to this same Slurm job (a requeue: the earlier start is dead) or to a process of this host that
no longer exists.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError

log = logging.getLogger("mto_ds")
LOCK = "running.json"
BEAT_SECONDS = 5.0
STALE_BEATS = 6


class RunDirectoryInUse(ConfigError):
    """Another live start holds the run directory."""


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _owner(text: Optional[str]) -> dict:
    try:
        owner = json.loads(text or "")
    except ValueError:  # read while its owner rewrote it
        return {}
    return owner if isinstance(owner, dict) else {}


def _gone_at_once(owner: dict, me: dict) -> bool:
    """Whether the claim is known dead without watching it: this Slurm job's (a requeued job runs
    again under its id only after its earlier start ended) or a process of this host that is gone."""
    if me["job"] and me["job"].startswith("slurm:") and owner.get("job") == me["job"]:
        return True
    return owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and _ended(owner["pid"])


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


def _alive(path: Path, text: str, beat: float) -> bool:
    """Whether running.json changes within STALE_BEATS beats: its owner's heartbeat."""
    deadline = time.monotonic() + STALE_BEATS * beat
    while time.monotonic() < deadline:
        time.sleep(min(1.0, beat / 4))
        now = _read(path)
        if now != text:
            return now is not None  # rewritten: alive; removed: its owner ended
    return False


class RunLock:
    def __init__(self, path: Path, owner: dict, beat: float):
        self.path, self.owner, self.beat = path, owner, beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat):
            if _owner(_read(self.path)).get("token") != self.owner["token"]:
                log.warning("%s was taken over by another start (its heartbeat stalled for %.0f s?): two "
                            "starts now write this run directory", self.path, STALE_BEATS * self.beat)
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
        if _owner(_read(self.path)).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)


def claim(run_dir: Path, job: Optional[str], beat: float = BEAT_SECONDS) -> RunLock:
    """Claim `run_dir` for this process (rank 0), or raise RunDirectoryInUse naming the holder."""
    path = Path(run_dir) / LOCK
    me = {"job": job, "host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": os.urandom(8).hex(), "beat": 0}
    for _ in range(3):  # a claim that vanished or was taken over between two looks: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = _read(path)
            if text is None:
                continue
            owner = _owner(text)
            if not _gone_at_once(owner, me) and _alive(path, text, beat):
                raise RunDirectoryInUse(
                    f"run.output_dir={run_dir} is in use by another start ({owner.get('job') or 'no scheduler job'} "
                    f"on {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {owner.get('started', '?')}; "
                    f"its {LOCK} is alive): two starts on one run directory overwrite each other's checkpoints "
                    f"and metrics. Stop that one first, or give this one another run.output_dir")
            log.warning("%s: taking the run directory over from a start that has ended (%s on %s, pid %s)",
                        path, owner.get("job") or "no scheduler job", owner.get("host", "?"), owner.get("pid", "?"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return RunLock(path, me, beat)
    raise RunDirectoryInUse(f"run.output_dir={run_dir}: {path} keeps changing hands; is another start "
                            f"starting on it at the same time?")
