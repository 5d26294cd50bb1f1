import torch

from mto_ds.eval.knn import knn_top1
from mto_ds.eval.linear_probe import fit_linear_head, linear_probe_top1, standardise


def _blobs(num: int, num_classes: int, dim: int, seed: int, spread: float = 1.0):
    """Gaussian blobs around well-separated class centres: linearly separable with high probability."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 4.0
    labels = torch.arange(num) % num_classes
    return centres[labels] + spread * torch.randn(num, dim, generator=generator), labels


def test_linear_probe_separates_linearly_separable_classes():
    train_x, train_y = _blobs(400, 5, 32, seed=0)
    val_x, val_y = _blobs(200, 5, 32, seed=1)
    assert linear_probe_top1(train_x, train_y, val_x, val_y, 5, epochs=30) > 95.0


def test_linear_probe_finds_a_direction_that_k_nn_would_miss():
    # The class is the sign of one coordinate among 16 of much larger, label-free spread: a
    # linear classifier gets it exactly (standardisation's part is the test below).
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=generator) * 50.0
    x[:, 0] = torch.randn(600, generator=generator).sign() * (1.0 + torch.rand(600, generator=generator))
    y = (x[:, 0] > 0).long()
    assert linear_probe_top1(x[:400], y[:400], x[400:], y[400:], 2, epochs=50) > 95.0
    # k-NN does miss it: the neighbours are decided by the 15 noise dimensions.
    assert knn_top1(x[:400], y[:400], x[400:], y[400:], 2, k=20) < 70.0


def test_linear_probe_is_deterministic_for_a_seed():
    """The trained head, not the accuracy: on separable blobs most seeds give the same top-1, so
    equal accuracies would pass with an unseeded batch order."""
    train_x, train_y = _blobs(300, 4, 16, seed=4, spread=4.0)
    settings = dict(epochs=5, lr=1e-2, weight_decay=1e-4, batch_size=64)
    first, again, other = (fit_linear_head(train_x, train_y, 4, seed=seed, **settings) for seed in (11, 11, 12))
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert not torch.equal(first.weight, other.weight)  # the seed is what decides it


def test_linear_probe_is_invariant_to_per_dimension_feature_scale():
    train_x, train_y = _blobs(300, 4, 16, seed=6, spread=3.0)
    val_x, val_y = _blobs(100, 4, 16, seed=7, spread=3.0)
    scale = torch.logspace(-3, 3, 16)
    plain = linear_probe_top1(train_x, train_y, val_x, val_y, 4, epochs=10)
    assert abs(plain - linear_probe_top1(train_x * scale, train_y, val_x * scale, val_y, 4, epochs=10)) <= 1.0


def test_standardise_uses_training_statistics_for_every_set():
    train = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    val = torch.tensor([[1.0, 20.0], [3.0, 40.0]])
    train_s, val_s = standardise(train, val)
    assert torch.allclose(train_s, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-5)
    assert torch.allclose(val_s, torch.tensor([[0.0, 0.0], [2.0, 2.0]]), atol=1e-5)


def test_standardise_is_mae_s_batchnorm_without_affine_also_for_near_constant_features():
    """MAE's probe puts BatchNorm1d(affine=False, eps=1e-6) before the head: x / sqrt(var + eps).
    Dividing by std + eps instead differs where std is near sqrt(eps) (a near-constant feature)."""
    torch.manual_seed(0)
    train = torch.randn(64, 3, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 0.0], dtype=torch.float64) \
        + torch.tensor([5.0, -2.0, 7.0], dtype=torch.float64)
    (ours,) = standardise(train)
    batchnorm = torch.nn.functional.batch_norm(train, None, None, training=True, eps=1e-6)
    torch.testing.assert_close(ours, batchnorm, rtol=1e-5, atol=1e-5)
    assert ours[:, 2].abs().max() == 0  # a constant feature becomes 0, not inf or NaN
