"""The PIL ImageFolder fallback, the synthetic JPEG writer and `data.source` selection."""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mto_ds.data import ImageFolderSource, PretrainLoader, SyntheticImages, build_pretrain_loader, write_image_folder
from mto_ds.data.imagefolder import UndecodableImage, list_image_folder, read_rgb
from mto_ds.data.order import rank_indices, sample_rng

from conftest import REPO, cpu_env

PATCHES = 4


def mask_fn(rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(PATCHES) < 2


def folder_cfg(path, **kw):
    return SimpleNamespace(source="folder", path=str(path), num_workers=0, crop_scale_min=None,
                           crop_scale_max=1.0, **kw)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("syn") / "jpeg", 24, num_classes=3, size=40, seed=2)


def test_synthetic_set_written_as_jpeg_folder_keeps_labels_and_pixels(jpeg_folder):
    images = SyntheticImages(24, 3, 40, seed=2)
    source = ImageFolderSource(jpeg_folder)
    assert len(source) == 24 and source.classes == ["class_0", "class_1", "class_2"]
    originals = np.stack([images.image(j) for j in range(24)]).astype(float)
    for i, path in enumerate(source.files):
        synthetic_index = int(path.stem)  # files are named by their index in the synthetic set
        assert source.label(i) == images.label(synthetic_index)
        distance = np.abs(originals - source.image(i)).mean(axis=(1, 2, 3))
        assert distance.argmin() == synthetic_index and distance.min() < 15  # JPEG error only
    with pytest.raises(FileExistsError):
        write_image_folder(jpeg_folder, 4, 2, 16)


def test_synthetic_class_folders_sort_in_label_order_beyond_ten_classes(tmp_path):
    """An ImageFolder's labels are its sorted folder names: unpadded, class_10 would sort before
    class_2 and the folder's labels would not be the set's (the study's 100-class set)."""
    images = SyntheticImages(60, 12, 8, seed=3)
    source = ImageFolderSource(write_image_folder(tmp_path / "twelve", 60, num_classes=12, size=8, seed=3))
    assert source.classes == [f"class_{c:02d}" for c in range(12)]
    assert [source.label(i) for i in range(60)] == [images.label(int(p.stem)) for p in source.files]
    assert len(set(source.labels)) > 10  # the classes past class_09 are in use


def test_synthetic_labels_depend_on_the_seed_so_another_seed_is_another_draw():
    labels = {seed: [SyntheticImages(64, 10, 8, seed=seed).label(i) for i in range(64)] for seed in (0, 1)}
    assert labels[0] != labels[1]
    assert labels[0] == [SyntheticImages(64, 10, 8, seed=0).label(i) for i in range(64)]


def test_a_synthetic_folder_whose_writing_fails_leaves_neither_it_nor_its_partial_copy(tmp_path, monkeypatch):
    saved = []

    def save_then_fail(image, path, *args, **kwargs):
        if len(saved) == 3:
            raise OSError(28, "No space left on device")
        saved.append(path)
        image_save(image, path, *args, **kwargs)

    image_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_image_folder(tmp_path / "synth", 8, num_classes=2, size=8)
    assert len(saved) == 3 and list(tmp_path.iterdir()) == []


def test_folder_labels_follow_sorted_class_names_and_skip_non_image_files(tmp_path):
    for name in ("zebra", "apple", "mango"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name / "x.JPEG")
    (tmp_path / "apple" / "readme.txt").write_text("not a sample")
    source = ImageFolderSource(tmp_path)
    assert source.classes == ["apple", "mango", "zebra"]
    assert [(p.parent.name, source.label(i)) for i, p in enumerate(source.files)] == \
        [("apple", 0), ("mango", 1), ("zebra", 2)]


