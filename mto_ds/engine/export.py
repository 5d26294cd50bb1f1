"""Encoder export: a run's newest complete checkpoint -> a state dict with timm's key names.

`timm.create_model(<timm name>, num_classes=0, img_size=<run's>, checkpoint_path=OUT)` loads it
with no missing or unexpected keys (timm names per arch: mto_ds.models.TIMM_NAMES).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..models import TIMM_NAMES
from .checkpoint import Checkpointer


def newest_complete(path: Path) -> Path:
    """The newest complete checkpoint of a run directory or of a checkpoints directory."""
    for root in (path / "checkpoints", path):
        if root.is_dir():
            found = Checkpointer(root, 1, 0, 1).complete_tags()
            if found:
                return found[0]
    raise FileNotFoundError(f"no complete checkpoint under {path}")


def checkpoint_encoder_state(path) -> dict:
    """fp32 encoder weights with timm key names from a run directory's newest complete checkpoint,
    or from a checkpoint directory (files: eval/run.py's load_encoder_state reads them)."""
    path = Path(path)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = newest_complete(path)
    # Merges ZeRO-1/2/3 partitions into the fp32 master weights (not the bf16 working copy).
    full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return encoder_state(full)


def encoder_state(model_state: dict) -> dict:
    """A MIM model's state dict -> its encoder's, fp32, with timm's key names (no decoder, no mask token)."""
    return {k[len("encoder."):]: v.float().contiguous() for k, v in model_state.items() if k.startswith("encoder.")}


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
