"""MTO: statistics against hand-computed values, losses, recalibration and baseline equality."""
import math

import numpy as np
import pytest
import torch

from mto_ds.models import create_mim_model, mask_fn_for
from mto_ds.models.vit import run_blocks
from mto_ds.mto.losses import mto_terms, warmup_scale
from mto_ds.config import MTOConfig
from mto_ds.mto.plan import block_flags, mto_settings
from mto_ds.mto.state import MTOState
from mto_ds.mto.stats import (attention_with_row_stats, block_summary, normalised_entropy, num_early_blocks,
                              summary_weights)

LN2, LN3 = math.log(2), math.log(3)
# Logits of 3 tokens (CLS, visible, masked); q = these rows and k = identity, scale 1.
LOGITS = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [LN3, 0.0, 0.0]])
MASKED = torch.tensor([[False, False, True]])


def _stats(recalibrate):
    q = LOGITS.view(1, 1, 3, 3)
    k = torch.eye(3).view(1, 1, 3, 3)
    v = torch.arange(9.0).view(1, 1, 3, 3)
    return attention_with_row_stats(q, k, v, MASKED, recalibrate, scale=1.0)


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_row_statistics_match_hand_computed_values_without_recalibration():
    _, stats = _stats(recalibrate=False)
    assert stats["mass_on_masked"].flatten().tolist() == pytest.approx([0.25, 1 / 3, 0.2], abs=1e-6)
    expected_e = [_entropy([.25, .5, .25]) / LN3, 1.0, _entropy([.6, .2, .2]) / LN3]
    assert stats["norm_entropy"].flatten().tolist() == pytest.approx(expected_e, abs=1e-6)
    summary = block_summary(stats, MASKED)
    mean_q = (0.25 + 1 / 3 + 0.2) / 3
    assert summary["heterogeneity"].item() == pytest.approx(1 - mean_q / (1 / 3), abs=1e-6)
    assert summary["entropy_masked"].item() == pytest.approx(expected_e[2], abs=1e-6)
    assert summary["entropy_visible"].item() == pytest.approx((expected_e[0] + 1.0) / 2, abs=1e-6)


def test_row_statistics_match_hand_computed_values_with_recalibration():
    out, stats = _stats(recalibrate=True)
    # Visible rows renormalise over the two visible keys; the masked row keeps all three.
    assert stats["mass_on_masked"].flatten().tolist() == pytest.approx([0.0, 0.0, 0.2], abs=1e-6)
    expected_e = [_entropy([1 / 3, 2 / 3]) / LN2, 1.0, _entropy([.6, .2, .2]) / LN3]
    assert stats["norm_entropy"].flatten().tolist() == pytest.approx(expected_e, abs=1e-6)
    assert block_summary(stats, MASKED)["heterogeneity"].item() == pytest.approx(1 - (0.2 / 3) * 3, abs=1e-6)
    v = torch.arange(9.0).view(3, 3)
    assert out[0, 0, 0].tolist() == pytest.approx((v[0] / 3 + 2 * v[1] / 3).tolist(), abs=1e-5)


def test_block_summary_follows_its_definition_sample_by_sample_with_shared_weights():
    """h = mean over samples of 1 - mean(q_i) / r (1 for a sample without mask tokens), entropy means
    over all masked / visible rows of the batch; the same with the weights computed once per forward."""
    from mto_ds.mto.stats import summary_weights
    torch.manual_seed(0)
    masked = torch.tensor([[False, True, True, False, True],     # r = 3/5
                           [False, False, True, False, False],   # r = 1/5
                           [False, False, False, False, False]])  # no mask tokens: h = 1
    stats = {"mass_on_masked": torch.rand(3, 2, 5), "norm_entropy": torch.rand(3, 2, 5)}
    per_sample_h = []
    for b in range(3):
        r = masked[b].float().mean().item()
        per_sample_h.append(1.0 - stats["mass_on_masked"][b].mean().item() / r if r > 0 else 1.0)
    rows = stats["norm_entropy"].mean(1)
    expected = {"heterogeneity": sum(per_sample_h) / 3,
                "entropy_masked": rows[masked].mean().item(), "entropy_visible": rows[~masked].mean().item()}
    for weights in (None, summary_weights(masked)):
        summary = block_summary(stats, masked, weights)
        assert {k: v.item() for k, v in summary.items()} == pytest.approx(expected, abs=1e-6)
    mass_only = block_summary({"mass_on_masked": stats["mass_on_masked"]}, masked)
    assert mass_only["heterogeneity"].item() == pytest.approx(expected["heterogeneity"], abs=1e-6)
    assert math.isnan(mass_only["entropy_masked"].item()) and math.isnan(mass_only["entropy_visible"].item())


