"""The FFCV pre-training loader on a .beton made from real JPEG files by the converter.

Each FFCV loader compiles its pipeline (numba) on its first batch, about 10 s here, so the
loaders are built once per module and shared by the tests.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from mto_ds.data import build_pretrain_loader, write_image_folder  # noqa: E402
from mto_ds.data.ffcv_writer import convert_image_folder  # noqa: E402
from mto_ds.data.imagefolder import ImageFolderSource, read_rgb  # noqa: E402
from mto_ds.data.order import epoch_permutation, rank_indices, sample_rng  # noqa: E402

NUM_IMAGES, GLOBAL_BATCH, MICRO, IMG, SEED = 44, 16, 4, 32, 7
STEPS = NUM_IMAGES // GLOBAL_BATCH  # 2 whole steps; 12 samples dropped each epoch
PATCHES = (IMG // 16) ** 2


def mask_fn(rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(PATCHES) < PATCHES // 2


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv_data")
    folder = write_image_folder(root / "jpeg", NUM_IMAGES, num_classes=8, size=40, seed=1)
    convert_image_folder(folder, root / "train.beton", max_side=None, workers=2, progress=False)
    labels = np.array(ImageFolderSource(folder).labels)
    return root / "train.beton", labels


def make_loader(path, rank, world_size, order="exact", os_cache=True, global_batch=GLOBAL_BATCH, micro=MICRO):
    cfg = SimpleNamespace(source="ffcv", path=str(path), num_workers=1, crop_scale_min=None,
                          crop_scale_max=1.0, order=order, os_cache=os_cache)
    return build_pretrain_loader(cfg, method="simmim", img_size=IMG, seed=SEED, global_batch_size=global_batch,
                                 micro_batch_size=micro, rank=rank, world_size=world_size, mask_fn=mask_fn)


@pytest.fixture(scope="module")
def exact_epoch(beton):
    """Epoch 3 as ranks 0 and 1 of 2 read it: {rank: list of micro-batches}."""
    path, _ = beton
    loaders = {rank: make_loader(path, rank, 2) for rank in (0, 1)}
    return loaders, {rank: list(loader.micro_batches(3)) for rank, loader in loaders.items()}


def cat(batches, key):
    return torch.cat([b[key] for b in batches]).numpy()


def test_two_ranks_read_disjoint_samples_that_cover_the_epoch(beton, exact_epoch):
    _, labels = beton
    loaders, epoch = exact_epoch
    seen = {rank: cat(batches, "index") for rank, batches in epoch.items()}
    assert len(seen[0]) == len(seen[1]) == STEPS * GLOBAL_BATCH // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(epoch_permutation(NUM_IMAGES, SEED, 3)[: STEPS * GLOBAL_BATCH])
    # Each global batch is the one a single rank would read: order independent of world size.
    per_step = [np.concatenate([seen[r].reshape(STEPS, -1)[s] for r in (0, 1)]) for s in range(STEPS)]
    assert np.array_equal(np.concatenate(per_step), rank_indices(NUM_IMAGES, SEED, 3, GLOBAL_BATCH, 0, 1))
    # The pixels read are those of the sample named: the label stored with them matches.
    for rank in (0, 1):
        assert np.array_equal(cat(epoch[rank], "label"), labels[seen[rank]])
    assert loaders[0].num_samples == NUM_IMAGES and loaders[0].steps_per_epoch == STEPS


def test_micro_batches_are_uint8_crops_of_the_model_size(exact_epoch):
    _, epoch = exact_epoch
    batch = epoch[0][0]
    assert batch["images"].shape == (MICRO, 3, IMG, IMG) and batch["images"].dtype == torch.uint8
    assert batch["images"].is_contiguous()
    assert batch["mask"].shape == (MICRO, PATCHES) and batch["mask"].dtype == torch.bool
    assert batch["index"].dtype == batch["label"].dtype == torch.int64
    assert len(epoch[0]) == STEPS * GLOBAL_BATCH // 2 // MICRO
    # Owned tensors: holding every batch of the epoch does not see them overwritten.
    assert len({b["images"].data_ptr() for b in epoch[0]}) == len(epoch[0])
    assert 40 < batch["images"].float().mean() < 220


def test_same_seed_gives_the_same_pixels_and_masks_and_another_epoch_other_ones(exact_epoch):
    loaders, epoch = exact_epoch
    first = epoch[0]
    again = list(loaders[0].micro_batches(3))
    for a, b in zip(first, again):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["images"], b["images"])  # crops and flips are seeded too
    for batch in first:
        for index, mask in zip(batch["index"].tolist(), batch["mask"]):
            assert np.array_equal(mask.numpy(), mask_fn(sample_rng(SEED, 3, index, 1)))
    other = list(loaders[0].micro_batches(4))
    assert not np.array_equal(cat(other, "index"), cat(first, "index"))
    masks_by_index = {i: m for b in other for i, m in zip(b["index"].tolist(), b["mask"].numpy())}
    assert any(not np.array_equal(mask_fn(sample_rng(SEED, 3, i, 1)), m) for i, m in masks_by_index.items())
    # A sample read in both epochs gets another crop in each.
    pixels = [{i: im for b in batches for i, im in zip(b["index"].tolist(), b["images"])} for batches in (first, other)]
    both = set(pixels[0]) & set(pixels[1])
    assert both and all(not torch.equal(pixels[0][i], pixels[1][i]) for i in both)


def test_resume_mid_epoch_continues_at_the_next_sample(exact_epoch):
    loaders, epoch = exact_epoch
    resumed = list(loaders[1].micro_batches(3, start_step=1))
    full_index, full_mask = cat(epoch[1], "index"), cat(epoch[1], "mask")
    per_rank = GLOBAL_BATCH // 2
    assert np.array_equal(cat(resumed, "index"), full_index[per_rank:])
    assert np.array_equal(cat(resumed, "mask"), full_mask[per_rank:])
    assert np.array_equal(cat(resumed, "images"), cat(epoch[1], "images")[per_rank:])
    # Leaving an epoch early stops FFCV's thread; the next epoch still starts at its start.
    partial = loaders[1].micro_batches(3)
    next(partial)
    partial.close()
    assert np.array_equal(cat(list(loaders[1].micro_batches(3)), "index"), full_index)


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_resume_on_another_world_size_reads_the_rest_of_the_epoch_once_with_the_same_pixels(
        beton, exact_epoch, new_world_size):
    """Two ranks stop after step 1 of epoch 3; the run comes back on 1 rank (4 micro-batches of
    accumulation) or 3 ranks (shares of 5, 5 and 6 of the 16, in 2 micro-batches of at most 3,
    FFCV reading sample 0 for the place a share leaves empty) and reads from step 1. Together the
    two parts are the uninterrupted epoch's samples: each once, step by step the same global
    batches, each sample with the same crop, flip and mask."""
    path, _ = beton
    _, epoch = exact_epoch
    per_rank_before = GLOBAL_BATCH // 2
    before = {r: {key: cat(epoch[r], key)[:per_rank_before] for key in ("index", "images", "mask")} for r in (0, 1)}
    after = [list(make_loader(path, r, new_world_size).micro_batches(3, start_step=1)) for r in range(new_world_size)]
    step_one = np.concatenate([before[r]["index"] for r in (0, 1)])
    rest = np.concatenate([cat(batches, "index") for batches in after])
    consumed = np.concatenate([step_one, rest])
    assert len(consumed) == len(set(consumed)) == STEPS * GLOBAL_BATCH
    assert np.array_equal(consumed, rank_indices(NUM_IMAGES, SEED, 3, GLOBAL_BATCH, 0, 1))
    uninterrupted = {key: {i: x for r in (0, 1) for i, x in zip(cat(epoch[r], "index"), cat(epoch[r], key))}
                     for key in ("images", "mask")}
    for batches in after:
        for i, image, mask in zip(cat(batches, "index"), cat(batches, "images"), cat(batches, "mask")):
            assert np.array_equal(image, uninterrupted["images"][i]) and np.array_equal(mask, uninterrupted["mask"][i])


def test_one_epoch_is_read_at_a_time_because_the_decoder_reads_the_epoch_set_last(exact_epoch):
    loaders, epoch = exact_epoch
    open_epoch = loaders[0].micro_batches(4)
    next(open_epoch)
    with pytest.raises(RuntimeError, match="still reading an epoch: exhaust or close"):
        next(loaders[0].micro_batches(3))
    open_epoch.close()
    assert np.array_equal(cat(list(loaders[0].micro_batches(3)), "images"), cat(epoch[0], "images"))


def test_the_decoder_gives_the_same_pixels_when_ffcv_runs_its_pipeline_uncompiled(beton, exact_epoch):
    """FFCV's Compiler.set_enabled(False) (debugging) runs the pipeline as Python, where the
    decoder reads the epoch from its array instead of through the compiled address load."""
    from ffcv.pipeline.compiler import Compiler

    _, epoch = exact_epoch
    Compiler.set_enabled(False)
    try:
        plain = list(make_loader(beton[0], 0, 2).micro_batches(3))
    finally:
        Compiler.set_enabled(True)
    assert np.array_equal(cat(plain, "images"), cat(epoch[0], "images"))


@pytest.mark.parametrize("scale_max", [1.0, 0.5])  # MAE's crop scale (0.2, 1), and data.crop_scale_max=0.5
def test_each_crop_is_the_seeded_box_of_its_sample_cut_from_the_decoded_image(beton, tmp_path, scale_max):
    """Pixel for pixel, on 2 decoding threads: the image of sample i in epoch e is the crop
    `sample_crop(seed, e, i, ...)` of the stored image, resized as FFCV resizes (OpenCV's
    INTER_AREA) and mirrored when it says so: a function of (seed, epoch, sample) alone, so the
    same on any number of ranks, threads or restarts. Raw pixels are stored so the reference
    needs no JPEG decoder."""
    import cv2

    from mto_ds.data.ffcv_crop import sample_crop

    folder = tmp_path / "jpeg"
    write_image_folder(folder, 12, num_classes=3, size=40, seed=3)
    convert_image_folder(folder, tmp_path / "raw.beton", max_side=None, write_mode="raw", workers=1, progress=False)
    source = ImageFolderSource(folder)
    cfg = SimpleNamespace(source="ffcv", path=str(tmp_path / "raw.beton"), num_workers=2, crop_scale_min=None,
                          crop_scale_max=scale_max, order="exact", os_cache=True)
    loader = build_pretrain_loader(cfg, method="mae", img_size=IMG, seed=SEED, global_batch_size=12,
                                   micro_batch_size=6, rank=0, world_size=1, mask_fn=mask_fn)
    flipped = 0
    for batch in loader.micro_batches(5):
        for index, image in zip(batch["index"].tolist(), batch["images"]):
            stored = read_rgb(source.files[index])[0]  # what the converter stored
            top, left, h, w, flip = sample_crop(SEED, 5, index, *stored.shape[:2], 0.2, scale_max,
                                                np.log(3 / 4), np.log(4 / 3))
            expected = cv2.resize(stored[top:top + h, left:left + w], (IMG, IMG), interpolation=cv2.INTER_AREA)
            expected = expected[:, ::-1] if flip else expected
            assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), index
            flipped += flip
    assert 0 < flipped < 12


class _FFCVDraws:
    """A numpy-Generator stand-in for loader.crop_box that hands out the FFCV decoder's draws of
    one sample's stream: draws 4k and 4k+1 of attempt k for scale and log-ratio, 4k+2 and 4k+3
    for top and left."""

    def __init__(self, key):
        from mto_ds.data.ffcv_crop import uniform
        self.key, self.uniform_draw, self.uniforms, self.integer_draws = key, uniform, 0, 0

    def uniform(self, low, high):
        draw, self.uniforms, self.integer_draws = self.uniforms // 2 * 4 + self.uniforms % 2, self.uniforms + 1, 0
        return self.uniform_draw(self.key, draw, low, high)

    def integers(self, low, high):
        draw = (self.uniforms - 1) // 2 * 4 + 2 + self.integer_draws
        self.integer_draws += 1
        return int(self.uniform_draw(self.key, draw, float(low), float(high)))


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.67, 1.0), (0.08, 0.5)])
def test_the_ffcv_crop_is_the_folder_paths_crop_rule_draw_for_draw(scale):
    """The FFCV decoder's crop_box (compiled, hashed draws) and the PIL path's (numpy draws) are one
    rule: fed the same draws, they give the same box, tries, bounds, rounding and fallback alike,
    on wide, tall, square and very elongated images."""
    from mto_ds.data.ffcv_crop import crop_box, sample_key
    from mto_ds.data.loader import crop_box as folder_crop_box
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    mismatches = []
    for height, width in [(300, 500), (500, 300), (40, 40), (200, 1000), (1000, 200), (100, 1000), (37, 50)]:
        for index in range(200):
            key = np.uint64(sample_key(7, 2, index))
            ours = tuple(crop_box(key, height, width, *scale, *log_ratio))
            if ours != folder_crop_box(_FFCVDraws(key), height, width, scale):
                mismatches.append((height, width, index, ours))
    assert mismatches == []


def test_the_ffcv_flip_is_drawn_apart_from_the_crop():
    """Half the samples flip, whatever their crop: the flip's draw is not one of the crop's."""
    from mto_ds.data.ffcv_crop import sample_crop
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    crops = np.array([sample_crop(7, 0, i, 300, 500, 0.2, 1.0, *log_ratio) for i in range(4000)], dtype=float)
    area, flip = crops[:, 2] * crops[:, 3], crops[:, 4] == 1
    assert 0.45 < flip.mean() < 0.55
    assert abs(area[flip].mean() - area[~flip].mean()) / area.mean() < 0.05


def test_seeded_crops_follow_torchvision_random_resized_crop():
    """The draws: boxes inside the image with area and aspect in range, spread like
    torchvision's RandomResizedCrop on the same image, half of them mirrored; an image too
    elongated for the ratio range gets the clamped centre crop, as in torchvision."""
    from torchvision.transforms import RandomResizedCrop

    from mto_ds.data.ffcv_crop import sample_crop

    height, width, scale, ratio = 300, 500, (0.2, 1.0), (3 / 4, 4 / 3)
    log_ratio = np.log(ratio)
    ours = np.array([sample_crop(SEED, 0, i, height, width, *scale, *log_ratio) for i in range(4000)], dtype=float)
    top, left, h, w, flip = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert ((h * w / (height * width) > scale[0] * 0.97) & (h * w / (height * width) < scale[1] * 1.03)).all()
    assert ((w / h > ratio[0] * 0.97) & (w / h < ratio[1] * 1.03)).all()
    assert 0.46 < flip.mean() < 0.54
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), scale, ratio)
                          for _ in range(4000)], dtype=float)
    for name, a, b in (("area", h * w, reference[:, 2] * reference[:, 3]), ("aspect", w / h, reference[:, 3] / reference[:, 2]),
                       ("top", top, reference[:, 0]), ("left", left, reference[:, 1])):
        assert np.quantile(a, [0.1, 0.5, 0.9]) == pytest.approx(np.quantile(b, [0.1, 0.5, 0.9]), rel=0.1, abs=3), name
    # Other samples, epochs and seeds draw other boxes.
    boxes = {sample_crop(s, e, 0, height, width, *scale, *log_ratio)[:4] for s in (1, 2) for e in (0, 1)}
    assert len(boxes) == 4
    # 1000 x 100 at SimMIM's scale: no try fits the ratio range, so the centre 133 x 100.
    assert sample_crop(SEED, 0, 0, 100, 1000, 0.67, 1.0, *log_ratio)[:4] == (0, 433, 100, 133)


def test_quasi_random_shards_ranks_equally_and_resumes_exactly_on_the_same_world_size(beton):
    path, labels = beton
    loaders = [make_loader(path, rank, 2, order="quasi_random", os_cache=False) for rank in (0, 1)]
    plans = [loader.order.plan(0) for loader in loaders]  # no decoding needed to see the orders
    per_rank = STEPS * GLOBAL_BATCH // 2
    assert [len(p) for p in plans] == [per_rank, per_rank]
    assert set(plans[0]) <= set(range(22)) and set(plans[1]) <= set(range(22, 44))  # contiguous shards
    assert not np.array_equal(plans[0], np.sort(plans[0]))
    assert set(loaders[0].order.plan(1)) <= set(range(22, 44))  # shards rotate between epochs
    one_rank = make_loader(path, 0, 1, order="quasi_random", os_cache=False).order
    assert not np.array_equal(one_rank.plan(0), one_rank.plan(1))  # and their order is drawn anew
    full = list(loaders[0].micro_batches(0))
    assert np.array_equal(cat(full, "index"), plans[0])
    assert np.array_equal(cat(full, "label"), labels[plans[0]])
    resumed = list(loaders[0].micro_batches(0, start_step=1))
    assert np.array_equal(cat(resumed, "index"), plans[0][GLOBAL_BATCH // 2:])
    assert np.array_equal(cat(resumed, "mask"), cat(full, "mask")[GLOBAL_BATCH // 2:])


def test_ffcv_micro_batches_follow_the_batch_plan_and_an_empty_one_is_a_stand_in_of_no_sample(beton):
    """As the folder path (test_data_folder.py): global batch 8 over 3 ranks in micro-batches of at
    most 2 gives shares of 2, 3, 3 and rank 0's second micro-batch holds no sample: it comes as one
    image with an empty index and label (the train step weighs it 0). A micro-batch asked of 3 for
    shares of 4 is the plan's 2, so that no micro-batch runs into the next step."""
    from mto_ds.data.loader import sample_mask
    from mto_ds.data.order import rank_indices
    path, _ = beton
    first_step = list(make_loader(path, 0, 3, os_cache=False, global_batch=8, micro=2).micro_batches(1))[:2]
    assert [len(b["index"]) for b in first_step] == [2, 0]
    stand_in = first_step[1]
    assert stand_in["images"].shape == (1, 3, IMG, IMG) and len(stand_in["label"]) == 0
    assert torch.equal(stand_in["mask"][0], sample_mask(mask_fn, SEED, 1, 0))
    split = make_loader(path, 0, 2, os_cache=False, global_batch=8, micro=3)
    batches = [b["index"].tolist() for b in split.micro_batches(1)]
    assert split.micro_batch_size == 2 and [len(b) for b in batches] == [2] * 10
    assert sum(batches, []) == rank_indices(NUM_IMAGES, SEED, 1, 8, 0, 2).tolist()


