"""Encoder export: a run's newest complete checkpoint -> a state dict with timm's key names
(read by mto_ds/models/weights.py, which eval uses too).

`timm.create_model(<timm name>, num_classes=0, img_size=<run's>, checkpoint_path=OUT)` loads it
with no missing or unexpected keys (timm names per arch: mto_ds.models.TIMM_NAMES). OUT ending
in .safetensors is written in that format (with the run's model settings as its metadata), any
other name by torch.save. timm's own default for these architectures normalises with mean and std
0.5 (its augreg weights'): the printed call overlays the run's ImageNet statistics and crop, so that
timm.data.resolve_data_config (and timm's train.py) preprocess as pre-training and evaluation did.

`export_timm_folder` writes a model folder instead (timm's save_for_hf: config.json and
model.safetensors), which `timm.create_model("local-dir:OUT")` loads whole, with the run's image
size, that preprocessing and the evaluation's mean pooling, and which the Hugging Face Hub takes as
a model repository.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.loader import IMAGENET_MEAN, IMAGENET_STD
from ..eval.datasets import CROP_PCT
from ..models import TIMM_NAMES
from ..models.weights import checkpoint_encoder_state, saved_model_settings

# What pre-training normalised with and evaluation center-crops: timm's pretrained_cfg keys.
PREPROCESSING = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": CROP_PCT, "interpolation": "bicubic"}


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
                f"checkpoint_path='{out}', pretrained_cfg_overlay=dict(input_size=(3, {model['model.img_size']}, "
                f"{model['model.img_size']}), mean={IMAGENET_MEAN}, std={IMAGENET_STD}, crop_pct={CROP_PCT}))")
    return f"wrote {out} ({len(state)} tensors)"


def export_timm_folder(run_dir, out) -> str:
    """The encoder as a timm model folder; the run must say its model.arch and model.img_size."""
    import timm
    from timm.models import save_for_hf
    run_dir, out = Path(run_dir), Path(out)
    saved = saved_model_settings(run_dir)
    model = saved[1] if saved else {}
    if model.get("model.arch") not in TIMM_NAMES or "model.img_size" not in model:
        raise ValueError(f"{run_dir} does not say which timm architecture it trained (model.arch among "
                         f"{', '.join(TIMM_NAMES)}, and model.img_size)")
    # Mean pooling of the final norm's patch tokens: the features the evaluation reads (eval.pooling=mean).
    model_args = {"img_size": model["model.img_size"], "num_classes": 0, "global_pool": "avg", "fc_norm": False}
    method = model.get("model.method", "mim")
    encoder = timm.create_model(TIMM_NAMES[model["model.arch"]], **model_args, pretrained_cfg_overlay={
        **PREPROCESSING, "tag": f"mto_ds_{method}", "license": None})
    encoder.load_state_dict(checkpoint_encoder_state(run_dir), strict=True)
    save_for_hf(encoder, str(out), model_args=model_args, safe_serialization=True)
    return (f"wrote {out}/ (config.json, model.safetensors); load with timm.create_model('local-dir:{out}'), "
            "or upload the folder as a Hugging Face model repository")