def test_folder_listing_recurses_into_class_subfolders_in_sorted_order_and_leaves_hidden_entries_out(tmp_path):
    """A copy made on macOS holds `._NAME.JPEG` AppleDouble files (not images, yet named like
    them), a notebook leaves `.ipynb_checkpoints/` inside a class, and a tool its `.cache/` beside
    the classes: none is a sample or a class. Images in sub-folders of a class are its samples."""
    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    for rel in ("b/2.JPEG", "b/sub/1.JPEG", "b/10.JPEG", "a/x.JPEG", "a/.ipynb_checkpoints/x-checkpoint.JPEG",
                ".cache/c/y.JPEG"):
        image(tmp_path / rel)
    (tmp_path / "a" / "._x.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    listing = list_image_folder(tmp_path)
    assert listing.classes == ["a", "b"]
    assert [listing.relative(p) for p in listing.files] == ["a/x.JPEG", "b/10.JPEG", "b/2.JPEG", "b/sub/1.JPEG"]
    assert listing.labels == [0, 1, 1, 1] and listing.not_images == [] and listing.outside_classes == []


def test_undecodable_image_is_skipped_with_one_warning_naming_it(tmp_path, caplog):
    (tmp_path / "c0").mkdir()
    Image.new("RGB", (40, 40), (200, 100, 50)).save(tmp_path / "c0" / "good.JPEG")
    (tmp_path / "c0" / "zz_empty.JPEG").write_bytes(b"")
    source = ImageFolderSource(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mto_ds.data.imagefolder"):
        assert source.image(1) is None and source.image(1) is None
    assert [r.getMessage().count("zz_empty.JPEG") for r in caplog.records] == [1]
    loader = PretrainLoader(source, img_size=32, scale=(0.5, 1.0), seed=0, global_batch_size=2,
                            micro_batch_size=2, rank=0, world_size=1, mask_fn=mask_fn)
    (batch,) = list(loader.micro_batches(0))
    assert batch["index"].tolist() == [0] and batch["label"].tolist() == [0]  # left out, not replaced
    assert batch["images"].shape == (1, 3, 32, 32) and batch["images"].float().mean() > 50
    assert batch["mask"].shape == (1, PATCHES)


def test_a_truncated_image_is_used_as_the_converter_keeps_it_and_named_in_one_warning(tmp_path, caplog):
    """A JPEG cut short (a copy that did not finish) decodes with its missing part grey, as
    make_ffcv keeps it; make_ffcv's report names it, and so must the folder source, not use it silently."""
    import io
    (tmp_path / "c0").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    (tmp_path / "c0" / "cut.JPEG").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("RGB", (40, 40), (200, 100, 50)).save(tmp_path / "c0" / "good.JPEG")
    source = ImageFolderSource(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mto_ds.data.imagefolder"):
        cut = source.image(0)
        assert source.image(0) is not None and source.image(1) is not None
    assert cut.shape == (64, 64, 3)
    assert (cut[-8:] == cut[-1, -1]).all()  # the bottom rows are the decoder's fill
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "cut.JPEG" in messages[0] and "truncated" in messages[0]


def test_a_16_bit_grayscale_image_keeps_its_tones_instead_of_turning_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255: a 0..65535 ramp became ~254 everywhere.
    16-bit files are scaled by their full range, named as converted in the report's terms."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # PIL opens it as mode I;16
    Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes()).save(tmp_path / "ramp_big_endian.tif")
    for name in ("ramp.png", "ramp_big_endian.tif"):
        pixels, notes = read_rgb(tmp_path / name)
        assert notes == ["grayscale_16bit"], name
        assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        assert (pixels == pixels[..., :1]).all()  # R = G = B
        assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255 and abs(pixels.mean() - 127.5) < 0.5
        assert np.abs(pixels[..., 0].astype(int) - np.round(ramp / 257)).max() == 0


@pytest.mark.parametrize("dtype, mode, note", [(np.int32, "I", "grayscale_32bit"),
                                               (np.float32, "F", "grayscale_float")])
def test_32_bit_and_float_grayscale_images_are_scaled_by_their_own_range(tmp_path, dtype, mode, note):
    """No format fixes what 32-bit or float values mean, so the image's own min..max becomes 0..255;
    a flat image (no range) is black, not a division by zero."""
    ramp = (np.linspace(-3, 5, 64 * 64).reshape(64, 64) * 1000).astype(dtype)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    Image.fromarray(np.full((8, 8), 7000, dtype)).save(tmp_path / "flat.tif")
    pixels, notes = read_rgb(tmp_path / "ramp.tif")
    assert Image.open(tmp_path / "ramp.tif").mode == mode and notes == [note]
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [255, 255, 255]
    assert abs(pixels.mean() - 127.5) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/0 gave NaN, which a cast happened to turn into 0
        flat, notes = read_rgb(tmp_path / "flat.tif")
    assert notes == [note] and (flat == 0).all()


def test_non_finite_values_of_a_float_image_take_the_ends_of_its_finite_range(tmp_path):
    """NaN and -inf become the darkest finite value, +inf the brightest; the finite values alone
    set the range, so one inf does not turn the rest of the image black."""
    values = np.array([[np.nan, -np.inf, np.inf, -2.0], [0.0, 2.0, 1.0, -1.0]], np.float32)
    Image.fromarray(values).save(tmp_path / "odd.tif")
    pixels, notes = read_rgb(tmp_path / "odd.tif")
    assert notes == ["grayscale_float"]
    assert pixels[..., 0].tolist() == [[0, 0, 255, 0], [128, 255, 191, 64]]


def test_transparent_pixels_are_composited_on_white_for_rgba_and_palette_images(tmp_path):
    """What a viewer shows (and what ImageNet's few transparent PNGs look like), not the colour
    stored under an alpha of 0, which is often black or noise; a palette PNG marks its transparent
    entry in its info, not in its mode."""
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(np.array([[0, 1, 1]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)  # entry 0, red, is transparent
    pixels, notes = read_rgb(tmp_path / "rgba.png")
    assert notes == ["alpha"] and pixels[0].tolist() == [[255, 255, 255], [0, 0, 255], [127, 127, 127]]
    pixels, notes = read_rgb(tmp_path / "palette.png")
    assert notes == ["alpha"] and pixels[0].tolist() == [[255, 255, 255], [0, 0, 255], [0, 0, 255]]
    Image.fromarray(np.array([[0, 1]], np.uint8), "P").save(tmp_path / "opaque_palette.png")
    assert read_rgb(tmp_path / "opaque_palette.png")[1] == ["palette"]


def test_the_filled_share_of_a_truncated_jpeg_is_the_run_of_fill_at_its_end_in_raster_order():
    from mto_ds.data.imagefolder import _filled_share
    image = np.full((10, 10, 3), 128, np.uint8)
    image[:7, :5] = 30  # the last decoded pixel: row 6, column 4 (index 64); 35 pixels of fill follow
    image[2, 8] = 128  # fill-coloured pixels before it are decoded content
    assert _filled_share(image) == pytest.approx(0.35)
    assert _filled_share(np.where(image == 128, 127, image)[..., 0]) == pytest.approx(0.35)  # one channel, CMYK's 127
    assert _filled_share(np.full((4, 4), 128, np.uint8)) == 1.0
    image[-1, -1] = 129
    assert _filled_share(image) == 0.0


def test_a_jpeg_over_pils_pixel_limit_is_decoded_when_max_side_makes_libjpeg_decode_it_small(tmp_path, monkeypatch):
    """Pillow refuses an image of more than 2 x MAX_IMAGE_PIXELS (about 179 MP) as a decompression
    bomb when it opens it, so make_ffcv skipped such a JPEG even at --max-side 512, where libjpeg
    decodes it at 1/8 scale. A limit of 1000 pixels stands in for Pillow's; it is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused above 2000: the 200 x 160 images are
    Image.new("RGB", (200, 160), (200, 100, 50)).save(tmp_path / "big.JPEG", quality=95)
    Image.new("RGB", (200, 160), (200, 100, 50)).save(tmp_path / "big.png")
    pixels, notes = read_rgb(tmp_path / "big.JPEG", max_side=25)  # decoded at 1/8: 25 x 20
    assert pixels.shape == (20, 25, 3) and notes == []
    assert np.abs(pixels.astype(float) - [200, 100, 50]).max() < 4
    assert Image.MAX_IMAGE_PIXELS == 1000
    for path, max_side in (("big.JPEG", None),  # decoded whole: refused as before
                           ("big.JPEG", 150),  # libjpeg's 1/2 would be smaller than asked: decoded whole
                           ("big.png", 25)):  # no reduced-scale decoding
        with pytest.raises(UndecodableImage, match="DecompressionBombError"):
            read_rgb(tmp_path / path, max_side=max_side)


def test_a_jpeg_cut_soon_after_its_headers_is_skipped_naming_how_much_is_grey_fill(tmp_path):
    """Kept as a truncated image, a file cut a few bytes into its scan was nearly all the decoder's
    grey (make_ffcv wrote it, the folder source trained on it), named only as 'truncated'. Beyond
    half grey it is undecodable; half or less is kept as before (the test above)."""
    import io
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    (tmp_path / "headers.JPEG").write_bytes(data[:data.index(b"\xff\xda") + 200])  # the scan's first bytes
    with pytest.raises(UndecodableImage, match=r"truncated: [89]\d% of the image is the decoder's grey fill, more than 50%"):
        read_rgb(tmp_path / "headers.JPEG")
    (tmp_path / "most.JPEG").write_bytes(data[:len(data) * 3 // 4])
    pixels, notes = read_rgb(tmp_path / "most.JPEG")
    assert notes == ["truncated"] and 0.1 < (pixels == 128).all(axis=2).mean() < 0.5
    # CMYK (as Photoshop saves it, Adobe-inverted): the fill reads 127 per channel and 64 in RGB,
    # where the share was measured, so a file of almost nothing but fill was kept.
    buffer = io.BytesIO()
    Image.fromarray(noise).convert("CMYK").save(buffer, format="JPEG", quality=90)
    cmyk = buffer.getvalue()
    (tmp_path / "cmyk_headers.JPEG").write_bytes(cmyk[:cmyk.index(b"\xff\xda") + 200])
    with pytest.raises(UndecodableImage, match=r"truncated: [89]\d% of the image is the decoder's grey fill"):
        read_rgb(tmp_path / "cmyk_headers.JPEG")
    (tmp_path / "cmyk_most.JPEG").write_bytes(cmyk[:len(cmyk) * 3 // 4])
    pixels, notes = read_rgb(tmp_path / "cmyk_most.JPEG")
    assert notes == ["truncated", "cmyk"] and 0.1 < (pixels == 64).all(axis=2).mean() < 0.5


def test_a_multi_picture_jpeg_from_a_phone_is_read_as_a_jpeg_at_reduced_scale(tmp_path):
    """MPO (a JPEG followed by more pictures, as phone cameras save .jpg): reported as not_jpeg,
    a false mismatch in make_ffcv's report, and always decoded at full size."""
    first = Image.new("RGB", (200, 160), (200, 100, 50))
    first.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[Image.new("RGB", (200, 160))])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    pixels, notes = read_rgb(tmp_path / "phone.jpg", max_side=25)  # libjpeg's 1/8: 25 x 20
    assert pixels.shape == (20, 25, 3) and notes == []
    assert np.abs(pixels.astype(float) - [200, 100, 50]).max() < 4  # the first picture


def test_a_micro_batch_of_only_undecodable_images_is_one_black_stand_in_of_no_sample(tmp_path):
    """The rank must still step with the others (their gradient reduction waits for it); the
    stand-in has no index, so the train step weighs it 0 and no sample is counted as read."""
    (tmp_path / "c0").mkdir()
    for name in ("a", "b"):
        (tmp_path / "c0" / f"{name}.JPEG").write_bytes(b"not a jpeg")
    loader = PretrainLoader(ImageFolderSource(tmp_path), img_size=32, scale=(0.5, 1.0), seed=0,
                            global_batch_size=2, micro_batch_size=2, rank=0, world_size=1, mask_fn=mask_fn)
    batch = next(loader.micro_batches(0))
    assert batch["images"].shape == (1, 3, 32, 32) and not batch["images"].any()
    assert batch["mask"].shape == (1, 4) and batch["index"].numel() == 0 and batch["label"].numel() == 0


@pytest.mark.parametrize("height, width", [(200, 500), (500, 200), (333, 500), (40, 40)])
def test_crop_box_fallback_is_the_centre_crop_clamped_to_the_ratio_range_as_torchvision(height, width):
    from torchvision.transforms import RandomResizedCrop
    from mto_ds.data.loader import crop_box

    class Never:  # every draw misses: uniform() returns a scale/aspect no crop can satisfy
        def uniform(self, low, high):
            return high * 10
    ratio = (3 / 4, 4 / 3)
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), scale=(10.0, 10.0), ratio=ratio)
    assert crop_box(Never(), height, width, (0.67, 1.0), ratio) == tuple(expected)
    top, left, h, w = crop_box(np.random.default_rng(0), height, width, (0.67, 1.0), ratio)
    assert 0 <= top <= height - h and 0 <= left <= width - w


class _ScriptedRng:
    """Stands in for a numpy Generator: uniform() returns the given draws in turn and records its
    bounds; integers() returns the given values in turn, else its largest (high - 1)."""

    def __init__(self, uniforms, integers=()):
        self.uniforms, self.integers_left, self.bounds = list(uniforms), list(integers), []

    def uniform(self, low, high):
        self.bounds.append((low, high))
        return self.uniforms.pop(0)

    def integers(self, low, high):
        return self.integers_left.pop(0) if self.integers_left else high - 1


@pytest.mark.parametrize("draws, integers, expected", [
    ([10.0, 0.0, 0.5, 0.0], (), (55, 155, 245, 245)),  # a miss (10x the area), then a 245 px square
    ([1.0, np.log(4 / 3)], (), (0, 0, 300, 400)),       # the whole image is a crop of the range
    ([0.25, np.log(4 / 3)], (), (150, 200, 150, 200)),  # the offset may reach the far edge
    ([0.25, np.log(4 / 3)], (7, 11), (7, 11, 150, 200)),  # top drawn first, then left
])
def test_crop_box_draws_area_then_aspect_and_places_the_crop_anywhere_as_torchvision(draws, integers, expected):
    """torchvision's RandomResizedCrop.get_params, draw by draw: area share in `scale`, log aspect
    in log `ratio`, up to 10 tries, w = round(sqrt(area x aspect)), h = round(sqrt(area / aspect)),
    a crop as large as the image accepted, top in [0, H - h], then left in [0, W - w]."""
    from mto_ds.data.loader import crop_box
    rng = _ScriptedRng(draws, integers)
    assert crop_box(rng, 300, 400, (0.2, 1.0)) == expected
    assert rng.bounds[:2] == [(0.2, 1.0), (np.log(3 / 4), np.log(4 / 3))]
    rng = _ScriptedRng([0.25, 0.0])
    crop_box(rng, 300, 400, (0.08, 0.8))
    assert rng.bounds[0] == (0.08, 0.8)  # data.crop_scale_max below 1 bounds the area


def test_folder_pixels_are_the_crop_resized_bicubic_from_the_image_then_flipped_in_half_the_draws():
    """The PIL path's pixels: crop_box of the sample's stream 0, PIL's bicubic resize of that box
    of the image, a left-right flip where the stream's next draw is under 0.5, channels first."""
    from mto_ds.data.loader import PretrainDataset, crop_box
    image = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    source = SimpleNamespace(label=lambda i: 0, image=lambda i: image)
    dataset = PretrainDataset(source, img_size=16, scale=(0.3, 1.0), seed=3, mask_fn=mask_fn)
    flips = []
    for index in range(8):
        rng = sample_rng(3, 2, index, 0)
        top, left, h, w = crop_box(rng, 60, 90, (0.3, 1.0))
        expected = Image.fromarray(image).resize((16, 16), Image.BICUBIC, box=(left, top, left + w, top + h))
        flips.append(rng.uniform() < 0.5)
        if flips[-1]:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        pixels, mask, got_index, label, decoded = dataset[(2, index)]
        assert decoded and got_index == index and pixels.dtype == torch.uint8
        assert torch.equal(pixels, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1)), index
        assert torch.equal(mask, torch.from_numpy(mask_fn(sample_rng(3, 2, index, 1))))
    assert set(flips) == {True, False}


