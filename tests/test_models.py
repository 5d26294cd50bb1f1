"""SimMIM and MAE as their reference implementations (facebookresearch/mae, microsoft/SimMIM)
build them: masks, position embeddings, initialisation, weight-decay groups, clipping."""
import math

import numpy as np
import pytest
import torch

from mto_ds.config import load_config
from mto_ds.engine.builder import deepspeed_config, learning_rate, param_groups, plan_batch
from mto_ds.models import create_mim_model
from mto_ds.models.masking import build_mask_fn
from mto_ds.models.vit import sincos_pos_embed


@pytest.mark.parametrize("method, img, patch, ratio, masked_patches", [
    ("simmim", 224, 16, 0.6, 30 * 4),    # SimMIM: ceil(0.6 x 49) = 30 cells of 2 x 2 patches
    ("simmim", 224, 14, 0.6, 39 * 4),    # ViT-/14 with 28 px cells: ceil(0.6 x 64) = 39
    ("mae", 224, 16, 0.75, 147),         # MAE: 196 - int(196 x 0.25) = 147
    ("mae", 224, 16, 0.6, 118),          # 196 - int(196 x 0.4) = 196 - 78
])
def test_mask_counts_are_the_references(method, img, patch, ratio, masked_patches):
    fn = build_mask_fn(method, img, patch, ratio)
    for seed in range(3):
        assert int(fn(np.random.default_rng(seed)).sum()) == masked_patches


@pytest.mark.parametrize("method, img, ratio, masked_patches", [
    ("simmim", 160, 0.8, 80),  # ceil(25 x 0.8) = 20 cells (MAE's rule would keep int(4.999...) = 4: 21)
    ("mae", 160, 0.8, 81),     # 100 - int(100 x (1 - 0.8)) = 100 - int(19.999...) = 81, as MAE's code gives
])
def test_mask_counts_follow_the_references_float_arithmetic(method, img, ratio, masked_patches):
    fn = build_mask_fn(method, img, 16, ratio)
    assert int(fn(np.random.default_rng(0)).sum()) == masked_patches


def test_simmim_masks_whole_cells_and_every_mask_is_drawn_anew():
    """SimMIM masks cells of 2 x 2 patches (32 px at /16); both methods draw each sample's mask
    from its own generator."""
    simmim, mae = build_mask_fn("simmim", 224, 16, 0.6), build_mask_fn("mae", 224, 16, 0.75)
    for seed in range(5):
        cells = simmim(np.random.default_rng(seed)).reshape(7, 2, 7, 2)  # [cell row, row in cell, cell col, col]
        assert (cells == cells[:, :1, :, :1]).all()
    for fn in (simmim, mae):
        masks = {fn(np.random.default_rng(seed)).tobytes() for seed in range(4)}
        assert len(masks) == 4
    with pytest.raises(ValueError, match="mask patch 24 must be a multiple of the patch 16"):
        build_mask_fn("simmim", 96, 16, 0.6, mask_patch_size=24)
    with pytest.raises(ValueError, match="divide the image size 224"):
        build_mask_fn("simmim", 224, 16, 0.6, mask_patch_size=64)


def test_sincos_position_embedding_is_maes_column_half_first():
    dim, grid = 16, 4
    emb = sincos_pos_embed(dim, grid)[0]
    assert torch.equal(emb[0], torch.zeros(dim))  # CLS
    patches = emb[1:].view(grid, grid, dim)      # row-major: [row, column]
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    column, row = 2, 3
    first = torch.cat([torch.sin(column * omega), torch.cos(column * omega)]).float()
    second = torch.cat([torch.sin(row * omega), torch.cos(row * omega)]).float()
    assert torch.allclose(patches[row, column], torch.cat([first, second]), atol=1e-6)


def test_mae_initialises_encoder_and_decoder_as_mae_does():
    torch.manual_seed(0)
    model = create_mim_model("vit_base_patch16", "mae", img_size=224)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = math.sqrt(6 / (module.in_features + module.out_features))  # xavier-uniform
            assert 0.95 * bound < module.weight.abs().max() <= bound, name
            assert module.bias is None or not module.bias.any(), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and not module.bias.any(), name
    proj = model.encoder.patch_embed.proj.weight
    assert proj.abs().max() <= math.sqrt(6 / (proj[0].numel() + proj.shape[0]))
    for token in (model.encoder.cls_token, model.mask_token):
        assert 0.015 < token.std() < 0.025


