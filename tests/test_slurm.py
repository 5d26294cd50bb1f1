"""The Slurm templates, submitted to a real Slurm on this host (tests/slurm_cluster.py): one node,
and for one test two nodes (two slurmd of this host).

Each job is slurm/pretrain.sbatch or slurm/sweep.sbatch as users submit it, with the CPU
overrides that turn the 8-node GPU example into 2 gloo ranks of the demo config: sbatch
options on the command line (they win over the #SBATCH lines) and MTO_* variables.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import NO_COMPILER, read_metrics
from run_control import metric_steps

try:
    from . import slurm_cluster as harness
except ImportError:
    import slurm_cluster as harness

slurm_cluster = harness.slurm_cluster  # the fixtures
slurm_cluster_2nodes = harness.slurm_cluster_2nodes

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
SWEEP = REPO / "slurm" / "sweep.sbatch"

# The GPU template's resources, shrunk to CPU tasks on this one node.
CPU_OPTIONS = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30")


def cpu_env(run_dir: Path = None, **extra: str) -> dict:
    """MTO_* variables for the demo on gloo: what a user would export before sbatch."""
    env = {
        "MTO_ROOT": str(REPO),
        "MTO_CONFIG": "configs/demo.yaml",
        "MTO_OVERRIDES": "deepspeed.config=ds_configs/cpu_zero2.json run.log_every=1 "
                         "run.progress_bar=false checkpoint.every_steps=0",
        "MTO_DATA_PATH": "",
        "MTO_PYTHON": sys.executable,
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        # DeepSpeed JIT-builds its CPU comm op into a cache keyed by name only; Python
        # environments sharing one cache rebuild it for each other (minutes each).
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
        **NO_COMPILER,
    }
    try:  # the template's MASTER_ADDR is the node's hostname; some CI containers cannot resolve it
        socket.gethostbyname(socket.gethostname().split(".")[0])
    except OSError:
        env["MTO_MASTER_ADDR"] = "127.0.0.1"
    if run_dir is not None:
        env["MTO_RUN_DIR"] = str(run_dir)
    env.update(extra)
    return env


def job_log(job: dict) -> str:
    path = Path(job.get("StdOut", ""))
    return path.read_text(errors="replace") if path.is_file() else f"(no job log at {path})"




def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def zero_shards(checkpoint: Path) -> list:
    return sorted(p.name for p in checkpoint.glob("zero_pp_rank_*_optim_states.pt"))


STEPS = 8  # both pretrain jobs: the signalled one is compared step by step with the other


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_cluster, tmp_path_factory):
    """pretrain.sbatch on 2 gloo ranks, run to the end, with the .beton staged per node."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp / "run"
    beton = tmp / "shared" / "train.beton"  # stands in for the dataset on shared storage
    beton.parent.mkdir()
    beton.write_bytes(b"not a real beton: staging only copies it")
    env = cpu_env(run_dir, MTO_DATA_PATH=str(beton), MTO_DATA_STAGE_DIR=str(tmp / "node_local"))
    (tmp / "job logs").mkdir()  # a space in the log's path, which slurm_jobs.log names
    job_id = slurm_cluster.sbatch(PRETRAIN, f"train.steps={STEPS}", env=env, cwd=REPO,
                                  options=(*CPU_OPTIONS, f"--output={tmp}/job logs/%x-%j.out"))
    [job] = slurm_cluster.wait_final(job_id, timeout=480)
    return job, run_dir, beton, tmp / "node_local" / "train.beton"


def test_pretrain_template_trains_two_gloo_ranks_to_the_end(uninterrupted_job):
    job, run_dir, beton, staged = uninterrupted_job
    log = job_log(job)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}, log
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    # Two ranks trained together: ZeRO-2 wrote one optimizer shard per rank.
    assert zero_shards(run_dir / "checkpoints" / f"step_{STEPS:08d}") == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], log
    # The .beton was staged to node-local storage and the run pointed at the copy.
    assert staged.read_bytes() == beton.read_bytes()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["path"] == str(staged)
    # The demo config trains on generated images: a .beton given to it is said not to be read
    # (a user who forgot data.source=ffcv trained on them unseen).
    assert f"data.path={staged} is not read: data.source=synthetic trains on 1024 generated images" in log
    assert config["data"]["num_workers"] == 1  # MTO_WORKERS_PER_GPU defaults to --cpus-per-task
    assert f"run finished: step {STEPS} of {STEPS}" in log
    [start] = (run_dir / "slurm_jobs.log").read_text().splitlines()
    assert start.endswith(f" job {job['JobId']} restart 0 nodes 1 ({job['NodeList']}) log {job['StdOut']}"), start
    assert job["StdOut"] == f"{run_dir.parent}/job logs/{job['JobName']}-{job['JobId']}.out"


# srun's one task per rank always; the per-node launchers on request (about 2 min each):
# MTO_DS_SLURM_LAUNCHERS=torchrun,deepspeed
LAUNCHERS = ["srun"] + [x for x in os.environ.get("MTO_DS_SLURM_LAUNCHERS", "").split(",") if x]


