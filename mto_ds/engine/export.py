"""Encoder export: a run's newest complete checkpoint -> a state dict with timm's key names
(read by mto_ds/models/weights.py, which eval uses too).

`timm.create_model(<timm name>, num_classes=0, img_size=<run's>, checkpoint_path=OUT)` loads it
with no missing or unexpected keys (timm names per arch: mto_ds.models.TIMM_NAMES). OUT ending
in .safetensors is written in that format (with the run's model settings as its metadata), any
other name by torch.save.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import TIMM_NAMES
from ..models.weights import checkpoint_encoder_state, saved_model_settings


def export_encoder(run_dir, out) -> str:
    run_dir = Path(run_dir)  # that it exists, the CLI checked before importing torch
    state = checkpoint_encoder_state(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A checkpoint directory (RUN/checkpoints/step_N) too: its complete.json or its run's config.yaml.
    saved = saved_model_settings(run_dir)
    model = saved[1] if saved else {}
    if out.suffix == ".safetensors":
        # No pickle: loading it runs no code, and it maps into memory (timm, Hugging Face).
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(out),
                  metadata={"format": "pt", **{k: str(v) for k, v in model.items()}})
    else:
        torch.save(state, out)
    if model.get("model.arch") in TIMM_NAMES and "model.img_size" in model:
        return (f"wrote {out} ({len(state)} tensors); load with timm.create_model("
                f"'{TIMM_NAMES[model['model.arch']]}', num_classes=0, img_size={model['model.img_size']}, "
                f"checkpoint_path='{out}')")
    return f"wrote {out} ({len(state)} tensors)"
