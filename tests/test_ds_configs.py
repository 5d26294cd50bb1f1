"""The shipped DeepSpeed JSON files: each is what its name says and passes DeepSpeed's own
validation; the GPU ones build torch's fused AdamW (no CUDA op to JIT-build at start on every
node), which steps under ZeRO-1/2/3; bf16 trains and resumes exactly."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import (HALF_PRECISION_SMALL, REPO, SMALL_MAE_DECODER_OVERRIDES, checkpoint_bytes, checkpoint_space_of,
                      cpu_env, free_port, pretrain, read_metrics)

DS_CHECK = r"""
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from mto_ds.config import load_config
from mto_ds.engine.builder import deepspeed_config, plan_batch
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for name in sys.argv[2:]:
    cfg = load_config("configs/demo.yaml", [f"deepspeed.config=ds_configs/{name}", "train.clip_grad=0.5"])
    c = DeepSpeedConfig(deepspeed_config(cfg, plan_batch(32, 8, 1)))  # DeepSpeed's own validation
    unclipped = load_config("configs/demo.yaml", [f"deepspeed.config=ds_configs/{name}", "train.clip_grad=null"])
    u = DeepSpeedConfig(deepspeed_config(unclipped, plan_batch(32, 8, 1)))
    out[name] = {"stage": c.zero_optimization_stage, "bf16": c.bfloat16_config.enabled,
                 "fp16": c.float16_config.enabled, "loss_scale": c.float16_config.loss_scale,
                 "offload": [str(o.device) if o else None for o in (c.zero_config.offload_optimizer,
                                                                   c.zero_config.offload_param)],
                 "clip": c.gradient_clipping, "batch": [c.train_batch_size, c.train_micro_batch_size_per_gpu,
                                                        c.gradient_accumulation_steps],
                 "grad_norm": [c.zero_config.compute_grad_norm, u.zero_config.compute_grad_norm]}
print("RESULT " + json.dumps(out))
deepspeed.comm.destroy_process_group()
"""
DS_CONFIGS = {  # name: (ZeRO stage, bf16, fp16, offload of optimizer and parameters)
    "cpu_zero1.json": (1, False, False, [None, None]),
    "cpu_zero2.json": (2, False, False, [None, None]),
    "cpu_zero3.json": (3, False, False, [None, None]),
    "zero1_bf16.json": (1, True, False, [None, None]),
    "zero2_bf16.json": (2, True, False, [None, None]),
    "zero3_bf16.json": (3, True, False, [None, None]),
    "zero3_offload_bf16.json": (3, True, False, ["cpu", "cpu"]),
    "zero2_fp16.json": (2, False, True, [None, None]),
}


def test_every_ds_config_passes_deepspeeds_validation_and_is_what_its_name_says():
    assert sorted(p.name for p in (REPO / "ds_configs").glob("*.json")) == sorted(DS_CONFIGS)
    result = subprocess.run([sys.executable, "-c", DS_CHECK, str(free_port()), *DS_CONFIGS], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.split("RESULT ", 1)[1])
    for name, (stage, bf16, fp16, offload) in DS_CONFIGS.items():
        got = parsed[name]
        assert (got["stage"], got["bf16"], got["fp16"], got["offload"]) == (stage, bf16, fp16, offload), name
        assert got["clip"] == 0.5 and got["batch"] == [32, 8, 4], name  # train.clip_grad; 32 = 8 x 4 on 1 rank
        # Clipping reads DeepSpeed's gradient norm; without it bf16/fp16 ZeRO-1/2 skip computing one.
        # fp32 keeps it (DeepSpeed's check for non-finite gradients); ZeRO-3 has no such switch.
        assert got["grad_norm"] == [True, stage == 3 or not (bf16 or fp16)], name
    assert parsed["zero2_fp16.json"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    fp16 = json.loads((REPO / "ds_configs" / "zero2_fp16.json").read_text())["fp16"]
    assert fp16["initial_scale_power"] >= 8 and fp16["loss_scale_window"] > 0


SCRIPT = r'''
import json, sys, torch, deepspeed
from mto_ds.engine.distributed import init_distributed, shutdown_distributed
init_distributed()
for name in sys.argv[1:]:
    ds = json.load(open(f"ds_configs/{name}.json"))
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    ds["optimizer"]["params"]["lr"] = 0.1
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    loss = engine(torch.ones(2, 4, dtype=torch.bfloat16)).float().pow(2).sum()
    engine.backward(loss)
    engine.step()
    opt = engine.basic_optimizer
    with deepspeed.zero.GatheredParameters([engine.module.weight]):
        moved = (engine.module.weight.detach().float() - before).abs().max().item()
    print("RESULT", json.dumps({"config": name, "optimizer": type(opt).__module__ + "." + type(opt).__name__,
                                "fused": opt.defaults.get("fused"), "moved": moved}), flush=True)
shutdown_distributed()
'''

GPU_BF16 = ["zero1_bf16", "zero2_bf16", "zero3_bf16"]


def test_gpu_configs_use_torch_fused_adamw_and_step(tmp_path):
    script = tmp_path / "build_engines.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), *GPU_BF16], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=cpu_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert [r["config"] for r in rows] == GPU_BF16
    for row in rows:
        assert row["optimizer"] == "torch.optim.adamw.AdamW" and row["fused"] is True, row
        assert row["moved"] > 0.01, row  # lr 0.1: the optimizer stepped the (gathered) weight


@pytest.mark.parametrize("name", ["zero2_fp16"])
def test_fp16_config_names_the_same_optimizer(name):
    """fp16 cannot run on the CPU accelerator; its optimizer section must match the bf16 ones."""
    sections = {n: json.loads((REPO / "ds_configs" / f"{n}.json").read_text())["optimizer"]
                for n in (name, "zero2_bf16")}
    assert sections[name] == sections["zero2_bf16"]


def test_fp16_zero2_config_differs_from_the_bf16_one_only_in_its_precision():
    """Everything but the precision section and the gradients' communication type is the bf16
    file's: the same ZeRO-2 settings (overlap_comm off with one 5e8-element bucket, measured in
    docs/BENCHMARKS.md; the fp16 file had kept DeepSpeed's overlap_comm and its per-step sync)."""
    fp16, bf16 = (json.loads((REPO / "ds_configs" / f"{n}.json").read_text()) for n in ("zero2_fp16", "zero2_bf16"))
    assert (fp16.pop("fp16")["enabled"], bf16.pop("bf16")["enabled"]) == (True, True)
    assert (fp16.pop("communication_data_type"), bf16.pop("communication_data_type")) == ("fp16", "bf16")
    assert fp16 == bf16