def signal_batch_shell_after_two_steps(slurm_cluster, run_dir: Path, tmp_path: Path, launcher: str,
                                       signal_name: str, *overrides: str, between_starts=None,
                                       options=CPU_OPTIONS, env=None) -> dict:
    """Submit the pretrain template, wait until it has logged two steps, signal its batch shell
    alone (as `--signal=B:<SIG>@T` does; by hand so the test does not wait for Slurm's 30-60 s
    signal timer) and return the job once it has ended. `between_starts(job_id)` runs while the
    requeued job waits to start again; `env` adds MTO_* variables to cpu_env's."""
    job_id = slurm_cluster.sbatch(PRETRAIN, f"train.steps={STEPS}", *overrides,
                                  env=cpu_env(run_dir, MTO_LAUNCHER=launcher, **(env or {})),
                                  cwd=REPO, options=(*options, f"--output={tmp_path}/%x-%j.out"))
    deadline = time.monotonic() + 480
    while len(metric_steps(run_dir)) < 2:
        [job] = slurm_cluster.jobs(job_id)
        assert job["JobState"] in ("PENDING", "RUNNING"), job_log(job)
        assert time.monotonic() < deadline, f"no training progress\n{job_log(job)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--batch", f"--signal={signal_name}", job_id)
    if between_starts is not None:
        while True:
            [job] = slurm_cluster.jobs(job_id)
            if (job["JobState"], job["Restarts"]) == ("PENDING", "1"):
                break
            # COMPLETING: the requeued job's processes are ending (seen on 2 nodes).
            assert job["JobState"] in ("RUNNING", "COMPLETING") and time.monotonic() < deadline, job_log(job)
            time.sleep(0.2)
        between_starts(job_id)
    [job] = slurm_cluster.wait_final(job_id, timeout=480)
    return job


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_signalled_job_checkpoints_requeues_itself_and_resumes_to_the_exact_step_count(
        slurm_cluster, uninterrupted_job, tmp_path, launcher):
    """USR1 to the batch shell, as `--signal=B:USR1@600` sends it before the time limit. The job
    was submitted with `checkpoint.resume=none` (start over in this directory): the requeued job
    runs the same command and must continue from its own checkpoint, not start over again."""
    run_dir = tmp_path / "run"
    left = {}

    def leave_a_claim_of_this_job(job_id):
        # The first start exited cleanly and gave the run directory back. Then leave the claim a
        # start of this job killed while saving leaves (ranks killed, node lost), held by a live
        # pid so that only its job id can tell that it is dead: the requeued start must take it
        # over at once, not after 30 s without a heartbeat.
        left["running.json"] = (run_dir / "running.json").exists()
        (run_dir / "running.json").write_text(json.dumps({
            "job": f"slurm:{job_id}", "host": socket.gethostname(), "pid": os.getpid(),
            "started": "2026-01-01 00:00:00", "token": "0" * 16, "beat": 0}))

    job = signal_batch_shell_after_two_steps(slurm_cluster, run_dir, tmp_path, launcher, "USR1",
                                             "checkpoint.resume=none", between_starts=leave_a_claim_of_this_job)
    log = job_log(job)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert left == {"running.json": False}, log
    # at once, by its job id: not after watching the claim for 30 s
    assert (f"running.json: taking the run directory over from a start that has ended (slurm:{job['JobId']} on "
            f"{socket.gethostname()}, pid {os.getpid()}: an earlier run of this job, restart 0)") in log, log
    assert not (run_dir / "running.json").exists(), log
    # The first start stopped part-way with a complete checkpoint and requeued itself ...
    stopped = re.search(r"checkpointed at step (\d+) of (\d+) \(signal SIGUSR1\); requeueing as restart 1", log)
    assert stopped, log
    stopped_at = int(stopped.group(1))
    assert 2 <= stopped_at < STEPS, log
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "complete.json").is_file()
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log
    # ... and the second start finished the run: every step exactly once, and the same
    # losses as the job that was never interrupted.
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}, log
    assert metric_steps(run_dir) == list(range(1, STEPS + 1)), log
    reference = [r["loss"] for r in read_metrics(uninterrupted_job[1])]
    assert [r["loss"] for r in read_metrics(run_dir)] == pytest.approx(reference, rel=1e-5)
    starts = (run_dir / "slurm_jobs.log").read_text().splitlines()
    assert [re.search(r"restart (\d+)", s).group(1) for s in starts] == ["0", "1"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_run_preempted_on_2_nodes_continues_on_1_node_of_another_job_with_the_losses_of_the_uninterrupted_run(
        slurm_cluster_2nodes, uninterrupted_job, tmp_path, launcher):
    """A run on 2 nodes x 1 rank (one GPU each, say) with the .beton staged on each node gets USR1 in
    its batch shell after two steps: it checkpoints and requeues itself. Its user would rather not
    wait for 2 nodes again: they cancel the pending job and submit the run again on 1 node
    (`MTO_RUN_DIR=<its run dir> sbatch --nodes=1`), while the node that ran the first batch shell
    and rank 0 is drained. The new job runs on the other node alone: another first node and
    rendezvous, 1 rank loading the 2-rank checkpoint as a universal checkpoint. The run must end
    with every step once and the losses of the uninterrupted job (1 node x 2 ranks)."""
    from test_resume import ELASTIC_RTOL
    cluster = slurm_cluster_2nodes
    run_dir = tmp_path / "run"
    beton = tmp_path / "shared" / "train.beton"
    beton.parent.mkdir()
    beton.write_bytes(os.urandom(1 << 20))
    stage = tmp_path / "node_local"  # both nodes are this host: they share this directory
    data = {"MTO_DATA_PATH": str(beton), "MTO_DATA_STAGE_DIR": str(stage)}
    first, other = sorted(cluster.nodes)  # Slurm lists a job's nodes by name: localhost first
    two_nodes = ("--nodes=2", "--ntasks-per-node=1", *CPU_OPTIONS[2:])

    def cancel_and_drain(job_id):
        cluster.run("scancel", job_id)
        cluster.run("scontrol", "update", f"NodeName={first}", "State=DRAIN", "Reason=maintenance")

    # 1 rank accumulates 2 micro-batches of 16 where 2 ranks had one each: MTO's L_r (a hinge on
    # each micro-batch) stays the same objective (docs/ROBUSTNESS.md).
    micro = "train.micro_batch_size=16"
    try:
        stopped_job = signal_batch_shell_after_two_steps(cluster, run_dir, tmp_path, launcher, "USR1", micro,
                                                         between_starts=cancel_and_drain, options=two_nodes,
                                                         env=data)
        job_id = cluster.sbatch(PRETRAIN, f"train.steps={STEPS}", micro, cwd=REPO,
                                env=cpu_env(run_dir, MTO_LAUNCHER=launcher, **data),
                                options=("--nodes=1", "--ntasks-per-node=1", *CPU_OPTIONS[2:],
                                         f"--output={tmp_path}/%x-%j.out"))
        [job] = cluster.wait_final(job_id, timeout=480)
    finally:
        cluster.run("scontrol", "update", f"NodeName={first}", "State=RESUME", check=False)
    stopped_log, log = job_log(stopped_job), job_log(job)
    assert (stopped_job["JobState"], stopped_job["Restarts"]) == ("CANCELLED", "1"), stopped_log
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert (job["NumNodes"], job["NodeList"], job["BatchHost"]) == ("1", other, other), log
    # Each start's nodes as its batch shell recorded them, and the rendezvous on its first node.
    starts = [re.search(r" job (\d+) restart (\d) nodes (\d) \((\S+)\) ", line).groups()
              for line in (run_dir / "slurm_jobs.log").read_text().splitlines()]
    assert starts == [(stopped_job["JobId"], "0", "2", f"{first},{other}"), (job_id, "0", "1", other)], log
    masters = re.findall(rf"launcher {launcher}; master (\S+):", stopped_log + log)
    pinned = cpu_env().get("MTO_MASTER_ADDR")  # where this host's name does not resolve
    assert masters == ([pinned] * 2 if pinned else [first, other]), stopped_log + log
    # Slurm's own record: the first job ran its staging step (.0) and its training step (.1) on
    # both nodes, the second job both steps on the node left.
    jobs = rf"(?:{stopped_job['JobId']}|{job_id})"
    launched = {node: re.findall(rf"launch task StepId=({jobs}\.\d+) ", cluster.slurmd_log(node))
                for node in (first, other)}
    ran = [f"{stopped_job['JobId']}.0", f"{stopped_job['JobId']}.1"]
    assert launched == {first: ran, other: ran + [f"{job_id}.0", f"{job_id}.1"]}, launched
    # The staged copy is the .beton, no temporary copy is left, and the run read it.
    assert sorted(p.name for p in stage.iterdir()) == ["train.beton"]
    assert (stage / "train.beton").read_bytes() == beton.read_bytes()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"] == str(stage / "train.beton")
    # 2 ranks on 2 nodes saved one ZeRO shard each; 1 rank loaded them and saved one.
    stopped = re.search(rf"checkpointed at step (\d+) of {STEPS} \(signal SIGUSR1\); requeueing as restart 1",
                        stopped_log)
    assert stopped, stopped_log
    stop = int(stopped.group(1))
    assert 2 <= stop < STEPS, stopped_log
    saved = run_dir / "checkpoints" / f"step_{stop:08d}"
    assert json.loads((saved / "complete.json").read_text())["world_size"] == 2
    assert zero_shards(saved) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"], stopped_log
    assert f"checkpoint {saved} was saved on 2 ranks, this run has 1: loading it as a universal checkpoint" in log
    assert f"resumed from {saved} at step {stop}" in log
    assert "L_r is a hinge" not in log and "global batch 32 = 1 rank x 32 samples, in 2 micro-batch(es) of " \
        "at most 16" in log, log
    assert zero_shards(run_dir / "checkpoints" / f"step_{STEPS:08d}") == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    # Every step once, and the losses of the job that was never stopped: the same up to the stop
    # (the same 2 ranks, on 2 nodes instead of 1), within ELASTIC_RTOL after it (1 rank).
    assert state(run_dir) == {"finished": True, "step": STEPS, "total_steps": STEPS, "reason": "completed"}, log
    assert metric_steps(run_dir) == list(range(1, STEPS + 1)), log
    losses = [r["loss"] for r in read_metrics(run_dir)]
    reference = [r["loss"] for r in read_metrics(uninterrupted_job[1])]
    assert losses[:stop] == pytest.approx(reference[:stop], rel=1e-5)
    assert losses == pytest.approx(reference, rel=ELASTIC_RTOL)
    assert not (run_dir / "running.json").exists(), log


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_term_to_the_batch_shell_reaches_the_ranks_which_save_and_the_job_is_not_requeued(
        slurm_cluster, tmp_path, launcher):
    """TERM to the batch shell only, as `--signal=B:TERM@T` or `scancel --batch --signal=TERM`
    send it. srun answers a TERM of its own by killing its tasks outright ("forcing job
    termination"), so the shell has Slurm deliver it to the ranks instead: they finish the
    step, save a complete checkpoint and exit 0; the job stops there (TERM never requeues)."""
    run_dir = tmp_path / "run"
    job = signal_batch_shell_after_two_steps(slurm_cluster, run_dir, tmp_path, launcher, "TERM")
    log = job_log(job)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "1:0", "0"), log
    if launcher == "srun":  # DeepSpeed's launcher exits 1 on TERM whatever its ranks did
        assert "training step exited with status 0" in log
    final = state(run_dir)
    assert (final["finished"], final["reason"]) == (False, "signal SIGTERM"), log
    assert 2 <= final["step"] < STEPS
    assert (run_dir / "checkpoints" / f"step_{final['step']:08d}" / "complete.json").is_file(), log
    assert "not requeueing" in log


