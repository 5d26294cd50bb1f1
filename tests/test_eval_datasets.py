import numpy as np
import pytest
import torch
from PIL import Image

from mto_ds.config import ConfigError, load_config
from mto_ds.data import SyntheticImages
from mto_ds.eval.datasets import FolderEvalImages, build_eval_sets, center_resize, eval_root
from mto_ds.eval.features import extract_features

# 32 px images: masks of 16 px cells (SimMIM's default 32 px cell would be the whole image).
SMALL_IMAGES = ("model.img_size=32", "model.mask_patch_size=16")


def _synthetic_cfg(**extra):
    overrides = ["model.arch=vit_tiny_patch16", *SMALL_IMAGES, "run.seed=3", "data.synthetic_images=50",
                 "data.synthetic_classes=4", "eval.num_train=20", "eval.num_val=10"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def test_synthetic_eval_sets_have_the_configured_sizes_image_size_and_classes():
    train, val = build_eval_sets(_synthetic_cfg())
    assert (len(train), len(val)) == (20, 10)
    assert train.num_classes == val.num_classes == 4
    image, label = val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 4


def test_synthetic_val_comes_after_the_pretraining_set_and_keeps_its_class_definitions():
    train, val = build_eval_sets(_synthetic_cfg())
    pretrain = SyntheticImages(50, 4, size=40, seed=3)  # as data.build_pretrain_loader renders it
    assert train.indices == list(range(20))
    assert val.indices == list(range(50, 60))
    assert [val[i][1] for i in range(10)] == [pretrain.label(i) for i in range(50, 60)]
    expected = center_resize(Image.fromarray(pretrain.image(5)), 32)
    assert torch.equal(train[5][0], expected)


def test_synthetic_val_stays_disjoint_when_the_train_split_is_larger_than_pretraining():
    train, val = build_eval_sets(_synthetic_cfg(**{"eval.num_train": 80}))
    assert not set(train.indices) & set(val.indices)


def test_center_resize_keeps_the_central_square():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 50:150] = 255  # a white centre square between black side bands
    out = center_resize(Image.fromarray(pixels), 16)
    assert out.shape == (3, 16, 16) and out.min() == 255


def _image_folder(root, counts):
    for split, per_class in counts.items():
        for name, count in per_class.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 24), (i * 10, 0, 0)).save(root / split / name / f"{i}.png")


def test_folder_eval_sets_read_train_and_val_splits_and_subsample_to_the_configured_size(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 5, "dog": 6}, "val": {"cat": 2, "dog": 2}})
    cfg = load_config(None, ["model.arch=vit_tiny_patch16", *SMALL_IMAGES, "data.source=folder",
                             f"data.path={tmp_path / 'train'}", "eval.num_train=7", "eval.num_val=100"])
    train, val = build_eval_sets(cfg)  # ImageNet's layout: the parent of data.path holds both splits
    assert (len(train), len(val)) == (7, 4)
    other_seed = build_eval_sets(load_config(None, [*cfg_args(tmp_path), "run.seed=5"]))[0]
    assert [train.source.files[i] for i in train.positions] == \
        [other_seed.source.files[i] for i in other_seed.positions]  # one evaluation set for every seed
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert [val[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert train[0][0].shape == (3, 32, 32)


def cfg_args(root):
    return ["model.arch=vit_tiny_patch16", *SMALL_IMAGES, "data.source=folder",
            f"data.path={root / 'train'}", "eval.num_train=7", "eval.num_val=100"]


def test_a_class_folder_missing_from_val_keeps_the_train_label_of_every_other_class(tmp_path):
    # val/ without "dog": listed on its own, "fox" would become label 1, which is "dog" in train/.
    _image_folder(tmp_path, {"train": {"cat": 2, "dog": 2, "fox": 2}, "val": {"cat": 1, "fox": 2}})
    train, val = build_eval_sets(load_config(None, cfg_args(tmp_path)))
    assert train.classes == val.classes == ["cat", "dog", "fox"]
    assert train.num_classes == val.num_classes == 3
    assert [val[i][1] for i in range(3)] == [0, 2, 2]


def test_a_val_class_folder_that_train_lacks_is_refused_naming_it(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "emu": 1, "dog": 1}})
    with pytest.raises(ValueError, match=r"/val has class folders that the training split lacks: emu"):
        build_eval_sets(load_config(None, cfg_args(tmp_path)))


def test_folder_without_a_val_split_fails_naming_it(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 1, "dog": 1}})
    cfg = load_config(None, ["data.source=folder", f"data.path={tmp_path / 'train'}"])
    with pytest.raises(FileNotFoundError, match="val"):
        build_eval_sets(cfg)


def test_pretraining_on_a_root_holding_train_and_val_is_refused_so_val_images_stay_unseen(tmp_path):
    _image_folder(tmp_path, {"train": {"cat": 1}, "val": {"cat": 1}})
    with pytest.raises(ConfigError, match=f"set data.path={tmp_path / 'train'}"):
        load_config(None, ["data.source=folder", f"data.path={tmp_path}"])


