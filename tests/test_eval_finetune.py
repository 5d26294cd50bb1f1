import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from mto_ds.eval.finetune import PooledClassifier, finetune, finetune_top1, layer_decay_groups


class BrightChannel(Dataset):
    """Class c: colour channel c is bright, the others dark, plus pixel noise; a known answer (100%)."""

    def __init__(self, num: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num) % 3
        base = torch.full((num, 3, 32, 32), 60.0)
        base[torch.arange(num), self.labels] = 190.0
        noisy = base + 25.0 * torch.randn(base.shape, generator=generator)
        self.images = noisy.clamp(0, 255).to(torch.uint8)
        self.num_classes, self.img_size = 3, 32

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def test_finetune_learns_a_separable_toy_task_and_leaves_the_encoder_untouched():
    encoder = _tiny_vit()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    accuracy = finetune_top1(encoder, BrightChannel(96, seed=0), BrightChannel(48, seed=1), 3, torch.device("cpu"),
                             epochs=4, batch_size=16, lr=3e-3)
    assert accuracy > 95.0
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_finetune_is_deterministic_for_a_seed():
    """The fine-tuned weights, not the accuracy (100 % on this task for any seed)."""
    first, again, other = (finetune(_tiny_vit(), BrightChannel(32, seed=2), 3, "cpu", epochs=1, batch_size=16,
                                    lr=1e-3, seed=seed).state_dict() for seed in (5, 5, 6))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])  # the seed is what decides it


def test_layer_decay_gives_early_blocks_the_smallest_learning_rate():
    model = PooledClassifier(_tiny_vit(), 3)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5^1, norm and head 1
    assert scale_of[id(named["encoder.pos_embed"])] == 0.125
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.25
    assert scale_of[id(named["encoder.blocks.1.mlp.fc1.weight"])] == 0.5
    assert scale_of[id(named["head.weight"])] == 1.0
    assert decay_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.05
    assert decay_of[id(named["encoder.blocks.0.norm1.weight"])] == 0.0
    assert decay_of[id(named["encoder.cls_token"])] == 0.0


def test_each_kept_image_is_flipped_as_its_position_says_when_images_are_left_out():
    """Flips are drawn per position of the whole global batch (the same on any number of ranks);
    a batch that lost undecodable images flips each kept one as at its position."""
    from mto_ds.eval.finetune import _flip_some

    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    flip = torch.tensor([True, True, False, False])
    flipped = _flip_some(images, torch.ones(4, dtype=torch.bool), flip)
    assert torch.equal(flipped[:2], images[:2].flip(-1)) and torch.equal(flipped[2:], images[2:])
    kept = torch.tensor([True, False, True, False])
    assert torch.equal(_flip_some(images[kept], kept, flip), flipped[kept])
    assert _flip_some(images[:1], torch.zeros(4, dtype=torch.bool), flip).shape == (1, 3, 2, 2)  # the stand-in


class NothingDecodes(BrightChannel):
    """Every image undecodable (the loader's None), as a batch of broken files would be."""

    def __getitem__(self, i):
        return None


def test_a_batch_with_no_decoded_image_does_not_step_the_optimizer():
    """Its loss is a zero-weight stand-in, so its gradients are 0; AdamW's step would still decay
    the weights (weight decay 0.05) and move them: the fine-tuned copy must equal its start."""
    from mto_ds.eval.finetune import finetune
    encoder = _tiny_vit()
    torch.manual_seed(0)
    tuned = finetune(encoder, NothingDecodes(8, seed=0), 3, torch.device("cpu"), epochs=1, batch_size=8, lr=1e-2,
                     warmup_fraction=0.0)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in tuned.encoder.state_dict().items())
    learned = finetune(encoder, BrightChannel(8, seed=0), 3, torch.device("cpu"), epochs=1, batch_size=8, lr=1e-2,
                       warmup_fraction=0.0)
    assert not all(torch.equal(encoder.state_dict()[k], v) for k, v in learned.encoder.state_dict().items())


def test_finetune_follows_its_recipe_warm_up_cosine_layer_decay_and_label_smoothing(monkeypatch):
    """MAE's fine-tune recipe, step by step: a linear warm-up over 10% of the steps, then a cosine
    to 0, each parameter group at lr x its layer-decay scale, and a label-smoothed loss."""
    import math
    import mto_ds.eval.finetune as finetune_module
    lrs, smoothing = [], []
    real_step, real_loss = torch.optim.AdamW.step, finetune_module.F.cross_entropy

    def step(self, *args, **kwargs):
        lrs.append({g["lr_scale"]: g["lr"] for g in self.param_groups})
        return real_step(self, *args, **kwargs)

    def loss(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing", 0.0))
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(finetune_module.F, "cross_entropy", loss)
    finetune(_tiny_vit(), BrightChannel(32, seed=2), 3, "cpu", epochs=5, batch_size=8, lr=1e-3, layer_decay=0.5)
    total, warmup = 20, 2  # 4 steps per epoch; int(0.1 x 20) of warm-up
    assert len(lrs) == total and set(smoothing) == {0.1}
    for s, by_scale in enumerate(lrs):
        scale = (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert sorted(by_scale) == [0.125, 0.25, 0.5, 1.0]  # depth 2: embeddings, blocks 0 and 1, head
        for lr_scale, lr in by_scale.items():
            assert math.isclose(lr, 1e-3 * scale * lr_scale, rel_tol=1e-9, abs_tol=1e-15), (s, lr_scale)

