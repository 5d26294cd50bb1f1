import json

import pytest
import torch
from PIL import Image

from mto_ds.config import load_config
from mto_ds.eval import evaluate, load_encoder_weights, run_eval
from mto_ds.models import create_encoder


# 16 px mask cells: SimMIM's default 32 px cell would be the whole 32 px image, which validate refuses.
COMMON = ["deepspeed.config=ds_configs/cpu_zero2.json", "model.arch=vit_tiny_patch16", "model.img_size=32",
          "model.mask_patch_size=16", "data.num_workers=0"]


def _percentages_of(num_val, result) -> bool:
    """Each value a percentage of `num_val` validation images: 100 x correct / num_val, not a
    fraction in [0, 1] nor a count."""
    return all(0.0 <= v <= 100.0 and abs(v * num_val / 100 - round(v * num_val / 100)) < 1e-6 for v in result.values())


def _solid_colour_folder(root):
    """Three classes of flat colours with a little jitter: mean colour separates them exactly.
    Each split also holds an empty and a garbage file named as images, as real data sets do."""
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, count in (("train", 8), ("val", 4)):
        for name, (r, g, b) in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (36, 36), (r + i, g - i, b + 2 * i)).save(root / split / name / f"{i}.png")
        (root / split / "red" / "1_empty.png").write_bytes(b"")
        (root / split / "blue" / "2_garbage.JPEG").write_bytes(b"not an image" * 10)


def test_evaluate_is_perfect_when_features_separate_the_classes_and_skips_broken_files(tmp_path, caplog):
    _solid_colour_folder(tmp_path)
    cfg = load_config(None, COMMON + ["data.source=folder", f"data.path={tmp_path / 'train'}", "eval.knn_k=5"])
    mean_colour = lambda images: images.mean(dim=(2, 3))  # noqa: E731
    assert evaluate(mean_colour, cfg, torch.device("cpu")) == {"knn_top1": 100.0, "linear_top1": 100.0}
    assert sum("undecodable" in r.getMessage() for r in caplog.records) == 4  # 2 files in each split


def test_run_eval_with_a_finetune_completes_on_a_folder_holding_broken_files(tmp_path):
    _solid_colour_folder(tmp_path)
    torch.manual_seed(3)
    torch.save(create_encoder("vit_tiny_patch16", img_size=32).state_dict(), tmp_path / "encoder.pt")
    cfg = load_config(None, COMMON + ["data.source=folder", f"data.path={tmp_path / 'train'}", "eval.knn_k=5",
                                      "eval.linear_epochs=5", "eval.finetune_batch_size=5"])
    result = run_eval(cfg, str(tmp_path / "encoder.pt"), finetune_epochs=1, device=torch.device("cpu"))
    assert set(result) == {"knn_top1", "linear_top1", "finetune_top1"}
    assert _percentages_of(12, result)  # the 12 decodable validation images of 3 classes


def test_evaluate_returns_percentages_and_leaves_a_training_encoder_in_train_mode():
    cfg = load_config(None, COMMON + ["data.synthetic_images=64", "data.synthetic_classes=4",
                                      "eval.num_train=32", "eval.num_val=16"])
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=32).train()
    result = evaluate(encoder, cfg, torch.device("cpu"))
    assert set(result) == {"knn_top1", "linear_top1"}
    assert _percentages_of(16, result)
    assert encoder.training


def test_load_encoder_weights_accepts_prefixed_state_dicts_and_names_mismatched_keys(tmp_path):
    torch.manual_seed(1)
    trained = create_encoder("vit_tiny_patch16", img_size=32)
    path = tmp_path / "model.pt"
    torch.save({"model": {f"encoder.{k}": v for k, v in trained.state_dict().items()}}, path)
    fresh = create_encoder("vit_tiny_patch16", img_size=32)
    load_encoder_weights(fresh, str(path))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())

    broken = {k: v for k, v in trained.state_dict().items() if k != "norm.weight"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="norm.weight"):
        load_encoder_weights(fresh, str(tmp_path / "broken.pt"))


