"""Preemption: SIGTERM / SIGUSR1 ask the run to finish its step, checkpoint and exit cleanly."""
from __future__ import annotations

import logging
import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("mto_ds")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installed before anything slow starts, so a signal during set-up is not lost either."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.pid = os.getpid()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # Forked DataLoader workers inherit this handler. Slurm signals every process of a step, so
        # they get the signal too; they must live on until the rank has saved, and say nothing.
        if os.getpid() != self.pid:
            return
        # Only a flag: the step in flight finishes, then all ranks agree and save together.
        self.signum = self.signum or signum
        log.warning("received %s: stopping after the current step with a checkpoint", self.signal_name)

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self, device: torch.device = torch.device("cpu")) -> bool:
        """True on every rank once any rank got a stop signal (one tiny all-reduce per step).

        The number of the signal travels with the flag, so every rank, and state.json, names it
        even when only one rank received it."""
        flag = torch.tensor([float(self.signum or 0)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.signum:
            self.signum = int(flag.item())
        return bool(flag.item())
