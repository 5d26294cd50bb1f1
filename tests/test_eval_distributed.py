"""Evaluation on 2 gloo ranks gives what one process gives (features sharded, then all-gathered)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mto_ds.config import load_config
from mto_ds.eval import evaluate, extract_features, finetune_top1
from mto_ds.eval.finetune import finetune
from mto_ds.eval.datasets import build_eval_sets
from mto_ds.models import create_encoder

# Sizes that do not divide by 2 ranks: the padding must be cut off again.
OVERRIDES = ["deepspeed.config=ds_configs/cpu_zero2.json", "model.arch=vit_tiny_patch16", "model.img_size=32", "model.mask_patch_size=16",
             "data.num_workers=0", "data.synthetic_images=64", "data.synthetic_classes=4", "eval.num_train=41",
             "eval.num_val=23", "eval.knn_k=5"]


def _encoder():
    torch.manual_seed(0)
    return create_encoder("vit_tiny_patch16", img_size=32)


def _everything(cfg):
    encoder = _encoder()
    train, val = build_eval_sets(cfg)
    features, labels = extract_features(encoder, val, torch.device("cpu"), batch_size=4)
    # A global batch of 7: shares of 3 and 4 on 2 ranks.
    tuned = finetune(encoder, train, 4, torch.device("cpu"), epochs=2, batch_size=7)
    # Tensors, saved with torch.save: the fine-tuned weights as a JSON list took seconds to write,
    # read and compare (5.5M numbers per rank).
    return {"features": features, "labels": labels.tolist(),
            **evaluate(encoder, cfg, torch.device("cpu")),
            "finetune_top1": finetune_top1(encoder, train, val, 4, torch.device("cpu"), epochs=1, batch_size=8),
            "finetuned": torch.cat([p.detach().flatten() for p in tuned.parameters()])}


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(_everything(load_config(None, OVERRIDES)), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_features_in_order_and_agree_with_one_process(tmp_path):
    # fork: the ranks start with everything imported (seconds instead of tens of seconds); forked
    # before this process computes anything, so no thread pool is copied into them.
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = _everything(load_config(None, OVERRIDES))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(single)
    for key, value in ranks[0].items():  # every rank returns the same results
        assert torch.equal(value, ranks[1][key]) if torch.is_tensor(value) else value == ranks[1][key], key
    assert ranks[0]["labels"] == single["labels"]
    assert torch.allclose(ranks[0]["features"], single["features"], atol=1e-5)
    assert ranks[0]["knn_top1"] == single["knn_top1"]
    assert ranks[0]["linear_top1"] == pytest.approx(single["linear_top1"], abs=100 / 23 + 1e-6)
    assert ranks[0]["finetune_top1"] == pytest.approx(single["finetune_top1"], abs=100 / 23 + 1e-6)
    # The fine-tune's global batch is split over the ranks, each sample weighing 1/batch: 2 ranks
    # train the weights one process does (before, the batch was per rank: twice the batch, half
    # the steps, another result on every number of ranks).
    assert torch.allclose(ranks[0]["finetuned"], single["finetuned"], atol=1e-5)