def test_run_eval_on_a_saved_encoder_reports_knn_linear_and_finetune(tmp_path):
    torch.manual_seed(2)
    torch.save(create_encoder("vit_tiny_patch16", img_size=32).state_dict(), tmp_path / "encoder.pt")
    cfg = load_config(None, COMMON + ["data.synthetic_images=64", "data.synthetic_classes=4",
                                      "eval.num_train=32", "eval.num_val=16", "eval.finetune_batch_size=16"])
    result = run_eval(cfg, str(tmp_path / "encoder.pt"), finetune_epochs=1, device=torch.device("cpu"))
    assert set(result) == {"knn_top1", "linear_top1", "finetune_top1"}
    # A fine-tune batch larger than the training images is refused before the probes run.
    cfg = load_config(None, COMMON + ["data.synthetic_images=64", "data.synthetic_classes=4",
                                      "eval.num_train=32", "eval.num_val=16"])
    with pytest.raises(ValueError, match="eval.finetune_batch_size=64 is more than the 32 training images"):
        run_eval(cfg, str(tmp_path / "encoder.pt"), finetune_epochs=1, device=torch.device("cpu"))
    assert _percentages_of(16, result)
    json.dumps(result)  # what the CLI and final_eval.json write


def test_eval_section_settings_reach_the_probes(monkeypatch, tmp_path):
    import mto_ds.eval.run as run_module
    seen = {}
    real_extract, real_probe = run_module.extract_features, run_module.linear_probe_top1

    def extract(*args, **kwargs):
        seen["pooling"], seen["batch_size"] = kwargs["pooling"], kwargs["batch_size"]
        return real_extract(*args, **kwargs)

    def probe(*args, **kwargs):
        seen["linear"] = (kwargs["epochs"], kwargs["lr"], kwargs["seed"])
        return real_probe(*args, **kwargs)

    def knn(*args, **kwargs):
        seen["knn"] = (kwargs["k"], kwargs["temperature"])
        return 0.0

    def finetune(*args, **kwargs):
        seen["finetune"] = {key: kwargs[key] for key in ("epochs", "pooling", "batch_size", "lr", "layer_decay", "seed")}
        return 0.0
    monkeypatch.setattr(run_module, "extract_features", extract)
    monkeypatch.setattr(run_module, "linear_probe_top1", probe)
    monkeypatch.setattr(run_module, "knn_top1", knn)
    monkeypatch.setattr(run_module, "finetune_top1", finetune)
    cfg = load_config(None, COMMON + ["data.synthetic_images=32", "data.synthetic_classes=4", "eval.num_train=16",
                                      "eval.num_val=8", "eval.pooling=cls", "eval.batch_size=5",
                                      "eval.linear_epochs=3", "eval.linear_lr=0.5", "eval.knn_k=7",
                                      "eval.knn_temperature=0.2", "run.seed=9", "eval.finetune_batch_size=4",
                                      "eval.finetune_lr=0.003", "eval.finetune_layer_decay=0.6"])
    torch.manual_seed(0)
    evaluate(create_encoder("vit_tiny_patch16", img_size=32), cfg, torch.device("cpu"))
    assert seen == {"pooling": "cls", "batch_size": 5, "linear": (3, 0.5, 9), "knn": (7, 0.2)}
    # `mto-ds eval --finetune-epochs`: the fine-tune's settings come from the same section.
    torch.save(create_encoder("vit_tiny_patch16", img_size=32).state_dict(), tmp_path / "encoder.pt")
    run_module.run_eval(cfg, str(tmp_path / "encoder.pt"), finetune_epochs=2, device=torch.device("cpu"))
    assert seen["finetune"] == {"epochs": 2, "pooling": "cls", "batch_size": 4, "lr": 0.003, "layer_decay": 0.6,
                                "seed": 9}


