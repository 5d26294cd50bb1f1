"""What ran each start of a run: RUN/starts.jsonl, one JSON line per start that set up.

A run outlives its starts: it is resumed on other nodes, other numbers of ranks, and after the
code or a library changed. Each line says with what a start ran (the mto_ds commit and whether the
checkout had uncommitted changes, the library versions, the devices and hosts of its ranks, the
command) and where it began (the step and checkpoint it resumed from), so a change in the loss
curve can be set against a change of code, cluster or versions. Ranks that run other code or
library versions than rank 0 (a node with an older environment) are named in a warning.
`mto-ds --version` prints `describe_code(code_version())`, without importing torch.
"""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from .. import __version__
from ..config import REPO_ROOT

if TYPE_CHECKING:
    import torch

STARTS = "starts.jsonl"
LIBRARIES = ("deepspeed", "timm", "triton", "ffcv", "numpy")


def code_version(checkout: Path = REPO_ROOT) -> Dict[str, object]:
    """{'version', 'commit', 'dirty'}: the package's version, and the git commit of the checkout it
    runs from with whether tracked files differ from it (None for both outside a git checkout)."""
    def git(*args) -> Optional[str]:
        try:
            result = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (checkout / ".git").exists() else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": __version__, "commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> Dict[str, Optional[str]]:
    """Python, torch (with its CUDA and NCCL) and the libraries a run uses; None for one not
    installed. torch is asked itself (a run has imported it); the others are read from their
    installed packages' metadata, not imported."""
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "nccl": None}
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        nccl = torch.cuda.nccl.version()  # (major, minor, patch); an int in older torch
        versions["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def rank_environment(device: torch.device) -> Dict[str, object]:
    """This rank's host, device, code and library versions."""
    import torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"host": socket.gethostname(), "device": name, "code": code_version(), "libraries": library_versions()}


def gather_environments(device: torch.device) -> List[Dict[str, object]]:
    """Every rank's `rank_environment`, in rank order (one all-gather; call it on every rank)."""
    import torch.distributed as dist
    mine = rank_environment(device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def differing_ranks(environments: List[Dict[str, object]]) -> List[str]:
    """'rank R (host): key a here, b on rank 0' for each rank whose code or library versions
    differ from rank 0's, at most 3 ranks named and then a count."""
    first = environments[0]
    found = []
    for rank, env in enumerate(environments[1:], start=1):
        changes = [f"{section}.{key} {env[section].get(key)} here, {first[section].get(key)} on rank 0"
                   for section in ("code", "libraries") for key in sorted(set(first[section]) | set(env[section]))
                   if env[section].get(key) != first[section].get(key)]
        if changes:
            found.append(f"rank {rank} ({env['host']}): {', '.join(changes)}")
    return found[:3] + ([f"and {len(found) - 3} more ranks"] if len(found) > 3 else [])


def start_record(environments: List[Dict[str, object]], step: int, resumed_from: Optional[Path],
                 job: Optional[str], schedule: Dict[str, int]) -> Dict[str, object]:
    """The line of starts.jsonl for a start whose ranks have `environments` (rank 0's code and
    libraries stand for all: the others that differ are named in differing_ranks). `schedule`:
    its total_steps, steps_per_epoch and global_batch_size (what `mto-ds status` counts with)."""
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step,
            "resumed_from": str(resumed_from) if resumed_from else None, "world_size": len(environments),
            **schedule, "job": job, "command": sys.argv, "code": environments[0]["code"],
            "libraries": environments[0]["libraries"],
            "hosts": dict(Counter(env["host"] for env in environments)),
            "devices": dict(Counter(env["device"] for env in environments))}


def describe_code(code: Dict[str, object]) -> str:
    """'0.1.0 (git 1a2b3c4d5e, uncommitted changes)' for a `code_version`."""
    commit = (f"git {code['commit'][:10]}{', uncommitted changes' if code['dirty'] else ''}" if code["commit"]
              else "not a git checkout")
    return f"{code['version']} ({commit})"


def describe(record: Dict[str, object]) -> str:
    """One log line: the code, the main libraries, the ranks and devices."""
    libraries = record["libraries"]
    torch_build = ", ".join(f"{key.upper()} {libraries[key]}" for key in ("cuda", "nccl") if libraries.get(key))
    devices = ", ".join(f"{count} x {name}" for name, count in record["devices"].items())
    hosts = len(record["hosts"])
    return (f"mto_ds {describe_code(record['code'])}, torch {libraries['torch']}"
            f"{f' ({torch_build})' if torch_build else ''}, deepspeed {libraries['deepspeed']}, "
            f"timm {libraries['timm']}; {record['world_size']} rank(s) on {hosts} host{'s' if hosts > 1 else ''}: "
            f"{devices}")


def append_start(run_dir: Path, record: Dict[str, object]) -> None:
    with open(Path(run_dir) / STARTS, "a") as f:
        f.write(json.dumps(record) + "\n")
