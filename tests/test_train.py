"""Pre-training through DeepSpeed on CPU ranks: the run directory, loss decrease, ZeRO-3, accumulation."""
import gzip
import io
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml

from mto_ds.config import load_config
from mto_ds.data.loader import normalize
from mto_ds.models import create_mim_model

from conftest import (REPO, SMALL_MAE_DECODER, SMALL_MAE_DECODER_OVERRIDES, checkpoint_bytes, checkpoint_space_of, cpu_env,
                      pretrain, read_metrics)
from run_control import STEPS, reference_run


def _tail_mean(rows, key, n):
    return sum(r[key] for r in rows[-n:]) / n


def _head_mean(rows, key, n):
    return sum(r[key] for r in rows[:n]) / n


def _trace_steps(trace) -> list:
    """The `step N` ranges of a profile's Chrome trace (StepProfiler marks each profiled step)."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the step's ops are in it
    return sorted(int(e["name"].split()[1]) for e in events if re.fullmatch(r"step \d+", e.get("name", "")))


def test_one_process_run_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    result = pretrain(run, "train.steps=4", "run.log_every=1", "checkpoint.resume=none", "run.profile_step=2",
                      "run.profile_steps=2")
    assert (run / "config.yaml").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # config.yaml is how to continue the run: `--config RUN/config.yaml` with resume=none there
    # would set every checkpoint aside and start over at each start.
    assert saved["train"]["steps"] == 4 and saved["checkpoint"]["resume"] == "auto"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("step", "epoch", "loss", "loss_mim", "loss_mto", "lr", "images_per_sec"):
        assert key in rows[0], key
    assert all(0 <= r["data_wait"] < 1 for r in rows)  # share of the row's time (see the data-wait test)
    # Achieved model TFLOP/s per GPU (one process here): the row's rate times the model's FLOPs.
    flops = create_mim_model("vit_tiny_patch16", "simmim", img_size=64).flops_per_image()
    assert [r["tflops_per_gpu"] for r in rows] == pytest.approx([r["images_per_sec"] * flops / 1e12 for r in rows])
    # CUDA's allocator peaks (test_peak_memory_...): null on CPU, not a made-up 0.
    assert all(r["max_memory_allocated_gib"] is None and r["max_memory_reserved_gib"] is None for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)  # the demo clips (train.clip_grad=1.0): DeepSpeed's norm
    assert all(r["loss_scale"] is None for r in rows)  # fp32: no loss scaler (fp16's: tests/test_resume.py)
    assert len(rows[0]["heterogeneity"]) == 12  # one value per encoder block of vit_tiny (SimMIM)
    assert rows[-1]["loss"] == rows[-1]["loss_mim"] + rows[-1]["loss_mto"] or \
        abs(rows[-1]["loss"] - rows[-1]["loss_mim"] - rows[-1]["loss_mto"]) < 1e-5
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000004"
    assert json.loads((run / "checkpoints" / latest / "complete.json").read_text())["step"] == 4
    assert json.loads((run / "state.json").read_text()) == {
        "finished": True, "step": 4, "total_steps": 4, "reason": "completed"}
    assert "loss" in result.stdout and "tensorboard --logdir" in result.stdout  # closing summary
    assert "resuming at step" not in result.stderr
    # run.profile_step: steps 2 and 3 under torch.profiler, a trace and an ops table per rank.
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank0_steps2-3.ops.txt",
                                                                  "rank0_steps2-3.trace.json.gz"]
    assert _trace_steps(run / "profile" / "rank0_steps2-3.trace.json.gz") == [2, 3]
    assert "aten::" in (run / "profile" / "rank0_steps2-3.ops.txt").read_text()

    # The logged LR is the schedule's for each step: demo peak blr 1e-3 x 32 / 256; its warm-up of
    # half an epoch (16 steps) is cut to 3 in a 4-step run, so the peak is reached at step 3.
    assert [r["lr"] for r in rows] == pytest.approx([1.25e-4 * f for f in (1 / 3, 2 / 3, 1.0, 1.0)])

    # Resumed with another seed and no warm-up: the data position cannot continue exactly, and the
    # log says why; the LR follows the new schedule from the step the run continues at.
    # A profile that the run's end cuts short (steps 5-7 asked, 5 run) keeps the steps it ran.
    resumed = pretrain(run, "train.steps=5", "run.log_every=1", "run.seed=1", "train.warmup_epochs=0",
                       "run.profile_step=5", "run.profile_steps=3")
    assert "resuming at step 4: run.seed was 0, now 1" in resumed.stderr
    assert _trace_steps(run / "profile" / "rank0_steps5-5.trace.json.gz") == [5]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["lr"] == pytest.approx(1.25e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))  # min ratio 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def test_two_rank_zero2_loss_decreases_on_demo_data(reference):
    """The demo on 2 ranks under ZeRO-2 learns. The run is run_control's uninterrupted reference,
    which the resume tests make anyway (12 steps, 8 to an epoch): the masked-patch loss of its
    last 4 steps is more than 10% below that of its first 4 (0.64 against 0.77 here)."""
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert _tail_mean(rows, "loss_mim", 4) < 0.9 * _head_mean(rows, "loss_mim", 4)


def test_zero3_with_each_block_one_leaf_logs_the_losses_of_zero2(tmp_path):
    """Under ZeRO-3 each transformer block is one DeepSpeed leaf (its weights gathered around the
    block's own call, engine/builder.py), so the MTO path must run inside that call: a weight
    used outside it would be an empty partition. Same data, same seed: ZeRO-3 gives ZeRO-2's
    losses, MTO terms included, here for MAE's decoder blocks. SimMIM's encoder blocks are held
    to the same by test_resume.py's ZeRO-3 case, whose 2-rank steps log the ZeRO-2 reference's
    losses (MTO on from step 1), so they are not run a second time here."""
    losses = {}
    # ZeRO-2 on one rank (two micro-batches of 16 where two ranks take one each: the same losses,
    # as the resume tests show across world sizes), ZeRO-3 on two, where its partitions are.
    for name, nproc in (("cpu_zero2.json", 1), ("cpu_zero3.json", 2)):
        run = tmp_path / name
        pretrain(run, f"deepspeed.config=ds_configs/{name}", "model.method=mae", "train.steps=4",
                 "run.log_every=1", "checkpoint.every_steps=0", "mto.warmup_steps=0", "train.micro_batch_size=16",
                 *SMALL_MAE_DECODER_OVERRIDES, nproc=nproc)
        losses[name] = [(r["loss_mim"], r["loss_mto"]) for r in read_metrics(run)]
    assert len(losses["cpu_zero3.json"]) == 4 and all(mto > 0 for _, mto in losses["cpu_zero3.json"])
    assert losses["cpu_zero3.json"] == [pytest.approx(pair, rel=1e-4) for pair in losses["cpu_zero2.json"]]


def test_two_rank_zero3_with_mto_and_accumulation(tmp_path):
    """ZeRO-3 partitions every parameter, the mask token too; it still trains and moves.
    With 2 micro-batches per step, MTO state advances once per optimizer step. Evaluation at
    each epoch's end gathers the partitioned encoder and gives what `mto-ds eval` gives on the
    checkpoint of the same step; its reconstructions of held-out images (the whole model
    gathered) are what `mto-ds reconstruct` draws from that checkpoint."""
    run = tmp_path / "run"
    evaluation = ("eval.every_epochs=1", "eval.at_start=true", "eval.num_train=64", "eval.num_val=32")
    pretrain(run, "deepspeed.config=ds_configs/cpu_zero3.json", "train.steps=12", "train.micro_batch_size=8",
             "run.log_every=1", "mto.warmup_steps=10", "data.synthetic_images=192", *evaluation, nproc=2)
    # What --dry-run and the start's disk check count a checkpoint at: under ZeRO-3, 12 bytes per
    # parameter (fp32 masters and Adam's moments; the module's weights are their partitions).
    assert checkpoint_bytes(run / "checkpoints" / "step_00000012") == pytest.approx(
        checkpoint_space_of("cpu_zero3.json", img_size=64).each, rel=0.02)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "knn_top1" in r]
    # eval.at_start: the initial encoder at step 0, then 6 steps of 32 per epoch.
    assert [(r["step"], r["epoch"]) for r in evals] == [(0, 0.0), (6, 1.0), (12, 2.0)]
    assert all(0 <= r[k] <= 100 for r in evals for k in ("knn_top1", "linear_top1"))
    offline = subprocess.run([sys.executable, "-m", "mto_ds", "eval", "--config", str(run / "config.yaml"),
                              "--checkpoint", str(run)], cwd=REPO, env=cpu_env(), capture_output=True,
                             text=True, timeout=600)
    assert offline.returncode == 0, offline.stderr[-3000:]
    result = json.loads(offline.stdout.strip().splitlines()[-1])
    assert (result["weights"]["tag"], result["weights"]["step"]) == ("step_00000012", 12)  # which it evaluated
    assert result["knn_top1"] == pytest.approx(evals[-1]["knn_top1"], abs=1e-6)
    assert result["linear_top1"] == pytest.approx(evals[-1]["linear_top1"], abs=1e-6)
    rows = read_metrics(run)
    assert _tail_mean(rows, "loss_mim", 6) < _head_mean(rows, "loss_mim", 6)
    assert [r["mto_scale"] for r in rows[:3]] == [0.1, 0.2, 0.3]  # warm-up counts optimizer steps
    # ZeRO-3 names the file of data-parallel rank 0 zero_pp_rank_0_mp_rank_00_model_states.pt
    (path,) = (run / "checkpoints" / "step_00000012").glob("*pp_rank_0_mp_rank_00_model_states.pt")
    states = torch.load(path, map_location="cpu", weights_only=False)
    assert states["mto"]["step"] == 12 and states["global_steps"] == 12
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000012")
    torch.manual_seed(0)
    initial = create_mim_model("vit_tiny_patch16", "simmim", img_size=64, mto={"enabled": True})
    assert trained["mask_token"].shape == initial.mask_token.shape
    assert not torch.allclose(trained["mask_token"], initial.mask_token.detach(), atol=1e-6)
    # The step-0 row is the evaluation of the initial weights, gathered from their ZeRO-3 shards.
    from mto_ds.eval import evaluate
    at_start = evaluate(initial.encoder, load_config(run / "config.yaml"), torch.device("cpu"))
    assert at_start == pytest.approx({k: evals[0][k] for k in at_start}, abs=1e-6)
    # eval.reconstructions (8): each evaluation's figure in TensorBoard, their mean loss_mim in its
    # row, both what `mto-ds reconstruct` gives on the checkpoint of that step (fp32: same weights).
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    figures = events.Images("eval/reconstructions")
    assert [figure.step for figure in figures] == [0, 6, 12]
    from mto_ds.eval.reconstruct import reconstruct_run  # `mto-ds reconstruct RUN step12.png`, in this process
    printed = reconstruct_run(run, tmp_path / "step12.png", [], count=8, seed=0)
    mean = float(printed[-1].split()[0])
    assert [r["loss_mim_held_out"] for r in evals][-1] == pytest.approx(mean, abs=5e-5)
    assert evals[0]["loss_mim_held_out"] != evals[-1]["loss_mim_held_out"]
    logged = np.asarray(Image.open(io.BytesIO(figures[-1].encoded_image_string)).convert("RGB"), dtype=int)
    offline = np.asarray(Image.open(tmp_path / "step12.png").convert("RGB"), dtype=int)
    assert logged.shape == offline.shape == (8 * 66 + 2, 4 * 66 + 2, 3)  # 8 rows of 4 images of 64 px
    assert np.abs(logged - offline).max() <= 1  # TensorBoard and PNG round to 8 bits each their way


def test_images_per_sec_leaves_out_the_time_spent_saving_checkpoints(tmp_path):
    """metrics.jsonl's images_per_sec is the training rate over the steps since the previous
    row (global batch x steps / wall time, the data wait included); a checkpoint save (here
    stalled 8 s in the save of step 2) or an evaluation between two rows is not training time.
    Counted in, the row after every save read several times too slow."""
    run = tmp_path / "run"
    pretrain(run, "train.steps=6", "run.log_every=2", "checkpoint.every_steps=2",
             env_extra={"MTO_DS_FAULT_SAVE_STALL": "2:8"})
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    # The row of step 4 covers steps 3 and 4 (0.5-2 s a step on one CPU core, the other test
    # worker's load included): with the 8 s stall counted in it would span more than 8 s. (A
    # ratio to the row of step 6 was also load-dependent: load alone moved the two by over 2x.)
    global_batch = 32  # configs/demo.yaml
    assert 2 * global_batch / rows[1]["images_per_sec"] < 8, rows
    # Nor is it waiting for data: the row of step 4 waited less than the stall's 8 s by far.
    assert 2 * global_batch / rows[1]["images_per_sec"] * rows[1]["data_wait"] < 4, rows


# Two ranks with drop-path, rank 1's loader late: one run for the drop-path test and the data-wait
# test below (each 2-rank start costs the suite about half a minute).
DROP_PATH_RUN = ("train.steps=3", "run.log_every=1", "checkpoint.every_steps=0", "train.micro_batch_size=16",
                 "data.synthetic_images=64")


@pytest.fixture(scope="module")
def two_ranks_late_loader(tmp_path_factory):
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    result = pretrain(run, "model.drop_path=0.3", *DROP_PATH_RUN, nproc=2,
                      env_extra={"MTO_DS_FAULT_DATA_STALL": "1.5:1"})
    return run, result


def test_a_two_rank_run_prints_no_deprecation_of_the_all_gather_deepspeed_calls(two_ranks_late_loader):
    """DeepSpeed's ZeRO step calls torch.distributed.all_gather_into_tensor, which torch deprecates
    since 2.13: every rank of every multi-rank run printed the FutureWarning and its source line."""
    run, result = two_ranks_late_loader
    assert "2 ranks x 16 samples" in result.stderr and "ZeRO-2" in result.stderr  # the start's own line
    assert "all_gather_into_tensor" not in result.stderr


def test_data_wait_is_the_share_of_a_row_that_the_rank_waiting_longest_spent_waiting_for_data(two_ranks_late_loader):
    """Is the loader keeping up? Rank 1's micro-batch (one a step) comes 1.5 s late, rank 0's on
    time. In a synchronous step rank 0 then waits for rank 1 in the gradient reduction, not for
    its own data: a row that kept rank 0's share, or the mean of the two, would show half the wait
    or none. A row's seconds: global batch x steps / images_per_sec (rank 0's clock; rank 1's share
    is of its own, a little later: the 10 % below)."""
    run, result = two_ranks_late_loader
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        seconds = 32 / row["images_per_sec"]
        assert 0.9 * 1.5 <= row["data_wait"] * seconds <= seconds, rows
    # The rate is both ranks' together; TFLOP/s are per GPU.
    flops = create_mim_model("vit_tiny_patch16", "simmim", img_size=64).flops_per_image()
    assert [r["tflops_per_gpu"] for r in rows] == pytest.approx([r["images_per_sec"] * flops / 2 / 1e12 for r in rows])
    # The closing summary: the median row's share and the largest, with its step.
    median, most = sorted(rows, key=lambda r: r["data_wait"])[1:]
    assert (f"data wait       {100 * median['data_wait']:.1f}% of the time (median of the rows; "
            f"{100 * most['data_wait']:.1f}% at most, step {most['step']})") in result.stdout


def test_peak_memory_is_read_in_gib_from_cudas_allocator_and_reset_for_the_next_row(monkeypatch):
    from mto_ds.engine.trainer import peak_memory_gib
    peaks = {"allocated": 3 * 2 ** 30, "reserved": 5 * 2 ** 29}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: peaks["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: peaks.update(allocated=0, reserved=0))
    assert peak_memory_gib(torch.device("cuda", 0)) == (3.0, 2.5)
    assert peak_memory_gib(torch.device("cuda", 0)) == (0.0, 0.0)  # the next row's peak starts afresh
    assert peak_memory_gib(torch.device("cpu")) is None


class _AccumulatingEngine:
    """What train_step uses of a DeepSpeed engine: backward divides by the accumulation (as
    DeepSpeed's does) and adds into .grad; the loss is each sample's mean pixel times a weight."""
    device = torch.device("cpu")

    def __init__(self, accumulation):
        self.accumulation, self.micro = accumulation, 0
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.optimizer = type("Optimizer", (), {"param_groups": [{"lr": 1.0}]})()

    def __call__(self, images, mask, mto_scale, with_stats):
        per_sample = (self.weight * images).mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        zero = loss.detach() * 0
        return {"loss": loss, "loss_mim": loss, "loss_mto": zero, "loss_spa": zero, "loss_e": zero,
                "loss_r": zero, "heterogeneity": per_sample.detach()[:1].clone(),
                "entropy_masked": zero.reshape(1), "entropy_visible": zero.reshape(1)}

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def is_gradient_accumulation_boundary(self):
        return self.micro == self.accumulation - 1

    def step(self):
        self.micro = (self.micro + 1) % self.accumulation

    def was_step_applied(self):
        return True


def test_a_micro_batch_short_of_undecodable_images_weighs_each_of_its_samples_as_much_as_any_other():
    """The folder source leaves an undecodable image out of its micro-batch (docs/DATA.md). The
    model's loss is that micro-batch's mean and DeepSpeed weighs micro-batches equally, so its
    samples weighed 4/3 of the others'. Each micro-batch's loss now counts in proportion to its
    samples: every decoded sample of the step weighs 1/(micro-batch x accumulation), and the
    logged loss is the mean over the decoded samples."""
    from mto_ds.engine.step import train_step
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    def micro_batch(start, stop):
        return {"images": images[start:stop], "mask": torch.zeros(stop - start, 1, dtype=torch.bool),
                "index": torch.arange(start, stop)}
    micro_batches = [micro_batch(0, 4), micro_batch(4, 7)]  # one left out
    engine = _AccumulatingEngine(accumulation=2)
    sums, skipped, overflowed = train_step(engine, micro_batches, 1.0, True, samples_per_micro_batch=4)
    per_sample = normalize(images[:7]).mean(dim=(1, 2, 3))
    assert engine.weight.grad.item() == pytest.approx(per_sample.sum().item() / 8, rel=1e-5)
    assert sums["samples"] == 7 and not skipped and not overflowed
    assert (sums["loss"] / sums["samples"]).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    # Whole micro-batches: each loss backpropagated as the model gave it.
    engine = _AccumulatingEngine(accumulation=2)
    micro_batches[1] = micro_batch(4, 8)
    sums, _, _ = train_step(engine, micro_batches, 1.0, True, samples_per_micro_batch=4)
    assert engine.weight.grad.item() == pytest.approx(normalize(images).mean().item(), rel=1e-5)
    assert (sums["loss"] / sums["samples"]).item() == pytest.approx(normalize(images).mean().item(), rel=1e-5)
    # Nothing decoded: the loader's stand-in (one image, no index) runs forward and backward, weighing 0.
    engine = _AccumulatingEngine(accumulation=2)
    micro_batches[1] = dict(micro_batch(4, 5), index=torch.zeros(0, dtype=torch.long))
    sums, skipped, _ = train_step(engine, micro_batches, 1.0, True, samples_per_micro_batch=4)
    assert engine.weight.grad.item() == pytest.approx(normalize(images[:4]).mean(dim=(1, 2, 3)).sum().item() / 8,
                                                      rel=1e-5)
    assert sums["samples"] == 4 and not skipped
    assert (sums["loss"] / sums["samples"]).item() == pytest.approx(normalize(images[:4]).mean().item(), rel=1e-5)
    # A global batch of 7 in micro-batches of 4 and 3 (ranks whose shares differ by a sample):
    # against 3.5 samples per micro-batch, each of the 7 weighs 1/7, not 1/8 or 1/6.
    engine = _AccumulatingEngine(accumulation=2)
    sums, _, _ = train_step(engine, [micro_batch(0, 4), micro_batch(4, 7)], 1.0, True, samples_per_micro_batch=3.5)
    assert engine.weight.grad.item() == pytest.approx(normalize(images[:7]).mean().item(), rel=1e-5)


class _OffsetEngine(_AccumulatingEngine):
    """Its loss also has a gradient on black images (+ weight): the stand-in forward of a
    skipped micro-batch would reach the gradients unless train_step weighs it 0."""

    def __init__(self, accumulation, dtype=torch.float32, applied=True):
        super().__init__(accumulation)
        self.dtype, self.applied = dtype, applied

    def __call__(self, images, mask, mto_scale, with_stats):
        out = super().__call__(images, mask, mto_scale, with_stats)
        out["loss"] = out["loss"] + self.weight
        return {key: value.to(self.dtype) for key, value in out.items()}

    def was_step_applied(self):
        return self.applied


def test_a_nonfinite_loss_makes_the_step_a_no_op_that_deepspeed_still_counts():
    """A NaN loss on this rank (fault injection: poison): no backward of it, a stand-in forward
    and backward weighing 0 in its place (DeepSpeed's accumulation and reduction stay in step with
    the other ranks), the step's learning rate 0, and every micro-batch stepped."""
    from mto_ds.engine.step import train_step
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    micro_batches = [{"images": images[i:i + 4], "mask": torch.zeros(4, 1, dtype=torch.bool),
                      "index": torch.arange(i, i + 4)} for i in (0, 4)]
    engine = _OffsetEngine(accumulation=2)
    sums, skipped, overflowed = train_step(engine, micro_batches, 1.0, True, samples_per_micro_batch=4, poison=True)
    assert skipped and not overflowed and sums["samples"] == 8
    assert engine.weight.grad.item() == 0.0
    assert engine.optimizer.param_groups[0]["lr"] == 0.0 and engine.micro == 0
    # Finite: the same engine's gradient is the mean pixel plus 1, and the LR is left to the trainer.
    engine = _OffsetEngine(accumulation=2)
    _, skipped, _ = train_step(engine, micro_batches, 1.0, False, samples_per_micro_batch=4)
    assert not skipped and engine.optimizer.param_groups[0]["lr"] == 1.0
    assert engine.weight.grad.item() == pytest.approx(normalize(images).mean().item() + 1, rel=1e-5)


def test_the_logged_sums_are_float32_in_a_bf16_run_and_a_step_deepspeed_skipped_is_an_overflow():
    """bf16 sums over a run's samples would keep 3 significant digits; and a step DeepSpeed did
    not apply (fp16's loss scaler: non-finite gradients) is reported as an overflow, not as a
    skipped non-finite loss."""
    from mto_ds.engine.step import train_step
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    micro_batch = {"images": images, "mask": torch.zeros(4, 1, dtype=torch.bool), "index": torch.arange(4)}
    engine = _OffsetEngine(accumulation=1, dtype=torch.bfloat16, applied=False)
    sums, skipped, overflowed = train_step(engine, [micro_batch], 1.0, True, samples_per_micro_batch=4)
    assert overflowed and not skipped
    assert {key: value.dtype for key, value in sums.items() if key != "samples"} == {
        key: torch.float32 for key in sums if key != "samples"}


def test_weights_finite_finds_one_nonfinite_element_in_any_parameter():
    from mto_ds.engine.step import weights_finite
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert weights_finite(model, torch.device("cpu"))
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert not weights_finite(model, torch.device("cpu"))


def test_drop_path_draws_follow_the_micro_batch_so_one_and_two_ranks_log_the_same_losses(tmp_path,
                                                                                         two_ranks_late_loader):
    """The SimMIM recipes train with drop-path (0.1-0.3). Its masks were drawn per (seed, step,
    rank), so a run resumed on another number of ranks drew others and left the uninterrupted
    run's losses. Drawn per (seed, step, the micro-batch's first place in the global batch), the
    micro-batches of 16 that 1 rank accumulates and 2 ranks take one each draw the same masks.
    (The 2-rank run's late loader on rank 1 changes when its data comes, not what it is.)"""
    losses = {(2, 0.3): [r["loss"] for r in read_metrics(two_ranks_late_loader[0])]}
    for drop_path in (0.3, 0.0):
        run = tmp_path / f"ranks1_drop{drop_path}"
        pretrain(run, f"model.drop_path={drop_path}", *DROP_PATH_RUN)
        losses[1, drop_path] = [r["loss"] for r in read_metrics(run)]
    assert len(losses[1, 0.3]) == 3 and losses[2, 0.3] == pytest.approx(losses[1, 0.3], rel=1e-5)
    # Drop-path did act (without it, 1 and 2 ranks log the same losses anyway): from step 1 on,
    # by far more than the 1e-5 above.
    assert all(abs(a - b) > 1e-3 * b for a, b in zip(losses[1, 0.3], losses[1, 0.0])), losses


MASTERS_SCRIPT = r'''
import json, sys, torch, deepspeed
from pathlib import Path
from mto_ds.config import load_config
from mto_ds.engine.distributed import init_distributed, shutdown_distributed
from mto_ds.engine.trainer import fp32_master_encoder
from mto_ds.models import create_mim_model
from mto_ds.models.weights import checkpoint_encoder_state

init_distributed()
out, small_decoder = Path(sys.argv[1]), json.loads(sys.argv[2])
for method, name in (("simmim", "zero2_bf16"), ("mae", "zero1_bf16"), ("mae", "zero3_bf16")):
    cfg = load_config("configs/demo.yaml", [f"model.method={method}", "model.mask_patch_size=null"])
    ds = json.load(open(f"ds_configs/{name}.json"))
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    ds["optimizer"]["params"]["lr"] = 1e-3
    torch.manual_seed(0)
    model = create_mim_model("vit_tiny_patch16", method, img_size=64, **(small_decoder if method == "mae" else {}))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    for _ in range(3):  # masters move by less than a bf16 step
        engine.backward(engine(torch.randn(2, 3, 64, 64), mask)["loss"])
        engine.step()
    encoder = engine.module.encoder
    with deepspeed.zero.GatheredParameters(list(encoder.parameters()), enabled=name.startswith("zero3")):
        copy = fp32_master_encoder(encoder, cfg, torch.device("cpu")).state_dict()
        working = {k: v.detach().float().clone() for k, v in encoder.state_dict().items()}
    engine.save_checkpoint(str(out / name), tag="step")
    (out / name / "step" / "complete.json").write_text("{}")
    saved = checkpoint_encoder_state(out / name / "step")
    print("RESULT", json.dumps({
        "config": name, "dtypes": sorted({str(v.dtype) for v in copy.values()}),
        "same_keys": sorted(copy) == sorted(saved),
        "differing_from_checkpoint": [k for k in copy if not torch.equal(copy[k], saved[k])],
        "differing_from_working_copy": sum(not torch.equal(copy[k], working[k]) for k in copy)}), flush=True)
shutdown_distributed()
'''


def test_evaluation_during_a_bf16_run_reads_the_fp32_master_weights_as_mto_ds_eval_does(tmp_path):
    """A bf16 engine holds a bf16 working copy of the encoder; evaluating it ran the residual
    stream in bf16, while `mto-ds eval` (and the study's final point) reads the checkpoint's fp32
    masters: one curve, two precisions. The encoder evaluated during pre-training holds exactly
    the weights `mto-ds eval` reads from the checkpoint of that step, under ZeRO-1/2/3, MAE's
    frozen pos_embed included."""
    script = tmp_path / "masters.py"
    script.write_text(MASTERS_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), json.dumps(SMALL_MAE_DECODER)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=cpu_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert [r["config"] for r in rows] == ["zero2_bf16", "zero1_bf16", "zero3_bf16"]
    for row in rows:
        assert row["dtypes"] == ["torch.float32"] and row["same_keys"], row
        assert row["differing_from_checkpoint"] == [], row
        assert row["differing_from_working_copy"] > 0, row  # the masters, not the bf16 copy upcast
