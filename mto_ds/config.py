"""Typed run configuration: a YAML file plus dotted command-line overrides.

The schema is a tree of dataclasses read by OmegaConf, which gives typed merging and
`section.key=value` overrides. `load_config` adds what OmegaConf does not: an unknown key
fails naming the closest valid keys, and every choice and range is checked before any
work starts (`validate`).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

ARCHS = ("vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
         "vit_large_patch16", "vit_huge_patch14")
METHODS = ("simmim", "mae")
BASE_KEY = "_base_"  # a YAML config's parent file(s), as in mmengine's configs


class ConfigError(ValueError):
    """A run configuration that cannot be run; the message names the key."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10          # optimizer steps between metrics.jsonl / TensorBoard rows
    progress_bar: bool = True                # tqdm on stderr; into a file (a Slurm log) redrawn once a minute
    profile_step: Optional[int] = None       # torch.profiler from this optimizer step on, every rank: RUN/profile/
    profile_steps: int = 3                   # ... over this many steps


@dataclass
class ModelConfig:
    arch: str = "vit_base_patch16"
    method: str = "simmim"
    img_size: int = 224
    drop_path: float = 0.0
    mask_ratio: Optional[float] = None       # null: the method's default (SimMIM 0.6, MAE 0.75)
    mask_patch_size: Optional[int] = None    # SimMIM block size in pixels; null: 32 (28 for /14)
    norm_pix_loss: bool = True               # MAE: MSE on per-patch normalised pixels
    decoder_embed_dim: int = 512             # MAE decoder
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # Weights to begin with, at step 0 (a resume takes its checkpoint's): a run or checkpoint directory
    # of ours, or a file (an exported encoder, timm's, facebookresearch/mae's, a MIM model's state_dict).
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    source: str = "synthetic"                # synthetic | folder | ffcv
    path: Optional[str] = None               # ImageFolder root (folder) or .beton (ffcv)
    num_workers: int = 2
    crop_scale_min: Optional[float] = None   # null: the method's recipe (SimMIM 0.67, MAE 0.2)
    crop_scale_max: float = 1.0
    synthetic_images: int = 2048
    synthetic_classes: int = 10
    order: str = "exact"                     # exact (resumable mid-epoch) | quasi_random (FFCV)
    os_cache: bool = True                    # FFCV: page cache (True) or process memory


@dataclass
class TrainConfig:
    epochs: int = 1
    steps: Optional[int] = None              # total optimizer steps; wins over epochs
    global_batch_size: int = 256
    micro_batch_size: Optional[int] = None   # per rank, at most; null: the rank's share (no accumulation)
    blr: float = 1.5e-4                      # base LR; lr = blr * global_batch_size / 256
    lr: Optional[float] = None               # absolute LR; wins over blr
    min_lr_ratio: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None       # wins over warmup_epochs
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: Optional[float] = None         # max gradient norm; null: no clipping (MAE)
    activation_checkpointing: bool = False
    checkpoint_every: int = 1                # ... of every k-th block of each stack (1: all; 2: half)
    compile: bool = False                    # torch.compile each transformer block
    max_nonfinite_steps: int = 5             # consecutive non-finite losses before stopping


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2_bf16.json"


@dataclass
class CheckpointConfig:
    every_steps: int = 0                     # 0: only at the end (and on signal, and before an epoch's evaluation)
    every_minutes: float = 0.0               # also once this much training time passed since the last save; 0: off
    resume: str = "auto"                     # auto | none | a checkpoint directory
    keep_last: int = 3
    keep_every_epochs: int = 0               # the checkpoint ending every k-th epoch is saved and never pruned; 0: off


@dataclass
class MTOConfig:
    enabled: bool = False
    recalibrate: str = "early"               # none | early | all
    early_blocks: Optional[int] = None       # null: ceil(L / 3) of the blocks that see mask tokens
    lambda_spa: float = 0.1
    lambda_e: float = 0.1
    lambda_r: float = 0.1
    delta: float = 0.0
    warmup_steps: int = 0
    # Which implementation computes the statistics that carry gradients (docs/MTO_KERNEL.md):
    # auto (the Triton kernel on CUDA where it applies, else sdpa there; the reference on CPU) |
    # fused | sdpa | reference.
    kernel: str = "auto"


