"""Pre-training loader on an FFCV .beton: decode, random-resized crop and flip run in FFCV's
compiled pipeline (threads, no GIL); this module decides the order and adds masks. Crops
and flips are functions of (seed, epoch, sample) (`ffcv_crop`), like the masks.

One FFCV Loader per rank lives for the whole run, because building one costs a numba
compilation (about 10 s on a small CPU) on its first batch. Each epoch it reads the order
that a custom FFCV TraversalOrder serves:
- `exact`: `order.rank_indices(...)`, the world-size independent order, from any step;
- `quasi_random`: FFCV's own QUASI_RANDOM order (few pages in flight, for data larger
  than RAM) over this rank's shard of the file: a contiguous 1/W of the samples, a
  different one each epoch. FFCV 1.0.2 refuses QUASI_RANDOM with distributed=True, so
  the sharding is done here, with equal step counts on every rank.
Sample indices come from the order, so masks are computed in the main process from
(seed, epoch, index), while FFCV decodes the next batches in its own threads.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numba
import numpy as np
import torch

# Importing FFCV sets torch's thread count to 1 (ffcv.pipeline.compiler runs its
# set_num_threads(1) at import): the caller's count is put back once FFCV is in.
_caller_threads = torch.get_num_threads()
from ffcv.fields.decoders import IntDecoder  # noqa: E402
from ffcv.loader import Loader  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order import QuasiRandom  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

from ..config import ConfigError  # noqa: E402
from . import beton_problem  # noqa: E402
from .ffcv_crop import SeededResizedCropDecoder  # noqa: E402
from .loader import MaskFn, batch_masks  # noqa: E402
from .order import PAD, micro_batch_split, rank_indices, rank_share, steps_per_epoch  # noqa: E402

torch.set_num_threads(_caller_threads)

ORDERS = ("exact", "quasi_random")


class _PlannedOrder(TraversalOrder):
    """Base of the orders below. FFCV's Loader accepts a custom order as an instance and
    calls it with itself (`order(loader)`); `start_step` is set before each epoch."""

    def __init__(self, seed: int, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int):
        self.run_seed, self.global_batch_size, self.micro_batch_size = seed, global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.share = rank_share(global_batch_size, world_size, rank)
        size, accumulation = micro_batch_split(global_batch_size, world_size, micro_batch_size)
        self.places = size * accumulation  # per step: the share, then PAD
        self.start_step = 0
        self.last: Optional[np.ndarray] = None

    def __call__(self, loader: Loader) -> "_PlannedOrder":
        super().__init__(loader)
        self.num_samples = int(loader.reader.num_samples)
        self.steps = steps_per_epoch(self.num_samples, self.global_batch_size)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        self.last = self.plan(epoch).astype(np.int64)
        # FFCV reads every place: one of no sample reads sample 0, which micro_batches leaves out.
        return np.where(self.last == PAD, 0, self.last)

    def plan(self, epoch: int) -> np.ndarray:
        raise NotImplementedError


class ExactOrder(_PlannedOrder):
    def plan(self, epoch: int) -> np.ndarray:
        return rank_indices(self.num_samples, self.run_seed, epoch, self.global_batch_size,
                            self.rank, self.world_size, self.start_step, self.micro_batch_size)


class ShardedQuasiRandomOrder(_PlannedOrder):
    def __call__(self, loader: Loader) -> "ShardedQuasiRandomOrder":
        super().__call__(loader)
        self.quasi = QuasiRandom(loader)  # raises if the file has no pages to exploit
        return self

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's contiguous part of the file this epoch: shard (rank + epoch) mod W."""
        world, shard = self.world_size, (self.rank + epoch) % self.world_size
        if self.global_batch_size % world == 0:
            return np.array_split(np.arange(self.num_samples, dtype=np.uint64), world)[shard]
        # Shares that differ by a sample: each shard in proportion to the share of the rank that
        # reads it this epoch, so that it holds at least steps x that share.
        sizes = [0]
        for k in range(world):
            start, stop = rank_share(self.global_batch_size, world, (k - epoch) % world)
            sizes.append(stop - start)
        bounds = self.num_samples * np.cumsum(sizes) // self.global_batch_size
        return np.arange(bounds[shard], bounds[shard + 1], dtype=np.uint64)

    def plan(self, epoch: int) -> np.ndarray:
        # QuasiRandom shuffles its page tables in place; rebuilding them for this epoch's
        # shard makes the order a function of (seed, epoch, shard, batch size) only, which
        # is what lets a resumed run on the same world size continue exactly.
        self.quasi.indices = self.shard(epoch)
        self.quasi.prepare_data_structures()
        start, stop = self.share
        order = np.asarray(self.quasi.sample_order(epoch))[: self.steps * (stop - start)]
        by_step = np.full((self.steps, self.places), PAD, dtype=np.int64)
        by_step[:, : stop - start] = order.reshape(self.steps, stop - start)
        return by_step[self.start_step:].reshape(-1)