def test_duplicate_sbatch_on_a_live_run_stops_with_exit_2_without_requeueing_and_the_first_job_finishes(
        slurm_cluster, tmp_path):
    """A second sbatch with the same MTO_RUN_DIR while the first job runs (docs/ROBUSTNESS.md,
    running.json). The first job stalls in its last save, its heartbeat going on, until the
    duplicate has ended, so that the duplicate finds it alive however slowly its ranks start (a
    fixed 30 s stall ended first on a loaded machine: the duplicate then resumed the finished run)."""
    run_dir, steps, release = tmp_path / "run", 4, tmp_path / "end_the_stall"
    options = (*CPU_OPTIONS, "--oversubscribe", f"--output={tmp_path}/%x-%j.out")
    first = slurm_cluster.sbatch(PRETRAIN, f"train.steps={steps}", cwd=REPO, options=options,
                                 env=cpu_env(run_dir, MTO_DS_FAULT_SAVE_STALL=f"{steps}:400",
                                             MTO_DS_FAULT_SAVE_STALL_UNTIL=str(release)))
    deadline = time.monotonic() + 480
    while True:
        [job] = slurm_cluster.jobs(first)
        if "fault injection: stalling" in job_log(job):
            break
        assert job["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, job_log(job)
        time.sleep(0.2)
    duplicate = slurm_cluster.sbatch(PRETRAIN, f"train.steps={steps}", env=cpu_env(run_dir), cwd=REPO,
                                     options=options)
    [dup] = slurm_cluster.wait_final(duplicate, timeout=300)
    dup_log = job_log(dup)
    assert slurm_cluster.jobs(first)[0]["JobState"] == "RUNNING", dup_log  # it met a live start
    release.touch()
    assert (dup["JobState"], dup["ExitCode"], dup["Restarts"]) == ("FAILED", "2:0", "0"), dup_log
    assert f"is in use by another start (slurm:{first} on {socket.gethostname()}" in dup_log
    assert "training step stopped on a config error (exit status 2, named above); not requeueing" in dup_log

    [job] = slurm_cluster.wait_final(first, timeout=240)
    log = job_log(job)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert state(run_dir) == {"finished": True, "step": steps, "total_steps": steps, "reason": "completed"}, log
    assert metric_steps(run_dir) == list(range(1, steps + 1)), log
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "complete.json").is_file(), log
    assert not (run_dir / "running.json").exists() and not list(run_dir.glob("config.*.yaml")), log


