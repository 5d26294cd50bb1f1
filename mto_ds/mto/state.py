"""MTO's state across optimizer steps: the loss-weight warm-up position and running telemetry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .losses import warmup_scale


@dataclass
class MTOState:
    warmup_steps: int = 0
    step: int = 0                                   # optimizer steps taken
    ema_heterogeneity: Optional[List[float]] = None  # per block, over logged steps
    ema_decay: float = 0.9

    @property
    def loss_scale(self) -> float:
        return warmup_scale(self.step, self.warmup_steps)

    def advance(self, heterogeneity: Optional[List[float]] = None) -> None:
        """Once per optimizer step (never per micro-batch)."""
        self.step += 1
        if heterogeneity is not None and all(h == h for h in heterogeneity):  # skip NaN (not computed)
            if self.ema_heterogeneity is None:
                self.ema_heterogeneity = list(heterogeneity)
            else:
                d = self.ema_decay
                self.ema_heterogeneity = [d * a + (1 - d) * b for a, b in zip(self.ema_heterogeneity, heterogeneity)]

    def state_dict(self) -> dict:
        return {"step": self.step, "ema_heterogeneity": self.ema_heterogeneity}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.ema_heterogeneity = state.get("ema_heterogeneity")
