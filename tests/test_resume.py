"""Resume after a preemption signal: exact on the same world size, and elastic (2 -> 1 -> 3
ranks, 3 not dividing the global batch) with every sample of the epoch seen once and the losses of the uninterrupted run.

All runs are the 12-step, 2-rank demo of run_control.py; each interrupted run is compared with
the uninterrupted one (`reference`), step by step.
"""
import json
import shutil
import signal
import subprocess
from collections import defaultdict

import pytest
import torch

from conftest import HALF_PRECISION_SMALL, REPO, pretrain, read_metrics
from run_control import STEPS, Run, losses_by_step, metric_steps, reference_run, state

TRACE = {"MTO_DS_TRACE_SAMPLES": "1"}
# Between world sizes the gradient of a step is summed in another order (2 ranks each averaging
# 16 samples and all-reducing, vs one rank accumulating 2 micro-batches of 16), which may change
# the last bits of fp32 sums, and Adam carries that on. Here, on CPU, the losses come out equal;
# on other hardware they need not. 1e-4 relative allows for that and is still far below what one
# skipped or repeated sample would change: the loss moves by percents from one batch to the next.
ELASTIC_RTOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """2 ranks; once step 4 is logged, SIGUSR1 goes to rank 1 only."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    run = Run(run_dir, nproc=2, env=TRACE)
    run.wait_for_step(4)
    run.signal_ranks(signal.SIGUSR1, ranks=[1])
    run.finish(expect=0)
    return run_dir, state(run_dir)["step"]


def _git_commit():
    """The checkout's commit as git reports it; None outside a git checkout (a source archive)."""
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 and (REPO / ".git").exists() else None


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _samples_by_step(run_dir) -> dict:
    """step -> {world_size: {rank: micro-batches}} from every start of the run."""
    steps = defaultdict(lambda: defaultdict(dict))
    for path in (run_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert row["rank"] not in steps[row["step"]][row["world_size"]], f"step {row['step']} ran twice"
            steps[row["step"]][row["world_size"]][row["rank"]] = row["micro_batches"]
    return steps


def _global_batches(run_dir) -> dict:
    """step -> (world size, the step's samples in rank order, micro-batches per rank)."""
    batches = {}
    for step, by_world in _samples_by_step(run_dir).items():
        assert len(by_world) == 1, f"step {step} ran on several world sizes: {sorted(by_world)}"
        ((world, ranks),) = by_world.items()
        assert sorted(ranks) == list(range(world)), f"step {step}: ranks {sorted(ranks)} of {world}"
        samples = [i for r in range(world) for micro in ranks[r] for i in micro]
        batches[step] = (world, samples, {len(ranks[r]) for r in range(world)})
    return batches


def test_usr1_to_one_rank_stops_every_rank_after_its_step_with_a_checkpoint(stopped):
    run_dir, stop = stopped
    assert 4 <= stop < STEPS
    assert state(run_dir) == {"finished": False, "step": stop, "total_steps": STEPS, "reason": "signal SIGUSR1"}
    assert metric_steps(run_dir) == list(range(1, stop + 1))
    tag = f"step_{stop:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert json.loads((run_dir / "checkpoints" / tag / "complete.json").read_text())["step"] == stop


def test_run_resumed_after_a_signal_logs_the_losses_of_the_uninterrupted_run(stopped, reference, tmp_path):
    run_dir, stop = stopped
    run_dir = _copy(run_dir, tmp_path)
    run = Run(run_dir, nproc=2, env=TRACE).finish()
    assert f"resumed from {run_dir}/checkpoints/step_{stop:08d} at step {stop}" in run.output
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    expected = losses_by_step(reference)
    assert losses_by_step(run_dir) == pytest.approx(expected, rel=1e-5)
    assert _global_batches(run_dir) == _global_batches(reference)


def test_elastic_resume_2_to_1_to_3_ranks_sees_each_sample_once_with_the_same_losses(stopped, reference, tmp_path):
    """The last start runs on 3 ranks, which do not divide the global batch of 32: shares of 10,
    11 and 11 samples, each sample weighted 1/32 as on 1 or 2 ranks (before, a config error)."""
    run_dir, first_stop = stopped
    run_dir = _copy(run_dir, tmp_path)
    # One rank, with a DataLoader worker process; SIGTERM to every process of the job, as Slurm
    # sends it: the worker must survive until the rank has saved.
    one = Run(run_dir, "data.num_workers=1", nproc=1, env=TRACE)
    # At least one step on each world size. The first stop depends on when the signal reached
    # rank 1 (a step or two later on a loaded machine), so this start waits for one step only:
    # the 3-rank start must still have steps left.
    one.wait_for_step(first_stop + 1)
    one.signal_all_processes(signal.SIGTERM)
    one.finish(expect=0)
    second_stop = state(run_dir)["step"]
    assert state(run_dir)["reason"] == "signal SIGTERM" and first_stop + 1 <= second_stop < STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{first_stop:08d} at step {first_stop}" in one.output
    assert "was saved on 2 ranks, this run has 1: loading it as a universal checkpoint" in one.output
    three = Run(run_dir, nproc=3, env=TRACE).finish()
    assert f"resumed from {run_dir}/checkpoints/step_{second_stop:08d} at step {second_stop}" in three.output
    assert "was saved on 1 rank, this run has 3: loading it as a universal checkpoint" in three.output
    assert "global batch 32 = 3 ranks x 10-11 samples (the ranks do not divide it)" in three.output
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    # starts.jsonl: each start's world size, where it began, and with what it ran.
    starts = [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]
    assert [(s["world_size"], s["step"]) for s in starts] == [(2, 0), (1, first_stop), (3, second_stop)]
    assert {(s["total_steps"], s["global_batch_size"]) for s in starts} == {(STEPS, 32)}
    assert [s["resumed_from"] for s in starts] == [
        None, *(str(run_dir / "checkpoints" / f"step_{step:08d}") for step in (first_stop, second_stop))]
    assert [sum(s["hosts"].values()) for s in starts] == [sum(s["devices"].values()) for s in starts] == [2, 1, 3]
    assert {s["libraries"]["torch"] for s in starts} == {torch.__version__}
    assert {s["code"]["commit"] for s in starts} == {_git_commit()}
    assert "pretrain" in starts[2]["command"]
    assert "mto_ds 0.1.0 (git " in three.output and "3 rank(s) on 1 host: 3 x cpu" in three.output

    batches = _global_batches(run_dir)
    assert sorted(batches) == list(range(1, STEPS + 1))
    worlds = {step: world for step, (world, _, _) in batches.items()}
    assert worlds == {s: 2 if s <= first_stop else 1 if s <= second_stop else 3 for s in range(1, STEPS + 1)}
    # The global batch stays 32: one rank accumulates 2 micro-batches of 16, two or three ranks take
    # one each (of 16, or of 10 and 11).
    for step, (world, samples, micro_counts) in batches.items():
        assert len(samples) == 32 and micro_counts == {2 if world == 1 else 1}, step
    # Epoch 0 (steps 1-8) visits all 256 samples exactly once; epoch 1 starts a new permutation.
    epoch0 = [i for s in range(1, 9) for i in batches[s][1]]
    assert sorted(epoch0) == list(range(256))
    epoch1 = [i for s in range(9, STEPS + 1) for i in batches[s][1]]
    assert len(set(epoch1)) == len(epoch1) == 128
    # Each step took the same samples, in the same order, as the uninterrupted run.
    reference_batches = _global_batches(reference)
    assert {s: b[1] for s, b in batches.items()} == {s: b[1] for s, b in reference_batches.items()}

    losses, expected = losses_by_step(run_dir), losses_by_step(reference)
    assert [losses[s] for s in range(1, first_stop + 1)] == pytest.approx(
        [expected[s] for s in range(1, first_stop + 1)], rel=1e-5)  # not yet resumed
    assert losses == pytest.approx(expected, rel=ELASTIC_RTOL)


def _stopped_on_2_resumed_on_1(run_dir, *overrides, stop_after, env=None):
    """SIGTERM to both ranks of a 2-rank run once `stop_after` is logged, then the run finished on
    1 rank (through a universal checkpoint). Returns (the step it stopped at, the 1-rank Run)."""
    two = Run(run_dir, *overrides, nproc=2, env=env)
    two.wait_for_step(stop_after)
    two.signal_ranks(signal.SIGTERM)
    two.finish(expect=0)
    stop = state(run_dir)["step"]
    assert state(run_dir)["reason"] == "signal SIGTERM" and stop < STEPS
    one = Run(run_dir, *overrides, nproc=1, env=env).finish()
    assert "this run has 1: loading it as a universal checkpoint" in one.output
    return stop, one


def _killed_after_save_resumed_on_1(reference_dir, run_dir, step, *overrides, env=None):
    """A copy of the uninterrupted 2-rank run in `reference_dir` as a job killed after its save of
    `step` leaves it (the later checkpoints removed), finished on 1 rank through a universal
    checkpoint. Returns the 1-rank Run."""
    shutil.copytree(reference_dir, run_dir)
    for later in (run_dir / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    one = Run(run_dir, *overrides, nproc=1, env=env).finish()
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}" in one.output
    assert "was saved on 2 ranks, this run has 1: loading it as a universal checkpoint" in one.output
    return one


def test_zero3_run_resumed_on_another_world_size_logs_the_losses_of_the_uninterrupted_run(reference, tmp_path):
    """ZeRO-3 (what the ViT-H configs use) saved on 2 ranks after SIGTERM to both, resumed on 1
    through a universal checkpoint (ZeRO-2, the reference's stage, is covered above; ZeRO-1 by the
    bf16 test below: bf16 ZeRO-1 is DeepSpeed's same ZeRO optimizer, stage 1, as fp32 ZeRO-1, and
    the file users run). On CPU an uninterrupted ZeRO-3 run logs the same losses as the ZeRO-2
    reference, so that is the yardstick. Guards the repair of DeepSpeed's ZeRO-3 universal loader
    (shared Adam step counter, weight decay copied to every parameter group), without which the
    losses drift by ~1e-3 within a few steps. The ZeRO-3 steps on 2 ranks also stand for
    test_train.py's check that SimMIM's blocks, each one ZeRO-3 leaf, compute MTO inside their
    gathered call."""
    run_dir = tmp_path / "run"
    _stopped_on_2_resumed_on_1(run_dir, "deepspeed.config=ds_configs/cpu_zero3.json", stop_after=4)
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert losses_by_step(run_dir) == pytest.approx(losses_by_step(reference), rel=ELASTIC_RTOL)


def test_bf16_zero1_run_resumed_on_another_world_size_logs_the_losses_of_its_uninterrupted_run(tmp_path):
    """The file the ViT-B/L recipes ship (bf16 weights, fp32 master copy and Adam moments in
    DeepSpeed's ZeRO-1 partitions, no gradient norm without clipping): the uninterrupted run on
    2 ranks, and a copy of it killed after its step-6 save resumed on 1 through a universal
    checkpoint. On CPU the losses come out equal; ELASTIC_RTOL allows for another summation order."""
    ds = ("deepspeed.config=ds_configs/zero1_bf16.json", "train.clip_grad=null", *HALF_PRECISION_SMALL)
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    Run(reference_dir, *ds, nproc=2).finish()
    one = _killed_after_save_resumed_on_1(reference_dir, run_dir, 6, *ds)
    assert "ZeRO-1, bf16" in one.output
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    losses, expected = losses_by_step(run_dir), losses_by_step(reference_dir)
    assert losses == pytest.approx(expected, rel=ELASTIC_RTOL)
    assert len(set(expected.values())) == STEPS  # the run trains: every step's loss differs


def test_fp16_run_resumed_on_another_world_size_keeps_its_dynamic_loss_scale(tmp_path):
    """fp16's loss scaler is state too: its scale, and how many steps since it last changed.
    The scale starts at 2^24 and halves at each overflow (hysteresis 1) until the gradients are
    finite, then doubles every 3 clean steps. Killed after its step-6 save on 2 ranks, once it
    has settled well below 2^24, and resumed on 1 through a universal checkpoint, the run must log
    the uninterrupted run's scale, overflow count and losses at every step: a scaler restarted at
    2^24 would overflow again and skip steps the uninterrupted run took. fp16 on this CPU:
    tests/fp16_on_cpu/sitecustomize.py."""
    ds = json.loads((REPO / "ds_configs" / "zero2_fp16.json").read_text())
    ds["fp16"].update(initial_scale_power=24, hysteresis=1, loss_scale_window=3)
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    config, env = f"deepspeed.config={tmp_path / 'fp16.json'}", {"PYTHONPATH": str(REPO / "tests" / "fp16_on_cpu")}
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    Run(reference_dir, config, *HALF_PRECISION_SMALL, nproc=2, env=env).finish()
    stop = 6
    one = _killed_after_save_resumed_on_1(reference_dir, run_dir, stop, config, *HALF_PRECISION_SMALL, env=env)
    assert "ZeRO-2, fp16" in one.output

    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    scales = [r["loss_scale"] for r in expected]
    assert scales[0] == 2.0 ** 23 and expected[-1]["overflow_steps"] >= 3  # the scaler did work
    assert scales[stop - 1] <= 2.0 ** 21  # at the stop it stood far from where a new scaler starts
    assert [r["loss_scale"] for r in got] == scales
    assert [r["overflow_steps"] for r in got] == [r["overflow_steps"] for r in expected]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=ELASTIC_RTOL)


