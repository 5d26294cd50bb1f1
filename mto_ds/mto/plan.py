"""Which blocks recalibrate and which compute statistics: MTO settings -> per-block flags."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Tuple

from .stats import num_early_blocks

# Statistics modes of one block: none (fused SDPA), telemetry (SDPA for the output and
# detached statistics beside it, so training numerics stay the baseline's), loss (the
# explicit path, statistics carry gradients).
NONE, TELEMETRY, LOSS = "none", "telemetry", "loss"


@dataclass(frozen=True)
class MTOSettings:
    enabled: bool = False
    recalibrate: str = "early"
    early_blocks: Any = None
    lambda_spa: float = 0.1
    lambda_e: float = 0.1
    lambda_r: float = 0.1
    delta: float = 0.0
    warmup_steps: int = 0

    @classmethod
    def from_any(cls, mto) -> "MTOSettings":
        """From None (off), a dict or a config object with the `mto.*` keys."""
        if mto is None:
            return cls(enabled=False)
        if isinstance(mto, MTOSettings):
            return mto
        names = {f.name for f in fields(cls)}
        values = dict(mto) if isinstance(mto, dict) else {n: getattr(mto, n) for n in names if hasattr(mto, n)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown MTO keys {sorted(unknown)}; valid: {sorted(names)}")
        if isinstance(mto, dict):
            values.setdefault("enabled", True)  # a dict asks for MTO unless it says otherwise
        return cls(**values)


def block_flags(settings: MTOSettings, num_blocks: int, with_stats: bool) -> Tuple[int, List[Tuple[bool, str]]]:
    """(K early blocks, [(recalibrate, stats mode)] per block that sees mask tokens)."""
    k = num_early_blocks(num_blocks, settings.early_blocks)
    flags = []
    for block in range(num_blocks):
        early = block < k
        on = settings.enabled
        recalibrate = on and (settings.recalibrate == "all" or (settings.recalibrate == "early" and early))
        if early:
            needs_grad_stats = on and (settings.lambda_spa > 0 or settings.lambda_e > 0)
        else:
            needs_grad_stats = on and settings.lambda_r > 0
        mode = LOSS if needs_grad_stats else (TELEMETRY if with_stats else NONE)
        flags.append((recalibrate, mode))
    return k, flags