MTO_KERNELS = ("auto", "fused", "sdpa", "reference")
# What a null data.crop_scale_min means: the method's recipe (SimMIM's and MAE's crop scales).
CROP_SCALE = {"simmim": (0.67, 1.0), "mae": (0.2, 1.0)}


MASK_RATIO = {"simmim": 0.6, "mae": 0.75}  # what a null model.mask_ratio means: SimMIM's and MAE's


def masked_count(method: str, units: int, ratio: float) -> int:
    """How many of a sample's `units` the mask generators (models/masking.py) mask: SimMIM
    ceil(ratio x cells) whole cells of patches, MAE all patches but int(patches x (1 - ratio))."""
    return math.ceil(units * ratio) if method == "simmim" else units - int(units * (1 - ratio))


def mask_units(model: "ModelConfig") -> int:
    """What a mask draws from: SimMIM's cells of model.mask_patch_size, MAE's patches."""
    patch = 14 if model.arch.endswith("patch14") else 16
    if model.method == "simmim":
        patch = model.mask_patch_size or default_mask_patch_size(patch)
    return (model.img_size // patch) ** 2


def mask_ratio(model: "ModelConfig") -> float:
    """model.mask_ratio, or the method's default where it is null."""
    return MASK_RATIO[model.method] if model.mask_ratio is None else model.mask_ratio


def realised_mask_ratio(model: "ModelConfig") -> float:
    """The share of patches masked: the requested ratio rounded to whole units, which at small
    images or large SimMIM cells is far from it (64 px in 32 px cells: 3 of 4 cells at 0.6)."""
    units = mask_units(model)
    return masked_count(model.method, units, mask_ratio(model)) / units


def default_mask_patch_size(patch_size: int) -> int:
    """What a null model.mask_patch_size means: SimMIM's 32 px, or two patches where the patch
    does not divide 32 (28 px for /14)."""
    return 32 if 32 % patch_size == 0 else 2 * patch_size


@dataclass
class EvalConfig:
    every_epochs: int = 0                    # 0: no evaluation during pre-training
    # Also evaluate the initial (random) encoder before the first step, logged at epoch 0: the
    # curve's starting point, where an epoch-efficiency study reads how far above chance it got.
    at_start: bool = False
    knn_k: int = 20
    knn_temperature: float = 0.07
    num_train: int = 1024
    num_val: int = 512
    pooling: str = "mean"                    # mean (of the patch tokens after the final norm) | cls
    batch_size: int = 128                    # per rank, feature extraction
    linear_epochs: int = 100
    linear_lr: float = 1e-2
    finetune_batch_size: int = 64            # global, split over the ranks
    finetune_lr: float = 1e-3
    finetune_layer_decay: float = 0.75
    # Held-out images (the val split's first, as `mto-ds reconstruct` draws them) whose
    # reconstructions each evaluation during pre-training draws into TensorBoard
    # (eval/reconstructions), their mean loss_mim logged as loss_mim_held_out; 0: none.
    reconstructions: int = 8
    # Root of the labelled train/ and val/ ImageFolders to evaluate on, whatever data.source; null:
    # with data.source=folder the parent of data.path (ImageNet's layout), with synthetic held-out
    # synthetic images, with ffcv required.
    path: Optional[str] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mto: MTOConfig = field(default_factory=MTOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository, where
    ds_configs/ and configs/ ship: runs may start from any working directory."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p


def run_config_file(path) -> Optional[Path]:
    """The config.yaml (the resolved config a run directory keeps) of the run that `path`, a run
    directory, its checkpoints/ or one checkpoint of it, belongs to; None if none of them has one."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    for name in node.__dataclass_fields__:
        value = getattr(node, name)
        full = f"{prefix}{name}"
        keys.extend(_all_keys(value, full + ".") if hasattr(value, "__dataclass_fields__") else [full])
    return keys


VALID_KEYS = _all_keys(Config())


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, VALID_KEYS, n=3, cutoff=0.5)
    if not close:  # a typo in the section name: compare the last part only
        leaf = key.split(".")[-1]
        close = [k for k in VALID_KEYS if difflib.SequenceMatcher(None, leaf, k.split(".")[-1]).ratio() > 0.7][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key '{key}'{hint}"


# The lines OmegaConf appends to each message (`full_key: train.steps`, `reference_type=TrainConfig`,
# `object_type=TrainConfig`): its internals, and the key is named before the message already.
_OMEGACONF_CONTEXT = re.compile(r"\n[ \t]+(full_key: |reference_type=|object_type=).*")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    return _OMEGACONF_CONTEXT.sub("", str(getattr(err, "msg", None) or err))


def _bad_value(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    return f"bad value for '{key}': {_omegaconf_message(err)}" if key else f"bad value: {_omegaconf_message(err)}"


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        raise ConfigError(f"{source}: {_unknown_key_message(key)}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: {_bad_value(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_omegaconf_message(err)}") from None


def _yaml_layers(path: Path, chain: tuple = ()) -> list:
    """(file, its contents) of a YAML config, after those of the files its `_base_` names (a path
    relative to it, or a list of them, merged in order), so that a study's config can change a
    few keys of a recipe. Each file is merged on its own: an error names the file it is in."""
    if path in chain:
        raise ConfigError(f"{chain[-1]}: _base_ leads back to {path} ({' -> '.join(map(str, (*chain, path)))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the _base_ of {chain[-1]})" if chain else ""))
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml's scanner/parser errors, OmegaConf's duplicate keys
        raise ConfigError(f"{path} is not a valid YAML config: {err}") from None
    bases = loaded.pop(BASE_KEY, None) if isinstance(loaded, DictConfig) else None
    if bases is None:
        return [(path, loaded)]
    names = [bases] if isinstance(bases, str) else list(bases) if isinstance(bases, ListConfig) else None
    if not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{path}: bad value for '{BASE_KEY}': expected a path or a list of paths, got {bases!r}")
    layers = []
    for name in names:
        layers += _yaml_layers((path.parent / name).resolve(), (*chain, path))
    return [*layers, (path, loaded)]


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), training: bool = True) -> Config:
    """Schema defaults <- YAML file (after its `_base_` files) <- `section.key=value` overrides,
    then `validate`. `training=False` (evaluation) leaves out the DeepSpeed JSON, which only
    pre-training reads: a run trained with a JSON since moved or deleted is still evaluated."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        given = Path(path)
        path = resolve_path(str(path))  # configs/*.yaml from any working directory, as ds_configs/
        if not path.is_file() and not given.is_absolute():  # both places resolve_path looks
            raise ConfigError(f"config file not found: {given} (neither {Path.cwd() / given}, relative to "
                              f"the working directory, nor {REPO_ROOT / given}, in the checkout)")
        for source, loaded in _yaml_layers(path.resolve()):
            cfg = _merge(cfg, loaded, str(source))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key = item.split("=", 1)[0]
        if key not in VALID_KEYS:
            raise ConfigError(f"override '{item}': {_unknown_key_message(key)}")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, e.g. ${oc.env:X}
        raise ConfigError(_bad_value(err)) from None
    validate(config, training)
    return config


def unwritable_folder(folder) -> Optional[str]:
    """Why `folder` cannot be made (with its missing parents) or written in, or None."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"bad value for '{key}': expected {expected}, got {value!r}")


def read_deepspeed_json(cfg: "Config") -> dict:
    """The DeepSpeed JSON that `deepspeed.config` names, parsed."""
    path = resolve_path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {cfg.deepspeed.config}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object (DeepSpeed's keys), "
                          f"not a {type(ds).__name__}")
    return ds


def validate(cfg: Config, training: bool = True) -> None:
    """Choices and ranges OmegaConf's types cannot express (the DeepSpeed JSON's only for training)."""
    m, d, t, c, mto = cfg.model, cfg.data, cfg.train, cfg.checkpoint, cfg.mto
    # numpy's generators refuse a negative seed, late (after DeepSpeed's set-up); its legacy seeding
    # (np.random.seed, as numba compiles it for FFCV's quasi_random order) keeps 32 bits.
    _check(0 <= cfg.run.seed < 2 ** 32, "run.seed", "an integer in [0, 2**32)", cfg.run.seed)
    _check(cfg.run.log_every >= 1, "run.log_every", "a positive integer (optimizer steps between rows)",
           cfg.run.log_every)
    if cfg.run.profile_step is not None:
        _check(cfg.run.profile_step >= 1, "run.profile_step", "a step number >= 1 or null", cfg.run.profile_step)
    _check(cfg.run.profile_steps >= 1, "run.profile_steps", "a positive integer", cfg.run.profile_steps)
    _check(m.arch in ARCHS, "model.arch", f"one of {list(ARCHS)}", m.arch)
    _check(m.method in METHODS, "model.method", f"one of {list(METHODS)}", m.method)
    patch = 14 if m.arch.endswith("patch14") else 16
    _check(m.img_size > 0 and m.img_size % patch == 0, "model.img_size",
           f"a positive multiple of the patch size {patch}", m.img_size)
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", "a value in [0, 1)", m.drop_path)
    if m.mask_ratio is not None:
        _check(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", "a value in (0, 1)", m.mask_ratio)
    if m.method == "simmim" or m.mask_patch_size is not None:
        mask_patch = default_mask_patch_size(patch) if m.mask_patch_size is None else m.mask_patch_size
        _check(mask_patch > 0 and mask_patch % patch == 0 and m.img_size % mask_patch == 0,
               "model.mask_patch_size", f"a multiple of {patch} that divides model.img_size={m.img_size}"
               + (f" (null means {mask_patch}, which does not: set it)" if m.mask_patch_size is None else ""),
               m.mask_patch_size)
    # The mask the ratio and the cells make together: whole units, some masked and some visible.
    units, ratio = mask_units(m), mask_ratio(m)
    masked = masked_count(m.method, units, ratio)
    simmim = m.method == "simmim"
    unit = "cells of model.mask_patch_size" if simmim else "patches"
    null = f" (null means {default_mask_patch_size(patch)})" if simmim and m.mask_patch_size is None else ""
    _check(0 < masked < units, "model.mask_patch_size" if simmim else "model.mask_ratio",
           f"settings whose mask leaves some of the {units} {unit} visible and masks some (mask ratio {ratio} "
           f"masks {masked} at model.img_size={m.img_size}){null}", m.mask_patch_size if simmim else m.mask_ratio)
    for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        _check(getattr(m, key) > 0, f"model.{key}", "a positive integer", getattr(m, key))
    _check(m.decoder_embed_dim % m.decoder_num_heads == 0, "model.decoder_embed_dim",
           f"a multiple of model.decoder_num_heads={m.decoder_num_heads}", m.decoder_embed_dim)

    _check(d.source in ("synthetic", "folder", "ffcv"), "data.source", "one of synthetic, folder, ffcv", d.source)
    if d.source != "synthetic":
        _check(bool(d.path), "data.path", f"a path (data.source={d.source} reads from it)", d.path)
    _check(d.order in ("exact", "quasi_random"), "data.order", "one of exact, quasi_random", d.order)
    _check(d.order == "exact" or d.source == "ffcv", "data.order",
           f"exact with data.source={d.source} (quasi_random is FFCV's page-wise order)", d.order)
    _check(d.num_workers >= 0, "data.num_workers", "an integer >= 0", d.num_workers)
    _check(d.synthetic_images > 0, "data.synthetic_images", "a positive integer", d.synthetic_images)
    _check(d.synthetic_classes > 1, "data.synthetic_classes", "an integer >= 2", d.synthetic_classes)
    _check(0.0 < d.crop_scale_max <= 1.0, "data.crop_scale_max", "a value in (0, 1]", d.crop_scale_max)
    crop_min = CROP_SCALE[m.method][0] if d.crop_scale_min is None else d.crop_scale_min
    _check(0.0 < crop_min <= d.crop_scale_max, "data.crop_scale_min",
           f"0 < data.crop_scale_min <= data.crop_scale_max={d.crop_scale_max}"
           + (f" (null means {m.method}'s {crop_min}: set it, or raise crop_scale_max)"
              if d.crop_scale_min is None else ""), d.crop_scale_min)

    _check(t.epochs > 0, "train.epochs", "a positive integer", t.epochs)
    if t.steps is not None:
        _check(t.steps > 0, "train.steps", "a positive integer or null", t.steps)
    _check(t.global_batch_size > 0, "train.global_batch_size", "a positive integer", t.global_batch_size)
    if t.micro_batch_size is not None:
        _check(t.micro_batch_size > 0, "train.micro_batch_size", "a positive integer or null", t.micro_batch_size)
    _check(0 < t.blr < math.inf, "train.blr", "a finite positive number", t.blr)
    if t.lr is not None:
        _check(0 < t.lr < math.inf, "train.lr", "a finite positive number or null", t.lr)
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "a value in [0, 1]", t.min_lr_ratio)
    _check(0 <= t.warmup_epochs < math.inf, "train.warmup_epochs", "a finite number >= 0", t.warmup_epochs)
    if t.warmup_steps is not None:
        _check(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0 or null", t.warmup_steps)
    _check(0 <= t.weight_decay < math.inf, "train.weight_decay", "a finite number >= 0", t.weight_decay)
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas",
           "two values in [0, 1)", t.betas)
    if t.clip_grad is not None:
        _check(0 < t.clip_grad < math.inf, "train.clip_grad", "a finite positive number or null", t.clip_grad)
    _check(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "a positive integer", t.max_nonfinite_steps)
    _check(t.checkpoint_every >= 1, "train.checkpoint_every",
           "a positive integer (with train.activation_checkpointing: every k-th block recomputes; 1: all)",
           t.checkpoint_every)

    if training:
        validate_deepspeed(cfg)
        # Here, before torch's seconds of imports; the start checks it again where it makes the folder.
        unusable = unwritable_folder(cfg.run.output_dir)
        if unusable:
            raise ConfigError(f"bad value for 'run.output_dir': {cfg.run.output_dir} cannot be made or written as "
                              f"the run directory ({unusable})")
    _check(c.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0", c.every_steps)
    _check(c.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1", c.keep_last)
    _check(c.every_minutes >= 0, "checkpoint.every_minutes", "a number of minutes >= 0", c.every_minutes)
    _check(c.keep_every_epochs >= 0, "checkpoint.keep_every_epochs", "an integer >= 0", c.keep_every_epochs)
    _check(bool(c.resume), "checkpoint.resume", "auto, none or a checkpoint directory", c.resume)

    validate_mto(mto)

    if d.source == "folder" and d.path and all((Path(d.path) / split).is_dir() for split in ("train", "val")):
        raise ConfigError(f"bad value for 'data.path': {d.path} holds train/ and val/, so pre-training "
                          f"would read both as classes (the validation images too): set data.path="
                          f"{Path(d.path) / 'train'} (evaluation reads train/ and val/ of its parent, or eval.path)")
    e = cfg.eval
    _check(e.every_epochs >= 0, "eval.every_epochs", "an integer >= 0", e.every_epochs)
    for key in ("num_train", "num_val"):
        _check(getattr(e, key) > 0, f"eval.{key}", "a positive integer", getattr(e, key))
    _check(not ((e.every_epochs or e.at_start) and d.source == "ffcv" and not e.path), "eval.path",
           "the root of labelled train/ and val/ ImageFolders (evaluation during pre-training on "
           "data.source=ffcv reads its images from there)", e.path)
    _check(e.knn_k > 0, "eval.knn_k", "a positive integer", e.knn_k)
    _check(e.reconstructions >= 0, "eval.reconstructions", "an integer >= 0", e.reconstructions)
    _check(e.pooling in ("mean", "cls"), "eval.pooling", "mean or cls", e.pooling)
    for key in ("batch_size", "linear_epochs", "finetune_batch_size"):
        _check(getattr(e, key) > 0, f"eval.{key}", "a positive integer", getattr(e, key))
    for key in ("knn_temperature", "linear_lr", "finetune_lr"):
        _check(0 < getattr(e, key) < math.inf, f"eval.{key}", "a positive number", getattr(e, key))
    # Above 1 the early blocks would learn faster than the head: 7.5 typed for 0.75.
    _check(0 < e.finetune_layer_decay <= 1, "eval.finetune_layer_decay", "a value in (0, 1]", e.finetune_layer_decay)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_deepspeed(cfg: Config) -> None:
    """The DeepSpeed JSON that pre-training reads: there, parsed, and leaving the run's keys to it."""
    t = cfg.train
    name = cfg.deepspeed.config
    _check(Path(name).suffix == ".json" and resolve_path(name).is_file(), "deepspeed.config",
           "an existing DeepSpeed .json file (e.g. ds_configs/cpu_zero2.json)", name)
    ds = read_deepspeed_json(cfg)  # parsed now, so a broken file fails before any work
    for key in ("optimizer", "zero_optimization"):
        _check(isinstance(ds.get(key, {}), dict), "deepspeed.config", f"a file whose {key} is an object",
               f"{name} with {key}={ds.get(key)!r}")
    optimizer, zero = ds.get("optimizer", {}), ds.get("zero_optimization", {})
    _check(isinstance(optimizer.get("params", {}), dict), "deepspeed.config",
           "a file whose optimizer.params is an object", f"{name} with optimizer.params={optimizer.get('params')!r}")
    # The run fills in AdamW's betas and weight decay (MAE's and SimMIM's optimizer); another
    # optimizer would take them as its own or refuse them.
    _check(str(optimizer.get("type", "AdamW")).lower() in ("adam", "adamw"), "deepspeed.config",
           "a file whose optimizer.type is AdamW (or Adam)", f"{name} with optimizer.type={optimizer.get('type')!r}")
    _check(_is_int(zero.get("stage", 0)) and zero.get("stage", 0) in (0, 1, 2, 3), "deepspeed.config",
           "a file whose zero_optimization.stage is 0, 1, 2 or 3", f"{name} with stage={zero.get('stage')!r}")
    _check(not (t.clip_grad and zero.get("compute_grad_norm") is False), "train.clip_grad",
           f"null with zero_optimization.compute_grad_norm=false in {name} (clipping needs the norm)", t.clip_grad)
    # Keys the run fills in itself (engine/builder.py: deepspeed_config): a value of the file's
    # would be replaced without a word (a clipping of 1.0 from another project's JSON, under MAE's
    # recipe, trained unclipped), and DeepSpeed would step a scheduler the trainer overrides.
    owned = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
             "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size",
             "gradient_clipping": "train.clip_grad", "scheduler": "train.warmup_epochs and train.min_lr_ratio"}
    params = optimizer.get("params", {})
    for key, value, ours in [*((k, ds.get(k), owned[k]) for k in owned),
                             *((f"optimizer.params.{k}", params.get(k), o) for k, o in
                               (("lr", "train.lr / train.blr"), ("betas", "train.betas"),
                                ("weight_decay", "train.weight_decay")))]:
        _check(value in (None, "auto"), "deepspeed.config",
               f"a file that leaves {key} out (or 'auto'): {ours} sets it", f"{name} with {key}={value!r}")
    if t.compile:
        # DeepSpeed's ZeRO-3 gathers parameters in module hooks that split every compiled block
        # graph; past torch._dynamo's recompile limit the blocks silently run eager again.
        _check(zero.get("stage", 0) < 3, "train.compile",
               f"false with ZeRO stage 3 (deepspeed.config={name}); compile with ZeRO-1/2",
               t.compile)