def test_explicit_path_output_equals_sdpa_with_and_without_recalibration():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    masked = torch.rand(2, 9) < 0.5
    masked[:, 0] = False
    for recalibrate in (False, True):
        out, _ = attention_with_row_stats(q, k, v, masked, recalibrate, scale=8 ** -0.5)
        allowed = ~(~masked[:, :, None] & masked[:, None, :])
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None] if recalibrate else None)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_losses_match_hand_computed_values():
    def s(h, em=0.0):
        return {"heterogeneity": torch.tensor(h), "entropy_masked": torch.tensor(em)}
    summaries = [s(0.3, 0.8), s(0.9, 0.4), s(0.5), s(0.7), s(0.6)]
    terms = mto_terms(summaries, num_early=2, delta=0.0)
    assert terms["loss_spa"].item() == pytest.approx(0.6)
    assert terms["loss_e"].item() == pytest.approx((0.7 + 0.1) / 2)
    assert terms["loss_r"].item() == pytest.approx((0.2 + 0.0) / 2)
    assert mto_terms(summaries, 2, delta=0.15)["loss_r"].item() == pytest.approx((0.35 + 0.05) / 2)


def test_early_blocks_default_to_a_third_rounded_up_and_warmup_is_linear():
    assert num_early_blocks(12, None) == 4 and num_early_blocks(8, None) == 3 and num_early_blocks(12, 2) == 2
    # Every depth (round(L / 3) agrees with the ceiling at 2, 3, 6, 8 and 12, not at 4, 7 or 10),
    # and a number above the depth is capped at it.
    assert [num_early_blocks(depth, None) for depth in range(1, 13)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert num_early_blocks(3, 5) == 3
    assert [warmup_scale(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_scale(0, 0) == 1.0


def test_block_flags_follow_settings():
    k, flags = block_flags(MTOConfig(enabled=True, recalibrate="early", lambda_r=0.0), 6, with_stats=False)
    assert k == 2
    assert [f[0] for f in flags] == [True, True, False, False, False, False]
    assert [f[1] for f in flags] == ["loss", "loss", "none", "none", "none", "none"]
    _, off = block_flags(MTOConfig(enabled=False), 6, with_stats=True)
    assert off == [(False, "telemetry")] * 6
    # Two blocks: one early, one late; L_r needs two late blocks, so the late one keeps flash attention.
    _, two = block_flags(MTOConfig(enabled=True, lambda_r=0.1), 2, with_stats=False)
    assert [f[1] for f in two] == ["loss", "none"]
    # L_r reads only the late blocks' mass: their entropy is computed on logging steps alone.
    _, three = block_flags(MTOConfig(enabled=True, lambda_r=0.1), 3, with_stats=False)
    assert [f[1] for f in three] == ["loss", "mass", "mass"]
    _, logged = block_flags(MTOConfig(enabled=True, lambda_r=0.1), 3, with_stats=True)
    assert [f[1] for f in logged] == ["loss", "loss", "loss"]


def _inputs(model, method, batch=2, img=64, seed=0):
    fn = mask_fn_for(model, method, img, None, 32 if method == "simmim" else None)
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng([seed, i])) for i in range(batch)]))
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed)), mask


def _model(method, mto, seed=0):
    torch.manual_seed(seed)
    return create_mim_model("vit_tiny_patch16", method, img_size=64, mto=mto, decoder_embed_dim=64,
                            decoder_depth=3, decoder_num_heads=4)


@pytest.mark.parametrize("method", ["simmim", "mae"])
@pytest.mark.parametrize("recalibrate,expect_unchanged", [("all", True), ("none", False)])
@pytest.mark.parametrize("statistics", ["with", "without"])
def test_visible_tokens_ignore_mask_token_in_recalibrated_blocks(method, recalibrate, expect_unchanged, statistics):
    """With the MTO losses on, every block computes statistics (the explicit path); with them all
    at 0 the blocks run PyTorch's SDPA with the recalibration as a boolean mask: both hide it."""
    off = {"lambda_spa": 0.0, "lambda_e": 0.0, "lambda_r": 0.0} if statistics == "without" else {}
    model = _model(method, {"recalibrate": recalibrate, **off}).eval()
    images, mask = _inputs(model, method)

    def visible_hidden():
        if method == "simmim":
            tokens = model.forward_encoder(images, mask)
            return tokens[:, 1:][~mask], tokens[:, 0]
        # Through MAE's own decoder, which places the mask tokens and marks them for the blocks:
        # its predictions at the visible patches (the decoder's per-token head on its output).
        # CLS counts as visible: hooked at the decoder's norm, before the head drops it.
        seen = {}
        hook = model.decoder_norm.register_forward_hook(lambda module, args, out: seen.update(cls=args[0][:, 0]))
        pred, _, _ = model.forward_decoder(model.forward_encoder(images, mask), mask, False)
        hook.remove()
        return pred[~mask], seen["cls"]

    with torch.no_grad():
        before = visible_hidden()
        model.mask_token.add_(torch.randn_like(model.mask_token) * 3.0)
        after = visible_hidden()
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))
    assert same == expect_unchanged