def test_resume_warnings_name_each_change_that_breaks_an_exact_continuation():
    from mto_ds.engine.run_dir import resume_warnings
    plan = {"steps_per_epoch": 8, "num_samples": 256, "seed": 0, "order": "exact",
            "global_batch_size": 32, "world_size": 2, "micro_batch_size": 16}
    elastic = dict(plan, world_size=1, micro_batch_size=32)
    assert resume_warnings(plan, elastic) == []            # exact order: any world size
    assert resume_warnings({"global_step": 3}, plan) == []  # a checkpoint older than the keys
    quasi = dict(plan, order="quasi_random")
    (message,) = resume_warnings(quasi, dict(quasi, world_size=1))
    assert "quasi_random was saved on 2 ranks x micro-batch 16, this run has 1 x 16" in message
    assert resume_warnings(quasi, dict(quasi, micro_batch_size=8)) != []
    assert resume_warnings(quasi, quasi) == []
    grown = dict(plan, num_samples=300, steps_per_epoch=9)
    (message,) = resume_warnings(plan, grown)
    assert "256 samples and 8 steps per epoch, this run has 300 and 9" in message
    # Another data set as long in steps (250 samples: still 8 steps of 32): the same epoch and
    # step in it, but not the same samples.
    (message,) = resume_warnings(dict(plan, global_step=11), dict(plan, num_samples=250))
    assert message.endswith("256 samples and 8 steps per epoch, this run has 250 and 8 (another data set or "
                            "global batch): the data position is re-derived from the step, and step 11 was step 3 "
                            "of epoch 1 and is now step 3 of epoch 1, so the logged epoch and the epoch-end "
                            "evaluations follow the new count; samples of the current epoch may repeat or be "
                            "skipped (later epochs are whole)")
    # Another global batch moves the position the step maps to, across whole epochs far into a run.
    imagenet = {"steps_per_epoch": 312, "num_samples": 1281167, "seed": 0, "order": "exact", "global_step": 100000}
    (message,) = resume_warnings(imagenet, dict(imagenet, steps_per_epoch=317))
    assert ("step 100000 was step 160 of epoch 320 and is now step 145 of epoch 315" in message
            and message.endswith("epochs 315 to 319 are read again"))
    (message,) = resume_warnings(dict(imagenet, steps_per_epoch=317), imagenet)
    assert message.endswith("epochs 315 to 319 are skipped")
    # The order itself: the rest of the epoch is drawn anew.
    (message,) = resume_warnings(plan, dict(plan, order="quasi_random"))
    assert message.startswith("data.order was exact, now quasi_random: the rest of the current epoch")
    # MTO's L_r is a hinge per micro-batch: another micro-batch size is another objective.
    with_l_r = dict(plan, hinge_on_micro_batch=True)
    assert resume_warnings(with_l_r, dict(with_l_r, world_size=1)) == []  # same micro-batch, more accumulation
    (message,) = resume_warnings(with_l_r, dict(with_l_r, world_size=1, micro_batch_size=32))
    assert message.startswith("the micro-batches were 16 samples on 2 ranks, now 32 on 1, and group the global "
                              "batch's samples otherwise: MTO's L_r is a hinge on each micro-batch")
    assert "(2 ranks with train.micro_batch_size=16 continue it exactly" in message
    # What counts is which samples share a micro-batch: 3 ranks cut the global batch of 32
    # elsewhere (shares of 10, 11, 11).
    assert resume_warnings(with_l_r, dict(with_l_r, world_size=4, micro_batch_size=8)) != []
    (message,) = resume_warnings(with_l_r, dict(with_l_r, world_size=3, micro_batch_size=11))
    assert message.startswith("the micro-batches were 16 samples on 2 ranks, now 11 on 3")
    # A checkpoint from before the global batch was saved (its ranks divided it): 4 ranks x 2
    # regroup on 5 ranks (shares 6, 6, 7, 6, 7) at the same micro-batch size of 2.
    old = {key: value for key, value in dict(with_l_r, world_size=4, micro_batch_size=2).items()
           if key != "global_batch_size"}
    assert resume_warnings(old, dict(with_l_r, world_size=5, micro_batch_size=2)) != []
    assert resume_warnings(old, dict(with_l_r, world_size=2, micro_batch_size=2)) == []
    assert resume_warnings(plan, elastic) == []  # without L_r the micro-batch size changes nothing
    assert [m.split(":")[0] for m in resume_warnings(plan, dict(grown, seed=4))] == [
        "the checkpoint was saved with 256 samples and 8 steps per epoch, this run has 300 and 9 (another "
        "data set or global batch)", "run.seed was 0, now 4"]


