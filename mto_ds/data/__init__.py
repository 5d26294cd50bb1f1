"""Data sources behind one interface: `build_pretrain_loader` (engine) and `normalize`.

`data.source` picks the path: `ffcv` (a .beton made by tools/make_ffcv.py; the fast path),
`folder` (ImageNet-layout folder decoded with PIL in DataLoader workers; the fallback) or
`synthetic` (embedded, procedural). FFCV is imported only when it is used, so the package
works on machines without it; torch too (the loader, `normalize`), so that tools/make_synthetic.py,
tools/make_ffcv.py's --help and the data checks start without loading it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config import CROP_SCALE, ConfigError
from .imagefolder import ImageFolderSource, UndecodableImage, folder_problem, list_image_folder, read_rgb
from .synthetic import SyntheticImages, write_image_folder

if TYPE_CHECKING:
    import torch


def __getattr__(name):
    if name in ("PretrainLoader", "normalize"):
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def beton_problem(path: Path) -> Optional[str]:
    """Why `path` is not an FFCV file to open, or None (the header is FFCV's to check)."""
    if path.is_file():
        return None
    return f"{path}: {'a directory, not an FFCV file' if path.is_dir() else 'not found'}"


def data_path_problem(data_cfg) -> Optional[str]:
    """Why `data.path` cannot be what `data.source` reads, or None: a look at the path and a
    folder's top level only (nothing decoded, no class folder listed), so a start can refuse it
    before it builds a model. The loaders check the rest (class folders without an image, a
    file that is not an FFCV .beton) as they open it."""
    if data_cfg.source == "ffcv":
        problem = beton_problem(Path(data_cfg.path))
        return problem and f"data.path={problem} (data.source=ffcv reads a .beton made by tools/make_ffcv.py)"
    if data_cfg.source == "folder":
        problem = folder_problem(Path(data_cfg.path))
        return problem and f"data.path={problem} (data.source=folder reads ROOT/<class>/<image>)"
    return None


def count_samples(data_cfg) -> int:
    """The images an epoch of `data.source` at `data.path` holds, counted as its loader counts
    them: a folder listed (ImageNet's 1.28 M files: a minute or more on network storage), a
    .beton's header read and its allocation table checked. What cannot be read is a ConfigError
    naming data.path, as at a start."""
    if data_cfg.source == "ffcv":
        from .ffcv_loader import open_beton
        return int(open_beton(Path(data_cfg.path)).num_samples)
    if data_cfg.source == "folder":
        try:
            return len(ImageFolderSource(data_cfg.path))
        except FileNotFoundError as err:
            raise ConfigError(f"bad value for 'data.path': {err}") from None
    return data_cfg.synthetic_images


def data_fingerprint(data_cfg, loader) -> str:
    """What this rank's loader reads, in words that differ where two ranks' data sets differ: the
    order of every epoch is a function of the sample count, and a sample's index must mean the
    same image on every rank. A folder: its count and a hash of the listing (paths and labels);
    a .beton: its count and size in bytes (its header holds the count and its table the sizes);
    the synthetic set: its count (the rest follows from the config)."""
    count = f"{loader.num_samples} samples"
    if data_cfg.source == "folder":
        source, listing = loader.source, hashlib.sha256()
        for path, label in zip(source.files, source.labels):
            listing.update(f"{Path(path).relative_to(source.root).as_posix()}\t{label}\n".encode())
        return f"{count}, listing sha256 {listing.hexdigest()[:16]}"
    if data_cfg.source == "ffcv":
        return f"{count}, {Path(data_cfg.path).stat().st_size} bytes"
    return count


def build_pretrain_loader(data_cfg, *, method: str, img_size: int, seed: int, global_batch_size: int,
                          micro_batch_size: int, rank: int, world_size: int, mask_fn,
                          device: Optional[torch.device] = None):
    """A loader whose `micro_batches(epoch, start_step)` yields this rank's micro-batches.

    `device` matters for FFCV only: on CUDA the uint8 crops are copied there inside FFCV's
    pipeline. None means the current CUDA device when there is one, else the CPU.
    """
    import torch

    from .loader import PretrainLoader
    scale = (data_cfg.crop_scale_min or CROP_SCALE[method][0], data_cfg.crop_scale_max)
    common = dict(img_size=img_size, scale=scale, seed=seed, global_batch_size=global_batch_size,
                  micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, mask_fn=mask_fn,
                  num_workers=data_cfg.num_workers)
    if data_cfg.source == "ffcv":
        from .ffcv_loader import FFCVPretrainLoader
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        return FFCVPretrainLoader(data_cfg.path, order=getattr(data_cfg, "order", "exact"),
                                  os_cache=getattr(data_cfg, "os_cache", True), device=device, **common)
    if data_cfg.source == "folder":
        source = ImageFolderSource(data_cfg.path)
    elif data_cfg.source == "synthetic":
        # Rendered a little larger than the crop so random-resized-crop has room to move.
        source = SyntheticImages(data_cfg.synthetic_images, data_cfg.synthetic_classes,
                                 size=img_size * 5 // 4, seed=seed)
    else:
        raise ValueError(f"data.source must be synthetic, folder or ffcv, got {data_cfg.source!r}")
    return PretrainLoader(source, **common)


__all__ = ["build_pretrain_loader", "count_samples", "data_fingerprint", "data_path_problem", "normalize",
           "SyntheticImages", "PretrainLoader", "ImageFolderSource", "write_image_folder", "list_image_folder",
           "read_rgb", "UndecodableImage", "CROP_SCALE"]
