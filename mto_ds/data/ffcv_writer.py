"""ImageNet-layout folder -> FFCV .beton (fields `image`: RGBImageField, `label`: IntField).

Two passes. The first decodes every file (JPEGs at 1/8 scale: cheap, but the whole entropy-
coded stream is still read, so truncation shows) and decides what is kept; the second is
FFCV's DatasetWriter over the kept files only. The split matters because the writer fixes
the sample count up front and waits forever for a worker that died on a bad file.
The output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image

from .imagefolder import UndecodableImage, folder_problem, list_image_folder, open_image, read_rgb

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# FFCV stores an image's sides as uint16, and JPEG allows at most 65500 pixels a side: a worker
# that meets a longer side raises, and the writer waits for its sample forever.
MAX_STORED_SIDE = 65500
_MIN_PAGE_SIZE = 8 << 20  # FFCV's default page; a sample must fit in one page


@dataclass
class ConversionReport:
    source: str
    output: str
    classes: List[str]
    files_found: int = 0
    written: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)       # (relative path, reason)
    converted: Dict[str, List[str]] = field(default_factory=dict)      # kind -> relative paths
    options: Dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.source} -> {self.output}",
                 f"  files found : {self.files_found} in {len(self.classes)} classes",
                 f"  written     : {self.written}",
                 f"  skipped     : {len(self.skipped)}"]
        lines += [f"    {path}: {reason}" for path, reason in self.skipped]
        counts = ", ".join(f"{kind} {len(paths)}" for kind, paths in sorted(self.converted.items()))
        lines.append(f"  converted   : {counts or 'none'}")
        for path in self.converted.get("truncated", []):
            lines.append(f"    truncated, kept with the missing part filled: {path}")
        for path in self.converted.get(CHANGED_KIND, []):
            lines.append(f"    written as a black image (decodable at first, not when written; did it "
                         f"change during the conversion?): {path}")
        return "\n".join(lines)


def _inspect(path: Path, max_side: Optional[int]):
    """(None, notes, (width, height) as decoded for `max_side`) if decodable, (reason, None, None)
    if not. The size comes from opening the file as the second pass does, so a JPEG too large for
    Pillow unless decoded at a reduced scale is refused here when `max_side` does not allow that."""
    try:
        notes = read_rgb(path, max_side=32)[1]
        with open_image(path, max_side) as image:
            return None, notes, image.size
    except UndecodableImage as err:
        return str(err), None, None
    except Image.DecompressionBombError as err:
        return f"{type(err).__name__}: {err}", None, None


CHANGED_KIND = "black_image_failed_second_read"  # report.converted key


class _KeptImages:
    """What FFCV's writer workers index: (RGB uint8, label). A failure here would hang the
    writer, so a file that changed since the first pass becomes a black image, loudly: a line
    in `failures` (appended from the worker processes) puts it in the report."""

    def __init__(self, files: List[Path], labels: List[int], max_side: Optional[int], failures: Path):
        self.files, self.labels, self.max_side, self.failures = files, labels, max_side, failures

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import numpy as np
        try:
            pixels = read_rgb(self.files[index], self.max_side)[0]
        except Exception as err:  # noqa: BLE001 - see the class docstring
            print(f"make_ffcv: {self.files[index]} failed on the second read ({err}); "
                  "written as a black image", file=sys.stderr)
            with open(self.failures, "a") as f:  # one short line per append: whole lines
                f.write(f"{index}\n")
            pixels = np.zeros((8, 8, 3), np.uint8)
        return _within_max_side(pixels, self.max_side), self.labels[index]


def _within_max_side(pixels, max_side: Optional[int]):
    """Resized as FFCV's RGBImageField resizes (longer side to `max_side`, sizes rounded down,
    OpenCV's area filter), but never to a side of 0 pixels: FFCV's own resize raises on an image
    more elongated than max_side:1 (a 1 x 600 banner at 512), in a writer worker, and the writer
    then waits for that sample forever. FFCV's resize finds nothing left to do."""
    import cv2
    height, width = pixels.shape[:2]
    size = _stored_size(width, height, max_side)
    if size == (width, height):
        return pixels
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _stored_size(width: int, height: int, max_side: Optional[int]) -> Tuple[int, int]:
    """(width, height) as the .beton stores an image: the longer side brought down to `max_side`."""
    if not max_side or max(height, width) <= max_side:
        return width, height
    scale = max_side / max(height, width)
    return max(1, int(scale * width)), max(1, int(scale * height))