def test_ffcv_runs_evaluate_on_the_folders_under_eval_path(tmp_path):
    _image_folder(tmp_path / "imagenet", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    ffcv = ["data.source=ffcv", "data.path=train.beton", "eval.every_epochs=1"]
    with pytest.raises(ConfigError, match="eval.path"):  # before any compute, not at the first evaluation
        load_config(None, ffcv)
    with pytest.raises(ConfigError, match="eval.path"):  # the initial encoder's evaluation reads them too
        load_config(None, ["data.source=ffcv", "data.path=train.beton", "eval.at_start=true"])
    cfg = load_config(None, [*ffcv, *SMALL_IMAGES, f"eval.path={tmp_path / 'imagenet'}"])
    train, val = build_eval_sets(cfg)
    assert (len(train), len(val), train.classes) == (4, 2, ["cat", "dog"])



def test_eval_path_is_what_a_synthetic_pretraining_run_is_evaluated_on_when_it_is_set(tmp_path):
    """eval.path was silently ignored with data.source=synthetic: `mto-ds eval` of the demo on a
    folder of real images reported the synthetic set's accuracy instead."""
    _image_folder(tmp_path / "imagenet", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    cfg = load_config(None, ["data.source=synthetic", *SMALL_IMAGES, f"eval.path={tmp_path / 'imagenet'}"])
    train, val = build_eval_sets(cfg)
    assert (len(train), len(val), train.classes) == (4, 2, ["cat", "dog"])


# Class i is a flat colour whose channel i dominates, so a feature (the mean colour) names its label.
CLASS_COLOURS = {"a_red": (220, 30, 30), "b_green": (30, 220, 30), "c_blue": (30, 30, 220)}


def _jpeg_folder(root, per_class):
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), colour).save(root / name / f"img{i}.JPEG", format="JPEG")


def _broken_files(root):
    """An empty file and one of garbage bytes, both named as ImageNet names its JPEGs."""
    empty, garbage = root / "a_red" / "img1_empty.JPEG", root / "b_green" / "img0_garbage.JPEG"
    empty.write_bytes(b"")
    garbage.write_bytes(b"\x00\x17 not a JPEG at all " * 8)
    return empty, garbage


def _warnings_naming(caplog, path):
    return [r for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]


def test_folder_eval_sets_leave_out_undecodable_images_and_name_each_in_one_warning(tmp_path, caplog):
    _jpeg_folder(tmp_path / "train", 2)
    _jpeg_folder(tmp_path / "val", 3)
    broken = _broken_files(tmp_path / "val")
    cfg = load_config(None, ["model.arch=vit_tiny_patch16", *SMALL_IMAGES, "data.source=folder",
                             f"data.path={tmp_path / 'train'}", "eval.num_train=100", "eval.num_val=100"])
    _, val = build_eval_sets(cfg)
    assert len(val) == 11  # 9 images and the 2 broken files: listed as samples, as pre-training lists them
    items = [val[i] for i in range(len(val))]
    assert [val.source.files[i] for i, item in enumerate(items) if item is None] == \
        sorted(broken)  # left out, not replaced by a black image
    assert [item[1] for item in items if item is not None] == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # Batches of 4 with a hole at positions 2 and 5: labels stay with their images' features.
    mean_colour = lambda images: images.mean(dim=(2, 3))  # noqa: E731
    features, labels = extract_features(mean_colour, val, "cpu", batch_size=4)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert features.argmax(dim=1).tolist() == labels.tolist()
    assert [len(_warnings_naming(caplog, path)) for path in broken] == [1, 1]  # once per file, not per pass


def test_a_batch_of_only_undecodable_images_is_left_out_and_a_set_of_only_those_fails_saying_so(tmp_path):
    """A batch where nothing decodes still runs its forward on a stand-in (every rank runs the
    same number of forwards, collectives under ZeRO-3) and contributes nothing; a set where
    nothing decodes is an error."""
    _jpeg_folder(tmp_path, 1)
    broken = _broken_files(tmp_path)
    images = FolderEvalImages(tmp_path, 32, max_images=100, seed=0)
    good = [i for i, path in enumerate(images.source.files) if path not in broken]
    images.positions = good[:2] + [images.source.files.index(path) for path in broken]
    calls = []

    def mean_colour(batch):
        calls.append(len(batch))
        return batch.mean(dim=(2, 3))
    features, labels = extract_features(mean_colour, images, "cpu", batch_size=2)
    assert calls == [2, 1] and len(features) == 2
    assert labels.tolist() == [images.source.labels[i] for i in good[:2]]

    images.positions = images.positions[2:]
    with pytest.raises(RuntimeError, match="none of the 2 images of the evaluation set could be decoded"):
        extract_features(mean_colour, images, "cpu", batch_size=2)


