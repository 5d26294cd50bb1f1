"""Process-group set-up for every launcher: deepspeed, torchrun, srun, or one plain process."""
from __future__ import annotations

import os
import re
import secrets
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, as `scontrol show hostnames` prints it first:
    `node[01-04,07],gpu-a[1-2]` -> `node01`. Read here rather than by scontrol, which the ranks may
    not have (a container) or may not be able to configure (no slurm.conf)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip(), maxsplit=1)[0]  # commas outside brackets
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)                  # each range's first value


def job_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: the same on every task of the job, different between
    jobs sharing a node, and below Linux's ephemeral range (32768-60999), where an outgoing
    connection could hold it. slurm/lib.sh (mto_set_master) uses the same rule."""
    return 12000 + job_id % 20000


def resolve_rank_env(env=os.environ) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for launchers that do not set them.

    torchrun and deepspeed set them; a task of an `srun` step (one task per GPU) takes them from
    SLURM_*, with the step's first node, where task 0 runs, as MASTER_ADDR; any other process is
    rank 0 of 1. That includes a batch script's own process: it has SLURM_PROCID=0 and the job's
    SLURM_NTASKS too, but no step, and no other task will ever join it.
    """
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "RANK" not in env and in_step and "SLURM_PROCID" in env and tasks > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = str(tasks)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env.setdefault("MASTER_ADDR", first_host(nodelist) if nodelist else "127.0.0.1")
        env.setdefault("MASTER_PORT", str(job_port(int(env.get("SLURM_JOB_ID", "0")))))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")


def init_distributed() -> DistInfo:
    resolve_rank_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if accelerator.device_name() != "cpu":
        # Modulo: clusters that bind one GPU per task show each task a single device 0.
        index = local_rank % max(accelerator.device_count(), 1)
        accelerator.set_device(index)
        device = torch.device(accelerator.device_name(index))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    # DeepSpeed's ZeRO step calls torch.distributed.all_gather_into_tensor, which torch deprecates
    # since 2.13: a FutureWarning from every rank of every run, about nothing a user can change.
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def agree(problem: Optional[str]) -> Optional[str]:
    """The same verdict on every rank: a problem on any rank is a problem everywhere (one
    all-gather of the messages). Returns this rank's problem, or else the first rank's that had
    one, named with its rank, so that every rank's log says what went wrong where."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if problem:
        return problem
    return next((f"on rank {rank}: {other}" for rank, other in enumerate(problems) if other), None)


def differing_from_rank_0(value: str) -> Optional[str]:
    """None when every rank holds the same `value` (one all-gather), else which ranks hold what,
    the same text on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    others = [f"rank {rank}: {other}" for rank, other in enumerate(values) if other != values[0]]
    if not others:
        return None
    more = f"; and {len(others) - 3} more" if len(others) > 3 else ""
    return f"rank 0: {values[0]}; " + "; ".join(others[:3]) + more


def check_shared_directory(directory: Path, rank: int, world_size: int, device) -> Optional[str]:
    """None if every rank sees what rank 0 writes into `directory`, else why not (on every rank).

    The ranks decide together which checkpoints exist and resume from them, so the run directory
    must be one directory for all of them: on a node-local disk each node would see only its own
    files, and the ranks would part ways in their collectives (a hang) or load different steps."""
    if world_size == 1:
        return None
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0, device=device)
    probe = Path(directory) / ".shared_storage_probe"
    if rank == 0:
        probe.write_text(token[0])
    dist.barrier()
    seen = probe.read_text() if probe.is_file() else None
    problem = None if seen == token[0] else (
        f"rank {rank} on {socket.gethostname()} does not see {probe} as rank 0 wrote it "
        f"({'missing' if seen is None else 'other contents'})")
    problem = agree(problem)  # a collective: every rank has read the probe by now
    if rank == 0:
        probe.unlink(missing_ok=True)
    dist.barrier()  # ... and it is gone for all when they go on
    return problem


def shutdown_distributed() -> None:
    """Destroy the process group at the end of a run, or after an error every rank raised together
    (a config error, a non-finite stop). Left to the interpreter's exit, the gloo backend's teardown
    sometimes aborts the process ("terminate called without an active exception", about 1 run in 8
    here), which fails a run that had finished and saved, or turns a config error's exit 2 into 134."""
    if dist.is_initialized():
        dist.destroy_process_group()
