"""Data sources behind one interface: `build_pretrain_loader` (engine) and `normalize`."""
from __future__ import annotations

from .loader import CROP_SCALE, PretrainLoader, normalize
from .synthetic import SyntheticImages


def build_pretrain_loader(data_cfg, *, method: str, img_size: int, seed: int, global_batch_size: int,
                          micro_batch_size: int, rank: int, world_size: int, mask_fn):
    """A loader whose `micro_batches(epoch, start_step)` yields this rank's micro-batches."""
    scale = (data_cfg.crop_scale_min or CROP_SCALE[method][0], data_cfg.crop_scale_max)
    if data_cfg.source == "synthetic":
        # Rendered a little larger than the crop so random-resized-crop has room to move.
        source = SyntheticImages(data_cfg.synthetic_images, data_cfg.synthetic_classes,
                                 size=img_size * 5 // 4, seed=seed)
    else:
        raise NotImplementedError(f"data.source={data_cfg.source} is not built yet")
    return PretrainLoader(source, img_size=img_size, scale=scale, seed=seed,
                          global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                          rank=rank, world_size=world_size, mask_fn=mask_fn,
                          num_workers=data_cfg.num_workers)


__all__ = ["build_pretrain_loader", "normalize", "SyntheticImages", "PretrainLoader"]