def test_folder_eval_sets_list_classes_and_labels_as_torchvision_imagefolder_did(tmp_path):
    from torchvision.datasets import ImageFolder
    _jpeg_folder(tmp_path, 2)
    _broken_files(tmp_path)
    (tmp_path / "c_blue" / "notes.txt").write_text("not a sample")
    ours, theirs = FolderEvalImages(tmp_path, 32, max_images=100, seed=0), ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes == sorted(CLASS_COLOURS)
    assert list(zip(map(str, ours.source.files), ours.source.labels)) == theirs.samples


def test_folder_eval_images_convert_odd_files_as_pretraining_does(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "cat" / "clear.png")  # fully transparent
    image, label = FolderEvalImages(tmp_path, 16, max_images=1, seed=0)[0]
    assert label == 0 and image.min() == 255  # composited over white (read_rgb), not its hidden red


@pytest.mark.parametrize("asks, key", [("eval.every_epochs=1", "eval.every_epochs"),
                                       ("eval.at_start=true", "eval.at_start")])
def test_evaluation_during_pretraining_without_its_folders_is_refused_before_the_first_step(tmp_path, asks, key):
    """README: a bad value fails before any work. The missing val/ of a folder run with
    eval.every_epochs was found at the first evaluation, after a whole epoch of training; the
    error names the key that asked for an evaluation."""
    import json

    from conftest import pretrain

    _image_folder(tmp_path / "data", {"train": {"cat": 8, "dog": 8}})
    run = tmp_path / "run"
    result = pretrain(run, "data.source=folder", f"data.path={tmp_path / 'data' / 'train'}", "data.num_workers=0",
                      asks, "train.epochs=1", "train.global_batch_size=8", "model.img_size=32",
                      "model.mask_patch_size=16", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"mto-ds: config error: bad value for '{key}'" in result.stderr
    assert str(tmp_path / "data" / "val") in result.stderr and "Traceback" not in result.stderr
    assert json.loads((run / "state.json").read_text())["step"] is None
    assert not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("val, named", [
    ("flat", "has no class folders"),
    ("foreign class", "class folders that the training split lacks: fox"),
])
def test_a_val_folder_that_cannot_be_evaluated_is_refused_before_the_first_step(tmp_path, val, named):
    """Only the folders' existence was checked at set-up: a flat val/ (as ImageNet's validation
    set is distributed) or one with a class train/ lacks ended the run in a traceback at its first
    evaluation, an epoch of training later. The evaluation sets are built at set-up now."""
    import json

    from conftest import pretrain

    _image_folder(tmp_path / "data", {"train": {"cat": 8, "dog": 8}})
    if val == "flat":
        (tmp_path / "data" / "val").mkdir()
        Image.new("RGB", (20, 24)).save(tmp_path / "data" / "val" / "0.png")
    else:
        _image_folder(tmp_path / "data", {"val": {"cat": 2, "fox": 2}})
    run = tmp_path / "run"
    result = pretrain(run, "data.source=folder", f"data.path={tmp_path / 'data' / 'train'}", "data.num_workers=0",
                      "eval.every_epochs=1", "train.epochs=1", "train.global_batch_size=8", "model.img_size=32",
                      "model.mask_patch_size=16", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "mto-ds: config error: bad value for 'eval.every_epochs'" in result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert json.loads((run / "state.json").read_text())["step"] is None


def test_the_default_evaluation_root_is_the_parent_of_data_path_as_named_not_of_its_link_target(tmp_path):
    """IMAGENET/train linked to a staged copy: the evaluation reads IMAGENET/val, not a val/ that
    happens to sit beside the copy (resolving the link read that one)."""
    _image_folder(tmp_path / "staged", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1}})
    _image_folder(tmp_path / "imagenet", {"val": {"cat": 1, "dog": 1}})
    (tmp_path / "imagenet" / "train").symlink_to(tmp_path / "staged" / "train")
    cfg = load_config(None, ["model.arch=vit_tiny_patch16", *SMALL_IMAGES, "data.source=folder",
                             f"data.path={tmp_path / 'imagenet' / 'train'}"])
    assert eval_root(cfg) == tmp_path / "imagenet"
    train, val = build_eval_sets(cfg)
    assert (len(train), len(val)) == (4, 2)


def test_a_subset_smaller_than_the_split_takes_every_class_in_turn_before_a_second_image_of_any(tmp_path):
    # ImageNet-1k with eval.num_train=1024: a uniform draw leaves about a third of the classes
    # without a training image, so k-NN and the probe cannot predict them at all.
    counts = {"a": 40, "b": 3, "c": 10, "d": 1, "e": 25}
    _image_folder(tmp_path, {"train": counts})
    images = FolderEvalImages(tmp_path / "train", 16, max_images=9, seed=0)
    per_class = np.bincount([images.source.labels[i] for i in images.positions], minlength=5)
    # Two rounds over the five classes (d has one image), then the draw stops at 9.
    assert sorted(per_class.tolist()) == [1, 2, 2, 2, 2]
    assert per_class[3] == 1
    assert images.positions == sorted(images.positions)  # read in directory order
    again = FolderEvalImages(tmp_path / "train", 16, max_images=9, seed=0)
    assert again.positions == images.positions
