"""Building a MIM model: `create_mim_model` from its settings, `build_mim_model` from a run's
config, and the mask generator that goes with it."""
from __future__ import annotations

import numpy as np

from ..config import METHODS
from .mae import MAE
from .masking import build_mask_fn
from .simmim import SimMIM
from .vit import create_encoder


def create_mim_model(arch: str, method: str, *, img_size: int = 224, mto=None, drop_path: float = 0.0,
                     activation_checkpointing: bool = False, checkpoint_every: int = 1, compile_blocks: bool = False,
                     decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                     norm_pix_loss: bool = True, encoder_overrides=None):
    """A SimMIM or MAE model; `model(images, mask)` returns the loss dict (see MIMModel).

    mto: None (off), a dict of `mto.*` keys (enabled unless it says otherwise) or a config object.
    activation_checkpointing: recompute blocks in the backward pass instead of keeping their
    activations; every `checkpoint_every`-th of each stack (1: all; models/vit.py: checkpointed).
    compile_blocks: torch.compile each transformer block (the first step pays for compilation).
    encoder_overrides: timm keyword arguments that replace the arch's, e.g. {"embed_dim": 64,
    "num_heads": 1} for the arch's depth and parameter tensors at a width where the device does
    almost no work (tools/bench_step.py --width measures the host's share of a step with it).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; expected one of {list(METHODS)}")
    encoder = create_encoder(arch, img_size=img_size, drop_path=drop_path, **(encoder_overrides or {}))
    if method == "simmim":
        return SimMIM(encoder, mto=mto, activation_checkpointing=activation_checkpointing,
                      compile_blocks=compile_blocks, checkpoint_every=checkpoint_every)
    return MAE(encoder, mto=mto, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
               decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss,
               activation_checkpointing=activation_checkpointing, compile_blocks=compile_blocks,
               checkpoint_every=checkpoint_every)


def build_mim_model(cfg, *, activation_checkpointing: bool = False, checkpoint_every: int = 1,
                    compile_blocks: bool = False):
    """(The MIM model of `cfg.model` with `cfg.mto`, the mask generator of its patch grid), on the
    current default device. `cfg` is a mto_ds.config.Config."""
    m = cfg.model
    model = create_mim_model(m.arch, m.method, img_size=m.img_size, mto=cfg.mto, drop_path=m.drop_path,
                             activation_checkpointing=activation_checkpointing, checkpoint_every=checkpoint_every,
                             compile_blocks=compile_blocks, decoder_embed_dim=m.decoder_embed_dim,
                             decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads,
                             norm_pix_loss=m.norm_pix_loss)
    return model, mask_fn_for(model, m.method, m.img_size, m.mask_ratio, m.mask_patch_size)


def mask_fn_for(model, method: str, img_size: int, mask_ratio=None, mask_patch_size=None):
    """The per-sample mask generator that matches `model`'s patch grid. An MAE model also learns
    how many patches these masks keep visible (the same in every mask), so its forward passes
    need not read that from each mask on the device (MAE.visible_count)."""
    fn = build_mask_fn(method, img_size, model.patch_size, mask_ratio, mask_patch_size)
    if isinstance(model, MAE):
        model.num_visible = int((~fn(np.random.default_rng(0))).sum())
    return fn