def unread_keys(cfg: Config) -> List[str]:
    """Keys set that this run's method or data source never reads, each with why (a config
    switched from SimMIM to MAE keeps its mask cell; a .beton given to a synthetic smoke test):
    said at start, not refused, so one file can serve both methods and both kinds of run."""
    m, d, defaults = cfg.model, cfg.data, ModelConfig()
    unread = []
    if m.method == "mae" and m.mask_patch_size is not None:
        unread.append(f"model.mask_patch_size={m.mask_patch_size} is not read: MAE masks single patches "
                      f"(it is SimMIM's mask cell)")
    if m.method == "simmim":
        for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss"):
            if getattr(m, key) != getattr(defaults, key):
                unread.append(f"model.{key}={getattr(m, key)} is not read: it is MAE's; SimMIM predicts the pixels "
                              f"with one linear layer, its loss L1 on the masked pixels")
    if d.source == "synthetic" and d.path:
        unread.append(f"data.path={d.path} is not read: data.source=synthetic trains on {d.synthetic_images} "
                      f"generated images (set data.source=ffcv for a .beton, folder for an ImageFolder)")
    if d.source != "ffcv" and d.os_cache != DataConfig().os_cache:
        unread.append(f"data.os_cache={d.os_cache} is not read: it is FFCV's, and data.source={d.source}")
    t = cfg.train
    if t.checkpoint_every != TrainConfig().checkpoint_every and not t.activation_checkpointing:
        unread.append(f"train.checkpoint_every={t.checkpoint_every} is not read: it says which blocks "
                      "train.activation_checkpointing recomputes, and that is false")
    e = cfg.eval
    if e.reconstructions != EvalConfig().reconstructions and not (e.every_epochs or e.at_start):
        unread.append(f"eval.reconstructions={e.reconstructions} is not read: the evaluations during pre-training "
                      f"draw them, and this run has none (eval.every_epochs=0, eval.at_start=false); "
                      f"`mto-ds reconstruct` draws them from a checkpoint")
    return unread


