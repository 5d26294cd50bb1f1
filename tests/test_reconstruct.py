"""`mto-ds reconstruct`'s pieces: what a model predicts for masked patches, drawn as MAE's figure,
with each image's loss_mim; the same seed gives the same masks. The command on a run's checkpoint:
tests/test_cli.py (which trains the run those tests share)."""
import numpy as np
import pytest
import torch

from mto_ds.data import normalize
from mto_ds.data.loader import batch_masks
from mto_ds.eval.reconstruct import MASKED_GREY, reconstruct
from mto_ds.models import create_mim_model, mask_fn_for
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
    views = reconstruct(model, images, batch_masks(mask_fn, 0, 0, range(3)))
    torch.testing.assert_close(views["prediction"], views["image"], atol=1e-5, rtol=0)
    torch.testing.assert_close(views["pasted"], views["image"], atol=1e-5, rtol=0)
    assert views["loss"].abs().max() < 1e-6


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_the_figure_shows_the_prediction_in_masked_patches_and_the_image_in_visible_ones(method):
    """Each view from one prediction, the model's own, and each image's loss the one its training
    forward computes (MTO's recalibration of the early blocks included)."""
    model, mask_fn = _model(method)
    images = _images()
    masks = batch_masks(mask_fn, 0, 0, range(3))
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
    first = batch_masks(mask_fn, 3, 0, range(4))
    assert torch.equal(batch_masks(mask_fn, 3, 0, range(4)), first)
    assert torch.equal(batch_masks(mask_fn, 3, 0, range(2)), first[:2])  # the i-th mask does not depend on the count
    assert not torch.equal(batch_masks(mask_fn, 4, 0, range(4)), first)
    assert len({mask.numpy().tobytes() for mask in first}) == 4  # each image its own mask
