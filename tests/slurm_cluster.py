"""A real single-host Slurm for tests: munged, slurmctld and slurmd on loopback.

The `slurm_cluster` fixture generates a munge key and a slurm.conf in a temporary
directory, starts the three daemons in the foreground as children of pytest (free ports,
their own munge socket, state and spool directories, so several clusters can share a
machine), waits until `sinfo` shows the node idle and stops everything afterwards, also
when a test fails. Errors carry the daemons' logs.

The `slurm_cluster_2nodes` fixture does the same with two nodes on this one host: two
slurmd, each started with `-N <node>` on a port, spool directory, pid file and log of its
own (`%n` in slurm.conf), both with this host's name as NodeHostname and 127.0.0.1 as
NodeAddr. One node is named after the host, as the single node is, the other `localhost`,
so that each name resolves (to this host) as a rendezvous address; a job's node list has
them sorted by name (`localhost,<host>` here). Both nodes see the same file system,
node-local directories included.

Without root or without Debian's `slurm-wlm` and `munge` the tests that use it skip with
the reason; with CI or MTO_DS_REQUIRE_SLURM set in the environment they fail instead, so a
CI image that lost Slurm cannot pass quietly.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# How long a requeued job waits before it may start again (Slurm's default is 120 s).
CRED_EXPIRE_S = 5


def unavailable_reason() -> Optional[str]:
    """Why a Slurm cannot be started here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: slurmd starts jobs as their users"
    path = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=path) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM if pytest dies without running its finalizers."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def parse_job_line(line: str) -> Dict[str, str]:
    """`scontrol show job -o` prints one job as `Key=Value` pairs separated by spaces; a value
    (a path) may hold spaces and runs to the next ` Key=`."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s[A-Za-z][\w:/]*=|$)", line))


class SlurmCluster:
    """One node (this host, on 127.0.0.1) in one partition, or two slurmd of this host as two
    nodes; every job runs as root."""

    def __init__(self, root: Path, cpus: int = 4, nodes: int = 1):
        self.root = root
        self.node = socket.gethostname().split(".")[0]  # the first node
        if nodes not in (1, 2) or (nodes == 2 and self.node == "localhost"):
            raise ValueError(f"{nodes} nodes on a host named {self.node}: 1, or 2 on a host not named localhost")
        self.nodes = [self.node, "localhost"][:nodes]
        self.cpus = cpus  # per node
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        # munged wants its socket's directories searchable by all (pytest's are not) and
        # the path short (107 bytes at most): a directory of its own under the system's tmp.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mto-munge-"))
        self.munge_dir.chmod(0o755)
        self.munge_socket = self.munge_dir / "munge.socket"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf),
                        PATH=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # a test run inside a Slurm job must not leak into ours
                del self.env[var]

    # ---- life cycle -------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.munge_dir / 'munged.pid'}",
                               f"--seed-file={self.munge_dir / 'munged.seed'}",
                               f"--log-file={self.logs / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        if len(self.nodes) == 1:
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        else:
            for node in self.nodes:
                (self.root / "spool" / node).mkdir(exist_ok=True)
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._nodes_idle, timeout, f"node(s) {','.join(self.nodes)} did not become idle in {timeout:.0f} s")
        return self

    def stop(self) -> None:
        """Cancel what is left of the jobs, then stop slurmd, slurmctld and munged."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        slurmds = [name for name in self.procs if name.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _spawn(self, name: str, argv: List[str]) -> None:
        out = open(self.logs / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up\n{self.daemon_logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what}\n{self.daemon_logs()}")

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
        return out.returncode == 0 and sorted(out.stdout.split()) == sorted(
            [*self.nodes, *["idle"] * len(self.nodes)])

    def slurmd_log(self, node: str) -> str:
        """What the slurmd of `node` logged (every slurmd of a 2-node cluster has its own log)."""
        name = "slurmd.log" if len(self.nodes) == 1 else f"slurmd.{node}.log"
        return (self.logs / name).read_text(errors="replace")

    def _slurm_conf(self) -> str:
        r = self.root
        one = len(self.nodes) == 1
        if one:
            nodes = [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"]
        else:
            # Several slurmd on one host: each finds its node by `-N`, its port by the node's
            # Port=, and its spool directory, pid file and log by %n (the node's name).
            nodes = [f"NodeName={node} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={_free_port()} "
                     f"CPUs={self.cpus} State=UNKNOWN" for node in self.nodes]
        return "\n".join([
            f"ClusterName=mto{os.getpid()}",
            # Job ids, and so the templates' job-id-derived MASTER_PORTs, differ between
            # clusters that tests on the same machine start at the same time.
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            *([f"SlurmdPort={_free_port()}"] if one else []),
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' if one else r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / ('slurmd.pid' if one else 'slurmd.%n.pid')}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / ('slurmd.log' if one else 'slurmd.%n.log')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in containers: track processes by parentage, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Start a job that became eligible (a requeued one) within seconds, not 30-60.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=10",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # The node may declare more CPUs than the machine has (tests oversubscribe).
            "SlurmdParameters=config_overrides",
            *nodes,
            f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    # ---- client commands --------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), env=env or self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.daemon_logs()}")
        return proc

    def sbatch(self, script: Path, *args: str, options: Sequence[str] = (),
               env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        """Submit and return the job id; `env` adds to the cluster's environment."""
        out = self.run("sbatch", "--parsable", *options, str(script), *args,
                       env=dict(self.env, **(env or {})), cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> List[Dict[str, str]]:
        """The job's records (one per element for an array job), [] once unknown."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return [parse_job_line(line) for line in out.stdout.splitlines() if "JobId=" in line]

    def wait_final(self, job_id: str, timeout: float) -> List[Dict[str, str]]:
        """Wait until the job (every element of an array) has reached a final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j.get("JobState") in FINAL_STATES for j in jobs):
                return jobs
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {self.jobs(job_id)}\n"
                           f"{self.daemon_logs()}")

    def daemon_logs(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.logs.glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"---- {path.name} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(parts)


def _started_cluster(tmp_path_factory, nodes: int) -> Iterator[SlurmCluster]:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI") or os.environ.get("MTO_DS_REQUIRE_SLURM"):
            pytest.fail(f"Slurm tests must run here (CI / MTO_DS_REQUIRE_SLURM is set): {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    yield from _started_cluster(tmp_path_factory, nodes=1)


@pytest.fixture(scope="module")
def slurm_cluster_2nodes(tmp_path_factory) -> Iterator[SlurmCluster]:
    """Two nodes (two slurmd of this host) in one partition."""
    yield from _started_cluster(tmp_path_factory, nodes=2)
