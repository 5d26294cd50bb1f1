"""Pre-training runs started in the background, watched, and interrupted as a scheduler or a
failing node would: signals to some or all ranks, kill -9 of the whole job, torchrun restarts.

Every run here is the demo config shrunk to seconds per step: 256 synthetic images, so 8 steps
of 32 per epoch and a 12-step run crosses an epoch boundary, and micro-batches of 16, so one
rank accumulates 2 of them where two ranks take one each.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import psutil
import pytest

from conftest import REPO, cpu_env, free_port, read_metrics

STEPS = 12
SMALL = ("run.log_every=1", "run.progress_bar=false", "data.synthetic_images=256", "data.num_workers=0",
         "train.micro_batch_size=16", "checkpoint.every_steps=3", "checkpoint.keep_last=3")


def metric_steps(run_dir: Path) -> List[int]:
    return [r["step"] for r in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").is_file() else []


def losses_by_step(run_dir: Path) -> dict:
    """step -> loss; a step logged twice (re-run after a crash) keeps its last row."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def tags(run_dir: Path) -> List[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


class Run:
    """`mto-ds pretrain` of the small demo in its own session (so it can be killed as a whole)."""

    def __init__(self, run_dir: Path, *overrides: str, nproc: int = 1, steps: int = STEPS,
                 env: Optional[dict] = None, torchrun_args=()):
        self.run_dir, self.nproc = Path(run_dir), nproc
        args = ["-m", "mto_ds", "pretrain", "--config", "configs/demo.yaml", f"run.output_dir={run_dir}",
                f"train.steps={steps}", *SMALL, *overrides]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   *(torchrun_args or ("--master_port", str(free_port()))), *args]
        else:
            cmd = [sys.executable, *args]
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        n = len(list(self.run_dir.parent.glob(f"{self.run_dir.name}.*.log")))
        self.log_path = self.run_dir.parent / f"{self.run_dir.name}.{n}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(**(env or {})), stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended ({self.proc.returncode}) before {what}:\n{self.output[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output[-6000:]}")
            time.sleep(0.1)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        self.wait_for(lambda: any(s >= step for s in metric_steps(self.run_dir)), f"step {step}", timeout)

    def rank_pids(self) -> dict:
        """rank -> pid of the training processes (torchrun's direct children, or the process)."""
        if self.nproc == 1:
            return {0: self.proc.pid}
        ranks = {}
        for child in psutil.Process(self.proc.pid).children():
            env = child.environ()
            if "RANK" in env:
                ranks[int(env["RANK"])] = child.pid
        return ranks

    def signal_ranks(self, sig: signal.Signals, ranks=None) -> None:
        pids = self.rank_pids()
        for rank in (ranks if ranks is not None else sorted(pids)):
            os.kill(pids[rank], sig)

    def signal_all_processes(self, sig: signal.Signals) -> None:
        """What Slurm does on `scancel --signal`: every process of the job, data workers too."""
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 of the launcher, the ranks and their children: a node that died. The tree is
        listed first: torchrun starts each rank in a session of its own, which a kill of the
        launcher's process group misses (they lived on, stalled in a save, for an hour)."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        self.proc.wait()

    def wait(self, timeout: float = 400) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not end in {timeout} s:\n{self.output[-6000:]}")
        self._log.close()
        return self.proc.returncode

    def finish(self, expect: int = 0, timeout: float = 400) -> "Run":
        code = self.wait(timeout)
        assert code == expect, f"exit code {code}, expected {expect}:\n{self.output[-8000:]}"
        return self


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run every interrupted one is compared with, read only: made once
    per session, also across pytest-xdist workers (test_resume.py and test_robustness.py land
    on either), in the folder above the workers' own, under a lock, as xdist's docs suggest."""
    from filelock import FileLock  # torch's own dependency

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    run_dir = root / "reference" / "run"
    with FileLock(str(root / "reference.lock")):
        if not (run_dir / "state.json").is_file() or not state(run_dir)["finished"]:
            shutil.rmtree(run_dir.parent, ignore_errors=True)  # an earlier try that failed: uninterrupted, from scratch
            Run(run_dir, nproc=2, env={"MTO_DS_TRACE_SAMPLES": "1"}).finish()
    return run_dir