def open_beton(path: Path) -> Reader:
    """FFCV's Reader on `path`, or a ConfigError that says what is wrong with the file. FFCV
    writes the allocation table (where each sample's data is) last, so a cut-short copy lacks it,
    or its end: FFCV's reader fails on the first with numpy's bare 'negative dimensions are not
    allowed' and opens the second, which can then give a black image for a sample it lost."""
    try:
        reader = Reader(str(path))
    except AssertionError as err:  # FFCV's header check ("file format mismatch") is an assert
        raise ConfigError(f"bad value for 'data.path': {path} is not an FFCV .beton ({err}); make one "
                          f"with tools/make_ffcv.py") from None
    except (ValueError, IndexError, OSError, struct.error) as err:
        problem = f"{type(err).__name__}: {err}"
    else:
        lost = np.zeros(len(reader.metadata), dtype=bool)
        for name in reader.metadata.dtype.names:  # a column per field; one whose data lies elsewhere points to it
            column = reader.metadata[name]
            if "data_ptr" in (column.dtype.names or ()):
                lost |= np.isin(column["data_ptr"], reader.alloc_table["ptr"], invert=True)
        if not lost.any():
            return reader
        problem = f"its allocation table lacks the data of {lost.sum()} of its {len(lost)} samples"
    raise ConfigError(f"data.path={path} ({path.stat().st_size} bytes) is truncated or not an FFCV file: "
                      f"{problem}; copy it again or rebuild it with tools/make_ffcv.py")


class FFCVPretrainLoader:
    """Same interface as `PretrainLoader`: `num_samples`, `micro_batches(epoch, start_step)`."""

    def __init__(self, path, *, img_size: int, scale: Tuple[float, float], seed: int,
                 global_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 mask_fn: MaskFn, num_workers: int = 0, order: str = "exact", os_cache: bool = True,
                 device: Optional[torch.device] = None, batches_ahead: int = 3):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        # The cores this process may use (its CPU affinity), unless NUMBA_NUM_THREADS says otherwise.
        # FFCV would read 0 as the machine's cores, which numba refuses where a rank is bound to fewer.
        threads = numba.config.NUMBA_NUM_THREADS
        if num_workers > threads:
            raise ConfigError(f"data.num_workers={num_workers}: FFCV decodes in numba's threads, at most "
                             f"{threads} on this machine; set it lower (0 means all {threads})")
        num_workers = num_workers or threads
        path = Path(path)
        problem = beton_problem(path)
        if problem:
            raise FileNotFoundError(f"data.path={problem} (make a .beton with tools/make_ffcv.py)")
        fields = open_beton(path).field_names
        missing = {"image", "label"} - set(fields)
        if missing:
            raise ConfigError(f"bad value for 'data.path': {path} lacks the field(s) {sorted(missing)}; it has "
                              f"{fields} (make it with tools/make_ffcv.py)")
        self.seed = seed
        # The plan's micro-batch (at most the one asked), so that micro-batches never straddle steps.
        micro_batch_size, _ = micro_batch_split(global_batch_size, world_size, micro_batch_size)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.mask_fn = mask_fn
        planned = ExactOrder if order == "exact" else ShardedQuasiRandomOrder
        self.order = planned(seed, global_batch_size, micro_batch_size, rank, world_size)
        self._reading = False  # an epoch's generator is open

        self.decoder = SeededResizedCropDecoder((img_size, img_size), seed, scale)
        image = [self.decoder, ToTensor()]
        if device is not None and torch.device(device).type == "cuda":
            image.append(ToDevice(torch.device(device), non_blocking=True))  # uint8 crosses the bus
        image.append(ToTorchImage())
        pipelines = {name: None for name in fields}  # fields other than these two are not read
        pipelines.update(image=image, label=[IntDecoder(), ToTensor(), Squeeze(1)])
        with _torch_threads_kept():  # FFCV sets torch's thread count to its own worker count
            self.loader = Loader(str(path), batch_size=micro_batch_size, num_workers=num_workers,
                                 os_cache=os_cache, order=self.order, seed=seed, pipelines=pipelines,
                                 drop_last=False, batches_ahead=batches_ahead)

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """One epoch at a time: the decoder reads the epoch that is set here, so an epoch still
        being decoded (a generator neither exhausted nor closed) is an error."""
        if self._reading:
            raise RuntimeError("the FFCV loader is still reading an epoch: exhaust or close the previous "
                               "micro_batches() generator before starting another")
        self.order.start_step = start_step
        self.loader.next_epoch = epoch
        self.decoder.epoch = epoch  # before the iterator's thread starts decoding
        with _torch_threads_kept():
            batches = iter(self.loader)  # asks the order for this epoch's indices, starts decoding
        indices = torch.from_numpy(self.order.last)
        done, finished = 0, False
        self._reading = True
        try:
            for images, labels in batches:
                index = indices[done:done + len(labels)]
                done += len(labels)
                masked = index
                if index[-1] == PAD:  # places of no sample, the micro-batch's last: left out as in loader.py
                    kept = int((index != PAD).sum())
                    # With none left, one place stands in (no index: the train step weighs it 0). A slice,
                    # not a boolean mask: on a GPU that would wait for the copy.
                    images, labels, index, masked = images[:max(kept, 1)], labels[:kept], index[:kept], \
                        index[:max(kept, 1)].clamp(min=0)
                # FFCV reuses its output buffers a few batches later: hand out owned tensors.
                yield {"images": images.clone(memory_format=torch.contiguous_format),
                       "mask": batch_masks(self.mask_fn, self.seed, epoch, masked),
                       "index": index, "label": labels.to(torch.int64, copy=True)}
            finished = True  # FFCV closed the epoch itself
        finally:
            if not finished:  # the caller stopped early: stop FFCV's thread, release its pages
                # Not joined: a thread done decoding blocks for good handing its end-of-epoch mark
                # to a full queue. One still decoding stops at its next hand-over; what it decodes
                # meanwhile (with whatever epoch the decoder holds by then) goes to its own queue,
                # which nothing reads any more.
                batches.close()
            self._reading = False


class _torch_threads_kept:
    def __enter__(self):
        self.threads = torch.get_num_threads()

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
