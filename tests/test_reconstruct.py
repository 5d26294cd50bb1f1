"""`mto-ds reconstruct`: what a checkpoint predicts for masked patches, drawn as MAE's figure, with
each image's loss_mim; the same images and seed give the same masks at every checkpoint."""
import numpy as np
import pytest
import torch
from PIL import Image

from mto_ds.cli import main
from mto_ds.config import load_config
from mto_ds.data import normalize
from mto_ds.eval.reconstruct import MASKED_GREY, masks_for, reconstruct
from mto_ds.models import build_mim_model, create_mim_model, mask_fn_for
from mto_ds.models.simmim import patchify, unpatchify

from conftest import SMALL_MAE_DECODER

MTO = {"enabled": True, "recalibrate": "early", "lambda_spa": 0.1, "lambda_e": 0.1, "lambda_r": 0.1}


def test_unpatchify_puts_every_pixel_back_where_patchify_took_it():
    images = torch.randn(2, 3, 48, 48)
    assert torch.equal(unpatchify(patchify(images, 16), 16), images)
    assert torch.equal(patchify(unpatchify(patchify(images, 8), 8), 8), patchify(images, 8))


def _model(method, norm_pix_loss=True):
    torch.manual_seed(0)
    extra = SMALL_MAE_DECODER if method == "mae" else {}
    model = create_mim_model("vit_tiny_patch16", method, img_size=64, mto=MTO, norm_pix_loss=norm_pix_loss,
                             **extra).eval()
    return model, mask_fn_for(model, method, 64)


def _images(count=3, seed=0):
    pixels = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, 64, 64), dtype=np.uint8))
    return normalize(pixels)


@pytest.mark.parametrize("method, norm_pix_loss", [("simmim", True), ("mae", True), ("mae", False)])
def test_a_prediction_equal_to_the_losss_target_reconstructs_the_image(method, norm_pix_loss, monkeypatch):
    """MAE with norm_pix_loss predicts each patch normalised by its own mean and std: drawn as
    they are, its predictions would be grey noise; with each patch's statistics put back, a
    perfect prediction is the image itself, at zero loss."""
    model, mask_fn = _model(method, norm_pix_loss)
    images = _images()
    target = patchify(images, 16)
    if method == "mae" and norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    monkeypatch.setattr(model, "predict", lambda images, mask: target)
    views = reconstruct(model, images, masks_for(mask_fn, 3, seed=0))
    torch.testing.assert_close(views["prediction"], views["image"], atol=1e-5, rtol=0)
    torch.testing.assert_close(views["pasted"], views["image"], atol=1e-5, rtol=0)
    assert views["loss"].abs().max() < 1e-6


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_the_figure_shows_the_prediction_in_masked_patches_and_the_image_in_visible_ones(method):
    """Each view from one prediction, the model's own, and each image's loss the one its training
    forward computes (MTO's recalibration of the early blocks included)."""
    model, mask_fn = _model(method)
    images = _images()
    masks = masks_for(mask_fn, 3, seed=0)
    views = reconstruct(model, images, masks)
    masked = unpatchify(masks.unsqueeze(-1).expand(-1, -1, 16 * 16 * 3).float(), 16).bool()
    assert 0 < masked.float().mean() < 1
    assert torch.equal(views["pasted"][~masked], views["image"][~masked])
    assert torch.equal(views["pasted"][masked], views["prediction"][masked])
    assert torch.equal(views["masked"][~masked], views["image"][~masked])
    assert (views["masked"][masked] == MASKED_GREY).all()
    assert not torch.allclose(views["prediction"][masked], views["image"][masked], atol=0.05)
    with torch.no_grad():
        for i in range(3):
            forward = model(images[i:i + 1], masks[i:i + 1])["loss_mim"]
            torch.testing.assert_close(views["loss"][i], forward, rtol=1e-5, atol=1e-6)
    assert views["image"].min() >= 0 and views["image"].max() <= 1
    torch.testing.assert_close(normalize((views["image"] * 255).round().to(torch.uint8)), images, atol=1e-5, rtol=0)


def test_masks_are_drawn_from_the_seed_and_the_images_position():
    mask_fn = _model("mae")[1]  # 12 of 16 patches: 1820 masks (SimMIM's 3 of 4 cells at 64 px: 4)
    first = masks_for(mask_fn, 4, seed=3)
    assert torch.equal(masks_for(mask_fn, 4, seed=3), first)
    assert torch.equal(masks_for(mask_fn, 2, seed=3), first[:2])  # the i-th mask does not depend on the count
    assert not torch.equal(masks_for(mask_fn, 4, seed=4), first)
    assert len({mask.numpy().tobytes() for mask in first}) == 4  # each image its own mask


def _run_model_losses(run, images, masks):
    """loss_mim of each image under the run's newest weights, loaded here without the CLI's code."""
    from mto_ds.models.weights import checkpoint_model_state
    model, _ = build_mim_model(load_config(run / "config.yaml", training=False))
    model.load_state_dict(checkpoint_model_state(run), strict=True)
    with torch.no_grad():
        return [model.eval()(images[i:i + 1], masks[i:i + 1])["loss_mim"].item() for i in range(len(images))]


def _printed_losses(out: str):
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    return {" ".join(name): float(loss) for loss, *name in rows}