def test_normalize_takes_imagenet_mean_and_std_per_channel_in_the_dtype_asked():
    from mto_ds.data.loader import normalize
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    assert normalize(white).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert normalize(white).dtype == torch.float32
    assert normalize(white, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_the_sample_order_is_the_epochs_permutation_cut_into_global_batches():
    """docs: step t of epoch e takes perm[t G : (t + 1) G] of the permutation of (seed, e); rank r of
    W its r-th share. Seed and epoch are not interchangeable, a crop and a mask draw from streams of
    their own, and a global batch of one sample per rank is allowed."""
    from mto_ds.data.order import epoch_permutation, micro_batch_split, rank_share
    perm = epoch_permutation(100, 5, 2)
    assert sorted(perm.tolist()) == list(range(100))
    assert np.array_equal(rank_indices(100, 5, 2, 32, 0, 1), perm[:96])
    assert np.array_equal(rank_indices(100, 5, 2, 32, 1, 2, start_step=1), np.concatenate([perm[48:64], perm[80:96]]))
    assert not np.array_equal(epoch_permutation(100, 1, 2), epoch_permutation(100, 2, 1))
    # Pinned: a run resumed by a later version (of this code, or of numpy's generators) must read
    # the rest of its epoch in the order it began it, or it reads some samples twice and some never.
    assert epoch_permutation(10, 0, 0).tolist() == [5, 2, 8, 0, 4, 7, 9, 6, 1, 3]
    assert epoch_permutation(10, 1, 0).tolist() == [1, 8, 3, 6, 9, 5, 2, 4, 0, 7]
    assert sample_rng(0, 0, 5, 0).random() != sample_rng(0, 0, 5, 1).random()
    assert rank_share(4, 4, 3) == (3, 4) and micro_batch_split(4, 4, 1) == (1, 1)


def test_folder_source_ranks_are_disjoint_masks_deterministic_and_resume_exact(jpeg_folder):
    loaders = [build_pretrain_loader(folder_cfg(jpeg_folder), method="mae", img_size=32, seed=5,
                                     global_batch_size=8, micro_batch_size=2, rank=r, world_size=2,
                                     mask_fn=mask_fn) for r in (0, 1)]
    epochs = [list(loader.micro_batches(1)) for loader in loaders]
    seen = [torch.cat([b["index"] for b in e]).numpy() for e in epochs]
    assert np.array_equal(seen[0], rank_indices(24, 5, 1, 8, 0, 2))
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 24
    labels = torch.cat([b["label"] for b in epochs[0]]).numpy()
    assert np.array_equal(labels, [loaders[0].source.label(i) for i in seen[0]])
    for batch in epochs[0]:
        for index, mask in zip(batch["index"].tolist(), batch["mask"]):
            assert np.array_equal(mask.numpy(), mask_fn(sample_rng(5, 1, index, 1)))
    resumed = list(loaders[0].micro_batches(1, start_step=2))
    assert np.array_equal(torch.cat([b["index"] for b in resumed]).numpy(), seen[0][8:])
    assert torch.equal(resumed[0]["images"], epochs[0][4]["images"])  # PIL path: crops too are resumable


@pytest.mark.parametrize("new_world_size", [1, 4])
def test_folder_resume_on_another_world_size_reads_the_rest_of_the_epoch_once_with_the_same_pixels(
        jpeg_folder, new_world_size):
    """24 images, global batch 8 (3 steps), 2 ranks stop after step 1 of epoch 1 and the run
    comes back on 1 or 4 ranks: the epoch's samples are each read once, step by step the
    uninterrupted run's global batches, with the same crops, flips and masks."""
    def loader(rank, world_size):
        return build_pretrain_loader(folder_cfg(jpeg_folder), method="mae", img_size=32, seed=5, global_batch_size=8,
                                     micro_batch_size=2, rank=rank, world_size=world_size, mask_fn=mask_fn)

    def by_step(batches_of_ranks, steps):  # {step: indices of its global batch, rank 0's share first}
        shares = [torch.cat([b["index"] for b in batches]).numpy().reshape(steps, -1) for batches in batches_of_ranks]
        return {s: np.concatenate([share[s] for share in shares]) for s in range(steps)}

    full = [list(loader(r, 2).micro_batches(1)) for r in (0, 1)]
    rest = [list(loader(r, new_world_size).micro_batches(1, start_step=1)) for r in range(new_world_size)]
    steps = by_step(full, 3)
    resumed = by_step(rest, 2)
    consumed = np.concatenate([steps[0], resumed[0], resumed[1]])
    assert sorted(consumed) == list(range(24))
    assert np.array_equal(resumed[0], steps[1]) and np.array_equal(resumed[1], steps[2])
    pixels = {int(i): (im, m) for batches in full for b in batches for i, im, m in zip(b["index"], b["images"], b["mask"])}
    for batches in rest:
        for b in batches:
            for i, image, mask in zip(b["index"].tolist(), b["images"], b["mask"]):
                assert torch.equal(image, pixels[i][0]) and torch.equal(mask, pixels[i][1])


def test_build_pretrain_loader_rejects_more_ranks_than_samples_in_a_global_batch(jpeg_folder):
    with pytest.raises(ValueError, match="a global batch of 8 cannot give each of 9 ranks a sample"):
        build_pretrain_loader(folder_cfg(jpeg_folder), method="mae", img_size=32, seed=0, global_batch_size=8,
                              micro_batch_size=3, rank=0, world_size=9, mask_fn=mask_fn)


def test_make_synthetic_cli_writes_once_and_leaves_an_existing_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_synthetic_cli", REPO / "tools" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [str(tmp_path / "out"), "--images", "6", "--classes", "2", "--size", "16", "--seed", "3"]
    assert cli.main(argv) == 0
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*.JPEG"))
    assert len(files) == 6
    assert cli.main(argv[:1] + ["--images", "2"]) == 0
    assert "left as it is" in capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*.JPEG")) == files
    # A bad argument with --overwrite is refused before the folder is deleted (it was deleted first).
    with pytest.raises(SystemExit) as refused:
        cli.main(argv[:1] + ["--images", "0", "--overwrite"])
    assert refused.value.code == 2 and "--images, --classes and --size must be positive" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*.JPEG")) == files


STOP_SIGNALS_TO_WORKER = r"""
import os, signal, time
import psutil
from types import SimpleNamespace
from mto_ds.data import build_pretrain_loader
from mto_ds.engine.signals import StopRequest
stop = StopRequest()  # as in a training rank: installed before the workers fork
cfg = SimpleNamespace(source="synthetic", synthetic_images=64, synthetic_classes=10, crop_scale_min=None,
                      crop_scale_max=1.0, num_workers=1, path=None)
loader = build_pretrain_loader(cfg, method="simmim", img_size=32, seed=0, global_batch_size=4, micro_batch_size=4,
                               rank=0, world_size=1, mask_fn=lambda rng: rng.random(4) < 0.5)
stream = loader.micro_batches(0, 0)
next(stream)
(worker,) = psutil.Process().children()
for sig in (signal.SIGTERM, signal.SIGUSR1):  # as Slurm signals every process of a job step
    os.kill(worker.pid, sig)
time.sleep(1.0)
alive = worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
print("RESULT", alive, 1 + sum(1 for _ in stream), stop.signum, flush=True)
"""


def test_loader_workers_live_through_stop_signals_so_the_rank_can_finish_and_save(tmp_path):
    """torch's worker handler dies of a SIGTERM from anyone but its rank; ours ignore it (and
    SIGUSR1), so a job-wide signal leaves the rank's loader intact until it has saved."""
    script = tmp_path / "signal_worker.py"
    script.write_text(STOP_SIGNALS_TO_WORKER)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    assert line.split()[1:] == ["True", "16", "None"]  # alive, all 64 / 4 batches, the rank not signalled


WORKER_ERROR_UNCAUGHT = r"""
import sys
from types import SimpleNamespace
from mto_ds.data import build_pretrain_loader
from mto_ds.engine.signals import StopRequest
stop = StopRequest()  # as in a training rank
cfg = SimpleNamespace(source="folder", path=sys.argv[1], crop_scale_min=None, crop_scale_max=1.0, num_workers=1)


def mask_fn(rng):
    raise ValueError("the mask generator failed in the worker")


loader = build_pretrain_loader(cfg, method="simmim", img_size=32, seed=0, global_batch_size=2, micro_batch_size=2,
                               rank=0, world_size=1, mask_fn=mask_fn)
next(loader.micro_batches(0, 0))  # the worker's error ends the process
"""


def test_a_worker_error_ends_the_process_instead_of_hanging_at_exit(tmp_path):
    """The worker's error propagates out of the rank. Its traceback held the loader's iterator, so
    at exit multiprocessing sent the worker a SIGTERM, which workers ignore (they must live
    through a job-wide stop signal), and waited for it forever: a damaged data set held its
    allocation until SIGKILL. The rank must exit with the error instead."""
    write_image_folder(tmp_path / "images", num_images=3, num_classes=1, size=40)
    script = tmp_path / "worker_error.py"
    script.write_text(WORKER_ERROR_UNCAUGHT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "images")], cwd=REPO,
                            env=cpu_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "the mask generator failed in the worker" in result.stderr


