"""ImageNet-layout folders (ROOT/<class>/<image>): listing, tolerant decoding, the PIL source.

One decoder serves both the fallback source and `make_ffcv`, so the two agree on what an
odd file becomes. Real ImageNet holds CMYK JPEGs, a PNG named .JPEG, grayscale and
truncated files; other sets add 16-bit and float grayscale: `read_rgb` turns all of them into
RGB uint8 and says what it converted;
files PIL cannot read at all (empty, not an image) raise `UndecodableImage`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions; anything else under a class folder is not a sample.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What `read_rgb` converts, by the mode PIL decodes to.
_WIDE_GRAY = {"I;16": "grayscale_16bit", "I;16B": "grayscale_16bit", "I;16L": "grayscale_16bit",
              "I;16N": "grayscale_16bit", "I": "grayscale_32bit", "F": "grayscale_float"}
_MODE_NOTE = {"CMYK": "cmyk", "L": "grayscale", "1": "grayscale", "P": "palette", "RGBA": "alpha", "LA": "alpha",
              "PA": "alpha", **_WIDE_GRAY}


class UndecodableImage(Exception):
    """A file PIL cannot turn into pixels; the message is the reason."""


@dataclass
class ImageFolderListing:
    root: Path
    classes: List[str]
    files: List[Path] = field(default_factory=list)     # sorted by (class, relative path)
    labels: List[int] = field(default_factory=list)     # index into `classes`
    not_images: List[Path] = field(default_factory=list)  # under class folders, without an image extension
    outside_classes: List[Path] = field(default_factory=list)  # files beside the class folders: no label

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def folder_problem(root: Path) -> Optional[str]:
    """Why `root` is not a class root (ROOT/<class>/...), or None: from its top level alone."""
    if not root.is_dir():
        return f"{root}: {'a file, not a folder' if root.exists() else 'not found'}"
    if not any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(root)):
        return f"{root} has no class folders"
    return None


def list_image_folder(root) -> ImageFolderListing:
    """Class folders sorted by name give the labels; image files below them, recursively."""
    root = Path(root)
    problem = folder_problem(root)
    if problem:
        raise FileNotFoundError(f"image folder {problem} (expected ROOT/<class>/<image>)")
    classes = class_folders(root)
    listing = ImageFolderListing(root, classes)
    listing.outside_classes = sorted(Path(e.path) for e in os.scandir(root) if not e.is_dir() and not e.name.startswith("."))
    for label, name in enumerate(classes):
        for path in class_files(root / name):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                listing.files.append(path)
                listing.labels.append(label)
            else:
                listing.not_images.append(path)
    return listing


def class_folders(root: Path) -> List[str]:
    """The class folders' names, sorted: their order is the labels' (torchvision's ImageFolder's)."""
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def class_files(folder: Path) -> List[Path]:
    """The files below a class folder, recursively, sorted; links followed, names starting with
    `.` left out (macOS's `._*` side files, `.ipynb_checkpoints`)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found)


@contextlib.contextmanager
def _truncated_allowed(allowed: bool):
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = allowed
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _wide_gray_to_uint8(image: Image.Image) -> np.ndarray:
    """Grayscale wider than 8 bits as [H, W, 3] uint8; PIL's convert("RGB") clips it at 255, so a
    16-bit image came out almost white. 16-bit by the full 16-bit range; 32-bit and float, whose
    range no format fixes, by the image's own (a flat image becomes black)."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        gray = (values.astype(np.uint32) * 255 + 32767) // 65535  # value / 257, rounded
    else:
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        gray = np.round((values - low) * (255 / (high - low) if high > low else 0.0))
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def _draft_size(width: int, height: int, max_side: int) -> Optional[Tuple[int, int]]:
    scale = max_side / max(width, height)
    return (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))) if scale < 1 else None


# MPO is a JPEG with more pictures after the first (phone cameras, as .jpg); Pillow decodes the
# first with libjpeg, as a JPEG.
JPEG_FORMATS = ("JPEG", "MPO")


def _reduce_scale(image: Image.Image, max_side: Optional[int]) -> None:
    """libjpeg decodes at 1/2, 1/4 or 1/8 scale for free; draft keeps the result >= the size asked."""
    size = max_side and image.format in JPEG_FORMATS and _draft_size(*image.size, max_side)
    if size:
        image.draft(image.mode, size)


def open_image(path, max_side: Optional[int] = None) -> Image.Image:
    """`Image.open`, with a JPEG larger than `max_side` set to decode at libjpeg's reduced scale.

    Pillow refuses an image above 2 x `Image.MAX_IMAGE_PIXELS` (about 179 MP) as a decompression
    bomb as it opens it, before a reduced scale can be asked. Such a JPEG is opened anyway when
    what it decodes to at that scale is within the limit; Pillow's limit itself is left as it is.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        with open(path, "rb") as f:
            jpeg = f.read(3) == b"\xff\xd8\xff"  # what Pillow's JPEG plugin accepts
        if not (max_side and jpeg):
            raise
        image = JpegImagePlugin.JpegImageFile(path)  # the plugin alone: no size check on opening
        _reduce_scale(image, max_side)
        width, height = image.size
        if width * height > 2 * Image.MAX_IMAGE_PIXELS:
            image.close()
            raise Image.DecompressionBombError(
                f"{width} x {height} pixels at libjpeg's scale for max side {max_side}, still over twice "
                f"Pillow's MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})") from None
        return image
    _reduce_scale(image, max_side)
    return image


def _decode(path: Path, max_side: Optional[int], allow_truncated: bool):
    """(RGB uint8 pixels, format, mode, the share of a truncated JPEG's pixels that are fill)."""
    with _truncated_allowed(allow_truncated), open_image(path, max_side) as image:
        fmt, mode = image.format, image.mode
        image.load()
        # Measured in the decoder's own mode: converted to RGB, an inverted CMYK file's fill is 64.
        filled = _filled_share(np.asarray(image)) if allow_truncated and fmt in JPEG_FORMATS else 0.0
        if mode in _WIDE_GRAY:
            return _wide_gray_to_uint8(image), fmt, mode, filled
        if mode == "RGB":
            rgb = image
        elif _MODE_NOTE.get(mode) == "alpha" or (mode == "P" and "transparency" in image.info):
            mode = "RGBA"
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        else:
            rgb = image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy(), fmt, mode, filled


# A truncated JPEG is kept with the missing part filled (grey) up to this share of its pixels;
# beyond it, a sample would teach little but grey (one cut after its headers is all grey).
MAX_FILLED_SHARE = 0.5
# libjpeg's value for the blocks a truncated file lacks, in every channel; Pillow shows an Adobe
# CMYK file's channels inverted, so its fill reads 127.
JPEG_FILLS = (128, 127)


def _filled_share(values: np.ndarray) -> float:
    """The share of a truncated JPEG's pixels that the decoder filled: the run of its fill at the
    end in raster order (blocks are decoded in that order, so the missing part is a tail).
    `values`: the decoded image in its own mode ([H, W] or [H, W, C])."""
    flat = values.reshape(values.shape[0] * values.shape[1], -1)
    for fill in JPEG_FILLS:
        if (flat[-1] == fill).all():
            decoded = np.flatnonzero((flat != fill).any(axis=1))
            return 1.0 - (decoded[-1] + 1 if decoded.size else 0) / len(flat)
    return 0.0


def read_rgb(path, max_side: Optional[int] = None) -> Tuple[np.ndarray, List[str]]:
    """RGB uint8 [H, W, 3] and what was converted (cmyk, grayscale, grayscale_16bit,
    grayscale_32bit, grayscale_float, palette, alpha, truncated, not_<format> for content that
    is not what the extension says).

    `max_side` lets libjpeg decode a large JPEG at a reduced scale that is still at least
    that size; the caller resizes the rest of the way. Raises `UndecodableImage`.
    """
    path = Path(path)
    notes = []
    try:
        if path.stat().st_size == 0:
            raise UndecodableImage("empty file")
        try:
            pixels, fmt, mode, _ = _decode(path, max_side, allow_truncated=False)
        except OSError as err:
            if "truncated" not in str(err).lower():
                raise
            # Decodable up to where the file ends; the decoder fills the rest (grey for JPEG).
            pixels, fmt, mode, missing = _decode(path, max_side, allow_truncated=True)
            if missing > MAX_FILLED_SHARE:
                raise UndecodableImage(f"truncated: {missing:.0%} of the image is the decoder's grey fill, "
                                       f"more than {MAX_FILLED_SHARE:.0%}")
            notes.append("truncated")
    except UndecodableImage:
        raise
    except Image.UnidentifiedImageError:
        raise UndecodableImage("not an image PIL can identify") from None
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) on garbage
        raise UndecodableImage(f"{type(err).__name__}: {err}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise UndecodableImage(f"decoded to an unusable array of shape {pixels.shape}")
    if mode in _MODE_NOTE:
        notes.append(_MODE_NOTE[mode])
    elif mode != "RGB":
        notes.append(f"mode_{mode}")
    expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if expected and ("JPEG" if fmt in JPEG_FORMATS else fmt) != expected:
        notes.append(f"not_{expected.lower()}")
    return pixels, notes


class ImageFolderSource:
    """The PIL fallback source: `image(i)` decodes on every call; a file that cannot be
    decoded gives None and one warning naming it (per process), never an exception. A
    truncated file is used as make_ffcv keeps it (the missing part filled) and, as in its
    report, named: one warning per process."""

    def __init__(self, root):
        listing = list_image_folder(root)
        if not listing.files:
            raise FileNotFoundError(f"no image files under the class folders of {root}")
        self.root, self.classes = listing.root, listing.classes
        self.files, self.labels = listing.files, listing.labels
        self._reported = set()

    def __len__(self) -> int:
        return len(self.files)

    def label(self, index: int) -> int:
        return self.labels[index]

    def image(self, index: int) -> Optional[np.ndarray]:
        try:
            pixels, notes = read_rgb(self.files[index])
        except UndecodableImage as err:
            if index not in self._reported:
                self._reported.add(index)
                log.warning("skipping undecodable image %s (%s): left out of its micro-batch",
                            self.files[index], err)
            return None
        if "truncated" in notes and index not in self._reported:
            self._reported.add(index)
            log.warning("image %s is truncated: used with the missing part filled by the decoder",
                        self.files[index])
        return pixels