def test_evaluation_settings_name_the_folders_read_when_synthetic_pretraining_is_evaluated_on_eval_path(tmp_path):
    # The cached-evaluation key must say which images were read: with eval.path set, those are
    # its folders (class-balanced subsets), not the synthetic set's counts.
    from mto_ds.eval.run import evaluation_settings
    torch.save({}, tmp_path / "none.pt")
    cfg = load_config(None, ["data.source=synthetic", f"eval.path={tmp_path}"])
    images = evaluation_settings(cfg, str(tmp_path / "none.pt"), device=torch.device("cpu"))["images"]
    assert images == {"source": "synthetic", "root": str(tmp_path.resolve()), "subset": "class-balanced"}
    plain = evaluation_settings(load_config(None, ["data.source=synthetic"]), str(tmp_path / "none.pt"),
                                device=torch.device("cpu"))
    assert set(plain["images"]) == {"source", "synthetic_images", "synthetic_classes"}
    # What only pre-training's evaluations read is not a setting of run_eval's numbers: a row cached
    # before eval.reconstructions existed is still of the same settings.
    drawing = load_config(None, ["data.source=synthetic", "eval.reconstructions=0", "eval.every_epochs=3"])
    assert evaluation_settings(drawing, str(tmp_path / "none.pt"), device=torch.device("cpu")) == plain
    assert not {"every_epochs", "at_start", "reconstructions"} & set(plain["eval"])
    # Nor where pre-training began: the checkpoint's weights are what is evaluated, and every row
    # cached before model.init_from existed would otherwise be evaluated again.
    begun = load_config(None, ["data.source=synthetic", f"model.init_from={tmp_path / 'none.pt'}"])
    assert evaluation_settings(begun, str(tmp_path / "none.pt"), device=torch.device("cpu")) == plain
    assert "init_from" not in plain["model"]


def test_load_encoder_weights_takes_the_encoder_out_of_whole_mim_model_checkpoints(tmp_path):
    # facebookresearch/mae's main_pretrain saves {"model": encoder and decoder keys side by side,
    # "args": an argparse.Namespace, ...}; our own MIM model's state_dict has encoder.* and decoder
    # keys. `mto-ds eval` reads the encoder out of both.
    import argparse
    from mto_ds.models import create_mim_model
    torch.manual_seed(3)
    mae = create_mim_model("vit_tiny_patch16", "mae", img_size=32)
    ours = mae.state_dict()
    reference = {k.removeprefix("encoder."): v for k, v in ours.items()}
    reference["decoder_pos_embed"] = torch.zeros(1, 5, 512)
    torch.save({"model": reference, "args": argparse.Namespace(model="mae_vit_tiny"), "epoch": 3},
               tmp_path / "checkpoint-3.pth")
    torch.save(ours, tmp_path / "ours.pt")
    for name in ("checkpoint-3.pth", "ours.pt"):
        fresh = create_encoder("vit_tiny_patch16", img_size=32)
        load_encoder_weights(fresh, str(tmp_path / name))
        assert all(torch.equal(v, mae.encoder.state_dict()[k]) for k, v in fresh.state_dict().items()), name


def test_load_encoder_weights_names_tensors_of_another_shape_in_a_value_error(tmp_path):
    """Weights of another model.img_size (or arch) raised torch's RuntimeError, one line per tensor."""
    torch.save(create_encoder("vit_tiny_patch16", img_size=64).state_dict(), tmp_path / "at64.pt")
    with pytest.raises(ValueError) as err:
        load_encoder_weights(create_encoder("vit_tiny_patch16", img_size=32), str(tmp_path / "at64.pt"))
    assert "(model.arch, model.img_size): 1 tensors differ in shape: pos_embed [1, 17, 192] there, " \
           "[1, 5, 192] here" in str(err.value)
    assert "\n" not in str(err.value)


def test_run_eval_fails_on_missing_evaluation_folders_before_it_reads_the_weights(tmp_path, monkeypatch):
    """A ViT-H checkpoint takes minutes to load from a shared file system; an evaluation of an FFCV
    run without eval.path, or with folders that are not there, must fail before that, naming the key."""
    import mto_ds.eval.run as run_module
    loaded = []
    monkeypatch.setattr(run_module, "load_encoder_state", lambda checkpoint: loaded.append(checkpoint))
    ffcv = load_config(None, COMMON + ["data.source=ffcv", "data.path=train.beton"])
    with pytest.raises(ValueError, match="set eval.path"):
        run_eval(ffcv, str(tmp_path / "encoder.pt"), device=torch.device("cpu"))
    missing = load_config(None, COMMON + ["data.source=ffcv", "data.path=train.beton", f"eval.path={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="not found: .*train"):
        run_eval(missing, str(tmp_path / "encoder.pt"), device=torch.device("cpu"))
    assert loaded == []
