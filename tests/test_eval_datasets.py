import numpy as np
import pytest
import torch
from PIL import Image

from mto_ds.config import ConfigError, load_config
from mto_ds.data import SyntheticImages
from mto_ds.eval.datasets import build_eval_sets, center_resize


def _synthetic_cfg(**extra):
    overrides = ["model.arch=vit_tiny_patch16", "model.img_size=32", "run.seed=3", "data.synthetic_images=50",
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
    cfg = load_config(None, ["model.arch=vit_tiny_patch16", "model.img_size=32", "data.source=folder",
                             f"data.path={tmp_path / 'train'}", "eval.num_train=7", "eval.num_val=100"])
    train, val = build_eval_sets(cfg)  # ImageNet's layout: the parent of data.path holds both splits
    assert (len(train), len(val)) == (7, 4)
    other_seed = build_eval_sets(load_config(None, [*cfg_args(tmp_path), "run.seed=5"]))[0]
    assert [train.folder.samples[i] for i in train.positions] == \
        [other_seed.folder.samples[i] for i in other_seed.positions]  # one evaluation set for every seed
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert [val[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert train[0][0].shape == (3, 32, 32)


def cfg_args(root):
    return ["model.arch=vit_tiny_patch16", "model.img_size=32", "data.source=folder",
            f"data.path={root / 'train'}", "eval.num_train=7", "eval.num_val=100"]


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
    cfg = load_config(None, [*ffcv, "model.img_size=32", f"eval.path={tmp_path / 'imagenet'}"])
    train, val = build_eval_sets(cfg)
    assert (len(train), len(val), train.classes) == (4, 2, ["cat", "dog"])
