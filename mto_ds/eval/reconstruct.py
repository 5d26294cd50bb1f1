"""A checkpoint's reconstructions, MIM's first sanity check: `mto-ds reconstruct RUN OUT.png [IMAGE ...]`.

Each image is center-resized as the evaluation views it (datasets.center_resize) and masked by the
run's own mask generator, drawn from (seed, the image's position) as the loader draws a sample's
(data.loader.batch_masks): the same images and seed give the same masks at every checkpoint of a
run, so a run's checkpoints can be set side by side. The
PNG has a row per image: the image | the masked input (masked patches grey) | the model's
prediction of every patch | the prediction in the masked patches with the visible ones pasted
back (MAE's figure). Each image's loss_mim, the loss the run logs, comes with it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image

from ..config import load_config, run_config_file
from ..data import normalize
from ..data.imagefolder import IMAGE_EXTENSIONS, UndecodableImage, read_rgb
from ..data.loader import batch_masks, to_unit_pixels
from ..models import build_mim_model
from ..models.simmim import patchify, unpatchify
from ..models.weights import checkpoint_model_state, newest_complete
from .datasets import center_resize, held_out_images

log = logging.getLogger("mto_ds")

COLUMNS = ("image", "masked input", "prediction", "prediction with the visible patches pasted back")
MASKED_GREY = 0.5


def reconstruct_held_out(model, mask_fn, pixels: torch.Tensor, seed: int, device) -> Dict[str, torch.Tensor]:
    """`reconstruct` of uint8 `pixels` [N, 3, H, W], image i masked as the loader masks sample i of
    epoch 0 with run seed `seed`: the same images and seed give the same masks at every checkpoint
    (`mto-ds reconstruct`, and each evaluation during pre-training with seed 0)."""
    masks = batch_masks(mask_fn, seed, 0, range(len(pixels))).to(device)
    return reconstruct(model, normalize(pixels, device), masks)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """`model`'s view of normalised `images` [B, 3, H, W] under `masks` [B, L]: the COLUMNS as RGB
    in [0, 1] ('image', 'masked', 'prediction', 'pasted', each [B, 3, H, W]), 'loss' [B], each
    image's loss_mim, and 'masks'. With MAE's norm_pix_loss the prediction is of each patch's
    normalised pixels; its mean and std are put back from the image (MIMModel.prediction_pixels)."""
    patch = model.patch_size
    pred = model.predict(images, masks)
    loss = torch.stack([model.forward_loss(images[i:i + 1], pred[i:i + 1], masks[i:i + 1])
                        for i in range(len(images))])
    target = patchify(images, patch).float()
    pixels = model.prediction_pixels(images, pred).float()
    masked = masks.unsqueeze(-1)
    masked_pixels = unpatchify(masked.expand_as(target).float(), patch) > 0.5
    image = to_unit_pixels(images)
    return {"image": image,
            "masked": torch.where(masked_pixels, torch.full_like(image, MASKED_GREY), image),
            "prediction": to_unit_pixels(unpatchify(pixels, patch)),
            "pasted": to_unit_pixels(unpatchify(torch.where(masked, pixels, target), patch)),
            "loss": loss, "masks": masks}


def image_paths(paths: Sequence[Path]) -> List[Path]:
    """The files named, and each folder's image files (recursively, sorted by path)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(path)
    return files


def load_images(paths: Sequence[Path], count: int, size: int) -> Tuple[torch.Tensor, List[str]]:
    """The first `count` decodable images of `paths` (files, folders: image_paths) as uint8
    [N, 3, size, size] and their names; an undecodable one is named in a warning and skipped."""
    images, names = [], []
    for path in image_paths(paths):
        if len(images) == count:
            break
        try:
            pixels, _ = read_rgb(path)
        except UndecodableImage as err:
            log.warning("skipping undecodable image %s (%s)", path, err)
            continue
        images.append(center_resize(Image.fromarray(pixels), size))
        names.append(str(path))
    if not images:
        raise FileNotFoundError(f"no decodable image among {', '.join(map(str, paths))}")
    return torch.stack(images), names


def load_held_out(cfg, count: int) -> Tuple[torch.Tensor, List[str]]:
    """The decodable ones of `count` images of the run's evaluation val split (held_out_images)."""
    try:
        dataset = held_out_images(cfg, count)
    except (ValueError, FileNotFoundError) as err:
        raise FileNotFoundError(f"{err}; or name the images to reconstruct after the output file") from None
    items = [(dataset[i], dataset.name(i)) for i in range(len(dataset))]
    kept = [(item[0], name) for item, name in items if item is not None]  # None: undecodable, named by the source
    if not kept:
        raise FileNotFoundError("none of the images drawn from the evaluation val split could be decoded")
    return torch.stack([image for image, _ in kept]), [name for _, name in kept]


def grid(views: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The figure [3, H, W] in [0, 1]: one row per image, the COLUMNS left to right, 2 white
    pixels between them."""
    from torchvision.utils import make_grid
    rows = torch.stack([views[k].float() for k in ("image", "masked", "prediction", "pasted")], dim=1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=len(COLUMNS), padding=2, pad_value=1.0)


def write_grid(views: Dict[str, torch.Tensor], out: Path) -> None:
    from torchvision.utils import save_image
    save_image(grid(views), out)


def reconstruct_run(run: Path, out: Path, image_args: Sequence[Path], count: int, seed: int) -> List[str]:
    """Write `out` for the newest complete checkpoint of `run` (see the module doc); the lines to print."""
    config = run_config_file(run)
    if config is None:  # the CLI asked before importing torch; a caller of this function may not have
        raise FileNotFoundError(f"no config.yaml in {run} or the two folders above it (the run directory's)")
    # MTO's statistics do not change the prediction: any kernel, also on a machine without the
    # GPU that mto.kernel=fused needs (a login node).
    cfg = load_config(config, ["mto.kernel=auto"], training=False)
    tag_dir = newest_complete(run)
    # The images first: a mistake there is found before a large model's weights are merged.
    if image_args:
        pixels, names = load_images(image_args, count, cfg.model.img_size)
    else:
        pixels, names = load_held_out(cfg, count)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, mask_fn = build_mim_model(cfg)
    model.load_state_dict(checkpoint_model_state(tag_dir), strict=True)
    model.to(device).eval()
    views = reconstruct_held_out(model, mask_fn, pixels, seed, device)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_grid(views, out)
    share = views["masks"].float().mean().item()
    loss_name = ("L1 on the normalised pixels" if cfg.model.method == "simmim" else
                 "MSE on the pixels normalised per patch" if cfg.model.norm_pix_loss else
                 "MSE on the normalised pixels")
    lines = [f"wrote {out}: {len(names)} image(s) of {cfg.model.img_size} px, {tag_dir.name} of {run} "
             f"({cfg.model.arch} {cfg.model.method}), masks of seed {seed} ({share:.0%} of the patches masked)",
             f"columns: {' | '.join(COLUMNS)}",
             f"loss_mim ({loss_name}, masked patches):"]
    lines += [f"  {loss:.4f}  {name}" for loss, name in zip(views["loss"].tolist(), names)]
    lines.append(f"  {views['loss'].mean().item():.4f}  mean")
    return lines