def test_visible_tokens_ignore_mask_token_through_early_blocks_only():
    model = _model("simmim", {"recalibrate": "early", "early_blocks": 3}).eval()
    images, mask = _inputs(model, "simmim")
    enc = model.encoder
    masked = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], 1)
    _, flags = model.block_flags(False)

    def hidden(depth):
        x = enc.patch_embed(images)
        w = mask.unsqueeze(-1).float()
        x = enc._pos_embed(x * (1 - w) + model.mask_token * w)
        x, _ = run_blocks(enc.blocks[:depth], x, masked, flags[:depth], 0)
        return x[:, 1:][~mask]

    with torch.no_grad():
        early_before, late_before = hidden(3), hidden(4)
        # A random direction: a constant shift would vanish in the LayerNorm before attention.
        model.mask_token.add_(torch.randn_like(model.mask_token) * 3.0)
        early_after, late_after = hidden(3), hidden(4)
    torch.testing.assert_close(early_before, early_after, atol=1e-5, rtol=0)
    assert not torch.allclose(late_before, late_after, atol=1e-3)  # block 4 is not recalibrated


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_all_parts_off_equals_the_plain_baseline(method):
    off = {"enabled": True, "recalibrate": "none", "lambda_spa": 0.0, "lambda_e": 0.0, "lambda_r": 0.0}
    results = []
    for mto in (None, off, {"enabled": False, "recalibrate": "all"}):
        model = _model(method, mto)
        images, mask = _inputs(model, method)
        out = model(images, mask, with_stats=False)
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out["loss"].detach(), grads))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grads, results[0][1])


