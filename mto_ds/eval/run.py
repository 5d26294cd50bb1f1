"""Evaluating an encoder: `evaluate` (the trainer's periodic hook) and `run_eval` (`mto-ds eval`).

Both run on every rank: features are extracted on shards and all-gathered (features.py),
the k-NN and the linear probe then run on every rank on the same features and rank 0's
numbers are broadcast, so every rank returns the same dict.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..models.weights import encoder_state, model_differences, read_weights, saved_model_settings, weights_identity
from .datasets import build_eval_sets
from .features import extract_features, rank_and_world
from .finetune import check_batch as check_finetune_batch, finetune_top1
from .knn import knn_top1
from .linear_probe import linear_probe_top1


def _same_on_all_ranks(results: Dict[str, float]) -> Dict[str, float]:
    _, world_size = rank_and_world()
    if world_size == 1:
        return results
    box = [results]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def evaluate(encoder: nn.Module, cfg, device: torch.device,
             eval_sets: Optional[Tuple[Dataset, Dataset]] = None) -> Dict[str, float]:
    """{'knn_top1', 'linear_top1'} in [0, 100] of `encoder`'s frozen features on `eval_sets`
    (built by `build_eval_sets(cfg)` when not given).

    Call it on every rank (it all-gathers). The encoder's train/eval mode is restored.
    """
    opts = cfg.eval
    train_set, val_set = eval_sets or build_eval_sets(cfg)
    extract = dict(pooling=opts.pooling, batch_size=opts.batch_size, num_workers=cfg.data.num_workers)
    train_x, train_y = extract_features(encoder, train_set, device, **extract)
    val_x, val_y = extract_features(encoder, val_set, device, **extract)
    num_classes = train_set.num_classes
    results = {
        "knn_top1": knn_top1(train_x, train_y, val_x, val_y, num_classes, k=opts.knn_k,
                             temperature=opts.knn_temperature),
        "linear_top1": linear_probe_top1(train_x, train_y, val_x, val_y, num_classes,
                                         epochs=opts.linear_epochs, lr=opts.linear_lr, seed=cfg.run.seed),
    }
    return _same_on_all_ranks(results)


def build_encoder(cfg) -> nn.Module:
    """The pre-training encoder (a timm ViT without head) for `cfg.model`, randomly initialised."""
    from mto_ds.models import create_encoder  # lazy: eval needs models only to load checkpoints
    return create_encoder(cfg.model.arch, img_size=cfg.model.img_size)


def load_encoder_state(checkpoint: str) -> Dict[str, torch.Tensor]:
    """Encoder weights with timm key names from a state-dict file or a run/checkpoint directory
    (what `models/weights.py: read_weights` reads, its decoder and mask token left out)."""
    return encoder_state(read_weights(checkpoint))


# Raised when the way a number is computed changes, so that a study's cached rows computed the old
# way are evaluated again. 2: the linear probe standardises as BatchNorm does, sqrt(var + eps).
# 3: eval.finetune_batch_size is the fine-tune's global batch, split over the ranks, and its last
# partial batch is dropped (it was per rank, so the fine-tune differed with the number of ranks).
PROTOCOL = 3


def evaluation_settings(cfg, checkpoint: str, finetune_epochs: int = 0,
                        device: Optional[torch.device] = None) -> Dict[str, object]:
    """What `run_eval(cfg, checkpoint, finetune_epochs)`'s numbers depend on: the eval section,
    the images it reads, the encoder's shape, the seed of the probes, the fine-tune length, the
    device type (autocast on GPUs) and the weights it loads. Not the number of ranks: the numbers
    are those of one process on any number (up to the order of floating-point sums)."""
    from .datasets import eval_root

    section = dataclasses.asdict(cfg.eval)
    # When pre-training evaluates, and what else it draws then: run_eval reads none of them (and a
    # row cached before a key existed must still count).
    for key in ("every_epochs", "at_start", "reconstructions"):
        section.pop(key)
    data = cfg.data
    if data.source == "synthetic" and not cfg.eval.path:
        images = {"synthetic_images": data.synthetic_images, "synthetic_classes": data.synthetic_classes}
    else:  # "subset": how build_eval_sets cuts a larger split down; rows cached from the earlier
        # uniform draw (without this key) are evaluated again.
        images = {"root": str(eval_root(cfg).resolve()), "subset": "class-balanced"}
    # The weights evaluated are the checkpoint's: where the run began (model.init_from) is in them.
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "init_from"}
    return {"protocol": PROTOCOL, "eval": section, "images": {"source": data.source, **images},
            "model": model, "seed": cfg.run.seed, "finetune_epochs": finetune_epochs,
            "device": torch.device(device or default_device()).type,
            "checkpoint": weights_identity(checkpoint)}


# The model.* keys that decide the encoder's shapes: of the trainer's `_model_keys`, the method and
# MAE's decoder change only what pre-training adds around the encoder.
ENCODER_KEYS = ("model.arch", "model.img_size")


def check_checkpoint_model(cfg, checkpoint: str) -> None:
    """A run pre-trained with another model.arch or model.img_size than `cfg` builds: its weights
    do not fit, and torch's load would list every tensor's shape. Fails naming the keys."""
    saved = saved_model_settings(checkpoint)
    if saved is None:
        return  # a file, or a checkpoint that does not say: load_encoder_weights compares shapes
    source, saved_keys = saved
    here = {key: getattr(cfg.model, key.removeprefix("model.")) for key in ENCODER_KEYS}
    differ = model_differences(saved_keys, here)
    if differ:
        found = "; ".join(f"{key}: {saved_keys[key]} in {source}, {here[key]} here" for key in differ)
        raise ConfigError(f"{checkpoint} was pre-trained with another model than this config builds ({found}): "
                          f"its weights do not fit; evaluate with {' '.join(f'{k}={saved_keys[k]}' for k in differ)}")


def load_encoder_weights(encoder: nn.Module, checkpoint: str) -> None:
    """Loads `checkpoint` into `encoder`, failing with the missing/unexpected keys or the tensors
    whose shapes differ (weights of another model.arch or model.img_size)."""
    state, own = load_encoder_state(checkpoint), encoder.state_dict()
    resized = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    if resized:
        shapes = ", ".join(f"{k} {list(state[k].shape)} there, {list(own[k].shape)} here" for k in resized[:3])
        raise ValueError(f"{checkpoint} does not match the encoder of this config (model.arch, model.img_size): "
                         f"{len(resized)} tensors differ in shape: {shapes}{', ...' if len(resized) > 3 else ''}")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not match the encoder of this config: "
                         f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def run_eval(cfg, checkpoint: str, finetune_epochs: int = 0,
             device: Optional[torch.device] = None) -> Dict[str, float]:
    """k-NN and linear probe (and, if finetune_epochs > 0, a fine-tune) of a saved encoder.

    Call it on every rank once torch.distributed is initialised (or in one process).
    """
    device = device or default_device()
    check_checkpoint_model(cfg, checkpoint)
    # Before the weights load (minutes for a ViT-H on a shared file system): missing image
    # folders, and a batch the fine-tune cannot run, fail first.
    train_set, val_set = build_eval_sets(cfg)
    if finetune_epochs > 0:
        check_finetune_batch(len(train_set), cfg.eval.finetune_batch_size)
    encoder = build_encoder(cfg)
    load_encoder_weights(encoder, checkpoint)
    encoder.to(device)
    results = evaluate(encoder, cfg, device, (train_set, val_set))
    if finetune_epochs > 0:
        opts = cfg.eval
        results["finetune_top1"] = finetune_top1(
            encoder, train_set, val_set, train_set.num_classes, device, epochs=finetune_epochs,
            pooling=opts.pooling, batch_size=opts.finetune_batch_size, lr=opts.finetune_lr,
            layer_decay=opts.finetune_layer_decay, seed=cfg.run.seed, num_workers=cfg.data.num_workers)
        results = _same_on_all_ranks(results)
    return results