def other_method_defaults(cfg: Config) -> List[str]:
    """A SimMIM run whose optimizer keys are the schema's defaults, which are MAE's recipe: a
    hand-written SimMIM config that leaves them out trains with MAE's optimizer (every shipped
    SimMIM recipe sets them). Said at start, not changed: the defaults stay one set whatever
    the method, so a run resumes with the settings it started with."""
    t, defaults = cfg.train, TrainConfig()
    if cfg.model.method != "simmim" or list(t.betas) != defaults.betas or t.clip_grad != defaults.clip_grad:
        return []
    keys = ("train.betas, train.clip_grad and train.blr" if t.lr is None and t.blr == defaults.blr
            else "train.betas and train.clip_grad")
    return [f"{keys} are the schema's defaults, MAE's recipe (betas {defaults.betas}, blr {defaults.blr:g}, no "
            f"clipping), in a SimMIM run; SimMIM's (configs/vit_*_simmim.yaml) is betas [0.9, 0.999], blr 5e-05, "
            f"clip_grad 5.0: set them unless MAE's optimizer is meant"]


def validate_mto(mto: "MTOConfig") -> None:
    """The `mto.*` values; also for the `mto` argument of create_mim_model."""
    # Types too: a dict given to create_mim_model skips OmegaConf's (early_blocks=2.0 broke slicing later).
    _check(isinstance(mto.enabled, bool), "mto.enabled", "true or false", mto.enabled)
    _check(mto.recalibrate in ("none", "early", "all"), "mto.recalibrate", "one of none, early, all",
           mto.recalibrate)
    if mto.early_blocks is not None:
        _check(_is_int(mto.early_blocks) and mto.early_blocks >= 0, "mto.early_blocks", "an integer >= 0 or null",
               mto.early_blocks)
    for key in ("lambda_spa", "lambda_e", "lambda_r", "delta"):
        value = getattr(mto, key)
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf,
               f"mto.{key}", "a finite number >= 0", value)
    _check(_is_int(mto.warmup_steps) and mto.warmup_steps >= 0, "mto.warmup_steps", "an integer >= 0",
           mto.warmup_steps)
    _check(mto.kernel in MTO_KERNELS, "mto.kernel", f"one of {', '.join(MTO_KERNELS)}", mto.kernel)


def flatten_config(node, prefix: str = "") -> dict:
    """A nested config (dicts, as yaml or OmegaConf.to_container give it) as {"section.key": value}."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
