import torch

from mto_ds.eval.knn import knn_predict, knn_top1


def _one_hot_plus_noise(labels: torch.Tensor, num_classes: int, noise: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.one_hot(labels, num_classes).float() * 5.0
    return features + noise * torch.randn(features.shape, generator=generator)


def test_knn_is_perfect_on_class_one_hots_plus_small_noise():
    train_labels = torch.arange(200) % 7
    val_labels = torch.arange(70) % 7
    train = _one_hot_plus_noise(train_labels, 7, 0.3, seed=0)
    val = _one_hot_plus_noise(val_labels, 7, 0.3, seed=1)
    assert knn_top1(train, train_labels, val, val_labels, 7, k=20, temperature=0.07) == 100.0


def test_knn_weights_close_neighbours_over_a_distant_majority():
    # Two class-0 samples almost on the query, three class-1 samples far from it: an unweighted
    # vote of the 5 neighbours says 1; weights exp(sim / T) with small T say 0.
    train = torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.2, 1.0], [0.1, 1.0], [0.15, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, 2, k=5, temperature=0.07).tolist() == [0]
    assert knn_predict(train, labels, query, 2, k=5, temperature=1000.0).tolist() == [1]


def test_knn_uses_cosine_similarity_so_feature_scale_does_not_matter():
    train_labels = torch.arange(60) % 3
    train = _one_hot_plus_noise(train_labels, 3, 1.0, seed=2)
    val = _one_hot_plus_noise(torch.arange(30) % 3, 3, 1.0, seed=3)
    generator = torch.Generator().manual_seed(4)
    train_scales, val_scales = (torch.rand(n, 1, generator=generator) * 100 + 0.01 for n in (60, 30))
    assert torch.equal(knn_predict(train, train_labels, val, 3, k=10),
                       knn_predict(train * train_scales, train_labels, val * val_scales, 3, k=10))
    # The nearest by angle, not by dot product: a long vector at 45 degrees outvotes a short
    # one almost on the query under a dot product.
    bank, labels = torch.tensor([[10.0, 10.0], [1.0, 0.05]]), torch.tensor([1, 0])
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=1).tolist() == [0]


def test_knn_chunking_does_not_change_predictions():
    train_labels = torch.arange(300) % 5
    train = _one_hot_plus_noise(train_labels, 5, 2.0, seed=5)
    val = _one_hot_plus_noise(torch.arange(101) % 5, 5, 2.0, seed=6)
    whole = knn_predict(train, train_labels, val, 5, k=20, chunk_size=1000)
    assert torch.equal(whole, knn_predict(train, train_labels, val, 5, k=20, chunk_size=7))


def test_knn_with_k_larger_than_the_training_set_uses_all_of_it_and_says_so(caplog):
    """Not the protocol asked for (eval.num_train under eval.knn_k, or undecodable images), so the
    number reported is named as such instead of silently being k-NN with another k."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    with caplog.at_level("WARNING", logger="mto_ds.eval.knn"):
        assert knn_predict(train, labels, torch.tensor([[1.0, 0.02]]), 2, k=50).tolist() == [0]
    assert [r.getMessage() for r in caplog.records] == [
        "eval.knn_k=50 is more than the 3 training features: k-NN votes over all of them "
        "(raise eval.num_train or lower eval.knn_k)"]
    caplog.clear()
    knn_predict(train, labels, torch.tensor([[1.0, 0.02]]), 2, k=3)
    assert caplog.records == []


def test_knn_small_temperature_does_not_overflow():
    train_labels = torch.arange(40) % 4
    train = _one_hot_plus_noise(train_labels, 4, 0.5, seed=7)
    val_labels = torch.arange(20) % 4
    val = _one_hot_plus_noise(val_labels, 4, 0.5, seed=8)
    assert knn_top1(train, train_labels, val, val_labels, 4, k=10, temperature=1e-4) == 100.0


def _bank_at(similarities) -> torch.Tensor:
    """Unit 2-D features whose cosine similarity to the query direction (1, 0) is each value given."""
    c = torch.tensor(similarities, dtype=torch.float64)
    return torch.stack([c, (1 - c ** 2).sqrt()], dim=1).float()


def test_knn_votes_of_two_classes_at_a_tiny_temperature_keep_their_order():
    """At T = 0.001 the weights exp(s / T) of neighbours of two classes are all infinite in float32
    unless each row is scaled by its largest: then the nearest (class 1, s = 1) outweighs three
    of class 0 at s = 0.95 (1 against 3 exp(-50)); a tie of infinities would give class 0."""
    bank, labels = _bank_at([0.85, 0.95, 1.0, 0.95, 0.95]), torch.tensor([0, 0, 1, 0, 0])
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=5, temperature=0.001).tolist() == [1]


def test_knn_temperature_acts_on_the_cosine_whatever_the_query_length():
    """The query is normalised like the bank: at T = 0.2, three neighbours of class 0 at s = 0.9
    outvote one of class 1 at s = 1 (3 exp(-0.5) > 1) for a query of length 10 as of length 1;
    an unnormalised query would act as T = 0.02 (3 exp(-5) < 1) and flip the vote."""
    bank, labels = _bank_at([1.0, 0.9, 0.9, 0.9]), torch.tensor([1, 0, 0, 0])
    queries = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    assert knn_predict(bank, labels, queries, 2, k=4, temperature=0.2).tolist() == [0, 0]