def test_a_beton_without_labels_is_a_config_error_naming_the_missing_field(tmp_path):
    from ffcv.fields import RGBImageField
    from ffcv.writer import DatasetWriter
    from mto_ds.config import ConfigError

    class Images:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return (np.full((8, 8, 3), index * 40, dtype=np.uint8),)
    DatasetWriter(str(tmp_path / "images_only.beton"), {"image": RGBImageField(write_mode="raw")},
                  num_workers=1).from_indexed_dataset(Images())
    cfg = SimpleNamespace(source="ffcv", path=str(tmp_path / "images_only.beton"), num_workers=1,
                          crop_scale_min=None, crop_scale_max=1.0, order="exact", os_cache=False)
    with pytest.raises(ConfigError, match=r"bad value for 'data.path': .*images_only.beton lacks the field\(s\) "
                                          r"\['label'\]"):
        build_pretrain_loader(cfg, method="mae", img_size=IMG, seed=SEED, global_batch_size=4, micro_batch_size=4,
                              rank=0, world_size=1, mask_fn=mask_fn)


def test_an_unknown_ffcv_order_is_refused_before_the_file_is_read(tmp_path):
    from mto_ds.data.ffcv_loader import FFCVPretrainLoader
    with pytest.raises(ValueError, match="order must be one of \\('exact', 'quasi_random'\\), got 'random'"):
        FFCVPretrainLoader(tmp_path / "absent.beton", img_size=IMG, scale=(0.2, 1.0), seed=SEED, global_batch_size=16,
                           micro_batch_size=4, rank=0, world_size=1, mask_fn=mask_fn, order="random")