def test_a_worker_error_shuts_its_workers_down_though_its_traceback_is_kept(tmp_path):
    """A notebook keeps the last error and its traceback (sys.last_value) and never exits: the
    traceback's frames held the loader's iterator, whose workers then lived on, memory and all."""
    import psutil

    def failing_mask(rng):
        raise ValueError("the mask generator failed in the worker")
    loader = PretrainLoader(SyntheticImages(8, 2, size=40, seed=0), img_size=32, scale=(0.5, 1.0), seed=0,
                            global_batch_size=4, micro_batch_size=4, rank=0, world_size=1, mask_fn=failing_mask,
                            num_workers=1)
    before = {child.pid for child in psutil.Process().children()}
    with pytest.raises(ValueError, match="the mask generator failed") as caught:
        next(loader.micro_batches(0))
    assert caught.value.__traceback__ is not None  # still held, as a notebook holds it
    workers = [child for child in psutil.Process().children() if child.pid not in before]
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == []


EPOCH_LEFT_OPEN_AT_EXIT = r"""
from types import SimpleNamespace
from mto_ds.data import build_pretrain_loader
cfg = SimpleNamespace(source="synthetic", synthetic_images=64, synthetic_classes=10, crop_scale_min=None,
                      crop_scale_max=1.0, num_workers=2, path=None)
loader = build_pretrain_loader(cfg, method="simmim", img_size=32, seed=0, global_batch_size=4, micro_batch_size=4,
                               rank=0, world_size=1, mask_fn=lambda rng: rng.random(4) < 0.5)
stream = loader.micro_batches(0, 0)  # a global: still open when the interpreter exits
print("RESULT", next(stream)["images"].shape[0], flush=True)
"""


