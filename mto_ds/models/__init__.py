"""MIM models on timm ViT encoders: `create_mim_model` and the mask generator that goes with it.

The names below are imported when first used: reading a run's files (`mto_ds.models.weights`:
its checkpoints on disk) does not import torch and timm, which `mto-ds status` never needs."""
from __future__ import annotations

from importlib import import_module

_MODULE_OF = {"create_mim_model": "factory", "build_mim_model": "factory", "mask_fn_for": "factory",
              "build_mask_fn": "masking", "SimMIM": "simmim", "MAE": "mae", "TIMM_NAMES": "vit",
              "create_encoder": "vit"}


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_MODULE_OF)