@pytest.mark.parametrize("num_samples", [44, 48, 100])
@pytest.mark.parametrize("world", [3, 5])
def test_quasi_random_shards_cover_the_file_once_and_hold_each_readers_share_of_every_step(num_samples, world):
    """The shards of an epoch split the file (no sample in two, none left out), and the shard a
    rank reads that epoch holds steps x its share, also where the ranks' shares differ."""
    from mto_ds.data.ffcv_loader import ShardedQuasiRandomOrder
    from mto_ds.data.order import rank_share, steps_per_epoch
    orders = [ShardedQuasiRandomOrder(7, 16, 16, rank, world) for rank in range(world)]
    for order in orders:
        order.num_samples = num_samples
    for epoch in range(world):
        shards = [order.shard(epoch) for order in orders]
        assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(num_samples)), epoch
        for rank, shard in enumerate(shards):
            start, stop = rank_share(16, world, rank)
            assert len(shard) >= steps_per_epoch(num_samples, 16) * (stop - start), (epoch, rank)


def test_quasi_random_on_ranks_that_do_not_divide_the_global_batch_reads_each_share_from_its_own_shard(beton):
    """3 ranks, global batch 16: shares of 5, 5 and 6 per step. Each shard (a contiguous part of
    the file, rotating between epochs) is sized for the share of the rank reading it, so every
    rank reads its whole share each step from samples no other rank reads that epoch."""
    from mto_ds.data.order import PAD
    path, _ = beton
    orders = [make_loader(path, rank, 3, order="quasi_random", os_cache=False).order for rank in range(3)]
    for epoch in (0, 1, 2):
        plans = [order.plan(epoch).reshape(STEPS, order.places) for order in orders]
        shares = [plan[plan != PAD] for plan in plans]
        assert [len(share) for share in shares] == [STEPS * 5, STEPS * 5, STEPS * 6]
        assert [int((plan != PAD).sum(axis=1).max()) for plan in plans] == [5, 5, 6]
        assert len(set(np.concatenate(shares))) == STEPS * GLOBAL_BATCH  # disjoint
        for order, share in zip(orders, shares):
            shard = order.shard(epoch)
            assert set(share) <= set(shard.tolist()) and np.all(np.diff(shard.astype(np.int64)) == 1)