def test_an_epoch_left_open_at_exit_does_not_hang_the_process(tmp_path):
    """A micro_batches() generator still open at exit (a script or notebook that reads a few
    batches to look at them): multiprocessing's exit handler stops the loader's workers with a
    SIGTERM, which they ignore (they must live through a job-wide stop signal), then waits for
    them forever. The loader stops its workers itself before that handler runs."""
    script = tmp_path / "left_open.py"
    script.write_text(EPOCH_LEFT_OPEN_AT_EXIT)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULT 4" in result.stdout.splitlines()


@pytest.mark.parametrize("world", [3, 5, 7])
def test_ranks_that_do_not_divide_the_global_batch_read_its_samples_once_in_shares_that_differ_by_one(world):
    """A run of global batch 32 resumed on 3, 5 or 7 ranks: each step's samples, rank by rank,
    are the 1-rank order's (so the data position and the samples of every step do not depend on
    the number of ranks), each rank's share is 32 // W or one more, and the places beyond a
    share are PAD, at the end of the rank's step."""
    from mto_ds.data.order import PAD, micro_batch_split
    size, accumulation = micro_batch_split(32, world, 4)
    steps = 3
    one_rank = rank_indices(100, 5, 2, 32, 0, 1)
    per_rank = [rank_indices(100, 5, 2, 32, r, world, 0, 4).reshape(steps, size * accumulation) for r in range(world)]
    for step in range(steps):
        shares = [row[step][row[step] != PAD] for row in per_rank]
        assert np.array_equal(np.concatenate(shares), one_rank[step * 32:(step + 1) * 32])
        assert {len(share) for share in shares} == {32 // world, 32 // world + 1}
        for row, share in zip(per_rank, shares):  # the share first, then the pads
            assert (row[step][:len(share)] != PAD).all() and (row[step][len(share):] == PAD).all()


def test_a_rank_whose_share_leaves_a_micro_batch_place_empty_gets_a_stand_in_that_is_no_sample():
    """Global batch 8 over 3 ranks in micro-batches of at most 2: shares 2, 3, 3, so every rank
    runs 2 micro-batches and rank 0's second holds no sample. It comes as one black image with an
    empty index (the train step weighs it 0), not as a sample read twice."""
    source = SyntheticImages(40, 4, size=40, seed=0)
    loaders = [PretrainLoader(source, img_size=32, scale=(0.5, 1.0), seed=0, global_batch_size=8,
                              micro_batch_size=2, rank=r, world_size=3, mask_fn=mask_fn) for r in range(3)]
    first_step = [list(loader.micro_batches(1))[:2] for loader in loaders]
    assert [[len(b["index"]) for b in batches] for batches in first_step] == [[2, 0], [2, 1], [2, 1]]
    stand_in = first_step[0][1]
    assert stand_in["images"].shape == (1, 3, 32, 32) and stand_in["images"].max() == 0
    assert stand_in["mask"].shape == (1, PATCHES) and len(stand_in["label"]) == 0
    samples = torch.cat([b["index"] for batches in first_step for b in batches]).numpy()
    assert np.array_equal(samples, rank_indices(40, 0, 1, 8, 0, 1)[:8])
    # A micro-batch size that does not split a share evenly is the plan's (at most the one asked):
    # 4 per rank in micro-batches of at most 3 are 2 of 2, never one that runs into the next step.
    loader = PretrainLoader(source, img_size=32, scale=(0.5, 1.0), seed=0, global_batch_size=8,
                            micro_batch_size=3, rank=0, world_size=2, mask_fn=mask_fn)
    batches = [b["index"].tolist() for b in loader.micro_batches(1)]
    assert [len(b) for b in batches] == [2] * 10
    assert sum(batches[:2], []) == rank_indices(40, 0, 1, 8, 0, 2)[:4].tolist()


def test_make_synthetic_writes_train_and_val_of_the_same_classes_that_evaluation_reads(tmp_path):
    """Two runs of the tool with other seeds draw other classes, so a held-out split comes from
    one set: --val-images writes OUT/train and OUT/val, the layout the evaluation reads."""
    from mto_ds.config import load_config
    from mto_ds.eval.datasets import build_eval_sets
    spec = importlib.util.spec_from_file_location("make_synthetic_cli", REPO / "tools" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "synth"
    assert cli.main([str(out), "--images", "12", "--classes", "3", "--size", "32", "--val-images", "6"]) == 0
    train, val = (list((out / split).rglob("*.JPEG")) for split in ("train", "val"))
    assert sorted(int(p.stem) for p in train) == list(range(12))
    assert sorted(int(p.stem) for p in val) == list(range(12, 18))
    truth = SyntheticImages(18, 3, 32)  # one set: image i and its class depend on (seed, i) only
    assert all(p.parent.name == f"class_{truth.label(int(p.stem))}" for p in train + val)
    cfg = load_config(None, ["data.source=folder", f"data.path={out / 'train'}", "model.img_size=32",
                             "model.mask_patch_size=16", "eval.num_train=12", "eval.num_val=6"])
    train_set, val_set = build_eval_sets(cfg)
    assert (len(train_set), len(val_set), train_set.classes) == (12, 6, ["class_0", "class_1", "class_2"])


# --- tools/make_subset.py: ImageNet-100 and per-class caps, as links ---------------------------

def _make_subset(capsys, *argv):
    spec = importlib.util.spec_from_file_location("make_subset_cli", REPO / "tools" / "make_subset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """train/ (60 images: 5 to 13 per class) and val/ (24: 2 to 5 per class) of the same 6 classes."""
    return write_image_folder(tmp_path_factory.mktemp("subset") / "inet", 60, 6, size=16, val_images=24)


def _linked(root):
    """class -> the files its listing reads, as the source paths they lead to."""
    listing = list_image_folder(root)
    return {name: [p.resolve() for p, label in zip(listing.files, listing.labels) if label == index]
            for index, name in enumerate(listing.classes)}


def test_a_subset_links_the_chosen_classes_and_draws_each_ones_images_from_the_seed_and_its_name(
        imagenet_like, tmp_path, capsys):
    source = _linked(imagenet_like / "train")
    assert sum(map(len, source.values())) == 60 and min(map(len, source.values())) > 3
    code, out = _make_subset(capsys, imagenet_like, tmp_path / "two", "--classes", "class_4,class_1",
                             "--per-class", 3)
    assert code == 0, out.err
    train, val = _linked(tmp_path / "two" / "train"), _linked(tmp_path / "two" / "val")
    assert list(train) == list(val) == ["class_1", "class_4"]  # labels 0 and 1, in sorted order
    for name, files in train.items():
        assert len(files) == 3 and set(files) <= set(source[name]) and files == sorted(files)
    assert val == {name: _linked(imagenet_like / "val")[name] for name in ("class_1", "class_4")}  # whole
    assert (tmp_path / "two" / "val" / "class_1").is_symlink()  # a class taken whole: one link
    record = json.loads((tmp_path / "two" / "subset.json").read_text())
    val_count = sum(map(len, val.values()))
    assert record["classes"] == ["class_1", "class_4"] and record["images"] == {"train": 6, "val": val_count}
    assert (record["per_class"], record["val_per_class"], record["seed"]) == (3, None, 0)
    assert out.out.startswith(f"{tmp_path / 'two'}: 2 classes, train/ 6 images, val/ {val_count} images (links into ")
    # The same draw again, and for class_1 whatever else the subset holds; another seed, another draw.
    assert _make_subset(capsys, imagenet_like, tmp_path / "one", "--classes", "class_1", "--per-class", 3)[0] == 0
    assert _linked(tmp_path / "one" / "train")["class_1"] == train["class_1"]
    assert _make_subset(capsys, imagenet_like, tmp_path / "s1", "--classes", "class_1,class_4", "--per-class", 3,
                        "--seed", 1)[0] == 0
    assert _linked(tmp_path / "s1" / "train") != train
    # The images read through the links are the source's pixels.
    pixels, _ = read_rgb(next(iter((tmp_path / "two" / "train" / "class_1").iterdir())))
    assert pixels.shape == (16, 16, 3)


def test_a_subset_of_k_classes_drawn_from_a_seed_is_the_same_each_time_and_reads_as_the_eval_root(
        imagenet_like, tmp_path, capsys):
    from mto_ds.config import load_config
    from mto_ds.eval.datasets import build_eval_sets
    for out in ("a", "b"):
        assert _make_subset(capsys, imagenet_like, tmp_path / out, "--num-classes", 3, "--seed", 5)[0] == 0
    chosen = json.loads((tmp_path / "a" / "subset.json").read_text())["classes"]
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert chosen == json.loads((tmp_path / "b" / "subset.json").read_text())["classes"]
    cfg = load_config(None, ["data.source=folder", f"data.path={tmp_path / 'a' / 'train'}", "eval.num_train=30",
                             "eval.num_val=6", "model.img_size=64"], training=False)
    train_set, val_set = build_eval_sets(cfg)
    assert (len(train_set), len(val_set)) == (30, 6)


@pytest.mark.parametrize("argv, message", [
    (["--classes", "class_1,clas_3"], "1 of the classes asked for are not class folders of the source: clas_3 "
                                      "(did you mean class_3"),
    (["--classes", "class_1,class_1"], "names class_1 more than once"),
    (["--num-classes", "7"], "--num-classes 7: the source has 6 classes"),
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
])
def test_a_subset_that_cannot_be_made_as_asked_is_named_with_exit_2_and_nothing_written(
        imagenet_like, tmp_path, capsys, argv, message):
    code, out = _make_subset(capsys, imagenet_like, tmp_path / "out", *argv)
    assert code == 2 and message in out.err, out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_subset_refuses_an_out_folder_in_use_and_a_val_split_without_the_chosen_classes(tmp_path, capsys):
    source = write_image_folder(tmp_path / "inet", 12, 3, size=16, val_images=3)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("kept")
    code, out = _make_subset(capsys, source, tmp_path / "used", "--num-classes", 2)
    assert code == 2 and f"{tmp_path / 'used'} exists and is not an empty folder" in out.err
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]
    for path in (source / "val" / "class_2").iterdir():
        path.unlink()
    (source / "val" / "class_2").rmdir()
    code, out = _make_subset(capsys, source, tmp_path / "out", "--classes", "class_0,class_2")
    assert code == 2 and f"{source / 'val'} lacks 1 of the chosen classes: class_2" in out.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_flat_val_split_is_linked_into_class_folders_by_its_labels_file(tmp_path, capsys):
    """ImageNet's val/ as distributed is flat, its classes in a file (Kaggle's LOC_val_solution.csv):
    with --val-labels the subset's val/ is class folders of links, which the evaluation reads."""
    source = write_image_folder(tmp_path / "inet", 24, 3, size=16, val_images=12)
    truth = _linked(source / "val")
    rows = ["ImageId,PredictionString"]
    for name, files in truth.items():
        for path in files:
            path.rename(source / "val" / path.name)
            rows.append(f"{path.stem},{name} 1 2 30 40 {name} 5 6 7 8")
        (source / "val" / name).rmdir()
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    flat = {name: [source / "val" / p.name for p in files] for name, files in truth.items()}
    code, out = _make_subset(capsys, source, tmp_path / "all", "--val-labels", tmp_path / "LOC_val_solution.csv")
    assert code == 0, out.err
    assert _linked(tmp_path / "all" / "val") == flat  # every class, each image under its label
    assert _linked(tmp_path / "all" / "train") == _linked(source / "train")
    code, out = _make_subset(capsys, source, tmp_path / "one", "--classes", "class_2", "--val-per-class", 1,
                             "--val-labels", tmp_path / "LOC_val_solution.csv")
    assert code == 0 and _linked(tmp_path / "one" / "val")["class_2"][0] in flat["class_2"]
    assert json.loads((tmp_path / "one" / "subset.json").read_text())["images"]["val"] == 1
    # Without the labels, or with a file that leaves an image out: named, nothing written.
    code, out = _make_subset(capsys, source, tmp_path / "none")
    assert code == 2 and f"{source / 'val'} has no class folders (ImageNet's val/ as distributed): give" in out.err
    (tmp_path / "short.txt").write_text("".join(f"{p.name} class_0\n" for p in flat["class_0"]))
    code, out = _make_subset(capsys, source, tmp_path / "none", "--val-labels", tmp_path / "short.txt")
    unlabelled = len(flat["class_1"]) + len(flat["class_2"])
    assert code == 2 and f"--val-labels names no class for {unlabelled} of the 12 images of" in out.err
    assert not (tmp_path / "none").exists()