def test_bf16_zero2_on_two_ranks_keeps_bf16_weights_and_resumes_exactly(tmp_path):
    """The GPU precision path through the trainer (gloo, CPU): the checkpointed module is bf16,
    and a run resumed from its step-3 checkpoint repeats steps 4-6 of the uninterrupted run."""
    full = tmp_path / "full"
    args = ("deepspeed.config=ds_configs/zero2_bf16.json", "train.steps=6", "run.log_every=1",
            "checkpoint.every_steps=3", "data.synthetic_images=256", "data.num_workers=0", *HALF_PRECISION_SMALL)
    pretrain(full, *args, nproc=2)
    (states,) = (full / "checkpoints" / "step_00000003").glob("mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module["mask_token"].dtype == torch.bfloat16
    assert {v.dtype for k, v in module.items() if k.endswith("weight")} == {torch.bfloat16}
    # What --dry-run and the start's disk check count a checkpoint at: bf16 under ZeRO-1/2, 14 bytes
    # per parameter (the bf16 module, fp32 masters and Adam's moments).
    assert checkpoint_bytes(full / "checkpoints" / "step_00000003") == pytest.approx(
        checkpoint_space_of("zero2_bf16.json", img_size=32).each, rel=0.02)

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if killed after step 3's save
    log = pretrain(resumed, *args, nproc=2)
    assert "resumed from" in log.stderr + log.stdout and "step_00000003 at step 3" in log.stderr + log.stdout
    expected = {r["step"]: r["loss"] for r in read_metrics(full)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    assert json.loads((resumed / "state.json").read_text())["step"] == 6


def test_gradient_norm_is_skipped_only_where_nothing_reads_it_and_deepspeed_allows_it():
    from mto_ds.engine.builder import skip_unread_grad_norm

    def decided(clip, zero, **extra):
        ds = {"gradient_clipping": clip, "bf16": {"enabled": True}, "zero_optimization": dict(zero), **extra}
        skip_unread_grad_norm(ds)
        return ds["zero_optimization"].get("compute_grad_norm")

    assert decided(0.0, {"stage": 2}) is False
    assert decided(0.0, {"stage": 1}) is False
    assert decided(5.0, {"stage": 2}) is None  # clipping needs it: DeepSpeed's default (on) stays
    assert decided(0.0, {"stage": 3}) is None  # ZeRO-3 has no switch
    assert decided(0.0, {"stage": 2, "compute_grad_norm": True}) is True  # the JSON asked for it
    assert decided(0.0, {"stage": 2, "offload_optimizer": {"device": "cpu"}}) is None
    assert decided(0.0, {"stage": 2, "offload_optimizer": {"device": "none"}}) is False
    assert decided(0.0, {"stage": 1}, data_types={"grad_accum_dtype": "fp32"}) is None  # BF16_Optimizer
    assert decided(0.0, {"stage": 2}, bf16={"enabled": False}) is None  # fp32: DeepSpeed's non-finite check reads it
    assert decided(0.0, {"stage": 2}, bf16={"enabled": False}, fp16={"enabled": True}) is False
    # Only ZeRO-1's BF16_Optimizer refuses it off with float32 accumulation (either spelling).
    assert decided(0.0, {"stage": 1}, data_types={"grad_accum_dtype": "float32"}) is None
    assert decided(0.0, {"stage": 2}, data_types={"grad_accum_dtype": "fp32"}) is False
    assert decided(0.0, {"stage": 2, "zenflow": {"topk_ratio": 0.1}}) is None  # ZenFlow reads it
    # DeepSpeed's older section name "bfloat16" is bf16 too.
    bfloat16 = {"gradient_clipping": 0.0, "bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    skip_unread_grad_norm(bfloat16)
    assert bfloat16["zero_optimization"]["compute_grad_norm"] is False


def test_the_deepspeed_config_takes_the_runs_batch_plan_learning_rate_and_adamw_settings():
    """The JSON's batch keys are the plan's (places per step: the global batch rounded up to a
    whole number of micro-batch places per rank), the LR MAE's linear scaling rule (or train.lr),
    and AdamW's betas and weight decay the recipe's."""
    from mto_ds.config import load_config
    from mto_ds.engine.builder import deepspeed_config, peak_lr, plan_batch
    cfg = load_config("configs/vit_l_mae.yaml", ["data.source=synthetic"])
    ds = deepspeed_config(cfg, plan_batch(4096, 64, 64))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        4096, 64, 1)
    assert ds["optimizer"]["params"] == {"lr": pytest.approx(1.5e-4 * 4096 / 256), "betas": [0.9, 0.95],
                                         "weight_decay": 0.05, "torch_adam": True, "fused": True}
    demo = load_config("configs/demo.yaml")
    ds = deepspeed_config(demo, plan_batch(32, 8, 1))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        32, 8, 4)
    ds = deepspeed_config(demo, plan_batch(32, 16, 3))  # shares of 11, 11, 10: 33 places
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        33, 11, 1)
    assert peak_lr(demo) == pytest.approx(demo.train.blr * 32 / 256)
    assert peak_lr(load_config("configs/demo.yaml", ["train.lr=0.01"])) == 0.01