def test_pretraining_on_ffcv_crosses_epochs_and_resumes_mid_epoch_at_the_next_sample(beton, tmp_path):
    """The trainer on a .beton: its one long-lived FFCV loader serves each epoch's exact order
    (2 steps of 16 per epoch here), and a run that dies after step 4, mid-epoch 1, resumes from
    its step-3 checkpoint and redoes step 4 on the same samples."""
    import json

    import yaml
    from conftest import read_metrics
    from run_control import Run, state

    path, _ = beton
    run_dir = tmp_path / "run"
    args = ("data.source=ffcv", f"data.path={path}", "data.num_workers=1", "train.global_batch_size=16",
            "train.micro_batch_size=8", "checkpoint.every_steps=1")
    trace = {"MTO_DS_TRACE_SAMPLES": "1"}
    Run(run_dir, *args, steps=5, env={**trace, "MTO_DS_FAULT_EXIT_AT_STEP": "4",
                                      "MTO_DS_FAULT_EXIT_RANK": "0"}).finish(expect=17)
    first_losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    resumed = Run(run_dir, *args, steps=5, env=trace).finish()
    assert "resumed from" in resumed.output and "at step 3" in resumed.output
    assert state(run_dir) == {"finished": True, "step": 5, "total_steps": 5, "reason": "completed"}

    rows = [json.loads(line) for line in (run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
    # The resume set the first try of step 4 aside, as metrics.jsonl's row.
    (first_try,) = [json.loads(line) for line in (run_dir / "samples" / "rank0.jsonl.superseded").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and first_try["step"] == 4
    (again,) = [r for r in rows if r["step"] == 4]
    assert first_try["micro_batches"] == again["micro_batches"]
    # Same samples, masks, crops and flips: the redone step logs the loss it logged before.
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert sorted(first_losses) == [1, 2, 3, 4] and losses[4] == first_losses[4]
    seed = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["seed"]
    per_step = {r["step"]: [i for micro in r["micro_batches"] for i in micro] for r in rows}
    for epoch, steps in enumerate(([1, 2], [3, 4], [5])):
        expected = rank_indices(NUM_IMAGES, seed, epoch, 16, 0, 1)[:16 * len(steps)]
        assert [i for s in steps for i in per_step[s]] == expected.tolist(), epoch


def test_a_data_path_that_is_not_a_beton_is_named_as_such(tmp_path):
    """A directory or another file given as data.path: the error says which, not FFCV's bare
    AssertionError ('file format mismatch')."""
    with pytest.raises(FileNotFoundError, match=": a directory, not an FFCV file"):
        make_loader(tmp_path, 0, 1)
    with pytest.raises(FileNotFoundError, match="missing.beton: not found"):
        make_loader(tmp_path / "missing.beton", 0, 1)
    text = tmp_path / "notes.beton"
    text.write_bytes(b"not an ffcv file" * 64)
    with pytest.raises(ValueError, match="notes.beton is not an FFCV .beton"):
        make_loader(text, 0, 1)


@pytest.mark.parametrize("cut", ["two_thirds", "inside_the_header", "last_allocation_entry"])
def test_a_truncated_beton_is_named_with_its_size_and_what_to_do(beton, tmp_path, cut):
    """A copy that did not finish: FFCV's reader failed with numpy's 'negative dimensions are not
    allowed' (or an IndexError) naming neither the file nor the cause, and a file missing only the
    end of its allocation table opened and gave a black image in place of a sample."""
    from ffcv.types import ALLOC_TABLE_TYPE

    from mto_ds.config import ConfigError

    data = beton[0].read_bytes()
    keep = {"two_thirds": len(data) * 2 // 3, "inside_the_header": 10,
            "last_allocation_entry": len(data) - ALLOC_TABLE_TYPE.itemsize}[cut]
    path = tmp_path / "cut.beton"
    path.write_bytes(data[:keep])
    with pytest.raises(ConfigError) as err:
        make_loader(path, 0, 1)
    message = str(err.value)
    assert message.startswith(f"data.path={path} ({keep} bytes) is truncated or not an FFCV file: ")
    assert message.endswith("; copy it again or rebuild it with tools/make_ffcv.py")


@pytest.fixture(scope="module")
def loader_in_one_core_process(beton):
    """What an FFCV loader built in a fresh interpreter (FFCV and numba set what they set at
    import, once per process) reports, in a process bound to one core of this machine whose torch
    was set to 2 threads, with data.num_workers=0: its worker count and torch's thread count."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with 2 cores or more")
    prelude = "import torch\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\ntorch.set_num_threads(2)\n"
    report = "'WORKERS', loader.loader.num_workers, 'THREADS', torch.get_num_threads()"
    return _build_loader_in_fresh_process(beton, prelude, num_workers=0, report=report)


def test_building_an_ffcv_loader_keeps_the_callers_torch_thread_count(loader_in_one_core_process):
    """FFCV sets torch's thread count to 1 when it is imported (ffcv.pipeline.compiler) and to
    its worker count (here 1) when a Loader is built: the first time a run builds its FFCV loader,
    its model would drop to one CPU thread."""
    (line,) = [line for line in loader_in_one_core_process if line.startswith("WORKERS")]
    assert line.split()[2:] == ["THREADS", "2"]


def test_more_decoding_threads_than_numba_has_are_refused_naming_the_key(beton):
    """A config written for a larger node (data.num_workers=32 on 16 cores): numba's bare
    'The number of threads must be between 1 and 16' named neither the key nor what to set."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    cfg = SimpleNamespace(source="ffcv", path=str(beton[0]), num_workers=limit + 1, crop_scale_min=None,
                          crop_scale_max=1.0, order="exact", os_cache=True)
    with pytest.raises(ValueError, match=rf"data.num_workers={limit + 1}: .* at most {limit} .*0 means all"):
        build_pretrain_loader(cfg, method="simmim", img_size=IMG, seed=SEED, global_batch_size=GLOBAL_BATCH,
                              micro_batch_size=MICRO, rank=0, world_size=1, mask_fn=mask_fn)


def test_zero_workers_means_the_cores_this_process_may_use(loader_in_one_core_process):
    """data.num_workers=0 is 'all cores'. FFCV counts the machine's (cpu_count), numba the
    process's (its CPU affinity: Slurm's binding, taskset, a container's cpuset), and refuses
    more: a rank bound to some of the cores failed with numba's 'The number of threads must be
    between 1 and N'. Shown on one core of this machine (numba reads its limit once)."""
    (line,) = [line for line in loader_in_one_core_process if line.startswith("WORKERS")]
    assert line.split()[:2] == ["WORKERS", "1"]


def _build_loader_in_fresh_process(beton, prelude: str, num_workers: int, report: str):
    """Build an FFCV pre-training loader in a new interpreter (FFCV and numba set what they set at
    import, once per process), after `prelude`; returns the lines printed by `print(report)`."""
    import subprocess
    import sys

    from conftest import REPO, cpu_env

    script = (
        "import os, sys\n" + prelude +
        "from types import SimpleNamespace\n"
        "from mto_ds.data import build_pretrain_loader\n"
        f"cfg = SimpleNamespace(source='ffcv', path=sys.argv[1], num_workers={num_workers}, crop_scale_min=None,\n"
        "                      crop_scale_max=1.0, order='exact', os_cache=True)\n"
        "loader = build_pretrain_loader(cfg, method='mae', img_size=32, seed=0, global_batch_size=4,\n"
        "                               micro_batch_size=4, rank=0, world_size=1, mask_fn=lambda rng: rng.random(4) < 0.5)\n"
        f"print({report})\n")
    result = subprocess.run([sys.executable, "-c", script, str(beton[0])], cwd=REPO, capture_output=True, text=True,
                            env=cpu_env(PYTHONPATH=str(REPO)), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_too_many_decoding_threads_end_pretrain_as_a_config_error_exit_2(beton, tmp_path):
    """README/ROBUSTNESS: a bad value stops the run with a message naming the key and exit code
    2. The thread limit is the rank's own, so it is found when the loader is built, not when the
    config loads; it ended as a ValueError traceback with exit code 1."""
    import numba

    from conftest import pretrain

    limit = numba.config.NUMBA_NUM_THREADS
    result = pretrain(tmp_path / "run", "data.source=ffcv", f"data.path={beton[0]}",
                      f"data.num_workers={limit + 1}", "train.steps=1", check=False,
                      env_extra={"NUMBA_NUM_THREADS": str(limit)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"mto-ds: config error: data.num_workers={limit + 1}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_count_samples_counts_each_source_as_its_loader_does_and_names_a_truncated_beton(beton, tmp_path):
    """`pretrain --dry-run` counts the data without building a loader: a .beton from its header (its
    table checked, as the loader checks it), a folder by listing it, the synthetic set from its key."""
    from mto_ds.config import ConfigError
    from mto_ds.data import count_samples
    path, labels = beton
    assert count_samples(SimpleNamespace(source="ffcv", path=str(path))) == make_loader(path, 0, 1).num_samples \
        == len(labels) == NUM_IMAGES
    folder = write_image_folder(tmp_path / "jpeg", 7, num_classes=2, size=32)
    assert count_samples(SimpleNamespace(source="folder", path=str(folder))) == 7
    assert count_samples(SimpleNamespace(source="synthetic", synthetic_images=5)) == 5
    (tmp_path / "no_images" / "class_a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="bad value for 'data.path': no image files under the class folders"):
        count_samples(SimpleNamespace(source="folder", path=str(tmp_path / "no_images")))
    cut = tmp_path / "cut.beton"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=f"data.path={cut} \\(1000 bytes\\) is truncated or not an FFCV file"):
        count_samples(SimpleNamespace(source="ffcv", path=str(cut)))