def test_telemetry_leaves_training_numerics_unchanged():
    """Also with attention and projection dropout and drop-path: the statistics beside the
    SDPA output must not draw random numbers the training forward then misses."""
    outs = []
    for with_stats in (False, True):
        torch.manual_seed(0)
        model = create_mim_model("vit_tiny_patch16", "simmim", img_size=64, mto=None, drop_path=0.1)
        for block in model.encoder.blocks:
            block.attn.attn_drop.p = block.attn.proj_drop.p = 0.1
        images, mask = _inputs(model, "simmim")
        torch.manual_seed(1)
        out = model(images, mask, with_stats=with_stats)
        out["loss"].backward()
        outs.append((out, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.equal(outs[0][0]["loss"], outs[1][0]["loss"]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.isnan(outs[0][0]["heterogeneity"]).all()          # not computed without stats
    assert torch.isfinite(outs[1][0]["heterogeneity"]).all() and outs[1][0]["heterogeneity"].numel() == 12


@pytest.mark.parametrize("method,blocks", [("simmim", 12), ("mae", 3)])
def test_gradients_of_mto_losses_reach_the_mask_token(method, blocks):
    model = _model(method, {"enabled": True})
    images, mask = _inputs(model, method)
    out = model(images, mask)
    assert out["heterogeneity"].shape == (blocks,)
    assert out["loss_mto"].item() > 0
    assert out["loss"].item() == pytest.approx(out["loss_mim"].item() + out["loss_mto"].item(), rel=1e-6)
    out["loss_mto"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_mto_loss_is_the_lambda_weighted_sum_and_each_term_alone_reaches_the_mask_token(method):
    lambdas = {"lambda_spa": 0.3, "lambda_e": 0.2, "lambda_r": 0.5, "delta": 1.0}  # delta: L_r's hinge open
    model = _model(method, {"enabled": True, **lambdas})
    images, mask = _inputs(model, method)
    out = model(images, mask, mto_scale=0.5)
    weighted = 0.5 * (0.3 * out["loss_spa"] + 0.2 * out["loss_e"] + 0.5 * out["loss_r"])
    assert out["loss_mto"].item() == pytest.approx(weighted.item(), rel=1e-6)
    assert min(out[k].item() for k in ("loss_spa", "loss_e", "loss_r")) > 0
    for term in ("lambda_spa", "lambda_e", "lambda_r"):
        only = {"enabled": True, "lambda_spa": 0.0, "lambda_e": 0.0, "lambda_r": 0.0, "delta": 1.0, term: 1.0}
        model = _model(method, only)
        model(images, mask)["loss_mto"].backward()
        assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0, term


def test_mto_scale_multiplies_the_weighted_mto_loss():
    model = _model("simmim", {"enabled": True})
    images, mask = _inputs(model, "simmim")
    full = model(images, mask, mto_scale=1.0)["loss_mto"].item()
    half = model(images, mask, mto_scale=0.5)["loss_mto"].item()
    assert half == pytest.approx(full / 2, rel=1e-5)


def test_mto_state_advances_and_round_trips():
    state = MTOState(warmup_steps=4)
    scales = []
    for _ in range(5):  # s_t = min(1, (t + 1) / W) at step t, read before the step advances the state
        scales.append(state.loss_scale)
        state.advance()
    assert scales == [0.25, 0.5, 0.75, 1.0, 1.0]
    state = MTOState(warmup_steps=4)
    for _ in range(3):
        state.advance()
    state.advance([0.5, float("nan")])      # a NaN (not computed) leaves the running value alone
    state.advance([0.5, 0.2])               # the first values computed are taken as they are
    state.advance([0.7, 0.4])               # then the running mean, decay 0.9 (docs/MTO.md)
    again = MTOState(warmup_steps=4)
    again.load_state_dict(state.state_dict())
    assert again.step == 6 and again.loss_scale == 1.0
    assert again.ema_heterogeneity == pytest.approx([0.9 * 0.5 + 0.1 * 0.7, 0.9 * 0.2 + 0.1 * 0.4])


def test_mto_argument_accepts_none_dict_and_config_and_rejects_unknown_keys():
    assert not mto_settings(None).enabled
    assert mto_settings({"lambda_e": 0.5}).enabled and mto_settings({"lambda_e": 0.5}).lambda_e == 0.5
    assert not mto_settings({"enabled": False}).enabled
    with pytest.raises(ValueError, match="lambda_x"):
        mto_settings({"lambda_x": 1.0})


def test_mae_decoder_puts_visible_tokens_at_their_patches_and_mask_tokens_elsewhere():
    """The sync-free gather of the decoder input equals placing tokens by boolean indexing."""
    model = create_mim_model("vit_tiny_patch16", "mae", img_size=64, mto=None, decoder_embed_dim=64,
                             decoder_depth=0, decoder_num_heads=4).eval()
    images, mask = _inputs(model, "mae", batch=3)
    with torch.no_grad():
        latent = model.forward_encoder(images, mask)
        pred, _, _ = model.forward_decoder(latent, mask, with_stats=False)
        x = model.decoder_embed(latent)
        full = model.mask_token.expand(3, mask.shape[1], -1).clone()
        full[~mask] = x[:, 1:].reshape(-1, x.shape[-1])
        expected = model.decoder_pred(model.decoder_norm(full + model.decoder_pos_embed[:, 1:]))
    assert mask.sum(1).tolist() == [12, 12, 12]  # 16 patches, 75% masked
    torch.testing.assert_close(pred, expected, rtol=0, atol=1e-6)


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """train.compile: torch.compile of each block changes speed, not values (MAE covers both
    block loops: plain encoder blocks and decoder blocks with recalibration and MTO losses)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_mim_model("vit_tiny_patch16", "mae", img_size=64, mto={"enabled": True},
                                 decoder_embed_dim=64, decoder_depth=3, decoder_num_heads=4,
                                 compile_blocks=compiled)
        images, mask = _inputs(model, "mae")
        out = model(images, mask)
        out["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (eager, eager_grads), (comp, comp_grads) = results
    assert eager["loss_mto"] > 0 and torch.isfinite(comp["heterogeneity"]).all()
    for key in ("loss", "loss_mim", "loss_mto", "heterogeneity"):
        torch.testing.assert_close(comp[key], eager[key], rtol=1e-4, atol=1e-5)
    assert comp_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["loss", "mass", "telemetry"])
def test_a_block_with_its_summary_compiles_as_one_graph(mode):
    """train.compile fuses a block's MTO work, its summary included, only if the block's call has
    no graph break: fullgraph=True fails on one. Same summary and gradients as eager."""
    from mto_ds.models.vit import _block_forward, mim_block
    from mto_ds.mto.stats import summary_weights
    torch.manual_seed(0)
    block = mim_block(32, 4)
    block.attn.stats_kernel = "sdpa"  # the statistics path that needs no GPU
    x = torch.randn(2, 9, 32)
    masked = torch.rand(2, 9) < 0.5
    masked[:, 0] = False
    weights = summary_weights(masked)
    compiled = torch.compile(_block_forward, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (_block_forward, compiled):
        xi = x.clone().requires_grad_()
        y, summary = fn(block, xi, masked, True, mode, weights)
        total = y.square().mean() + sum(v for v in summary.values() if v.requires_grad)
        total.backward()
        results.append((summary, xi.grad))
    (eager, eager_grad), (graph, graph_grad) = results
    for key in ("heterogeneity", "entropy_masked", "entropy_visible"):
        torch.testing.assert_close(graph[key], eager[key], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(graph_grad, eager_grad, rtol=1e-4, atol=1e-6)
    assert eager["heterogeneity"].requires_grad == (mode != "telemetry")


def test_visible_rows_normalise_entropy_by_the_log_of_the_visible_count_cls_included():
    """n_i (docs/MTO.md, section 2): under recalibration a visible row may attend to the N - |M|
    visible tokens, CLS among them (here 4 of 5); a masked row to all N. The hand case above has
    2 visible tokens, where the clamp at 2 hides an off-by-one."""
    masked = torch.tensor([[False, False, False, False, True]])
    normed = normalised_entropy(torch.ones(1, 1, 5), masked, recalibrate=True)
    assert normed.flatten().tolist() == pytest.approx([1 / math.log(4)] * 4 + [1 / math.log(5)], abs=1e-6)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_a_telemetry_block_gives_the_output_and_statistics_of_a_loss_block(recalibrate):
    """A logging step must train the same function as any other step (its output recalibrated as
    a loss block's) and log what a loss block computes: the same statistics, without gradients."""
    from mto_ds.models.vit import _block_forward, mim_block
    torch.manual_seed(0)
    block = mim_block(32, 4).eval()
    x = torch.randn(2, 9, 32) * 3 + 1
    masked = torch.rand(2, 9) < 0.5
    masked[:, 0] = False
    weights = summary_weights(masked)
    with torch.no_grad():
        out_telemetry, telemetry = _block_forward(block, x, masked, recalibrate, "telemetry", weights)
        out_loss, loss = _block_forward(block, x, masked, recalibrate, "loss", weights)
    torch.testing.assert_close(out_telemetry, out_loss, atol=1e-5, rtol=1e-5)
    for key in ("heterogeneity", "entropy_masked", "entropy_visible"):
        torch.testing.assert_close(telemetry[key], loss[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_the_training_loss_carries_the_mto_gradient(method):
    """L = L_MIM + s_t (...) (section 4): the step backpropagates `loss`, and MTO's part of its
    gradient must reach the mask token (a detached loss_mto would train the plain baseline)."""
    model = _model(method, {"enabled": True, "delta": 1.0})
    images, mask = _inputs(model, method)
    out = model(images, mask)
    (total,) = torch.autograd.grad(out["loss"], model.mask_token, retain_graph=True)
    (mim,) = torch.autograd.grad(out["loss_mim"], model.mask_token, retain_graph=True)
    (mto,) = torch.autograd.grad(out["loss_mto"], model.mask_token)
    assert mto.abs().sum() > 0
    torch.testing.assert_close(total, mim + mto, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_l_r_alone_gives_the_same_loss_on_steps_with_and_without_logging(method):
    """Off a logging step the late blocks compute their mass only and the early ones nothing:
    L_r must still read the late blocks' heterogeneities (the first K summaries are the early
    blocks', absent here), and equal the logging step's loss."""
    model = _model(method, {"lambda_spa": 0.0, "lambda_e": 0.0, "lambda_r": 1.0, "delta": 1.0}).eval()
    images, mask = _inputs(model, method)
    logged, unlogged = model(images, mask, with_stats=True), model(images, mask, with_stats=False)
    late = logged["heterogeneity"][model.block_flags(False)[0]:]
    hinge = torch.clamp(late[1:] - late[:-1] + 1.0, min=0).mean()
    assert torch.isfinite(unlogged["loss"])
    torch.testing.assert_close(unlogged["loss_r"], hinge, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unlogged["loss"], logged["loss"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["simmim", "mae"])
def test_mto_kernel_reaches_every_attention_module(method):
    """mto.kernel picks the statistics' implementation in every block, the MAE decoder's too (the
    SDPA-statistics model test compares against the reference only if it does)."""
    from mto_ds.mto.attention import MTOAttention
    for kernel in ("sdpa", "reference"):
        model = create_mim_model("vit_tiny_patch16", method, img_size=32, mto={"kernel": kernel})
        assert {m.stats_kernel for m in model.modules() if isinstance(m, MTOAttention)} == {kernel}