def test_under_zero3_each_transformer_block_is_one_leaf_module():
    from deepspeed.utils import z3_leaf_module
    from mto_ds.engine.builder import mark_zero3_leaf_blocks
    from mto_ds.models import create_mim_model
    from mto_ds.models.vit import MTOBlock
    model = create_mim_model("vit_tiny_patch16", "simmim", img_size=32)
    mark_zero3_leaf_blocks(model, {"zero_optimization": {"stage": 2}})
    blocks = [m for m in model.modules() if isinstance(m, MTOBlock)]
    assert len(blocks) == 12 and not any(z3_leaf_module(b) for b in blocks)
    mark_zero3_leaf_blocks(model, {"zero_optimization": {"stage": 3}})
    assert all(z3_leaf_module(b) for b in blocks)


def test_without_clipping_the_unread_norm_is_skipped_and_the_losses_are_unchanged(tmp_path):
    """MAE's recipe does not clip: DeepSpeed then computes no gradient norm (one launch loop per
    gradient tensor saved), metrics.jsonl says grad_norm null, and training is what it is with the
    norm computed (a JSON that asks for it, which logs it). On the recipe's file, bf16 ZeRO-1, on
    one rank: whether the norm is computed is the same decision on every rank."""
    with_norm = json.loads((REPO / "ds_configs" / "zero1_bf16.json").read_text())
    with_norm["zero_optimization"]["compute_grad_norm"] = True
    (tmp_path / "with_norm.json").write_text(json.dumps(with_norm))
    rows = {}
    for name, config in (("skipped", "ds_configs/zero1_bf16.json"), ("computed", str(tmp_path / "with_norm.json"))):
        pretrain(tmp_path / name, f"deepspeed.config={config}", "model.method=mae", "train.clip_grad=null",
                 "train.steps=3", "run.log_every=1", "checkpoint.every_steps=0", *HALF_PRECISION_SMALL,
                 *SMALL_MAE_DECODER_OVERRIDES)
        rows[name] = read_metrics(tmp_path / name)
    assert [r["grad_norm"] for r in rows["skipped"]] == [None, None, None]
    assert all(r["grad_norm"] > 0 for r in rows["computed"])
    assert [r["loss"] for r in rows["skipped"]] == [r["loss"] for r in rows["computed"]]
    assert rows["skipped"][-1]["loss"] != rows["skipped"][0]["loss"]  # it trained
