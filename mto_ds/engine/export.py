"""Encoder export: a run's newest complete checkpoint -> a state dict with timm's key names
(read by mto_ds/models/weights.py, which eval uses too).

`timm.create_model(<timm name>, num_classes=0, img_size=<run's>, checkpoint_path=OUT)` loads it
with no missing or unexpected keys (timm names per arch: mto_ds.models.TIMM_NAMES).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..models import TIMM_NAMES
from ..models.weights import checkpoint_encoder_state


def export_encoder(run_dir, out) -> str:
    run_dir = Path(run_dir)
    state = checkpoint_encoder_state(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    config = run_dir / "config.yaml"
    if config.is_file():
        model = yaml.safe_load(config.read_text())["model"]
        return (f"wrote {out} ({len(state)} tensors); load with timm.create_model('{TIMM_NAMES[model['arch']]}', "
                f"num_classes=0, img_size={model['img_size']}, checkpoint_path='{out}')")
    return f"wrote {out} ({len(state)} tensors)"
