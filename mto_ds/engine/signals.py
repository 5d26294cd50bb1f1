"""Preemption: SIGTERM / SIGUSR1 ask the run to finish its step, checkpoint and exit cleanly."""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("mto_ds")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal_name = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # Only a flag: the step in flight finishes, then all ranks agree and save together.
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: stopping after the current step with a checkpoint", self.signal_name)

    def agreed(self) -> bool:
        """True on every rank once any rank got a stop signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.signal_name:
            self.signal_name = "signal on another rank"
        return bool(flag.item())
