"""SimMIM and MAE against their reference implementations (microsoft/SimMIM models/simmim.py,
facebookresearch/mae models_mae.py), values computed here from the references' formulas; the
encoder's interop with timm; MAE's forward without host reads of the mask."""
import numpy as np
import pytest
import timm
import torch

from mto_ds.models.weights import encoder_state
from mto_ds.models import create_mim_model, mask_fn_for
from mto_ds.models.simmim import patchify

IMG = 64  # a 4 x 4 grid of 16 px patches


def tiny(method, **kw):
    torch.manual_seed(0)
    return create_mim_model("vit_tiny_patch16", method, img_size=IMG, mto=None, decoder_embed_dim=64,
                            decoder_depth=1, decoder_num_heads=4, encoder_overrides={"depth": 2}, **kw).eval()


def masks(fn, n):
    return torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(n)]))


def test_patchify_orders_patches_row_major_and_pixels_as_row_column_channel_like_mae():
    """MAE's patchify ('nchpwq->nhwpqc'): a reference checkpoint's decoder_pred predicts in this order."""
    p, h, w = 4, 2, 3
    c_, y_, x_ = torch.meshgrid(torch.arange(3), torch.arange(h * p), torch.arange(w * p), indexing="ij")
    images = (c_ * 10000 + y_ * 100 + x_).float().unsqueeze(0)  # each pixel encodes (c, y, x)
    patches = patchify(images, p)[0]
    for row in range(h):
        for col in range(w):
            for i, j, c in [(0, 0, 0), (1, 2, 1), (3, 3, 2), (2, 0, 2)]:
                expected = c * 10000 + (row * p + i) * 100 + col * p + j
                assert patches[row * w + col, (i * p + j) * 3 + c] == expected


def test_mae_norm_pix_loss_uses_unbiased_variance_plus_1e6_and_only_masked_patches():
    model = tiny("mae")
    images = torch.randn(2, 3, IMG, IMG) * 3 + 1
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [1, 5, 6]] = True
    pred = torch.zeros(2, 16, 16 * 16 * 3)
    pred[~mask] = 1e3  # visible patches' predictions must not count
    target = patchify(images, 16)
    n = target.shape[-1]
    var = target.var(-1, unbiased=True)
    # A zero prediction's error on a normalised patch: mean((t - mean)^2) / (var + 1e-6).
    per_patch = target.var(-1, unbiased=False) / (var + 1e-6)
    expected = per_patch[mask].mean()
    assert model.forward_loss(images, pred, mask) == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx((n - 1) / n, rel=1e-4)  # unbiased, as torch.var in MAE


def test_simmim_l1_is_the_mean_over_masked_pixels_divided_by_input_channels():
    """SimMIM: sum(|x - x_rec| * pixel mask) / (masked pixels) / in_chans."""
    model = tiny("simmim")
    images, pred = torch.randn(2, 3, IMG, IMG), torch.randn(2, 16, 16 * 16 * 3)
    mask = masks(mask_fn_for(model, "simmim", IMG), 2)
    # Our prediction as an image: SimMIM's conv + PixelShuffle, with our rows in (i, j, c) order.
    rec = pred.view(2, 4, 4, 16, 16, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, IMG, IMG)
    pixel_mask = mask.view(2, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1).float()
    expected = ((images - rec).abs() * pixel_mask).sum() / pixel_mask.sum() / 3
    assert model.forward_loss(images, pred, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_simmim_masks_32px_blocks_at_0_6_and_the_mask_token_replaces_patches_before_position_embedding():
    model = tiny("simmim")
    mask = masks(mask_fn_for(model, "simmim", IMG), 4)
    grid = mask.view(4, 2, 2, 2, 2)  # [sample, cell row, row in cell, cell column, column in cell]
    assert torch.all(grid == grid[:, :, :1, :, :1])  # whole 2 x 2-patch cells
    assert mask.sum(1).tolist() == [12] * 4  # ceil(0.6 x 4 cells) = 3 cells
    seen = {}
    model.encoder.norm_pre.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    images = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        model.forward_encoder(images, mask)
        embedded = model.encoder.patch_embed(images)
    tokens, pos = seen["x"][:, 1:], model.encoder.pos_embed[0, 1:]
    masked_token = (model.mask_token[0, 0] + pos).expand(4, -1, -1)
    torch.testing.assert_close(tokens[mask], masked_token[mask])
    torch.testing.assert_close(tokens[~mask], (embedded + pos)[~mask])


def test_mae_state_dict_has_the_reference_layout_under_an_encoder_prefix():
    """facebookresearch/mae's MaskedAutoencoderViT keys map onto ours by prefixing 'encoder.' to the
    encoder's; its decoder_pos_embed (fixed sin-cos, recomputed here) is the one key we do not hold."""
    model = tiny("mae")
    ours = set(model.state_dict())
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    encoder = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
               "norm.bias"] + [f"blocks.{n}.{k}" for n in range(2) for k in block]
    decoder = ["mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
               "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"] + [
        f"decoder_blocks.0.{k}" for k in block]
    assert ours == {"encoder." + k for k in encoder} | set(decoder)
    assert model.decoder_pred.weight.shape == (16 * 16 * 3, 64) and model.decoder_embed.weight.shape == (64, 192)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.pos_embed" not in trainable and "decoder_pos_embed" not in trainable


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_exported_encoder_loads_into_timm_strictly_and_gives_the_same_features(method):
    model = tiny(method)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=IMG, depth=2).eval()
    reference.load_state_dict(encoder_state(model.state_dict()), strict=True)
    images = torch.randn(2, 3, IMG, IMG)
    nothing_masked = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        features = reference.forward_features(images)
        torch.testing.assert_close(model.encoder.forward_features(images), features, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_encoder(images, nothing_masked), features, rtol=1e-6, atol=1e-6)


def test_mae_forward_reads_no_mask_value_to_the_host_once_mask_fn_for_set_the_count(monkeypatch):
    """On a GPU a read of the mask (int(mask[0].sum())) waits for the queue to drain every forward."""
    model = tiny("mae")
    fn = mask_fn_for(model, "mae", IMG)
    mask, images = masks(fn, 3), torch.randn(3, 3, IMG, IMG)
    assert model.num_visible == 4  # int(16 x 0.25)
    with torch.no_grad():
        known = model(images, mask, with_stats=False)["loss_mim"]
        model.num_visible = None
        read = model(images, mask, with_stats=False)["loss_mim"]
    assert known == read

    def host_read(*args):
        raise AssertionError("a tensor was read to the host")

    for name in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    model.num_visible = 4
    with torch.no_grad():
        out = model(images, mask, with_stats=False)
    monkeypatch.undo()
    assert out["loss_mim"] == known


def test_mae_refuses_a_batch_whose_samples_keep_different_numbers_of_patches():
    model = tiny("mae")
    mask = masks(mask_fn_for(model, "mae", IMG), 2)
    uneven = mask.clone()
    uneven[1, torch.nonzero(~uneven[1])[0]] = True  # the second sample keeps 3, not 4
    images = torch.randn(2, 3, IMG, IMG)
    for num_visible in (4, None):  # from mask_fn_for, and read from the first sample
        model.num_visible = num_visible
        with pytest.raises(RuntimeError, match="same number of visible patches"):
            model(images, uneven, with_stats=False)
    model.num_visible = 3  # masks of another ratio than mask_fn_for's
    with pytest.raises(RuntimeError, match=r"3 of 16, from num_visible"):
        model(images, mask, with_stats=False)
