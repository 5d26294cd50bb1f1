"""Process-group set-up for every launcher: deepspeed, torchrun, srun, or one plain process."""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch


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


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "127.0.0.1"


def job_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: the same on every task of the job, different between
    jobs sharing a node, and below Linux's ephemeral range (32768-60999), where an outgoing
    connection could hold it. slurm/lib.sh (mto_set_master) uses the same rule."""
    return 12000 + job_id % 20000


def resolve_rank_env(env=os.environ) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for launchers that do not set them.

    torchrun and deepspeed set them; under `srun` (one task per GPU) they come from SLURM_*;
    a plain process is rank 0 of 1.
    """
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
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
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)
