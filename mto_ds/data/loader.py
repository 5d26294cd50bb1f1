"""Pre-training loader for sources that decode in Python (synthetic, ImageFolder with PIL).

Yields micro-batches as dicts: `images` uint8 [B, 3, S, S], `mask` bool [B, L],
`index` and `label` int64 [B]. Crops, flips and masks are deterministic from
(seed, epoch, sample index), so a resumed run sees the same pixels as an uninterrupted one.
An undecodable image is left out of its micro-batch (B is then one smaller), never replaced, and
so is a place of no sample (order.PAD, where the ranks' shares differ); a micro-batch with none
decoded holds one black stand-in that is no sample (`index` empty).
"""
from __future__ import annotations

import atexit
import math
import signal
import traceback
import weakref
from functools import lru_cache
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .order import PAD, micro_batch_split, rank_indices, sample_rng, steps_per_epoch

MaskFn = Callable[[np.random.Generator], np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_box(rng: np.random.Generator, height: int, width: int, scale: Tuple[float, float],
             ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, as torchvision samples it, from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # After 10 misses (an image more elongated than the ratio range allows at this scale), the
    # centre crop of the whole image clamped to the ratio range, as torchvision and FFCV do.
    if width / height < ratio[0]:
        w, h = width, min(height, int(round(width / ratio[0])))
    elif width / height > ratio[1]:
        w, h = min(width, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_mask(mask_fn: MaskFn, seed: int, epoch: int, index: int) -> torch.Tensor:
    """The MIM mask of one sample: a function of (seed, epoch, index) only, on every path."""
    return torch.from_numpy(np.asarray(mask_fn(sample_rng(seed, epoch, index, 1)), dtype=bool))


def batch_masks(mask_fn: MaskFn, seed: int, epoch: int, indices) -> torch.Tensor:
    return torch.stack([sample_mask(mask_fn, seed, epoch, int(i)) for i in indices])


class PretrainDataset(Dataset):
    """Items are (epoch, index) pairs so each sample's randomness is fixed by them."""

    def __init__(self, source, img_size: int, scale: Tuple[float, float], seed: int, mask_fn: MaskFn):
        self.source, self.img_size, self.scale, self.seed, self.mask_fn = source, img_size, scale, seed, mask_fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        """(pixels uint8 [3, S, S], mask, index, label, decoded). An undecodable image (the source
        has reported it) comes as black pixels with decoded=False; the collate leaves it out."""
        epoch, index = item
        if index == PAD:  # a place of no sample (order.rank_indices): left out like an undecodable image
            return (torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8),
                    sample_mask(self.mask_fn, self.seed, epoch, 0), index, 0, False)
        mask, label = sample_mask(self.mask_fn, self.seed, epoch, index), self.source.label(index)
        image = self.source.image(index)
        if image is None:
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), mask, index, label, False
        pil = Image.fromarray(image)
        rng = sample_rng(self.seed, epoch, index, 0)
        top, left, h, w = crop_box(rng, pil.height, pil.width, self.scale)
        pil = pil.resize((self.img_size, self.img_size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.uniform() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels, mask, index, label, True


def _collate(items):
    """The decoded items; where none is, one black stand-in of no sample (`index` and `label`
    empty), which the train step weighs 0: the rank still runs its forward and backward, in step
    with the other ranks, whose gradient reduction waits for it. Raising instead stopped this rank
    alone, the others waited in the collective until its timeout, and a requeued job met the same
    images at the same step again."""
    decoded = [item for item in items if item[4]]
    images, masks, indices, labels, _ = zip(*(decoded or items[:1]))
    if not decoded:
        indices = labels = ()
    return {"images": torch.stack(images), "mask": torch.stack(masks),
            "index": torch.as_tensor(indices, dtype=torch.long),
            "label": torch.as_tensor(labels, dtype=torch.long)}


class PretrainLoader:
    """Micro-batches of one data-parallel rank for an epoch, from any step of it."""

    def __init__(self, source, *, img_size: int, scale: Tuple[float, float], seed: int,
                 global_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 mask_fn: MaskFn, num_workers: int = 0):
        self.source = source
        self.dataset = PretrainDataset(source, img_size, scale, seed, mask_fn)
        # The plan's micro-batch (at most the one asked), so that micro-batches never straddle steps.
        micro_batch_size, _ = micro_batch_split(global_batch_size, world_size, micro_batch_size)
        self.seed, self.global_batch_size, self.micro_batch_size = seed, global_batch_size, micro_batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    @property
    def num_samples(self) -> int:
        return len(self.source)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.source), self.global_batch_size)

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        indices = rank_indices(len(self.source), self.seed, epoch, self.global_batch_size,
                               self.rank, self.world_size, start_step, self.micro_batch_size)
        items = [(epoch, int(i)) for i in indices]
        batches = [items[i:i + self.micro_batch_size] for i in range(0, len(items), self.micro_batch_size)]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=_collate, persistent_workers=False,
                            pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)
        iterator = iter(loader)
        if self.num_workers:
            _open_iterators.add(iterator)
        try:
            yield from iterator
        except BaseException as err:
            # The error's traceback holds the iterator (its frames' `self`), so its workers would
            # live until the interpreter exits, where multiprocessing stops them with a SIGTERM
            # they ignore (ignore_stop_signals) and waits for them forever. Dropping those
            # frames' locals lets the iterator shut its workers down now.
            del iterator
            traceback.clear_frames(err.__traceback__)
            raise


# Iterators of epochs still open (a generator nobody closed, alive until the interpreter exits).
# At exit, multiprocessing's handler stops daemon processes with a SIGTERM, which the workers
# ignore (ignore_stop_signals), and then waits for them forever; so their workers are stopped
# here first. Registered after multiprocessing's handler (torch imported it), so it runs before.
_open_iterators: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_open_workers() -> None:
    for iterator in list(_open_iterators):
        iterator._shutdown_workers()  # torch's own: asks each worker to end, then joins it
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():  # stuck past torch's join timeout; SIGTERM is ignored
                worker.kill()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers live on through SIGTERM/SIGUSR1/SIGINT, which ask their rank to
    checkpoint: schedulers signal every process of a job, a Ctrl-C reaches the terminal's whole
    process group, and a worker dying of one (torch's own handler, or KeyboardInterrupt) fails the
    rank's next step (mid-save, too). A worker still ends when the loader closes it (a message),
    its rank dies (torch's watchdog) or by SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def normalize(images: torch.Tensor, device: Optional[torch.device] = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalised float on `device`; the copy is uint8 (4x fewer bytes)."""
    images = images.to(device, non_blocking=True) if device is not None else images
    mean, std = _mean_std(images.device)
    return ((images.float() - mean) / std).to(dtype)


def to_unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """`normalize`'s output back to RGB in [0, 1] (clamped), float32, for pictures."""
    mean, std = _mean_std(images.device)
    return ((images.float() * std + mean) / 255).clamp(0.0, 1.0)


@lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a tensor built from a Python list on a GPU is a blocking copy that
    # waits for all queued GPU work, which at every micro-batch would drain the GPU.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std
