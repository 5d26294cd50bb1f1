import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from mto_ds.eval.features import extract_features, feature_fn, pool_tokens, shard_positions


class Numbered(Dataset):
    """Item i: an image whose every pixel is i (as uint8), label i % 3."""

    img_size = 16

    def __init__(self, num: int):
        self.num = num

    def __len__(self):
        return self.num

    def __getitem__(self, i):
        return torch.full((3, 16, 16), i, dtype=torch.uint8), i % 3


class FakeViT(torch.nn.Module):
    """forward_features: CLS token = 1, patch tokens = their position (0, 1, 2, 3), for every dim."""

    num_prefix_tokens = 1

    def forward_features(self, images):
        patches = torch.arange(4.0).view(1, 4, 1).expand(images.shape[0], 4, 2)
        return torch.cat([torch.ones(images.shape[0], 1, 2), patches], dim=1)


def test_mean_pooling_averages_patch_tokens_and_ignores_cls():
    tokens = FakeViT().forward_features(torch.zeros(2, 3, 4, 4))
    assert torch.equal(pool_tokens(tokens, "mean"), torch.full((2, 2), 1.5))
    assert torch.equal(pool_tokens(tokens, "cls"), torch.ones(2, 2))


def test_feature_fn_pools_a_vit_and_passes_a_plain_function_through():
    images = torch.zeros(3, 3, 4, 4)
    assert torch.equal(feature_fn(FakeViT(), "mean")(images), torch.full((3, 2), 1.5))
    assert torch.equal(feature_fn(FakeViT(), "cls")(images), torch.ones(3, 2))
    plain = lambda x: x.flatten(1)  # noqa: E731
    assert feature_fn(plain) is plain


def test_shards_cover_every_item_with_equal_sizes_per_rank():
    shards = [shard_positions(10, rank, 4) for rank in range(4)]
    assert {len(s) for s in shards} == {3}
    assert sorted(set(p for s in shards for p in s)) == list(range(10))


def test_extract_features_keeps_dataset_order_and_restores_train_mode():
    first_pixel = lambda images: images[:, :1, 0, 0]  # noqa: E731  (grows with the item's number)
    features, labels = extract_features(first_pixel, Numbered(11), "cpu", batch_size=4)
    assert labels.tolist() == [i % 3 for i in range(11)]
    assert torch.all(features[1:, 0] > features[:-1, 0])
    vit = FakeViT().train()
    features, _ = extract_features(vit, Numbered(5), "cpu", batch_size=2)
    assert vit.training and torch.equal(features, torch.full((5, 2), 1.5))


def test_extract_features_runs_an_encoder_whose_weights_are_bf16_as_deepspeed_keeps_them():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    features, _ = extract_features(vit.to(torch.bfloat16), Numbered(3), "cpu", batch_size=2)
    assert features.dtype == torch.float32 and features.shape == (3, 16) and torch.isfinite(features).all()


def test_features_are_taken_in_eval_mode_and_the_encoders_mode_is_given_back():
    """Stochastic depth and dropout are off while features are taken (the same features twice,
    which a pre-training encoder with model.drop_path > 0 would not give in train mode), and the
    encoder comes back in the mode it came in: training or not."""
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                                drop_path_rate=0.5, proj_drop_rate=0.5)
    for training in (True, False):
        encoder.train(training)
        first, again = (extract_features(encoder, Numbered(6), "cpu", batch_size=4)[0] for _ in range(2))
        assert torch.equal(first, again)
        assert encoder.training == training and all(m.training == training for m in encoder.modules())