def test_sweep_array_runs_each_element_in_its_own_run_dir(slurm_cluster, tmp_path):
    sweep_dir, steps = tmp_path / "study", 3
    # One rank per element so both elements run at once on this node.
    options = ("--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
               "--time=30", "--oversubscribe", f"--output={tmp_path}/%x-%A_%a.out")
    job_id = slurm_cluster.sbatch(SWEEP, f"train.steps={steps}", env=cpu_env(MTO_SWEEP_DIR=str(sweep_dir)),
                                  cwd=REPO, options=options)
    jobs = slurm_cluster.wait_final(job_id, timeout=480)
    logs = "\n".join(job_log(j) for j in jobs)

    assert sorted((j["ArrayTaskId"], j["JobState"], j["ExitCode"]) for j in jobs) == [
        ("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], logs
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["baseline-ep100-s0", "mto-ep100-s0"]
    for name, mto_enabled in (("baseline-ep100-s0", False), ("mto-ep100-s0", True)):
        run_dir = sweep_dir / name
        assert state(run_dir)["step"] == steps and state(run_dir)["finished"], logs
        assert metric_steps(run_dir) == list(range(1, steps + 1))
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["mto"]["enabled"], config["train"]["epochs"], config["run"]["seed"]) == (mto_enabled, 100, 0)
        assert config["run"]["output_dir"] == str(run_dir)
        assert not (run_dir / "running.json").exists(), logs
    # Each element is its own Slurm job: a claim it leaves is never taken for a sibling's.
    job_ids = {j["ArrayTaskId"]: j["JobId"] for j in jobs}
    for name, task in (("baseline-ep100-s0", "0"), ("mto-ep100-s0", "1")):
        starts = (sweep_dir / name / "slurm_jobs.log").read_text().splitlines()
        assert [(s.split()[3], Path(s.split()[-1]).name) for s in starts] == [
            (job_ids[task], f"mto-sweep-{job_id}_{task}.out")], starts
    assert "is in use by another start" not in logs and "taking the run directory over" not in logs, logs


def test_sweep_lists_baseline_and_mto_side_by_side_for_each_budget():
    out = subprocess.run(["bash", str(SWEEP), "--list"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[:2] == ["0 baseline-ep100-s0 mto.enabled=false train.epochs=100 run.seed=0",
                         "1 mto-ep100-s0 mto.enabled=true train.epochs=100 run.seed=0"]
    assert lines[-1] == f"submit with --array=0-{len(lines) - 2}"
    names = [line.split()[1] for line in lines[:-1]]
    assert len(set(names)) == len(names)  # every element gets its own run directory


def test_sweep_element_of_a_method_without_overrides_fails_instead_of_running_the_config_as_is(tmp_path):
    """A method added to SWEEP_METHODS but not to sweep_method_overrides must not run the config's
    default under that method's name (a mislabelled run in the study)."""
    script = tmp_path / "sweep.sbatch"
    script.write_text(SWEEP.read_text().replace("SWEEP_METHODS=(baseline mto)", "SWEEP_METHODS=(baseline mto_early)"))
    listed = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True)
    assert listed.returncode == 2, listed.stdout + listed.stderr
    assert "sweep.sbatch: unknown method mto_early" in listed.stderr
    element = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                             env={"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_ID": "1", "MTO_ROOT": str(tmp_path)})
    assert element.returncode == 2 and "sweep element" not in element.stdout, element.stdout + element.stderr
    assert "sweep.sbatch: unknown method mto_early" in element.stderr


# ---- The batch shell's decisions, without Slurm (slurm/lib.sh sourced by bash) ----------

def run_lib(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`script` in bash after sourcing slurm/lib.sh, with `scontrol requeue` recorded, not run."""
    prelude = (f"source {REPO / 'slurm' / 'lib.sh'}\n"
               f"scontrol() {{ [[ $1 == requeue ]] || {{ command scontrol \"$@\"; return; }}\n"
               f"             echo \"scontrol $*\" >>{tmp_path / 'scontrol.calls'}; }}\n")
    base = {"PATH": os.environ["PATH"], "MTO_PYTHON": sys.executable, "MTO_RUN_DIR": str(tmp_path),
            "MTO_MAX_RESTARTS": "2", "SLURM_JOB_ID": "42"}
    return subprocess.run(["bash", "-c", prelude + script], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("signals, restart, state_json, exit_code, requeued", [
    (" USR1", 0, {"finished": False, "step": 3, "total_steps": 8, "reason": "signal SIGUSR1"}, 0, True),
    (" USR1", 1, None, 0, True),  # ranks died before saving: resume from the checkpoint before
    (" USR1", 2, {"finished": False, "step": 5, "total_steps": 8, "reason": "signal SIGUSR1"}, 3, False),
    (" USR1 TERM", 0, {"finished": False, "step": 3, "total_steps": 8, "reason": "signal SIGTERM"}, 1, False),
    ("", 0, {"finished": False, "step": 3, "total_steps": 8, "reason": "non-finite loss"}, 1, False),
    (" USR1", 0, {"finished": True, "step": 8, "total_steps": 8, "reason": "completed"}, 0, False),
    # USR1 to the ranks only (--signal=USR1@T without B:, scancel --signal=USR1 without --batch)
    ("", 0, {"finished": False, "step": 3, "total_steps": 8, "reason": "signal SIGUSR1"}, 0, True),
    (" TERM", 0, {"finished": False, "step": 3, "total_steps": 8, "reason": "signal SIGUSR1"}, 1, False),
    ("", 0, {"finished": False, "step": 3, "total_steps": 8, "reason": "signal SIGTERM"}, 1, False),
])
def test_job_requeues_only_after_usr1_on_an_unfinished_run_within_the_restart_limit(
        tmp_path, signals, restart, state_json, exit_code, requeued):
    if state_json is not None:
        (tmp_path / "state.json").write_text(json.dumps(state_json))
    out = run_lib(f'MTO_SIGNALS="{signals}"; mto_finish 0 {restart}', tmp_path)
    assert out.returncode == exit_code, out.stdout + out.stderr
    calls = tmp_path / "scontrol.calls"
    assert (calls.read_text() if calls.exists() else "") == ("scontrol requeue 42\n" if requeued else "")


@pytest.mark.parametrize("signals, state_json", [
    # The live start's state.json, written while this one was stopping: checkpointed or finished.
    ("", {"finished": False, "step": 3, "total_steps": 8, "reason": "signal SIGUSR1"}),
    ("", {"finished": True, "step": 8, "total_steps": 8, "reason": "completed"}),
    (" USR1", None),  # preempted while it started
])
def test_step_stopped_by_a_config_error_is_not_requeued_nor_judged_by_another_starts_state_json(
        tmp_path, signals, state_json):
    """A duplicate sbatch on a live run directory stops with exit 2 (docs/ROBUSTNESS.md, running.json).
    It must not requeue itself, nor pass for finished, on the word of the live start's state.json."""
    if state_json is not None:
        (tmp_path / "state.json").write_text(json.dumps(state_json))
    out = run_lib(f'MTO_SIGNALS="{signals}"; mto_finish 2 0', tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "training step stopped on a config error (exit status 2, named above); not requeueing" in out.stdout
    assert not (tmp_path / "scontrol.calls").exists(), out.stdout


@pytest.mark.parametrize("signals, exit_code, requeued, message", [
    (" USR1", 0, True, "checkpointed at step ? of ? (no state.json); requeueing as restart 1"),
    ("", 1, False, "run not finished (step ? of ?, no state.json); not requeueing"),
])
def test_requeue_decision_survives_set_euo_pipefail_in_the_site_set_up(tmp_path, signals, exit_code, requeued,
                                                                        message):
    """`set -euo pipefail` is what many sites put at the top of a job script (the template's
    "Site set-up"): reading an absent state.json must not end the batch shell there, silently
    and without the requeue that a USR1 asked for."""
    out = run_lib(f'set -euo pipefail; MTO_SIGNALS="{signals}"; mto_finish 0 0', tmp_path)
    assert out.returncode == exit_code, out.stdout + out.stderr
    assert message in out.stdout, out.stdout + out.stderr
    calls = tmp_path / "scontrol.calls"
    assert (calls.read_text() if calls.exists() else "") == ("scontrol requeue 42\n" if requeued else "")


def test_an_array_element_requeues_and_signals_itself_not_the_whole_array(tmp_path):
    """One element of an array keeps the array's own id as its SLURM_JOB_ID, and that bare id
    names every element: its `scontrol requeue` requeued all the running siblings (killed, no
    save) and re-ran the finished ones, and its TERM reached them all. ARRAY_TASK is the element."""
    element = {"SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "7"}
    (tmp_path / "state.json").write_text(json.dumps({"finished": False, "step": 3, "total_steps": 8,
                                                     "reason": "signal SIGUSR1"}))
    out = run_lib('MTO_SIGNALS=" USR1"; mto_finish 0 0', tmp_path, **element)
    assert out.returncode == 0 and (tmp_path / "scontrol.calls").read_text() == "scontrol requeue 1234_7\n", \
        out.stdout + out.stderr
    script = (f"scancel() {{ echo \"scancel $*\" >>{tmp_path / 'scancel.calls'}; }}\n"
              f"{signal_once_the_step_runs('TERM', tmp_path)} & mto_run_step bash -c \"{step_until_done(tmp_path)}\"")
    out = run_lib(script, tmp_path, **element)
    assert (tmp_path / "scancel.calls").read_text() == "scancel --signal=TERM 1234_7\n", out.stdout + out.stderr


def test_a_usr1_during_the_site_set_up_is_kept_and_the_job_requeues(tmp_path):
    """The traps came with lib.sh, sourced after the site set-up (module load, conda, a
    container): a USR1 then (a short --time, an early preemption notice) killed the batch shell,
    no requeue. Now it is noted, and the job requeues without starting the training step, as a
    USR1 during staging does (nothing to checkpoint yet)."""
    template = tmp_path / "pretrain.sbatch"
    text = PRETRAIN.read_text()
    assert "#   module load cuda/12.4 nccl\n" in text
    template.write_text(text.replace("#   module load cuda/12.4 nccl\n", "kill -USR1 $$; sleep 0.5\n"))
    bin_dir = Path(fake_slurm_bin(tmp_path, srun_exit=1).split(":")[0])
    (bin_dir / "srun").write_text("#!/bin/bash\necho srun ran\nexit 1\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\n[[ $1 == requeue ]] && echo \"scontrol $*\" >>{tmp_path / 'calls'}\n"
                                      "[[ \"$1 $2\" == 'show hostnames' ]] && echo node1\nexit 0\n")
    job_env = {**cpu_env(tmp_path / "run"), "PATH": f"{bin_dir}:{os.environ['PATH']}", "MTO_ROOT": str(REPO),
               "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1",
               "MTO_RUN_DIR": str(tmp_path / "run")}
    out = subprocess.run(["bash", str(template)], env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "batch shell got SIGUSR1 before training started" in out.stdout
    assert "got SIGUSR1 before training started; not starting it" in out.stdout and "srun ran" not in out.stdout
    assert (tmp_path / "calls").read_text() == "scontrol requeue 42\n"


@pytest.mark.parametrize("layout, ranks", [({"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8"}, "4"),
                                           ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)"}, "4"),
                                           ({"SLURM_NTASKS": "8"}, "4"),
                                           ({"SLURM_TASKS_PER_NODE": "4(x2),2", "SLURM_NTASKS": "10"}, None)])
def test_the_per_node_launchers_start_each_nodes_ranks_or_refuse_an_unequal_layout(tmp_path, layout, ranks):
    """torchrun/deepspeed start one number of ranks per node. `--ntasks=10` on 3 nodes gives
    SLURM_TASKS_PER_NODE=4(x2),2 and no SLURM_NTASKS_PER_NODE: 10 // 3 = 3 per node ran a world
    of 9, one sample share short, without a word. The refusal comes before the data is staged
    to every node (srun stands in here, recording its calls), not after the copy."""
    env = {"SLURM_JOB_NUM_NODES": "2" if ranks else "3", "SLURM_CPUS_ON_NODE": "16", "MTO_LAUNCHER": "torchrun",
           "MTO_ROOT": str(REPO), **layout}
    if ranks:
        out = run_lib('mto_step_command cmd pretrain; echo "ranks $MTO_RANKS_PER_NODE: ${cmd[*]}"', tmp_path, **env)
        assert out.returncode == 0 and f"ranks {ranks}: srun" in out.stdout, out.stdout + out.stderr
        return
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x")
    env.update(MTO_CONFIG="configs/demo.yaml", MTO_DATA_PATH=str(beton), MTO_DATA_STAGE_DIR=str(tmp_path / "local"))
    out = run_lib(f'srun() {{ echo "srun $*" >>{tmp_path / "srun.calls"}; }}; mto_main', tmp_path, **env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "MTO_LAUNCHER=torchrun starts as many ranks on every node, and this allocation has " \
           "SLURM_TASKS_PER_NODE=4(x2),2: submit with --ntasks-per-node" in out.stdout
    assert not (tmp_path / "srun.calls").exists() and "staging" not in out.stdout, out.stdout


def signal_once_the_step_runs(name: str, tmp_path: Path) -> str:
    """A bash command that sends SIG`name` to the batch shell once the step has its handlers
    (it creates `ready`), then lets a step of step_until_done() end: no fixed sleep that a
    loaded machine can outlast."""
    return (f"(while [[ ! -e {tmp_path}/ready ]]; do sleep 0.05; done; kill -{name} $$; sleep 0.5; "
            f"touch {tmp_path}/done)")


def step_until_done(tmp_path: Path, trap: str = "") -> str:
    return f"{trap}touch {tmp_path}/ready; while [[ ! -e {tmp_path}/done ]]; do sleep 0.05; done; exit 0"


def test_batch_shell_forwards_usr1_to_the_step_and_returns_its_exit_status(tmp_path):
    # The step stands in for srun: it exits 7 once it has received USR1.
    step = step_until_done(tmp_path, trap="trap 'echo step got USR1; exit 7' USR1; ")
    script = f"{signal_once_the_step_runs('USR1', tmp_path)} & mto_run_step bash -c \"{step}\"; echo \"status $?\""
    out = run_lib(script, tmp_path)
    assert out.stdout.splitlines()[-2:] == ["step got USR1", "status 7"], out.stdout + out.stderr
    assert "batch shell got SIGUSR1: forwarding it to the training step" in out.stdout


def test_batch_shell_passes_term_through_slurm_not_to_srun_which_would_kill_the_ranks(tmp_path):
    # The step stands in for srun; a TERM sent to it would print "step got TERM".
    step = step_until_done(tmp_path, trap="trap 'echo step got TERM; exit 9' TERM; ")
    script = (f"scancel() {{ echo \"scancel $*\" >>{tmp_path / 'scancel.calls'}; }}\n"
              f"{signal_once_the_step_runs('TERM', tmp_path)} & mto_run_step bash -c \"{step}\"; echo \"status $?\"")
    out = run_lib(script, tmp_path)
    assert "step got TERM" not in out.stdout and out.stdout.splitlines()[-1] == "status 0", out.stdout + out.stderr
    assert (tmp_path / "scancel.calls").read_text() == "scancel --signal=TERM 42\n"


def test_signal_that_came_just_before_the_step_started_is_forwarded_once_it_runs(tmp_path):
    step = "trap 'echo step got USR1; exit 7' USR1; while :; do sleep 0.1; done"
    script = f'MTO_SIGNALS=" USR1"; MTO_NSIG=1; mto_run_step bash -c "{step}"; echo "status $?"'
    out = run_lib(script, tmp_path, MTO_PENDING_SIGNAL_DELAY="3")  # time for bash to start, even on a loaded machine
    assert out.stdout.splitlines()[-2:] == ["step got USR1", "status 7"], out.stdout + out.stderr


def test_batch_shell_and_srun_ranks_derive_the_same_rendezvous_port_below_the_ephemeral_range(tmp_path):
    from mto_ds.engine.distributed import job_port
    path = fake_slurm_bin(tmp_path, srun_exit=0)
    for job_id in ("42", "31999", "987654"):
        out = run_lib("mto_set_master; echo $MASTER_ADDR $MASTER_PORT", tmp_path, SLURM_JOB_ID=job_id,
                      SLURM_JOB_NODELIST="node1", PATH=path)
        assert out.stdout.split()[-2] == "node1", out.stdout + out.stderr
        assert int(out.stdout.split()[-1]) == job_port(int(job_id)) < 32768, out.stdout + out.stderr


def test_batch_shell_that_cannot_name_the_first_node_stops_before_any_rank_starts(tmp_path):
    """An scontrol that cannot read its configuration prints no host: the ranks would get an
    empty MASTER_ADDR and fail (or hang) one by one instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 'scontrol: fatal: no configuration' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    # Also under a site's `set -euo pipefail`, where the failed scontrol ended the shell silently.
    for strict in ("", "set -euo pipefail; "):
        out = run_lib(f"{strict}mto_set_master; echo started", tmp_path, SLURM_JOB_NODELIST="gpu[01-02]",
                      PATH=f"{bin_dir}:{os.environ['PATH']}")
        assert out.returncode == 2 and "started" not in out.stdout, out.stdout + out.stderr
        assert ("error: cannot name the first node of SLURM_JOB_NODELIST=gpu[01-02] (scontrol show hostnames "
                "printed none): set MTO_MASTER_ADDR") in out.stdout, strict
    out = run_lib("mto_set_master; echo $MASTER_ADDR", tmp_path, SLURM_JOB_NODELIST="gpu[01-02]",
                  MTO_MASTER_ADDR="gpu01-ib", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert out.stdout.split() == ["gpu01-ib"], out.stdout + out.stderr


# ---- Ranks and rendezvous of a process started by srun (mto_ds.engine.distributed) ------

def srun_task_env(**extra: str) -> dict:
    """What srun gives task 1 of a 16-task step on 2 nodes (a batch shell has no SLURM_STEP_ID)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_JOB_NODELIST": "node[01-04,07],gpu-a[1-2]",
            "SLURM_STEP_NODELIST": "node[01-02]", **extra}


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-04,07],gpu-a[1-2]", "node01"), ("gpu-a[1-2],node[01-04]", "gpu-a1"), ("node[07,01-04]", "node07"),
    ("rack[2-3]-n[05-06],x", "rack2-n05"), ("a1,b2", "a1"), ("vm", "vm"), ("node[007]", "node007"),
])
def test_first_host_of_a_slurm_nodelist_is_read_without_scontrol(nodelist, first):
    """Ranks in a container often have no scontrol (or no slurm.conf for it): the rendezvous host
    must not silently become 127.0.0.1 there, which hangs every rank off the first node."""
    from mto_ds.engine.distributed import first_host
    assert first_host(nodelist) == first


def test_srun_task_takes_rank_from_slurm_and_master_from_the_steps_first_node_without_scontrol(monkeypatch, tmp_path):
    from mto_ds.engine.distributed import job_port, resolve_rank_env
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    env = srun_task_env()
    resolve_rank_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "node01", "MASTER_PORT": str(job_port(4242))}
    # A step on other nodes of the allocation (srun --relative, -w): rank 0 is on the step's first node.
    env = srun_task_env(SLURM_STEP_NODELIST="node[03-04]")
    resolve_rank_env(env)
    assert env["MASTER_ADDR"] == "node03"