def test_a_run_with_mto_l_r_resumed_with_another_micro_batch_size_is_warned_its_objective_changed(tmp_path):
    """L_r is a hinge per micro-batch (docs/MTO.md, section 4): the trainer saves whether the run
    has it, and a resume with another train.micro_batch_size says the objective changed."""
    run = tmp_path / "run"
    pretrain(run, "train.steps=2", "data.synthetic_images=64")  # the demo: MTO on, 8 late blocks
    result = pretrain(run, "train.steps=3", "data.synthetic_images=64", "train.micro_batch_size=16")
    assert "the micro-batches were 32 samples on 1 rank, now 16 on 1, and group the global batch's samples " \
           "otherwise: MTO's L_r is a hinge" in result.stderr
    # Without L_r (lambda_r=0, or MTO off) the trainer saves that the micro-batch size does not
    # matter, and resume_warnings (tested above) then says nothing of it.
    from types import SimpleNamespace
    from mto_ds.engine.trainer import Trainer
    from mto_ds.models import create_mim_model
    for mto, has_l_r in [({"enabled": True, "lambda_r": 0.1}, True), ({"enabled": True, "lambda_r": 0.0}, False),
                         ({"enabled": False, "lambda_r": 0.1}, False)]:
        model = create_mim_model("vit_tiny_patch16", "simmim", img_size=32, mto=mto)
        assert Trainer._l_r_active(SimpleNamespace(engine=SimpleNamespace(module=model))) is has_l_r, mto
