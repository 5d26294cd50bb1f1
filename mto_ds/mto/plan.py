"""Which blocks recalibrate and which compute statistics: MTO settings -> per-block flags."""
from __future__ import annotations

from dataclasses import fields
from typing import List, Tuple

from ..config import MTOConfig, validate_mto

from .stats import num_early_blocks

# Statistics modes of one block: none (fused SDPA), telemetry (SDPA for the output and
# detached statistics beside it, so training numerics stay the baseline's), loss (both
# statistics carry gradients), mass (only the mass on masked keys, with gradients: a late block
# off a logging step, whose entropy no loss reads).
NONE, TELEMETRY, LOSS, MASS = "none", "telemetry", "loss", "mass"
STATS_WITH_GRADIENTS = (LOSS, MASS)


def mto_settings(mto) -> MTOConfig:
    """The `mto.*` settings from None (off), a dict (MTO on unless it says otherwise) or a config."""
    if mto is None:
        return MTOConfig(enabled=False)
    if isinstance(mto, MTOConfig):
        return mto
    names = [f.name for f in fields(MTOConfig)]
    if isinstance(mto, dict):
        unknown = set(mto) - set(names)
        if unknown:
            raise ValueError(f"unknown MTO keys {sorted(unknown)}; valid: {names}")
        settings = MTOConfig(**{"enabled": True, **mto})
    else:
        settings = MTOConfig(**{n: getattr(mto, n) for n in names if hasattr(mto, n)})
    validate_mto(settings)  # the values a run's config gets checked for (a ConfigError names the key)
    return settings


def block_flags(settings: MTOConfig, num_blocks: int, with_stats: bool) -> Tuple[int, List[Tuple[bool, str]]]:
    """(K early blocks, [(recalibrate, stats mode)] per block that sees mask tokens)."""
    k = num_early_blocks(num_blocks, settings.early_blocks)
    flags = []
    for block in range(num_blocks):
        early = block < k
        on = settings.enabled
        recalibrate = on and (settings.recalibrate == "all" or (settings.recalibrate == "early" and early))
        if early:
            needs_grad_stats = on and (settings.lambda_spa > 0 or settings.lambda_e > 0)
        else:  # L_r compares consecutive late blocks: a single late block gives it nothing
            needs_grad_stats = on and settings.lambda_r > 0 and num_blocks - k >= 2
        if needs_grad_stats:
            # L_r reads only the heterogeneity (mass) of late blocks; their entropy is telemetry.
            mode = LOSS if early or with_stats else MASS
        else:
            mode = TELEMETRY if with_stats else NONE
        flags.append((recalibrate, mode))
    return k, flags