def test_reconstruct_draws_a_runs_checkpoint_on_held_out_images_and_prints_their_losses(tiny_run, tmp_path, capsys):
    """The demo config's run (SimMIM + MTO, synthetic images): its held-out images are the
    evaluation's val split, synthetic samples past the pre-training set."""
    from mto_ds.eval.datasets import held_out_images
    out = tmp_path / "figure.png"
    assert main(["reconstruct", str(tiny_run), str(out), "--count", "3", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 3 image(s) of 64 px, step_00000002 of {tiny_run} (vit_tiny_patch16 simmim)" in printed
    assert "columns: image | masked input | prediction | prediction with the visible patches pasted back" in printed
    with Image.open(out) as figure:
        assert figure.size == (4 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    cfg = load_config(tiny_run / "config.yaml", training=False)
    held_out = held_out_images(cfg, 3)
    names = [held_out.name(i) for i in range(3)]
    assert names == [f"synthetic image {1024 + i} (seed 0)" for i in range(3)]  # past eval.num_train's 1024
    losses = _printed_losses(printed)
    images = normalize(torch.stack([held_out[i][0] for i in range(3)]))
    _, mask_fn = build_mim_model(cfg)
    expected = _run_model_losses(tiny_run, images, masks_for(mask_fn, 3, seed=5))
    assert [losses[name] for name in names] == pytest.approx(expected, abs=1e-4)
    assert losses["mean"] == pytest.approx(np.mean(expected), abs=1e-4)
    # The same seed draws the same figure; another seed other masks.
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert main(["reconstruct", str(tiny_run / "checkpoints"), str(again), "--count", "3", "--seed", "5"]) == 0
    assert main(["reconstruct", str(tiny_run), str(other), "--count", "3", "--seed", "6"]) == 0
    capsys.readouterr()
    assert again.read_bytes() == out.read_bytes() and other.read_bytes() != out.read_bytes()


def test_images_given_are_read_from_files_and_folders_and_an_undecodable_one_is_skipped_and_named(
        tiny_run, tmp_path, capsys, caplog):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.jpg", "sub/c.png", "a.jpeg"):
        Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "single.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(single)
    out = tmp_path / "figure.png"
    assert main(["reconstruct", str(tiny_run), str(out), str(single), str(folder), "--count", "4"]) == 0
    losses = _printed_losses(capsys.readouterr().out)
    # The file first, then the folder's images by path, the broken one left out: four in all.
    assert list(losses) == [str(single), str(folder / "a.jpeg"), str(folder / "b.jpg"), str(folder / "sub" / "c.png"),
                            "mean"]
    assert f"skipping undecodable image {folder / 'broken.jpg'}" in caplog.text
    with Image.open(out) as figure:
        assert figure.size == (4 * 66 + 2, 4 * 66 + 2)


def test_reconstruct_names_a_bad_path_or_output_before_loading_anything(tiny_run, tmp_path, capsys):
    checkpoint_copy = tmp_path / "step_copy"
    checkpoint_copy.mkdir()
    cases = {
        (str(tmp_path / "no-run"), str(tmp_path / "a.png")): f"{tmp_path / 'no-run'} does not exist",
        (str(tiny_run), str(tmp_path / "a.png"), str(tmp_path / "no-image.jpg")):
            f"{tmp_path / 'no-image.jpg'} does not exist",
        (str(tiny_run), str(tmp_path / "weights.pt")): f"{tmp_path / 'weights.pt'}: name a .png or .jpg to write",
        (str(tiny_run), str(tmp_path)): f"cannot write {tmp_path}: it is a directory",
        (str(checkpoint_copy), str(tmp_path / "a.png")): f"no config.yaml in {checkpoint_copy} or the two folders above",
    }
    for args, message in cases.items():
        assert main(["reconstruct", *args]) == 2, args
        assert f"mto-ds: {message}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def _run_with_config(tiny_run, run, *replacements):
    """A run directory holding tiny_run's checkpoints and its config.yaml with `replacements` made."""
    run.mkdir()
    (run / "checkpoints").symlink_to(tiny_run / "checkpoints")
    config = (tiny_run / "config.yaml").read_text()
    for old, new in replacements:
        assert old in config
        config = config.replace(old, new, 1)
    (run / "config.yaml").write_text(config)
    return run


def test_a_run_whose_evaluation_has_no_val_folder_is_told_to_name_images(tiny_run, tmp_path, capsys):
    """A folder or FFCV run reads held-out images from the evaluation's val/ ImageFolder."""
    run = _run_with_config(tiny_run, tmp_path / "run", ("source: synthetic", "source: ffcv"),
                           ("  path: null", f"  path: {tmp_path / 'train.beton'}"))
    assert main(["reconstruct", str(run), str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "evaluation with data.source=ffcv reads labelled train/ and val/ ImageFolders: set eval.path" in err
    assert "or name the images to reconstruct after the output file" in err


def test_a_run_trained_with_the_fused_gpu_kernel_is_reconstructed_without_a_gpu(tiny_run, tmp_path, capsys):
    """mto.kernel=fused needs CUDA; the statistics it computes do not change the prediction."""
    run = _run_with_config(tiny_run, tmp_path / "run", ("kernel: auto", "kernel: fused"))
    assert main(["reconstruct", str(run), str(tmp_path / "a.png"), "--count", "1"]) == 0
    assert "synthetic image 1024" in capsys.readouterr().out