def test_process_in_the_batch_shell_of_a_multi_task_job_is_one_rank_not_rank_0_of_all_tasks():
    """The batch shell has SLURM_PROCID=0 and SLURM_NTASKS=N too; `mto-ds eval` or a plain
    `mto-ds pretrain` run there is not one of N srun tasks (it would wait for the others forever)."""
    from mto_ds.engine.distributed import resolve_rank_env
    env = {k: v for k, v in srun_task_env(SLURM_PROCID="0", SLURM_LOCALID="0").items()
           if not k.startswith("SLURM_STEP")}
    resolve_rank_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


RESOLVE = ("import os; from mto_ds.engine.distributed import resolve_rank_env; resolve_rank_env(); "
           "print('ranks', *(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')))")


def test_real_slurm_job_gives_srun_tasks_their_ranks_and_its_batch_shell_one_rank(slurm_cluster, tmp_path):
    script = tmp_path / "ranks.sbatch"
    script.write_text(f"#!/bin/bash\ncd {REPO}\n{sys.executable} -c \"{RESOLVE}\"\n"
                      f"srun {sys.executable} -c \"{RESOLVE}\"\n")
    job_id = slurm_cluster.sbatch(script, env={"PYTHONPATH": str(REPO)},
                                  options=("--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/%j.out"))
    [job] = slurm_cluster.wait_final(job_id, timeout=120)
    log = job_log(job)
    from mto_ds.engine.distributed import job_port
    node, port = slurm_cluster.node, str(job_port(int(job_id)))
    lines = sorted(line.split()[1:] for line in log.splitlines() if line.startswith("ranks "))
    assert lines[0][:3] == ["0", "1", "127.0.0.1"], log  # the batch shell: a process of its own
    assert lines[1:] == [["0", "2", node, port], ["1", "2", node, port]], log


