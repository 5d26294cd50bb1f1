"""FFCV decoding with a random-resized crop and flip that are functions of (seed, epoch, sample).

FFCV's `RandomResizedCropRGBImageDecoder` and `RandomHorizontalFlip` draw from numba's
per-thread generator, which nothing seeds and whose draws depend on which thread decodes
which image: a resumed run would see other crops than the run it continues. This decoder
draws the same way (torchvision's random-resized crop: ten tries of scale and log-ratio,
then the centre crop clamped to the ratio range; a flip with probability 1/2), but every
draw is a hash of (seed, epoch, sample index, draw number), so the pixels of a sample in an
epoch are the same on any number of ranks, threads or restarts.

The decoding itself is FFCV's (libjpeg-turbo decode, then its crop-and-resize), run in
FFCV's compiled, threaded pipeline. The streams differ from the folder source's (numpy
generators there), so the same sample gets another crop on FFCV than from the folder.
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import njit, types
from numba.extending import intrinsic

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FLIP_DRAW = 40  # crop tries use draws 0..39


@njit
def mix64(x):
    """splitmix64's finaliser: a bijection of uint64 with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit
def sample_key(seed, epoch, index):
    # Keys stay uint64 inside compiled code: numba turns uint64 mixed with int64 into float64.
    return mix64(mix64(mix64(np.uint64(seed)) + np.uint64(epoch)) + np.uint64(index))


@njit
def uniform(key, draw, low, high):
    """Draw number `draw` of the stream `key`: uniform on [low, high), 53 random bits."""
    bits = mix64(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)
    return low + (high - low) * (np.float64(bits) * 2.0 ** -53)


@njit
def crop_box(key, height, width, scale_low, scale_high, log_ratio_low, log_ratio_high):
    """(top, left, h, w) as torchvision's RandomResizedCrop samples it, from stream `key`."""
    area = height * width
    for attempt in range(10):
        target = area * uniform(key, 4 * attempt, scale_low, scale_high)
        aspect = np.exp(uniform(key, 4 * attempt + 1, log_ratio_low, log_ratio_high))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, 4 * attempt + 2, 0.0, height - h + 1))
            left = int(uniform(key, 4 * attempt + 3, 0.0, width - w + 1))
            return top, left, h, w
    # After ten misses (an image more elongated than the ratio range allows at this scale):
    # the centre crop of the whole image, clamped to the ratio range.
    min_ratio, max_ratio = np.exp(log_ratio_low), np.exp(log_ratio_high)
    if width / height < min_ratio:
        w, h = width, min(height, int(round(width / min_ratio)))
    elif width / height > max_ratio:
        w, h = min(width, int(round(height * max_ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@njit
def sample_crop(seed, epoch, index, height, width, scale_low, scale_high, log_ratio_low, log_ratio_high):
    """(top, left, h, w, flip) of sample `index` in `epoch`: the decoder's draws, callable from Python."""
    key = sample_key(seed, epoch, index)
    top, left, h, w = crop_box(key, height, width, scale_low, scale_high, log_ratio_low, log_ratio_high)
    return top, left, h, w, uniform(key, _FLIP_DRAW, 0.0, 1.0) < 0.5


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at `address`. Numba freezes arrays a compiled function captures as
    constants, so a value that changes between calls (the epoch) is read through its address."""
    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer())
        return builder.load(pointer)
    return types.int64(types.intp), codegen


class SeededResizedCropDecoder(ResizedCropRGBImageDecoder):
    """Decode, random-resized crop to `output_size` and random horizontal flip, each a function
    of (seed, epoch, sample index). Set `epoch` before FFCV starts an epoch's iterator."""

    def __init__(self, output_size: Tuple[int, int], seed: int, scale: Tuple[float, float],
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__(output_size)
        self.seed, self.scale, self.ratio = int(seed), scale, ratio
        self._epoch = np.zeros(1, dtype=np.int64)  # read by the compiled code at its address

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    @property
    def get_crop_generator(self):  # abstract in FFCV; this decoder draws its crops in generate_code
        return None

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        loop = Compiler.get_iterator()
        decode_jpeg, crop_resize = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        seed, epoch_address = self.seed, self._epoch.ctypes.data
        epoch_box = self._epoch
        if Compiler.is_enabled:
            read_epoch = _load_int64
        else:  # FFCV runs the pipeline as plain Python (for debugging), where intrinsics do not work
            def read_epoch(address):
                return int(epoch_box[0])
        scale_low, scale_high = float(self.scale[0]), float(self.scale[1])
        log_ratio_low, log_ratio_high = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            epoch = read_epoch(epoch_address)
            for slot in loop(len(batch_indices)):
                index = batch_indices[slot]
                field = metadata[index]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = scratch[slot]
                    decode_jpeg(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    pixels = pixels.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    pixels = data.reshape(height, width, 3)
                top, left, h, w, flip = sample_crop(seed, epoch, index, int(height), int(width), scale_low,
                                                    scale_high, log_ratio_low, log_ratio_high)
                out = destination[slot]
                crop_resize(pixels, top, top + h, left, left + w, out)
                if flip:
                    out[:] = out[:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
