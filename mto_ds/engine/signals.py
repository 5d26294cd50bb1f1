"""Preemption: SIGTERM / SIGUSR1 ask the run to finish its step, checkpoint and exit cleanly, and
so does a first Ctrl-C (SIGINT); a second Ctrl-C stops at once (KeyboardInterrupt), without saving."""
from __future__ import annotations

import logging
import os
import signal
from typing import Optional

# torch is imported where it is used: `mto-ds pretrain` makes its StopRequest before the slow
# imports (torch, deepspeed, timm), so a signal during them is neither lost nor fatal.

log = logging.getLogger("mto_ds")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# Not a signal: the run directory was taken over by another start (run_dir.RunLock.lost). Above
# every signal's number, so the ranks' MAX agreement carries it over a signal at the same step.
TAKEN_OVER = 255


class StopRequest:
    """Installed before anything slow starts, so a signal during set-up is not lost either."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.taken_over = False  # set by the trainer when its run directory was taken over
        self.agreed_code = 0     # what the last `agreed` found: a signal's number, TAKEN_OVER or 0
        self.agreed_save_asked_at = 0  # ... and the step a timed save was asked at (0: none)
        self.pid = os.getpid()
        self._pending: Optional[_ReducedFlags] = None  # last step's agreement, still in flight
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # A forked child (a DataLoader worker before its worker_init_fn sets SIG_IGN) inherits
        # this handler: it must not act or speak for the rank.
        if os.getpid() != self.pid:
            return
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # Ctrl-C again: the user will not wait for the save
        # Only a flag: the step in flight finishes, then all ranks agree and save together.
        self.signum = self.signum or signum
        again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
        log.warning("received %s: stopping after the current step with a checkpoint%s",
                    signal.Signals(signum).name, again)

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self, device=None, save_asked_at: int = 0) -> bool:
        """True on every rank once any rank got a stop signal; called once per optimizer step.

        With several ranks, one tiny all-reduce per step carries the flag (the signal's number,
        so every rank, and state.json, names it even when one rank received it). Its result is
        read at the next call: waiting for it at once would make the host wait for the whole step
        to finish on the GPU before queueing the next, and a signal is only acted on one step
        later. All ranks read the same reduced value, so they stop after the same step.
        `device` (default CPU) holds the flag: the rank's device, where the backend reduces.
        A rank whose run directory was taken over (`taken_over`) sends TAKEN_OVER instead, which
        the MAX carries over any signal; `agreed_code` holds what was agreed.
        The same reduction carries the trainer's timed save (checkpoint.every_minutes): a rank
        whose clock says one is due sends its step as `save_asked_at`, and `agreed_save_asked_at`
        holds the latest step any rank asked at (0: none), the same on every rank.
        """
        import torch
        import torch.distributed as dist
        local = TAKEN_OVER if self.taken_over else (self.signum or 0)
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self.agreed_code, self.agreed_save_asked_at = local, save_asked_at
            return bool(local)
        previous = self._pending
        self._pending = _ReducedFlags([float(local), float(save_asked_at)], device or torch.device("cpu"))
        if previous is None:
            return False
        code, asked_at = previous.values()
        self.agreed_code, self.agreed_save_asked_at = int(code), int(asked_at)
        if self.agreed_code and self.agreed_code != TAKEN_OVER and not self.signum:
            self.signum = self.agreed_code
        return bool(self.agreed_code)

    def ignore_from_now(self) -> None:
        """For a rank that only exits now. Python's exit resets a handler it installed to the
        default action, and srun --kill-on-bad-exit sends TERM to the ranks still exiting once
        one rank exits: killed by it, a rank would turn the step's exit status (2 for a config
        error, which the Slurm templates never requeue) into 143. Ignored, it keeps its own."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def close(self) -> None:
        """Wait for the reduction still in flight (every rank issued it at its last `agreed`), so
        that the process group is not torn down with work pending (shutdown_distributed)."""
        if self._pending is not None:
            self._pending.values()
            self._pending = None


class _ReducedFlags:
    """A few floats all-reduced (MAX) across ranks without waiting: `values()` waits for them.
    Steps are exact as floats up to 2**24 (float32), far beyond a run's optimizer steps."""

    def __init__(self, flags: list, device):
        import torch
        import torch.distributed as dist
        # Filled on the device; torch.tensor(flags, device=...) would be a blocking copy (a drain).
        # One fill where all are equal (no signal, no timed save: nearly every step), else one each.
        tensor = torch.full((len(flags),), flags[0], device=device)
        for i, flag in enumerate(flags[1:], start=1):
            if flag != flags[0]:
                tensor[i].fill_(flag)
        self.work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)
        self.tensor, self.host, self.event = tensor, tensor, None  # held until the values are read
        if device.type == "cuda":
            self.work.wait()  # on NCCL: the current stream waits for the reduction; the host does not
            self.host = torch.empty(len(flags), pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def values(self) -> list:
        if self.event is not None:
            self.event.synchronize()  # the previous step's copy: long done by the time it is asked
        else:
            self.work.wait()
        return self.host.tolist()