@pytest.mark.parametrize("method, undecayed", [
    ("simmim", {"encoder.pos_embed", "encoder.cls_token"}),  # SimMIM's ViT.no_weight_decay()
    ("mae", set()),                                          # MAE: 1-D parameters only (pos_embed is frozen)
])
def test_weight_decay_skips_what_the_reference_skips(method, undecayed):
    model = create_mim_model("vit_tiny_patch16", method, img_size=64)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    skipped = {names[id(p)] for p in no_decay["params"] if p.ndim > 1}
    assert skipped == undecayed and no_decay["weight_decay"] == 0.0
    assert "mask_token" in {names[id(p)] for p in decay["params"]}
    # Norms and biases are never decayed, and a frozen parameter (MAE's sin-cos position
    # embeddings) is in neither group.
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05
    grouped = [p for group in (decay, no_decay) for p in group["params"]]
    assert all(p.requires_grad for p in grouped)
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("config, clipping", [("configs/vit_l_mae.yaml", 0.0), ("configs/vit_l_simmim.yaml", 5.0)])
def test_gradient_clipping_follows_the_recipe(config, clipping):
    cfg = load_config(config, ["data.source=synthetic"])
    ds = deepspeed_config(cfg, plan_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size, 64))
    assert ds["gradient_clipping"] == clipping
    # Without clipping nothing reads DeepSpeed's gradient norm, so it is not computed.
    assert ds["zero_optimization"].get("compute_grad_norm", True) == (clipping > 0)


def test_learning_rate_warms_up_linearly_to_the_peak_then_follows_half_a_cosine_to_the_floor():
    lrs = [learning_rate(t, total_steps=10, warmup_steps=4, peak=1.0, min_ratio=0.1) for t in range(10)]
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # no step at LR 0; step 4 starts the cosine
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs[4:] == pytest.approx(cosine)
    assert learning_rate(10, 10, 4, 1.0, 0.1) == pytest.approx(0.1)  # the floor, after the last step
    assert learning_rate(13, 10, 4, 1.0, 0.1) == pytest.approx(0.1)  # and it stays there
    assert [learning_rate(t, 3, 0, 2.0, 0.0) for t in range(3)] == pytest.approx([2.0, 1.5, 0.5])  # no warm-up


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_a_bf16_model_takes_float32_pixels_and_keeps_them_as_its_full_precision_target(method):
    """As under DeepSpeed bf16: the weights are bf16, the train step passes float32 pixels. The
    encoder sees them rounded to bf16; the reconstruction target must not be (the references
    compute it from float32 images)."""
    torch.manual_seed(0)
    model = create_mim_model("vit_tiny_patch16", method, img_size=64, mto=None).to(torch.bfloat16)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.from_numpy(np.stack([build_mask_fn(method, 64, 16)(np.random.default_rng(i)) for i in range(2)]))
    exact = model(images, mask, with_stats=False)["loss_mim"]
    rounded = model(images.bfloat16().float(), mask, with_stats=False)["loss_mim"]  # same encoder input
    assert exact.dtype == torch.float32 and torch.isfinite(exact)
    assert exact != rounded  # only the target differs between the two: it was not rounded to bf16


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_a_0_1_integer_mask_as_simmims_generator_gives_trains_as_the_boolean_one_and_a_float_mask_is_refused(method):
    """SimMIM's reference MaskGenerator gives 0/1 integers; with MTO on they failed deep inside the
    attention (masked_fill wants bool)."""
    torch.manual_seed(0)
    model = create_mim_model("vit_tiny_patch16", method, img_size=64, mto={"recalibrate": "early"})
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 1::2] = True
    expected = model(images, mask)
    for integers in (mask.long(), mask.to(torch.uint8)):
        got = model(images, integers)
        assert [got[k].item() for k in ("loss", "loss_mim", "loss_mto")] == \
            [expected[k].item() for k in ("loss", "loss_mim", "loss_mto")]
    with pytest.raises(TypeError, match="mask must be bool .* got torch.float32"):
        model(images, mask.float())


def test_every_arch_the_config_accepts_has_a_timm_name_and_no_other_does():
    """The tools offer the config's ARCHS (importing it costs no timm); the encoders and their
    export name timm's models through TIMM_NAMES: the two must list the same archs."""
    from mto_ds.config import ARCHS
    from mto_ds.models import TIMM_NAMES
    assert sorted(TIMM_NAMES) == sorted(ARCHS)
