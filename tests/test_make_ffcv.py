"""tools/make_ffcv.py and mto_ds.data.ffcv_writer on real files with ImageNet's oddities."""
from __future__ import annotations

import importlib.util
import io
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")

from ffcv.reader import Reader  # noqa: E402

from mto_ds.data.ffcv_writer import convert_image_folder  # noqa: E402
from mto_ds.data.imagefolder import read_rgb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_SIDE = 56


def _picture(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A colour ramp plus noise, different for every seed (so images are told apart)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(40, 200, 3)
    base = rng.uniform(20, 60, 3) + ramp + rng.normal(0, 8, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _jpeg_bytes(pixels: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def make_odd_image_folder(root: Path) -> dict:
    """Two classes with every odd kind ImageNet has; returns what a conversion must report."""
    files = {
        "n01/a0.JPEG": _jpeg_bytes(_picture(0)),
        "n01/a1.JPEG": _jpeg_bytes(_picture(1, 64, 40)),
        "n01/a2.JPEG": _jpeg_bytes(_picture(2)),
        "n01/cmyk.JPEG": _jpeg_bytes(_picture(3), mode="CMYK"),
        "n01/gray.JPEG": _jpeg_bytes(_picture(4), mode="L"),
        "n02/b0.JPEG": _jpeg_bytes(_picture(5)),
        "n02/b1.JPEG": _jpeg_bytes(_picture(6)),
        "n02/png_named.JPEG": _jpeg_bytes(_picture(7), fmt="PNG"),
        "n02/truncated.JPEG": _jpeg_bytes(_picture(8))[:1500],
        "n02/empty.JPEG": b"",
        "n02/not_an_image.JPEG": b"<html>404 not found</html>\n" * 20,
        "n02/notes.txt": b"annotator notes\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    kept = ["n01/a0.JPEG", "n01/a1.JPEG", "n01/a2.JPEG", "n01/cmyk.JPEG", "n01/gray.JPEG",
            "n02/b0.JPEG", "n02/b1.JPEG", "n02/png_named.JPEG", "n02/truncated.JPEG"]
    return {"kept": kept, "labels": [0] * 5 + [1] * 4,
            "skipped": ["n02/empty.JPEG", "n02/not_an_image.JPEG", "n02/notes.txt"]}


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_like")
    return root, make_odd_image_folder(root)


@pytest.fixture(scope="module")
def converted(odd_folder, tmp_path_factory):
    root, expected = odd_folder
    out = tmp_path_factory.mktemp("beton") / "odd.beton"
    report = convert_image_folder(root, out, max_side=MAX_SIDE, workers=2, progress=False)
    return out, report


def test_odd_files_are_converted_and_undecodable_ones_skipped_by_name(odd_folder, converted):
    _, expected = odd_folder
    _, report = converted
    assert report.files_found == 12
    assert report.written == len(expected["kept"]) == 9
    assert [path for path, _ in report.skipped] == expected["skipped"]
    reasons = dict(report.skipped)
    assert reasons["n02/empty.JPEG"] == "empty file"
    assert "identify" in reasons["n02/not_an_image.JPEG"]
    assert report.converted == {"cmyk": ["n01/cmyk.JPEG"], "grayscale": ["n01/gray.JPEG"],
                                "not_jpeg": ["n02/png_named.JPEG"], "truncated": ["n02/truncated.JPEG"]}
    summary = report.summary()
    for name in expected["skipped"] + ["n02/truncated.JPEG"]:
        assert name in summary


def test_beton_round_trip_keeps_every_decodable_image_with_its_label_and_pixels(odd_folder, converted):
    root, expected = odd_folder
    out, _ = converted
    reader = Reader(str(out))
    assert reader.num_samples == 9
    assert reader.field_names == ["image", "label"]
    image, labels = reader.metadata["f0"], reader.metadata["f1"]  # FFCV names metadata columns by position
    assert labels.tolist() == expected["labels"]
    sizes = list(zip(image["width"].tolist(), image["height"].tolist()))
    assert sizes[1] == (35, 56) and sizes[0] == (56, 42)  # 40x64 and 64x48 scaled to max side 56
    assert all(max(size) <= MAX_SIDE for size in sizes)
    # Decode the stored JPEG bytes and compare with the source file resized the same way.
    blob = np.fromfile(out, dtype=np.uint8)
    by_ptr = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    stored = []
    for i, rel in enumerate(expected["kept"]):
        ptr = int(image["data_ptr"][i])
        jpeg = io.BytesIO(blob[ptr:ptr + by_ptr[ptr]].tobytes())
        stored.append(np.asarray(Image.open(jpeg).convert("RGB"), dtype=float))
        source = cv2.resize(read_rgb(root / rel)[0], sizes[i], interpolation=cv2.INTER_AREA)
        assert stored[i].shape == source.shape
        assert np.abs(stored[i] - source).mean() < 6, rel
    assert np.abs(stored[4][..., 0] - stored[4][..., 2]).mean() < 3  # grayscale became R = G = B


def test_existing_output_is_left_alone_unless_overwrite_is_asked(odd_folder, tmp_path):
    root, _ = odd_folder
    out = tmp_path / "again.beton"
    out.write_bytes(b"previous contents")
    assert convert_image_folder(root, out, workers=1, progress=False) is None
    assert out.read_bytes() == b"previous contents"
    report = convert_image_folder(root, out, workers=1, progress=False, overwrite=True)
    assert report.written == 9 and Reader(str(out)).num_samples == 9


def test_interrupted_write_leaves_no_file_named_like_the_output(odd_folder, tmp_path, monkeypatch):
    root, _ = odd_folder
    out = tmp_path / "broken.beton"

    def fail_half_way(self, dataset, **kwargs):
        Path(self.fname).write_bytes(b"half a file")
        raise KeyboardInterrupt

    import ffcv.writer
    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        convert_image_folder(root, out, workers=1, progress=False)
    assert os.listdir(tmp_path) == []


def test_a_file_that_fails_only_when_written_is_named_in_the_report(odd_folder, tmp_path, monkeypatch):
    """Decodable in the first pass, not in the second (changed while converting): FFCV's writer
    cannot drop a sample, so it holds a black image, and the report names the file."""
    from mto_ds.data import ffcv_writer
    root, _ = odd_folder
    real_read = ffcv_writer.read_rgb
    victim = sorted(root.rglob("*.*"))[0]

    def read_fails_when_writing(path, max_side=None):  # the first pass reads at max_side=32
        if Path(path) == victim and max_side != 32:
            raise ffcv_writer.UndecodableImage("gone")
        return real_read(path, max_side)
    monkeypatch.setattr(ffcv_writer, "read_rgb", read_fails_when_writing)  # before the writer forks
    report = convert_image_folder(root, tmp_path / "out.beton", workers=2, progress=False)
    assert report.written == 9
    assert report.converted[ffcv_writer.CHANGED_KIND] == [str(victim.relative_to(root))]
    assert "written as a black image" in report.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "out.beton.report.json"]


def test_folder_without_any_decodable_image_fails_naming_the_count(tmp_path):
    (tmp_path / "src" / "c0").mkdir(parents=True)
    (tmp_path / "src" / "c0" / "empty.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match="no decodable image.*1 files skipped"):
        convert_image_folder(tmp_path / "src", tmp_path / "out.beton", workers=1, progress=False)
    assert not (tmp_path / "out.beton").exists() and not (tmp_path / "out.beton.partial").exists()


def test_a_raw_image_larger_than_ffcvs_default_page_is_written_whole(tmp_path):
    """FFCV's writer stores a sample within one page (8 MiB by default); a larger one raises in a
    writer worker, and the writer then waited for it (seen here) or failed. Kept at full size (no
    --max-side) and raw, a 1700 x 1700 image takes 8.7 MB, so the page grows to hold it."""
    (tmp_path / "src" / "c0").mkdir(parents=True)
    big = np.random.default_rng(0).integers(0, 256, (1700, 1700, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "src" / "c0" / "big.png")
    Image.fromarray(big[:16, :16]).save(tmp_path / "src" / "c0" / "small.png")
    out = tmp_path / "raw.beton"
    report = convert_image_folder(tmp_path / "src", out, max_side=None, write_mode="raw", workers=1, progress=False)
    assert report.written == 2
    reader = Reader(str(out))
    image = reader.metadata["f0"]
    assert list(zip(image["width"].tolist(), image["height"].tolist())) == [(1700, 1700), (16, 16)]
    ptr = int(image["data_ptr"][0])
    stored = np.fromfile(out, dtype=np.uint8, count=big.size, offset=ptr)
    assert np.array_equal(stored.reshape(big.shape), big)


def test_bad_writer_options_are_refused_by_name_before_any_file_is_read(tmp_path):
    for options, message in (({"max_side": 0}, "max_side must be positive or None, got 0"),
                             ({"workers": -1}, "workers must be >= 0 (0: the cores this process may use), got -1")):
        with pytest.raises(ValueError, match=re.escape(message)):
            convert_image_folder(tmp_path / "missing", tmp_path / "out.beton", progress=False, **options)
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process allowed on two cores or more")
def test_workers_0_means_the_cores_this_process_may_use_not_the_machines(odd_folder, tmp_path):
    """Inside a Slurm step bound to a few cores of a large node, os.cpu_count() is the node's."""
    root, _ = odd_folder
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        report = convert_image_folder(root, tmp_path / "one_core.beton", max_side=MAX_SIDE, progress=False)
    finally:
        os.sched_setaffinity(0, allowed)
    assert report.options["workers"] == 1 and report.written == 9


def test_a_jpeg_over_pils_pixel_limit_is_kept_at_max_side_and_skipped_without_it(tmp_path, monkeypatch):
    """A JPEG above Pillow's decompression-bomb limit: with --max-side, only libjpeg's reduced-scale
    decode is made, so it is kept; with --max-side 0 it would be decoded whole, and both passes
    refuse it (the first pass must, or the second writes a black image). A limit of 1000 pixels
    stands in for Pillow's ~179 MP."""
    (tmp_path / "src" / "c0").mkdir(parents=True)
    Image.fromarray(_picture(0, 24, 32)).save(tmp_path / "src" / "c0" / "a.JPEG", quality=95)
    Image.fromarray(_picture(1, 160, 200)).save(tmp_path / "src" / "c0" / "huge.JPEG", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # before the writer forks its workers
    report = convert_image_folder(tmp_path / "src", tmp_path / "small.beton", max_side=25, workers=1,
                                  progress=False)
    assert report.written == 2 and report.skipped == [] and report.converted == {}
    image = Reader(str(tmp_path / "small.beton")).metadata["f0"]
    assert list(zip(image["width"].tolist(), image["height"].tolist())) == [(25, 18), (25, 20)]
    report = convert_image_folder(tmp_path / "src", tmp_path / "whole.beton", max_side=None, workers=1,
                                  progress=False)
    assert report.written == 1 and [path for path, _ in report.skipped] == ["c0/huge.JPEG"]
    assert "DecompressionBombError" in report.skipped[0][1] and report.converted == {}


def test_cli_reports_skipped_files_and_is_idempotent(odd_folder, tmp_path, capsys):
    root, expected = odd_folder
    spec = importlib.util.spec_from_file_location("make_ffcv_cli", REPO / "tools" / "make_ffcv.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli.beton"
    argv = [str(root), str(out), "--max-side", "32", "--workers", "1", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "written     : 9" in printed and "skipped     : 3" in printed
    for name in expected["skipped"]:
        assert name in printed
    assert (tmp_path / "cli.beton.report.json").is_file()
    before = out.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert "left as it is" in capsys.readouterr().out and out.stat().st_mtime_ns == before


@pytest.mark.parametrize("args, message", [
    (["--quality", "0"], "jpeg_quality must be in [1, 100], got 0"),
    (["--quality", "500"], "jpeg_quality must be in [1, 100], got 500"),
    (["--write-mode", "proportion", "--compress-probability", "2"], "compress_probability must be in [0, 1], got 2.0"),
    (["--smart-threshold", "0"], "smart_threshold must be positive"),
])
def test_cli_refuses_bad_options_naming_them_and_writes_nothing(odd_folder, tmp_path, capsys, args, message):
    root, _ = odd_folder
    spec = importlib.util.spec_from_file_location("make_ffcv_cli", REPO / "tools" / "make_ffcv.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "bad.beton"
    assert cli.main([str(root), str(out), "--workers", "1", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert cli.main([str(tmp_path / "missing"), str(out), "--no-progress"]) == 2
    assert f"make_ffcv: source {tmp_path / 'missing'}: not found (expected one sub-folder per class" in \
        capsys.readouterr().err


def test_cli_on_a_flat_folder_without_class_folders_says_so_with_exit_2(tmp_path, capsys):
    """ImageNet's val/ is flat (images, no class folders): the tool ended with a FileNotFoundError
    traceback and exit code 1, unlike every other bad source."""
    spec = importlib.util.spec_from_file_location("make_ffcv_cli", REPO / "tools" / "make_ffcv.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    (tmp_path / "val").mkdir()
    for i in range(2):
        Image.fromarray(_picture(i)).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    out = tmp_path / "val.beton"
    assert cli.main([str(tmp_path / "val"), str(out), "--workers", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"make_ffcv: source {tmp_path / 'val'} has no class folders (expected "
                                       "one sub-folder per class; sort a flat folder into them first)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]


def test_an_image_more_elongated_than_max_side_to_one_is_kept_not_a_hang(tmp_path):
    """A 1 x 200 PNG at --max-side 32: FFCV's writer would resize it to 32 x 0 pixels, OpenCV
    raises in the writer's worker, and FFCV's writer then waits for that sample forever. It is
    kept as 32 x 1 instead (sides round down, but never to 0); a normal image is stored as before."""
    import subprocess
    import sys

    (tmp_path / "src" / "c0").mkdir(parents=True)
    Image.fromarray(_picture(0)).save(tmp_path / "src" / "c0" / "a.JPEG", quality=95)
    Image.fromarray(np.full((1, 200, 3), 120, np.uint8)).save(tmp_path / "src" / "c0" / "banner.png")
    out = tmp_path / "out.beton"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_ffcv.py"), str(tmp_path / "src"), str(out),
                             "--max-side", "32", "--workers", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written     : 2" in result.stdout
    image = Reader(str(out)).metadata["f0"]
    assert list(zip(image["width"].tolist(), image["height"].tolist())) == [(32, 24), (32, 1)]


def test_a_side_ffcv_cannot_store_and_files_beside_the_class_folders_are_skipped_by_name(tmp_path):
    """FFCV stores sides as uint16 (JPEG: at most 65500): a 4 x 70000 PNG kept at --max-side 0
    made a writer worker raise, and the writer waited for its sample forever. Files directly in
    SRC, beside the class folders, have no label: they were neither written nor reported."""
    import subprocess
    import sys

    (tmp_path / "src" / "c0").mkdir(parents=True)
    Image.fromarray(_picture(0)).save(tmp_path / "src" / "c0" / "a.JPEG", quality=95)
    Image.fromarray(np.full((4, 70_000, 3), 120, np.uint8)).save(tmp_path / "src" / "c0" / "strip.png")
    Image.fromarray(_picture(1)).save(tmp_path / "src" / "stray.JPEG", quality=95)
    out = tmp_path / "out.beton"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_ffcv.py"), str(tmp_path / "src"), str(out),
                             "--max-side", "0", "--workers", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "files found : 3 in 1 classes" in result.stdout and "written     : 1" in result.stdout
    assert "c0/strip.png: 70000 x 4 pixels: FFCV stores at most 65500 a side (a --max-side resizes it)" in result.stdout
    assert "stray.JPEG: beside the class folders, in none of them: no label" in result.stdout
    # At a --max-side it is resized like any other image and kept.
    report = convert_image_folder(tmp_path / "src", tmp_path / "small.beton", max_side=512, workers=1, progress=False)
    assert report.written == 2 and [path for path, _ in report.skipped] == ["stray.JPEG"]