def fake_slurm_bin(tmp_path: Path, srun_exit: int) -> str:
    """A PATH whose srun exits `srun_exit` at once and whose scontrol knows one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\nexit {srun_exit}\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[[ \"$1 $2\" == 'show hostnames' ]] && echo node1\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_state_json_of_an_earlier_start_does_not_pass_a_failed_start_for_finished(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"finished": True, "step": 8, "total_steps": 8,
                                                    "reason": "completed"}))
    job_env = {**cpu_env(run_dir), "PATH": fake_slurm_bin(tmp_path, srun_exit=1), "SLURM_JOB_ID": "42",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS_PER_NODE": "2"}
    out = subprocess.run(["bash", str(PRETRAIN), "train.epochs=800"], env=job_env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "training step exited with status 1" in out.stdout
    assert "run not finished (step ? of ?, no state.json); not requeueing" in out.stdout, out.stdout


@pytest.mark.parametrize("env, args, message", [
    ({"MTO_CONFIG": "configs/no_such.yaml"}, [], "MTO_CONFIG=configs/no_such.yaml: no such file"),
    ({"MTO_DATA_PATH": "/no/such/train.beton"}, [], "MTO_DATA_PATH=/no/such/train.beton does not exist"),
    ({"MTO_DATA_STAGE_DIR": "/tmp/stage"}, [], "MTO_DATA_STAGE_DIR needs MTO_DATA_PATH"),
    ({}, ["train.steps"], "argument 'train.steps' is not a section.key=value override"),
    ({"MTO_LAUNCHER": "mpirun"}, [], "MTO_LAUNCHER=mpirun: expected srun, torchrun or deepspeed"),
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "4"}, [],
     "--ntasks-per-node=8 ranks on 4 GPU(s) per node: give each rank a GPU"),
])
def test_pretrain_template_fails_before_any_rank_starts_naming_the_bad_setting(tmp_path, env, args, message):
    job_env = {**cpu_env(tmp_path / "run"), "PATH": os.environ["PATH"], "SLURM_JOB_ID": "42",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", **env}
    # Run by bash outside any Slurm job: the checks come before the first srun.
    out = subprocess.run(["bash", str(PRETRAIN), *args], env=job_env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("data_path, srun_exit, message", [
    ("configs", 0, "MTO_DATA_PATH=configs is not a file (staging needs the .beton on shared storage)"),
    ("configs/demo.yaml", 1, "staging configs/demo.yaml to /stage failed"),
])
def test_staging_failure_is_named_in_the_job_log(tmp_path, data_path, srun_exit, message):
    """mto_stage_data runs in a command substitution: its error must not be captured as the path."""
    job_env = {**cpu_env(tmp_path / "run"), "PATH": fake_slurm_bin(tmp_path, srun_exit), "SLURM_JOB_ID": "42",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1",
               "MTO_DATA_PATH": data_path, "MTO_DATA_STAGE_DIR": "/stage"}
    out = subprocess.run(["bash", str(PRETRAIN)], env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: {message}" in out.stdout + out.stderr, out.stdout + out.stderr


def test_staging_onto_a_directory_that_the_nodes_share_copies_on_each_node_without_failing(tmp_path):
    """Two nodes whose staging directory is one (two slurmd of one host, or a scratch shared by
    mistake) copy at the same time: each node must write its own temporary copy. A temporary name
    shared by the nodes had the second `mv` find it gone (the job failed, 12 stagings in 20 with
    1 MB on the 2-node test cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun runs the command once per node, at the same time; each copy finishes before either
    # node renames its copy, as two copies of a large file do.
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'SLURM_NODEID=0 "$@" & a=$!; SLURM_NODEID=1 "$@" & b=$!\n'
                                  'wait $a && wait $b\n')
    (bin_dir / "cp").write_text(f'#!/bin/bash\n{shutil.which("cp")} "$@" && sleep 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    beton = tmp_path / "train.beton"
    beton.write_bytes(os.urandom(4096))
    stage = tmp_path / "stage"
    out = run_lib(f"mto_stage_data {beton} {stage}", tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}",
                  SLURM_JOB_NUM_NODES="2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [str(stage / "train.beton")], out.stdout + out.stderr
    assert sorted(p.name for p in stage.iterdir()) == ["train.beton"]
    assert (stage / "train.beton").read_bytes() == beton.read_bytes()


def test_slurm_tests_skip_with_the_reason_without_root_or_without_slurm(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in harness.unavailable_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(harness.shutil, "which", lambda name, path=None: None if name == "slurmd" else name)
    assert harness.unavailable_reason() == ("Slurm is not installed (missing slurmd): "
                                            "apt-get install slurm-wlm munge")