def _page_size(max_pixels: int) -> int:
    """The smallest power-of-two page (>= FFCV's default) that holds the largest raw image."""
    page = _MIN_PAGE_SIZE
    while page < 2 * (3 * max_pixels + 4096):
        page *= 2
    return page


def convert_image_folder(source, output, *, max_side: Optional[int] = 512, jpeg_quality: int = 90,
                         write_mode: str = "jpg", compress_probability: float = 0.5,
                         smart_threshold: Optional[int] = None, workers: int = 0,
                         overwrite: bool = False, progress: bool = True) -> Optional[ConversionReport]:
    """Write `output` from the ImageFolder `source`; None (and nothing touched) if `output`
    exists and `overwrite` is False. Raises ValueError for a bad option, a source that is not a
    folder of class folders, or one without a decodable file."""
    from tqdm import tqdm

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be positive or None, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    if smart_threshold is not None and smart_threshold <= 0:
        raise ValueError(f"smart_threshold must be positive or None, got {smart_threshold}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: the cores this process may use), got {workers}")
    problem = folder_problem(Path(source))
    if problem:  # ImageNet's val/ is flat: images, no class folders
        raise ValueError(f"source {problem} (expected one sub-folder per class; sort a flat folder into them first)")
    output = Path(output)
    if output.exists() and not overwrite:
        return None
    # 0: the cores this process may use (its CPU affinity: a Slurm step's cores, not the node's,
    # which os.cpu_count() gives), as the FFCV loader's data.num_workers=0.
    workers = workers if workers > 0 else len(os.sched_getaffinity(0))
    listing = list_image_folder(source)
    report = ConversionReport(str(source), str(output), listing.classes,
                              files_found=len(listing.files) + len(listing.not_images) + len(listing.outside_classes),
                              options=dict(max_side=max_side, jpeg_quality=jpeg_quality, write_mode=write_mode,
                                           compress_probability=compress_probability,
                                           smart_threshold=smart_threshold, workers=workers))
    report.skipped += [(listing.relative(p), "not an image file (extension)") for p in listing.not_images]
    report.skipped += [(listing.relative(p), "beside the class folders, in none of them: no label")
                       for p in listing.outside_classes]

    bar = tqdm(total=len(listing.files), desc="checking", unit="img", disable=not progress)
    if workers > 1 and len(listing.files) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = []
            for result in pool.imap(functools.partial(_inspect, max_side=max_side), listing.files, chunksize=32):
                results.append(result)
                bar.update()
    else:
        results = []
        for path in listing.files:
            results.append(_inspect(path, max_side))
            bar.update()
    bar.close()

    kept_files, kept_labels, max_pixels = [], [], 0
    for path, label, (reason, notes, size) in zip(listing.files, listing.labels, results):
        rel = listing.relative(path)
        stored = _stored_size(*size, max_side) if size else None
        if reason is None and max(stored) > MAX_STORED_SIDE:
            reason = (f"{size[0]} x {size[1]} pixels: FFCV stores at most {MAX_STORED_SIDE} a side "
                      f"(a --max-side resizes it)")
        if reason is not None:
            report.skipped.append((rel, reason))
            continue
        kept_files.append(path)
        kept_labels.append(label)
        for kind in notes:
            report.converted.setdefault(kind, []).append(rel)
        max_pixels = max(max_pixels, (stored[0] + 1) * (stored[1] + 1))
    report.skipped.sort()
    if not kept_files:
        raise ValueError(f"no decodable image under {source} ({len(report.skipped)} files skipped)")

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side,
                                     smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField()}
    partial = output.with_name(output.name + ".partial")
    failures = output.with_name(output.name + ".second_read_failures")
    output.parent.mkdir(parents=True, exist_ok=True)
    failures.unlink(missing_ok=True)
    try:
        writer = DatasetWriter(str(partial), fields, page_size=_page_size(max_pixels), num_workers=workers)
        writer.from_indexed_dataset(_KeptImages(kept_files, kept_labels, max_side, failures),
                                    chunksize=max(1, min(100, len(kept_files) // workers)))
        report.written = len(kept_files)
        if failures.is_file():
            report.converted[CHANGED_KIND] = sorted(
                listing.relative(kept_files[int(i)]) for i in set(failures.read_text().split()))
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        failures.unlink(missing_ok=True)
    report_path = output.with_name(output.name + ".report.json")
    report_path.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return report
